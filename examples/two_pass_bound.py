"""What a channels-first training forward's two passes cost against the physical bound, out of L3.

The statistics of a channel need all of its values before its first output can be written, so the
kernel reads each group of channels once for its statistics and again (from L3) for its output. This
times, in plain Numba loops shaped like the kernel's (each of 2 threads owns half the channels, taken in
groups, rows read row by row), on an (N, C, H*W) array:

- ``copy``: a streaming-store copy of the array (the bench's bound for the kernel);
- ``read``: reading it once with the float64 shifted sums of the statistics (no output);
- ``grouped``: the kernel's order: a group's statistics, then its output with streaming stores;
- ``fused``: the next group's statistics fused, element by element, into the current group's output loop
  (an attempt to overlap the reads with the writes);
- ``rowwise``: the same overlap, alternating whole rows of the two groups.

Medians of interleaved rounds, in rotating order::

    python examples/two_pass_bound.py [--dtype float32] [--group 6] [--rounds 21]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

from fastbn._kernels.intrin import store_fence, stream_store

ARGS = (np.float32(0.5), np.float32(2.0), np.float32(1.0))


@njit(fastmath={"reassoc"}, inline="never")
def _sums(x, s, n):
    v = x[s:s + n]
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        d = np.float64(v[i]) - 0.5
        s1 += d
        s2 += d * d
    return s1, s2


@njit(inline="never")
def _write(x, y, s, n, m, k, t):
    xs = x[s:s + n]
    ys = y[s:s + n]
    for i in range(n):
        stream_store(ys, i, (xs[i] - m) * k + t)


@njit(fastmath={"reassoc"}, inline="never")
def _sums_and_write(x, y, s, sw, n, m, k, t):
    v = x[s:s + n]
    xw = x[sw:sw + n]
    yw = y[sw:sw + n]
    s1 = 0.0
    s2 = 0.0
    for i in range(n):
        d = np.float64(v[i]) - 0.5
        s1 += d
        s2 += d * d
        stream_store(yw, i, (xw[i] - m) * k + t)
    return s1, s2


@njit(parallel=True)
def copy(x, y, A, C, B, G, out):
    n = x.size
    for t in prange(2):
        a = (t * n // 2) // 16 * 16
        b = (t + 1) * n // 2 // 16 * 16 if t == 0 else n
        xs = x[a:b]
        ys = y[a:b]
        for i in range(b - a):
            stream_store(ys, i, xs[i])
        store_fence()


@njit(parallel=True)
def read(x, y, A, C, B, G, out):
    for t in prange(2):
        c0, c1 = t * C // 2, (t + 1) * C // 2
        for g0 in range(c0, c1, G):
            for a in range(A):
                for c in range(g0, min(c1, g0 + G)):
                    u, v = _sums(x, (a * C + c) * B, B)
                    out[0, c] += u
                    out[1, c] += v


@njit(parallel=True)
def grouped(x, y, A, C, B, G, out):
    m, k, s = ARGS
    for t in prange(2):
        c0, c1 = t * C // 2, (t + 1) * C // 2
        for g0 in range(c0, c1, G):
            g1 = min(c1, g0 + G)
            for a in range(A):
                for c in range(g0, g1):
                    u, v = _sums(x, (a * C + c) * B, B)
                    out[0, c] += u
                    out[1, c] += v
            for a in range(A):
                for c in range(g0, g1):
                    _write(x, y, (a * C + c) * B, B, m, k, s)
        store_fence()


@njit(parallel=True)
def _overlapped(x, y, A, C, B, G, out, fused):
    m, k, s = ARGS
    for t in prange(2):
        c0, c1 = t * C // 2, (t + 1) * C // 2
        ng = (c1 - c0 + G - 1) // G
        for gi in range(ng + 1):  # statistics of group gi, output of group gi - 1
            r0, r1 = c0 + gi * G, min(c1, c0 + gi * G + G)
            w0, w1 = c0 + (gi - 1) * G, min(c1, c0 + gi * G)
            for a in range(A):
                for i in range(G):
                    rd = gi < ng and r0 + i < r1
                    wr = gi > 0 and w0 + i < w1
                    if rd and wr and fused:
                        u, v = _sums_and_write(x, y, (a * C + r0 + i) * B, (a * C + w0 + i) * B, B, m, k, s)
                        out[0, r0 + i] += u
                        out[1, r0 + i] += v
                        continue
                    if rd:
                        u, v = _sums(x, (a * C + r0 + i) * B, B)
                        out[0, r0 + i] += u
                        out[1, r0 + i] += v
                    if wr:
                        _write(x, y, (a * C + w0 + i) * B, B, m, k, s)
        store_fence()


def _aligned(n: int, dtype: np.dtype) -> np.ndarray:
    buf = np.empty(n * dtype.itemsize + 64, np.uint8)
    o = (-buf.ctypes.data) % 64
    return buf[o:o + n * dtype.itemsize].view(dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--shape", default="64,128,3136", help="N,C,H*W")
    p.add_argument("--group", type=int, default=6, help="channels per group (the kernel: 6 for the default)")
    p.add_argument("--rounds", type=int, default=21)
    a = p.parse_args()
    dt = np.dtype(a.dtype)
    A, C, B = (int(v) for v in a.shape.split(","))
    if B * dt.itemsize % 64:
        p.error("--shape: rows of H*W values must be whole 64-byte lines")
    x = _aligned(A * C * B, dt)
    x[:] = np.random.default_rng(0).random(A * C * B)
    y = _aligned(A * C * B, dt)
    y[:] = 0
    out = np.zeros((2, C))
    runs = {"copy": copy, "read": read, "grouped": grouped,
            "fused": lambda *v: _overlapped(*v, True), "rowwise": lambda *v: _overlapped(*v, False)}
    for f in runs.values():
        f(x, y, A, C, B, a.group, out)
    times: dict = {k: [] for k in runs}
    names = list(runs)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[name](x, y, A, C, B, a.group, out)
            times[name].append(time.perf_counter() - t0)
    bound = np.median(times["copy"])
    print(f"{a.dtype} ({A}, {C}, {B}), {x.nbytes / 1e6:.1f} MB, groups of {a.group}, 2 threads, "
          f"medians of {a.rounds} rounds")
    for name, v in times.items():
        v = np.array(v) * 1e3
        print(f"  {name:8s} {np.median(v):7.3f} ms  (p25-p75 {np.percentile(v, 25):.3f}-{np.percentile(v, 75):.3f})"
              f"  copy / this {bound * 1e3 / np.median(v):.2f}")


if __name__ == "__main__":
    main()
