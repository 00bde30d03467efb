"""Fused BN + ReLU and BN + residual + ReLU (fastbn.batch_norm_relu_*) against the float64 reference."""
import numpy as np
import pytest

import fastbn
import naive
import naive_layer as ref
from conftest import RTOL, assert_close

# (logical NCHW-like shape, layout): NHWC arrays are channels-last (axis=-1); shapes cover the
# channels-first per-channel path, the few-channel split path (C < 16, several chunks), multi-chunk
# channels-last, dense and 1-D spatial inputs
SHAPES = [((4, 6, 5, 7), "NCHW"), ((4, 6, 5, 7), "NHWC"), ((64, 24), "NC"), ((64, 4, 300), "NCHW"),
          ((3000, 24), "NC"), ((20, 16, 2000), "NCHW"), ((6, 20, 9), "NHWC")]


def _make(shape, layout, dtype, seed):
    rng = np.random.default_rng(seed)
    arr_shape = (shape[0], *shape[2:], shape[1]) if layout == "NHWC" else shape
    axis = -1 if layout == "NHWC" else 1
    C = shape[1]
    x = rng.normal(0.3, 2.0, arr_shape).astype(dtype)
    return dict(x=x, axis=axis, C=C, g=rng.uniform(0.5, 1.5, C), b=rng.normal(0, 0.5, C),
                res=rng.normal(0, 1.0, arr_shape).astype(dtype), dy=rng.normal(size=arr_shape).astype(dtype))


@pytest.mark.parametrize("with_res", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,layout", SHAPES, ids=[f"{lay}-{'x'.join(map(str, s))}" for s, lay in SHAPES])
def test_train_forward_and_backward_match_reference(shape, layout, dtype, with_res):
    d = _make(shape, layout, dtype, seed=1)
    x, ax, res = d["x"], d["axis"], (d["res"] if with_res else None)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, d["g"], d["b"], residual=res, axis=ax)
    ry, rmean, rinv, _, _ = ref.relu_train(x, d["g"], d["b"], axis=ax, residual=res)
    tol = RTOL[dtype]
    assert y.dtype == x.dtype and y.shape == x.shape and y.min() >= 0
    assert_close(y, ry, tol, "y")
    assert_close(mean, rmean, 1e-12, "mean")
    assert_close(invstd, rinv, 1e-12 if dtype == "float64" else 1e-10, "invstd")
    dx, dg, db, dres = fastbn.batch_norm_relu_backward(d["dy"], x, y, mean, invstd, d["g"], axis=ax,
                                                       residual=with_res)
    # the reference masks with fastbn's own y, so the comparison is about the arithmetic, not about
    # values within rounding of zero that could fall on either side of the mask
    rdx, rdg, rdb, rres = ref.relu_backward(d["dy"], x, y, mean, invstd, d["g"], axis=ax)
    assert_close(dx, rdx, tol, "dx")
    assert_close(dg, rdg, tol, "dgamma")
    assert_close(db, rdb, tol, "dbeta")
    if with_res:
        assert dres.dtype == x.dtype
        assert np.array_equal(dres, rres.astype(dtype)), "d_residual is dy masked by y > 0, exactly"
    else:
        assert dres is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_inference_and_frozen_backward_match_reference(layout, dtype):
    d = _make((6, 5, 4, 3), layout, dtype, seed=2)
    x, ax = d["x"], d["axis"]
    rng = np.random.default_rng(3)
    rm, rv = rng.normal(0, 0.5, 5), rng.uniform(0.5, 2.0, 5)
    y = fastbn.batch_norm_relu_infer(x, rm, rv, d["g"], d["b"], residual=d["res"], axis=ax, eps=1e-3)
    ry = np.maximum(naive.infer_forward(x, rm, rv, d["g"], d["b"], axis=ax, eps=1e-3) + d["res"], 0)
    assert_close(y, ry, RTOL[dtype], "y")
    inv = 1 / np.sqrt(rv + 1e-3)
    dx, dg, db, dres = fastbn.batch_norm_relu_backward(d["dy"], x, y, rm, inv, d["g"], axis=ax, frozen=True,
                                                       residual=True)
    rdx, rdg, rdb, rres = ref.relu_backward(d["dy"], x, y, rm, inv, d["g"], axis=ax, frozen=True)
    assert_close(dx, rdx, RTOL[dtype], "dx")
    assert_close(dg, rdg, RTOL[dtype], "dgamma")
    assert_close(db, rdb, RTOL[dtype], "dbeta")
    assert_close(dres, rres, 0, "dresidual")


def test_equals_bn_followed_by_relu():
    d = _make((8, 12, 6, 6), "NCHW", "float64", seed=4)
    x = d["x"]
    rm1, rv1 = np.zeros(12), np.ones(12)
    rm2, rv2 = np.zeros(12), np.ones(12)
    y, mean, invstd = fastbn.batch_norm_relu_train(x, d["g"], d["b"], running_mean=rm1, running_var=rv1,
                                                   momentum=0.3)
    y0, mean0, invstd0 = fastbn.batch_norm_train(x, d["g"], d["b"], running_mean=rm2, running_var=rv2,
                                                 momentum=0.3)
    assert_close(y, np.maximum(y0, 0), 1e-14, "y")
    assert np.array_equal(mean, mean0) and np.array_equal(invstd, invstd0)
    assert_close(rm1, rm2, 1e-15, "running_mean")
    assert_close(rv1, rv2, 1e-15, "running_var")
    dx, dg, db, _ = fastbn.batch_norm_relu_backward(d["dy"], x, y, mean, invstd, d["g"])
    dx0, dg0, db0 = fastbn.batch_norm_backward(d["dy"] * (y0 > 0), x, mean, invstd, d["g"])
    assert_close(dx, dx0, 1e-13, "dx")
    assert_close(dg, dg0, 1e-13, "dgamma")
    assert_close(db, db0, 1e-13, "dbeta")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NCHW-few-channels"])
def test_bitwise_identical_for_any_thread_count(layout, threads):
    shape = (40, 6, 64, 64) if layout == "NCHW-few-channels" else (16, 32, 40, 40)
    d = _make(shape, layout[:4], "float32", seed=5)
    x, ax = d["x"], d["axis"]
    results = []
    for t in (1, 2):
        threads(t)
        y, mean, invstd = fastbn.batch_norm_relu_train(x, d["g"], d["b"], residual=d["res"], axis=ax)
        dx, dg, db, dres = fastbn.batch_norm_relu_backward(d["dy"], x, y, mean, invstd, d["g"], axis=ax,
                                                           residual=True)
        results.append((y, mean, invstd, dx, dg, db, dres))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_in_place_and_layouts():
    d = _make((6, 8, 5, 5), "NHWC", "float32", seed=6)
    x_nhwc, res_nhwc = d["x"], d["res"]
    x = np.moveaxis(x_nhwc, -1, 1)  # NCHW view of channels-last memory: used without a copy
    res_cf = np.ascontiguousarray(np.moveaxis(res_nhwc, -1, 1))  # residual laid out differently
    y, mean, invstd = fastbn.batch_norm_relu_train(x, d["g"], d["b"], residual=res_cf)
    ry = ref.relu_train(x, d["g"], d["b"], residual=res_cf)[0]
    assert_close(y, ry, 1e-5, "y")
    assert y.strides == x.strides, "y keeps x's (channels-last) memory layout"
    # out=x (in place) and out in a third layout
    xc = x.copy()
    y2, _, _ = fastbn.batch_norm_relu_train(xc, d["g"], d["b"], residual=res_cf, out=xc)
    assert y2 is xc and np.array_equal(y2, y)
    out_f = np.asfortranarray(np.empty_like(res_cf))
    y3 = fastbn.batch_norm_relu_train(x, d["g"], d["b"], residual=res_cf, out=out_f).y
    assert y3 is out_f and np.array_equal(y3, y)
    # backward in place into dy, d_residual into its own buffer
    dy = np.moveaxis(d["dy"], -1, 1).copy()
    dx_ref, dg_ref, db_ref, dres_ref = fastbn.batch_norm_relu_backward(dy, x, y, mean, invstd, d["g"],
                                                                       residual=True)
    dres_buf = np.empty_like(dy)
    dx, dg, db, dres = fastbn.batch_norm_relu_backward(dy, x, y, mean, invstd, d["g"], out=dy,
                                                       residual_out=dres_buf)
    assert dx is dy and dres is dres_buf
    assert np.array_equal(dx, dx_ref) and np.array_equal(dres, dres_ref)
    assert np.array_equal(dg, dg_ref) and np.array_equal(db, db_ref)


def test_running_statistics_update_only_on_success():
    x = np.random.default_rng(7).normal(size=(8, 3, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match="residual"):
        fastbn.batch_norm_relu_train(x, residual=np.zeros((8, 3, 5), np.float32), running_mean=rm,
                                     running_var=rv)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm_relu_train(x[:1, :, :1], running_mean=rm, running_var=rv)
    assert (rm == 0).all() and (rv == 1).all()
    _, mean, invstd = fastbn.batch_norm_relu_train(x, running_mean=rm, running_var=rv, momentum=0.5)
    _, rmean, _, var, n = naive.train_forward(x)
    assert_close(rm, 0.5 * rmean, 1e-6, "running_mean")
    assert_close(rv, 0.5 + 0.5 * var * n / (n - 1), 1e-6, "running_var")


def test_errors_name_the_argument():
    x = np.ones((4, 3, 2), np.float32)
    y = np.ones_like(x)
    m, s = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        fastbn.batch_norm_relu_train(x, residual=np.ones((4, 3, 2)))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fastbn.batch_norm_relu_infer(x, m, s, residual=np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="y must have x's shape"):
        fastbn.batch_norm_relu_backward(y, x, y[:2], m, s)
    with pytest.raises(TypeError, match="dy must have x's dtype"):
        fastbn.batch_norm_relu_backward(np.ones((4, 3, 2)), x, y, m, s)
    with pytest.raises(ValueError, match="invstd must have shape"):
        fastbn.batch_norm_relu_backward(y, x, y, m, np.ones(4))
    with pytest.raises(ValueError, match="residual_out must not overlap out"):
        buf = np.empty_like(x)
        fastbn.batch_norm_relu_backward(y.copy(), x, y, m, s, out=buf, residual_out=buf)
    with pytest.raises(ValueError, match="eps"):
        fastbn.batch_norm_relu_train(x, eps=-1.0)
    with pytest.raises(ValueError, match="given together"):
        fastbn.batch_norm_relu_train(x, running_mean=np.zeros(3))
    with pytest.raises(ValueError, match="running_var \\+ eps must be positive"):
        fastbn.batch_norm_relu_infer(x, m, -np.ones(3))
    with pytest.raises(TypeError, match="x must have dtype"):
        fastbn.batch_norm_relu_train(x.astype(np.int32))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_numba_kernels_agree_bitwise_with_the_functional_api(layout):
    # fastbn.kernels (no streaming stores, variant chosen at run time) against the functional API (variant
    # chosen in Python): the same loops, so the same bits
    from fastbn import kernels

    d = _make((6, 20, 7, 5), layout, "float64", seed=8)
    x, ax, C = d["x"], d["axis"], d["C"]
    x3 = x.reshape(6, 20, 35) if layout == "NCHW" else x.reshape(6 * 7 * 5, 20, 1)
    dy3 = d["dy"].reshape(x3.shape)
    y3 = np.empty_like(x3)
    mean, invstd = np.empty(C), np.empty(C)
    kernels.train_forward_serial(x3, d["g"], d["b"], 1e-5, y3, mean, invstd, np.empty(0), np.empty(0), 0.1, False)
    y0, mean0, invstd0 = fastbn.batch_norm_train(x, d["g"], d["b"], axis=ax)
    assert np.array_equal(y3.reshape(x.shape), y0) and np.array_equal(invstd, invstd0)
    dx3 = np.empty_like(x3)
    dg, db = np.empty(C), np.empty(C)
    kernels.backward(dy3, x3, mean, invstd, d["g"], dx3, dg, db, False)
    dx0, dg0, db0 = fastbn.batch_norm_backward(d["dy"], x, mean0, invstd0, d["g"], axis=ax)
    assert np.array_equal(dx3.reshape(x.shape), dx0) and np.array_equal(dg, dg0) and np.array_equal(db, db0)
    rm, rv = d["b"], np.full(C, 2.0)
    kernels.infer_forward(x3, rm, rv, d["g"], d["b"], 1e-5, y3)
    assert np.array_equal(y3.reshape(x.shape), fastbn.batch_norm_infer(x, rm, rv, d["g"], d["b"], axis=ax))


_MISALIGNED_RESIDUAL_OUT = r"""
import sys
import numpy as np
import fastbn
N, C, H, W = 32, 64, 56, 56     # 25.7 MB float32 outputs: written with streaming stores
n = N * C * H * W
def at(off):  # a float32 array of n values at byte offset off within a 64-byte line
    buf = np.empty(n + 64, np.float32)
    o = ((off - buf.ctypes.data) % 64) // 4
    return buf[o:o + n]
rng = np.random.default_rng(0)
layout = sys.argv[1]
shape = (N, C, H, W) if layout == "NCHW" else (N, H, W, C)
axis = 1 if layout == "NCHW" else 3
x, dy, r = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
y, mean, invstd = fastbn.batch_norm_relu_train(x, residual=r, axis=axis)[:3]
ref = fastbn.batch_norm_relu_backward(dy, x, y, mean, invstd, axis=axis, residual=True)
for off in (4, 16, 36):
    dx = at(0).reshape(shape)
    dres = at(off).reshape(shape)
    res = fastbn.batch_norm_relu_backward(dy, x, y, mean, invstd, axis=axis, out=dx, residual_out=dres)
    assert res.dx is dx and res.dresidual is dres
    assert np.array_equal(dx, ref.dx) and np.array_equal(dres, ref.dresidual), off
print("ok")
"""


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_residual_out_misaligned_to_out(layout, tmp_path):
    """A residual_out at another offset within a 64-byte line than out: dx is written with streaming
    (vector, aligned) stores, and the residual gradient beside it took them too, at addresses not
    aligned for them: the process died (SIGSEGV). Run in a subprocess so a crash fails the test."""
    import subprocess
    import sys

    script = tmp_path / "misaligned.py"
    script.write_text(_MISALIGNED_RESIDUAL_OUT)
    r = subprocess.run([sys.executable, str(script), layout], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
