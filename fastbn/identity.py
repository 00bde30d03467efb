"""Identity initialization of fastbn BatchNorm layers: statistics from data, gamma/beta undoing them.

A BN layer added to a network that was trained without it can start as the identity map: with the
population mean and (biased) variance of its inputs, ``gamma = sqrt(var + eps)`` and ``beta = mean`` undo
the normalization, and ``running_mean = mean``, ``running_var = var`` make the eval-mode map exactly
``x * 1 + 0`` (to rounding). The PyTorch counterpart is :func:`fastbn.torch.insert_batchnorm`.
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any, Callable

import numpy as np

from fastbn.precise import PopulationStats, _Accumulator, _finish, check_layers_args

__all__ = ["identity_init"]


def _identity_forward(layer: Any, acc: _Accumulator) -> Callable:
    """Records the input and returns what the layer computes with its batch norm as the identity."""

    def forward(x, residual=None, *, training=None):
        acc.add(x)
        y = np.array(x, copy=True)
        if residual is not None:
            y += residual
        if getattr(layer, "activation", None) == "relu":
            np.maximum(y, 0, out=y)
        return y

    return forward


def identity_init(layers: Any, batches: Iterable, *, forward: Callable[[Any], Any] | None = None,
                  num_batches: int | None = None, comm: Any = None) -> PopulationStats | list[PopulationStats]:
    """Set BN layers to the identity on the data: gamma = sqrt(var + eps), beta = mean, running stats = stats.

    The interface of :func:`fastbn.update_bn_stats`:

    - ``forward=None``: ``batches`` are the inputs of the single layer ``layers`` (arrays).
    - ``forward=callable``: ``forward(batch)`` runs on every batch (the model's forward); while it runs,
      each layer in ``layers`` records the inputs it receives and returns them unchanged (its activation
      and residual applied as usual: ``act(x [+ residual])``), i.e. the network computes what it will
      compute once the layers are the identity, so every layer sees the inputs it will see. One pass.

    Then, per layer, from the exact population mean and *biased* variance of its inputs (float64, each
    batch merged with Chan's formula, across MPI ranks with ``comm``): ``gamma = sqrt(var + eps)``,
    ``beta = mean``, ``running_mean = mean``, ``running_var = var`` (so eval mode is the identity, and
    training mode on all the data as one batch too), and for renorm layers ``renorm_mean = mean``,
    ``renorm_std = sqrt(var + eps)``; arrays keep their dtype. Nothing is written unless every layer's
    statistics succeed.

    Parameters
    ----------
    layers : a ``fastbn.BatchNorm`` with gamma and beta (``affine=True``), or a list of them.
    batches : iterable of arrays (forward=None) or of whatever ``forward`` takes.
    forward : optional callable run on each batch.
    num_batches : use at most this many batches.
    comm : optional mpi4py communicator (collective; see :func:`fastbn.update_bn_stats`).

    Returns
    -------
    PopulationStats(mean, var, count) of the layer (a list, one per layer, for a list); var biased.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.normal(3.0, 2.0, (32, 4, 5, 5)) for _ in range(3)]
    >>> bn1, bn2 = fastbn.BatchNorm(4, activation="relu"), fastbn.BatchNorm(4)
    >>> model = lambda x: bn2(bn1(x) * 0.5 - 1.0)              # a network that will get the BNs
    >>> s = fastbn.identity_init([bn1, bn2], batches, forward=model)
    >>> x = batches[0]
    >>> ref = np.maximum(x, 0) * 0.5 - 1.0                     # what it computes with identity BNs
    >>> bn1.eval(), bn2.eval()                                 # doctest: +ELLIPSIS
    (...)
    >>> bool(np.allclose(model(x), ref, atol=1e-5))    # float32 parameters: rounding only
    True
    """
    layer_list, single = check_layers_args(layers, batches, forward, num_batches,
                                           ("gamma", "beta", "running_mean", "running_var"),
                                           "affine=True and track_running_stats=True: an identity needs them")

    accs = [_Accumulator(b.axis, f"identity_init (layer {i})") for i, b in enumerate(layer_list)]
    source = batches if num_batches is None else islice(batches, num_batches)
    err = None
    own = [vars(b).get("forward") for b in layer_list]
    try:
        if forward is None:
            for x in source:
                accs[0].add(x)
        else:
            for b, acc in zip(layer_list, accs):
                b.forward = _identity_forward(b, acc)
            for batch in source:
                forward(batch)
    except Exception as e:  # with comm, every rank must still reach the collective
        if comm is None:
            raise
        err = e
    finally:
        if forward is not None:
            for b, f in zip(layer_list, own):
                if f is None:
                    vars(b).pop("forward", None)
                else:
                    b.forward = f
    results = []
    for i, (b, acc) in enumerate(zip(layer_list, accs)):
        s = acc.result(comm, err)
        if s.mean.shape[0] != b.running_mean.shape[0]:
            raise ValueError(f"layer {i} has {b.running_mean.shape[0]} channels but its inputs have "
                             f"{s.mean.shape[0]} (along axis {b.axis})")
        results.append(_finish(s, unbiased=False))
    for b, pop in zip(layer_list, results):  # write only after every layer succeeded
        std = np.sqrt(pop.var + b.eps)
        b.gamma[...] = std
        b.beta[...] = pop.mean
        b.running_mean[...] = pop.mean
        b.running_var[...] = pop.var
        for name, v in (("renorm_mean", pop.mean), ("renorm_std", std), ("moving_std", std)):
            arr = getattr(b, name, None)
            if isinstance(arr, np.ndarray):
                arr[...] = v
    return results[0] if single else results
