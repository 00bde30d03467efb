"""Precise BN: exact population statistics over many batches, written into a layer's running statistics.

Exponential moving averages of batch statistics lag the weights and weight old batches arbitrarily;
"precise BN" (fvcore's ``update_bn_stats``; Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021)
recomputes the population mean and variance of each BN layer's input over ~10^3-10^4 samples with the
weights fixed. fastbn does it in one pass with O(C) memory: each batch contributes its exact partial
``(count, mean, M2)`` (:func:`fastbn.partial_stats`), merged with Chan's formula, so the result equals the
statistics of the concatenation of all batches (to float64 rounding), whatever the batch sizes. With
``comm=`` the per-rank results are merged across MPI ranks (rank order, identical bits on every rank).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from itertools import islice
from typing import Any, Callable, NamedTuple

import numpy as np

from fastbn._validate import check_flag, normalize_axis
from fastbn.stats import Stats, _merge_pair, partial_stats

__all__ = ["PopulationStats", "precise_statistics", "update_bn_stats"]


class PopulationStats(NamedTuple):
    """Population statistics: ``mean`` and ``var`` float64 ``(C,)``, ``count`` values per channel (int).

    ``var`` is the biased (population) variance ``mean((x - mean)**2)`` unless ``unbiased=True`` was
    asked for; :attr:`var_unbiased` converts.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> batches = [np.random.default_rng(i).normal(5.0, 2.0, (n, 3, 4, 4)) for i, n in enumerate((7, 12))]
    >>> s = fastbn.precise_statistics(batches)                          # (N, C, H, W) batches, C = 3
    >>> s.count, s.mean.shape, s.mean.dtype.name, s.var.shape, s.unbiased     # count: (7 + 12) * 4 * 4
    (304, (3,), 'float64', (3,), False)
    >>> allx = np.concatenate(batches)
    >>> bool(np.allclose(s.var_unbiased, allx.var(axis=(0, 2, 3), ddof=1)))
    True
    """

    mean: np.ndarray
    var: np.ndarray
    count: int
    unbiased: bool = False

    @property
    def var_unbiased(self) -> np.ndarray:
        """Unbiased variance ``m2 / (count - 1)`` (float64 (C,)); what running_var holds."""
        if self.unbiased:
            return self.var
        return self.var * (self.count / (self.count - 1.0))


class _Accumulator:
    """Running (count, mean, m2) of one channel axis, merged batch by batch (O(C) memory)."""

    def __init__(self, axis: int, what: str):
        self.axis = axis
        self.what = what
        self.total: Stats | None = None
        self.batches = 0

    def add(self, x) -> None:
        arr = x if isinstance(x, np.ndarray) else np.asarray(x)
        if arr.ndim < 2:
            raise ValueError(f"{self.what}: batch {self.batches} must have at least 2 dimensions "
                             f"(batch, channels, ...), got shape {arr.shape}")
        try:
            part = partial_stats(arr, axis=normalize_axis(self.axis, arr.ndim))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{self.what}: batch {self.batches}: {e}") from None
        if self.total is None:
            self.total = part
        else:
            C = self.total.mean.shape[0]
            if part.mean.shape[0] != C:
                raise ValueError(f"{self.what}: batch {self.batches} has {part.mean.shape[0]} channels "
                                 f"(axis {self.axis}), the earlier batches {C}")
            self.total = Stats(*_merge_pair(*self.total, *part))
        self.batches += 1

    def result(self, comm: Any, error: BaseException | None = None, part: int = 0, parts: int = 1,
               channels: int | None = None) -> Stats:
        """The merged statistics; with ``comm``, merged across ranks (collective, rank order).

        ``error``: this rank's failure so far (raised on every rank after the header exchange). ``part``
        of ``parts``: which of a sequence of such collectives this is (update_bn_stats: one per layer),
        checked against the other ranks'. ``channels``: the C this rank expects (used when it holds no
        data, so that a mismatch still raises on every rank).
        """
        if comm is None:
            if error is not None:
                raise error
            if self.total is None or self.total.count[0] == 0:
                raise ValueError(f"{self.what}: no values (no batches, or only empty ones)")
            return self.total
        from fastbn.distributed import OP_PRECISE, exchange, merge_in_rank_order, op_tag

        t = self.total
        has = t is not None and t.count.size > 0
        payload = np.stack([t.mean, t.m2]) if has else None
        C = t.mean.shape[0] if t is not None else channels
        count = int(t.count[0]) if has else 0
        counts, g = exchange(comm, self.what, error, C, count, payload, tag=op_tag(OP_PRECISE, part, parts))
        n, mean, m2 = merge_in_rank_order(counts, g[:, 0], g[:, 1])
        if n == 0:
            raise ValueError(f"{self.what}: no values on any rank")
        return Stats(np.full(mean.shape[0], n), mean, m2)


def _finish(s: Stats, unbiased: bool) -> PopulationStats:
    n = float(s.count[0])
    if unbiased:
        if n < 2:
            raise ValueError(f"the unbiased variance needs at least 2 values per channel, got {int(n)}")
        var = s.m2 / (n - 1.0)
    else:
        var = s.m2 / n
    return PopulationStats(s.mean, var, int(n), unbiased)


def precise_statistics(batches: Iterable, *, axis: int = 1, unbiased: bool = False, comm: Any = None,
                       max_batches: int | None = None) -> PopulationStats:
    """Exact per-channel mean and variance over all values of many batches, in one pass, O(C) memory.

    Equal (to float64 rounding) to the statistics of ``np.concatenate(batches)``, for batches of any
    sizes (empty ones included), computed without holding more than one batch.

    Parameters
    ----------
    batches : iterable of arrays (float32/float64/float16/bfloat16, at least 2 dims, e.g. a data loader's
        outputs or a generator), channel dimension at ``axis``; the number of channels must agree. Other
        dimensions (batch size, spatial size) may differ between batches.
    axis : the channel axis (1 for NCHW and (N, C), -1 for NHWC).
    unbiased : return the unbiased variance ``M2 / (n - 1)`` instead of the population ``M2 / n``.
    comm : optional mpi4py communicator (collective): merge every rank's statistics in rank order, so
        the result covers all ranks' batches and is identical on every rank. A rank may have no batches.
    max_batches : use at most this many batches from the iterable.

    Returns
    -------
    PopulationStats(mean, var, count): float64 (C,) arrays and the number of values per channel.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.normal(5.0, 2.0, (n, 3, 4, 4)) for n in (7, 1, 12)]
    >>> s = fastbn.precise_statistics(batches, axis=1)
    >>> allx = np.concatenate(batches)
    >>> s.count, bool(np.allclose(s.mean, allx.mean(axis=(0, 2, 3)))), bool(np.allclose(s.var, allx.var(axis=(0, 2, 3))))
    (320, True, True)
    """
    acc = _Accumulator(axis, "precise_statistics")
    err = None
    try:  # with comm, any failure here is raised on every rank, after the exchange
        if isinstance(batches, np.ndarray) or not isinstance(batches, Iterable):
            raise TypeError("batches must be an iterable of arrays (a list, a generator, a data loader), "
                            f"got {type(batches).__name__}; wrap a single array in a list")
        _check_count(max_batches, "max_batches")
        unbiased = check_flag(unbiased, "unbiased")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        for x in (batches if max_batches is None else islice(batches, max_batches)):
            acc.add(x)
    except Exception as e:  # with comm, every rank must still reach the collective
        if comm is None:
            raise
        err = e
    return _finish(acc.result(comm, err), unbiased)


def _is_layer(obj: Any) -> bool:
    return hasattr(obj, "running_mean") and hasattr(obj, "running_var") and hasattr(obj, "axis")


def _check_count(v, name: str) -> None:
    if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 0):
        raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")


def check_layers_args(layers: Any, batches: Any, forward: Any, num_batches: Any, arrays: tuple[str, ...],
                      needs: str) -> tuple[list, bool]:
    """Validate the arguments of :func:`update_bn_stats`-like functions; return (layer list, single).

    ``arrays``: the layer attributes that must be writeable ndarrays (``needs`` says which layer option
    provides them, for the message).
    """
    single = _is_layer(layers)
    layer_list = [layers] if single else (list(layers) if isinstance(layers, Iterable) else None)
    if not layer_list or not all(_is_layer(b) for b in layer_list):
        raise TypeError("layers must be a BatchNorm layer (with running_mean, running_var and axis) or a "
                        f"non-empty list of them, got {type(layers).__name__}")
    for i, b in enumerate(layer_list):
        for name in arrays:
            v = getattr(b, name, None)
            if not isinstance(v, np.ndarray) or not v.flags.writeable:
                raise ValueError(f"layers[{i}].{name} must be a writeable array (a layer created with "
                                 f"{needs}), got {type(v).__name__}")
    if isinstance(batches, np.ndarray) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable, got {type(batches).__name__}")
    if forward is None and not single:
        raise ValueError("with several layers, pass forward= (the model's forward) to produce their inputs")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    _check_count(num_batches, "num_batches")
    return layer_list, single


def update_bn_stats(layers: Any, batches: Iterable, *, forward: Callable[[Any], Any] | None = None,
                    num_batches: int | None = None, comm: Any = None) -> PopulationStats | list[PopulationStats]:
    """Precise BN: write exact population statistics into BN layers' running_mean / running_var.

    Two ways to feed it:

    - ``forward=None``: ``batches`` are the inputs of the single layer ``layers`` (arrays); their exact
      statistics are computed directly (the same as running the layer's training forward on each).
    - ``forward=callable``: ``forward(batch)`` is run on every batch (typically the model's forward);
      while it runs, each layer in ``layers`` is switched to training mode (it normalizes with batch
      statistics, as in training, so later layers see training-time inputs) and the exact statistics of
      every input it receives are recorded. Afterwards each layer's mode and ``num_batches_tracked``
      are restored.

    Then each layer's ``running_mean`` gets the population mean and ``running_var`` the population
    *unbiased* variance (the biased one for a Keras-convention layer, whose moving variance is biased),
    in place, keeping their dtype, as if computed over the concatenation of all inputs. Nothing is
    written unless every layer's statistics succeed. With ``comm`` (collective), statistics are merged
    across ranks first (every rank must call it; ranks may see different numbers of batches unless the
    forward itself is collective, e.g. a model with :class:`fastbn.SyncBatchNorm` layers, which needs
    the same number on every rank).

    Parameters
    ----------
    layers : a ``fastbn.BatchNorm`` (or anything with ``running_mean``, ``running_var`` ndarrays and
        ``axis``), or a list of them.
    batches : iterable of arrays (forward=None) or of whatever ``forward`` takes.
    forward : optional callable run on each batch.
    num_batches : use at most this many batches.
    comm : optional mpi4py communicator.

    Returns
    -------
    PopulationStats(mean, var, count) of the layer (a list of them, one per layer, for a list);
    ``var`` is the biased population variance, ``var_unbiased`` what was written.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)
    >>> batches = [np.random.default_rng(i).normal(2.0, 3.0, (16, 3, 8, 8)) for i in range(10)]
    >>> s = fastbn.update_bn_stats(bn, batches)            # batches are bn's inputs
    >>> s.count, bool(np.allclose(bn.running_mean, s.mean)), bool(np.allclose(bn.running_var, s.var_unbiased))
    (10240, True, True)
    >>> model = lambda x: bn(x) * 2.0                      # or run a forward and record bn's inputs
    >>> s = fastbn.update_bn_stats([bn], batches, forward=model)
    """
    try:  # with comm, a failure on this rank is raised on every rank, after one exchange
        layer_list, single = check_layers_args(layers, batches, forward, num_batches,
                                               ("running_mean", "running_var"), "track_running_stats=True")
    except Exception as e:  # noqa: BLE001
        if comm is None:
            raise
        parts = len(layers) if isinstance(layers, (list, tuple)) else 1
        _Accumulator(1, "update_bn_stats").result(comm, e, parts=parts)

    accs = [_Accumulator(b.axis, f"update_bn_stats (layer {i})") for i, b in enumerate(layer_list)]
    source = batches if num_batches is None else islice(batches, num_batches)
    err = None
    if forward is None:
        try:
            for x in source:
                accs[0].add(x)
        except Exception as e:
            if comm is None:
                raise
            err = e
    else:
        err = _run_recording(layer_list, accs, source, forward, comm)
    results = []
    for i, (b, acc) in enumerate(zip(layer_list, accs)):
        C = b.running_mean.shape[0]
        if err is None and acc.total is not None and acc.total.mean.shape[0] != C:
            # checked before the exchange: with comm, every rank raises, none waits for the next layer
            err = ValueError(f"layer {i} has {C} channels but its inputs have {acc.total.mean.shape[0]} "
                             f"(along axis {b.axis})")
        s = acc.result(comm, err, part=i, parts=len(layer_list), channels=C)
        if s.count[0] < 2:
            raise ValueError(f"layer {i} saw {int(s.count[0])} value(s) per channel; the unbiased "
                             "variance needs at least 2")
        results.append(_finish(s, unbiased=False))
    for b, pop in zip(layer_list, results):  # write only after every layer succeeded
        # the moving variance of the Keras convention is the biased one (Keras 3)
        var = pop.var if getattr(b, "convention", "torch") == "keras" else pop.var_unbiased
        b.running_mean[...] = pop.mean
        b.running_var[...] = var
        moving_std = getattr(b, "moving_std", None)  # Keras renorm derives running_var from it
        if isinstance(moving_std, np.ndarray):
            moving_std[...] = np.sqrt(var + b.eps)
    return results[0] if single else results


_MISSING = object()


def _recording(orig: Callable, acc: _Accumulator) -> Callable:
    def recording(x, *args, **kwargs):
        acc.add(x)
        return orig(x, *args, **kwargs)

    return recording


def _run_recording(layers: list, accs: list, source: Iterable, forward: Callable,
                   comm: Any) -> BaseException | None:
    """Run ``forward`` over the batches with every layer's forward wrapped to record its inputs.

    Restores each layer's forward, training mode, num_batches_tracked and running statistics afterwards.
    Returns the exception raised (only when ``comm`` is given; without it the exception propagates).
    """
    saved = []
    for b, acc in zip(layers, accs):
        saved.append((getattr(b, "training", None), getattr(b, "num_batches_tracked", None),
                      b.running_mean.copy(), b.running_var.copy(), vars(b).get("forward", _MISSING)))
        b.forward = _recording(b.forward, acc)
        if hasattr(b, "train"):
            b.train(True)
    try:
        for batch in source:
            forward(batch)
    except Exception as e:
        if comm is None:
            raise
        return e
    finally:
        for b, (training, nbt, rm, rv, own_forward) in zip(layers, saved):
            if own_forward is _MISSING:
                del b.forward
            else:
                b.forward = own_forward
            if training is not None and hasattr(b, "train"):
                b.train(training)
            if nbt is not None:
                b.num_batches_tracked = nbt
            b.running_mean[...] = rm
            b.running_var[...] = rv
    return None
