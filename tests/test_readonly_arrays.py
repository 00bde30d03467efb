"""Read-only arrays are everyday input (np.frombuffer, memory maps, onnx.numpy_helper.to_array,
np.broadcast_to): every public function takes them for x, dy, y, residual and the per-channel
parameters, without copying x, and gives the same bits as with writable arrays (issue 10, item 1)."""
import numpy as np
import pytest

import fastbn
from fastbn import kernels


def _ro(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


@pytest.fixture(params=[(6, 5, 4, 3), (40, 7)], ids=["NCHW", "NC"])
def data(request):
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, request.param).astype(np.float32)
    C = x.shape[1]
    return {"x": x, "dy": rng.normal(size=x.shape).astype(np.float32), "res": rng.normal(size=x.shape).astype(np.float32),
            "g": rng.uniform(0.5, 1.5, C), "b": rng.uniform(-1, 1, C), "rm": rng.normal(size=C),
            "rv": rng.uniform(0.5, 2.0, C), "C": C}


def test_functional_api_takes_read_only_inputs(data):
    d = data
    ro = {k: _ro(v) for k, v in d.items() if k != "C"}
    y, m, s = fastbn.batch_norm_train(ro["x"], ro["g"], ro["b"])
    y0, m0, s0 = fastbn.batch_norm_train(d["x"], d["g"], d["b"])
    assert np.array_equal(y, y0) and np.array_equal(m, m0) and np.array_equal(s, s0)
    rm, rv = d["rm"].copy(), d["rv"].copy()
    fastbn.batch_norm_train(ro["x"], ro["g"], ro["b"], running_mean=rm, running_var=rv)
    assert not np.array_equal(rm, d["rm"])  # updated
    assert np.array_equal(fastbn.batch_norm_infer(ro["x"], ro["rm"], ro["rv"], ro["g"], ro["b"]),
                          fastbn.batch_norm_infer(d["x"], d["rm"], d["rv"], d["g"], d["b"]))
    r = fastbn.batch_norm_backward(ro["dy"], ro["x"], _ro(m0), _ro(s0), ro["g"])
    r0 = fastbn.batch_norm_backward(d["dy"], d["x"], m0, s0, d["g"])
    assert all(np.array_equal(a, b) for a, b in zip(r, r0))
    f = fastbn.batch_norm_backward_frozen(ro["dy"], ro["x"], ro["rm"], ro["rv"], ro["g"])
    f0 = fastbn.batch_norm_backward_frozen(d["dy"], d["x"], d["rm"], d["rv"], d["g"])
    assert all(np.array_equal(a, b) for a, b in zip(f, f0))


def test_fused_api_takes_read_only_inputs(data):
    d = data
    ro = {k: _ro(v) for k, v in d.items() if k != "C"}
    y, m, s = fastbn.batch_norm_relu_train(ro["x"], ro["g"], ro["b"], residual=ro["res"])
    y0, m0, s0 = fastbn.batch_norm_relu_train(d["x"], d["g"], d["b"], residual=d["res"])
    assert np.array_equal(y, y0)
    assert np.array_equal(fastbn.batch_norm_relu_infer(ro["x"], ro["rm"], ro["rv"], ro["g"], ro["b"], residual=ro["res"]),
                          fastbn.batch_norm_relu_infer(d["x"], d["rm"], d["rv"], d["g"], d["b"], residual=d["res"]))
    r = fastbn.batch_norm_relu_backward(ro["dy"], ro["x"], _ro(y0), _ro(m0), _ro(s0), ro["g"], residual=True)
    r0 = fastbn.batch_norm_relu_backward(d["dy"], d["x"], y0, m0, s0, d["g"], residual=True)
    assert all(np.array_equal(a, b) for a, b in zip(r, r0))


def test_layer_takes_read_only_x_and_dy(data):
    d = data
    bn, bn0 = fastbn.BatchNorm(d["C"], activation="relu"), fastbn.BatchNorm(d["C"], activation="relu")
    assert np.array_equal(bn(_ro(d["x"]), _ro(d["res"])), bn0(d["x"], d["res"]))
    assert np.array_equal(bn.backward(_ro(d["dy"])), bn0.backward(d["dy"]))
    bn.eval(), bn0.eval()
    assert np.array_equal(bn(_ro(d["x"])), bn0(d["x"]))


def test_views_of_read_only_memory_are_not_copied():
    buf = np.arange(2 * 3 * 4 * 5, dtype=np.float32).tobytes()
    x = np.frombuffer(buf, np.float32).reshape(2, 3, 4, 5)  # read-only, no copy
    b = np.broadcast_to(np.linspace(0.0, 1.0, 3), (3,))     # read-only parameter view
    y = fastbn.batch_norm_infer(x, np.zeros(3), np.ones(3), b, b)
    ref = (x.astype(np.float64) / np.sqrt(1 + 1e-5)) * b[None, :, None, None] + b[None, :, None, None]
    assert np.abs(y - ref).max() < 1e-5
    from fastbn._validate import resolve_layout
    v = resolve_layout(x, 1).view(x)
    assert np.shares_memory(v, x) and v.flags.writeable  # the kernel view aliases x, no copy


def test_numba_kernels_take_read_only_arrays():
    x = _ro(np.random.default_rng(0).normal(size=(8, 3, 10)))
    y = np.empty_like(x)
    mean, invstd = np.empty(3), np.empty(3)
    kernels.train_forward_serial(x, _ro(np.ones(3)), _ro(np.zeros(3)), 1e-5, y, mean, invstd, np.empty(0),
                                 np.empty(0), 0.1, False)
    assert np.array_equal(y, fastbn.batch_norm_train(np.array(x)).y)
