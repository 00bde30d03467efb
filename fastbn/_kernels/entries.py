"""The kernels: the entry points every public function (functional, fused, layer, synchronized BN,
precise statistics) calls, and that ``fastbn.kernels`` wraps for Numba code.

Contract (checked cheaply here; the Python wrappers in ``fastbn._run`` and the public functions check
everything): x, res, y, dy, dx, dres are C-contiguous (A, C, B) arrays of one dtype, float32, float64
or the bits of float16 (uint16) or bfloat16 (int16) computed in float32 (``half.py``), writable
(read-only inputs come as writable views: the kernels never write them); per-channel arrays are float64
(C,) arrays; outputs are float64 (k, C) arrays. ``nth`` is the number of threads to spread the work over
(1 for a serial variant). Each kernel is a composition of ``core.py`` with its compile-time flags
(``_jit.Kernel``): RELU (y = max(., 0), and the backward's mask dy * (y > 0)), HAS_RES (+ residual),
RENORM (batch renormalization's r, d), WRITE_D (the backward also writes the masked gradient, the
residual's gradient), STREAM (outputs written with streaming stores).

Every kernel works on the channel window ``[c0, c1)`` of its arrays (per-channel inputs and outputs are
full-length, indexed from c0). Its temporaries (per-channel float64 rows, coefficients, chunk partials)
are those of the window; ``fastbn._run`` cuts very wide inputs into windows of ``plan.CHANNEL_WINDOW``
channels, so temporary memory stays O(window), not O(C) (a (2, 2**26) input used to allocate 4.1 GiB).
"""
from __future__ import annotations

import numpy as np

from fastbn._jit import helper, kernel
from fastbn._kernels import bwd, fwd
from fastbn._kernels.core import (affine_core, backward_owned_core, backward_two_pass_core, grad_apply_core,
                                  grad_sums_core, stats_core, train_owned_core, train_two_pass_core)
from fastbn._kernels.intrin import opaque
from fastbn._kernels.prims import compute_empty, f64_empty, flat_from
from fastbn._kernels.rows import affine_coefficients

# compile-time flags (see _jit.Kernel): each variant of a kernel freezes its own values. CL, OWNED and
# SHORT describe the shape (plan.layout_of): the Python caller picks the variant that matches it.
CL = OWNED = SHORT = RELU = HAS_RES = RENORM = WRITE_D = STREAM = False

# rows of the training forward's stats output
S_MEAN, S_VAR, S_INVSTD, S_R, S_D = range(5)


@helper(inline=True)
def window(CS, c0, c1):
    """The width of the channel window [c0, c1) of CS channels (ValueError if it is not one)."""
    if not 0 <= c0 < c1 <= CS and not (c0 == 0 and c1 == CS):
        raise ValueError("fastbn kernel: c0, c1 must give a channel window 0 <= c0 < c1 <= C")
    return c1 - c0


@helper(inline=True)
def flat(arr, c0, B):
    """arr (C-contiguous (A, C, B)) as a flat view starting at channel c0 of its first row."""
    return flat_from(arr, c0 * B)


@kernel("CL", "OWNED", "SHORT", "RELU", "HAS_RES", "RENORM", "STREAM")
def train(nth, x, res, y, gamma, beta, eps, rn_mean, rn_std, clip, stats, c0, c1):
    """Training forward: y = act((x - mean) * invstd * gamma * r + beta + gamma * d [+ res]).

    Writes the batch mean, biased var, invstd = 1/sqrt(var + eps), and renorm's r, d (1 and 0 without
    RENORM) into the rows of ``stats`` (float64 (5, C)). With RENORM, ``rn_mean``, ``rn_std`` are the
    moving statistics before this step and ``clip`` = (rmin, rmax, dmax): r = clip(sqrt(var + eps) / s,
    rmin, rmax), d = clip((mean - rn_mean) / s, -dmax, dmax), s = max(rn_std, sqrt(eps)).
    ``y`` may be ``x`` or ``res``.
    """
    A, CS, B = x.shape
    C = window(CS, c0, c1)
    if res.shape != x.shape or y.shape != x.shape:
        raise ValueError("fastbn kernel: res and y must have x's shape (A, C, B)")
    if gamma.shape[0] != CS or beta.shape[0] != CS or stats.shape[0] < 5 or stats.shape[1] != CS:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    if RENORM and (rn_mean.shape[0] != CS or rn_std.shape[0] != CS):
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    P = f64_empty((fwd.NP_ROWS, C))
    for c in range(C):
        P[fwd.GAMMA, c] = gamma[c0 + c]
        P[fwd.BETA, c] = beta[c0 + c]
        if RENORM:
            P[fwd.RN_MEAN, c] = rn_mean[c0 + c]
            P[fwd.RN_STD, c] = rn_std[c0 + c]
    coef = compute_empty((3, C), x)
    xf, rf, yf = flat(x, c0, B), flat(res, c0, B), flat(y, c0, B)
    if OWNED:
        train_owned_core(nth, xf, rf, yf, A, C, CS, B, P, coef, eps, clip[0], clip[1], clip[2], SHORT, RELU,
                         HAS_RES, RENORM, STREAM)
    else:
        train_two_pass_core(nth, xf, rf, yf, A, C, CS, B, P, coef, eps, clip[0], clip[1], clip[2], CL, OWNED,
                            SHORT, RELU, HAS_RES, RENORM, STREAM)
    for c in range(C):
        stats[S_MEAN, c0 + c] = P[fwd.MEAN, c]
        stats[S_VAR, c0 + c] = P[fwd.VAR, c]
        stats[S_INVSTD, c0 + c] = P[fwd.INVSTD, c]
        stats[S_R, c0 + c] = P[fwd.R, c]
        stats[S_D, c0 + c] = P[fwd.D, c]


@kernel("CL", "OWNED", "SHORT", "RELU", "HAS_RES", "STREAM")
def normalize(nth, x, res, y, mean, a, b, shift, eps, from_var, c0, c1):
    """y = act((x - mean) * k + shift [+ res]) per channel, k = a / sqrt(b + eps) when ``from_var``
    (inference: a = gamma, b = running_var) else k = a. Coefficients in float64, applied in x's dtype
    (see ``rows.affine_coefficients``). ``y`` may be ``x`` or ``res``."""
    A, CS, B = x.shape
    C = window(CS, c0, c1)
    if res.shape != x.shape or y.shape != x.shape:
        raise ValueError("fastbn kernel: res and y must have x's shape (A, C, B)")
    if mean.shape[0] != CS or a.shape[0] != CS or b.shape[0] != CS or shift.shape[0] != CS:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    coef = compute_empty((3, C), x)
    for c in range(C):
        k = a[c0 + c] / np.sqrt(b[c0 + c] + eps) if from_var else a[c0 + c]
        affine_coefficients(coef, c, mean[c0 + c], k, shift[c0 + c])
    affine_core(nth, flat(x, c0, B), flat(res, c0, B), flat(y, c0, B), A, C, CS, B, coef, CL, OWNED, SHORT, RELU,
                HAS_RES, STREAM)


@kernel("CL", "OWNED", "SHORT", "RELU", "WRITE_D", "STREAM")
def backward(nth, dy, x, y, dx, dres, mean, invstd, gamma, frozen, out, c0, c1):
    """Backward with g = dy (masked by y > 0 with RELU; ``y`` is the forward's output, read only then):
    out[0] = dgamma = sum(g * (x - mean)) * invstd, out[1] = dbeta = sum(g), and
    dx = gamma * invstd * (g - dbeta / n - (x - mean) * invstd * dgamma / n), or dx = g * gamma * invstd
    when ``frozen`` (eval mode); with WRITE_D also dres = g. dx and dres may be dy."""
    A, CS, B = x.shape
    C = window(CS, c0, c1)
    if dy.shape != x.shape or y.shape != x.shape or dx.shape != x.shape or dres.shape != x.shape:
        raise ValueError("fastbn kernel: dy, y, dx and dres must have x's shape (A, C, B)")
    if mean.shape[0] != CS or invstd.shape[0] != CS or gamma.shape[0] != CS or out.shape[0] < 2 \
            or out.shape[1] != CS:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    P = f64_empty((bwd.NP_ROWS, C))
    for c in range(C):
        P[bwd.B_MEAN, c] = mean[c0 + c]
        P[bwd.B_INVSTD, c] = invstd[c0 + c]
        P[bwd.B_GAMMA, c] = gamma[c0 + c]
    coef = compute_empty((4, C), x)
    dyf, xf, yf, dxf, df = flat(dy, c0, B), flat(x, c0, B), flat(y, c0, B), flat(dx, c0, B), flat(dres, c0, B)
    if OWNED:
        backward_owned_core(nth, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, opaque(frozen), SHORT, RELU, WRITE_D,
                            STREAM)
    else:
        backward_two_pass_core(nth, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, opaque(frozen), CL, OWNED, SHORT,
                               RELU, WRITE_D, STREAM)
    for c in range(C):
        out[0, c0 + c] = P[bwd.B_DOT, c] * P[bwd.B_INVSTD, c]
        out[1, c0 + c] = P[bwd.B_SUM_DY, c]


@kernel("CL", "OWNED", "SHORT")
def stats(nth, x, out, c0, c1):
    """Per-channel mean (out[0]) and M2 = sum((x - mean)**2) (out[1]), in float64; the count is A * B
    (0 and 0 when there are no values)."""
    A, CS, B = x.shape
    C = window(CS, c0, c1)
    if out.shape[0] < 2 or out.shape[1] != CS:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    if A == 0 or B == 0:
        for c in range(C):
            out[0, c0 + c] = 0.0
            out[1, c0 + c] = 0.0
        return
    P = f64_empty((fwd.NP_ROWS, C))
    stats_core(nth, flat(x, c0, B), A, C, CS, B, P, CL, OWNED, SHORT)
    for c in range(C):
        out[0, c0 + c] = P[fwd.MEAN, c]
        out[1, c0 + c] = P[fwd.M2, c]


@kernel("CL", "OWNED", "SHORT", "RELU")
def grad_sums(nth, dy, x, y, mean, out, c0, c1):
    """Per-channel sum(g) (out[0]) and sum(g * (x - mean)) (out[1]) in float64; g = dy, masked by y > 0
    with RELU. Zero when there are no values."""
    A, CS, B = x.shape
    C = window(CS, c0, c1)
    if dy.shape != x.shape or y.shape != x.shape:
        raise ValueError("fastbn kernel: dy and y must have x's shape (A, C, B)")
    if mean.shape[0] != CS or out.shape[0] < 2 or out.shape[1] != CS:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    if A == 0 or B == 0:
        for c in range(C):
            out[0, c0 + c] = 0.0
            out[1, c0 + c] = 0.0
        return
    P = f64_empty((bwd.NP_ROWS, C))
    for c in range(C):
        P[bwd.B_MEAN, c] = mean[c0 + c]
    grad_sums_core(nth, flat(dy, c0, B), flat(x, c0, B), flat(y, c0, B), A, C, CS, B, P, CL, OWNED, SHORT, RELU)
    for c in range(C):
        out[0, c0 + c] = P[bwd.B_SUM_DY, c]
        out[1, c0 + c] = P[bwd.B_DOT, c]


@kernel("CL", "OWNED", "SHORT", "RELU", "WRITE_D", "STREAM")
def input_grad(nth, dy, x, y, dx, dres, coefs, c0, c1):
    """dx = g * k_dy + (x - mean) * k_x + k_0 per channel, coefs rows (mean, k_dy, k_x, k_0) float64
    (C,) each (from sums merged elsewhere: k_dy = gamma * invstd, k_x = -k_dy * invstd**2 * dot / n,
    k_0 = -k_dy * sum_dy / n); g and dres as in ``backward``. dx and dres may be dy."""
    A, CS, B = x.shape
    C = window(CS, c0, c1)
    if dy.shape != x.shape or y.shape != x.shape or dx.shape != x.shape or dres.shape != x.shape:
        raise ValueError("fastbn kernel: dy, y, dx and dres must have x's shape (A, C, B)")
    if coefs.shape[0] < 4 or coefs.shape[1] != CS:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    if A == 0 or B == 0:
        return
    coef = compute_empty((4, C), x)
    for c in range(C):
        affine_coefficients(coef, c, coefs[0, c0 + c], coefs[2, c0 + c], coefs[3, c0 + c])
        coef[3, c] = coefs[1, c0 + c]
    grad_apply_core(nth, flat(dy, c0, B), flat(x, c0, B), flat(y, c0, B), flat(dx, c0, B), flat(dres, c0, B), A, C,
                    CS, B, coef, CL, OWNED, SHORT, RELU, WRITE_D, STREAM)
