"""fastbn's on-disk cache of compiled kernels: where it is read from, where it is written, its stamp.

Numba's own cache gives each function one directory, the first *writable* one among
``NUMBA_CACHE_DIR``, the package's ``__pycache__`` and the user-wide cache (``~/.cache/numba``). In a
read-only installation with a read-only HOME (a locked-down container) there is none, and defining
the first kernel fails with "cannot cache function ...: no locator available", even when the package
ships a complete cache. fastbn's cache reads and writes separately:

- load: from the first directory that holds a valid entry, in this order: ``NUMBA_CACHE_DIR`` (if
  set), the package's ``__pycache__`` (a cache shipped in the package or built into an image), the
  user-wide cache directory, and a private per-user directory in the temp dir
  (``$TMPDIR/fastbn-numba-<uid>``, used only if it is ours and closed to others: entries are pickles);
- save: into the first writable directory of the same list. With none writable the kernel runs
  uncached (compiled in every process, correct all the same). A failed write (a full disk, a
  directory made read-only meanwhile) stops writing; it never fails the call.

Stamp: Numba stamps a cache entry with its function's own source file only, but a kernel's machine
code inlines helpers from other files: after an edit of ``common.py``, ``forward.py``'s cached kernels
silently kept the old loops (seen while tuning: a 10x speed-up did not show until the cache was
cleared). fastbn's entries are stamped with a digest of every source file of ``fastbn/_kernels``, of
``fastbn/_jit.py`` (the compile options), of ``fastbn/_lazycode.py`` (what a helper's entry holds) and of
this file as well.

Start-up hooks: a loaded entry's hooks (start the thread pool) are put back into its code library, so
that a function compiled against it (our wrappers, a user's ``@njit(cache=True)`` code) inherits them;
Numba drops them there, and such a function's own entry then crashed the process that loaded it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import stat
import tempfile

_PKG_DIR = pathlib.Path(__file__).parent
_WRITABLE: dict[str, bool] = {}


@functools.lru_cache(maxsize=1)
def kernel_tree_digest() -> str:
    h = hashlib.sha256()
    # _cache.py itself: entries written before a fix of this module (the start-up hooks below) must go
    for path in sorted((_PKG_DIR / "_kernels").glob("*.py")) + [_PKG_DIR / "_jit.py", _PKG_DIR / "_cache.py",
                                                                _PKG_DIR / "_lazycode.py", _PKG_DIR / "_pipeline.py"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _writable(path: str) -> bool:
    """Whether files can be created in ``path`` (created if missing); probed once per directory."""
    ok = _WRITABLE.get(path)
    if ok is None:
        try:
            os.makedirs(path, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
            ok = True
        except OSError:
            ok = False
        _WRITABLE[path] = ok
    return ok


@functools.lru_cache(maxsize=2)
def _private_tmp_root(create: bool) -> str | None:
    """``$TMPDIR/fastbn-numba-<uid>`` (created 0700 if ``create``); None unless it is a directory of
    ours that no other user can write (a shared temp dir must not feed us someone else's pickles)."""
    if not hasattr(os, "getuid"):
        return None
    root = os.path.join(tempfile.gettempdir(), f"fastbn-numba-{os.getuid()}")
    if create:
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        st = os.lstat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return None
    return root


def tree_cache_class():
    """A numba FunctionCache class with the load/save split and the tree stamp described above."""
    return _classes()


@functools.lru_cache(maxsize=1)
def _classes():
    from numba.core import config
    from numba.core.caching import (CompileResultCacheImpl, FunctionCache, IndexDataCacheFile,
                                    _CacheLocator, _SourceFileBackedLocatorMixin)
    from numba.misc.appdirs import AppDirs

    class _Locator(_SourceFileBackedLocatorMixin, _CacheLocator):
        """All the directories a function's entries may be in; ``get_cache_path()`` is the one written."""

        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            sub = self.get_suitable_cache_subpath(py_file)
            dirs = [os.path.join(config.CACHE_DIR, sub)] if config.CACHE_DIR else []
            dirs.append(os.path.join(os.path.dirname(py_file), "__pycache__"))
            dirs.append(os.path.join(AppDirs(appname="numba", appauthor=False).user_cache_dir, sub))
            tmp = _private_tmp_root(create=False)  # read from it if it exists ...
            if tmp is not None:
                dirs.append(os.path.join(tmp, sub))
            self.dirs = dirs
            self.write_dir = next((d for d in dirs if _writable(d)), None)
            if self.write_dir is None and tmp is None:  # ... create it only when nothing else is writable
                tmp = _private_tmp_root(create=True)
                if tmp is not None:
                    dirs.append(os.path.join(tmp, sub))
                    self.write_dir = dirs[-1] if _writable(dirs[-1]) else None

        def get_cache_path(self):
            return self.write_dir or self.dirs[0]

        def get_source_stamp(self):
            return super().get_source_stamp(), kernel_tree_digest()

        @classmethod
        def from_function(cls, py_func, py_file):
            return cls(py_func, py_file) if os.path.exists(py_file) else None

    class _TreeCacheImpl(CompileResultCacheImpl):
        _locator_classes = [_Locator]

    class _TreeCache(FunctionCache):
        _impl_class = _TreeCacheImpl

        def __init__(self, py_func):
            super().__init__(py_func)
            loc = self._impl.locator
            stamp = loc.get_source_stamp()
            self._readers = [IndexDataCacheFile(d, self._impl.filename_base, stamp)
                             for d in getattr(loc, "dirs", [self._cache_path])]

        def _load_overload(self, sig, target_context):
            if not self._enabled:
                return None
            key = self._index_key(sig, target_context.codegen())
            for reader in self._readers:
                try:
                    data = reader.load(key)
                    if data is not None:
                        cr = self._impl.rebuild(target_context, data)
                        # Numba keeps a loaded entry's start-up hooks (reload_init: start the thread
                        # pool) in the result but not in its code library, from which callers compiled
                        # later inherit them: their own entries then lack the hook, and a process that
                        # loads one segfaulted on its first parallel region (numba#8578, #9938;
                        # tests/test_cache_reload.py).
                        cr.library._reload_init.update(cr.reload_init)
                        return cr
                except Exception:  # noqa: BLE001  an unreadable or corrupt entry is a miss, not an error
                    continue
            return None

        def _save_overload(self, sig, data):
            loc = self._impl.locator
            if getattr(loc, "write_dir", True) is None:
                return
            try:
                super()._save_overload(sig, data)
            except OSError:  # the directory stopped being writable: run uncached from now on
                loc.write_dir = None

    return _TreeCache
