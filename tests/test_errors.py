"""Bad input gets a clear ValueError/TypeError naming the argument; running stats stay untouched."""
import numpy as np
import pytest

import fastbn

X = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)


def train(**kw):
    args = dict(x=X)
    args.update(kw)
    x = args.pop("x")
    return fastbn.batch_norm_train(x, **args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(x=np.float32(1.0)), TypeError, "x must be an array"),
    (dict(x=np.zeros(5, np.float32)), ValueError, "at least 2 dimensions"),
    (dict(x=np.zeros((4, 3), np.int32)), TypeError,
     "x must have dtype float32, float64, float16 or bfloat16, got int32"),
    (dict(x=np.zeros((4, 3), np.complex64)), TypeError, "complex64"),
    (dict(x=np.zeros((4, 3), object)), TypeError, "object"),
    (dict(x=np.zeros((4, 3), np.uint16)), TypeError, "uint16"),
    (dict(axis=3), ValueError, "axis 3 is out of range"),
    (dict(axis=-4), ValueError, "axis -4 is out of range"),
    (dict(axis=1.0), TypeError, "axis must be an int"),
    (dict(gamma=np.ones(4)), ValueError, r"gamma must have shape \(3,\)"),
    (dict(beta=np.ones((3, 1))), ValueError, "beta must have shape"),
    (dict(gamma=np.ones(3, np.int64)), TypeError, "gamma must be a float array"),
    (dict(eps=0.0), ValueError, "eps must be a positive"),
    (dict(eps=-1e-5), ValueError, "eps must be a positive"),
    (dict(eps=float("nan")), ValueError, "eps must be a positive"),
    (dict(eps="1e-5"), TypeError, "eps must be a positive float"),
    (dict(running_mean=np.zeros(3), running_var=np.ones(3), momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(running_mean=np.zeros(3), running_var=np.ones(3), momentum=None), TypeError, "momentum"),
    (dict(running_mean=np.zeros(3)), ValueError, "running_mean and running_var must be given together"),
    (dict(running_mean=np.zeros(4), running_var=np.ones(4)), ValueError, "running_mean must have shape"),
    (dict(running_mean=[0.0] * 3, running_var=[1.0] * 3), TypeError, "updated in place"),
    (dict(x=np.zeros((0, 3, 5), np.float32)), ValueError, "empty"),
    (dict(x=np.zeros((1, 3), np.float32)), ValueError, "Expected more than 1 value per channel when training"),
    (dict(x=np.zeros((1, 3, 1, 1), np.float32)), ValueError, "Expected more than 1 value per channel"),
    (dict(out=np.empty((4, 3, 6), np.float32)), ValueError, "out must have shape"),
    (dict(out=np.empty((4, 3, 5), np.float64)), TypeError, "out must have dtype float32"),
    (dict(out=[0.0]), TypeError, "out must be a numpy array"),
])
def test_train_bad_input(kw, exc, match):
    rm_before = None
    if isinstance(kw.get("running_mean"), np.ndarray):
        rm_before = kw["running_mean"].copy()
    with pytest.raises(exc, match=match):
        train(**kw)
    if rm_before is not None:
        assert np.array_equal(kw["running_mean"], rm_before)


def test_read_only_out_and_partial_overlap():
    out = np.empty_like(X)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        fastbn.batch_norm_train(X, out=out)
    big = np.zeros((5, 3, 5), np.float32)
    with pytest.raises(ValueError, match="partially overlaps"):
        fastbn.batch_norm_train(big[:4], out=big[1:])


def test_running_stats_untouched_on_failure():
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    bad_ro = np.ones(3)
    bad_ro.flags.writeable = False
    with pytest.raises(ValueError, match="running_var must be writeable"):
        fastbn.batch_norm_train(X, running_mean=rm, running_var=bad_ro)
    with pytest.raises(ValueError, match="out must have shape"):
        fastbn.batch_norm_train(X, running_mean=rm, running_var=rv, out=np.empty((2, 2), np.float32))
    with pytest.raises(ValueError, match="gamma"):
        fastbn.batch_norm_train(X, np.ones(2), running_mean=rm, running_var=rv)
    with pytest.raises(ValueError, match="Expected more than 1"):
        fastbn.batch_norm_train(X[:1, :, :1], running_mean=rm, running_var=rv)
    assert np.array_equal(rm, np.full(3, 0.5)) and np.array_equal(rv, np.full(3, 2.0))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastbn.batch_norm_backward(np.ones((4, 3, 4), np.float32), X, np.zeros(3), np.ones(3)),
     ValueError, "dy must have x's shape"),
    (lambda: fastbn.batch_norm_backward(np.ones_like(X, np.float64), X, np.zeros(3), np.ones(3)),
     TypeError, "dy must have x's dtype"),
    (lambda: fastbn.batch_norm_backward(np.ones_like(X), X, np.zeros(2), np.ones(3)), ValueError,
     r"mean must have shape \(3,\)"),
    (lambda: fastbn.batch_norm_backward(np.ones_like(X), X, np.zeros(3), np.ones(4)), ValueError,
     r"invstd must have shape \(3,\)"),
    (lambda: fastbn.batch_norm_backward(np.ones_like(X), X, np.zeros(3), np.ones(3), out=np.empty(3)),
     ValueError, "out must have shape"),
    (lambda: fastbn.batch_norm_infer(X, np.zeros(3), np.ones(5)), ValueError, "running_var must have shape"),
    (lambda: fastbn.batch_norm_infer(X, None, np.ones(3)), TypeError, "running_mean is required"),
    (lambda: fastbn.batch_norm_infer(X, np.zeros(3, np.int8), np.ones(3)), TypeError, "running_mean must be a float"),
    (lambda: fastbn.batch_norm_infer(X, np.zeros(3), np.ones(3), eps=0), ValueError, "eps"),
    (lambda: fastbn.batch_norm_infer(np.zeros((0, 3)), np.zeros(3), np.ones(3)), ValueError, "empty"),
    (lambda: fastbn.batch_norm_infer(X, np.zeros(3), np.ones(3), out=np.empty_like(X, np.float64)),
     TypeError, "out must have dtype"),
    (lambda: fastbn.batch_norm_backward_frozen(np.ones_like(X), X, np.zeros(3), np.ones(3), eps=-1), ValueError,
     "eps"),
])
def test_backward_and_infer_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_kernel_checks_shapes_from_python():
    from fastbn import kernels
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="length C"):
        kernels.infer_forward(x, np.zeros(2), np.ones(3), np.ones(3), np.zeros(3), 1e-5, np.empty_like(x))


def test_inference_allows_a_single_value_per_channel():
    y = fastbn.batch_norm_infer(np.ones((1, 3), np.float32), np.zeros(3), np.ones(3), eps=1e-12)
    assert np.allclose(y, 1.0)
