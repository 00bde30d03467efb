"""Half-precision storage: float16 and bfloat16 arrays in kernels that compute in float32.

Numba has no 16-bit float type, so 2-byte data reaches the kernels as integer arrays of its bits, and the
integer type says which format the bits are in (no flag to pass along):

- ``uint16``: IEEE float16 (binary16), NumPy's ``float16``;
- ``int16``: bfloat16 (the upper half of a float32), torch's ``bfloat16`` and ``ml_dtypes.bfloat16``.

Every element load in ``rows.py`` / ``reduce.py`` goes through :func:`ld` and every element store through
:func:`st`; for float32/float64 arrays both are the identity and compile to exactly the code of a plain
``x[i]`` / ``y[i] = v`` (no call, no instruction). For 2-byte data:

- :func:`ld` widens to float32, exactly: float16 with LLVM's ``fpext half to float`` (one
  ``vcvtph2ps`` per 8 or 16 values on x86 with F16C), bfloat16 by shifting its bits into the upper half
  of a float32 (integer shifts, vectorized);
- :func:`st` rounds a float32 (or float64) result once, to nearest even: float16 with ``fptrunc``
  (``vcvtps2ph``; overflow gives inf, NaN stays NaN), bfloat16 with integer arithmetic on the float32
  bits (``(b + 0x7fff + lsb) >> 16``, vectorized; a NaN, which that rounding could carry into inf,
  becomes the quiet NaN of its sign, bit for bit what ml_dtypes gives; torch writes +NaN for both).

The per-element arithmetic then runs in the *compute dtype*, float32 for 2-byte data
(``prims.compute_empty`` allocates the coefficient arrays in it), and the statistics in float64 as for
float32 input.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.typing import signature
from numba.extending import intrinsic

_F16_BITS = types.uint16
_BF16_BITS = types.int16
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)


def _is_half_bits(t) -> bool:
    return t == _F16_BITS or t == _BF16_BITS


@intrinsic
def ld(typingctx, v):
    """A stored element as a compute value: float16 bits (uint16) and bfloat16 bits (int16) as float32,
    exactly; a float as it is."""
    if isinstance(v, types.Float):
        def identity(context, builder, sig, args):
            return args[0]

        return signature(v, v), identity
    if v == _F16_BITS:
        def from_f16(context, builder, sig, args):
            h = builder.bitcast(args[0], ir.HalfType())
            return builder.fpext(h, ir.FloatType())

        return signature(types.float32, v), from_f16
    if v == _BF16_BITS:
        def from_bf16(context, builder, sig, args):
            b = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(b, ir.FloatType())

        return signature(types.float32, v), from_bf16
    return None


def _round_bf16(builder, f32):
    """The bfloat16 bits (i16) of a float32 value, rounded to nearest even; a NaN gives 0x7fc0 / 0xffc0.

    The NaN select is made on the 16-bit results: with it on the 32-bit ones, the value stored is a
    truncation, which LLVM folded with the store into one 64-byte ordinary store in the streaming loops
    (their non-temporal hint lost: ``vpmovdw`` + ``vmovdqu64`` where float16 gets ``vmovntps``); selected
    in 16 bits, the store stays a non-temporal one (two 32-byte ``vmovntdq``). The NaN test is a float
    compare (one ``vcmpunordps``, where an integer test of the magnitude took two instructions): one core,
    25.7M values, y = (x - m) * k + t with streaming stores, 5.34 -> 5.04 ms (float16: 2.50 ms; the
    integer rounding and the packing of two 16-lane halves cost about twice float16's conversions)."""
    i32 = lambda v: ir.Constant(_I32, v)  # noqa: E731
    i16 = lambda v: ir.Constant(_I16, v)  # noqa: E731
    b = builder.bitcast(f32, _I32)
    hi = builder.lshr(b, i32(16))
    lsb = builder.and_(hi, i32(1))
    rounded = builder.trunc(builder.lshr(builder.add(builder.add(b, i32(0x7FFF)), lsb), i32(16)), _I16)
    quiet = builder.or_(builder.and_(builder.trunc(hi, _I16), i16(0x8000)), i16(0x7FC0))
    nan = builder.fcmp_unordered("uno", f32, f32)
    return builder.select(nan, quiet, rounded)


@intrinsic
def st(typingctx, v, arr):
    """The compute value ``v`` as an element of ``arr``'s storage (``arr[i] = st(v, arr)``): rounded once
    to float16 / bfloat16 bits for uint16 / int16 arrays; for float arrays the conversion of a plain
    ``arr[i] = v``."""
    if not (isinstance(v, types.Float) and isinstance(arr, types.Array)):
        return None
    dt = arr.dtype
    if isinstance(dt, types.Float):
        def to_float(context, builder, sig, args):
            return context.cast(builder, args[0], sig.args[0], dt)

        return signature(dt, v, arr), to_float
    if dt == _F16_BITS:
        def to_f16(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

        return signature(dt, v, arr), to_f16
    if dt == _BF16_BITS and v == types.float32:  # (from float64 it would round twice)
        def to_bf16(context, builder, sig, args):
            return _round_bf16(builder, args[0])

        return signature(dt, v, arr), to_bf16
    return None


def compute_dtype(x):
    """The Numba type of the compute dtype of array type ``x``'s elements (float32 for 2-byte data, the
    float dtype itself for float arrays; None for anything else): typing-time helper of
    ``prims.compute_empty`` and ``prims.zero_of``."""
    if isinstance(x, types.Array) and _is_half_bits(x.dtype):
        return types.float32
    if isinstance(x, types.Array) and isinstance(x.dtype, types.Float):
        return x.dtype
    return None


__all__ = ["ld", "st", "compute_dtype"]
