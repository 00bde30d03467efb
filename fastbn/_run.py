"""Calling the kernels from Python: choose the variant (parallel or serial, streaming stores or not, the
fused flags), the thread count, and allocate the per-channel outputs.

Every public function (functional, fused, layer, synchronized BN, precise statistics, the PyTorch
modules) goes through here with validated (A, C, B) views, so they all share the same compiled variants:
using the layer after the functional API compiles nothing more. float16 and bfloat16 data reach the
kernels as the integer arrays of their bits (``_bits``).
"""
from __future__ import annotations

import numpy as np

from fastbn._dispatch import call
from fastbn._jit import helper
from fastbn._kernels import entries
from fastbn._kernels.plan import CHANNEL_WINDOW, channel_windows, layout_of, streams

_NO_RENORM = np.zeros(1)
_NO_CLIP = np.array([0.0, np.inf, np.inf])
_F16 = np.dtype(np.float16)
_BITS = (np.dtype(np.uint16), np.dtype(np.int16))
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_PLANS: dict = {}


def _plan(shape: tuple, itemsize: int) -> tuple:
    """(layout flags, stream flag of an output of ``itemsize`` bytes a value, channel windows) of an
    (A, C, B) shape, remembered per (shape, itemsize): computing the stream flag and the windows on
    every call took 0.3-0.35 us of the tiny case's ~7 us (``normalize`` 2.25 -> 1.9 us, ``backward``
    3.6 -> 3.3 us with a ~1.5 us kernel call; best of 7 x 20000 calls)."""
    key = (shape, itemsize)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        A, C, B = shape
        plan = _PLANS[key] = (layout_of(A, min(C, CHANNEL_WINDOW), B),
                              streams(A, C, B, A * C * B * itemsize), channel_windows(C))
    return plan


def _bits(a: np.ndarray | None) -> np.ndarray | None:
    """A 2-byte float array as the integer array of its bits, which the kernels read as that format
    (``fastbn/_kernels/half.py``): float16 as uint16, bfloat16 (``ml_dtypes``) as int16. int16/uint16
    arrays are already bits (the PyTorch drop-in passes bfloat16 tensors as int16 views)."""
    if a is None or a.dtype in _BITS:
        return a
    if a.dtype == _F16:
        return a.view(np.uint16)
    if a.dtype.name == "bfloat16":
        return a.view(np.int16)
    raise TypeError(f"fastbn: no kernel for dtype {a.dtype}")


def train(x3: np.ndarray, r3: np.ndarray | None, y3: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float,
          relu: bool = False, renorm: tuple | None = None) -> np.ndarray:
    """Training forward; returns float64 (5, C) rows mean, var (biased), invstd, r, d.

    ``r3``: residual or None; ``renorm``: None or (rn_mean, rn_std, clip) float64 arrays."""
    if x3.itemsize == 2:
        x3, r3, y3 = _bits(x3), _bits(r3), _bits(y3)
    layout, stream, windows = _plan(x3.shape, y3.itemsize)
    has_res = r3 is not None
    if renorm is None:
        rn_mean = rn_std = _NO_RENORM
        clip = _NO_CLIP
    else:
        rn_mean, rn_std, clip = renorm
    out = np.empty((5, x3.shape[1]))
    flags = layout + (relu, has_res, renorm is not None, stream)
    for c0, c1 in windows:
        call(entries.train, flags, x3.size, x3, r3 if has_res else x3, y3, g, b, eps, rn_mean, rn_std, clip, out,
             c0, c1)
    return out


def normalize(x3: np.ndarray, r3: np.ndarray | None, y3: np.ndarray, mean: np.ndarray, a: np.ndarray,
              b: np.ndarray, shift: np.ndarray, eps: float, from_var: bool, relu: bool = False) -> None:
    """y = act((x - mean) * k + shift [+ res]), k = a / sqrt(b + eps) if ``from_var`` else a."""
    if x3.itemsize == 2:
        x3, r3, y3 = _bits(x3), _bits(r3), _bits(y3)
    has_res = r3 is not None
    layout, stream, windows = _plan(x3.shape, y3.itemsize)
    flags = layout + (relu, has_res, stream)
    for c0, c1 in windows:
        call(entries.normalize, flags, x3.size, x3, r3 if has_res else x3, y3, mean, a, b, shift, eps, from_var,
             c0, c1)


def backward(dy3: np.ndarray, x3: np.ndarray, y3: np.ndarray | None, dx3: np.ndarray, dr3: np.ndarray | None,
             mean: np.ndarray, invstd: np.ndarray, g: np.ndarray, frozen: bool) -> np.ndarray:
    """Backward (ReLU mask when ``y3`` is given; residual gradient into ``dr3`` when given); returns
    float64 (2, C) rows dgamma, dbeta."""
    if x3.itemsize == 2:
        dy3, x3, y3, dx3, dr3 = _bits(dy3), _bits(x3), _bits(y3), _bits(dx3), _bits(dr3)
    relu = y3 is not None
    write_d = dr3 is not None
    out = np.empty((2, x3.shape[1]))
    layout, stream, windows = _plan(x3.shape, dx3.itemsize)
    flags = layout + (relu, write_d, stream)
    for c0, c1 in windows:
        call(entries.backward, flags, x3.size, dy3, x3, y3 if relu else x3, dx3, dr3 if write_d else dx3, mean,
             invstd, g, bool(frozen), out, c0, c1)
    return out


def stats(x3: np.ndarray) -> np.ndarray:
    """float64 (2, C) rows mean, M2 (count A * B)."""
    if x3.itemsize == 2:
        x3 = _bits(x3)
    out = np.empty((2, x3.shape[1]))
    layout, _, windows = _plan(x3.shape, 0)
    for c0, c1 in windows:
        call(entries.stats, layout, x3.size, x3, out, c0, c1)
    return out


def grad_sums(dy3: np.ndarray, x3: np.ndarray, y3: np.ndarray | None, mean: np.ndarray) -> np.ndarray:
    """float64 (2, C) rows sum(g), sum(g * (x - mean)); g masked by y > 0 when ``y3`` is given."""
    if x3.itemsize == 2:
        dy3, x3, y3 = _bits(dy3), _bits(x3), _bits(y3)
    relu = y3 is not None
    out = np.empty((2, x3.shape[1]))
    layout, _, windows = _plan(x3.shape, 0)
    for c0, c1 in windows:
        call(entries.grad_sums, layout + (relu,), x3.size, dy3, x3, y3 if relu else x3, mean, out, c0,
             c1)
    return out


def input_grad(dy3: np.ndarray, x3: np.ndarray, y3: np.ndarray | None, dx3: np.ndarray,
               dr3: np.ndarray | None, coefs: np.ndarray) -> None:
    """dx from merged sums: coefs float64 (4, C) rows mean, k_dy, k_x, k_0."""
    if x3.itemsize == 2:
        dy3, x3, y3, dx3, dr3 = _bits(dy3), _bits(x3), _bits(y3), _bits(dx3), _bits(dr3)
    relu = y3 is not None
    write_d = dr3 is not None
    layout, stream, windows = _plan(x3.shape, dx3.itemsize)
    flags = layout + (relu, write_d, stream)
    for c0, c1 in windows:
        call(entries.input_grad, flags, x3.size, dy3, x3, y3 if relu else x3, dx3, dr3 if write_d else dx3, coefs,
             c0, c1)


@helper(python=True)
def _ema(running, new, momentum, scale):
    for c in range(running.shape[0]):
        running[c] = (1.0 - momentum) * running[c] + momentum * (new[c] * scale)


@helper(python=True)
def _ema_pair(running_mean, running_var, mean, var, momentum, var_scale):
    for c in range(running_mean.shape[0]):
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * (var[c] * var_scale)


def _direct(r: np.ndarray) -> bool:
    return (r.dtype is _F32 or r.dtype is _F64) and r.flags.c_contiguous and r.flags.writeable


def update_running(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray, var: np.ndarray,
                   momentum: float, var_scale: float = 1.0) -> None:
    """running = (1 - momentum) * running + momentum * new, with new = mean and var * var_scale (the
    unbiased correction n / (n - 1)), in float64, stored in the running arrays' dtype. Contiguous
    float32/float64 arrays in one compiled call (~1 us: two calls and a NumPy product cost ~3.5 us of
    the tiny case's ~14), anything else through NumPy."""
    if _direct(running_mean) and _direct(running_var):
        _ema_pair(running_mean, running_var, mean, var, momentum, var_scale)
        return
    for r, v, k in ((running_mean, mean, 1.0), (running_var, var, var_scale)):
        if _direct(r):
            _ema(r, v, momentum, k)
        else:
            r[...] = (1.0 - momentum) * r.astype(np.float64) + momentum * (v * k)
