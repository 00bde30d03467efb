"""PyTorch folding (fastbn.torch.fold_model): folded model == layer-then-BN in eval mode.

The reference is the unfolded module itself run in float64 (torch's own conv and batch_norm).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
from fastbn.torch import fold_model  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def randomize_bn(model, seed=0):
    """Non-trivial running statistics (means far from 0, variances far from 1) and affine params."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                sign = torch.randint(0, 2, (c,), generator=g) * 2 - 1
                m.running_mean.copy_(torch.empty(c).uniform_(3, 8, generator=g) * sign)
                m.running_var.copy_(torch.empty(c).uniform_(0.05, 40, generator=g))
                if m.affine:
                    m.weight.copy_(torch.empty(c).uniform_(0.5, 3, generator=g) * sign.flip(0))
                    m.bias.copy_(torch.empty(c).uniform_(-4, 4, generator=g))
    return model


def n_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def assert_rel(got, ref, rtol):
    err = ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def check(model, x, expect_skipped=0, example=True, method="traced"):
    """Fold ``model`` (with ``x`` as the example input unless ``example=False``); compare outputs; check the
    original is unchanged and the report's counts."""
    state = copy.deepcopy(model.state_dict())
    training = model.training
    folded, report = fold_model(model, x if example else None, return_report=True)
    assert not folded.training and model.training == training
    assert type(folded) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"original module changed: {k}"
    assert len(report.skipped) == expect_skipped, str(report)
    assert len(report.folded) == n_bn(model) - expect_skipped, str(report)
    assert report.method == method, str(report)
    with torch.no_grad():
        ref = model.eval()(x)
        got = folded(x)
    model.train(training)
    assert_rel(got, ref, TOL[x.dtype])
    return folded, report


LAYERS = [  # (name, factory(in_ch), in_ch, spatial dims)
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2), 4, 1),
    ("conv1d-g2", lambda: nn.Conv1d(4, 6, 3, groups=2, bias=False), 4, 1),
    ("conv2d", lambda: nn.Conv2d(3, 5, 3, padding=1), 3, 2),
    ("conv2d-g3", lambda: nn.Conv2d(6, 9, (3, 2), stride=(2, 1), groups=3), 6, 2),
    ("conv2d-dw", lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, padding_mode="reflect"), 4, 2),
    ("conv3d", lambda: nn.Conv3d(2, 4, 2, bias=False), 2, 3),
    ("conv3d-g2", lambda: nn.Conv3d(4, 6, 3, groups=2, padding=1), 4, 3),
    ("convT1d", lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), 4, 1),
    ("convT1d-g2", lambda: nn.ConvTranspose1d(4, 6, 3, groups=2, dilation=2, bias=False), 4, 1),
    ("convT2d", lambda: nn.ConvTranspose2d(3, 5, 2, stride=2), 3, 2),
    ("convT2d-g2", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2), 4, 2),
    ("convT2d-g3", lambda: nn.ConvTranspose2d(6, 9, 3, groups=3, bias=False), 6, 2),
    ("convT2d-dw", lambda: nn.ConvTranspose2d(4, 4, 3, groups=4), 4, 2),
    ("convT3d", lambda: nn.ConvTranspose3d(2, 4, 2, stride=2), 2, 3),
    ("convT3d-g2", lambda: nn.ConvTranspose3d(4, 6, 2, groups=2, bias=False), 4, 3),
    ("linear", lambda: nn.Linear(7, 5), 7, 0),
    ("linear-nobias", lambda: nn.Linear(7, 5, bias=False), 7, 0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("name,make,cin,dims", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_then_bn(name, make, cin, dims, affine, dtype):
    torch.manual_seed(zlib.crc32(name.encode()))
    layer = make()
    cout = layer.out_features if dims == 0 else layer.out_channels
    bn = [nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims](cout, eps=1e-3,
                                                                                 affine=affine)
    model = randomize_bn(nn.Sequential(layer, bn, nn.ReLU())).to(dtype)
    x = torch.randn((3, cin) + (5,) * dims, dtype=dtype)
    folded, _ = check(model, x)
    (new,) = folded._fastbn_folded.children()
    assert type(new) is type(layer) and new.weight.dtype == dtype and new.bias is not None
    assert isinstance(folded[1], type(bn))  # the model's own children are kept for other code paths
    assert torch.equal(folded[0].weight, model[0].weight)


def test_nested_sequentials_and_training_original():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6))),
        nn.Flatten(), nn.Linear(6 * 8 * 8, 5), nn.BatchNorm1d(5))
    randomize_bn(model).double().train()  # the original stays in training mode
    check(model, torch.randn(2, 3, 4, 4, dtype=torch.float64))


class Residual(nn.Module):
    """Not a Sequential: found through torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        z = self.conv3(y)  # two users: BN3 must stay
        y = self.bn3(z) + z
        return self.head(y)


def test_fx_traced_model():
    torch.manual_seed(2)
    model = randomize_bn(Residual()).double()
    folded, report = check(model, torch.randn(2, 4, 5, 5, dtype=torch.float64), expect_skipped=1)
    assert type(folded) is Residual and not isinstance(folded, torch.fx.GraphModule)
    (skip,) = report.skipped
    assert skip.bn == "bn3" and skip.layer == "conv3" and "also used by" in skip.reason


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            y = -y
        return self.bn(self.conv(y))


def test_untraceable_model_is_folded_only_with_an_example_and_verified():
    torch.manual_seed(3)
    model = randomize_bn(Untraceable()).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, report = check(model, x, expect_skipped=2, example=False, method="none")
    assert "does not trace" in report.notes[0] and "example_inputs" in report.skipped[0].reason
    folded, report = check(model, x, method="verified")
    assert type(folded) is Untraceable and isinstance(folded.block[1], nn.Identity)
    assert all("verified" in e.reason for e in report.folded)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)  # the same conv is called twice


def test_shared_layer_is_not_folded():
    model = randomize_bn(SharedConv()).double()
    folded, report = check(model, torch.randn(1, 3, 4, 4, dtype=torch.float64))
    assert type(folded) is SharedConv and report.folded[0].layer == "conv"  # the BN's own call only


def test_shared_module_in_two_sequentials():
    """The same conv object in two places: folding replaces it at one place only."""
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(3)), nn.Sequential(conv, nn.ReLU()))
    check(randomize_bn(model).double(), torch.randn(1, 3, 4, 4, dtype=torch.float64))


def test_bn_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).double()
    randomize_bn(model)
    folded, report = check(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), expect_skipped=1)
    assert report.skipped[0].bn == "1" and "track_running_stats=False" in report.skipped[0].reason


def test_mismatched_and_unrelated_patterns_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 9, 4), nn.BatchNorm1d(4)).double()
    randomize_bn(model)
    folded, report = check(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), expect_skipped=1)
    assert report.skipped[0].bn == "2" and "ReLU" in report.skipped[0].reason


def test_rejects_non_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold_model(lambda x: x)


def test_numpy_references_match_torch():
    """The NumPy convolutions used by test_fold_arrays.py agree with torch's (float64)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_fold_arrays.py")
    spec = importlib.util.spec_from_file_location("_fold_arrays_refs", path)
    refs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 5, 5))
    w, b = rng.standard_normal((9, 2, 3, 2)), rng.standard_normal(9)
    got = refs.conv_ref(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2), groups=3)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                     stride=(2, 1), padding=1, dilation=(1, 2), groups=3).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    wt = rng.standard_normal((6, 2, 3, 2))  # (I, O/groups, *k), groups 3 -> 6 output channels
    got = refs.conv_transpose_ref(x, wt, b[:6], stride=2, padding=1, output_padding=1, dilation=(2, 1),
                                  groups=3)
    ref = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(b[:6]), stride=2, padding=1,
        output_padding=1, dilation=(2, 1), groups=3).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- issue 10 items 6 and 7: no silent change

class FeatureExtractor(nn.Module):
    """Iterates its Sequential keeping every intermediate output (the feature-extractor pattern)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x):
        outs = []
        for m in self.features:
            x = m(x)
            outs.append(x.mean((2, 3)))
        return torch.cat(outs, 1)


class SliceUser(nn.Module):
    """Reaches inside its Sequential: a slice and a child called directly."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.features(x) + self.features[:1](x) + self.features[0](x)


@pytest.mark.parametrize("cls", [FeatureExtractor, SliceUser])
@pytest.mark.parametrize("example", [False, True], ids=["no-example", "example"])
def test_sequential_reached_from_outside_is_not_folded_wrongly(cls, example):
    """Issue 10 item 6: on main the Sequential's conv was folded and its BN dropped (wrong by 0.45-0.58)."""
    torch.manual_seed(4)
    model = randomize_bn(cls()).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded, report = fold_model(model, x if example else None, return_report=True)
    with torch.no_grad():
        assert_rel(folded(x), model.eval()(x), 1e-10)
        # code that reaches inside the model still gets the original layers
        assert_rel(folded.features[:1](x), model.features[:1](x), 0)
        assert_rel(folded.features[0](x), model.features[0](x), 0)
    # each conv's output is used besides by its BN (traced: "also used by"; SliceUser does not trace,
    # and on the example each conv is called more than once): nothing may be folded
    assert not report.folded, str(report)


def test_plain_fold_model_call_keeps_every_output():
    """Items 6 and 7 through the plain call ``fold_model(model)`` (wrong by 0.45-1.29 on main)."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for model in (FeatureExtractor(), SliceUser()):
        model = randomize_bn(model).double().eval()
        folded = fold_model(model)
        with torch.no_grad():
            assert_rel(folded(x), model(x), 1e-10)
            assert_rel(folded.features[:1](x), model.features[:1](x), 1e-12)
            assert_rel(folded.features[0](x), model.features[0](x), 1e-12)
    model = randomize_bn(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))).double().eval()
    x3 = torch.randn(3, 4, 5, dtype=torch.float64)  # (N, C, L): BN1d normalizes axis 1, the length
    with torch.no_grad():
        assert_rel(fold_model(model)(x3), model(x3), 1e-12)


def test_linear_then_bn1d_on_3d_input_is_refused():
    """Issue 10 item 7: Linear + BatchNorm1d on (N, C, L) normalizes the length axis; main folded it (1.29)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))  # x (N, 4, 5): BN1d's channels are axis 1
    randomize_bn(model).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    for example in (None, x):
        folded, report = fold_model(model, example, return_report=True)
        assert not report.folded, str(report)
        with torch.no_grad():
            assert_rel(folded(x), model.eval()(x), 1e-12)
    assert "not known" in fold_model(model, return_report=True)[1].skipped[0].reason
    assert "3 dims" in fold_model(model, x, return_report=True)[1].skipped[0].reason
    # the same model on (N, C) input folds when the example shows it
    x2 = torch.randn(3, 5, dtype=torch.float64)
    check(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double(), x2)


def test_linear_then_bn1d_folds_without_example_when_the_graph_shows_2d():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.ReLU(), nn.Linear(36, 5), nn.BatchNorm1d(5))
    randomize_bn(model).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    check(model, x, example=False)

    class ViewHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(12, 3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.fc(x.view(x.size(0), -1)))

    check(randomize_bn(ViewHead()).double(), torch.randn(2, 3, 4, dtype=torch.float64), example=False)


def test_conv1d_then_bn1d_needs_known_rank():
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4))).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    check(model, x, example=False, expect_skipped=1)
    check(model, x)


def test_example_that_disagrees_with_the_trace_folds_nothing():
    """A forward whose Python side effects fx cannot capture: verification on the example catches it."""

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1  # runs once at trace time: the traced graph always adds 1.0
            return self.bn(self.conv(x)) + float(self.calls)

    model = randomize_bn(Counter()).double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    folded, report = fold_model(model, x, return_report=True)
    assert not report.folded and "differs on the example" in report.notes[-1], str(report)


def test_fold_report_str_and_bad_example():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)))
    folded, report = fold_model(model, return_report=True)
    text = str(report)
    assert text.startswith("folded 1 of 2 batch norm(s) (traced)") and "skipped 3 (ReLU 2)" in text
    with pytest.raises(ValueError, match="example_inputs"):
        fold_model(model, torch.randn(2, 5, 6, 6))
    with pytest.raises(TypeError, match="example_inputs"):
        fold_model(model, "x")


def test_folded_model_copies_pickles_and_refuses_training(tmp_path):
    torch.manual_seed(6)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 3, 5, 5)
    folded = fold_model(model)
    with torch.no_grad():
        ref = folded(x)
        assert torch.equal(copy.deepcopy(folded)(x), ref)
        torch.save(folded, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        assert torch.equal(loaded(x), ref)
        assert "_fastbn_folded.0.weight" in loaded.state_dict()
    folded.train()
    with pytest.raises(RuntimeError, match="eval mode only"):
        folded(x)


# ------------------------------------------------------------------ issue 11 item 2: BN subclasses

from torch_standins import (ConvNormAct, FrozenBatchNorm2d, ResidualBN, ScaledBN,  # noqa: E402
                            SiluBN, TinyTimmNet, real_package)


def test_batchnormact_folds_keeping_activation_and_the_model_class():
    torch.manual_seed(7)
    model = randomize_bn(TinyTimmNet()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for example in (False, True):
        folded, report = check(model, x, example=example)
        assert len(report.folded) == 3 and "tail" in report.folded[0].reason
    # the model keeps its class, its methods and attributes, and they still compute the original's
    assert folded.num_classes == 5 and folded.default_cfg["architecture"] == "tiny"
    with torch.no_grad():
        assert_rel(folded.forward_features(x), model.forward_features(x), 0)
    folded.reset_classifier(3)  # the folded forward calls the model's head at call time
    folded.head.double()
    assert folded(x).shape == (2, 3)


def test_frozen_batchnorm_folds():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4, eps=1e-3), nn.ReLU()).double()
    with torch.no_grad():
        f = model[1]
        f.weight.uniform_(0.5, 2)
        f.bias.normal_()
        f.running_mean.normal_(3, 1)
        f.running_var.uniform_(0.1, 5)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    folded, report = fold_model(model, return_report=True)
    assert len(report.folded) == 1
    with torch.no_grad():
        assert_rel(folded(x), model(x), 1e-12)


@pytest.mark.parametrize("cls,folds", [(SiluBN, True), (ScaledBN, False), (ResidualBN, False)])
def test_bn_subclasses_fold_only_when_bn_then_something(cls, folds):
    torch.manual_seed(9)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), cls(4))).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded, report = fold_model(model, return_report=True)
    assert len(report.folded) == int(folds), str(report)
    if not folds:
        assert cls.__name__ in report.skipped[0].reason
    with torch.no_grad():
        assert_rel(folded(x), model.eval()(x), 1e-12)


def test_verified_path_keeps_subclass_tail():
    class Untraced(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ConvNormAct(3, 4, act_layer=nn.SiLU)

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent branch: not traceable
                return self.block(x)
            return x

    model = randomize_bn(Untraced()).double()
    folded, report = check(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), method="verified")
    # folded in place: the conv is the folded one, the BN slot runs only the BN's tail (SiLU)
    assert type(folded.block.bn).__name__ == "_TailModule" and isinstance(folded.block.bn.bn.act, nn.SiLU)


@pytest.mark.skipif(real_package("timm") is None, reason="timm does not import here (needs torchvision)")
def test_real_timm_model_folds():  # pragma: no cover - runs where timm imports
    import timm
    model = randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=7)).eval()
    x = torch.randn(2, 3, 32, 32)
    folded, report = fold_model(model, x, return_report=True)
    assert report.folded and hasattr(folded, "forward_features") and folded.num_classes == 7
    with torch.no_grad():
        assert_rel(folded(x), model(x), 1e-4)


@pytest.mark.skipif(real_package("torchvision") is None, reason="torchvision does not import here")
def test_real_frozen_batchnorm_folds():  # pragma: no cover - runs where torchvision imports
    from torchvision.ops.misc import FrozenBatchNorm2d as Real
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Real(4)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
    folded, report = fold_model(model, return_report=True)
    assert len(report.folded) == 1
