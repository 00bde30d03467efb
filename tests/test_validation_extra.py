"""Hostile but plausible input across the public API: negative running variances, aliased buffers,
ndarray subclasses, flags given as strings, numbers too large for a float.

Each either gets a clear ValueError/TypeError naming the argument, or the right result (checked against
the float64 NumPy reference in naive.py), never a silently wrong one or a Numba traceback.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastbn
import naive
import naive_layer
from conftest import assert_close
from fastbn import fold

RNG = np.random.default_rng(0)
X = RNG.normal(2.0, 3.0, (6, 3, 5))
DY = RNG.normal(size=X.shape)
G = np.array([0.5, 1.5, -2.0])
B = np.array([0.1, -0.2, 0.3])
RM = np.array([1.0, 2.0, 3.0])
RV = np.array([0.5, 4.0, 9.0])
HUGE = 10**400  # an int no float can hold


class OneRank:
    """A communicator of one rank (what fastbn.distributed needs of one)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        recv[...] = np.asarray(send).reshape(recv.shape)


# ------------------------------------------------------------------------ negative running variance

NEG = np.array([1.0, -0.5, 2.0])


@pytest.mark.parametrize("call", [
    lambda: fastbn.batch_norm_infer(X, RM, NEG),
    lambda: fastbn.batch_norm_relu_infer(X, RM, NEG),
    lambda: fastbn.batch_norm_backward_frozen(DY, X, RM, NEG),
    lambda: fastbn.batch_norm_infer(X, RM, np.full(3, -1e-5), eps=1e-5),  # exactly zero
], ids=["infer", "relu_infer", "backward_frozen", "var_plus_eps_zero"])
def test_negative_running_var_raises(call):
    with pytest.raises(ValueError, match=r"running_var \+ eps must be positive.*channel 1|channel 0"):
        call()


@pytest.mark.parametrize("cls", [fastbn.BatchNorm, lambda C: fastbn.BatchNorm(C, activation="relu")])
def test_layer_eval_with_negative_running_var_raises(cls):
    bn = cls(3)
    bn.running_var[1] = -0.5
    bn.eval()
    with pytest.raises(ValueError, match=r"running_var \+ eps must be positive; channel 1|channel 1"):
        bn(X.astype(np.float32))
    assert bn._saved is None


def test_positive_running_var_still_works():
    assert_close(fastbn.batch_norm_infer(X, RM, RV, G, B), naive.infer_forward(X, RM, RV, G, B), 1e-12)


# ---------------------------------------------------------------------------- running stats aliasing

def _train_calls():
    return [
        lambda **kw: fastbn.batch_norm_train(X, **kw),
        lambda **kw: fastbn.batch_norm_relu_train(X, **kw),
    ]


@pytest.mark.parametrize("train", _train_calls(), ids=["train", "relu_train"])
def test_running_stats_sharing_memory_are_refused(train):
    buf = np.arange(6.0)
    rm = np.zeros(3)
    for kw in [dict(running_mean=rm, running_var=rm),               # the same array
               dict(running_mean=buf[:3], running_var=buf[2:5]),    # overlapping views
               dict(running_mean=buf[0::2], running_var=buf[0:3])]:  # interleaved, overlapping
        before = buf.copy(), rm.copy()
        with pytest.raises(ValueError, match="share memory"):
            train(**kw)
        assert np.array_equal(buf, before[0]) and np.array_equal(rm, before[1])  # untouched


@pytest.mark.parametrize("train", _train_calls(), ids=["train", "relu_train"])
def test_running_stats_in_disjoint_views_of_one_buffer_work(train):
    """A packed parameter buffer (adjacent or interleaved views that do not overlap) is fine."""
    for layout in ("adjacent", "interleaved"):
        buf = np.tile(np.array([0.0, 1.0]), 3) if layout == "interleaved" else np.r_[np.zeros(3), np.ones(3)]
        rm, rv = (buf[0::2], buf[1::2]) if layout == "interleaved" else (buf[:3], buf[3:])
        train(running_mean=rm, running_var=rv, momentum=0.5)
        _, mean, _, var, n = naive.train_forward(X, axis=1)
        erm, erv = naive.running_update(np.zeros(3), np.ones(3), mean, var, n, 0.5)
        assert_close(rm, erm, 1e-12, layout)
        assert_close(rv, erv, 1e-12, layout)


def test_running_stats_sharing_memory_with_x_or_out_are_refused():
    x = X.copy()
    out = np.empty_like(X)
    for rm in (x[0, :, 0], out[0, :, 0]):
        with pytest.raises(ValueError, match="running_mean shares memory with x or out"):
            fastbn.batch_norm_train(x, running_mean=rm, running_var=np.ones(3), out=out)


# ----------------------------------------------------------------- per-channel inputs aliasing out=

def _alias(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A (C,) view into out's memory holding ``values``."""
    v = out.reshape(-1)[: values.size]
    v[...] = values
    return v


def test_vectors_that_are_views_into_out_give_the_right_result():
    """gamma, beta, running statistics, mean, invstd read from out's own memory (as a packed workspace
    would): the result must be as if they were separate (they are copied before the kernel writes)."""
    ref_infer = naive.infer_forward(X, RM, RV, G, B)
    for name in ("gamma", "beta", "running_mean", "running_var"):
        for fn, ref in ((fastbn.batch_norm_infer, ref_infer),
                        (fastbn.batch_norm_relu_infer, np.maximum(ref_infer, 0))):
            out = np.empty_like(X)
            args = dict(running_mean=RM, running_var=RV, gamma=G, beta=B)
            args[name] = _alias(out, args[name])
            y = fn(X, out=out, **args)
            assert y is out
            assert_close(y, ref, 1e-12, f"{fn.__name__}, {name} in out")

    ry = naive.train_forward(X, G, B, axis=1)[0]
    for name in ("gamma", "beta"):
        for fn, ref in ((fastbn.batch_norm_train, ry), (fastbn.batch_norm_relu_train, np.maximum(ry, 0))):
            out = np.empty_like(X)
            args = dict(gamma=G, beta=B)
            args[name] = _alias(out, args[name])
            assert_close(fn(X, out=out, **args).y, ref, 1e-12, f"{fn.__name__}, {name} in out")

    _, mean, invstd, _, _ = naive.train_forward(X, axis=1)
    rdx = naive.backward(DY, X, mean, invstd, G, axis=1)[0]
    for name in ("mean", "invstd", "gamma"):
        out = np.empty_like(X)
        args = dict(mean=mean, invstd=invstd, gamma=G)
        args[name] = _alias(out, args[name])
        dx = fastbn.batch_norm_backward(DY, X, args["mean"], args["invstd"], args["gamma"], out=out).dx
        assert_close(dx, rdx, 1e-12, f"backward, {name} in out")


def test_vector_in_a_wide_dense_out_is_copied():
    """Dense (2, C) with C beyond one kernel call's channel window (plan.CHANNEL_WINDOW): a gamma that
    lies in out= itself, straddling its rows, would be overwritten by the first window's output before
    the second window reads it, unless it is copied first (the kernels copy their per-channel inputs
    before they write, so only a second window can see the damage). The backward's mean and invstd,
    rows of the one statistics array the training forward returned, are read as they are."""
    from fastbn._kernels.plan import CHANNEL_WINDOW
    C = CHANNEL_WINDOW + 1000
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, (2, C))
    rm, rv, g, b = rng.normal(size=C), rng.uniform(0.5, 2.0, C), rng.normal(size=C), rng.normal(size=C)
    ref = naive.infer_forward(x, rm, rv, g, b)
    for name in ("gamma", "running_var"):
        out = np.empty_like(x)
        args = dict(running_mean=rm, running_var=rv, gamma=g, beta=b)
        view = out.reshape(-1)[5:5 + C]                                  # row 0 from column 5, into row 1
        view[...] = args[name]
        args[name] = view
        assert_close(fastbn.batch_norm_infer(x, out=out, **args), ref, 1e-12, f"{name} in out")
    st = fastbn.batch_norm_train(x)
    assert st.mean.base is not None and st.mean.base is st.invstd.base  # rows of one statistics array
    dy = rng.normal(size=x.shape)
    rdx = naive.backward(dy, x, st.mean, st.invstd, g, axis=1)[0]
    assert_close(fastbn.batch_norm_backward(dy, x, st.mean, st.invstd, g, out=np.empty_like(x)).dx, rdx, 1e-12)


def test_gamma_view_into_x_with_in_place_out():
    x = X.copy()
    g = _alias(x[5:], G)  # the last sample's first values hold gamma
    ref = naive.infer_forward(x, RM, RV, G, B)
    fastbn.batch_norm_infer(x, RM, RV, g, B, out=x)
    assert_close(x, ref, 1e-12)


def test_relu_backward_vectors_in_residual_out():
    y = np.maximum(naive.train_forward(X, axis=1)[0], 0)
    _, mean, invstd, _, _ = naive.train_forward(X, axis=1)
    rdx, _, _, rres = naive_layer.relu_backward(DY, X, y, mean, invstd, G, axis=1)
    dres = np.empty_like(X)
    g = _alias(dres, G)
    dx, _, _, got_res = fastbn.batch_norm_relu_backward(DY, X, y, mean, invstd, g, residual_out=dres)
    assert_close(dx, rdx, 1e-12)
    assert_close(got_res, rres, 1e-12)


# ---------------------------------------------------------------------------------- ndarray subclasses

@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself
def test_matrix_inputs_and_outputs():
    x = np.asmatrix(X[:, :, 0])  # (N, C) as np.matrix
    x2 = np.asarray(x)
    y, mean, invstd = fastbn.batch_norm_train(x)
    assert_close(y, naive.train_forward(x2, axis=1)[0], 1e-12)
    assert_close(fastbn.batch_norm_infer(x, RM, RV), naive.infer_forward(x2, RM, RV), 1e-12)
    dx = fastbn.batch_norm_backward(np.asmatrix(DY[:, :, 0]), x, mean, invstd).dx
    assert_close(dx, naive.backward(DY[:, :, 0], x2, mean, invstd, axis=1)[0], 1e-12)
    out = np.asmatrix(np.empty_like(x2))
    assert fastbn.batch_norm_infer(x, RM, RV, out=out) is out
    assert_close(np.asarray(out), naive.infer_forward(x2, RM, RV), 1e-12)
    bn = fastbn.BatchNorm(3, dtype=np.float64)
    assert_close(bn(x), naive.train_forward(x2, axis=1)[0], 1e-12)


def test_memmap_input(tmp_path):
    m = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float64, shape=X.shape)
    m[...] = X
    assert_close(fastbn.batch_norm_train(m).y, naive.train_forward(X, axis=1)[0], 1e-12)


# ---------------------------------------------------------------------------------- flags and numbers

@pytest.mark.parametrize("name,call", [
    ("frozen", lambda v: fastbn.batch_norm_backward(DY, X, RM, RV, frozen=v)),
    ("frozen", lambda v: fastbn.batch_norm_relu_backward(DY, X, X, RM, RV, frozen=v)),
    ("residual", lambda v: fastbn.batch_norm_relu_backward(DY, X, X, RM, RV, residual=v)),
    ("affine", lambda v: fastbn.BatchNorm(3, affine=v)),
    ("center", lambda v: fastbn.BatchNorm(3, center=v)),
    ("scale", lambda v: fastbn.BatchNorm(3, scale=v)),
    ("track_running_stats", lambda v: fastbn.BatchNorm(3, track_running_stats=v)),
    ("renorm", lambda v: fastbn.BatchNorm(3, renorm=v)),
    ("training", lambda v: fastbn.BatchNorm(3)(X, training=v)),
    ("mode", lambda v: fastbn.BatchNorm(3).train(v)),
    ("training", lambda v: fastbn.SyncBatchNorm(3, OneRank())(X, training=v)),
    ("unbiased", lambda v: fastbn.precise_statistics([X], unbiased=v)),
    ("transposed", lambda v: fold.fold_conv(np.ones((2, 2, 1)), None, None, None, np.zeros(2), np.ones(2),
                                            transposed=v)),
    ("depthwise", lambda v: fold.fold_conv_keras(np.ones((1, 1, 2)), None, None, None, np.zeros(2),
                                                 np.ones(2), depthwise=v)),
])
def test_flags_must_be_bools(name, call):
    none_means_default = name in ("center", "scale", "training")
    for bad in ("no", "False", 1) + (() if none_means_default else (None,)):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            call(bad)
    call(False)
    call(np.bool_(True))


@pytest.mark.parametrize("name,call", [
    ("eps", lambda v: fastbn.batch_norm_train(X, eps=v)),
    ("eps", lambda v: fastbn.batch_norm_infer(X, RM, RV, eps=v)),
    ("eps", lambda v: fastbn.batch_norm_relu_infer(X, RM, RV, eps=v)),
    ("eps", lambda v: fastbn.batch_norm_relu_train(X, eps=v)),
    ("eps", lambda v: fastbn.batch_norm_backward_frozen(DY, X, RM, RV, eps=v)),
    ("momentum", lambda v: fastbn.batch_norm_train(X, running_mean=np.zeros(3), running_var=np.ones(3),
                                                   momentum=v)),
    ("eps", lambda v: fastbn.BatchNorm(3, eps=v)),
    ("momentum", lambda v: fastbn.BatchNorm(3, momentum=v)),
    ("renorm_momentum", lambda v: fastbn.BatchNorm(3, renorm=True, renorm_momentum=v)),
    ("renorm_clipping", lambda v: fastbn.BatchNorm(3, renorm=True, renorm_clipping={"rmax": v})),
    ("eps", lambda v: fold.bn_to_affine(None, None, np.zeros(2), np.ones(2), eps=v)),
    ("eps", lambda v: fold.fold_dense(np.ones((2, 2)), None, None, None, np.zeros(2), np.ones(2), eps=v)),
])
def test_numbers_too_large_for_a_float_are_value_errors(name, call):
    with pytest.raises(ValueError, match=f"{name}.*too large for a float"):
        call(HUGE)
