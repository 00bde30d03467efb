"""The backward tasks: gradient sums, backward of owned channels, dx (see fwd.py for what a task is).

With g = dy, or dy masked by y > 0 when ``relu``, per channel:
sum_dy = sum(g), dot = sum(g * (x - mean)), and
dx = g * k_dy + (x - m) * k_x + k_0 with k_dy = gamma * invstd, k_x = -k_dy * invstd**2 * dot / n,
k_0 = -k_dy * sum_dy / n (frozen statistics: k_x = k_0 = 0); with ``write_d`` also d = g.
``coef`` rows: m, k_x, k_0 (``rows.affine_coefficients``), k_dy, in the compute dtype.
"""
from __future__ import annotations

from fastbn._jit import choose, choose_by_layout, helper
from fastbn._kernels.fwd import expand, tile
from fastbn._kernels.intrin import store_fence
from fastbn._kernels.plan import (SLAB_ELEMS, cf_rows_per_chunk, cl_block, cl_rows_per_chunk,
                                  CL_STREAM_SLAB_ELEMS, LONG_GROUP_BYTES, LONG_GROUP_BYTES_BWD, long_group,
                                  n_chunks, slab_channels, task_channels, task_range)
from fastbn._kernels.prims import compute_empty, f64_empty, min2, zero_of
from fastbn._kernels.reduce import cf_chunk_grad_sums, cf_group_grad_sums, cl_chunk_grad_sums
from fastbn._kernels.rows import affine_coefficients, grad_rows, grad_run, grad_slabs, grad_vec

# rows of P
B_MEAN, B_INVSTD, B_GAMMA, B_SUM_DY, B_DOT = range(5)
NP_ROWS = 5


@helper
def grad_coefficients(coef, c, n, sum_dy, dot, mean, invstd, gamma, frozen):
    """Store channel c's dx = g * k_dy + (x - mean) * k_x + k_0 coefficients in coef (4, C)."""
    k = gamma * invstd
    if frozen:
        affine_coefficients(coef, c, mean, 0.0, 0.0)
    else:
        affine_coefficients(coef, c, mean, -k * invstd * invstd * dot / n, -k * sum_dy / n)
    coef[3, c] = k


# ---- gradient-sum tasks: P[B_SUM_DY], P[B_DOT] of owned channels, or chunk sums into ``part``


@helper
def grad_sums_cl(t, nt, dyf, xf, yf, A, C, CS, B, P, part, short, relu):
    """Channels-last: (row chunk, channel block) sums into part[0/1, k, c]."""
    buf = f64_empty((3, SLAB_ELEMS))
    mean = P[B_MEAN]
    rpc = cl_rows_per_chunk(A, C)
    cb = cl_block(C)
    nb = n_chunks(C, cb)
    u0, u1 = task_range(t, nt, n_chunks(A, rpc) * nb)
    for u in range(u0, u1):
        k = u // nb
        c0 = (u - k * nb) * cb
        c1 = min2(C, c0 + cb)
        cl_chunk_grad_sums(dyf, xf, yf, CS, k * rpc, min2(A, (k + 1) * rpc), c0, c1, mean[c0:c1], relu, buf,
                           part[0, k, c0:c1], part[1, k, c0:c1])


@helper
def grad_sums_owned(t, nt, dyf, xf, yf, A, C, CS, B, P, part, short, relu):
    """Channels-first, owned channels: whole channels (slab groups; long rows: groups of
    plan.long_group, as fwd.stats_task_owned) into P[B_SUM_DY], P[B_DOT]."""
    buf = f64_empty((3, SLAB_ELEMS))
    G = slab_channels(B) if short else long_group(A, B, xf.itemsize, 2, LONG_GROUP_BYTES)
    tmp = f64_empty((2, G))
    lo, hi = task_channels(t, nt, C, B)
    for c0 in range(lo, hi, G):
        c1 = min2(hi, c0 + G)
        cf_group_grad_sums(dyf, xf, yf, A, CS, B, c0, c1, P[B_MEAN], relu, buf, P[B_SUM_DY, c0:c1],
                           P[B_DOT, c0:c1], tmp[0], tmp[1], short)


@helper
def grad_sums_split(t, nt, dyf, xf, yf, A, C, CS, B, P, part, short, relu):
    """Channels-first, few channels: (channel, chunk) sums into part[0/1, c, k]."""
    buf = f64_empty((3, SLAB_ELEMS))
    rpc = cf_rows_per_chunk(B)
    K = n_chunks(A, rpc)
    u0, u1 = task_range(t, nt, C * K)
    for u in range(u0, u1):
        c = u // K
        k = u - c * K
        cf_chunk_grad_sums(dyf, xf, yf, CS, B, c, c + 1, k * rpc, min2(A, (k + 1) * rpc), P[B_MEAN], relu, buf,
                           part[0, c, k:k + 1], part[1, c, k:k + 1], short)


@helper(inline=True)
def grad_sums_task(t, nt, dyf, xf, yf, A, C, CS, B, P, part, cl, owned, short, relu):
    """The t-th of nt shares of the gradient sums (``cl``, ``owned``, ``short``, ``relu``: literals)."""
    choose_by_layout(cl, owned, "grad_sums_cl", "grad_sums_owned", "grad_sums_split", (t, nt, dyf, xf, yf, A, C, CS, B, P, part, short, relu))


# ---- backward of owned channels: sums, coefficients and dx per slab group, while the group's x and dy
# are in this core's caches


@helper
def _group_coefficients(P, coef, c0, c1, n, gs, frozen):
    for i in range(c1 - c0):
        c = c0 + i
        P[B_SUM_DY, c] = gs[0, i]
        P[B_DOT, c] = gs[1, i]
        grad_coefficients(coef, c, n, gs[0, i], gs[1, i], P[B_MEAN, c], P[B_INVSTD, c], P[B_GAMMA, c], frozen)


@helper
def backward_owned_long(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, frozen, relu, write_d, stream):
    # the task's channels in groups (plan.long_group; x and dy count towards a group's size), each read
    # and written row by row
    buf = f64_empty((3, SLAB_ELEMS))
    G = long_group(A, B, xf.itemsize, 2, LONG_GROUP_BYTES_BWD)
    gs = f64_empty((4, G))
    zero = zero_of(coef)
    n = float(A * B)
    c0, c1 = task_channels(t, nt, C, B)
    for g0 in range(c0, c1, G):
        g1 = min2(c1, g0 + G)
        cf_group_grad_sums(dyf, xf, yf, A, CS, B, g0, g1, P[B_MEAN], relu, buf, gs[0], gs[1], gs[2], gs[3], False)
        _group_coefficients(P, coef, g0, g1, n, gs, frozen)
        for a in range(A):
            grad_run(dyf, xf, yf, dxf, df, (a * CS + g0) * B, g0, g1, B, coef, zero, relu, write_d, stream)


@helper
def backward_owned_short(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, frozen, relu, write_d, stream):
    G = slab_channels(B)
    buf = f64_empty((3, SLAB_ELEMS))
    gs = f64_empty((4, G))
    E = compute_empty((4, G * B), coef)
    zero = zero_of(coef)
    n = float(A * B)
    g0, g1 = task_range(t, nt, n_chunks(C, G))
    for g in range(g0, g1):
        c0 = g * G
        c1 = min2(C, c0 + G)
        cf_group_grad_sums(dyf, xf, yf, A, CS, B, c0, c1, P[B_MEAN], relu, buf, gs[0], gs[1], gs[2], gs[3], True)
        _group_coefficients(P, coef, c0, c1, n, gs, frozen)
        L = (c1 - c0) * B
        expand(coef, c0, c1, B, E)
        for a in range(A):
            grad_vec(dyf, xf, yf, dxf, df, (a * CS + c0) * B, E[0, :L], E[1, :L], E[2, :L], E[3, :L], zero, relu,
                     write_d, stream)


@helper(inline=True)
def backward_owned_task(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, frozen, short, relu, write_d, stream):
    """The t-th of nt shares (slab groups) of a channels-first backward of owned channels."""
    choose(short, "backward_owned_short", "backward_owned_long", (t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, frozen, relu, write_d, stream))
    if stream:
        store_fence()


# ---- dx with per-channel coefficients over a share of the rows or slabs (see fwd.affine_task)


@helper
def grad_apply_cl(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, short, relu, write_d, stream):
    zero = zero_of(coef)
    r0, r1 = task_range(t, nt, A)
    if not stream:  # row by row, the coefficient rows as they are
        grad_rows(dyf, xf, yf, dxf, df, r0, r1, C, CS, coef[0], coef[1], coef[2], coef[3], zero, relu, write_d)
        return
    if CS != C:  # a channel window: rows are apart, one row at a time
        for r in range(r0, r1):
            grad_vec(dyf, xf, yf, dxf, df, r * CS, coef[0], coef[1], coef[2], coef[3], zero, relu, write_d, stream)
        return
    # streaming: line-aligned slabs of the task's contiguous run (rows.grad_slabs)
    reps = (CL_STREAM_SLAB_ELEMS + C - 1) // C + 1
    E = compute_empty((4, reps * C), coef)
    tile(coef, C, reps, E)
    grad_slabs(dyf, xf, yf, dxf, df, r0 * C, r1 * C, C, E, zero, relu, write_d)


@helper
def grad_apply_cf_short(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, relu, write_d, stream):
    zero = zero_of(coef)
    G = slab_channels(B)
    E = compute_empty((4, G * B), coef)
    p0, p1 = task_range(t, nt, n_chunks(C, G) * A)
    cur = -1
    L = 0
    for p in range(p0, p1):
        g = p // A
        a = p - g * A
        c0 = g * G
        if g != cur:
            c1 = min2(C, c0 + G)
            L = (c1 - c0) * B
            expand(coef, c0, c1, B, E)
            cur = g
        grad_vec(dyf, xf, yf, dxf, df, (a * CS + c0) * B, E[0, :L], E[1, :L], E[2, :L], E[3, :L], zero, relu,
                 write_d, stream)


@helper
def grad_apply_cf_long(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, relu, write_d, stream):
    zero = zero_of(coef)
    i0, i1 = task_range(t, nt, A * C)
    i = i0
    while i < i1:  # runs of rows within one row of A: channels c .. e - 1
        c = i % C
        e = min2(C, c + i1 - i)
        grad_run(dyf, xf, yf, dxf, df, i * B, c, e, B, coef, zero, relu, write_d, stream)
        i += e - c


@helper
def grad_apply_cf(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, short, relu, write_d, stream):
    choose(short, "grad_apply_cf_short", "grad_apply_cf_long", (t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, relu, write_d, stream))


@helper(inline=True)
def grad_apply_task(t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, cl, owned, short, relu, write_d, stream):
    """The t-th of nt shares of a dx pass (``cl``, ``owned``, ``short`` and the flags: literals)."""
    choose_by_layout(cl, owned, "grad_apply_cl", "grad_apply_cf", "grad_apply_cf", (t, nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, short, relu, write_d, stream))
    if stream:
        store_fence()
