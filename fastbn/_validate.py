"""Argument checking and layout resolution shared by the public API.

Errors name the argument and what was expected. Nothing here touches the kernels: it turns user input
into the kernels' contract (C-contiguous (A, C, B) views, float64 per-channel vectors).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

_F16 = np.dtype(np.float16)
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_KERNEL_DTYPES = (_F32, _F64)
_DTYPES_WANTED = "float32, float64, float16 or bfloat16"
_CONSTANTS: dict = {}


def _constant_vector(C: int, value: float) -> np.ndarray:
    """A shared float64 (C,) array of ``value`` (gamma/beta defaults); kernels only read it. Wide ones
    are not kept (256 cached vectors of 2**24 channels would hold 32 GiB)."""
    if C > 1 << 16:
        return np.full(C, value)
    v = _CONSTANTS.get((C, value))
    if v is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        v = _CONSTANTS[(C, value)] = np.full(C, value)
    return v


# The checks below take a fast path for the common types first: the tiny case (4, 8, 4, 4) has a
# ~1.5 us kernel, and isinstance against numbers.Real (an ABC) costs ~0.3 us a call.


def is_bfloat16(dt: np.dtype) -> bool:
    """Whether ``dt`` is ``ml_dtypes.bfloat16`` (told by its name: fastbn does not import ml_dtypes)."""
    return dt.kind == "V" and dt.itemsize == 2 and dt.name == "bfloat16"


def is_half(dt: np.dtype) -> bool:
    """float16 or bfloat16: stored in 2 bytes, computed in float32 (see ``fastbn/_kernels/half.py``)."""
    return dt == _F16 or is_bfloat16(dt)


def as_input(x, name: str) -> np.ndarray:
    """An x-like input: a float32/float64/float16/bfloat16 ndarray with at least 2 dims (an ndarray
    subclass such as np.matrix or np.memmap is viewed as a plain ndarray, without a copy)."""
    if type(x) is np.ndarray and (x.dtype is _F32 or x.dtype is _F64) and x.ndim >= 2:
        return x
    if not isinstance(x, np.ndarray) and (np.isscalar(x) or x is None):
        raise TypeError(f"{name} must be an array with at least 2 dimensions (batch, channels, ...), "
                        f"got {type(x).__name__}")
    x = np.asarray(x)
    dt = x.dtype
    if dt not in _KERNEL_DTYPES and not is_half(dt):
        if dt.kind == "f" and dt.itemsize in (2, 4, 8):  # non-native byte order
            x = x.astype(dt.newbyteorder("="))
        else:
            raise TypeError(f"{name} must have dtype {_DTYPES_WANTED}, got {dt}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch, channels, ...), got shape {x.shape}")
    return x


def like_x(arr, name: str, x: np.ndarray) -> np.ndarray:
    """An array that must have x's shape and dtype (dy, residual, y)."""
    arr = as_input(arr, name)
    if arr.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {x.shape}, got {arr.shape}")
    if arr.dtype is not x.dtype and arr.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}, got {arr.dtype}")
    return arr


def running_pair(running_mean, running_var, momentum, C: int, x: np.ndarray,
                 out: np.ndarray | None) -> tuple[bool, float]:
    """Check optional running statistics updated in place: (update?, momentum as a float).

    They must not share memory with each other, with ``x`` or with ``out``: the call would overwrite
    what it still reads, or leave one statistic's update in the other.
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is None:
        return False, 0.0
    momentum = check_momentum(momentum)
    running_vector(running_mean, "running_mean", C)
    running_vector(running_var, "running_var", C)
    if running_mean is running_var or not (running_mean.base is None and running_var.base is None
                                           and x.base is None and (out is None or out.base is None)):
        _check_running_apart(running_mean, running_var, x, out)  # arrays that own their memory are apart
    return True, momentum


def _check_running_apart(running_mean, running_var, x: np.ndarray, out) -> None:
    if overlaps(running_mean, running_var):
        raise ValueError("running_mean and running_var share memory; they are updated in place and must be "
                         "separate arrays")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if overlaps(v, x) or (isinstance(out, np.ndarray) and overlaps(v, out)):
            raise ValueError(f"{name} shares memory with x or out; it is updated in place and must be a "
                             "separate array")


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays share memory (exact). Arrays that own their memory are told apart in ~50 ns
    (the tiny case's whole call is ~6 us); views take ``np.may_share_memory`` / ``np.shares_memory``."""
    if a is b:
        return True
    if a.base is None and b.base is None:
        return False
    return bool(np.may_share_memory(a, b)) and bool(np.shares_memory(a, b))


def _owner(a: np.ndarray):
    """The array at the end of ``a``'s chain of bases (the one that allocated the memory), or None when
    the chain ends in something else (a memory map, a buffer, another library's tensor)."""
    while True:
        b = a.base
        if b is None:
            return a if a.flags.owndata else None  # (memory from a C extension: no owner known)
        if type(b) is not np.ndarray:
            return None
        a = b


def unaliased(vectors: tuple, *written) -> tuple:
    """Per-channel vectors a kernel reads, each copied if it shares memory with an array the call
    writes (``out=``, running statistics; None ignored): the kernel would read values it has
    already overwritten. Copying a (C,) vector costs far less than the call.

    Arrays allocated by NumPy (their chains of bases end in different arrays) are apart without a
    look at their addresses: 0.4-0.6 us where the exact test costs ~0.4 us per pair (the tiny case's
    whole call is ~10 us)."""
    for v in vectors:  # fast path: arrays that own their memory are apart unless the same object
        if not v.flags.owndata:
            break
    else:
        for w in written:
            if w is None:
                continue
            if type(w) is not np.ndarray or not w.flags.owndata:
                break
            if w.ndim == 1:
                for v in vectors:
                    if v is w:
                        break
                else:
                    continue
                break
        else:
            return vectors
    result = vectors
    for w in written:
        if not isinstance(w, np.ndarray):  # None, or a bad out= refused later by name
            continue
        ow = _owner(w)
        for i, v in enumerate(result):
            if v is w:
                result = result[:i] + (v.copy(),) + result[i + 1:]
                continue
            if ow is not None:
                ov = _owner(v)
                if ov is not None and ov is not ow:
                    continue
            if overlaps(v, w):
                result = result[:i] + (v.copy(),) + result[i + 1:]
    return result


def check_running_var(rv: np.ndarray, eps: float, name: str = "running_var") -> None:
    """``rv + eps > 0`` for every channel (rv: float64 (C,)), else ValueError naming the channel."""
    if rv.shape[0]:
        i = int(rv.argmin())  # ~0.3 us where (rv + eps <= 0).any() costs ~2 us on the tiny case
        if rv.item(i) + eps <= 0.0:  # a NaN passes, as it does the kernels' own formula
            raise ValueError(f"{name} + eps must be positive (a variance); channel {i} has "
                             f"{name}={rv.item(i)!r}, eps={eps!r}")


def normalize_axis(axis, ndim: int) -> int:
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return axis % ndim


def real_number(v, name: str, expected: str) -> float:
    """``float(v)`` for a real number (not a bool); an int too large for a float is a ValueError."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} must be {expected}, got {v!r:.40} (too large for a float)") from None


def check_eps(eps) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps
    eps = real_number(eps, "eps", "a positive float")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps}")
    return eps


def check_flag(v, name: str) -> bool:
    """A bool argument: True/False (or a NumPy bool); anything else, a string in particular, is refused."""
    if v is True or v is False:
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    raise TypeError(f"{name} must be True or False, got {v!r}")


def check_momentum(momentum, name: str = "momentum") -> float:
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    momentum = real_number(momentum, name, "a float in [0, 1]")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {momentum}")
    return momentum


def channel_vector(v, name: str, C: int, default: float | None = None) -> np.ndarray:
    """A per-channel parameter as a contiguous, writable float64 (C,) array (converted from any float
    dtype; a read-only one is copied: Numba compiles a kernel again for read-only arguments)."""
    if v is None:
        if default is None:
            raise TypeError(f"{name} is required")
        return _constant_vector(C, default)
    if type(v) is np.ndarray and v.shape == (C,):  # fast paths: ~0.2 us
        dt = v.dtype
        if dt is _F64:
            f = v.flags
            return v if f.c_contiguous and f.writeable else v.copy()
        if dt.kind == "f":
            return v.astype(_F64)  # a new contiguous writable array, converted
    if not isinstance(v, np.ndarray):
        v = np.asarray(v)
    if v.dtype.kind != "f" and not is_bfloat16(v.dtype):
        raise TypeError(f"{name} must be a float array of length {C}, got dtype {v.dtype}")
    if v.ndim != 1 or v.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {v.shape}")
    out = np.ascontiguousarray(v, dtype=np.float64)
    return out if out.flags.writeable else out.copy()


def running_vector(v, name: str, C: int) -> np.ndarray:
    """A running statistic updated in place: a writeable float (C,) ndarray."""
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (it is updated in place), got {type(v).__name__}")
    if v.dtype.kind != "f" and not is_bfloat16(v.dtype):
        raise TypeError(f"{name} must be a float array of length {C}, got dtype {v.dtype}")
    if v.ndim != 1 or v.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) (one value per channel), got {v.shape}")
    if not v.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is updated in place)")
    return v


class _Alias:
    """Holds a read-only array and exposes its memory as writable (for _writable_alias)."""

    def __init__(self, arr: np.ndarray):
        self.base = arr
        iface = dict(arr.__array_interface__)
        iface["data"] = (iface["data"][0], False)
        self.__array_interface__ = iface


def _writable_alias(arr: np.ndarray) -> np.ndarray:
    """A writable view of a read-only array's memory (the result keeps ``arr`` alive)."""
    out = np.asarray(_Alias(arr))
    # the array interface describes a user dtype (ml_dtypes' bfloat16) as plain bytes ('<V2')
    return out if out.dtype == arr.dtype else out.view(arr.dtype)


@dataclass(slots=True, frozen=True)
class Layout:
    """How an N-d array maps onto the kernels' (A, C, B) view.

    ``order`` is the axis permutation under which the array is C-contiguous (None: already is), so a
    channels-last tensor, a Fortran-ordered array or a transposed view is used without a copy.
    """

    shape: tuple
    order: tuple | None
    A: int
    C: int
    B: int

    def view(self, arr: np.ndarray) -> np.ndarray:
        """arr (same shape as the reference) as a C-contiguous (A, C, B) array; copies only if needed.

        A read-only input comes back as a writable view of the same memory: the kernels never write
        their inputs, and Numba compiles a kernel again for every read-only combination of its arguments.
        """
        t = arr if self.order is None else arr.transpose(self.order)
        if not t.flags.c_contiguous:
            t = np.ascontiguousarray(t)
        elif not t.flags.writeable:
            t = _writable_alias(t)
        return t.reshape(self.A, self.C, self.B)

    def empty(self, dtype) -> np.ndarray:
        """A new array of the reference's shape whose memory layout matches the (A, C, B) view."""
        if self.order is None:
            return np.empty(self.shape, dtype)
        t = np.empty(tuple(self.shape[i] for i in self.order), dtype)
        return t.transpose(np.argsort(self.order))


_LAYOUTS: dict = {}


def resolve_layout(x: np.ndarray, axis: int) -> Layout:
    """The Layout of ``x`` with channels on ``axis``; remembered per (shape, strides, axis) (0.2
    instead of 0.6 us). Layouts are never modified."""
    key = (x.shape, x.strides, axis)
    lay = _LAYOUTS.get(key)
    if lay is None:
        if len(_LAYOUTS) > 4096:
            _LAYOUTS.clear()
        lay = _LAYOUTS[key] = _resolve_layout(x, axis)
    return lay


def _resolve_layout(x: np.ndarray, axis: int) -> Layout:
    shape = x.shape
    order = None
    ax = axis
    if not x.flags.c_contiguous:
        perm = tuple(sorted(range(x.ndim), key=lambda i: -x.strides[i]))
        if x.transpose(perm).flags.c_contiguous:
            order = perm
            ax = perm.index(axis)
    tshape = shape if order is None else tuple(shape[i] for i in order)
    A = math.prod(tshape[:ax])
    B = math.prod(tshape[ax + 1:])
    return Layout(shape, order, A, tshape[ax], B)


def output_buffer(out, name: str, layout: Layout, dtype, inputs: tuple) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate ``out=`` and return (result, (A, C, B) kernel view, needs_copy_back).

    ``out`` may be one of ``inputs`` (in place, for elementwise-safe kernels); a partial overlap with an
    input is refused. When out's memory layout differs from the inputs', the kernel writes a temporary
    and the result is copied into ``out`` (documented; the normal case allocates nothing).
    """
    if out is None:
        y = layout.empty(dtype)
        return y, layout.view(y), False
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(out).__name__}")
    result = out
    if type(out) is not np.ndarray:  # np.matrix, np.memmap: the kernel writes through a plain view
        out = np.asarray(out)
    if out.shape != layout.shape:
        raise ValueError(f"{name} must have shape {layout.shape}, got {out.shape}")
    if out.dtype is not dtype and out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    f = out.flags  # one flags object (~0.08 us each): the tiny case's whole check took 0.72 us with five
    if not f.writeable:
        raise ValueError(f"{name} must be writeable")
    for arr in inputs:
        if arr is out or (f.owndata and arr.flags.owndata) or not np.may_share_memory(arr, out):
            continue  # (two arrays that own their memory are apart)
        same = (arr.__array_interface__["data"][0] == out.__array_interface__["data"][0]
                and arr.strides == out.strides)
        if not same and np.shares_memory(arr, out):
            raise ValueError(f"{name} partially overlaps an input; pass a separate buffer or the input itself")
    t = out if layout.order is None else out.transpose(layout.order)
    if (f if t is out else t.flags).c_contiguous:
        return result, t.reshape(layout.A, layout.C, layout.B), False
    return result, np.empty((layout.A, layout.C, layout.B), dtype), True


def copy_back(out: np.ndarray, y3: np.ndarray, layout: Layout) -> None:
    """Copy a temporary (A, C, B) result into ``out`` (whose layout differed from the inputs')."""
    tshape = layout.shape if layout.order is None else tuple(layout.shape[i] for i in layout.order)
    out = np.asarray(out)
    t = out if layout.order is None else out.transpose(layout.order)
    np.copyto(t, y3.reshape(tshape))
