"""Statistics primitives: per-channel partial statistics of one array, and their exact merge.

A *partial* is ``(count, mean, m2)`` per channel: the number of values, their mean and their sum of
squared deviations ``M2 = sum((x - mean)**2)``, all float64 ``(C,)``. Partials of disjoint pieces of data
(batches, ranks, shards) merge exactly with Chan et al.'s parallel formula into the partial of their
concatenation: no ``E[x^2] - E[x]^2`` cancellation, any number of pieces, pieces with zero values allowed.
The merge is a fixed sequence of float64 operations in the order given, so every process that merges
the same partials in the same order gets the same bits.

To synchronize statistics with any collective engine, stack a partial into one ``(3, C)`` float64 array
(:meth:`Stats.to_array`), all-gather it into ``(P, 3, C)`` and merge in rank order
(:meth:`Stats.from_gathered`). ``fastbn.distributed`` does exactly that over MPI.

Example (torch.distributed):

>>> import numpy as np, fastbn
>>> x = np.random.default_rng(0).normal(size=(8, 4, 5, 5)).astype(np.float32)     # this rank's batch
>>> local = fastbn.partial_stats(x, axis=1)
>>> # g = torch.empty(world, 3, 4, dtype=torch.float64)
>>> # dist.all_gather_into_tensor(g, torch.from_numpy(local.to_array()))
>>> g = np.stack([local.to_array(), local.to_array()])                    # two ranks with equal data
>>> total = fastbn.stats.Stats.from_gathered(g)
>>> float(total.count[0]), bool(np.allclose(total.mean, local.mean)), bool(np.allclose(total.var, local.var))
(400.0, True, True)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fastbn import _run
from fastbn._validate import as_input, normalize_axis, resolve_layout

__all__ = ["Stats", "partial_stats", "merge_stats"]



class Stats(NamedTuple):
    """Per-channel statistics of a set of values: ``count``, ``mean``, ``m2``, each float64 ``(C,)``.

    ``m2`` is the sum of squared deviations from the mean. ``count`` is the number of values per channel
    (the same for every channel of a dense array; a float so that the three stack into one float64 array
    for a single collective). Channels with count 0 have mean 0 and m2 0.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> s = fastbn.partial_stats(np.array([[1.0, 10.0], [3.0, 10.0]]), axis=1)
    >>> s.count, s.mean, s.var
    (array([2., 2.]), array([ 2., 10.]), array([1., 0.]))
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def var(self) -> np.ndarray:
        """Biased (population) variance ``m2 / count``, float64 ``(C,)``; NaN where count is 0."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.m2 / np.where(self.count > 0, self.count, 1.0), np.nan)

    @property
    def var_unbiased(self) -> np.ndarray:
        """Unbiased variance ``m2 / (count - 1)``, float64 ``(C,)``; NaN where count <= 1."""
        ok = self.count > 1
        return np.where(ok, self.m2 / np.where(ok, self.count - 1.0, 1.0), np.nan)

    def to_array(self) -> np.ndarray:
        """The partial as one contiguous float64 ``(3, C)`` array (rows count, mean, m2), for collectives."""
        return np.stack([self.count, self.mean, self.m2]).astype(np.float64, copy=False)

    @classmethod
    def from_gathered(cls, gathered) -> Stats:
        """Merge a gathered ``(P, 3, C)`` array of partials (rows count, mean, m2) in order 0..P-1."""
        g = np.asarray(gathered, dtype=np.float64)
        if g.ndim != 3 or g.shape[1] != 3:
            raise ValueError(f"gathered must have shape (P, 3, C), got {g.shape}")
        return merge_stats(g[:, 0], g[:, 1], g[:, 2])


def partial_stats(x, *, axis: int = 1) -> Stats:
    """Per-channel partial statistics ``(count, mean, m2)`` of ``x``, in float64.

    For each channel (index along ``axis``) over all other axes: ``count`` values, their ``mean`` and
    ``m2 = sum((x - mean)**2)``. Computed like the training forward's statistics (float64 accumulation,
    two passes per cache-sized chunk, Chan's merge of chunks), so bitwise reproducible for any thread
    count, for any memory layout. An array with no samples (e.g. shape ``(0, C, H, W)``) gives count 0,
    mean 0, m2 0: a rank with an empty slice can still take part in a merge.

    Parameters
    ----------
    x : ndarray, float32 or float64 (or float16/bfloat16), at least 2 dims, channel dimension at ``axis``.
    axis : the channel axis (negative allowed): 1 for NCHW and dense (N, C), -1 for NHWC.

    Returns
    -------
    Stats(count, mean, m2): float64 ``(C,)`` arrays.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (16, 4, 6, 6)).astype(np.float32)
    >>> a, b = fastbn.partial_stats(x[:10]), fastbn.partial_stats(x[10:])
    >>> s = fastbn.merge_stats([a.count, b.count], [a.mean, b.mean], [a.m2, b.m2])
    >>> bool(np.allclose(s.mean, x.mean(axis=(0, 2, 3), dtype=np.float64)))
    True
    """
    x = as_input(x, "x")
    axis = normalize_axis(axis, x.ndim)
    lay = resolve_layout(x, axis)
    C = lay.C
    n = lay.A * lay.B
    if n > 0 and C > 0:
        mean, m2 = _run.stats(lay.view(x))
    else:
        mean, m2 = np.zeros(C), np.zeros(C)
    return Stats(np.full(C, float(n)), mean, m2)


def _stack(v, name: str) -> np.ndarray:
    if isinstance(v, (list, tuple)):
        if len(v) == 0:
            raise ValueError(f"{name} is empty: merge_stats needs at least one partial")
        try:
            v = np.stack([np.asarray(e) for e in v])
        except ValueError as e:
            raise ValueError(f"{name}: the partials must all have the same shape ({e})") from None
    elif not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be an array of shape (P, C) or a list of P arrays of shape (C,), "
                        f"got {type(v).__name__}")
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a float array, got dtype {v.dtype}")
    return v.astype(np.float64)


def _merge_pair(na, ma, qa, nb, mb, qb):
    """Chan's merge of two partials, elementwise over channels; a side with count 0 is taken as is."""
    n = na + nb
    w = nb / np.where(n > 0, n, 1.0)
    delta = mb - ma
    mean = ma + delta * w
    m2 = qa + qb + delta * delta * (na * w)
    # the same float64 operations as the kernels' chan_merge; an empty side leaves the other untouched
    mean = np.where(nb == 0, ma, np.where(na == 0, mb, mean))
    m2 = np.where(nb == 0, qa, np.where(na == 0, qb, m2))
    return n, mean, m2


def merge_stats(counts, means, m2s) -> Stats:
    """Exact merge of P per-channel partials into the statistics of their concatenation.

    Applies Chan et al.'s pairwise formula left to right (partial 0, then 1, ...), in float64:
    ``n = n_a + n_b``, ``delta = mean_b - mean_a``, ``mean = mean_a + delta * n_b / n``,
    ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n``. Partials with count 0 are skipped (their mean and m2
    are ignored), so a rank or batch without samples changes nothing. The result is deterministic: the
    same partials in the same order give the same bits on every process.

    Parameters
    ----------
    counts : ``(P,)`` or ``(P, C)`` counts (non-negative), or a list of P scalars / ``(C,)`` arrays.
    means : ``(P, C)`` array or a list of P ``(C,)`` arrays.
    m2s : ``(P, C)`` array or a list of P ``(C,)`` arrays (non-negative sums of squared deviations).

    Returns
    -------
    Stats(count, mean, m2): float64 ``(C,)`` arrays; channels whose total count is 0 get mean 0, m2 0.

    Example
    -------
    >>> import numpy as np, fastbn
    >>> s = fastbn.merge_stats([2, 0, 1], [[1.0], [123.0], [4.0]], [[2.0], [0.0], [0.0]])
    >>> s.count, s.mean, s.m2        # values {0, 2} and {4}: mean 2, m2 = 4 + 0 + 4
    (array([3.]), array([2.]), array([8.]))
    """
    m = _stack(means, "means")
    q = _stack(m2s, "m2s")
    n = _stack(counts, "counts")
    if m.ndim != 2:
        raise ValueError(f"means must have shape (P, C), got {m.shape}")
    P, C = m.shape
    if q.shape != (P, C):
        raise ValueError(f"m2s must have means' shape {(P, C)}, got {q.shape}")
    if n.shape == (P,):
        n = np.repeat(n[:, None], C, axis=1)
    if n.shape != (P, C):
        raise ValueError(f"counts must have shape ({P},) or {(P, C)}, got {n.shape}")
    if not np.isfinite(n).all() or (n < 0).any():
        raise ValueError("counts must be finite and non-negative")
    if (q < 0).any():
        raise ValueError("m2s must be non-negative (sums of squared deviations)")
    if P == 0:
        raise ValueError("merge_stats needs at least one partial")
    tn = np.zeros(C)
    tm = np.zeros(C)
    tq = np.zeros(C)
    for p in range(P):
        # a zero-count partial's mean/m2 never reach the result, whatever they hold
        mp = np.where(n[p] > 0, m[p], 0.0)
        qp = np.where(n[p] > 0, q[p], 0.0)
        tn, tm, tq = _merge_pair(tn, tm, tq, n[p], mp, qp)
    return Stats(tn, tm, tq)
