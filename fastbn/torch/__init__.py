"""PyTorch integration (optional extra ``fastbn[torch]``); ``import fastbn.torch`` imports torch.

What lives where:

- ``_modules.py``: ``BatchNorm1d/2d/3d``, drop-in subclasses of torch's modules running fastbn's kernels,
  and ``convert(module)``, which swaps a model's batch norms for them in place (BN subclasses whose
  forward is batch norm followed by something, e.g. timm's ``BatchNormAct2d``, included).
- ``_sync.py``: ``SyncBatchNorm`` (torch.distributed on CPU tensors: gloo, MPI) and
  ``convert_sync_batchnorm(module, process_group=None)``.
- ``_fold.py``: ``fold_model(module, example_inputs=None, *, return_report=False)``, folding eval-mode
  batch norm into the preceding Conv/ConvTranspose/Linear, and its ``FoldReport``.
- ``_insert.py``: ``insert_batchnorm(model, batches, ...)``, adding identity-initialized BN after the
  layers of a network trained without BN.
- ``_bnlike.py`` (internal): what a BN-like module computes (plain, BN + tail, frozen), from an fx
  trace of its forward; used by ``convert`` and ``fold_model``.

Names resolve on first access, so each piece imports only what it needs.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "fold_model": "fastbn.torch._fold",
    "FoldReport": "fastbn.torch._fold",
    "FoldEntry": "fastbn.torch._fold",
    "BatchNorm1d": "fastbn.torch._modules",
    "BatchNorm2d": "fastbn.torch._modules",
    "BatchNorm3d": "fastbn.torch._modules",
    "convert": "fastbn.torch._modules",
    "SyncBatchNorm": "fastbn.torch._sync",
    "convert_sync_batchnorm": "fastbn.torch._sync",
    "insert_batchnorm": "fastbn.torch._insert",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        try:
            module = importlib.import_module(_EXPORTS[name])
        except ModuleNotFoundError as exc:
            if exc.name != "torch" and not (exc.name or "").startswith("torch."):
                raise
            raise ModuleNotFoundError(f"fastbn.torch.{name} needs PyTorch, an optional extra: "
                                      f'pip install "fastbn[torch]"', name=exc.name) from exc
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastbn.torch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
