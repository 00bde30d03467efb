"""The one place that owns fastbn's Numba machinery.

Every kernel is a plain Python function of loops, decorated here:

- ``@helper``: a small ``njit`` function called from kernels (inlined by LLVM).
  ``reduction=True`` compiles it with ``fastmath={"reassoc"}`` so LLVM may split a float64 sum into
  vector lanes; without it a sum is one serial add chain (~4 cycles per element, measured ~3 GB/s on
  float32 input, a fifth of one core's share of DRAM bandwidth). ``reassoc`` keeps NaN/Inf semantics
  (unlike ``fastmath=True``), and the lane split is fixed at compile time, so results stay bitwise
  reproducible run to run and across thread counts.
- ``@kernel``: a top-level kernel with ``prange`` loops, compiled twice: ``.parallel``
  (``parallel=True``) and ``.serial`` (``prange`` runs as ``range``). Small inputs take the serial one:
  entering a parallel region costs ~1.5 us with the OpenMP layer and 25-90 us with workqueue.

All use Numba's on-disk cache and lazy compilation: ``import fastbn`` compiles nothing. Where that cache
is read and written (a read-only installation included) and how its entries are stamped with every
kernel source file: ``fastbn/_cache.py``.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable

import numba

from fastbn._cache import tree_cache_class

_REDUCTION_FLAGS = {"reassoc"}


def _jit(fn: Callable, **options):
    disp = numba.njit(**options)(fn)
    try:
        disp._cache = tree_cache_class()(disp.py_func)
    except (ImportError, AttributeError, TypeError):  # numba internals moved: numba's own cache
        try:
            disp.enable_caching()
        except RuntimeError:  # no writable cache directory: uncached
            pass
    except RuntimeError:  # no source file to stamp the cache with: uncached
        pass
    return disp


def helper(fn: Callable | None = None, *, reduction: bool = False, inline: bool = False):
    """Decorate a jitted helper.

    ``reduction=True`` lets LLVM vectorize its float sums. ``inline=True`` inlines it at Numba's IR level
    (``inline='always'``), before the parfor pass: a ``prange`` in it then runs in parallel inside a
    ``.parallel`` kernel and as ``range`` inside a ``.serial`` one. That is how kernels share whole passes
    (``fastbn/_kernels/passes.py``): measured 2.0x with 2 threads for an inlined ``prange`` body.
    """

    def wrap(f: Callable):
        opts = {}
        if reduction:
            opts["fastmath"] = _REDUCTION_FLAGS
        if inline:
            opts["inline"] = "always"
        return _jit(f, **opts)

    return wrap(fn) if fn is not None else wrap


@dataclass(frozen=True)
class Kernel:
    """A kernel compiled two ways from the same source.

    ``parallel`` runs its ``prange`` loops on Numba's thread pool; ``serial`` runs them in the calling
    thread. Both compute in the same order (work is split into chunks that depend on the shape only),
    so they return bitwise identical results.
    """

    name: str
    parallel: Any
    serial: Any

    def __call__(self, *args):
        return self.parallel(*args)


def _renamed_copy(fn: Callable, suffix: str) -> Callable:
    # Numba's cache files are named after the function's qualname; the serial copy needs a name of its
    # own or the two variants would overwrite each other's cache entries.
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                             fn.__closure__)
    new.__qualname__ = fn.__qualname__ + suffix
    new.__doc__ = fn.__doc__
    new.__module__ = fn.__module__
    return new


def kernel(fn: Callable) -> Kernel:
    """Decorate a kernel: returns a :class:`Kernel` with ``.parallel`` and ``.serial`` dispatchers."""
    par = _jit(fn, parallel=True)
    ser = _jit(_renamed_copy(fn, "_serial"))
    return Kernel(fn.__name__, par, ser)
