"""A copy of the installed package and the environment of a fresh interpreter that runs it with no
compile cache but the ones given: what the JIT-cost benchmark (``benchmarks/jit_cost.py``), the JIT
profile (``examples/jit_profile.py``) and the cache tests need to see a first run as a new user does.

An empty ``NUMBA_CACHE_DIR`` alone is not a cold start: Numba (and fastbn's cache, ``_cache.py``) also
look in the package's ``__pycache__`` and under HOME, so the package is copied without its
``__pycache__`` and HOME, TMPDIR and XDG_CACHE_HOME point into the given directories.
"""
from __future__ import annotations

import os
import pathlib
import shutil

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def copy_package(site: str | os.PathLike, *, with_cache: bool = False) -> pathlib.Path:
    """Copy the fastbn package into ``site/fastbn`` (without its ``__pycache__`` directories unless
    ``with_cache``: a package shipping its compiled kernels) and return ``site`` as a Path.

    Example
    -------
    >>> import tempfile
    >>> from fastbn._isolated import copy_package
    >>> with tempfile.TemporaryDirectory() as d:
    ...     site = copy_package(pathlib.Path(d) / "site")
    ...     (site / "fastbn" / "__init__.py").exists(), any(site.rglob("__pycache__"))
    (True, False)
    """
    site = pathlib.Path(site)
    ignore = None if with_cache else shutil.ignore_patterns("__pycache__")
    shutil.copytree(PACKAGE_DIR, site / "fastbn", ignore=ignore)
    return site


def fresh_env(site: str | os.PathLike, home: str | os.PathLike, cache: str | os.PathLike | None = None,
              tmpdir: str | os.PathLike | None = None) -> dict[str, str]:
    """This process's environment for a child that imports fastbn from ``site``, with HOME ``home``,
    XDG_CACHE_HOME ``home/.cache``, TMPDIR ``tmpdir`` (``home`` when None) and NUMBA_CACHE_DIR ``cache``
    (left unset when None).

    Example
    -------
    >>> env = fresh_env("/tmp/s", "/tmp/h", "/tmp/c")
    >>> env["PYTHONPATH"], env["HOME"], env["NUMBA_CACHE_DIR"]
    ('/tmp/s', '/tmp/h', '/tmp/c')
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    home = pathlib.Path(home)
    env.update(PYTHONPATH=str(site), HOME=str(home), TMPDIR=str(home if tmpdir is None else tmpdir),
               XDG_CACHE_HOME=str(home / ".cache"))
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = str(cache)
    return env
