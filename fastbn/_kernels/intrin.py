"""Low-level intrinsics for the kernels: streaming (non-temporal) stores, a store fence, a read-only cast.

Streaming stores
    A store marked ``!nontemporal`` writes a whole cache line without reading it first (no
    read-for-ownership), so an output that does not fit in cache costs one DRAM write instead of a read
    plus a write. Measured on this project's 2-core EPYC (2 threads, float32): a 102.8 MB copy takes
    4.6-5.0 ms with streaming stores against 6.2-6.9 ms for a plain ``prange`` copy and 6.3-6.9 ms for
    torch's ``copy_``.

    LLVM vectorizes a loop around :func:`stream_store` only if it can prove the vector stores aligned
    (an unaligned non-temporal vector store is split into scalar ``movntss``, one per element, which runs
    at the store port's limit, not the memory's). So the store carries ``align 32`` and its callers
    guarantee it: :func:`stream_head` gives the number of leading elements to write with ordinary stores
    until the destination is 64-byte aligned, and the streaming loop then starts at an aligned address
    and advances by whole vectors (``rows.py``). Each non-temporal store of the remainder (fewer than a
    vector) is a scalar store, for which x86 has no alignment requirement.

    Streaming stores are weakly ordered: a task that used them ends with :func:`store_fence` so its
    writes are visible before the parallel region's barrier lets another thread (or the caller) read them.

All intrinsics here compile to a few instructions and are used by every output-writing loop through
``rows.put`` (one place decides between an ordinary and a streaming store).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic

# The vector-store alignment promised to LLVM; callers align destinations to 64 bytes (STREAM_ALIGN).
_PROMISED_ALIGN = 32
STREAM_ALIGN = 64


@intrinsic
def stream_store(typingctx, arr, idx, val):
    """``arr[idx] = val`` as a non-temporal store (``arr``: 1-D C-contiguous; no bounds check)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        arrty = sig.args[0]
        a, i, v = args
        ary = context.make_array(arrty)(context, builder, a)
        ptr = cgutils.get_item_pointer(context, builder, arrty, ary, [i], wraparound=False,
                                       boundscheck=False)
        v = context.cast(builder, v, sig.args[2], arrty.dtype)
        st = builder.store(v, ptr, align=_PROMISED_ALIGN)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(arr, idx, val), codegen


@intrinsic
def address(typingctx, arr):
    """The address of ``arr``'s first element, as an int64."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return types.int64(arr), codegen


@intrinsic
def store_fence(typingctx):
    """Order earlier non-temporal stores before later stores (x86 ``sfence``; a full fence elsewhere)."""

    def codegen(context, builder, sig, args):
        triple = builder.module.triple or ""
        if triple.startswith(("x86_64", "i686", "i386")):
            fn = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def writable(typingctx, arr):
    """The same array typed as writable: read-only inputs then share the kernels compiled for writable
    ones (the kernels never write their inputs), instead of compiling a copy of every pass per
    read-only combination."""
    if not isinstance(arr, types.Array):
        return None
    out = arr.copy(readonly=False)

    def codegen(context, builder, sig, args):
        # a new reference to the same array: the caller releases it (a plain return double-freed)
        return impl_ret_borrowed(context, builder, sig.return_type, args[0])

    return out(arr), codegen


@intrinsic
def num_threads(typingctx):
    """Numba's current thread count (``numba.get_num_threads()``), through the threading layer's
    registered symbol: Numba's own overload reads a ctypes pointer, which makes every caller
    uncacheable ("dynamic globals"). Callers are parallel drivers' callers, whose cache entries relaunch
    the threading layer (and so register the symbol) before they load."""
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []),
                                            "get_num_threads")
        return builder.call(fn, [])

    return types.intp(), codegen


@intrinsic
def opaque(typingctx, flag):
    """``flag`` as a run-time boolean: a constant passed on to a compiled callee would make it a literal
    and compile the callee once more for each value (see _jit.Kernel for flags that should be literals)."""
    if not isinstance(flag, (types.Boolean, types.BooleanLiteral)):
        return None

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[0], sig.args[0], types.boolean)

    return types.boolean(flag), codegen
