"""Per-chunk and per-channel reductions: statistics (mean, M2) and gradient sums, in float64.

Statistics are one pass of shifted sums per chunk (shift = a value of the chunk itself) and Chan's exact
merge of chunks in chunk order. Shifting by a value k of the chunk bounds the cancellation in
M2 = S2 - S1**2/n: the relative error is about eps64 * (1 + (mean - k)**2 / var), at most ~2e-12 for a
16384-value chunk even when k is an extreme outlier (~1e-15 typically). One pass instead of two (mean,
then squared deviations) saves a read of the chunk.

Every function here computes a chunk's partial the same way whichever task calls it, and merges in chunk
order, so the owned, split and piecewise paths (``fwd.py``, ``bwd.py``, the partial kernels) give the same
bits. ``buf`` is a task's float64 (3, SLAB_ELEMS) scratch: a per-element shift or mean, two accumulators.
"""
from __future__ import annotations

import numpy as np

from fastbn._jit import choose, helper
from fastbn._kernels.half import ld
from fastbn._kernels.plan import cf_rows_per_chunk
from fastbn._kernels.prims import min2
from fastbn._kernels.rows import (chan_merge, grad_sums_rows, grad_sums_run, shifted_sums_rows, shifted_sums_run,
                                 shifted_to_stats)


@helper(reduction=True)
def seg_sum(S, s, n):
    """sum(S[s:s + n]) (vectorized; the lane split is fixed at compile time)."""
    v = S[s:s + n]
    acc = 0.0
    for i in range(n):
        acc += v[i]
    return acc


@helper(inline=True)
def zero_fill(v):
    for i in range(v.size):
        v[i] = 0.0


# ---- channels-first: channels [c0, c1) (a slab group, or one channel), rows [a0, a1) of (A, C, B).
# Long rows (B >= plan.SHORT_ROW) are reduced row by row; short rows elementwise over the slab group, each
# channel's segment summed at the end. ``short`` (a literal) picks one; the other is not compiled.


@helper
def cf_chunk_stats_long(xf, C, B, c0, c1, a0, a1, buf, pm, pq):
    # row by row over the channels (one contiguous run per row: plan.long_group), each channel's rows
    # added in row order: the same bits as one channel at a time
    # (the sums accumulate in pm, pq, turned into (mean, M2) at the end, as cl_chunk_stats does)
    cnt = float((a1 - a0) * B)
    g = c1 - c0
    K = buf[0, :g]
    for i in range(g):
        K[i] = np.float64(ld(xf[(a0 * C + c0 + i) * B]))
        pm[i] = 0.0
        pq[i] = 0.0
    for a in range(a0, a1):
        for i in range(g):
            u, v = shifted_sums_run(xf, (a * C + c0 + i) * B, B, K[i])
            pm[i] += u
            pq[i] += v
    for i in range(g):
        pm[i], pq[i] = shifted_to_stats(K[i], pm[i], pq[i], cnt)


@helper
def cf_chunk_stats_short(xf, C, B, c0, c1, a0, a1, buf, pm, pq):
    cnt = float((a1 - a0) * B)
    L = (c1 - c0) * B
    K0 = buf[0, :L]
    S1 = buf[1, :L]
    S2 = buf[2, :L]
    for i in range(c1 - c0):
        k = np.float64(ld(xf[(a0 * C + c0 + i) * B]))
        for j in range(B):
            K0[i * B + j] = k
    zero_fill(S1)
    zero_fill(S2)
    shifted_sums_rows(xf, (a0 * C + c0) * B, C * B, a1 - a0, K0, S1, S2)
    for i in range(c1 - c0):
        pm[i], pq[i] = shifted_to_stats(K0[i * B], seg_sum(S1, i * B, B), seg_sum(S2, i * B, B), cnt)


@helper(inline=True)
def cf_chunk_stats(xf, C, B, c0, c1, a0, a1, buf, pm, pq, short):
    """Chunk partials (mean, M2) of channels c0..c1 over rows a0..a1 into pm[i], pq[i] (i = c - c0)."""
    choose(short, "cf_chunk_stats_short", "cf_chunk_stats_long", (xf, C, B, c0, c1, a0, a1, buf, pm, pq))


@helper
def cf_group_stats(xf, A, C, B, c0, c1, buf, gm, gq, tm, tq, short):
    """(mean, M2) of channels c0..c1 over all rows into gm, gq: chunk partials merged in chunk order
    (tm, tq: scratch of the same length)."""
    rpc = cf_rows_per_chunk(B)
    g = c1 - c0
    n = 0.0
    for a0 in range(0, A, rpc):
        a1 = min2(A, a0 + rpc)
        nb = float((a1 - a0) * B)
        if a0 == 0:
            cf_chunk_stats(xf, C, B, c0, c1, a0, a1, buf, gm, gq, short)
        else:
            cf_chunk_stats(xf, C, B, c0, c1, a0, a1, buf, tm, tq, short)
            for i in range(g):
                _, gm[i], gq[i] = chan_merge(n, gm[i], gq[i], nb, tm[i], tq[i])
        n += nb


@helper
def cf_merge_partials(pm, pq, A, B):
    """(mean, M2) of one channel from its chunk partials pm[k], pq[k], merged as cf_group_stats does."""
    rpc = cf_rows_per_chunk(B)
    n = float(min2(A, rpc) * B)
    m = pm[0]
    q = pq[0]
    for k in range(1, pm.shape[0]):
        a0 = k * rpc
        nb = float((min2(A, a0 + rpc) - a0) * B)
        _, m, q = chan_merge(n, m, q, nb, pm[k], pq[k])
        n += nb
    return m, q


@helper
def cf_chunk_grad_sums_long(dyf, xf, yf, C, B, c0, c1, a0, a1, mean, relu, buf, psd, psx):
    # row by row over the channels, as cf_chunk_stats_long, accumulating in psd, psx
    g = c1 - c0
    for i in range(g):
        psd[i] = 0.0
        psx[i] = 0.0
    for a in range(a0, a1):
        for i in range(g):
            u, v = grad_sums_run(dyf, xf, yf, (a * C + c0 + i) * B, B, mean[c0 + i], relu)
            psd[i] += u
            psx[i] += v


@helper
def cf_chunk_grad_sums_short(dyf, xf, yf, C, B, c0, c1, a0, a1, mean, relu, buf, psd, psx):
    L = (c1 - c0) * B
    M = buf[0, :L]
    SD = buf[1, :L]
    SX = buf[2, :L]
    for i in range(c1 - c0):
        m = mean[c0 + i]
        for j in range(B):
            M[i * B + j] = m
    zero_fill(SD)
    zero_fill(SX)
    grad_sums_rows(dyf, xf, yf, (a0 * C + c0) * B, C * B, a1 - a0, M, SD, SX, relu)
    for i in range(c1 - c0):
        psd[i] = seg_sum(SD, i * B, B)
        psx[i] = seg_sum(SX, i * B, B)


@helper(inline=True)
def cf_chunk_grad_sums(dyf, xf, yf, C, B, c0, c1, a0, a1, mean, relu, buf, psd, psx, short):
    """Chunk sums (sum g, sum g * (x - mean[c])) of channels c0..c1 over rows a0..a1 into psd[i], psx[i];
    g = dy, or dy masked by y > 0 when relu. ``mean`` is the float64 (C,) mean."""
    choose(short, "cf_chunk_grad_sums_short", "cf_chunk_grad_sums_long", (dyf, xf, yf, C, B, c0, c1, a0, a1, mean, relu, buf, psd, psx))


@helper
def cf_group_grad_sums(dyf, xf, yf, A, C, B, c0, c1, mean, relu, buf, gd, gx, td, tx, short):
    """Gradient sums of channels c0..c1 over all rows into gd, gx: chunk sums added in chunk order."""
    rpc = cf_rows_per_chunk(B)
    for i in range(c1 - c0):
        gd[i] = 0.0
        gx[i] = 0.0
    for a0 in range(0, A, rpc):
        cf_chunk_grad_sums(dyf, xf, yf, C, B, c0, c1, a0, min2(A, a0 + rpc), mean, relu, buf, td, tx, short)
        for i in range(c1 - c0):
            gd[i] += td[i]
            gx[i] += tx[i]


# ---- channels-last: rows [r0, r1) x channels [c0, c1) of (R, C), accumulated row by row into float64
# arrays (rows.shifted_sums_rows / grad_sums_rows).


@helper
def cl_chunk_stats(xf, C, r0, r1, c0, c1, buf, shift, pm, pq):
    """Chunk partials (mean, M2) of channels c0..c1 over rows r0..r1 into pm, pq (length c1 - c0);
    ``shift`` is float64 scratch of that length (filled with the chunk's first row)."""
    w = c1 - c0
    for c in range(w):
        shift[c] = ld(xf[r0 * C + c0 + c])
        pm[c] = 0.0
        pq[c] = 0.0
    shifted_sums_rows(xf, r0 * C + c0, C, r1 - r0, shift, pm, pq)
    n = float(r1 - r0)
    for c in range(w):
        pm[c], pq[c] = shifted_to_stats(shift[c], pm[c], pq[c], n)


@helper
def cl_chunk_grad_sums(dyf, xf, yf, C, r0, r1, c0, c1, mean, relu, buf, psd, psx):
    """Chunk sums (sum g, sum g * (x - mean)) of channels c0..c1 over rows r0..r1 into psd, psx;
    ``mean`` is the float64 mean of those channels (length c1 - c0)."""
    for c in range(c1 - c0):
        psd[c] = 0.0
        psx[c] = 0.0
    grad_sums_rows(dyf, xf, yf, r0 * C + c0, C, r1 - r0, mean, psd, psx, relu)


@helper
def cl_merge_stats(pm, pq, A, rpc, mean, m2):
    """Merge channels-last chunk partials pm, pq (K, C) in chunk order into mean, m2 (C,).

    chan_merge with its count weights hoisted: every channel shares the chunk's counts, so the channel
    loop vectorizes (same expressions as chan_merge, same bits)."""
    K, C = pm.shape
    for c in range(C):
        mean[c] = pm[0, c]
        m2[c] = pq[0, c]
    n = float(min2(A, rpc))
    for k in range(1, K):
        nb = float(min2(A, (k + 1) * rpc) - k * rpc)
        n_ab = n + nb
        w_b = nb / n_ab
        w_ab = n * w_b
        pmk = pm[k]
        pqk = pq[k]
        for c in range(C):
            delta = pmk[c] - mean[c]
            mean[c] = mean[c] + delta * w_b
            m2[c] = m2[c] + pqk[c] + delta * delta * w_ab
        n = n_ab


@helper
def sum_partials(p, out):
    """out[c] = sum over k of p[k, c], in order (channels-last gradient sums)."""
    K, C = p.shape
    for c in range(C):
        out[c] = 0.0
    for k in range(K):
        pk = p[k]
        for c in range(C):
            out[c] += pk[c]
