"""The compositions every kernel is made of: statistics, training forward, normalize, gradient sums,
backward and dx, each a parallel loop over the tasks of a phase (fwd.py, bwd.py) with the merges between.

These are inlined at Numba's IR level into the kernels (entries.py), before the parfor pass: their
``prange`` loops run on the thread pool in a kernel's parallel variant and as plain loops in its serial
one. ``nth`` is the number of threads to spread the work over (1 for the serial variant); the chunk plan,
and so every result bit, does not depend on it.

Arrays: xf, rf, yf, dyf, dxf, df are flat views of C-contiguous (A, CS, B) arrays of the compute dtype,
starting at the first channel of a window of C channels (C == CS but for huge channel counts, see
entries.py): rows are CS * B values apart. ``P`` holds per-channel float64 rows (fwd.py / bwd.py row constants), ``coef`` the
coefficients in the compute dtype. ``cl``, ``owned``, ``short`` and the flags reach the tasks as compile-time
literals, so each kernel variant compiles one path.

Why this shape: Numba links every callee's code into its caller and optimizes the result again, so each
level of calls above a loop compiles it once more, and every ``prange`` is a function compiled on its own
(~0.2 s each). The loops sit three levels under a kernel (row loop, task, parallel-loop body), and a
kernel variant has one or two parallel loops. Before, the passes were inlined into every kernel and its
serial twin, whole: 16.5 s for the first float32 training forward, backward and inference.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from fastbn._jit import helper
from fastbn._kernels import bwd, fwd
from fastbn._kernels.plan import (cf_rows_per_chunk, cl_rows_per_chunk,
                                  elementwise_units, n_chunks, reduction_units, slab_channels, tasks_for)
from fastbn._kernels.prims import f64_empty
from fastbn._kernels.reduce import cf_merge_partials, cl_merge_stats, sum_partials


@helper(inline=True)
def stats_core(nth, xf, A, C, CS, B, P, cl, owned, short):
    """P[MEAN], P[M2] of every channel."""
    K = 1
    rpc = 1
    if cl:
        rpc = cl_rows_per_chunk(A, C)
        K = n_chunks(A, rpc)
        part = f64_empty((2, K, C))
    elif owned:
        part = f64_empty((1, 1, 1))
    else:
        K = n_chunks(A, cf_rows_per_chunk(B))
        part = f64_empty((2, C, K))
    nt = tasks_for(reduction_units(A, C, B, cl, owned), nth)
    for t in prange(nt):
        fwd.stats_task(np.int64(t), nt, xf, A, C, CS, B, P, part, cl, owned, short)
    if cl:
        cl_merge_stats(part[0], part[1], A, rpc, P[fwd.MEAN], P[fwd.M2])
    elif not owned:
        for c in range(C):
            P[fwd.MEAN, c], P[fwd.M2, c] = cf_merge_partials(part[0, c], part[1, c], A, B)


@helper(inline=True)
def affine_core(nth, xf, rf, yf, A, C, CS, B, coef, cl, owned, short, relu, has_res, stream):
    """y = act((x - m) * k + t [+ res]) with coef rows (m, k, t)."""
    nt = tasks_for(elementwise_units(A, C, B, cl, owned, short, stream), nth)
    for t in prange(nt):
        fwd.affine_task(np.int64(t), nt, xf, rf, yf, A, C, CS, B, coef, cl, owned, short, relu, has_res, stream)


@helper(inline=True)
def train_owned_core(nth, xf, rf, yf, A, C, CS, B, P, coef, eps, rmin, rmax, dmax, short, relu, has_res, renorm,
                     stream):
    """Training forward where threads own whole channels: statistics and output per slab group."""
    nt = tasks_for(n_chunks(C, slab_channels(B)), nth)
    for t in prange(nt):
        fwd.train_owned_task(np.int64(t), nt, xf, rf, yf, A, C, CS, B, P, coef, eps, rmin, rmax, dmax, short, relu,
                             has_res, renorm, stream)


@helper(inline=True)
def train_two_pass_core(nth, xf, rf, yf, A, C, CS, B, P, coef, eps, rmin, rmax, dmax, cl, owned, short, relu,
                        has_res, renorm, stream):
    """Training forward in two passes (channels-last, few channels-first channels): statistics, then the
    output.

    Both passes walk their shares forwards. The output pass used to walk backwards, to start on what the
    statistics pass had left in L3; that was slower everywhere it was measured, most where the output
    streams (the prefetchers follow descending slabs badly). 2 threads, float32, medians of 21
    interleaved rounds, alternating processes: NHWC (32, 56, 56, 64) 2.5-3.7 -> 1.7-2.3 ms, (64, 56, 56,
    128) 12.5-14.4 -> 7.9-10.4 ms (float64 23.6-24.6 -> 15.1-18.5 ms), NCHW (64, 8, 56, 56) 0.55-0.65 ->
    0.36-0.39 ms; in-cache shapes within the noise."""
    stats_core(nth, xf, A, C, CS, B, P, cl, owned, short)
    n = float(A * B)
    for c in range(C):
        fwd.finish_channel(c, n, P[fwd.M2, c], eps, P, renorm, rmin, rmax, dmax, coef)
    affine_core(nth, xf, rf, yf, A, C, CS, B, coef, cl, owned, short, relu, has_res, stream)


@helper(inline=True)
def grad_sums_core(nth, dyf, xf, yf, A, C, CS, B, P, cl, owned, short, relu):
    """P[B_SUM_DY], P[B_DOT] of every channel from P[B_MEAN]."""
    K = 1
    if cl:
        K = n_chunks(A, cl_rows_per_chunk(A, C))
        part = f64_empty((2, K, C))
    elif owned:
        part = f64_empty((1, 1, 1))
    else:
        K = n_chunks(A, cf_rows_per_chunk(B))
        part = f64_empty((2, C, K))
    nt = tasks_for(reduction_units(A, C, B, cl, owned), nth)
    for t in prange(nt):
        bwd.grad_sums_task(np.int64(t), nt, dyf, xf, yf, A, C, CS, B, P, part, cl, owned, short, relu)
    if cl:
        sum_partials(part[0], P[bwd.B_SUM_DY])
        sum_partials(part[1], P[bwd.B_DOT])
    elif not owned:
        for c in range(C):
            sd = 0.0
            sx = 0.0
            for k in range(K):
                sd += part[0, c, k]
                sx += part[1, c, k]
            P[bwd.B_SUM_DY, c] = sd
            P[bwd.B_DOT, c] = sx


@helper(inline=True)
def grad_apply_core(nth, dyf, xf, yf, dxf, df, A, C, CS, B, coef, cl, owned, short, relu, write_d, stream):
    """dx (and d) from coef rows (m, k_x, k_0, k_dy)."""
    nt = tasks_for(elementwise_units(A, C, B, cl, owned, short, stream), nth)
    for t in prange(nt):
        bwd.grad_apply_task(np.int64(t), nt, dyf, xf, yf, dxf, df, A, C, CS, B, coef, cl, owned, short, relu, write_d,
                            stream)


@helper(inline=True)
def backward_owned_core(nth, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, frozen, short, relu, write_d, stream):
    """Backward where threads own whole channels: sums and dx per slab group."""
    nt = tasks_for(n_chunks(C, slab_channels(B)), nth)
    for t in prange(nt):
        bwd.backward_owned_task(np.int64(t), nt, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, frozen, short, relu,
                                write_d, stream)


@helper(inline=True)
def backward_two_pass_core(nth, dyf, xf, yf, dxf, df, A, C, CS, B, P, coef, frozen, cl, owned, short, relu, write_d,
                           stream):
    """Backward in two passes: gradient sums, then dx (forwards, see train_two_pass_core: NHWC float32
    (64, 56, 56, 128) 20-24 -> 12-18 ms)."""
    grad_sums_core(nth, dyf, xf, yf, A, C, CS, B, P, cl, owned, short, relu)
    n = float(A * B)
    for c in range(C):
        bwd.grad_coefficients(coef, c, n, P[bwd.B_SUM_DY, c], P[bwd.B_DOT, c], P[bwd.B_MEAN, c],
                              P[bwd.B_INVSTD, c], P[bwd.B_GAMMA, c], frozen)
    grad_apply_core(nth, dyf, xf, yf, dxf, df, A, C, CS, B, coef, cl, owned, short, relu, write_d, stream)
