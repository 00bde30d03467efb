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
    "BatchNorm1d": "fastbn.torch._modules",
    "BatchNorm2d": "fastbn.torch._modules",
    "BatchNorm3d": "fastbn.torch._modules",
    "convert": "fastbn.torch._modules",
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
