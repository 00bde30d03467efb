"""PyTorch integration (optional extra ``fastbn[torch]``); ``import fastbn.torch`` imports torch.

- ``fold_model(module)``: fold BatchNorm layers into the preceding Conv/ConvTranspose/Linear layers.
- ``BatchNorm1d/2d/3d``: drop-in subclasses of torch's modules running fastbn kernels.
- ``convert(module)``: swap every ``nn.BatchNorm*d`` of a model for the drop-in.

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
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastbn.torch' has no attribute {name!r}")
