"""Less LLVM work for fastbn's compiles: machine code on demand, and code without reductions optimized once.

Numba compiles every function into its own code library and finalizes it at once: it optimizes the
library's module (callees linked in) and emits machine code for it. A fastbn kernel stacks five libraries:
a row helper (reached through one or two more helpers), the parallel loop's body, two wrappers Numba puts
around that body, and the kernel. Each links the one below and optimizes and emits the whole again, so
the kernel's loops went through LLVM's optimizer and its machine-code emitter five times, and only the
kernel's copy ever runs. First float32 training forward, backward and inference ((32, 64, 28, 28), fresh
process, empty cache): LLVM took 5.1 s of the 11.5 s of CPU; the emitter 1.66 s of it, 0.43 s of that for
the three kernels' own libraries.

While one of fastbn's dispatchers compiles (``deferring()``, entered by ``fastbn._jit``):

- Machine code on demand. A finalized library keeps its LLVM module and is handed to the JIT
  engine only when something asks for its machine code: a function pointer (the entry point Python
  calls) or its object code. A helper is never called from Python, so its code is emitted only inside
  the kernels that link it. Its cache entry holds its bitcode (Numba's own 'bitcode' entry
  kind) instead of object code: the bitcode is what a caller links either way. A function's environment
  global (set when Numba builds the function's Python entry) is set once a module defining it is emitted.
- The parallel-loop body and its two wrappers (libraries Numba names ``__numba_parfor_gufunc_*``,
  ``<..._GufuncWrapper ...>``, ``parallelgufuncwrapper``) are linked into the kernel unoptimized: the
  kernel's own optimization runs over them anyway. Their own code is glue and the task bodies inlined
  there, compiled without fast-math flags, so the optimizer cannot reorder their float operations; the
  row helpers where the reductions are (``fastmath={"reassoc"}``) are still optimized in their own
  libraries first, which fixes their vector lanes. The body is compiled without a Python entry point
  (``no_cpython_wrapper``): only the gufunc wrapper calls it, through its native entry, and the address
  Numba asked for that Python entry was what still emitted the body's library (~0.1 s a kernel): LLVM
  2.74 -> 2.33 s, the whole first run 7.74 -> 6.94 s (medians of 6 alternating cold runs each; every
  run's LLVM time below every run's before).
- Only the kernels and the reduction helpers are optimized in their own libraries (``deferring(optimize)``,
  False for the other helpers). A task or a row writer has no fast-math flags, so no optimizer may
  reorder its float operations, and the kernel's optimization runs over its code anyway; a reduction
  helper (``fastmath={"reassoc"}``) is optimized first in its own library, which fixes its vector lanes
  for every caller. LLVM 2.01 -> 1.45 s, the whole first run 6.00 -> 5.43 s (medians of 4 alternating
  cold runs each, on a quieter machine than the measurements above).

Same bits throughout: 780 outputs (training forward, fused forward, inference, backward, fused backward;
13 shapes over every layout; float32 and float64; 1 and 2 threads) are bitwise equal to those of the
kernels before each of these changes.

The first two bullets as first written (before the body lost its Python entry), measured with
``examples/jit_profile.py``, 6 alternating cold runs against the commit before them: LLVM 4.73 -> 2.79 s
of CPU (medians; 4.48-5.64 and 2.55-3.23), the whole first run 10.9 -> 9.5 s. Kernel speed unchanged:
the same kernels compiled both ways in one process and timed interleaved (parallel variants on 1
thread, 6 shapes x training forward, inference, backward, medians of 31 rounds): 15 of the 18 medians
within 3%; the three training forwards, where the round order dominated, within 1-3% once the rounds
were balanced.

Everything compiled outside fastbn's dispatchers, a user's own ``@njit`` functions included, takes
Numba's path unchanged. If Numba's internals are not what this expects (another version), nothing is
patched and fastbn's compiles take Numba's path too.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Iterator

_STATE = threading.local()
_INSTALLED: list[bool] = []
# names of the libraries Numba builds around a parallel loop's body (numba/parfors/parfor_lowering.py,
# numba/np/ufunc/wrappers.py, numba/np/ufunc/parallel.py)
_PARFOR_GLUE = ("__numba_parfor_gufunc_", "<numba.np.ufunc.wrappers._GufuncWrapper", "parallelgufuncwrapper")
_ENVS: dict = {}  # environment global name -> Numba environment, set once a module defining it is emitted


@contextlib.contextmanager
def deferring(optimize: bool = True) -> Iterator[None]:
    """Libraries finalized inside this block get their machine code on demand (see the module doc); with
    ``optimize=False`` the library of the function compiled in it skips its module optimization."""
    depth = getattr(_STATE, "depth", 0)
    outer = getattr(_STATE, "optimize", True)
    _STATE.depth = depth + 1
    _STATE.optimize = optimize
    try:
        yield
    finally:
        _STATE.depth = depth
        _STATE.optimize = outer


def _pending(lib) -> bool:
    return lib.__dict__.get("_fastbn_pending", False)


def install() -> bool:
    """Patch Numba's JIT code library once; False (and nothing patched) if its internals differ."""
    if _INSTALLED:
        return _INSTALLED[0]
    try:
        from numba.core import codegen
        cls = codegen.JITCodeLibrary
        orig_finalize = cls._finalize_final_module
        orig_pointer = cls.get_pointer_to_function
        orig_serialize = cls.serialize_using_object_code
        orig_set_env = codegen.JITCPUCodegen.set_env
        orig_optimize = cls._optimize_final_module
        if not (hasattr(cls, "_finalize_dynamic_globals") and hasattr(cls, "_verify_declare_only_symbols")):
            raise AttributeError("numba's code library changed")
        from numba.parfors import parfor_lowering
        orig_body = parfor_lowering._create_gufunc_for_parfor_body
        if list(inspect.signature(orig_body).parameters)[:6] != ["lowerer", "parfor", "typemap", "typingctx",
                                                                  "targetctx", "flags"]:
            raise AttributeError("numba's parallel-loop lowering changed")
    except (ImportError, AttributeError):
        _INSTALLED.append(False)
        return False

    def emit(self) -> None:
        if _pending(self):
            self._fastbn_pending = False
            self._dynamic_globals = []  # the full finalize scans them again
            orig_finalize(self)
            # environments of functions whose library had no machine code when they were compiled
            # (their global first exists in this module, a helper's copy linked in)
            engine = self._codegen._engine
            for name in [n for n in _ENVS if engine.get_global_value_address(n)]:
                orig_set_env(self._codegen, name, _ENVS.pop(name))

    def set_env(self, env_name, env):
        if not self._engine.get_global_value_address(env_name):  # in a library still without machine code
            _ENVS[env_name] = env
            return
        orig_set_env(self, env_name, env)

    def _finalize_final_module(self):
        # a library loaded from object code (a cache entry) must reach the engine now: its symbols are
        # already registered there
        if getattr(_STATE, "depth", 0) and getattr(self, "_compiled_object", None) is None:
            self._finalize_dynamic_globals()
            self._verify_declare_only_symbols()
            self._fastbn_pending = True
            self._finalized = True
            return
        orig_finalize(self)

    def _optimize_final_module(self):
        if getattr(_STATE, "depth", 0) and (self.name.startswith(_PARFOR_GLUE) or not _STATE.optimize):
            return
        orig_optimize(self)

    def get_pointer_to_function(self, name):
        self._ensure_finalized()  # Numba finalizes a library on its first pointer request
        if _pending(self):
            try:
                defined = not self._final_module.get_function(name).is_declaration
            except NameError:
                defined = False
            if defined:
                emit(self)
            else:  # what the original answers for a name this library does not define
                engine = self._codegen._engine
                return engine.get_function_address(name) if engine.is_symbol_defined(name) else 0
        return orig_pointer(self, name)

    def create_gufunc_for_parfor_body(lowerer, parfor, typemap, typingctx, targetctx, flags, *args):
        if getattr(_STATE, "depth", 0):
            # the body is called only by the gufunc wrapper Numba builds around it, through its native
            # entry: a Python entry point would be the one name that makes its library emit machine code
            # (``flags`` is this loop's own copy)
            flags.no_cpython_wrapper = True
        return orig_body(lowerer, parfor, typemap, typingctx, targetctx, flags, *args)

    def serialize_using_object_code(self):
        if _pending(self):  # never run natively: its bitcode is all a caller links
            return (self.name, "bitcode", self._final_module.as_bitcode())
        return orig_serialize(self)

    cls._finalize_final_module = _finalize_final_module
    cls._optimize_final_module = _optimize_final_module
    cls.get_pointer_to_function = get_pointer_to_function
    cls.serialize_using_object_code = serialize_using_object_code
    codegen.JITCPUCodegen.set_env = set_env
    parfor_lowering._create_gufunc_for_parfor_body = create_gufunc_for_parfor_body
    _INSTALLED.append(True)
    return True
