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

Everything a fastbn dispatcher compiles (its helpers and parallel-loop bodies included) gets machine code
only where it runs, and what has no float reduction (parallel-loop glue, tasks, row writers) is optimized
once, in its kernel: ``fastbn/_lazycode.py`` (the first float32 training forward, backward and
inference: LLVM 4.7 -> 2.8 s of CPU, then 2.0 -> 1.45 s). Every dispatcher compiles through
``fastbn/_pipeline.py``: Numba's pipeline, plus branches on literal flag arguments pruned before type
inference.

All use Numba's on-disk cache and lazy compilation: ``import fastbn`` compiles nothing. Where that cache
is read and written (a read-only installation included) and how its entries are stamped with every
kernel source file: ``fastbn/_cache.py``.
"""
from __future__ import annotations

import threading
import types
from typing import Any, Callable

import numba

from fastbn import _lazycode, _pipeline
from fastbn._cache import tree_cache_class

_REDUCTION_FLAGS = {"reassoc"}
# Options of a function that only jitted code calls (see helper): no Python or C entry point.
_NO_WRAPPERS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}
# Only explicit prange loops run in parallel: the automatic conversions (NumPy calls, array expressions,
# loop fusion) find nothing to do in fastbn's kernels and cost compile time looking.
PARALLEL_OPTIONS = {"prange": True, "comprehension": False, "reduction": False, "setitem": False,
                    "numpy": False, "stencil": False, "fusion": False, "inplace_binop": False}


def _jit(fn: Callable, optimize: bool = True, **options):
    disp = numba.njit(pipeline_class=_pipeline.Compiler, **options)(fn)
    if _lazycode.install():
        # what this dispatcher compiles, helpers and parallel-loop bodies included, gets its machine code
        # only where it runs (fastbn/_lazycode.py)
        disp.compile = _deferred(disp.compile, optimize)
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


def _deferred(compile_: Callable, optimize: bool) -> Callable:
    def compile(sig):
        with _lazycode.deferring(optimize):
            return compile_(sig)

    return compile


def helper(fn: Callable | None = None, *, reduction: bool = False, inline: bool = False, python: bool = False):
    """Decorate a jitted helper.

    ``reduction=True`` lets LLVM vectorize its float sums. ``inline=True`` inlines it at Numba's IR level
    (``inline='always'``) instead of compiling it as a function of its own: for small helpers and for the
    compositions in ``_kernels/core.py``, whose ``prange`` loops then run in parallel inside a kernel's
    parallel variant and as ``range`` inside its serial one.

    Why it matters: Numba links every callee's code into its caller and optimizes the whole again, so a loop
    costs compile time once per level of calls above it (a helper 30 loops long: 1.0 s, then 0.5 s more for
    each caller above it). Kernels keep their loops few levels down: row loop, task, kernel.

    A helper is called from jitted code only, unless ``python=True``: Numba then builds neither the wrapper
    that lets Python call it nor the C-callable one (``no_cpython_wrapper``, ``no_cfunc_wrapper``). Each is
    lowered and compiled to machine code with every helper: without them the first float32 training
    forward, backward and inference took 12.9 s of CPU against 13.9 s (medians of 6 alternating cold runs;
    median ratio 0.91, spread 0.78-1.14 on this shared machine).
    """

    def wrap(f: Callable):
        opts = {}
        if reduction:
            opts["fastmath"] = _REDUCTION_FLAGS
        if inline:
            opts["inline"] = "always"
        elif not python:
            opts.update(_NO_WRAPPERS)
        disp = _jit(f, optimize=reduction or python, **opts)
        _register(f.__name__, disp, inline)
        return disp

    return wrap(fn) if fn is not None else wrap


def driver(fn: Callable):
    """Decorate a stand-alone parallel function (its ``prange`` loops run on Numba's thread pool): the
    bound kernels in ``_kernels/roofline.py``. fastbn's kernels are :class:`Kernel` variants."""
    return _jit(fn, parallel=PARALLEL_OPTIONS)


class Kernel:
    """A kernel's compiled variants, all from one source function.

    A variant is parallel (its ``prange`` loops run on Numba's thread pool) or serial (they run in the
    calling thread), with a value for each of the kernel's compile-time flags: module-level names the
    source reads (``RELU``, ``STREAM``, ...), frozen into the variant as constants. Numba passes a constant
    to a callee as a literal, so the tasks and loops under a variant are compiled for exactly its flags: a
    plain batch norm compiles no ReLU or streaming-store loop. Variants compile on first use.

    All variants of a kernel split work into chunks that depend on the shape only, so parallel and
    serial variants return bitwise identical results.
    """

    def __init__(self, fn: Callable, flags: tuple[str, ...]):
        self.name = fn.__name__
        self.py_func = fn
        self.flags = flags
        self._variants: dict = {}
        self._lock = threading.Lock()

    def get(self, parallel: bool = True, **flags: int):
        """The dispatcher of one variant (flags not given are False)."""
        values = tuple(int(flags.pop(f, 0)) for f in self.flags)
        if flags:
            raise TypeError(f"kernel {self.name} has no flag(s) {sorted(flags)}; flags: {self.flags}")
        return self.variant((bool(parallel),) + values)

    def variant(self, key: tuple):
        """The dispatcher for ``key`` = (parallel, *flag values in the order of ``flags``): the fast path
        for callers that build the key themselves."""
        disp = self._variants.get(key)
        if disp is None:
            if len(key) != len(self.flags) + 1:
                raise TypeError(f"kernel {self.name}: variant key {key} does not match flags {self.flags}")
            with self._lock:
                disp = self._variants.get(key)
                if disp is None:
                    disp = self._variants[key] = self._make((bool(key[0]),) + tuple(int(k) for k in key[1:]))
        return disp

    def _make(self, key):
        parallel, values = key[0], key[1:]
        fn = self.py_func
        glb = dict(fn.__globals__)
        # bool flags stay bools (Numba types a global True as a boolean literal; 1 would be an int)
        glb.update((f, v if not isinstance(fn.__globals__.get(f), bool) else bool(v))
                   for f, v in zip(self.flags, values))
        # Numba names cache files after the qualname: every variant needs its own.
        suffix = "__" + ("par" if parallel else "ser") + "".join(
            f"_{f.lower()}{int(v)}" for f, v in zip(self.flags, values) if v)
        new = types.FunctionType(fn.__code__, glb, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
        new.__qualname__ = fn.__qualname__ + suffix
        new.__doc__ = fn.__doc__
        new.__module__ = fn.__module__
        # called from Python and from jitted code, never as a first-class function: no C entry point
        if parallel:
            return _jit(new, parallel=PARALLEL_OPTIONS, no_cfunc_wrapper=True)
        return _jit(new, no_cfunc_wrapper=True)

    @property
    def parallel(self):
        return self.get(True)

    @property
    def serial(self):
        return self.get(False)

    def __call__(self, *args):
        return self.parallel(*args)

    def __repr__(self) -> str:
        return f"<fastbn kernel {self.name} flags={self.flags} variants={len(self._variants)}>"


def kernel(*flags: str) -> Callable[[Callable], Kernel]:
    """Decorate a kernel whose source reads the compile-time ``flags`` (module-level names, False by
    default); see :class:`Kernel`."""

    def wrap(fn: Callable) -> Kernel:
        return Kernel(fn, tuple(flags))

    return wrap


# ---- compile-time choice between implementations. Numba alone does not prune a branch on a flag that
# reaches a function as a literal (a kernel variant's constant, see Kernel): it types and compiles every
# callee under a dead ``if``. These pick the callee while typing, so the others are never compiled. Since
# fastbn/_pipeline.py such a plain ``if flag:`` is pruned as well, before typing; the two are equivalent.
# Callees are named by string (a dispatcher passed as an argument would be a run-time object, which makes
# the caller uncacheable); every @helper is registered under its name.

_HELPERS: dict[str, Any] = {}


def _register(name: str, disp: Any, inline: bool) -> None:
    if inline:  # Numba's inliner cannot take the *args of choose()'s implementations
        return
    if name in _HELPERS and _HELPERS[name].py_func.__module__ != disp.py_func.__module__:
        raise RuntimeError(f"two fastbn helpers named {name!r}: choose() needs unique names")
    _HELPERS[name] = disp


def _make_choices():
    from numba import types
    from numba.core import cgutils
    from numba.core.typing import signature
    from numba.extending import intrinsic

    def call(typingctx, name, args, outer_args):
        disp = _HELPERS[name]
        fnty = typingctx.resolve_value_type(disp)
        inner = typingctx.resolve_function_type(fnty, tuple(args.types), {})
        if inner is None:
            raise TypeError(f"fastbn: no signature of {name} for {args}")

        def codegen(context, builder, sig, llargs):
            vals = cgutils.unpack_tuple(builder, llargs[-1], len(args))
            return context.get_function(fnty, inner)(builder, vals)

        return signature(inner.return_type, *outer_args), codegen

    @intrinsic(prefer_literal=True)
    def choose(typingctx, flag, f_true, f_false, args):
        """``f_true(*args)`` if ``flag`` else ``f_false(*args)`` (helpers named by string, ``args`` a
        tuple); the flag must be a literal and only the chosen helper is compiled and called, directly."""
        if not isinstance(flag, types.BooleanLiteral) or not isinstance(args, types.BaseTuple):
            return None
        name = (f_true if flag.literal_value else f_false).literal_value
        return call(typingctx, name, args, (flag, f_true, f_false, args))

    @intrinsic(prefer_literal=True)
    def choose_by_layout(typingctx, cl, owned, f_cl, f_owned, f_split, args):
        """``f_cl`` if ``cl``, else ``f_owned`` if ``owned``, else ``f_split``, called with the tuple
        ``args`` (helpers named by string, literal flags)."""
        if not (isinstance(cl, types.BooleanLiteral) and isinstance(owned, types.BooleanLiteral)
                and isinstance(args, types.BaseTuple)):
            return None
        name = (f_cl if cl.literal_value else (f_owned if owned.literal_value else f_split)).literal_value
        return call(typingctx, name, args, (cl, owned, f_cl, f_owned, f_split, args))

    return choose, choose_by_layout


choose, choose_by_layout = _make_choices()
