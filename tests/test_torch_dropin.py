"""fastbn.torch.BatchNorm1d/2d/3d and convert() against torch's own modules."""
import copy

import pytest

from conftest import assert_close

torch = pytest.importorskip("torch")
fbt = pytest.importorskip("fastbn.torch")
nn = torch.nn

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
CASES = [  # (torch class, fastbn class name, input shape, memory format)
    (nn.BatchNorm1d, "BatchNorm1d", (16, 5), None),
    (nn.BatchNorm1d, "BatchNorm1d", (6, 5, 7), None),
    (nn.BatchNorm2d, "BatchNorm2d", (6, 5, 4, 3), None),
    (nn.BatchNorm2d, "BatchNorm2d", (6, 5, 4, 3), torch.channels_last),
    (nn.BatchNorm3d, "BatchNorm3d", (3, 5, 2, 3, 4), None),
    (nn.BatchNorm3d, "BatchNorm3d", (3, 5, 2, 3, 4), torch.channels_last_3d),
]
IDS = ["1d-NC", "1d-NCL", "2d", "2d-channels_last", "3d", "3d-channels_last_3d"]


def _pair(tcls, name, dtype, **kwargs):
    ref = tcls(5, dtype=dtype, **kwargs)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    mine = getattr(fbt, name)(5, dtype=dtype, **kwargs)
    mine.load_state_dict(ref.state_dict())
    assert isinstance(mine, tcls) and list(mine.state_dict()) == list(ref.state_dict())
    return ref, mine


def _step(module, x, w):
    xi = x.clone().requires_grad_()
    y = module(xi)
    (y * w).sum().backward()
    return y.detach(), xi.grad


def _compare(ref, mine, shape, fmt, dtype, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    tol = TOL[dtype]
    for step in range(steps):
        x = (torch.randn(shape, generator=g, dtype=dtype) * (1 + step) + step)
        w = torch.randn(shape, generator=g, dtype=dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        for m in (ref, mine):
            m.zero_grad()
        y0, dx0 = _step(ref, x, w)
        y1, dx1 = _step(mine, x, w)
        assert_close(y1.numpy(), y0.numpy(), tol, "y")
        assert_close(dx1.numpy(), dx0.numpy(), tol, "dx")
        if fmt is not None:
            assert y1.is_contiguous(memory_format=fmt) and dx1.is_contiguous(memory_format=fmt)
        if ref.affine:
            assert_close(mine.weight.grad.numpy(), ref.weight.grad.numpy(), tol, "dweight")
            assert_close(mine.bias.grad.numpy(), ref.bias.grad.numpy(), tol, "dbias")
        for k, v in ref.state_dict().items():
            assert_close(mine.state_dict()[k].numpy(), v.numpy(), tol, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tcls,name,shape,fmt", CASES, ids=IDS)
def test_train_and_eval_match_torch(tcls, name, shape, fmt, dtype):
    ref, mine = _pair(tcls, name, dtype)
    _compare(ref, mine, shape, fmt, dtype, steps=3)
    ref.eval()
    mine.eval()
    _compare(ref, mine, shape, fmt, dtype, steps=1, seed=1)
    assert int(mine.num_batches_tracked) == 3


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                    dict(affine=False, track_running_stats=False, momentum=None)],
                         ids=["cumulative", "no-affine", "no-running-stats", "all"])
def test_options_match_torch(kwargs):
    ref, mine = _pair(nn.BatchNorm2d, "BatchNorm2d", torch.float64, **kwargs)
    _compare(ref, mine, (4, 5, 3, 3), None, torch.float64, steps=3)
    ref.eval()
    mine.eval()  # without running statistics, eval mode uses batch statistics (as torch)
    _compare(ref, mine, (4, 5, 3, 3), None, torch.float64, steps=2, seed=1)


def test_convert_swaps_modules_in_place():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.BatchNorm1d(10))).double()
    original = copy.deepcopy(model)
    bn = model[1]
    weight = bn.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fbt.convert(model) is model
    assert type(model[1]) is fbt.BatchNorm2d and type(model[3][2]) is fbt.BatchNorm1d
    assert model[1] is bn and model[1].weight is weight  # same module and parameter objects
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for m in (original, model):
        y = m(x)
        y.square().sum().backward()
    assert_close(model(x).detach().numpy(), original(x).detach().numpy(), 1e-12)
    assert_close(bn.weight.grad.numpy(), original[1].weight.grad.numpy(), 1e-10)
    opt.step()  # the optimizer built before convert() still updates the converted model
    assert not torch.equal(bn.weight, original[1].weight)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fbt.convert("not a module")


def test_falls_back_to_torch_where_fastbn_does_not_apply():
    mine = fbt.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float32)
    assert not mine._fastbn_supports(x)
    with pytest.raises(RuntimeError, match="mixed dtype"):  # torch's own message
        mine(x)
    empty = fbt.BatchNorm2d(3)(torch.randn(0, 3, 2, 2))
    assert empty.shape == (0, 3, 2, 2)


def test_batch_of_one_value_raises_like_torch_and_counts_nothing():
    mine = fbt.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mine(torch.randn(1, 3))
    assert int(mine.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        mine(torch.randn(2, 3, 4, 5))


# ------------------------------------------------------------------ BN subclasses (issue 11 item 2)

import io  # noqa: E402
import warnings  # noqa: E402

import fastbn.torch._modules as fbt_modules  # noqa: E402
from torch_standins import (BatchNormAct2d, ResidualBN, ScaledBN, SiluBN,  # noqa: E402
                            TinyTimmNet)


def _train_step(model, x, seed):
    torch.manual_seed(seed)  # DropPath draws from torch's generator: the same draws for both models
    xi = x.clone().requires_grad_()
    y = model(xi)
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), xi.grad


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "channels_last"])
def test_convert_batchnormact_subclasses_match_the_original(fmt, monkeypatch):
    torch.manual_seed(0)
    ref = TinyTimmNet().double()
    mine = copy.deepcopy(ref)
    keys = list(mine.state_dict())
    fbt.convert(mine)
    bns = [m for m in mine.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 and all(isinstance(m, BatchNormAct2d) for m in bns)
    assert all(type(m).__name__ == "FastBatchNormAct2d" for m in bns) and list(mine.state_dict()) == keys
    fused = []
    orig = fbt_modules.batch_norm_relu_train
    monkeypatch.setattr(fbt_modules, "batch_norm_relu_train", lambda *a, **k: fused.append(1) or orig(*a, **k))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 2 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    for step in range(2):
        y0, dx0 = _train_step(ref, x, step)
        y1, dx1 = _train_step(mine, x, step)
        assert_close(y1.numpy(), y0.numpy(), 1e-12, "y")
        assert_close(dx1.numpy(), dx0.numpy(), 1e-10, "dx")
    assert len(fused) == 2  # the stem's BN + ReLU ran fused (once per step)
    for (k, a), b in zip(ref.named_parameters(), mine.parameters()):
        assert_close(b.grad.numpy(), a.grad.numpy(), 1e-10, k)
    for k, v in ref.state_dict().items():
        assert_close(mine.state_dict()[k].numpy(), v.numpy(), 1e-12, k)
    ref.eval()
    mine.eval()
    y0, dx0 = _train_step(ref, x, 5)
    y1, dx1 = _train_step(mine, x, 5)
    assert_close(y1.numpy(), y0.numpy(), 1e-12, "eval y")
    assert_close(dx1.numpy(), dx0.numpy(), 1e-12, "eval dx")


def test_converted_subclass_follows_later_changes_copies_and_pickles():
    bn = fbt.convert(BatchNormAct2d(3, act_layer=nn.ReLU).double())
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    bn.act = nn.SiLU()  # replaced after convert: the tail looks the child up at call time
    ref = torch.nn.functional.silu(torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True))
    assert_close(bn(x).detach().numpy(), ref.detach().numpy(), 1e-12)
    for other in (copy.deepcopy(bn), torch.load(_saved(bn), weights_only=False)):
        assert type(other) is type(bn) and isinstance(other.act, nn.SiLU)
        assert_close(other.eval()(x).detach().numpy(), bn.eval()(x).detach().numpy(), 0)
        bn.train()


def _saved(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


def test_convert_refuses_other_subclasses_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBN(4), ResidualBN(4), SiluBN(4), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"1 \(ScaledBN: .*; 2 \(ResidualBN"):
        fbt.convert(copy.deepcopy(model), strict=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fbt.convert(model)
    assert len(w) == 1 and "ScaledBN" in str(w[0].message) and "SiluBN" not in str(w[0].message)
    assert type(model[1]) is ScaledBN and type(model[2]) is ResidualBN
    assert isinstance(model[3], SiluBN) and type(model[3]) is not SiluBN and type(model[4]) is fbt.BatchNorm2d
    x = torch.randn(2, 3, 4, 4)
    ref = copy.deepcopy(model)
    for m in ref.modules():  # undo the conversion for the reference
        if type(m) is fbt.BatchNorm2d:
            m.__class__ = nn.BatchNorm2d
        elif isinstance(m, SiluBN):
            m.__class__ = SiluBN
    assert_close(model(x).detach().numpy(), ref(x).detach().numpy(), 1e-5)


def test_fold_model_of_a_converted_model():
    model = fbt.convert(TinyTimmNet().double()).eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded, report = fbt.fold_model(model, return_report=True)
    assert len(report.folded) == 3, str(report)
    with torch.no_grad():
        assert_close(folded(x).numpy(), model(x).numpy(), 1e-10)
