"""The forward tasks: statistics, training forward of owned channels, normalize.

A task is one ``prange`` iteration of a phase (``core.py``): the t-th of nt balanced shares of the phase's
work units (plan.py). Tasks are compiled functions of their own (not inlined), called from the kernels'
parallel loops, so each is compiled once per dtype and flag combination and shared by every kernel.

Per-channel float64 state lives in the rows of ``P`` (C columns): see the row constants below.
``coef`` holds the per-channel coefficients of y = act((x - m) * k + t [+ res]) in the compute dtype
(rows m, k, t; see ``rows.affine_coefficients``).
"""
from __future__ import annotations

import numpy as np

from fastbn._jit import choose, choose_by_layout, helper
from fastbn._kernels.intrin import store_fence
from fastbn._kernels.plan import (SLAB_ELEMS, cf_rows_per_chunk, cl_block, cl_rows_per_chunk,
                                  CL_STREAM_SLAB_ELEMS, LONG_GROUP_BYTES, long_group, n_chunks, slab_channels,
                                  task_channels, task_range)
from fastbn._kernels.prims import compute_empty, f64_empty, max2, min2, zero_of
from fastbn._kernels.reduce import cf_chunk_stats, cf_group_stats, cl_chunk_stats
from fastbn._kernels.rows import act_rows, act_run, act_slabs, act_vec, affine_coefficients

# rows of P
GAMMA, BETA, MEAN, VAR, INVSTD, R, D, RN_MEAN, RN_STD, M2 = range(10)
NP_ROWS = 10



@helper
def finish_channel(c, n, m2, eps, P, renorm, rmin, rmax, dmax, coef):
    """Channel c's var, invstd, renorm (r, d) into P and its coefficients into coef.

    Renorm (Ioffe 2017, as tf_keras): r = clip(sqrt(var + eps) / s, rmin, rmax),
    d = clip((mean - mu) / s, -dmax, dmax), s = max(sigma, sqrt(eps)), from the moving statistics
    (mu, sigma) before this step; y = gamma * (xhat * r + d) + beta.
    """
    mean = P[MEAN, c]
    v = m2 / n
    P[VAR, c] = v
    inv = 1.0 / np.sqrt(v + eps)
    P[INVSTD, c] = inv
    k = inv * P[GAMMA, c]
    t = P[BETA, c]
    if renorm:
        s = max2(P[RN_STD, c], np.sqrt(eps))
        rc = min2(max2(np.sqrt(v + eps) / s, rmin), rmax)
        dc = min2(max2((mean - P[RN_MEAN, c]) / s, -dmax), dmax)
        P[R, c] = rc
        P[D, c] = dc
        k = k * rc
        t = t + P[GAMMA, c] * dc
    else:
        P[R, c] = 1.0
        P[D, c] = 0.0
    affine_coefficients(coef, c, mean, k, t)


@helper
def expand(coef, c0, c1, rep, E):
    """E[r, i * rep + j] = coef[r, c0 + i] for every row r of coef: coefficients per element of a slab
    whose channels each span ``rep`` consecutive values (a short channel row)."""
    for r in range(coef.shape[0]):
        for i in range(c1 - c0):
            v = coef[r, c0 + i]
            for j in range(rep):
                E[r, i * rep + j] = v


@helper
def tile(coef, C, reps, E):
    """E[r, u * C + c] = coef[r, c] for every row r of coef: coefficients per element of a slab of
    ``reps`` whole rows of C channels."""
    for r in range(coef.shape[0]):
        for u in range(reps):
            for c in range(C):
                E[r, u * C + c] = coef[r, c]


# ---- statistics tasks: P[MEAN], P[M2] of owned channels, or chunk partials into ``part``


@helper
def stats_task_cl(t, nt, xf, A, C, CS, B, P, part, short):
    """Channels-last: (row chunk, channel block) partials into part[0/1, k, c]."""
    buf = f64_empty((3, SLAB_ELEMS))
    rpc = cl_rows_per_chunk(A, C)
    cb = cl_block(C)
    nb = n_chunks(C, cb)
    shift = f64_empty(cb)
    u0, u1 = task_range(t, nt, n_chunks(A, rpc) * nb)
    for u in range(u0, u1):
        k = u // nb
        c0 = (u - k * nb) * cb
        c1 = min2(C, c0 + cb)
        cl_chunk_stats(xf, CS, k * rpc, min2(A, (k + 1) * rpc), c0, c1, buf, shift[:c1 - c0], part[0, k, c0:c1],
                       part[1, k, c0:c1])


@helper
def stats_task_owned(t, nt, xf, A, C, CS, B, P, part, short):
    """Channels-first, owned channels: whole channels (slab groups; long rows: groups of
    plan.long_group, as train_owned_long) into P[MEAN], P[M2]."""
    buf = f64_empty((3, SLAB_ELEMS))
    G = slab_channels(B) if short else long_group(A, B, xf.itemsize, 1, LONG_GROUP_BYTES)
    tmp = f64_empty((2, G))
    lo, hi = task_channels(t, nt, C, B)
    for c0 in range(lo, hi, G):
        c1 = min2(hi, c0 + G)
        cf_group_stats(xf, A, CS, B, c0, c1, buf, P[MEAN, c0:c1], P[M2, c0:c1], tmp[0], tmp[1], short)


@helper
def stats_task_split(t, nt, xf, A, C, CS, B, P, part, short):
    """Channels-first, few channels: (channel, chunk) partials into part[0/1, c, k]."""
    buf = f64_empty((3, SLAB_ELEMS))
    rpc = cf_rows_per_chunk(B)
    K = n_chunks(A, rpc)
    u0, u1 = task_range(t, nt, C * K)
    for u in range(u0, u1):
        c = u // K
        k = u - c * K
        cf_chunk_stats(xf, CS, B, c, c + 1, k * rpc, min2(A, (k + 1) * rpc), buf, part[0, c, k:k + 1],
                       part[1, c, k:k + 1], short)


@helper(inline=True)
def stats_task(t, nt, xf, A, C, CS, B, P, part, cl, owned, short):
    """The t-th of nt shares of the statistics (``cl``, ``owned``, ``short``: literals, see plan.layout_of)."""
    choose_by_layout(cl, owned, "stats_task_cl", "stats_task_owned", "stats_task_split", (t, nt, xf, A, C, CS, B, P, part, short))


# ---- training forward of owned channels: statistics, coefficients and output per slab group, while the
# group's slice is in this core's L2


@helper
def _finish_group(P, coef, c0, c1, n, gst, eps, rmin, rmax, dmax, renorm):
    for i in range(c1 - c0):
        P[MEAN, c0 + i] = gst[0, i]
        finish_channel(c0 + i, n, gst[1, i], eps, P, renorm, rmin, rmax, dmax, coef)


@helper
def train_owned_long(t, nt, xf, rf, yf, A, C, CS, B, P, coef, eps, rmin, rmax, dmax, relu, has_res, renorm,
                     stream):
    # the task's channels in groups (plan.long_group), each read and written row by row
    buf = f64_empty((3, SLAB_ELEMS))
    G = long_group(A, B, xf.itemsize, 1, LONG_GROUP_BYTES)
    gst = f64_empty((4, G))
    zero = zero_of(coef)
    n = float(A * B)
    c0, c1 = task_channels(t, nt, C, B)
    for g0 in range(c0, c1, G):
        g1 = min2(c1, g0 + G)
        cf_group_stats(xf, A, CS, B, g0, g1, buf, gst[0], gst[1], gst[2], gst[3], False)
        _finish_group(P, coef, g0, g1, n, gst, eps, rmin, rmax, dmax, renorm)
        for a in range(A):
            act_run(xf, rf, yf, (a * CS + g0) * B, g0, g1, B, coef, zero, relu, has_res, stream)


@helper
def train_owned_short(t, nt, xf, rf, yf, A, C, CS, B, P, coef, eps, rmin, rmax, dmax, relu, has_res, renorm,
                      stream):
    G = slab_channels(B)
    buf = f64_empty((3, SLAB_ELEMS))
    gst = f64_empty((4, G))
    E = compute_empty((3, G * B), coef)
    zero = zero_of(coef)
    n = float(A * B)
    g0, g1 = task_range(t, nt, n_chunks(C, G))
    for g in range(g0, g1):
        c0 = g * G
        c1 = min2(C, c0 + G)
        cf_group_stats(xf, A, CS, B, c0, c1, buf, gst[0], gst[1], gst[2], gst[3], True)
        _finish_group(P, coef, c0, c1, n, gst, eps, rmin, rmax, dmax, renorm)
        L = (c1 - c0) * B
        expand(coef, c0, c1, B, E)
        for a in range(A):
            act_vec(xf, rf, yf, (a * CS + c0) * B, E[0, :L], E[1, :L], E[2, :L], zero, relu, has_res, stream)


@helper(inline=True)
def train_owned_task(t, nt, xf, rf, yf, A, C, CS, B, P, coef, eps, rmin, rmax, dmax, short, relu, has_res, renorm,
                     stream):
    """The t-th of nt shares (slab groups) of a channels-first training forward of owned channels."""
    choose(short, "train_owned_short", "train_owned_long", (t, nt, xf, rf, yf, A, C, CS, B, P, coef, eps, rmin, rmax, dmax, relu, has_res, renorm, stream))
    if stream:
        store_fence()


# ---- normalize: y = act((x - m) * k + t [+ res]) with per-channel coefficients over a share of the rows
# (channels-first long rows) or slabs (short rows, channels-last), walked forwards (see
# core.train_two_pass_core).


@helper
def affine_cl(t, nt, xf, rf, yf, A, C, CS, B, coef, short, relu, has_res, stream):
    zero = zero_of(coef)
    r0, r1 = task_range(t, nt, A)
    if not stream:  # row by row, the coefficient rows as they are
        act_rows(xf, rf, yf, r0, r1, C, CS, coef[0], coef[1], coef[2], zero, relu, has_res)
        return
    if CS != C:  # a channel window: rows are apart, one row at a time
        for r in range(r0, r1):
            act_vec(xf, rf, yf, r * CS, coef[0], coef[1], coef[2], zero, relu, has_res, stream)
        return
    # streaming: the task's rows are one contiguous run, written in line-aligned slabs (rows.act_slabs)
    # with the coefficients tiled
    reps = (CL_STREAM_SLAB_ELEMS + C - 1) // C + 1
    E = compute_empty((3, reps * C), coef)
    tile(coef, C, reps, E)
    act_slabs(xf, rf, yf, r0 * C, r1 * C, C, E, zero, relu, has_res)


@helper
def affine_cf_short(t, nt, xf, rf, yf, A, C, CS, B, coef, relu, has_res, stream):
    zero = zero_of(coef)
    G = slab_channels(B)
    E = compute_empty((3, G * B), coef)
    p0, p1 = task_range(t, nt, n_chunks(C, G) * A)
    cur = -1
    L = 0
    for p in range(p0, p1):  # slabs (group g of channels, row a), group-major
        g = p // A
        a = p - g * A
        c0 = g * G
        if g != cur:
            c1 = min2(C, c0 + G)
            L = (c1 - c0) * B
            expand(coef, c0, c1, B, E)
            cur = g
        act_vec(xf, rf, yf, (a * CS + c0) * B, E[0, :L], E[1, :L], E[2, :L], zero, relu, has_res, stream)


@helper
def affine_cf_long(t, nt, xf, rf, yf, A, C, CS, B, coef, relu, has_res, stream):
    zero = zero_of(coef)
    i0, i1 = task_range(t, nt, A * C)
    i = i0
    while i < i1:  # runs of rows within one row of A: channels c .. e - 1
        c = i % C
        e = min2(C, c + i1 - i)
        act_run(xf, rf, yf, i * B, c, e, B, coef, zero, relu, has_res, stream)
        i += e - c


@helper
def affine_cf(t, nt, xf, rf, yf, A, C, CS, B, coef, short, relu, has_res, stream):
    choose(short, "affine_cf_short", "affine_cf_long", (t, nt, xf, rf, yf, A, C, CS, B, coef, relu, has_res, stream))


@helper(inline=True)
def affine_task(t, nt, xf, rf, yf, A, C, CS, B, coef, cl, owned, short, relu, has_res, stream):
    """The t-th of nt shares of a normalize pass (``cl``, ``owned``, ``short``: literals)."""
    choose_by_layout(cl, owned, "affine_cl", "affine_cf", "affine_cf", (t, nt, xf, rf, yf, A, C, CS, B, coef, short, relu, has_res, stream))
    if stream:
        store_fence()
