"""Insert batch norm into a network trained without it, initialized so that the network is unchanged.

Each new BN after a layer gets the population statistics of that layer's output over calibration data
(one pass, each batch's exact partial merged with Chan's formula: :func:`fastbn.partial_stats`,
:func:`fastbn.merge_stats`) and ``weight = sqrt(var + eps)``, ``bias = mean``, ``running_mean = mean``,
``running_var = var`` (the *biased* population variance, the one in ``weight``): in eval mode the BN is
then the identity map (to rounding), and in training mode on the whole calibration set as one batch,
where the batch statistics are the population ones, too. VGG and its kind gain BN for fine-tuning
without losing what they compute.
"""
from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from fastbn.stats import Stats, merge_stats, partial_stats

__all__ = ["insert_batchnorm"]

_BN_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class _Recorder:
    """Merged statistics of axis 1 of every output of one layer, and how it was called."""

    def __init__(self, name: str, layer: nn.Module):
        self.name = name
        self.layer = layer
        self.total: Stats | None = None
        self.ndim: int | None = None
        self.calls = 0

    def __call__(self, module: nn.Module, inputs: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(f"insert_batchnorm: {self.name} ({type(module).__name__}) returns "
                            f"{type(out).__name__}, not a floating-point tensor")
        if out.dim() < 2 or out.dim() > 5:
            raise ValueError(f"insert_batchnorm: {self.name} returns a {out.dim()}-D tensor; batch norm "
                             "needs (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)")
        if isinstance(module, nn.Linear) and out.dim() != 2:
            raise ValueError(f"insert_batchnorm: {self.name} (Linear) returns shape {tuple(out.shape)}: its "
                             "features are the last axis, but batch norm normalizes axis 1; only (N, C) works")
        if self.ndim is not None and out.dim() != self.ndim:
            raise ValueError(f"insert_batchnorm: {self.name} returned {self.ndim}-D and then {out.dim()}-D "
                             "tensors")
        self.ndim = out.dim()
        a = out.detach().cpu()
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        part = partial_stats(a.numpy(), axis=1)
        if self.total is not None and part.mean.shape != self.total.mean.shape:
            raise ValueError(f"insert_batchnorm: {self.name} returned {part.mean.shape[0]} channels, earlier "
                             f"{self.total.mean.shape[0]}")
        self.total = part if self.total is None else merge_stats(
            [self.total.count, part.count], [self.total.mean, part.mean], [self.total.m2, part.m2])
        self.calls += 1


def _check_after(after: Any) -> tuple[type, ...]:
    types = (after,) if isinstance(after, type) else tuple(after) if isinstance(after, (tuple, list)) else None
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"after must be a torch.nn.Module subclass or a tuple of them, got {after!r}")
    return types


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def insert_batchnorm(model: nn.Module, batches: Iterable, *, after: Any = (nn.Conv2d, nn.Linear),
                     eps: float = 1e-5, momentum: float | None = 0.1) -> nn.Module:
    """A copy of ``model`` with an identity-initialized batch norm after every layer of the ``after`` types.

    Each matching submodule ``layer`` becomes ``nn.Sequential(layer, bn)`` (``BatchNorm1d`` for (N, C) and
    (N, C, L) outputs, ``BatchNorm2d`` for 4-D, ``BatchNorm3d`` for 5-D), with the population statistics
    of the layer's output over ``batches`` (one pass, in eval mode, without gradients; exact merging of
    the batches in float64): ``running_mean`` = mean, ``running_var`` = biased variance, ``weight`` =
    sqrt(var + eps), ``bias`` = mean. The new model's output equals the original's in eval mode (float32:
    to ~1e-6 relative) and, in training mode, on the whole calibration set as one batch (for layers that
    see the same inputs in training mode as in eval mode: not after an active Dropout). Fine-tune it
    like any model with BN (``fastbn.torch.convert`` runs the new layers on fastbn's kernels). ``model``
    is not modified; the copy keeps its training mode. Layers never called on the batches are left
    alone (with a warning), as are layers called more than once per batch only with a warning (the BN
    is still the identity in eval mode, but in training mode each call has its own batch statistics).

    Parameters
    ----------
    model : torch.nn.Module (float32/float64 outputs at the matching layers).
    batches : iterable of inputs: a tensor (``model(batch)``) or a tuple/list (``model(*batch)``); for a
        loader of (x, label) pairs pass ``(x for x, _ in loader)``.
    after : a module class or tuple of classes (subclasses match too); default Conv2d and Linear.
        A Linear must produce (N, C) (batch norm normalizes axis 1).
    eps, momentum : the new layers' ``eps`` and ``momentum`` (``None``: cumulative average).

    Returns
    -------
    torch.nn.Module: the new model.

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> from fastbn.torch import insert_batchnorm
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    >>> data = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    >>> bn_net = insert_batchnorm(net, data)
    >>> bn_net[0]
    Sequential(
      (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
      (1): BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    )
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(bn_net.eval()(x), net(x), rtol=1e-5, atol=1e-6)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise TypeError("batches must be an iterable of inputs (a list, a generator, a data loader), got "
                        f"{type(batches).__name__}; wrap a single batch in a list")
    types = _check_after(after)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < float(eps) < float("inf"):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
                                 or not 0.0 <= float(momentum) <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
    new = copy.deepcopy(model)
    targets = [(name, m) for name, m in new.named_modules() if isinstance(m, types)]
    if not targets:
        raise ValueError(f"insert_batchnorm: model has no {' / '.join(t.__name__ for t in types)} module")
    recorders = [_Recorder(name or "(the model itself)", m) for name, m in targets]
    handles = [m.register_forward_hook(r) for (_, m), r in zip(targets, recorders)]
    training = new.training
    n_batches = 0
    multi: set[str] = set()
    try:
        new.eval()
        with torch.no_grad():
            for batch in batches:
                before = [r.calls for r in recorders]
                new(*batch) if isinstance(batch, (tuple, list)) else new(batch)
                multi.update(r.name for r, b in zip(recorders, before) if r.calls - b > 1)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        new.train(training)
    if n_batches == 0:
        raise ValueError("insert_batchnorm: batches is empty")
    unused = [r.name for r in recorders if r.total is None]
    if unused:
        warnings.warn(f"insert_batchnorm: no batch norm after {unused}: not called on the batches", stacklevel=2)
    if multi:
        warnings.warn(f"insert_batchnorm: {sorted(multi)} are called more than once per batch: their batch "
                      "norm is the identity in eval mode only", stacklevel=2)
    for (name, layer), r in reversed(list(zip(targets, recorders))):  # inner ones first: paths stay valid
        if r.total is None:
            continue
        n = float(r.total.count[0])
        if n < 2:
            raise ValueError(f"insert_batchnorm: {r.name} produced {int(n)} value(s) per channel; need >= 2")
        mean = r.total.mean
        var = r.total.m2 / n
        ref = next(iter(layer.parameters()), None)
        kw = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {}
        bn = _BN_FOR_RANK[r.ndim](mean.shape[0], eps=float(eps), momentum=momentum, **kw)
        with torch.no_grad():
            for t, v in ((bn.weight, np.sqrt(var + float(eps))), (bn.bias, mean), (bn.running_mean, mean),
                         (bn.running_var, var)):
                t.copy_(torch.from_numpy(v))
        bn.train(training)
        wrapped = nn.Sequential(layer, bn)
        wrapped.train(training)
        if name:
            _set_child(new, name, wrapped)
        else:
            new = wrapped
    return new
