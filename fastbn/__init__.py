"""fastbn: Numba-jitted, parallel CPU kernels for batch normalization.

Public API (NumPy arrays in and out; see the README for examples):

- ``batch_norm_train``, ``batch_norm_infer``, ``batch_norm_backward``: the functional kernels.
- ``fastbn.kernels``: the jitted kernels themselves, callable from a user's ``@numba.njit`` code.
- ``fold_conv``, ``fold_dense``, ... : folding frozen BN into neighbouring linear layers.
- ``partial_stats``, ``merge_stats``, ``precise_statistics``, ``update_bn_stats``, ``identity_init``:
  exact statistics over many batches, precise BN, identity initialization of new BN layers.
- ``fastbn.onnx``, ``fastbn.torch``, ``fastbn.distributed``: optional integrations, imported on first use.

``import fastbn`` imports numpy and numba only and compiles nothing: names are resolved on first access
(PEP 562), and kernels compile (or load from Numba's on-disk cache) on their first call.

Example
-------
>>> import numpy as np, fastbn
>>> x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4, 8, 8)).astype(np.float32)  # (N, C, H, W)
>>> rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)     # running statistics, updated in place
>>> y, mean, invstd = fastbn.batch_norm_train(x, running_mean=rm, running_var=rv)
>>> y.shape, y.dtype.name, mean.shape, mean.dtype.name           # y like x; statistics float64 (C,)
((16, 4, 8, 8), 'float32', (4,), 'float64')
>>> y_eval = fastbn.batch_norm_infer(x, rm, rv)                  # inference: the running statistics
>>> round(float(abs(y.mean())), 4), y_eval.dtype.name
(0.0, 'float32')
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "batch_norm_train": "fastbn.functional",
    "batch_norm_infer": "fastbn.functional",
    "batch_norm_backward": "fastbn.functional",
    "batch_norm_backward_frozen": "fastbn.functional",
    "TrainStats": "fastbn.functional",
    "BackwardResult": "fastbn.functional",
    "fold_conv": "fastbn.fold",
    "fold_dense": "fastbn.fold",
    "fold_conv_keras": "fastbn.fold",
    "fold_dense_keras": "fastbn.fold",
    "fold_dense_before": "fastbn.fold",
    "fold_conv_before": "fastbn.fold",
    "bn_to_affine": "fastbn.fold",
    "BatchNorm": "fastbn.layer",
    "batch_norm_relu_train": "fastbn.fused",
    "batch_norm_relu_infer": "fastbn.fused",
    "batch_norm_relu_backward": "fastbn.fused",
    "ReluBackwardResult": "fastbn.fused",
    "partial_stats": "fastbn.stats",
    "merge_stats": "fastbn.stats",
    "Stats": "fastbn.stats",
    "precise_statistics": "fastbn.precise",
    "update_bn_stats": "fastbn.precise",
    "PopulationStats": "fastbn.precise",
    "identity_init": "fastbn.identity",
    "SyncBatchNorm": "fastbn.distributed",
}
_SUBMODULES = {"kernels", "functional", "fold", "onnx", "torch", "distributed", "cases", "layer", "fused",
               "stats", "precise", "identity"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastbn.{name}")
    raise AttributeError(f"module 'fastbn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fastbn.fold import (bn_to_affine, fold_conv, fold_conv_before, fold_conv_keras,  # noqa: F401
                             fold_dense, fold_dense_before, fold_dense_keras)
    from fastbn.functional import (BackwardResult, TrainStats, batch_norm_backward,  # noqa: F401
                                   batch_norm_backward_frozen, batch_norm_infer, batch_norm_train)
