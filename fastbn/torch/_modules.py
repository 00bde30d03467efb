"""Drop-in ``BatchNorm1d/2d/3d`` for PyTorch on the CPU, running fastbn's kernels, and ``convert``.

``convert`` also takes BN subclasses whose forward is batch norm followed by something (timm's
``BatchNormAct2d``: BN, drop path, activation): their class becomes a subclass of the original running
fastbn's batch norm and then the original's tail (ReLU fused into the kernels when the tail is a ReLU).

The modules subclass torch's own (same constructor, parameters, buffers and state_dict; ``isinstance(m,
nn.BatchNorm2d)`` stays true). Their forward and backward run fastbn through a
``torch.autograd.Function`` on zero-copy NumPy views of the tensors: a ``channels_last`` tensor is a
permuted C-ordered array, which fastbn uses as is and whose layout the output keeps. float16 and
bfloat16 inputs run fastbn's half-precision kernels (float32 arithmetic, float64 statistics, results
rounded once) with float32 parameters and buffers, or parameters and buffers of the input's dtype, as
torch allows. Inputs fastbn does not handle (CUDA or other devices, a float32/float64 input with
parameters of another dtype, an empty batch, TorchScript or ``torch.compile`` tracing) run torch's own
implementation.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastbn._validate import check_running_var
from fastbn.functional import batch_norm_backward, batch_norm_infer, batch_norm_train
from fastbn.fused import (apply_core, backward_core, batch_norm_relu_backward, batch_norm_relu_infer,
                          batch_norm_relu_train, train_core)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]

_DTYPES = (torch.float32, torch.float64)
# 2-byte inputs, computed in float32; their parameters and buffers may be float32 or the input's dtype
_HALF = (torch.float16, torch.bfloat16)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


def _bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's NumPy view; bfloat16 (which NumPy lacks) as the int16 array of its bits, which fastbn's
    kernels read as bfloat16 (``fastbn._run._bits``)."""
    t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor on a NumPy result of ``dtype`` (int16 bits for bfloat16, see _bits)."""
    t = torch.from_numpy(a)
    return t.view(dtype) if t.dtype != dtype else t


def _f64(t: torch.Tensor | None, C: int, fill: float) -> np.ndarray:
    """A per-channel tensor as a float64 array (``fill`` where it is None)."""
    return np.full(C, fill) if t is None else t.detach().to(torch.float64).numpy()


def _half_forward(x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, relu):
    """(y, mean, invstd) of a float16/bfloat16 input through fastbn.fused's entry points for validated
    arrays (bfloat16 has no NumPy dtype without ml_dtypes, so it cannot go through the public API); the
    running buffers, of any float dtype, are updated in float64 and stored once."""
    xa = _bits(x)
    C = xa.shape[1]
    g, b = _f64(weight, C, 1.0), _f64(bias, C, 0.0)
    if use_batch_stats:
        f = train_core(xa, 1, g, b, eps, None, relu, None)
        if running_mean is not None:
            for buf, new in ((running_mean, f.mean), (running_var, f.var * (f.n / (f.n - 1.0)))):
                buf.copy_(torch.from_numpy((1.0 - momentum) * _f64(buf, C, 0.0) + momentum * new))
        return f.y, f.mean, f.invstd
    mean, rv = _f64(running_mean, C, 0.0), _f64(running_var, C, 1.0)
    check_running_var(rv, eps)
    invstd = 1.0 / np.sqrt(rv + eps)
    return apply_core(xa, 1, mean, g * invstd, b, None, relu, None), mean, invstd


def _float_forward(x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, relu):
    """(y, mean, invstd) of a float32/float64 input through the public API; the running buffers (of the
    input's dtype) are updated in place through their NumPy views."""
    xa = x.detach().numpy()
    g, b = _np(weight), _np(bias)
    if use_batch_stats:
        train = batch_norm_relu_train if relu else batch_norm_train
        return train(xa, g, b, axis=1, eps=eps, running_mean=_np(running_mean), running_var=_np(running_var),
                     momentum=momentum)
    rm, rv = _np(running_mean), _np(running_var)
    y = (batch_norm_relu_infer if relu else batch_norm_infer)(xa, rm, rv, g, b, axis=1, eps=eps)
    return y, rm.astype(np.float64), 1.0 / np.sqrt(rv.astype(np.float64) + eps)


class _FastBatchNormFn(torch.autograd.Function):
    """y = batch_norm(x) (then ReLU if ``relu``) via fastbn; backward via fastbn (training or frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, relu):
        if x.dtype in _HALF:
            y, mean, invstd = _half_forward(x, weight, bias, running_mean, running_var, use_batch_stats,
                                            momentum, eps, relu)
        else:
            y, mean, invstd = _float_forward(x, weight, bias, running_mean, running_var, use_batch_stats,
                                             momentum, eps, relu)
        out = _tensor(y, x.dtype)
        ctx.save_for_backward(x, weight, out if relu else None)
        ctx.fastbn_stats = (mean, invstd, not use_batch_stats)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        mean, invstd, frozen = ctx.fastbn_stats
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        if x.dtype in _HALF:  # see _half_forward
            g = _f64(weight, x.shape[1], 1.0)
            dx, dgamma, dbeta, _ = backward_core(_bits(dy), _bits(x), None if y is None else _bits(y), 1, mean,
                                                 invstd, g, None, False, None, frozen)
        elif y is None:
            dx, dgamma, dbeta = batch_norm_backward(dy.detach().numpy(), x.detach().numpy(), mean, invstd,
                                                    _np(weight), axis=1, frozen=frozen)
        else:  # the ReLU mask is y > 0, applied inside the backward's passes
            dx, dgamma, dbeta, _ = batch_norm_relu_backward(dy.detach().numpy(), x.detach().numpy(),
                                                            y.numpy(), mean, invstd, _np(weight), axis=1,
                                                            frozen=frozen)
        need = ctx.needs_input_grad
        dx_t = _tensor(dx, x.dtype) if need[0] else None
        dw = torch.from_numpy(dgamma).to(weight.dtype) if need[1] else None
        db = torch.from_numpy(dbeta).to(weight.dtype) if need[2] else None
        return dx_t, dw, db, None, None, None, None, None, None


def _compiling() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and getattr(comp, "is_compiling", lambda: False)())


class _FastBatchNormMixin:
    """forward() of torch's ``_BatchNorm`` with fastbn doing the arithmetic."""

    def _fastbn_supports(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.layout != torch.strided or x.numel() == 0:
            return False
        if x.dtype in _DTYPES:
            params = (x.dtype,)
        elif x.dtype in _HALF:
            params = (x.dtype, torch.float32)
        else:
            return False
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None and (t.device.type != "cpu" or t.dtype not in params):
                return False
        return not _compiling()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._fastbn_supports(input):
            return super().forward(input)
        return self._fastbn_forward(input, False)

    def _fastbn_forward(self, input: torch.Tensor, relu: bool) -> torch.Tensor:
        self._check_input_dim(input)
        # the same decisions as torch.nn.modules.batchnorm._BatchNorm.forward
        factor = 0.0 if self.momentum is None else self.momentum
        count = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if count and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)  # cumulative moving average
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        y = _FastBatchNormFn.apply(input, self.weight, self.bias, self.running_mean if keep else None,
                                   self.running_var if keep else None, use_batch_stats, factor, self.eps,
                                   relu)
        if count:  # after the call succeeded (torch counts before its size check)
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_FastBatchNormMixin, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` whose CPU forward/backward run fastbn kernels (same arguments).

    Input (N, C) or (N, C, L), float32/float64/float16/bfloat16. Example::

        >>> import torch, fastbn.torch as fbt
        >>> bn = fbt.BatchNorm1d(16)
        >>> y = bn(torch.randn(32, 16, requires_grad=True)); y.sum().backward()
    """


class BatchNorm2d(_FastBatchNormMixin, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` whose CPU forward/backward run fastbn kernels (same arguments).

    Input (N, C, H, W), float32/float64/float16/bfloat16, contiguous or ``channels_last`` (used without
    a copy; the output and dx keep the input's memory format). Example::

        >>> import torch, fastbn.torch as fbt
        >>> bn = fbt.BatchNorm2d(8)
        >>> x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
        >>> y = bn(x); y.square().sum().backward()
        >>> y.is_contiguous(memory_format=torch.channels_last)
        True
    """


class BatchNorm3d(_FastBatchNormMixin, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` whose CPU forward/backward run fastbn kernels (same arguments).

    Input (N, C, D, H, W), float32/float64/float16/bfloat16, contiguous or ``channels_last_3d``. Example::

        >>> import torch, fastbn.torch as fbt
        >>> y = fbt.BatchNorm3d(4)(torch.randn(2, 4, 3, 5, 5))
    """


_SWAP = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


class _FastTailMixin(_FastBatchNormMixin):
    """forward() of a converted BN subclass: fastbn's batch norm, then the original forward's tail.

    ``self._fastbn_tail`` (a :class:`fastbn.torch._bnlike.Tail`) holds what the original forward does
    after its batch norm; when it is (now) a single ReLU, the ReLU runs fused in fastbn's kernels.
    Inputs fastbn does not handle run the original class's forward.
    """

    def forward(self, input: torch.Tensor) -> Any:
        if not self._fastbn_supports(input):
            return super().forward(input)
        tail = self._fastbn_tail
        relu = tail.single_relu(self)
        y = self._fastbn_forward(input, relu)
        return y if relu else tail(self, y)

    def __reduce_ex__(self, protocol: int) -> Any:
        # the class is made at run time: pickle as the original class, converted again on loading
        return _reconvert, (type(self).__bases__[1],), self.__getstate__()


_SUBCLASSES: dict[type, type] = {}


def _fast_subclass(cls: type) -> type:
    new = _SUBCLASSES.get(cls)
    if new is None:
        new = type(f"Fast{cls.__name__}", (_FastTailMixin, cls),
                   {"__module__": __name__, "__doc__": f"{cls.__qualname__} running fastbn's batch norm "
                                                       "(made by fastbn.torch.convert)."})
        _SUBCLASSES[cls] = new
    return new


def _reconvert(cls: type) -> nn.Module:
    obj = cls.__new__(cls)
    obj.__class__ = _fast_subclass(cls)
    return obj


def _subclass_tail(m: nn.Module) -> Any:
    """The tail of a BN subclass's forward (the same in training and eval mode), or NotBatchNorm."""
    from fastbn.torch._bnlike import NotBatchNorm, _bn_tail

    if isinstance(m, nn.SyncBatchNorm):
        raise NotBatchNorm("a SyncBatchNorm subclass (synchronizes across processes; see "
                           "fastbn.torch.convert_sync_batchnorm)")
    tails = [_bn_tail(m, training) for training in (True, False)]
    if tails[0].code.src != tails[1].code.src:
        raise NotBatchNorm("what follows its batch norm differs between training and eval mode")
    return tails[1]


def convert(module: nn.Module, *, strict: bool = False) -> nn.Module:
    """Make every batch norm in ``module`` (itself included) run fastbn's kernels, in place; return it.

    - ``nn.BatchNorm1d/2d/3d`` (exact types) become :class:`BatchNorm1d` & co., ``nn.SyncBatchNorm``
      becomes :class:`fastbn.torch.SyncBatchNorm` (which also runs on CPU tensors).
    - Subclasses whose forward is batch norm followed by something (timm's ``BatchNormAct2d``: BN, drop
      path, activation; any ``F.silu(super().forward(x))``) become a subclass of their own class
      (``isinstance`` still holds) that runs fastbn's batch norm and then that something, unchanged;
      when it is a ReLU (after optional ``nn.Identity``), fused BN + ReLU kernels run instead. The
      module's forward is traced with ``torch.fx`` to establish this.
    - Other subclasses (anything else in their forward, SyncBatchNorm) are left alone and named in a
      warning (``strict=True``: a ValueError, with nothing converted).

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm`` it returns the model, but the swap changes the
    modules' classes in place: parameters, buffers, hooks, training mode and optimizers holding the
    parameters are untouched, and ``state_dict`` keys do not change. Input fastbn does not handle
    (other devices, ...) runs torch's (or the subclass's own) forward.

    Parameters
    ----------
    module : torch.nn.Module.
    strict : raise instead of warning when a BN subclass cannot be converted.

    Example
    -------
    >>> import torch, fastbn.torch as fbt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> model = fbt.convert(model)
    >>> type(model[1]).__name__, isinstance(model[1], torch.nn.BatchNorm2d)
    ('BatchNorm2d', True)
    >>> type(model[1]).__module__
    'fastbn.torch._modules'
    """
    from fastbn.torch._bnlike import NotBatchNorm

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    from fastbn.torch._sync import SyncBatchNorm

    swap = {**_SWAP, nn.SyncBatchNorm: SyncBatchNorm}
    plan: list[tuple[nn.Module, type, Any]] = []
    refused: list[str] = []
    for name, m in module.named_modules():
        cls = swap.get(type(m))
        if cls is not None:
            plan.append((m, cls, None))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FastBatchNormMixin):
            try:
                plan.append((m, _fast_subclass(type(m)), _subclass_tail(m)))
            except NotBatchNorm as e:
                refused.append(f"{name or '(the module itself)'} ({type(m).__qualname__}: {e})")
    if refused and strict:
        raise ValueError("convert: cannot convert " + "; ".join(refused))
    for m, cls, tail in plan:
        if tail is not None:
            m._fastbn_tail = tail
        m.__class__ = cls
    if refused:
        warnings.warn("fastbn.torch.convert left these batch norm subclasses as they are (their forward is "
                      "not batch norm followed by something): " + "; ".join(refused), stacklevel=2)
    return module
