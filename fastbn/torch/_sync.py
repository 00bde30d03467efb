"""Synchronized batch norm for ``torch.distributed`` on CPU tensors (gloo, MPI): ``SyncBatchNorm``.

``torch.nn.SyncBatchNorm`` refuses CPU tensors. This subclass runs fastbn's kernels and synchronizes
through ``torch.distributed`` with the algorithm of :mod:`fastbn.distributed` (MPI):

- forward: each rank computes its per-channel partial ``(count, mean, M2)``; the ranks all-gather them
  and every rank merges them in rank order with Chan's formula (:func:`fastbn.merge_stats`), so every
  rank gets the same bits; y is this rank's slice normalized with the global statistics.
- backward: each rank computes ``sum(dy)`` and ``sum(dy * (x - mean))``; the ranks all-gather them and
  add them in rank order; dx uses the global sums and count. ``weight.grad`` / ``bias.grad`` are this
  rank's contributions (as torch's SyncBatchNorm): DDP's all-reduce combines them.

Every collective is preceded by a header exchange ``[ok, C, count, operation]``: invalid input on one rank
(any exception while preparing, not only ValueError), ranks in different operations (one in the forward,
another in the backward) or different channel counts raise on *every* rank instead of leaving the others
waiting in a collective or mixing unrelated statistics. Communication per training step: two all-gathers
of 32 bytes and two of ``16 * C`` bytes sent per rank.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from fastbn import _run
from fastbn.stats import merge_stats
from fastbn.torch._modules import _DTYPES, _HALF, _FastBatchNormMixin, _bits, _f64

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

_FORWARD, _BACKWARD = 1, 2
_OPS = {_FORWARD: "forward", _BACKWARD: "backward"}


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _view3(t: torch.Tensor, fmt: torch.memory_format) -> np.ndarray:
    """The (A, C, B) C-contiguous NumPy view the kernels take: (N, C, rest) or, channels-last, (N*rest, C, 1)
    (bfloat16 as the int16 array of its bits, see ``_modules._bits``)."""
    a = t.detach()
    N, C = a.shape[:2]
    rest = int(np.prod(a.shape[2:], dtype=np.int64))  # explicit: reshape(-1) is ambiguous with N == 0
    if fmt is torch.contiguous_format:
        return _bits(a).reshape(N, C, rest)
    perm = (0,) + tuple(range(2, a.dim())) + (1,)
    return _bits(a.permute(perm)).reshape(N * rest, C, 1)


def _exchange(group: Any, what: str, op: int, error: BaseException | None, C: int, count: int,
              payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All-gather a header ``[ok, C, count, op]``, then (if all is well) a (2, C) float64 payload.

    Collective over ``group``. Returns (counts (P,), gathered (P, 2, C)) in group-rank order. Raises on
    every rank (the failing rank its own error) before the payload exchange when any rank failed, the
    ranks are in different operations, or the channel counts differ.
    """
    P = dist.get_world_size(group)
    head = torch.tensor([0 if error is not None else 1, C, count, op], dtype=torch.int64)
    heads = [torch.empty(4, dtype=torch.int64) for _ in range(P)]
    dist.all_gather(heads, head, group=group)
    h = torch.stack(heads).numpy()
    if error is not None:
        raise error
    bad = np.flatnonzero(h[:, 0] == 0).tolist()
    if bad:
        raise ValueError(f"{what}: invalid input on rank(s) {bad} (the error is raised there); every rank "
                         "raises so that none waits in a collective")
    if (h[:, 3] != op).any():
        ops = [_OPS.get(int(o), f"operation {int(o)}") for o in h[:, 3]]
        raise ValueError(f"{what}: the ranks are in different operations {ops} (in rank order): every rank "
                         "must run the synchronized forward and backward in the same order")
    if (h[:, 1] != C).any():
        raise ValueError(f"{what}: the input must have the same number of channels on every rank, got "
                         f"{h[:, 1].tolist()} (in rank order)")
    parts = [torch.empty((2, C), dtype=torch.float64) for _ in range(P)]
    dist.all_gather(parts, torch.from_numpy(np.ascontiguousarray(payload, dtype=np.float64)), group=group)
    return h[:, 2].astype(np.float64), torch.stack(parts).numpy()


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group, C):
        what = "fastbn.torch.SyncBatchNorm forward"
        err = None
        n_local = 0
        local = np.zeros((2, C))
        try:
            if x.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
            if x.shape[1] != C:
                raise ValueError(f"the input has {x.shape[1]} channels (shape {tuple(x.shape)}); this "
                                 f"SyncBatchNorm has num_features={C}")
            if x.device.type != "cpu" or x.dtype not in _DTYPES + _HALF or x.layout != torch.strided:
                raise TypeError("expected a float32/float64/float16/bfloat16 strided CPU tensor, got "
                                f"{x.dtype} on {x.device}")
            # half inputs: parameters and buffers in float32 or in the input's dtype (as _modules takes them)
            allowed = (x.dtype, torch.float32) if x.dtype in _HALF else (x.dtype,)
            for name, t in (("weight", weight), ("running_mean", running_mean)):
                if t is not None and t.dtype not in allowed:
                    raise TypeError(f"the input is {x.dtype} but {name} is {t.dtype}")
            fmt = _memory_format(x)
            if fmt is torch.contiguous_format:
                x = x.contiguous()
            x3 = _view3(x, fmt)
            y = torch.empty_like(x, memory_format=fmt)
            y3 = _view3(y, fmt)
            n_local = x3.shape[0] * x3.shape[2]
            if n_local:
                local[...] = _run.stats(x3)
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            err = e
        counts, g = _exchange(group, what, _FORWARD, err, C, n_local, local)
        total = merge_stats(counts, g[:, 0], g[:, 1])
        n = float(total.count[0])
        if n <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{int(n)} value(s) per channel over all {len(counts)} rank(s)")
        mean = total.mean
        var = total.m2 / n
        invstd = 1.0 / np.sqrt(var + eps)
        if n_local:
            scale = invstd * _f64(weight, C, 1.0)
            _run.normalize(x3, None, y3, mean, scale, scale, _f64(bias, C, 0.0), 0.0, False)
        if running_mean is not None:  # float64 arithmetic, stored in the buffers' dtype
            with torch.no_grad():
                for buf, new in ((running_mean, mean), (running_var, var * (n / (n - 1.0)))):
                    buf.copy_(torch.from_numpy((1.0 - momentum) * buf.double().numpy() + momentum * new))
        ctx.save_for_backward(weight)
        ctx.fastbn = (x.detach(), mean, invstd, n, C, group, fmt)  # x: possibly a contiguous copy
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        x, mean, invstd, n, C, group, fmt = ctx.fastbn
        what = "fastbn.torch.SyncBatchNorm backward"
        err = None
        local = np.zeros((2, C))
        try:
            if dy.shape != x.shape:
                raise ValueError(f"dy has shape {tuple(dy.shape)}, the input {tuple(x.shape)}")
            dy = dy.to(x.dtype).contiguous(memory_format=fmt)
            x3, dy3 = _view3(x, fmt), _view3(dy, fmt)
            dx = torch.empty_like(x, memory_format=fmt)
            dx3 = _view3(dx, fmt)
            if x3.size:
                local[...] = _run.grad_sums(dy3, x3, None, mean)
        except Exception as e:  # noqa: BLE001
            err = e
        _, g = _exchange(group, what, _BACKWARD, err, C, x.shape[0], local)
        sum_dy = np.zeros(C)
        dot = np.zeros(C)
        for p in range(g.shape[0]):  # rank order: the same bits on every rank
            sum_dy += g[p, 0]
            dot += g[p, 1]
        if x3.size:
            k_dy = _f64(weight, C, 1.0) * invstd
            _run.input_grad(dy3, x3, None, dx3, None,
                            np.stack([mean, k_dy, -k_dy * invstd * invstd * dot / n, -k_dy * sum_dy / n]))
        need = ctx.needs_input_grad
        pdt = x.dtype if weight is None else weight.dtype
        dw = torch.from_numpy(local[1] * invstd).to(pdt) if need[1] else None
        db = torch.from_numpy(local[0]).to(pdt) if need[2] else None
        return (dx if need[0] else None), dw, db, None, None, None, None, None, None


class SyncBatchNorm(_FastBatchNormMixin, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors: fastbn's kernels, statistics over all ranks.

    Same constructor, parameters, buffers and state_dict as torch's. In training mode, with
    ``torch.distributed`` initialized and more than one rank in ``process_group`` (default: the world),
    forward and backward are collective: every rank of the group calls them, in the same order, with its
    own slice of the batch (sizes may differ; a rank may have zero samples), and gets what
    single-process BatchNorm gives on the concatenated batch, restricted to its slice: y, dx, and
    running statistics (global mean and unbiased variance; the same bits on every rank). The weight and
    bias gradients are this rank's contributions, which DDP's gradient all-reduce combines (it averages:
    the sum over ranks divided by the world size, like every other parameter's gradient). Eval mode,
    a world of one, or an uninitialized ``torch.distributed`` behave as :class:`fastbn.torch.BatchNorm2d`
    & co. (no communication). CUDA tensors run torch's own SyncBatchNorm.

    Input: (N, C, *) float32/float64 CPU tensor (channels_last / channels_last_3d used without a copy), or
    float16/bfloat16 with float32 (or the input's dtype) parameters and buffers.
    An invalid input on one rank raises on every rank (see the module docstring).

    Example (``torchrun --nproc_per_node 2 script.py``)::

        >>> import torch, torch.distributed as dist                   # doctest: +SKIP
        >>> from fastbn.torch import SyncBatchNorm                    # doctest: +SKIP
        >>> dist.init_process_group("gloo")                           # doctest: +SKIP
        >>> bn = SyncBatchNorm(16)                                    # doctest: +SKIP
        >>> y = bn(torch.randn(4 + dist.get_rank(), 16, 7, 7))        # global statistics  # doctest: +SKIP
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device, dtype)

    def _world(self) -> int:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        P = self._world()
        if P == 1 or input.device.type != "cpu":
            if input.device.type != "cpu":
                return nn.SyncBatchNorm.forward(self, input)
            return _FastBatchNormMixin.forward(self, input)
        if P < 0:
            raise ValueError("this rank is not a member of the SyncBatchNorm's process_group")
        factor = 0.0 if self.momentum is None else self.momentum
        count = self.track_running_stats and self.num_batches_tracked is not None
        if count and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        keep = self.track_running_stats
        y = _SyncBatchNormFn.apply(input, self.weight, self.bias, self.running_mean if keep else None,
                                   self.running_var if keep else None, float(self.eps), float(factor),
                                   self.process_group or dist.group.WORLD, self.num_features)
        if count:  # after the collective succeeded on every rank
            self.num_batches_tracked.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """See :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


def _allow_in_ddp() -> None:
    """Let DistributedDataParallel wrap CPU modules holding fastbn's SyncBatchNorm.

    DDP refuses every ``nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work with GPU
    modules", ``DistributedDataParallel._passing_sync_batchnorm_handle``) because torch's runs only on
    GPUs. fastbn's is a subclass (as torch's API expects), so that check is wrapped to look only at the
    other SyncBatchNorm layers: torch's own are still refused on CPU.
    """
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel as DDP

    orig = getattr(DDP, "_passing_sync_batchnorm_handle", None)
    if orig is None or getattr(orig, "_fastbn", False):
        return

    def check(self: Any, module: nn.Module) -> Any:
        others = [m for m in module.modules() if not isinstance(m, SyncBatchNorm)]
        return orig(self, SimpleNamespace(modules=lambda: iter(others)))

    check._fastbn = True
    DDP._passing_sync_batchnorm_handle = check


_allow_in_ddp()


def _convertible(m: nn.Module) -> bool:
    from fastbn.torch._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
    return type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNorm1d,
                       BatchNorm2d, BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every batch norm in ``module`` by :class:`SyncBatchNorm`, like torch's class method.

    Converts modules whose type is exactly ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` or fastbn's
    drop-ins: each becomes a new ``SyncBatchNorm`` sharing the original's parameters and buffers (the same
    tensors) and training mode. BN subclasses are left as they are and named in a warning: torch's
    version replaces them too and silently drops whatever their forward adds (timm's activation).
    Returns the converted module (a new object if ``module`` itself is a batch norm).

    Example
    -------
    >>> import torch, fastbn.torch as fbt
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> net = fbt.convert_sync_batchnorm(net)
    >>> type(net[1]).__name__, isinstance(net[1], torch.nn.SyncBatchNorm)
    ('SyncBatchNorm', True)
    """
    import warnings

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    skipped: list[str] = []

    def conv(m: nn.Module, name: str) -> nn.Module:
        if _convertible(m):
            new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                process_group)
            if m.affine:
                with torch.no_grad():
                    new.weight = m.weight
                    new.bias = m.bias
            new.running_mean = m.running_mean
            new.running_var = m.running_var
            new.num_batches_tracked = m.num_batches_tracked
            new.training = m.training
            if hasattr(m, "qconfig"):
                new.qconfig = m.qconfig
            return new
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm):
            skipped.append(f"{name or '(the module itself)'} ({type(m).__qualname__})")
        for child_name, child in m.named_children():
            m.add_module(child_name, conv(child, f"{name}.{child_name}" if name else child_name))
        return m

    out = conv(module, "")
    if skipped:
        warnings.warn("fastbn.torch.convert_sync_batchnorm left these batch norm subclasses as they are "
                      "(local statistics): " + ", ".join(skipped), stacklevel=2)
    return out
