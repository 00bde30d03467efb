"""Batch norm fused with ReLU, or with a residual add and ReLU: forward and backward in one pass each.

``y = relu(bn(x))`` or ``y = relu(bn(x) + residual)`` (oneDNN's ``fuse_norm_relu`` and
``fuse_norm_add_relu``; the latter is missing from oneDNN's CPU implementations). Against BN followed by
a separate ReLU this saves a full read and write of y in the forward, and in the backward the masked
gradient ``dy * (y > 0)`` is formed while the sums and dx are computed instead of being written out and
read back. Same conventions as :mod:`fastbn.functional`: channel axis ``axis``, any memory layout,
float32/float64 (and float16/bfloat16), float64 per-channel results, ``out=`` buffers, running statistics
updated in place (PyTorch's momentum) only when the call succeeds.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastbn import _run
from fastbn._validate import (as_input, channel_vector, check_eps, check_flag, check_running_var, copy_back,
                              like_x, normalize_axis, output_buffer, resolve_layout, running_pair, unaliased)
from fastbn.functional import TrainStats

__all__ = ["batch_norm_relu_train", "batch_norm_relu_infer", "batch_norm_relu_backward",
           "ReluBackwardResult"]



class ReluBackwardResult(NamedTuple):
    """Result of :func:`batch_norm_relu_backward`, a named tuple.

    dx (x's shape, dtype and layout), dgamma and dbeta (float64, (C,)), dresidual (the residual's
    gradient ``dy * (y > 0)``, x's shape and dtype; None unless requested).

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(16, 3, 4))             # (N, C, L) float64
    >>> y, mean, invstd = fastbn.batch_norm_relu_train(x)
    >>> r = fastbn.batch_norm_relu_backward(np.ones_like(x), x, y, mean, invstd, residual=True)
    >>> r.dx.shape, r.dgamma.shape, r.dbeta.dtype.name, r.dresidual.shape, r.dresidual.dtype.name
    ((16, 3, 4), (3,), 'float64', (16, 3, 4), 'float64')
    >>> bool(np.array_equal(r.dbeta, (y > 0).sum(axis=(0, 2))))         # dy = 1: dbeta counts the unmasked
    True
    """

    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray
    dresidual: np.ndarray | None


class _Forward(NamedTuple):
    y: np.ndarray
    mean: np.ndarray
    var: np.ndarray  # biased
    invstd: np.ndarray
    r: np.ndarray  # renorm correction (ones without renorm)
    d: np.ndarray  # renorm correction (zeros without renorm)
    n: int  # values per channel


# ------------------------------------------------------------------- internal (shared with the layer)

def train_core(x: np.ndarray, axis: int, g: np.ndarray, b: np.ndarray, eps: float,
               residual: np.ndarray | None, relu: bool, out: np.ndarray | None,
               renorm: tuple | None = None) -> _Forward:
    """Training forward on validated input (axis normalized, g/b float64 (C,), residual like x).

    ``renorm``: None or (mu, sigma, clip) float64 arrays, the renorm moving statistics before this step
    and (rmin, rmax, dmax).
    """
    lay = resolve_layout(x, axis)
    n = lay.A * lay.B
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}): an empty batch has no statistics")
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    inputs = (x,) if residual is None else (x, residual)
    y, y3, copy = output_buffer(out, "out", lay, x.dtype, inputs)
    x3 = lay.view(x)
    r3 = None if residual is None else lay.view(residual)
    mean, var, invstd, r, d = _run.train(x3, r3, y3, g, b, eps, bool(relu), renorm)
    if copy:
        copy_back(y, y3, lay)
    return _Forward(y, mean, var, invstd, r, d, n)


def apply_core(x: np.ndarray, axis: int, mean: np.ndarray, scale: np.ndarray, shift: np.ndarray,
               residual: np.ndarray | None, relu: bool, out: np.ndarray | None) -> np.ndarray:
    """y = act((x - mean) * scale + shift [+ residual]) on validated input; vectors float64 (C,)."""
    lay = resolve_layout(x, axis)
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape})")
    inputs = (x,) if residual is None else (x, residual)
    y, y3, copy = output_buffer(out, "out", lay, x.dtype, inputs)
    x3 = lay.view(x)
    r3 = None if residual is None else lay.view(residual)
    _run.normalize(x3, r3, y3, mean, scale, scale, shift, 0.0, False, bool(relu))
    if copy:
        copy_back(y, y3, lay)
    return y


def backward_core(dy: np.ndarray, x: np.ndarray, y: np.ndarray | None, axis: int, mean: np.ndarray,
                  invstd: np.ndarray, g: np.ndarray, out: np.ndarray | None, want_dres: bool,
                  dres_out: np.ndarray | None, frozen: bool) -> ReluBackwardResult:
    """Backward on validated input; ``y`` None means no ReLU (no mask)."""
    lay = resolve_layout(x, axis)
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape})")
    relu = y is not None
    inputs = (x, dy, y) if relu else (x, dy)
    dx, dx3, copy = output_buffer(out, "out", lay, x.dtype, inputs)
    dres = None
    dr3 = dx3
    copy_r = False
    if want_dres:
        if dres_out is not None and out is not None and np.shares_memory(dres_out, out):
            raise ValueError("residual_out must not overlap out (they receive different gradients)")
        dres, dr3, copy_r = output_buffer(dres_out, "residual_out", lay, x.dtype, inputs)
    x3 = lay.view(x)
    y3 = lay.view(y) if relu else None
    dgamma, dbeta = _run.backward(lay.view(dy), x3, y3, dx3, dr3 if want_dres else None, mean, invstd, g,
                                  bool(frozen))
    if copy:
        copy_back(dx, dx3, lay)
    if copy_r:
        copy_back(dres, dr3, lay)
    return ReluBackwardResult(dx, dgamma, dbeta, dres)


def ema_update(arr: np.ndarray, new: np.ndarray, factor: float) -> None:
    """arr = (1 - factor) * arr + factor * new in float64, stored in place (PyTorch's convention)."""
    arr[...] = (1.0 - factor) * arr.astype(np.float64) + factor * new


# ------------------------------------------------------------------------------------- public API

def batch_norm_relu_train(x, gamma=None, beta=None, *, residual=None, axis: int = 1, eps: float = 1e-5,
                          running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None,
                          momentum: float = 0.1, out: np.ndarray | None = None) -> TrainStats:
    """Training-mode batch norm fused with ReLU: ``y = max(bn(x) [+ residual], 0)``, one pass over x.

    Same statistics, conventions and arguments as :func:`fastbn.batch_norm_train` (batch mean and biased
    variance per channel, float64 accumulation, running statistics updated in place with PyTorch's
    momentum and the unbiased variance, only when the call succeeds).

    Parameters
    ----------
    x : ndarray, float32 or float64 (or float16/bfloat16), channel dimension at ``axis`` (at least 2
        values per channel).
    gamma, beta : (C,) float arrays or None (1 and 0).
    residual : optional array of x's shape and dtype added before the ReLU (BN + add + ReLU, as in a
        ResNet block). Any memory layout (one laid out unlike x is copied once).
    axis, eps, running_mean, running_var, momentum : as in :func:`fastbn.batch_norm_train`.
    out : optional buffer for y (x's shape and dtype); may be ``x`` or ``residual`` (in place).

    Returns
    -------
    TrainStats(y, mean, invstd): y like x (non-negative); mean and invstd float64 (C,), what
    :func:`batch_norm_relu_backward` needs together with y.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(8, 4, 5, 5)).astype(np.float32)
    >>> skip = np.ones_like(x)
    >>> y, mean, invstd = fastbn.batch_norm_relu_train(x, residual=skip)
    >>> bool(y.min() >= 0), y.dtype.name
    (True, 'float32')
    """
    x = as_input(x, "x")
    axis = normalize_axis(axis, x.ndim)
    eps = check_eps(eps)
    C = x.shape[axis]
    g = channel_vector(gamma, "gamma", C, 1.0)
    b = channel_vector(beta, "beta", C, 0.0)
    res = None if residual is None else like_x(residual, "residual", x)
    update, momentum = running_pair(running_mean, running_var, momentum, C, x, out)
    g, b = unaliased((g, b), out, running_mean, running_var)
    f = train_core(x, axis, g, b, eps, res, True, out)
    if update:
        ema_update(running_mean, f.mean, momentum)
        ema_update(running_var, f.var * (f.n / (f.n - 1.0)), momentum)
    return TrainStats(f.y, f.mean, f.invstd)


def batch_norm_relu_infer(x, running_mean, running_var, gamma=None, beta=None, *, residual=None,
                          axis: int = 1, eps: float = 1e-5, out: np.ndarray | None = None) -> np.ndarray:
    """Inference-mode batch norm fused with ReLU: ``y = max(bn_running(x) [+ residual], 0)``.

    ``bn_running(x) = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`` per channel
    (coefficients in float64), one read of x (and residual) and one write of y.

    Parameters
    ----------
    x : ndarray, float32 or float64 (or float16/bfloat16), channel dimension at ``axis``.
    running_mean, running_var, gamma, beta : (C,) float arrays (gamma/beta None: 1 and 0).
    residual : optional array of x's shape and dtype added before the ReLU.
    axis, eps : as in :func:`fastbn.batch_norm_infer`.
    out : optional buffer for y; may be ``x`` or ``residual`` (in place).

    Returns
    -------
    y : ndarray like x.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.array([[-1.0, 2.0], [3.0, -4.0]], np.float32)   # (N, C) = (2, 2)
    >>> fastbn.batch_norm_relu_infer(x, np.zeros(2), np.ones(2), eps=1e-12)
    array([[0., 2.],
           [3., 0.]], dtype=float32)
    """
    x = as_input(x, "x")
    axis = normalize_axis(axis, x.ndim)
    eps = check_eps(eps)
    C = x.shape[axis]
    rm = channel_vector(running_mean, "running_mean", C)
    rv = channel_vector(running_var, "running_var", C)
    g = channel_vector(gamma, "gamma", C, 1.0)
    b = channel_vector(beta, "beta", C, 0.0)
    check_running_var(rv, eps)
    rm, b = unaliased((rm, b), out)
    res = None if residual is None else like_x(residual, "residual", x)
    return apply_core(x, axis, rm, g / np.sqrt(rv + eps), b, res, True, out)


def batch_norm_relu_backward(dy, x, y, mean, invstd, gamma=None, *, axis: int = 1,
                             out: np.ndarray | None = None, residual: bool = False,
                             residual_out: np.ndarray | None = None,
                             frozen: bool = False) -> ReluBackwardResult:
    """Backward of :func:`batch_norm_relu_train` (or of the inference form with ``frozen=True``).

    With ``g = dy * (y > 0)`` (the ReLU mask, applied inside the passes, never stored):
    ``dbeta = sum(g)``, ``dgamma = sum(g * xhat)``, ``dx = gamma * invstd * (g - dbeta/n - xhat *
    dgamma/n)`` (``frozen``: ``dx = g * gamma * invstd``), and the residual's gradient is ``g`` itself.

    Parameters
    ----------
    dy : gradient w.r.t. y, x's shape and dtype.
    x : the forward's input.
    y : the forward's output (x's shape and dtype): its sign is the ReLU mask.
    mean, invstd : (C,) from the forward (or running_mean and 1/sqrt(running_var + eps), ``frozen``).
    gamma : (C,) or None (1).
    axis : the channel axis.
    out : optional buffer for dx; may be ``dy`` (in place).
    residual : also return the residual's gradient (``dy * (y > 0)``), written in the same pass.
    residual_out : optional buffer for it (implies ``residual=True``); may be ``dy``, not ``out``.
    frozen : eval-mode gradient (statistics are constants).

    Returns
    -------
    ReluBackwardResult(dx, dgamma, dbeta, dresidual): dx like x; dgamma, dbeta float64 (C,); dresidual
    like x, or None unless ``residual`` / ``residual_out``.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(16, 3, 4))
    >>> y, mean, invstd = fastbn.batch_norm_relu_train(x)
    >>> dx, dgamma, dbeta, dres = fastbn.batch_norm_relu_backward(np.ones_like(x), x, y, mean, invstd,
    ...                                                           residual=True)
    >>> bool((dres == (y > 0)).all()), dx.shape
    (True, (16, 3, 4))
    """
    x = as_input(x, "x")
    dy = like_x(dy, "dy", x)
    y = like_x(y, "y", x)
    axis = normalize_axis(axis, x.ndim)
    C = x.shape[axis]
    m = channel_vector(mean, "mean", C)
    inv = channel_vector(invstd, "invstd", C)
    g = channel_vector(gamma, "gamma", C, 1.0)
    m, inv, g = unaliased((m, inv, g), out, residual_out)
    want = check_flag(residual, "residual") or residual_out is not None
    return backward_core(dy, x, y, axis, m, inv, g, out, want, residual_out, check_flag(frozen, "frozen"))
