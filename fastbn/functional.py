"""The functional API: validate, move the channel axis into the kernels' (A, C, B) layout, dispatch.

All functions take NumPy arrays of float32 or float64 (or float16/bfloat16, below) with the channel
dimension at ``axis`` (default 1, channels-first; use ``axis=-1`` for channels-last and dense (N, C)
inputs with ``axis=1``). Arrays of any memory layout work; a layout that is a permutation of C order
(channels-last views, Fortran order, transposes) is used without a copy, other strided views are copied
once. Results keep x's memory layout. Per-channel results (mean, invstd, dgamma, dbeta) are float64.

float16 and bfloat16 (``ml_dtypes.bfloat16``) arrays are taken too, wherever float32 is: computed in
float32 with float64 statistics, each result rounded once to the input's dtype (bit for bit the float32
kernel's result on the same values, rounded); see ``fastbn/_kernels/half.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastbn import _run
from fastbn._validate import (as_input, channel_vector, check_eps, check_flag, check_running_var, copy_back,
                              like_x, normalize_axis, output_buffer, resolve_layout, running_pair, unaliased)



__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "batch_norm_backward_frozen",
           "TrainStats", "BackwardResult"]

class TrainStats(NamedTuple):
    """Result of :func:`batch_norm_train` (and :func:`fastbn.batch_norm_relu_train`), a named tuple.

    - ``y``: the output, x's shape, dtype (float32 or float64) and memory layout;
    - ``mean``: float64 (C,), each channel's batch mean;
    - ``invstd``: float64 (C,), ``1 / sqrt(var + eps)`` with the biased batch variance ``var``.

    ``mean`` and ``invstd`` are what :func:`batch_norm_backward` takes.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4, 8, 8)).astype(np.float32)  # (N, C, H, W)
    >>> st = fastbn.batch_norm_train(x)
    >>> st.y.shape, st.y.dtype.name, st.mean.shape, st.mean.dtype.name, st.invstd.dtype.name
    ((16, 4, 8, 8), 'float32', (4,), 'float64', 'float64')
    >>> x64, red = x.astype(np.float64), (0, 2, 3)                      # every axis but the channels'
    >>> bool(np.allclose(st.mean, x64.mean(red))), bool(np.allclose(st.invstd, 1 / np.sqrt(x64.var(red) + 1e-5)))
    (True, True)
    >>> y, mean, invstd = st                                      # unpacks like a tuple
    """

    y: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray


class BackwardResult(NamedTuple):
    """Result of :func:`batch_norm_backward` and :func:`batch_norm_backward_frozen`, a named tuple.

    - ``dx``: the gradient w.r.t. x, x's shape, dtype (float32 or float64) and memory layout;
    - ``dgamma``: float64 (C,), ``sum(dy * xhat)`` per channel;
    - ``dbeta``: float64 (C,), ``sum(dy)`` per channel.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 5))              # (N, C, L) float64
    >>> dy = np.random.default_rng(1).normal(size=x.shape)
    >>> y, mean, invstd = fastbn.batch_norm_train(x)                    # gamma 1, beta 0: y is xhat
    >>> g = fastbn.batch_norm_backward(dy, x, mean, invstd)
    >>> g.dx.shape, g.dx.dtype.name, g.dgamma.shape, g.dbeta.dtype.name
    ((8, 3, 5), 'float64', (3,), 'float64')
    >>> bool(np.allclose(g.dbeta, dy.sum(axis=(0, 2)))), bool(np.allclose(g.dgamma, (dy * y).sum(axis=(0, 2))))
    (True, True)
    """

    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray


def batch_norm_train(x, gamma=None, beta=None, *, axis: int = 1, eps: float = 1e-5,
                     running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None,
                     momentum: float = 0.1, out: np.ndarray | None = None) -> TrainStats:
    """Training-mode batch norm: normalize each channel with its batch statistics.

    For each channel c (index along ``axis``), over all other axes (n values):
    ``mean = mean(x)``, ``var = mean((x - mean)**2)`` (biased), ``invstd = 1 / sqrt(var + eps)``,
    ``y = (x - mean) * invstd * gamma + beta``. Statistics accumulate in float64 with a two-pass,
    chunk-merged scheme (no E[x^2] - E[x]^2 cancellation); results are bitwise reproducible for any
    thread count.

    Parameters
    ----------
    x : ndarray, float32 or float64 (or float16/bfloat16), shape (N, C, *spatial) for axis=1,
        (N, *spatial, C) for axis=-1, (N, C) for dense layers; at least 2 dims and 2 values per channel.
    gamma, beta : (C,) float arrays or None (meaning 1 and 0). Any float dtype; used as float64.
    axis : the channel axis, negative allowed.
    eps : added to the variance, > 0.
    running_mean, running_var : (C,) float ndarrays updated in place (both or neither), PyTorch's
        convention: ``r = (1 - momentum) * r + momentum * batch_stat`` with the unbiased variance
        ``var * n / (n - 1)`` for running_var. Updated only when the call succeeds.
    momentum : weight of the new batch, in [0, 1] (PyTorch's; Keras' momentum k is ``1 - momentum``).
    out : optional buffer for y (x's shape and dtype); ``out=x`` works (in place).

    Returns
    -------
    TrainStats(y, mean, invstd): y like x; mean and invstd float64 (C,), what the backward needs.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4, 8, 8)).astype(np.float32)
    >>> rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    >>> y, mean, invstd = fastbn.batch_norm_train(x, running_mean=rm, running_var=rv)
    >>> bool(abs(y.mean()) < 1e-5), y.dtype.name, mean.shape
    (True, 'float32', (4,))
    """
    x = as_input(x, "x")
    axis = normalize_axis(axis, x.ndim)
    eps = check_eps(eps)
    lay = resolve_layout(x, axis)
    C = lay.C
    n = lay.A * lay.B
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}): an empty batch has no statistics")
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    g = channel_vector(gamma, "gamma", C, 1.0)
    b = channel_vector(beta, "beta", C, 0.0)
    update, momentum = running_pair(running_mean, running_var, momentum, C, x, out)
    if update or out is not None:
        g, b = unaliased((g, b), out, running_mean, running_var)
    y, y3, copy = output_buffer(out, "out", lay, x.dtype, (x,))
    st = _run.train(lay.view(x), None, y3, g, b, eps)
    if copy:
        copy_back(y, y3, lay)
    if update:
        _run.update_running(running_mean, running_var, st[0], st[1], momentum, n / (n - 1))
    return TrainStats(y, st[0], st[2])


def batch_norm_infer(x, running_mean, running_var, gamma=None, beta=None, *, axis: int = 1,
                     eps: float = 1e-5, out: np.ndarray | None = None) -> np.ndarray:
    """Inference-mode batch norm with frozen statistics.

    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`` per channel, computed in float64
    per element and stored in x's dtype.

    Parameters
    ----------
    x : ndarray, float32 or float64 (or float16/bfloat16), channel dimension at ``axis`` (see
        :func:`batch_norm_train`).
    running_mean, running_var : (C,) float arrays (any float dtype).
    gamma, beta : (C,) float arrays or None (1 and 0).
    axis, eps : as in :func:`batch_norm_train`.
    out : optional buffer for y (x's shape and dtype); ``out=x`` normalizes in place.

    Returns
    -------
    y : ndarray like x.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.ones((2, 3, 4), np.float32)
    >>> y = fastbn.batch_norm_infer(x, np.ones(3), np.full(3, 4.0), beta=np.full(3, 2.0), out=x)  # in place
    >>> y is x, x[0, :, 0]
    (True, array([2., 2., 2.], dtype=float32))
    """
    x = as_input(x, "x")
    axis = normalize_axis(axis, x.ndim)
    eps = check_eps(eps)
    lay = resolve_layout(x, axis)
    C = lay.C
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape})")
    rm = channel_vector(running_mean, "running_mean", C)
    rv = channel_vector(running_var, "running_var", C)
    check_running_var(rv, eps)
    g = channel_vector(gamma, "gamma", C, 1.0)
    b = channel_vector(beta, "beta", C, 0.0)
    if out is not None:
        rm, rv, g, b = unaliased((rm, rv, g, b), out)
    y, y3, copy = output_buffer(out, "out", lay, x.dtype, (x,))
    _run.normalize(lay.view(x), None, y3, rm, g, rv, b, eps, True)
    if copy:
        copy_back(y, y3, lay)
    return y


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, axis: int = 1, out: np.ndarray | None = None,
                        frozen: bool = False) -> BackwardResult:
    """Backward of training-mode batch norm (statistics depend on x), or of eval mode with ``frozen=True``.

    Per channel with n values, xhat = (x - mean) * invstd:
    ``dbeta = sum(dy)``, ``dgamma = sum(dy * xhat)``,
    ``dx = gamma * invstd * (dy - dbeta / n - xhat * dgamma / n)``; with ``frozen=True`` (running statistics
    used in the forward) ``dx = dy * gamma * invstd``.

    Parameters
    ----------
    dy : gradient of the loss w.r.t. y, x's shape and dtype.
    x : the forward's input, float32 or float64 (or float16/bfloat16).
    mean, invstd : (C,) arrays, as returned by :func:`batch_norm_train` (or running_mean and
        1/sqrt(running_var + eps) with ``frozen=True``).
    gamma : (C,) or None (1).
    axis : the channel axis.
    out : optional buffer for dx (x's shape and dtype); ``out=dy`` works (in place).
    frozen : eval-mode gradient (statistics are constants).

    Returns
    -------
    BackwardResult(dx, dgamma, dbeta): dx like x; dgamma and dbeta float64 (C,).

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 5))
    >>> y, mean, invstd = fastbn.batch_norm_train(x)
    >>> dx, dgamma, dbeta = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    >>> bool(np.abs(dx).max() < 1e-12), dbeta
    (True, array([40., 40., 40.]))
    """
    x = as_input(x, "x")
    dy = like_x(dy, "dy", x)
    axis = normalize_axis(axis, x.ndim)
    lay = resolve_layout(x, axis)
    C = lay.C
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape})")
    m = channel_vector(mean, "mean", C)
    inv = channel_vector(invstd, "invstd", C)
    g = channel_vector(gamma, "gamma", C, 1.0)
    frozen = check_flag(frozen, "frozen")
    if out is not None:
        m, inv, g = unaliased((m, inv, g), out)
    dx, dx3, copy = output_buffer(out, "out", lay, x.dtype, (x, dy))
    sums = _run.backward(lay.view(dy), lay.view(x), None, dx3, None, m, inv, g, frozen)
    if copy:
        copy_back(dx, dx3, lay)
    return BackwardResult(dx, sums[0], sums[1])


def batch_norm_backward_frozen(dy, x, running_mean, running_var, gamma=None, *, axis: int = 1,
                               eps: float = 1e-5, out: np.ndarray | None = None) -> BackwardResult:
    """Eval-mode backward from running statistics: ``dx = dy * gamma / sqrt(running_var + eps)``.

    Same as ``batch_norm_backward(dy, x, running_mean, 1/sqrt(running_var + eps), gamma, frozen=True)``;
    dgamma = sum(dy * (x - running_mean) / sqrt(running_var + eps)), dbeta = sum(dy).

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.zeros((4, 2, 3)); dy = np.ones_like(x)
    >>> round(float(fastbn.batch_norm_backward_frozen(dy, x, np.zeros(2), np.full(2, 4.0)).dx[0, 0, 0]), 4)
    0.5
    """
    x = as_input(x, "x")
    eps = check_eps(eps)
    C = x.shape[normalize_axis(axis, x.ndim)]
    rv = channel_vector(running_var, "running_var", C)
    check_running_var(rv, eps)
    return batch_norm_backward(dy, x, running_mean, 1.0 / np.sqrt(rv + eps), gamma, axis=axis, out=out,
                               frozen=True)
