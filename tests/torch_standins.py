"""Faithful stand-ins for timm's and torchvision's BN classes (neither installs with the CPU torch build here:
PyPI's torchvision wheel links libtorch_cuda, and timm imports torchvision).

Copied from timm 1.0.31 (timm/layers/norm_act.py BatchNormAct2d, timm/layers/drop.py DropPath) and
torchvision 0.28.0 (torchvision/ops/misc.py FrozenBatchNorm2d), with only their imports replaced. The
tests that use the real packages (``real_timm`` / ``real_torchvision``) run where they import.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

_assert = torch._assert  # timm.layers.trace_utils


def real_package(name: str) -> Any:
    """The package if it imports (torchvision from PyPI raises RuntimeError here, not ImportError)."""
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001
        return None


def drop_path(x, drop_prob: float = 0., training: bool = False, scale_by_keep: bool = True):
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0., scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d (act_layer given as a class, timm's create_act_layer reduced to a call)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, act_kwargs=None, inplace=True, drop_layer=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act_kwargs = dict(act_kwargs or {})
        if act_layer in (nn.ReLU, nn.SiLU):
            act_kwargs.setdefault("inplace", inplace)
        self.act = act_layer(**act_kwargs) if apply_act and act_layer is not None else nn.Identity()

    def forward(self, x):
        _assert(x.ndim == 4, f'expected 4D input (got {x.ndim}D input)')
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        num_batches_tracked_key = prefix + "num_batches_tracked"
        if num_batches_tracked_key in state_dict:
            del state_dict[num_batches_tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class ScaledBN(nn.BatchNorm2d):
    """Not BN-then-something: it rescales its input first (convert and fold_model must refuse it)."""

    def forward(self, x):
        return super().forward(x * 2.0)


class ResidualBN(nn.BatchNorm2d):
    """Not BN-then-something: the output depends on the input besides through the BN."""

    def forward(self, x):
        return super().forward(x) + x


class SiluBN(nn.BatchNorm2d):
    """BN followed by SiLU, written with super().forward (so the trace goes through _BatchNorm.forward)."""

    def forward(self, x):
        return F.silu(super().forward(x))


class ConvNormAct(nn.Module):
    """timm.layers.ConvNormAct's structure: conv and BatchNormAct2d attributes, not a Sequential."""

    def __init__(self, cin, cout, act_layer=nn.ReLU, drop_layer=None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(cout, act_layer=act_layer, drop_layer=drop_layer)

    def forward(self, x):
        return self.bn(self.conv(x))


class TinyTimmNet(nn.Module):
    """A timm-style classifier: own methods and attributes that fold_model must keep."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.num_classes = num_classes
        self.default_cfg = {"architecture": "tiny", "input_size": (3, 8, 8)}
        self.stem = ConvNormAct(3, 8)
        self.blocks = nn.Sequential(ConvNormAct(8, 8, act_layer=nn.SiLU, drop_layer=lambda: DropPath(0.2)),
                                    ConvNormAct(8, 6, act_layer=nn.Identity))
        self.head = nn.Linear(6, num_classes)

    def forward_features(self, x):
        return self.blocks(self.stem(x))

    def forward_head(self, x):
        return self.head(x.mean((2, 3)))

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
