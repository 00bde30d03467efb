"""Statistics primitives: partial_stats against a float64 NumPy reference, and merge_stats' exactness."""
import numpy as np
import pytest

import fastbn
from conftest import assert_close
from fastbn.stats import Stats


def reference(x, axis):
    """(count, mean, m2) in float64, two-pass over the channel-last flattening."""
    x2 = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])
    mean = x2.mean(axis=0) if x2.shape[0] else np.zeros(x2.shape[1])
    return x2.shape[0], mean, ((x2 - mean) ** 2).sum(axis=0)


def layouts(rng, dtype):
    """(array, axis) pairs: every kind of layout the kernels see, including copies of strided views."""
    base = (rng.normal(0, 2, (6, 5, 7, 4)) + rng.uniform(-50, 50, (1, 5, 1, 1))).astype(dtype)
    nhwc = np.ascontiguousarray(base.transpose(0, 2, 3, 1))
    yield "NCHW", base, 1
    yield "NHWC", nhwc, -1
    yield "NHWC-view", base.transpose(0, 2, 3, 1), 3
    yield "NC", base[:, :, 0, 0].copy(), 1
    yield "NCL", base[:, :, :, 0].copy(), 1
    yield "fortran", np.asfortranarray(base), 1
    yield "strided", base[::2, :, 1:, ::3], 1
    yield "big-few-channels", (rng.normal(5, 1, (1500, 3, 4, 4))).astype(dtype), 1
    yield "big-channels-last", (rng.normal(5, 1, (20000, 3))).astype(dtype), 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_partial_stats_matches_reference(dtype):
    rng = np.random.default_rng(0)
    for name, x, axis in layouts(rng, dtype):
        s = fastbn.partial_stats(x, axis=axis)
        n, mean, m2 = reference(x, axis)
        assert isinstance(s, Stats)
        assert all(a.dtype == np.float64 and a.shape == (x.shape[axis],) for a in s)
        assert np.all(s.count == n), name
        assert_close(s.mean, mean, 1e-12, f"{name} mean")
        assert_close(s.m2, m2, 1e-12, f"{name} m2")
        assert_close(s.var, m2 / n, 1e-12, f"{name} var")
        assert_close(s.var_unbiased, m2 / (n - 1), 1e-12, f"{name} var_unbiased")


@pytest.mark.parametrize("shape,axis", [((40, 64, 9, 9), 1), ((1500, 3, 4, 4), 1), ((40, 9, 9, 64), -1),
                                        ((20000, 3), 1)])
def test_partial_stats_are_the_training_statistics(shape, axis, threads):
    """Bitwise the statistics batch_norm_train normalizes with, for any thread count."""
    x = np.random.default_rng(1).normal(3, 2, shape).astype(np.float32)
    _, mean, invstd = fastbn.batch_norm_train(x, axis=axis)
    results = []
    for t in (1, 2):
        threads(t)
        results.append(fastbn.partial_stats(x, axis=axis))
    for s in results:
        assert np.array_equal(s.mean, mean)
        assert np.array_equal(1.0 / np.sqrt(s.m2 / s.count + 1e-5), invstd)
    assert all(np.array_equal(a, b) for a, b in zip(*results))


def test_empty_and_constant():
    s = fastbn.partial_stats(np.zeros((0, 3, 4, 4), np.float32))
    assert np.array_equal(s.count, [0, 0, 0]) and not s.mean.any() and not s.m2.any()
    assert np.isnan(s.var).all() and np.isnan(s.var_unbiased).all()
    c = fastbn.partial_stats(np.full((5, 2, 3), 1e7, np.float32))
    assert np.array_equal(c.mean, [1e7, 1e7]) and np.array_equal(c.m2, [0.0, 0.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_equals_concatenation(dtype):
    rng = np.random.default_rng(2)
    x = (rng.normal(0, 1, (60, 4, 3)) + np.array([1e6, -3.0, 0.0, 1e-3])[None, :, None]).astype(dtype)
    cuts = [0, 0, 7, 8, 8, 30, 59, 60]  # empty pieces, a single sample, uneven sizes
    parts = [fastbn.partial_stats(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    s = fastbn.merge_stats([p.count for p in parts], [p.mean for p in parts], [p.m2 for p in parts])
    n, mean, m2 = reference(x, 1)
    assert np.all(s.count == n)
    assert_close(s.mean, mean, 1e-12, "mean")
    assert_close(s.m2, m2, 1e-11, "m2")
    # any other order: equal to rounding
    order = rng.permutation(len(parts))
    s2 = fastbn.merge_stats(*(np.stack([getattr(parts[i], f) for i in order]) for f in ("count", "mean", "m2")))
    assert_close(s2.mean, s.mean, 1e-12)
    assert_close(s2.m2, s.m2, 1e-11)


def test_merge_is_exact_where_naive_sums_cancel():
    # E[x^2] - E[x]^2 loses everything at this offset; Chan's merge keeps the variance
    rng = np.random.default_rng(3)
    x = 1e9 + rng.normal(0, 1, (4000, 1))
    parts = [fastbn.partial_stats(x[i:i + 500]) for i in range(0, 4000, 500)]
    s = fastbn.merge_stats([p.count for p in parts], [p.mean for p in parts], [p.m2 for p in parts])
    ref = (x - x.mean()).var(axis=0)
    assert_close(s.var, ref, 1e-6)  # the means themselves carry float64 rounding of 1e9 (~6e-8)
    naive = (x ** 2).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.abs(naive - ref).max() > 1.0


def test_zero_count_partials_change_nothing():
    rng = np.random.default_rng(4)
    a = fastbn.partial_stats(rng.normal(size=(5, 3)))
    b = fastbn.partial_stats(rng.normal(size=(9, 3)))
    garbage = Stats(np.zeros(3), np.full(3, np.nan), np.full(3, np.inf))
    ab = fastbn.merge_stats([a.count, b.count], [a.mean, b.mean], [a.m2, b.m2])
    agb = fastbn.merge_stats([garbage.count, a.count, garbage.count, b.count],
                             [garbage.mean, a.mean, garbage.mean, b.mean], [garbage.m2, a.m2, garbage.m2, b.m2])
    assert all(np.array_equal(u, v) for u, v in zip(ab, agb))
    only = fastbn.merge_stats([a.count], [a.mean], [a.m2])
    assert all(np.array_equal(u, v) for u, v in zip(only, a))
    nothing = fastbn.merge_stats([0, 0], np.ones((2, 3)), np.ones((2, 3)))
    assert not nothing.count.any() and not nothing.mean.any() and not nothing.m2.any()


def test_count_shapes_and_gathered_round_trip():
    rng = np.random.default_rng(5)
    parts = [fastbn.partial_stats(rng.normal(size=(n, 2))) for n in (3, 4, 5)]
    means = np.stack([p.mean for p in parts])
    m2s = np.stack([p.m2 for p in parts])
    by_scalar = fastbn.merge_stats([3, 4, 5], means, m2s)
    by_vector = fastbn.merge_stats(np.array([3, 4, 5]), list(means), list(m2s))
    by_matrix = fastbn.merge_stats(np.stack([p.count for p in parts]), means, m2s)
    gathered = np.stack([p.to_array() for p in parts])  # what an all-gather of (3, C) arrays returns
    assert gathered.shape == (3, 3, 2) and gathered.dtype == np.float64
    by_gather = Stats.from_gathered(gathered)
    for other in (by_vector, by_matrix, by_gather):
        assert all(np.array_equal(u, v) for u, v in zip(by_scalar, other))


@pytest.mark.parametrize("args,exc,match", [
    (([], [], []), ValueError, "at least one partial"),
    (([1, 2], np.zeros((2, 3)), np.zeros((2, 4))), ValueError, r"m2s must have means' shape \(2, 3\)"),
    (([1, 2, 3], np.zeros((2, 3)), np.zeros((2, 3))), ValueError, "counts must have shape"),
    (([1, -2], np.zeros((2, 3)), np.zeros((2, 3))), ValueError, "non-negative"),
    (([1, np.nan], np.zeros((2, 3)), np.zeros((2, 3))), ValueError, "finite"),
    (([1, 2], np.zeros((2, 3)), -np.ones((2, 3))), ValueError, "m2s must be non-negative"),
    (([1, 2], "means", np.zeros((2, 3))), TypeError, "means must be an array"),
    (([1, 2], np.zeros((2, 3), complex), np.zeros((2, 3))), TypeError, "means must be a float array"),
    (([1, 2], np.zeros(3), np.zeros(3)), ValueError, r"means must have shape \(P, C\)"),
    (([1, 2], [np.zeros(3), np.zeros(4)], np.zeros((2, 3))), ValueError, "same shape"),
])
def test_merge_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        fastbn.merge_stats(*args)


@pytest.mark.parametrize("x,kw,exc,match", [
    (np.zeros(5, np.float32), {}, ValueError, "at least 2 dimensions"),
    (np.zeros((4, 3), np.int64), {}, TypeError, "float32, float64, float16 or bfloat16"),
    (None, {}, TypeError, "x must be an array"),
    (np.zeros((4, 3)), {"axis": 2}, ValueError, "out of range"),
    (np.zeros((4, 3)), {"axis": 1.0}, TypeError, "axis must be an int"),
])
def test_partial_stats_bad_input(x, kw, exc, match):
    with pytest.raises(exc, match=match):
        fastbn.partial_stats(x, **kw)


def test_from_gathered_bad_shape():
    with pytest.raises(ValueError, match=r"\(P, 3, C\)"):
        Stats.from_gathered(np.zeros((2, 2, 3)))
