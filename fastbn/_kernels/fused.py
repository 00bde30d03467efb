"""Fused kernels: batch norm + ReLU (optionally + a residual add), forward and backward, and the
training forward with batch renormalization's correction.

Same contract as ``forward.py`` / ``backward.py``: x, y, dy, dx, residual are C-contiguous (A, C, B)
arrays of one float dtype; per-channel arrays are float64 (C,). Flags are runtime booleans, so one
compiled signature per dtype serves every combination (no residual: pass ``x`` as ``res``; no ReLU in
the backward: pass ``x`` as ``y``; no d_residual: pass ``dx`` as ``dres``).

- ``train_forward_act``: batch statistics (common.py's chunked one-pass shifted sums, Chan merge), then
  y = act((x - mean) * invstd * gamma * r + beta + gamma * d + res) in the same pass that the plain
  training forward makes. Without renorm r = 1, d = 0. With renorm (Ioffe 2017, as tf_keras computes it)
  r = clip(sqrt(var + eps) / s, rmin, rmax), d = clip((mean - mu) / s, -dmax, dmax) where
  s = max(sigma, sqrt(eps)) and (mu, sigma) are the renorm moving statistics before this step.
  Writes mean, var (biased), invstd, r, d; running statistics are updated by the caller.
- ``apply_act``: y = act((x - m) * scale + shift + res) (inference with frozen statistics).
- ``backward_act``: the ReLU mask (dy where y > 0, else 0: torch's ``threshold_backward``) is applied
  while reading dy, in the sums pass and again in the dx pass, so the masked gradient is never stored;
  with ``write_dres`` the dx pass also writes the masked gradient (the residual's gradient).

Reductions use the same shape-only chunking as the plain kernels: results are bitwise identical for any
thread count and between the ``.parallel`` and ``.serial`` variants.
"""
from __future__ import annotations

import numpy as np

from fastbn._jit import helper, kernel
from fastbn._kernels.common import affine_coefficients
from fastbn._kernels.passes import affine_pass, backward_pass, train_pass


@helper
def _check_shapes(x, *arrays):
    for a in arrays:
        if a.shape != x.shape:
            raise ValueError("fastbn kernel: all (A, C, B) arrays must have x's shape")


@helper
def _check_vectors(C, *vectors):
    for v in vectors:
        if v.shape[0] != C:
            raise ValueError("fastbn kernel: per-channel arrays must have length C")


@kernel
def train_forward_act(x, res, y, gamma, beta, eps, relu, has_res, renorm, rn_mean, rn_std, clip, mean,
                      var, invstd, r, d):
    """Training forward with optional residual add, ReLU and renorm correction (see module doc).

    x, res, y: (A, C, B) of one dtype (``y`` may be ``x`` or ``res``); gamma, beta, rn_mean, rn_std,
    mean, var, invstd, r, d: float64 (C,); clip: float64 (rmin, rmax, dmax).
    """
    A, C, B = x.shape
    _check_shapes(x, res, y)
    _check_vectors(C, gamma, beta, mean, var, invstd, r, d)
    if renorm:
        _check_vectors(C, rn_mean, rn_std)
    train_pass(x.reshape(x.size), res.reshape(res.size), y.reshape(y.size), A, C, B, gamma, beta, eps, relu,
               has_res, renorm, rn_mean, rn_std, clip, mean, var, invstd, r, d)


@kernel
def apply_act(x, res, y, mean, scale, shift, relu, has_res):
    """y = act((x - mean) * scale + shift [+ res]) per channel; mean, scale, shift float64 (C,).

    With running statistics, scale = gamma / sqrt(running_var + eps) and shift = beta (inference).
    ``y`` may be ``x`` or ``res`` (in place).
    """
    A, C, B = x.shape
    _check_shapes(x, res, y)
    _check_vectors(C, mean, scale, shift)
    coef = np.empty((3, C), x.dtype)
    for c in range(C):
        affine_coefficients(coef, c, mean[c], scale[c], shift[c])
    affine_pass(x.reshape(x.size), res.reshape(res.size), y.reshape(y.size), A, C, B, coef, relu, has_res)


@kernel
def backward_act(dy, x, y, dx, dres, mean, invstd, gamma, relu, write_dres, frozen, dgamma, dbeta):
    """Backward of ``BN [+ residual] [-> ReLU]`` with the ReLU mask applied inside the passes.

    dy, x, y (the forward's output, read only when ``relu``), dx, dres: (A, C, B) of one dtype; mean,
    invstd, gamma: float64 (C,) inputs; dgamma, dbeta: float64 (C,) outputs. With g = dy * (y > 0):
    dbeta = sum(g), dgamma = sum(g * (x - mean)) * invstd, dx as in ``backward`` with g for dy
    (``frozen``: dx = g * gamma * invstd), and dres = g when ``write_dres``. dx and dres may be dy.
    """
    A, C, B = x.shape
    _check_shapes(x, dy, y, dx, dres)
    _check_vectors(C, mean, invstd, gamma, dgamma, dbeta)
    backward_pass(dy.reshape(dy.size), x.reshape(x.size), y.reshape(y.size), dx.reshape(dx.size),
                  dres.reshape(dres.size), A, C, B, mean, invstd, gamma, relu, write_dres, frozen, dgamma,
                  dbeta)
