"""Bound kernels: parallel streams of exactly the bytes a BN kernel must move, to measure it against.

Each writer comes plain and with streaming stores (``intrin.stream_store``); the physical bound of a
case is the fastest of these and of torch's own copy (``fastbn.bench``). Work is split into one balanced
range per thread (a fixed 64 Ki-element block size left one thread with 4 blocks and the other with 3 on a
1.6 MB copy).
"""
from __future__ import annotations

from numba import prange

from fastbn._jit import driver, helper
from fastbn._kernels.intrin import num_threads, store_fence, stream_store
from fastbn._kernels.plan import task_range
from fastbn._kernels.rows import stream_span


@helper
def _copy_range(src, dst, stream):
    h, e = stream_span(dst) if stream else (dst.size, dst.size)
    for i in range(h):
        dst[i] = src[i]
    s = src[h:e]
    d = dst[h:e]
    for i in range(e - h):
        stream_store(d, i, s[i])
    for i in range(e, dst.size):
        dst[i] = src[i]
    if stream:
        store_fence()


@helper
def _add_range(a, b, dst, stream):
    h, e = stream_span(dst) if stream else (dst.size, dst.size)
    for i in range(h):
        dst[i] = a[i] + b[i]
    aa = a[h:e]
    bb = b[h:e]
    d = dst[h:e]
    for i in range(e - h):
        stream_store(d, i, aa[i] + bb[i])
    for i in range(e, dst.size):
        dst[i] = a[i] + b[i]
    if stream:
        store_fence()


@helper(reduction=True)
def _sum_range(a):
    s = 0.0
    for i in range(a.size):
        s += a[i]
    return s


@driver
def stream_copy(src, dst, stream):
    """dst[:] = src over flat arrays (read 1, write 1); ``stream``: streaming stores."""
    nt = num_threads()
    n = src.size
    for t in prange(nt):
        i0, i1 = task_range(t, nt, n)
        _copy_range(src[i0:i1], dst[i0:i1], stream)


@driver
def stream_add(a, b, dst, stream):
    """dst[:] = a + b over flat arrays (read 2, write 1); ``stream``: streaming stores."""
    nt = num_threads()
    n = a.size
    for t in prange(nt):
        i0, i1 = task_range(t, nt, n)
        _add_range(a[i0:i1], b[i0:i1], dst[i0:i1], stream)


@driver
def stream_read(a, out):
    """out[t] = sum of the t-th share of a flat array (read 1): the cost of one more read of an input."""
    nt = num_threads()
    n = a.size
    for t in prange(nt):
        i0, i1 = task_range(t, nt, n)
        out[t] = _sum_range(a[i0:i1])
