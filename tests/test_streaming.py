"""Streaming-store passes give the same bits as ordinary stores.

Outputs of 16 MiB or more are written with streaming stores (``plan.streams``): channels-last passes in
line-aligned slabs of a thread's rows (``rows.act_slabs`` / ``grad_slabs``), channels-first rows with an
ordinary-store head and tail each. The STREAM flag is a compile-time flag of each kernel variant, so the
variants are called here directly on small inputs, at every offset of the data within a 64-byte line and
with channel counts that do and do not divide the slab length, against the same variant without
streaming stores.
"""
import numpy as np
import pytest
from conftest import at_line_offset

from fastbn._kernels import entries
from fastbn._kernels.plan import layout_of


def _at(n, offset, rng):
    """n float32 values starting ``offset`` elements past a 64-byte boundary."""
    a = at_line_offset(n, np.float32, 4 * offset)
    a[...] = rng.standard_normal(n)
    return a


# (A, C, B): channels-last with C dividing 512 or not, and a channels-first long-row shape
SHAPES = [(1500, 64, 1), (700, 100, 1), (333, 3, 1), (6, 8, 2100)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0, 3, 8])
def test_stream_flag_keeps_the_bits(shape, offset):
    A, C, B = shape
    n = A * C * B
    rng = np.random.default_rng(offset)
    x = _at(n, offset, rng).reshape(shape)
    dy = _at(n, (offset + 5) % 16, rng).reshape(shape)
    r = _at(n, offset, rng).reshape(shape)
    g = rng.uniform(0.5, 1.5, C)
    b = rng.uniform(-1, 1, C)
    cl, owned, short = layout_of(A, C, B)
    layout = dict(CL=cl, OWNED=owned, SHORT=short)
    clip = np.array([0.0, np.inf, np.inf])
    none = np.zeros(1)
    results = {}
    for stream in (False, True):
        y = _at(n, offset, rng).reshape(shape)
        stats = np.empty((5, C))
        entries.train.get(True, **layout, RELU=True, HAS_RES=True, RENORM=False, STREAM=stream)(
            2, x, r, y, g, b, 1e-5, none, none, clip, stats, 0, C)
        yi = _at(n, offset, rng).reshape(shape)
        entries.normalize.get(True, **layout, RELU=False, HAS_RES=False, STREAM=stream)(
            2, x, x, yi, stats[0], g, stats[1], b, 1e-5, True, 0, C)
        dx = _at(n, offset, rng).reshape(shape)
        dres = _at(n, offset, rng).reshape(shape)  # aligned like dx: streamed too
        dres2 = _at(n, (offset + 1) % 16, rng).reshape(shape)  # not aligned like dx: ordinary stores
        out = np.empty((2, C))
        bwd = entries.backward.get(True, **layout, RELU=True, WRITE_D=True, STREAM=stream)
        bwd(2, dy, x, y, dx, dres, stats[0], stats[2], g, False, out, 0, C)
        dx2 = _at(n, offset, rng).reshape(shape)
        bwd(2, dy, x, y, dx2, dres2, stats[0], stats[2], g, False, out, 0, C)
        results[stream] = (y.copy(), stats.copy(), yi.copy(), dx.copy(), dres.copy(), dx2.copy(), dres2.copy())
    names = ("train y", "train stats", "inference y", "dx", "dres", "dx (dres misaligned)", "dres misaligned")
    for name, plain, streamed in zip(names, results[False], results[True]):
        assert np.array_equal(plain, streamed, equal_nan=True), name
    # and the outputs are the real thing, not two equal wrong answers
    y, stats = results[True][0], results[True][1]
    red = (0, 2)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=red)
    var = x64.var(axis=red)
    ref = np.maximum((x64 - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5) * g[None, :, None]
                     + b[None, :, None] + r, 0)
    assert np.allclose(stats[0], mean, rtol=1e-10, atol=1e-12)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
