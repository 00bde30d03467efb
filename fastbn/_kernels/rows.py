"""The loops every kernel is made of: elementwise writers over a contiguous run, and the sums.

Two shapes of run cover every layout (see ``plan.py``):

- *scalar coefficients*: one channel's contiguous row (channels-first, ``B`` >= ``plan.SHORT_ROW``), with
  its per-channel coefficients as scalars;
- *vector coefficients*: a run whose coefficients change along it (a channels-last row of C channels, or a
  channels-first slab of several short channel rows), with the coefficients as arrays of the run's length.

Loops index row views from 0 with ``range(n)``: indexing the flat array with ``range(start, stop)`` keeps
Numba's negative-index wraparound in the loop and blocks LLVM's vectorizer (measured 5.9 ms vs 0.56 ms
for a float64 sum of 6.4M float32 values on one core).

With ``stream``, every writer stores the whole 64-byte lines of its run with streaming stores
(``intrin.stream_store``) and the partial lines at either end with ordinary ones (``stream_span``);
without it, one loop of ordinary stores.

The per-element update ``(x - m) * k + t`` runs in the compute dtype (the input's, float32 for float32):
float32 arithmetic streams at copy speed where float64 per element ran 3x slower (62 vs 23 us for 1 MiB on
one core). Subtracting the mean first keeps large-offset channels exact (``x * k + (t - m * k)`` loses
every digit of float32 ``1e4 + N(0, 1)``); the rounding of the mean to the compute dtype is folded into t
in float64 by ``affine_coefficients``.

Every element is read through ``half.ld`` and written through ``half.st``: float16 and bfloat16 data
(uint16 / int16 bits) is computed in float32 and rounded once on the store; for float32 and float64 both
are no-ops, and the loops compile to the same machine code as plain ``x[i]`` / ``y[i] = v``.
"""
from __future__ import annotations

import numpy as np

from fastbn._jit import helper
from fastbn._kernels.half import ld, st
from fastbn._kernels.intrin import STREAM_ALIGN, address, stream_store
from fastbn._kernels.plan import CL_STREAM_SLAB_ELEMS


@helper(inline=True)
def stream_span(y):
    """(h, e): write y[h:e] with streaming stores and the rest with ordinary ones. y[h:e] is the whole
    64-byte lines inside y: a line written partly by streaming stores and partly by ordinary ones (a
    row's last line and the next row's first) makes the write-combining buffer flush a partial line,
    a read-modify-write in memory: 80 ms instead of 11 for 102.8 MB in rows of 512 bytes on one core.
    (0, 0) when y's elements are not aligned to their size."""
    n = y.size
    isz = y.itemsize
    a = address(y)
    if a % isz != 0:
        return 0, 0
    per_line = STREAM_ALIGN // isz
    off = a % STREAM_ALIGN
    h = 0 if off == 0 else (STREAM_ALIGN - off) // isz
    if h >= n:
        return 0, 0
    e = h + ((n - h) // per_line) * per_line
    return h, e


@helper(inline=True)
def stream_pieces(y, e0, e1, L):
    """How a channels-last streaming pass writes y[e0:e1] (a task's rows, contiguous): a head up to the
    first 64-byte line with ordinary stores, K slabs of L values with streaming stores, the rest of the
    whole lines with streaming stores, the tail with ordinary ones. Every slab starts on a line, so no
    line is written partly by streaming and partly by ordinary stores except once per task at either
    end: slabs cut at row boundaries instead (a head and a tail of ordinary stores in every slab) ran
    2.5x slower, 4.8 against 1.2 ms for 25.7 MB in slabs of 128 values (each such line seems to stall
    the write stream for a memory round trip). Returns (a, b, c, K, ok): head [e0, a), slabs
    [a + k L, a + (k + 1) L), rest [b, c), tail [c, e1); ``ok`` False when y's elements are not aligned to
    their size (no streaming stores at all: the slabs and the rest take ordinary ones, and c == e1)."""
    h, e = stream_span(y[e0:e1])
    ok = e > h
    if not ok:
        h = 0
        e = e1 - e0
    a = e0 + h
    c = e0 + e
    K = (c - a) // L
    return a, a + K * L, c, K, ok


@helper(inline=True)
def stream_piece(j, e0, a, b, c, e1, K, L, ok):
    """(start, length, streaming) of piece j (0 <= j < K + 3) of stream_pieces' split."""
    if j == 0:
        return e0, a - e0, False
    if j <= K:
        return a + (j - 1) * L, L, ok
    if j == K + 1:
        return b, c - b, ok
    return c, e1 - c, False


@helper(inline=True)
def d_streams(d, dx):
    """Whether a second output ``d`` written beside ``dx`` (the residual's gradient) can take streaming
    stores where dx does: only when it sits at the same offset within a 64-byte line. The streaming
    stores promise LLVM aligned vectors; a residual_out 16 bytes off dx's alignment crashed the process
    (SIGSEGV) before this test. Otherwise d gets ordinary stores."""
    return (address(d) - address(dx)) % STREAM_ALIGN == 0


@helper(inline=True)
def affine_coefficients(coef, c, mean, k_x, k_0):
    """Store (m, k_x, k_0') in coef[0..2, c] (coef has the compute dtype) for an update
    u = (x - mean) * k_x + k_0 evaluated as (x - m) * k_x + k_0' with m = mean rounded to that dtype:
    x - m is exact when x is near m (Sterbenz) and the rounding mean - m is folded into k_0' in float64.
    For float64 m == mean and k_0' == k_0."""
    coef[0, c] = mean
    coef[1, c] = k_x
    coef[2, c] = k_0 - (mean - np.float64(coef[0, c])) * k_x


# ---- writers. Each has one loop with ordinary stores and, when ``stream``, a loop with streaming stores
# over the destination's whole 64-byte lines (ordinary stores for the partial lines at either end). The flags (relu, has_res, write_d, stream) reach
# these functions as compile-time literals (see _jit.kernel), so each compiled variant holds only its loops.
# ``zero`` is 0 in the compute dtype (a float64 literal would promote the select, and the loop, to float64).


@helper(inline=True)
def act(x, r, m, k, t, zero, relu, has_res):
    """act((x - m) * k + t [+ r]); act is ReLU (max(v, 0), NaN kept) or the identity."""
    v = (x - m) * k + t
    if has_res:
        v = v + r
    if relu:
        v = zero if v < 0.0 else v
    return v


@helper(inline=True)
def masked(dy, y, zero, relu):
    """The gradient reaching BN: dy, or 0 where the ReLU's output y is not positive."""
    if relu:
        return zero if y <= 0.0 else dy
    return dy


@helper
def act_run(xf, rf, yf, s, c0, c1, B, coef, zero, relu, has_res, stream):
    """y = act((x - m) * k + t [+ res]) over the rows of channels c0..c1 (B values each, contiguous from s),
    scalar coefficients (m, k, t) from the coef columns c0..c1.

    A function of its own, called once per run of rows (see ``grad_run``)."""
    for c in range(c0, c1):
        m = coef[0, c]
        k = coef[1, c]
        t = coef[2, c]
        o = s + (c - c0) * B
        n = B
        x = xf[o:o + n]
        r = rf[o:o + n]
        y = yf[o:o + n]
        if stream:
            h, e = stream_span(y)
            for i in range(h):
                y[i] = st(act(ld(x[i]), ld(r[i]), m, k, t, zero, relu, has_res), y)
            xs = x[h:e]
            rs = r[h:e]
            ys = y[h:e]
            for i in range(e - h):
                stream_store(ys, i, st(act(ld(xs[i]), ld(rs[i]), m, k, t, zero, relu, has_res), ys))
            xt = x[e:]
            rt = r[e:]
            yt = y[e:]
            for i in range(n - e):
                yt[i] = st(act(ld(xt[i]), ld(rt[i]), m, k, t, zero, relu, has_res), yt)
        else:
            for i in range(n):
                y[i] = st(act(ld(x[i]), ld(r[i]), m, k, t, zero, relu, has_res), y)


@helper(inline=True)
def act_vec(xf, rf, yf, s, M, K, T, zero, relu, has_res, stream):
    """y = act((x - M) * K + T [+ res]) over [s, s + len(M)), coefficients per element."""
    n = M.size
    x = xf[s:s + n]
    r = rf[s:s + n]
    y = yf[s:s + n]
    if stream:
        h, e = stream_span(y)
        for i in range(h):
            y[i] = st(act(ld(x[i]), ld(r[i]), M[i], K[i], T[i], zero, relu, has_res), y)
        xs = x[h:e]
        rs = r[h:e]
        ys = y[h:e]
        Ms = M[h:e]
        Ks = K[h:e]
        Ts = T[h:e]
        for i in range(e - h):
            stream_store(ys, i, st(act(ld(xs[i]), ld(rs[i]), Ms[i], Ks[i], Ts[i], zero, relu, has_res), ys))
        for i in range(e, n):
            y[i] = st(act(ld(x[i]), ld(r[i]), M[i], K[i], T[i], zero, relu, has_res), y)
    else:
        for i in range(n):
            y[i] = st(act(ld(x[i]), ld(r[i]), M[i], K[i], T[i], zero, relu, has_res), y)


@helper
def act_slabs(xf, rf, yf, e0, e1, C, E, zero, relu, has_res):
    """y = act((x - M) * K + T [+ res]) over the contiguous channels-last run [e0, e1) (whole rows of C
    values), written as stream_pieces splits it: line-aligned slabs with streaming stores. E holds the
    coefficient rows tiled (E[r, j] = coef[r, j % C], at least L + C wide); a piece starting at s reads
    them from column s % C on. All the pieces in one call: a call per slab (views of xf, yf passed down)
    paid reference-count updates on the shared arrays, atomic and contended between the threads, which
    made the pass 2-3x slower than a copy."""
    L = CL_STREAM_SLAB_ELEMS
    a, b, c, K, ok = stream_pieces(yf, e0, e1, L)
    for j in range(K + 3):
        s, n, streamed = stream_piece(j, e0, a, b, c, e1, K, L, ok)
        p = s % C
        x = xf[s:s + n]
        r = rf[s:s + n]
        y = yf[s:s + n]
        M = E[0, p:p + n]
        Kc = E[1, p:p + n]
        T = E[2, p:p + n]
        if streamed:
            for i in range(n):
                stream_store(y, i, st(act(ld(x[i]), ld(r[i]), M[i], Kc[i], T[i], zero, relu, has_res), y))
        else:
            for i in range(n):
                y[i] = st(act(ld(x[i]), ld(r[i]), M[i], Kc[i], T[i], zero, relu, has_res), y)


@helper
def act_rows(xf, rf, yf, r0, r1, C, CS, M, K, T, zero, relu, has_res):
    """Channels-last rows r0..r1 (of C values) of y = act((x - M) * K + T [+ res]), M, K, T per channel,
    in one call (a call per row of 64 values cost ~5 ns a row, a quarter of the pass). Rows are CS values
    apart (C == CS unless a channel window, see entries.py).
    Ordinary stores (streaming passes use act_slabs)."""
    for r in range(r0, r1):
        x = xf[r * CS:r * CS + C]
        rr = rf[r * CS:r * CS + C]
        y = yf[r * CS:r * CS + C]
        for c in range(C):
            y[c] = st(act(ld(x[c]), ld(rr[c]), M[c], K[c], T[c], zero, relu, has_res), y)


@helper
def grad_run(dyf, xf, yf, dxf, df, s, c0, c1, B, coef, zero, relu, write_d, stream):
    """dx = g * k_dy + (x - m) * k_x + k_0 over the rows of channels c0..c1 (B values each, contiguous from
    s), scalar coefficients from the coef columns c0..c1 (rows m, k_x, k_0, k_dy); g = masked(dy); with
    write_d also d = g.

    A function of its own, called once per run of rows. It used to be inlined at Numba's IR level into
    each caller, once per row: each inlined copy carried both store loops (streaming and ordinary: a flag
    literal does not prune a branch inlined into the caller) to be typed, lowered and optimized there.
    First float32 training forward, backward and inference (``examples/jit_profile.py``, medians of
    alternating cold runs): 9.3-9.5 s of CPU with the writers inlined, 7.8 s (7.1-8.6) with this one and
    ``act_run`` as functions. Same bits (780 outputs over every layout, see ``fastbn/_lazycode.py``), and
    the same vector loop in the machine code (64 values per iteration, the same instructions); the
    callers' per-row loop became one call per run of rows."""
    for c in range(c0, c1):
        m = coef[0, c]
        k_x = coef[1, c]
        k_0 = coef[2, c]
        k_dy = coef[3, c]
        o = s + (c - c0) * B
        n = B
        dy = dyf[o:o + n]
        x = xf[o:o + n]
        y = yf[o:o + n]
        dx = dxf[o:o + n]
        d = df[o:o + n]
        if stream:
            h, e = stream_span(dx)
            for i in range(h):
                g = masked(ld(dy[i]), ld(y[i]), zero, relu)
                u = g * k_dy + (ld(x[i]) - m) * k_x + k_0
                if write_d:
                    d[i] = st(g, d)
                dx[i] = st(u, dx)
            dys = dy[h:e]
            xs = x[h:e]
            ys = y[h:e]
            dxs = dx[h:e]
            ds = d[h:e]
            if write_d and d_streams(ds, dxs):
                for i in range(e - h):
                    g = masked(ld(dys[i]), ld(ys[i]), zero, relu)
                    stream_store(ds, i, st(g, ds))
                    stream_store(dxs, i, st(g * k_dy + (ld(xs[i]) - m) * k_x + k_0, dxs))
            else:
                for i in range(e - h):
                    g = masked(ld(dys[i]), ld(ys[i]), zero, relu)
                    u = g * k_dy + (ld(xs[i]) - m) * k_x + k_0
                    if write_d:
                        ds[i] = st(g, ds)
                    stream_store(dxs, i, st(u, dxs))
            for i in range(e, n):
                g = masked(ld(dy[i]), ld(y[i]), zero, relu)
                u = g * k_dy + (ld(x[i]) - m) * k_x + k_0
                if write_d:
                    d[i] = st(g, d)
                dx[i] = st(u, dx)
        else:
            for i in range(n):
                g = masked(ld(dy[i]), ld(y[i]), zero, relu)
                u = g * k_dy + (ld(x[i]) - m) * k_x + k_0
                if write_d:
                    d[i] = st(g, d)
                dx[i] = st(u, dx)


@helper(inline=True)
def grad_vec(dyf, xf, yf, dxf, df, s, M, KX, K0, KDY, zero, relu, write_d, stream):
    """dx = g * KDY + (x - M) * KX + K0 over [s, s + len(M)), coefficients per element; g and d as in
    grad_run."""
    n = M.size
    dy = dyf[s:s + n]
    x = xf[s:s + n]
    y = yf[s:s + n]
    dx = dxf[s:s + n]
    d = df[s:s + n]
    if stream:
        h, e = stream_span(dx)
        for i in range(h):
            g = masked(ld(dy[i]), ld(y[i]), zero, relu)
            u = g * KDY[i] + (ld(x[i]) - M[i]) * KX[i] + K0[i]
            if write_d:
                d[i] = st(g, d)
            dx[i] = st(u, dx)
        dys = dy[h:e]
        xs = x[h:e]
        ys = y[h:e]
        dxs = dx[h:e]
        ds = d[h:e]
        Ms = M[h:e]
        KXs = KX[h:e]
        K0s = K0[h:e]
        KDYs = KDY[h:e]
        if write_d and d_streams(ds, dxs):
            for i in range(e - h):
                g = masked(ld(dys[i]), ld(ys[i]), zero, relu)
                stream_store(ds, i, st(g, ds))
                stream_store(dxs, i, st(g * KDYs[i] + (ld(xs[i]) - Ms[i]) * KXs[i] + K0s[i], dxs))
        else:
            for i in range(e - h):
                g = masked(ld(dys[i]), ld(ys[i]), zero, relu)
                u = g * KDYs[i] + (ld(xs[i]) - Ms[i]) * KXs[i] + K0s[i]
                if write_d:
                    ds[i] = st(g, ds)
                stream_store(dxs, i, st(u, dxs))
        for i in range(e, n):
            g = masked(ld(dy[i]), ld(y[i]), zero, relu)
            u = g * KDY[i] + (ld(x[i]) - M[i]) * KX[i] + K0[i]
            if write_d:
                d[i] = st(g, d)
            dx[i] = st(u, dx)
    else:
        for i in range(n):
            g = masked(ld(dy[i]), ld(y[i]), zero, relu)
            u = g * KDY[i] + (ld(x[i]) - M[i]) * KX[i] + K0[i]
            if write_d:
                d[i] = st(g, d)
            dx[i] = st(u, dx)


@helper
def grad_slabs(dyf, xf, yf, dxf, df, e0, e1, C, E, zero, relu, write_d):
    """dx over the contiguous channels-last run [e0, e1) in line-aligned slabs (see act_slabs); E rows
    (M, KX, K0, KDY) tiled; d = g too with write_d (streamed only where d_streams)."""
    L = CL_STREAM_SLAB_ELEMS
    a, b, c, K, ok = stream_pieces(dxf, e0, e1, L)
    d_nt = write_d and d_streams(df, dxf)
    for j in range(K + 3):
        s, n, streamed = stream_piece(j, e0, a, b, c, e1, K, L, ok)
        p = s % C
        dy = dyf[s:s + n]
        x = xf[s:s + n]
        y = yf[s:s + n]
        dx = dxf[s:s + n]
        d = df[s:s + n]
        M = E[0, p:p + n]
        KX = E[1, p:p + n]
        K0 = E[2, p:p + n]
        KDY = E[3, p:p + n]
        if streamed and d_nt:
            for i in range(n):
                g = masked(ld(dy[i]), ld(y[i]), zero, relu)
                stream_store(d, i, st(g, d))
                stream_store(dx, i, st(g * KDY[i] + (ld(x[i]) - M[i]) * KX[i] + K0[i], dx))
        elif streamed:
            for i in range(n):
                g = masked(ld(dy[i]), ld(y[i]), zero, relu)
                u = g * KDY[i] + (ld(x[i]) - M[i]) * KX[i] + K0[i]
                if write_d:
                    d[i] = st(g, d)
                stream_store(dx, i, st(u, dx))
        else:
            for i in range(n):
                g = masked(ld(dy[i]), ld(y[i]), zero, relu)
                u = g * KDY[i] + (ld(x[i]) - M[i]) * KX[i] + K0[i]
                if write_d:
                    d[i] = st(g, d)
                dx[i] = st(u, dx)


@helper
def grad_rows(dyf, xf, yf, dxf, df, r0, r1, C, CS, M, KX, K0, KDY, zero, relu, write_d):
    """Channels-last rows r0..r1 of grad_vec in one call (see act_rows)."""
    for r in range(r0, r1):
        dy = dyf[r * CS:r * CS + C]
        x = xf[r * CS:r * CS + C]
        y = yf[r * CS:r * CS + C]
        dx = dxf[r * CS:r * CS + C]
        d = df[r * CS:r * CS + C]
        for c in range(C):
            g = masked(ld(dy[c]), ld(y[c]), zero, relu)
            u = g * KDY[c] + (ld(x[c]) - M[c]) * KX[c] + K0[c]
            if write_d:
                d[c] = st(g, d)
            dx[c] = st(u, dx)


# ---- sums, in float64. A long row is one vectorized reduction (``reduction=True`` lets LLVM split the
# sum into vector lanes; the split is fixed at compile time, so the bits do not depend on threads). Runs
# with per-element shifts/means accumulate elementwise into float64 arrays, four rows per load and
# store of the accumulator, rows added in a fixed pairwise order: the accumulator's traffic, not the
# input's, limited the one-row loop (one core, (1568, 512) float32: 195 -> 150 us).


@helper(reduction=True)
def shifted_sums_run(xf, s, n, k):
    """(sum(x - k), sum((x - k)**2)) over xf[s:s + n], in float64."""
    x = xf[s:s + n]
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        d = ld(x[i]) - k
        s1 += d
        s2 += d * d
    return s1, s2


@helper(inline=True)
def unroll_rows(n):
    """Whether runs of n values are accumulated several rows per load and store of the accumulators.

    Measured on one core, 6.4M float32 values into float64 accumulators, 4 rows a step against 1: runs of
    64 values 1.1 ms against 1.4; 128: 3.0 against 1.7; 256: 3.0 against 1.7; 512: 2.5 against 3.5; 1024:
    1.6 against 3.0 (the unrolled loop stalls on runs of 128-256 whatever the accumulators' placement;
    presumably the accumulator stores alias the next rows' loads). Alternatives measured and dropped:
    8 rows a step (no better); blocks of 16 values accumulated in vector registers over the rows of a
    chunk (an LLVM-level loop: no stores at all, but the strided reads it makes ran 2x slower on arrays
    beyond L3, even with software prefetch of the next rows). Depends on n only: the order of additions,
    and so the bits, is a function of the shape.
    """
    return n < 96 or n >= 512


@helper
def shifted_sums_rows(xf, s0, stride, rows, K0, S1, S2):
    """S1[j] += sum_r (x[s0 + r*stride + j] - K0[j]), S2[j] += the squares, over ``rows`` runs of
    len(K0) elements ``stride`` apart (float64 accumulators; 4 rows a step where unroll_rows says so,
    added pairwise in a fixed order)."""
    n = K0.size
    r = 0
    while unroll_rows(n) and r + 4 <= rows:
        x0 = xf[s0 + r * stride:s0 + r * stride + n]
        x1 = xf[s0 + (r + 1) * stride:s0 + (r + 1) * stride + n]
        x2 = xf[s0 + (r + 2) * stride:s0 + (r + 2) * stride + n]
        x3 = xf[s0 + (r + 3) * stride:s0 + (r + 3) * stride + n]
        for j in range(n):
            kj = K0[j]
            d0 = ld(x0[j]) - kj
            d1 = ld(x1[j]) - kj
            d2 = ld(x2[j]) - kj
            d3 = ld(x3[j]) - kj
            S1[j] += (d0 + d1) + (d2 + d3)
            S2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    while r < rows:
        x0 = xf[s0 + r * stride:s0 + r * stride + n]
        for j in range(n):
            d = ld(x0[j]) - K0[j]
            S1[j] += d
            S2[j] += d * d
        r += 1


@helper(reduction=True)
def grad_sums_run(dyf, xf, yf, s, n, m, relu):
    """(sum(g), sum(g * (x - m))) over one contiguous run, in float64; g = dy, or with ``relu`` dy where
    y > 0, else 0 (``yf`` is read only then).

    One helper for both, with the flag tested outside the loops: the per-row caller (reduce.py) used to
    pick one of two helpers with ``_jit.choose``, which passes its arguments as a tuple, and building a
    tuple of arrays updates their reference counts atomically, once per row. Float32 (8, 256, 196)
    gradient sums, one thread: 125 us that way, 98 us calling the helper directly (medians of 21 rounds).
    """
    dy = dyf[s:s + n]
    x = xf[s:s + n]
    sd = 0.0
    sdx = 0.0
    if relu:
        y = yf[s:s + n]
        for i in range(n):
            g = 0.0 if ld(y[i]) <= 0.0 else np.float64(ld(dy[i]))
            sd += g
            sdx += g * (ld(x[i]) - m)
    else:
        for i in range(n):
            g = np.float64(ld(dy[i]))
            sd += g
            sdx += g * (ld(x[i]) - m)
    return sd, sdx


@helper
def grad_sums_rows(dyf, xf, yf, s0, stride, rows, M, SD, SX, relu):
    """SD[j] += sum_r g, SX[j] += sum_r g * (x - M[j]) over ``rows`` runs of len(M) elements ``stride``
    apart; g = dy, or dy masked by y > 0 when relu (float64 accumulators, two rows a step where
    unroll_rows says so)."""
    n = M.size
    r = 0
    while unroll_rows(n) and r + 2 <= rows:
        o = s0 + r * stride
        g0 = dyf[o:o + n]
        g1 = dyf[o + stride:o + stride + n]
        x0 = xf[o:o + n]
        x1 = xf[o + stride:o + stride + n]
        y0 = yf[o:o + n]
        y1 = yf[o + stride:o + stride + n]
        for j in range(n):
            a = masked(np.float64(ld(g0[j])), ld(y0[j]), 0.0, relu)
            b = masked(np.float64(ld(g1[j])), ld(y1[j]), 0.0, relu)
            SD[j] += a + b
            SX[j] += a * (ld(x0[j]) - M[j]) + b * (ld(x1[j]) - M[j])
        r += 2
    while r < rows:
        o = s0 + r * stride
        g0 = dyf[o:o + n]
        x0 = xf[o:o + n]
        y0 = yf[o:o + n]
        for j in range(n):
            a = masked(np.float64(ld(g0[j])), ld(y0[j]), 0.0, relu)
            SD[j] += a
            SX[j] += a * (ld(x0[j]) - M[j])
        r += 1


@helper(inline=True)
def shifted_to_stats(k, s1, s2, n):
    """(mean, M2) from shifted sums around k: mean = k + s1/n, M2 = s2 - s1**2/n (NaN stays NaN)."""
    m2 = s2 - s1 * (s1 / n)
    if m2 < 0.0:  # rounding can leave a tiny negative for a constant chunk
        m2 = 0.0
    return k + s1 / n, m2


@helper(inline=True)
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s exact merge of two (count, mean, M2) partials; counts are floats."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / n))
    return n, mean, m2
