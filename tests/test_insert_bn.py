"""fastbn.torch.insert_batchnorm and fastbn.identity_init: BN added to a network without changing it.

References: the original network itself (eval and training mode), and the float64 mean / variance of each
layer's output over the concatenated calibration data (NumPy).
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

import fastbn

torch = pytest.importorskip("torch")
nn = torch.nn
from fastbn.torch import insert_batchnorm  # noqa: E402
from torch_standins import real_package  # noqa: E402


def vgg11_shaped(width=8, num_classes=10):
    """torchvision's vgg11 layout (config "A": 8 convs, 5 max-pools, 3 linears with dropout) at 1/8 width."""
    cfg = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v * width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v * width
    model = nn.Sequential()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.flatten = nn.Flatten()
    model.classifier = nn.Sequential(nn.Linear(cin, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, num_classes))
    return model


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def layer_outputs(model, batches, types):
    """float64 NumPy concatenation of every matching layer's outputs over the batches (the reference)."""
    outs, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, types):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: outs.setdefault(name, []).append(o.detach().double().numpy())))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {k: np.concatenate(v) for k, v in outs.items()}


def check_identity(model, batches, after=(nn.Conv2d, nn.Linear)):
    state = copy.deepcopy(model.state_dict())
    new = insert_batchnorm(model, batches, after=after)
    for k, v in model.state_dict().items():  # the original is unchanged
        assert torch.equal(v, state[k])
    assert not any(m._forward_hooks for m in model.modules())
    n_layers = sum(isinstance(m, after) for m in model.modules())
    bns = [m for m in new.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == n_layers
    # the statistics are those of each layer's output over all the data, exactly merged
    ref = layer_outputs(model.eval(), batches, after)
    for name, out in ref.items():
        bn = new.get_submodule(name)[1]
        axes = (0,) + tuple(range(2, out.ndim))
        np.testing.assert_allclose(bn.running_mean.double().numpy(), out.mean(axes), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), out.var(axes), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(bn.weight.detach().double().numpy(), np.sqrt(out.var(axes) + bn.eps),
                                   rtol=1e-5)
    X = torch.cat(batches)
    with torch.no_grad():
        assert rel(new.eval()(X), model.eval()(X)) <= 1e-5, "eval mode"
        # training mode on the whole calibration set as one batch: batch statistics = the population's
        # (dropout kept in eval mode: with it active, the layers after it see other inputs than calibrated)
        for m in (new, model):
            m.train()
            for d in m.modules():
                if isinstance(d, nn.Dropout):
                    d.eval()
        assert rel(new(X), model(X)) <= 1e-5, "training mode"
    return new


def test_vgg11_shaped_network():
    torch.manual_seed(0)
    model = vgg11_shaped()
    batches = [torch.randn(n, 3, 32, 32) * 2 + 0.5 for n in (16, 7, 16)]
    new = check_identity(model, batches)
    assert isinstance(new.features[0], nn.Sequential) and isinstance(new.features[0][1], nn.BatchNorm2d)
    assert isinstance(new.classifier[0][1], nn.BatchNorm1d)


@pytest.mark.skipif(real_package("torchvision") is None, reason="torchvision does not import here")
def test_torchvision_vgg11():  # pragma: no cover - runs where torchvision imports
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None, num_classes=10)
    check_identity(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])


def test_small_mlp_and_tuple_batches():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    batches = [torch.randn(n, 6, dtype=torch.float64) * 3 + 1 for n in (5, 1, 12)]
    new = check_identity(model, batches, after=nn.Linear)
    assert new[0][1].weight.dtype == torch.float64 and new[0][1].momentum == 0.1
    new1 = insert_batchnorm(model, batches, after=nn.Linear)
    new2 = insert_batchnorm(model, [(b,) for b in batches], after=(nn.Linear,), eps=1e-3, momentum=None)
    assert new2[2][1].eps == 1e-3 and new2[2][1].momentum is None
    assert torch.equal(new2[2][1].running_mean, new1[2][1].running_mean)


def test_refusals_and_warnings():
    lin3d = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="last axis"):
        insert_batchnorm(lin3d, [torch.randn(2, 5, 4)])
    with pytest.raises(ValueError, match="empty"):
        insert_batchnorm(lin3d, [])
    with pytest.raises(TypeError, match="after"):
        insert_batchnorm(lin3d, [torch.randn(2, 4)], after="Linear")
    with pytest.raises(TypeError, match="iterable"):
        insert_batchnorm(lin3d, torch.randn(2, 4))
    with pytest.raises(ValueError, match="eps"):
        insert_batchnorm(lin3d, [torch.randn(2, 4)], eps=0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(self.used(x))

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        new = insert_batchnorm(TwoHeads(), [torch.randn(8, 4)])
    text = " ".join(str(x.message) for x in w)
    assert "unused" in text and "more than once" in text
    assert isinstance(new.used, nn.Sequential) and isinstance(new.unused, nn.Linear)


# ------------------------------------------------------------------------------ fastbn.identity_init

def test_identity_init_on_fastbn_layers():
    rng = np.random.default_rng(0)
    W1, W2 = rng.normal(size=(8, 5)), rng.normal(size=(4, 8))
    bn1 = fastbn.BatchNorm(8, activation="relu", dtype=np.float64)
    bn2 = fastbn.BatchNorm(4, dtype=np.float64)

    def model(x):  # dense layers with a BN (+ReLU) after each
        return bn2(bn1(x @ W1.T) @ W2.T)

    def plain(x):  # what it computes with identity BNs
        return np.maximum(x @ W1.T, 0) @ W2.T

    batches = [rng.normal(2.0, 3.0, (n, 5)) for n in (9, 3, 20)]
    stats = fastbn.identity_init([bn1, bn2], batches, forward=model)
    X = np.concatenate(batches)
    h1 = X @ W1.T
    np.testing.assert_allclose(stats[0].mean, h1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn1.running_var, h1.var(0), rtol=1e-12)
    np.testing.assert_allclose(bn1.gamma, np.sqrt(h1.var(0) + bn1.eps), rtol=1e-12)
    np.testing.assert_allclose(bn2.running_mean, (np.maximum(h1, 0) @ W2.T).mean(0), rtol=1e-12)
    assert "forward" not in vars(bn1)
    bn1.eval(), bn2.eval()
    np.testing.assert_allclose(model(X[:4]), plain(X[:4]), rtol=1e-10, atol=1e-10)
    bn1.train(), bn2.train()  # training mode on all the data as one batch (updates the running stats)
    np.testing.assert_allclose(model(X), plain(X), rtol=1e-10, atol=1e-10)


def test_identity_init_single_layer_and_errors():
    rng = np.random.default_rng(1)
    bn = fastbn.BatchNorm(3, renorm=True)
    batches = [rng.normal(1.0, 2.0, (8, 3, 4, 4)).astype(np.float32) for _ in range(3)]
    s = fastbn.identity_init(bn, batches)
    allx = np.concatenate(batches).astype(np.float64)
    np.testing.assert_allclose(s.var, allx.var((0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(bn.renorm_std, np.sqrt(s.var + bn.eps), rtol=1e-6)
    bn.eval()
    np.testing.assert_allclose(bn(batches[0]), batches[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="affine=True"):
        fastbn.identity_init(fastbn.BatchNorm(3, affine=False), batches)
    with pytest.raises(ValueError, match="forward="):
        fastbn.identity_init([bn, bn], batches)
    with pytest.raises(TypeError, match="layers"):
        fastbn.identity_init("bn", batches)
