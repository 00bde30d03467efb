"""float16 and bfloat16 inputs (issue 11 item 3): 2-byte storage, float32 arithmetic, float64 statistics.

The kernels load a half value as the float32 it is, compute exactly what they compute for float32 input
and round the result once. So a half input's output must be, bit for bit, the float32 kernel's output on
the same values rounded to the half dtype (the strongest check, every layout path); against the float64
reference it must be within that rounding (plus float32 arithmetic); against torch's own half batch norm
within one unit of the last place. bfloat16 NumPy arrays are ml_dtypes'; the PyTorch drop-in's bfloat16
tests do not need ml_dtypes.
"""
import subprocess
import sys

import numba
import numpy as np
import pytest

import fastbn
import naive
from conftest import at_line_offset
from fastbn._kernels import plan
from fastbn._kernels.half import ld, st

try:
    import ml_dtypes
except ImportError:  # float16 tests still run; ml_dtypes comes with fastbn[bf16]
    ml_dtypes = None

F16 = np.dtype(np.float16)
BF16 = None if ml_dtypes is None else np.dtype(ml_dtypes.bfloat16)
need_bf16 = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 arrays need ml_dtypes (fastbn[bf16])")
DTYPES = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16", marks=need_bf16)]
MANTISSA = {"float16": 10, "bfloat16": 7}
MIN_EXP = {"float16": -14, "bfloat16": -126}

# (shape, axis): every kernel path (plan.layout_of) in NCHW, NHWC and NC, small enough for the serial
# kernels (the parallel ones: test_bitwise_equal_across_threads_and_streaming). Each new dtype x path x
# kernel is a compilation (~5 s here): bfloat16, whose loops differ from float16's only in ld/st (tested
# exhaustively above), takes one path per writer and reduction loop of rows.py.
SHAPES = {
    "NC": ((64, 24), 1),  # channels-last rows
    "NHWC": ((6, 5, 7, 4), -1),
    "owned-short": ((4, 6, 5, 7), 1),  # channels-first, a thread owns whole channels, short rows
    "owned-long": ((3, 16, 300), 1),
    "split-long": ((60, 1, 300), 1),  # channels-first, few channels split in chunks
    "split-short": ((400, 1, 49), 1),
}
LAYOUT_CASES = ([pytest.param(F16, *SHAPES[k], id=f"float16-{k}") for k in SHAPES]
                + [pytest.param(BF16, *SHAPES[k], id=f"bfloat16-{k}", marks=need_bf16)
                   for k in ("NHWC", "owned-short", "split-long")])


def _round_half(a: np.ndarray, dt: np.dtype) -> np.ndarray:
    return a.astype(np.float32).astype(dt)


def assert_same_bits(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Equal as stored: same bits, NaN where the other is NaN (NaN payloads aside)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.astype(np.float32), expected.astype(np.float32)
    assert np.array_equal(np.isnan(a), np.isnan(e)), f"{what}: NaNs differ"
    same = np.isnan(a) | (actual.view(np.int16) == expected.view(np.int16))
    assert same.all(), f"{what}: {np.count_nonzero(~same)} of {a.size} values differ, e.g. " \
                       f"{a[~same][:3]} vs {e[~same][:3]}"


def assert_within_rounding(actual, reference, what: str = "", slack: float = 1e-5, dtype: str = "") -> None:
    """|actual - reference| <= half an ulp of the half dtype at the reference + slack * max|reference|
    (the float32 arithmetic before the one rounding). Computing in the half dtype, or rounding twice
    through a coarser intermediate, breaks it. ``dtype``: the half dtype's name (default: actual's)."""
    name = dtype or actual.dtype.name
    ref = np.asarray(reference, np.float64)
    exp = np.maximum(np.floor(np.log2(np.maximum(np.abs(ref), 1e-300))), MIN_EXP[name])
    half_ulp = 2.0 ** (exp - MANTISSA[name] - 1)
    err = np.abs(np.asarray(actual, np.float32).astype(np.float64) - ref)
    bound = half_ulp + slack * np.abs(ref).max()
    worst = int(np.argmax(err - bound))
    assert (err <= bound).all(), (f"{what}: error {err.flat[worst]:.3e} > {bound.flat[worst]:.3e} at "
                                  f"reference {ref.flat[worst]:.6g}")


def _inputs(shape, axis, dt, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2.0 + 3.0).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    return x, dy, rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)


# ----------------------------------------------------------------------- the conversions themselves


@numba.njit
def _widen(bits, out):
    for i in range(bits.size):
        out[i] = ld(bits[i])


@numba.njit
def _narrow(f, out):
    for i in range(f.size):
        out[i] = st(f[i], out)


def _float32_samples():
    rng = np.random.default_rng(1)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFC00001, 0x7F7FFFFF,
                        0x00000001, 0x477FEFFF, 0x477FF000, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7F8000,
                        0x33800000, 0x33800001, 0x387FC000, 0x38800000], np.uint32)
    return np.concatenate([special, rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)]).view(
        np.float32)


def test_float16_conversions_match_numpy():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    _widen(bits, out)  # every float16 value, exactly
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(out.view(np.uint32)[~nan], ref.view(np.uint32)[~nan]) and np.isnan(out[nan]).all()
    f = _float32_samples()
    h = np.empty(f.size, np.uint16)
    _narrow(f, h)  # round to nearest even, overflow to inf, NaN stays NaN
    with np.errstate(over="ignore", invalid="ignore"):
        ref16 = f.astype(np.float16)
    nan = np.isnan(f)
    assert np.array_equal(h[~nan], ref16.view(np.uint16)[~nan])
    assert np.isnan(h.view(np.float16)[nan]).all()


@need_bf16
def test_bfloat16_conversions_match_ml_dtypes():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    out = np.empty(bits.size, np.float32)
    _widen(bits, out)
    assert np.array_equal(out.view(np.uint32), bits.view(BF16).astype(np.float32).view(np.uint32))
    f = _float32_samples()
    b = np.empty(f.size, np.int16)
    _narrow(f, b)
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.array_equal(b, f.astype(BF16).view(np.int16))  # NaN included: the quiet NaN of its sign


# ----------------------------------------------------------------------- the kernels, every layout path


@pytest.mark.parametrize("dt,shape,axis", LAYOUT_CASES)
def test_half_is_the_float32_result_rounded_once(dt, shape, axis):
    x, dy, g, b = _inputs(shape, axis, dt)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, g, b, axis=axis)
    y32, mean32, invstd32 = fastbn.batch_norm_train(x32, g, b, axis=axis)
    assert y.dtype == dt and y.shape == x.shape
    assert_same_bits(y, _round_half(y32, dt), "y")
    assert np.array_equal(mean, mean32) and np.array_equal(invstd, invstd32)  # float64 statistics
    dx, dg, db = fastbn.batch_norm_backward(dy, x, mean, invstd, g, axis=axis)
    dx32, dg32, db32 = fastbn.batch_norm_backward(dy32, x32, mean, invstd, g, axis=axis)
    assert_same_bits(dx, _round_half(dx32, dt), "dx")
    assert np.array_equal(dg, dg32) and np.array_equal(db, db32)
    rm, rv = np.zeros(x.shape[axis]), np.ones(x.shape[axis])
    yi = fastbn.batch_norm_infer(x, rm + 0.25, rv * 2.0, g, b, axis=axis)
    assert_same_bits(yi, _round_half(fastbn.batch_norm_infer(x32, rm + 0.25, rv * 2.0, g, b, axis=axis), dt),
                     "infer")

    # and against the float64 reference: within the one rounding
    ry, rmean, rinv, _, _ = naive.train_forward(x, g, b, axis=axis)
    assert_within_rounding(y, ry, "y vs float64")
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12)
    rdx, rdg, rdb = naive.backward(dy, x, rmean, rinv, g, axis=axis)
    assert_within_rounding(dx, rdx, "dx vs float64")
    np.testing.assert_allclose(dg, rdg, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, rdb, rtol=1e-9, atol=1e-9)
    assert_within_rounding(yi, naive.infer_forward(x, rm + 0.25, rv * 2.0, g, b, axis=axis), "infer vs float64")


@pytest.mark.parametrize("dt", DTYPES)
def test_fused_relu_and_residual(dt):
    shape = (5, 6, 4, 7)
    x, dy, g, b = _inputs(shape, 1, dt)
    res = (np.random.default_rng(3).standard_normal(shape)).astype(dt)
    f32 = [a.astype(np.float32) for a in (x, dy, res)]
    y, mean, invstd = fastbn.batch_norm_relu_train(x, g, b, residual=res)
    y32, _, _ = fastbn.batch_norm_relu_train(f32[0], g, b, residual=f32[2])
    assert_same_bits(y, _round_half(y32, dt), "y")
    o = fastbn.batch_norm_relu_backward(dy, x, y, mean, invstd, g, residual=True)
    o32 = fastbn.batch_norm_relu_backward(f32[1], f32[0], y.astype(np.float32), mean, invstd, g, residual=True)
    assert_same_bits(o.dx, _round_half(o32.dx, dt), "dx")
    assert_same_bits(o.dresidual, np.where(y.astype(np.float32) > 0, dy, np.zeros_like(dy)), "dresidual")
    assert np.array_equal(o.dgamma, o32.dgamma)


@pytest.mark.parametrize("dt", DTYPES)
def test_nan_and_inf_behave_as_in_float32(dt):
    x, dy, g, b = _inputs((16, 4, 6, 6), 1, dt)
    x[3, 1, 2, 2] = np.nan
    x[0, 2, 0, 0] = np.inf
    dy[1, 3, 1, 1] = np.nan
    y, mean, invstd = fastbn.batch_norm_train(x, g, b)
    y32, _, _ = fastbn.batch_norm_train(x.astype(np.float32), g, b)
    assert_same_bits(y, _round_half(y32, dt), "y")
    ok = np.isfinite(y.astype(np.float32))
    assert np.isnan(y[:, 1].astype(np.float32)).all() and np.isnan(y[:, 2].astype(np.float32)).all()
    assert ok[:, 0].all() and ok[:, 3].all()
    dx, dg, db = fastbn.batch_norm_backward(dy, x, mean, invstd, g)
    dx32, _, _ = fastbn.batch_norm_backward(dy.astype(np.float32), x.astype(np.float32), mean, invstd, g)
    assert_same_bits(dx, _round_half(dx32, dt), "dx")
    assert np.isnan(dx[:, 3].astype(np.float32)).all() and np.isfinite(dx[:, 0].astype(np.float32)).all()


def test_float16_overflow_gives_inf_not_garbage():
    x = np.random.default_rng(4).standard_normal((32, 2, 8)).astype(np.float16)
    y = fastbn.batch_norm_infer(x, np.zeros(2), np.ones(2), np.array([1e5, 1.0]))
    big = y[:, 0].astype(np.float32)
    assert np.isinf(big[np.abs(x[:, 0].astype(np.float32)) * 1e5 > 65520]).all()
    assert np.array_equal(np.sign(big), np.sign(x[:, 0].astype(np.float32)))


@pytest.mark.parametrize("dt,shape,axis", [pytest.param(F16, (64, 8, 8, 32), -1, id="float16-NHWC"),
                                            pytest.param(BF16, (64, 8, 8, 32), -1, id="bfloat16-NHWC",
                                                         marks=need_bf16),
                                            pytest.param(BF16, (8, 32, 2048), 1, id="bfloat16-owned-long",
                                                         marks=need_bf16)])
def test_bitwise_equal_across_threads_and_streaming(dt, shape, axis, threads, monkeypatch):
    """1 and 2 threads (the serial and parallel kernels), and with streaming stores forced on an output
    that starts 2 bytes past a 64-byte line (the streaming writers' head and tail; channels-last: the
    line-aligned slabs of rows.act_slabs / grad_slabs)."""
    x, dy, g, b = _inputs(shape, axis, dt, seed=5)
    x0, dy0 = _unaligned(x), _unaligned(dy)
    results = []
    for n, stream in ((1, False), (2, False), (2, True)):
        threads(n)
        monkeypatch.setattr(plan, "STREAM_MIN_BYTES", 0 if stream else 1 << 60)
        y, mean, invstd = fastbn.batch_norm_train(x0, g, b, axis=axis, out=_unaligned(np.empty_like(x)))
        dx = fastbn.batch_norm_backward(dy0, x0, mean, invstd, g, axis=axis, out=_unaligned(np.empty_like(x))).dx
        results.append((y, mean, dx))
    for y, mean, dx in results[1:]:
        assert_same_bits(y, results[0][0], "y")
        assert np.array_equal(mean, results[0][1])
        assert_same_bits(dx, results[0][2], "dx")
    ry, rmean, rinv, _, _ = naive.train_forward(x, g, b, axis=axis)
    assert_within_rounding(results[0][0], ry, "y vs float64")


def _unaligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` whose data starts one element (2 bytes) past a 64-byte boundary."""
    out = at_line_offset(a.size, a.dtype, a.itemsize).reshape(a.shape)
    out[...] = a
    return out


# ----------------------------------------------------------------------- the public API around them


@pytest.mark.parametrize("dt", DTYPES)
def test_layer_stats_and_running_statistics(dt):
    x, dy, _, _ = _inputs((8, 3, 5, 5), 1, dt)
    bn = fastbn.BatchNorm(3)  # float32 parameters and running statistics
    y = bn(x)
    assert y.dtype == dt
    ry, rmean, _, rvar, n = naive.train_forward(x, None, None)
    assert_within_rounding(y, ry)
    erm, erv = naive.running_update(np.zeros(3), np.ones(3), rmean, rvar, n, 0.1)
    np.testing.assert_allclose(bn.running_mean, erm, rtol=1e-6)
    np.testing.assert_allclose(bn.running_var, erv, rtol=1e-6)
    dx = bn.backward(dy)
    assert dx.dtype == dt and bn.dgamma.dtype == np.float32
    s = fastbn.partial_stats(x)
    s32 = fastbn.partial_stats(x.astype(np.float32))
    assert np.array_equal(s.mean, s32.mean) and np.array_equal(s.m2, s32.m2)


@need_bf16
def test_bfloat16_parameters_and_running_statistics():
    """Per-channel arrays of any float dtype, ml_dtypes' bfloat16 included: parameters used as float64,
    running statistics updated in float64 and stored once."""
    x, _, g, b = _inputs((8, 3, 5, 5), 1, BF16)
    g16, b16 = g.astype(BF16), b.astype(BF16)
    rm, rv = np.zeros(3, BF16), np.ones(3, BF16)
    y = fastbn.batch_norm_train(x, g16, b16, running_mean=rm, running_var=rv).y
    assert_same_bits(y, fastbn.batch_norm_train(x, g16.astype(np.float64), b16.astype(np.float64)).y, "y")
    _, rmean, _, rvar, n = naive.train_forward(x, None, None)
    erm, erv = naive.running_update(np.zeros(3), np.ones(3), rmean, rvar, n, 0.1)
    assert rm.dtype == BF16 and rv.dtype == BF16
    assert_within_rounding(rm, erm, "running_mean", slack=1e-12, dtype="bfloat16")
    assert_within_rounding(rv, erv, "running_var", slack=1e-12, dtype="bfloat16")
    yi = fastbn.batch_norm_infer(x, rm, rv, g16, b16)
    assert_same_bits(yi, fastbn.batch_norm_infer(x, rm.astype(np.float64), rv.astype(np.float64),
                                                 g16.astype(np.float64), b16.astype(np.float64)), "infer")


@pytest.mark.parametrize("dt", DTYPES)
def test_warmup_builds_what_half_calls_use(dt, monkeypatch):
    """``python -m fastbn warmup --dtypes float16,bfloat16`` compiles the variants the public API calls:
    the same kernel, flags and argument types (the bits arrays of fastbn._run, not NumPy's float16)."""
    from fastbn import _run, _warmup

    calls = []

    def recording(kernel, flags, size, *args):
        calls.append((kernel.name, flags, tuple(numba.typeof(a) for a in args)))
        return call(kernel, flags, size, *args)

    call = _run.call
    monkeypatch.setattr(_run, "call", recording)
    x = np.random.default_rng(0).normal(size=_warmup.LAYOUTS["cf-short"][1]).astype(dt)  # serial, cf-short
    y, mean, invstd = fastbn.batch_norm_train(x)
    fastbn.batch_norm_infer(x, mean, invstd ** -2.0)
    layout = _warmup.LAYOUTS["cf-short"][0]
    warmed = {}
    for kernel, flags in (("train", (False,) * 4), ("normalize", (False,) * 3)):
        args = _warmup._args(_warmup.Variant(kernel, dt.name, False, "cf-short", flags))
        warmed[kernel] = (kernel, layout + flags, tuple(numba.typeof(a) for a in args[1:]))  # (nth first)
    assert calls == [warmed["train"], warmed["normalize"]]


def test_half_arguments_are_checked():
    x = np.ones((4, 3), np.float16)
    with pytest.raises(TypeError, match="dy must have x's dtype float16, got float32"):
        fastbn.batch_norm_backward(np.ones((4, 3), np.float32), x, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="out must have dtype float16"):
        fastbn.batch_norm_train(x, out=np.empty((4, 3), np.float32))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16, got int16"):
        fastbn.batch_norm_train(np.ones((4, 3), np.int16))
    y = fastbn.batch_norm_train(x.astype(">f2")).y  # other byte order: converted
    assert y.dtype == np.float16


def test_import_fastbn_does_not_import_ml_dtypes():
    code = ("import sys, numpy as np, fastbn; fastbn.batch_norm_infer(np.ones((4, 3), np.float16), np.zeros(3), "
            "np.ones(3)); assert 'ml_dtypes' not in sys.modules, 'imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------- against torch's own half BN


def _errors_vs_float64(m, x, w, y, dx, training):
    """Relative errors (max |err| / max |ref|) of module m's y, dx, dweight, dbias against torch's float64
    batch norm on the same half values, with m's own parameters and running statistics."""
    import torch

    xd = x.double().requires_grad_()
    wd = m.weight.detach().double().requires_grad_()
    bd = m.bias.detach().double().requires_grad_()
    rm, rv = (None, None) if training else (m.running_mean.double(), m.running_var.double())
    yd = torch.nn.functional.batch_norm(xd, rm, rv, wd, bd, training=training)
    (yd * w.double()).sum().backward()
    pairs = ((y, yd), (dx, xd.grad), (m.weight.grad, wd.grad), (m.bias.grad, bd.grad))
    return [((a.double() - r.detach()).abs().max() / r.detach().abs().max()).item() for a, r in pairs]


@pytest.mark.parametrize("fmt", [None, "channels_last"])
@pytest.mark.parametrize("params", ["float32", "same"])
@pytest.mark.parametrize("tdt", ["float16", "bfloat16"])
def test_dropin_matches_torch_half_batchnorm(tdt, params, fmt):
    """fastbn.torch.BatchNorm2d on float16/bfloat16 tensors against torch's own module on the same dtype
    (float32 parameters and buffers, or the input's dtype): the same conventions (running statistics,
    output dtypes and memory format), and at least torch's accuracy against float64. Measured: equal
    errors on contiguous input; on channels_last torch's dx is up to 4x further off (bfloat16 8.6e-3
    against fastbn's 2.1e-3) and its dbias 1e-3 off with float32 parameters, fastbn's exact."""
    torch = pytest.importorskip("torch")
    import fastbn.torch as fbt

    dt = getattr(torch, tdt)
    pdt = torch.float32 if params == "float32" else dt
    ref = torch.nn.BatchNorm2d(5).to(pdt)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    mine = fbt.BatchNorm2d(5).to(pdt)
    mine.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(0)
    ulp = 2.0 ** -MANTISSA[tdt]
    # y, dx are rounded to the half dtype; dweight, dbias to the parameters' dtype
    rounding = [ulp / 2, ulp / 2] + [ulp / 2 if pdt == dt else 1e-6] * 2
    for step, training in enumerate((True, True, False)):
        ref.train(training)
        mine.train(training)
        x = (torch.randn(6, 5, 4, 3, generator=gen) * (1 + step) + step).to(dt)
        w = torch.randn(6, 5, 4, 3, generator=gen).to(dt)
        if fmt:
            x = x.contiguous(memory_format=torch.channels_last)
        assert mine._fastbn_supports(x)  # fastbn's kernels, not a fallback to torch's
        errors = []
        for m in (ref, mine):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            y = m(xi)
            (y.float() * w.float()).sum().backward()
            errors.append(_errors_vs_float64(m, x, w, y.detach(), xi.grad, training))
            assert y.dtype == dt and xi.grad.dtype == dt and m.weight.grad.dtype == pdt
            if fmt:
                assert y.is_contiguous(memory_format=torch.channels_last)
                assert xi.grad.is_contiguous(memory_format=torch.channels_last)
        for name, e_torch, e_mine, r in zip(("y", "dx", "dweight", "dbias"), *errors, rounding):
            assert e_mine <= max(e_torch, r * 1.01), (step, name, e_mine, e_torch)
        for k in ("running_mean", "running_var"):
            u, v = getattr(mine, k).double(), getattr(ref, k).double()
            assert (u - v).abs().max().item() <= (ulp if pdt == dt else 1e-6) * v.abs().max().item(), k
    assert int(mine.num_batches_tracked) == 2 == int(ref.num_batches_tracked)
