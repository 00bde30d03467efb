"""Builtins the kernels call, as intrinsics: ``min2``/``max2`` (Python's two-argument ``min``/``max``),
``f64_empty`` (``np.empty(shape)``), ``compute_empty`` (``np.empty`` in the compute dtype), ``zero_of``
(0 in the compute dtype) and ``flat_from`` (``arr.reshape(arr.size)[start:]``).

Why not the builtins themselves: Numba implements ``min``, ``max``, ``np.empty`` and ``np.zeros`` with
``@overload``, and an overload is a function compiled on its own, through the whole pipeline (typing,
lowering, an LLVM library), once for every distinct argument-type signature. The kernels call them
with many: ``np.empty((3, SLAB_ELEMS))`` and ``np.empty((2, G))`` are different signatures (a literal
and a run-time int), and so are ``min(C, c0 + cb)`` and ``min(A, (k + 1) * rpc)`` when one side is a
literal. The first float32 training forward, backward and inference compiled 19 of them (0.5 s of CPU
in a cold run of 7.3 s, measured with a timer on each compile). An intrinsic costs its typing and a few
LLVM instructions in its caller, nothing else. ``reshape`` is no overload but a helper Numba compiles
through its whole pipeline as well (``normalize_reshape_value``: 0.11 s), and links into every kernel,
which optimizes it again.

Measured (``examples/jit_profile.py``, cold runs rotating between commits, 8 rounds each on a loaded
machine): the first float32 training forward, backward and inference took medians of 7.02 -> 6.50 ->
5.36 s (the overloads gone, then ``reshape``), LLVM 1.85 -> 1.65 -> 1.27 s; in a second set 7.15 s
before both against 6.03 s after (per-round ratios 0.70-1.02, median 0.80).

Each gives exactly the code of the builtin it replaces (the same comparison and select, the same
allocation call), so no result changes: ``min2(a, b)`` is ``b if b < a else a`` and ``max2(a, b)``
``b if b > a else a`` in the unified type, which is what Numba's ``min``/``max`` compute (so NaN handling
is the builtin's too).
"""
from __future__ import annotations

import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.core.typing import signature
from numba.extending import intrinsic
from numba.np.arrayobj import _empty_nd_impl, _parse_shape, populate_array

from fastbn._kernels.half import compute_dtype


def _minmax(typingctx, a, b, op):
    if not all(isinstance(t, (types.Number, types.Boolean)) for t in (a, b)):
        return None
    ty = typingctx.unify_types(a, b)
    if ty is None:
        return None
    ty = types.unliteral(ty)

    def codegen(context, builder, sig, args):
        va = context.cast(builder, args[0], sig.args[0], ty)
        vb = context.cast(builder, args[1], sig.args[1], ty)
        pred = context.get_function(op, signature(types.boolean, ty, ty))(builder, (vb, va))
        return builder.select(pred, vb, va)

    return signature(ty, a, b), codegen


@intrinsic
def min2(typingctx, a, b):
    """``min(a, b)`` for two numbers (``b if b < a else a``, in their unified type)."""
    return _minmax(typingctx, a, b, operator.lt)


@intrinsic
def max2(typingctx, a, b):
    """``max(a, b)`` for two numbers (``b if b > a else a``, in their unified type)."""
    return _minmax(typingctx, a, b, operator.gt)


def _ndim(shape):
    if isinstance(shape, types.Integer):
        return 1
    if isinstance(shape, types.BaseTuple) and all(isinstance(t, types.Integer) for t in shape.types):
        return shape.count
    return None


def _empty(shape, dtype):
    ndim = _ndim(shape)
    if ndim is None or dtype is None:
        return None
    arrty = types.Array(dtype, ndim, "C")

    def codegen(context, builder, sig, args):
        shapes = _parse_shape(context, builder, sig.args[0], args[0])
        return _empty_nd_impl(context, builder, sig.return_type, shapes)._getvalue()

    return arrty, codegen


@intrinsic
def f64_empty(typingctx, shape):
    """``np.empty(shape)``: an uninitialized float64 C array (``shape`` an int or a tuple of ints)."""
    arrty, codegen = _empty(shape, types.float64) or (None, None)
    return None if arrty is None else (signature(arrty, shape), codegen)


@intrinsic
def compute_empty(typingctx, shape, x):
    """``np.empty(shape)`` in the compute dtype of ``x``'s elements (an array): its own float dtype, float32
    for 2-byte data (half.py)."""
    arrty, codegen = _empty(shape, compute_dtype(x)) or (None, None)
    if arrty is None:
        return None

    def codegen2(context, builder, sig, args):
        return codegen(context, builder, signature(sig.return_type, sig.args[0]), args[:1])

    return signature(arrty, shape, x), codegen2


@intrinsic
def zero_of(typingctx, x):
    """0 in the compute dtype of ``x``'s elements (an array), e.g. to select against without promoting a
    float32 loop to float64 (a float64 literal would)."""
    dtype = compute_dtype(x)
    if dtype is None:
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(dtype, 0)

    return signature(dtype, x), codegen


@intrinsic
def flat_from(typingctx, arr, start):
    """The values of the C-contiguous array ``arr`` from flat index ``start`` on, as a 1-D view:
    ``arr.reshape(arr.size)[start:]`` (``start`` clamped to [0, arr.size] as the slice clamps it). An
    array not typed C-contiguous is checked at run time (ValueError if it is not)."""
    if not (isinstance(arr, types.Array) and isinstance(start, types.Integer)):
        return None
    out = types.Array(arr.dtype, 1, "C", readonly=not arr.mutable)

    def codegen(context, builder, sig, args):
        arrty = sig.args[0]
        ary = context.make_array(arrty)(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        zero = ir.Constant(intp, 0)
        size = ary.nitems
        if arrty.layout != "C" and arrty.ndim > 0:
            # C-contiguous: each stride is the next one times the next extent (extents of 1 are free)
            shape = cgutils.unpack_tuple(builder, ary.shape, arrty.ndim)
            strides = cgutils.unpack_tuple(builder, ary.strides, arrty.ndim)
            ok = ir.Constant(ir.IntType(1), 1)
            expect = ary.itemsize
            for k in reversed(range(arrty.ndim)):
                good = builder.or_(builder.icmp_signed("==", strides[k], expect),
                                   builder.icmp_signed("<=", shape[k], ir.Constant(intp, 1)))
                ok = builder.and_(ok, good)
                expect = builder.mul(expect, shape[k])
            ok = builder.or_(ok, builder.icmp_signed("==", size, zero))
            with cgutils.if_unlikely(builder, builder.not_(ok)):
                context.call_conv.return_user_exc(builder, ValueError,
                                                  ("fastbn kernel: arrays must be C-contiguous",))
        s0 = context.cast(builder, args[1], sig.args[1], types.intp)
        s0 = builder.select(builder.icmp_signed("<", s0, zero), zero, s0)
        s0 = builder.select(builder.icmp_signed(">", s0, size), size, s0)
        view = context.make_array(sig.return_type)(context, builder)
        populate_array(view, data=builder.gep(ary.data, [s0]), shape=[builder.sub(size, s0)],
                       strides=[ary.itemsize], itemsize=ary.itemsize, meminfo=ary.meminfo, parent=ary.parent)
        return impl_ret_borrowed(context, builder, sig.return_type, view._getvalue())

    return signature(out, arr, start), codegen


__all__ = ["min2", "max2", "f64_empty", "compute_empty", "zero_of", "flat_from"]
