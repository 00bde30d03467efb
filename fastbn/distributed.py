"""Synchronized batch norm across processes (MPI through mpi4py): statistics over the global batch.

In data-parallel training each rank holds a slice of the global batch. Synchronized BN normalizes every
slice with the mean and variance of the *whole* batch and back-propagates through those global
statistics, so the result equals single-process BN on the concatenated batch (to rounding), whatever the
per-rank batch sizes, including ranks with zero samples.

Protocol (every rank must make the same calls in the same order; each call is collective):

- forward: each rank computes its per-channel partial ``(count, mean, M2)`` (:func:`fastbn.partial_stats`),
  the ranks all-gather them (``Allgather`` of a small header and a ``(2, C)`` float64 array) and every rank
  merges them in rank order with Chan's formula, so every rank gets the same bits.
- backward: each rank computes ``sum(dy)`` and ``sum(dy * (x - mean))``, the ranks all-gather them and
  every rank sums them in rank order; dx uses the global sums and the global count.

Communication per call is ``P * (32 + 16 * C)`` bytes received per rank: O(C), independent of the batch.
Any failure on one rank before the collective (invalid input, a different channel count, a
RuntimeError from a tensor that requires grad, a MemoryError) is sent in the header exchange and raises
on *every* rank instead of leaving the others waiting in a collective: the failing rank raises its own
error, the others a ValueError naming it. The header also carries an operation tag, so ranks that are
in different calls (one in the forward, another in the backward) raise on every rank instead of
merging unrelated sums. Launch MPI jobs with ``mpiexec -n P python -m mpi4py script.py``: then an
exception that the script does not catch aborts the whole job instead of leaving the other ranks hung.

``comm`` is an mpi4py intracommunicator (e.g. ``MPI.COMM_WORLD``), or any object with ``Get_rank()``,
``Get_size()`` and mpi4py's buffer ``Allgather(sendbuf, recvbuf)`` on NumPy arrays (an adapter over
another engine). This module imports without mpi4py; it never imports it itself.

Example (``mpiexec -n 2 python script.py``):

>>> from mpi4py import MPI                                                  # doctest: +SKIP
>>> import numpy as np, fastbn.distributed as fd                            # doctest: +SKIP
>>> comm = MPI.COMM_WORLD                                                   # doctest: +SKIP
>>> x = np.random.default_rng(comm.rank).normal(size=(8, 16, 7, 7)).astype(np.float32)  # doctest: +SKIP
>>> y, mean, invstd = fd.sync_batch_norm_train(x, None, None, comm)        # doctest: +SKIP
>>> dx, dgamma, dbeta = fd.sync_batch_norm_backward(np.ones_like(x), x, mean, invstd, None, comm)  # doctest: +SKIP
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from fastbn import _run
from fastbn._validate import (Layout, as_input, channel_vector, check_eps, check_flag, copy_back, like_x,
                              normalize_axis, output_buffer, resolve_layout, running_pair, unaliased)
from fastbn.functional import BackwardResult, TrainStats
from fastbn.layer import BatchNorm, _Saved

__all__ = ["SyncBatchNorm", "sync_batch_norm_train", "sync_batch_norm_backward", "check_comm"]

_HEADER = 4  # int64 [ok, C, count, tag] per rank

# Operation tags (low byte of the header's tag; update_bn_stats adds its layer index and count above)
OP_FORWARD, OP_BACKWARD, OP_PRECISE = 1, 2, 3
_OP_NAMES = {OP_FORWARD: "a training forward", OP_BACKWARD: "a backward", OP_PRECISE: "precise statistics"}


def op_tag(op: int, part: int = 0, parts: int = 1) -> int:
    """The header tag of collective ``op`` (one of ``OP_*``), for part ``part`` of ``parts``."""
    return op | part << 8 | parts << 32


def _describe(tag: int) -> str:
    name = _OP_NAMES.get(tag & 0xFF, f"operation {tag & 0xFF}")
    parts = tag >> 32
    return name if parts <= 1 else f"{name} (layer {(tag >> 8) & 0xFFFFFF} of {parts})"


def check_comm(comm: Any, name: str = "comm") -> Any:
    """Check that ``comm`` can run fastbn's collectives; return it.

    Accepts an mpi4py intracommunicator (not ``MPI.COMM_NULL``, not an intercommunicator) or any object
    with callable ``Get_rank``, ``Get_size`` and ``Allgather(sendbuf, recvbuf)``. Raises TypeError
    (ValueError for COMM_NULL / intercommunicators) naming the argument otherwise.

    Example
    -------
    >>> import fastbn.distributed as fd
    >>> fd.check_comm(42)
    Traceback (most recent call last):
    ...
    TypeError: comm must be an mpi4py communicator (e.g. mpi4py.MPI.COMM_WORLD) or an object with Get_rank(), Get_size() and Allgather(sendbuf, recvbuf), got int
    """
    mpi = sys.modules.get("mpi4py.MPI")  # a real communicator means mpi4py is already imported
    if mpi is not None and isinstance(comm, mpi.Comm):
        if comm == mpi.COMM_NULL:
            raise ValueError(f"{name} is MPI.COMM_NULL")
        if comm.Is_inter():
            raise ValueError(f"{name} must be an intracommunicator (e.g. MPI.COMM_WORLD), got an "
                             "intercommunicator")
        return comm
    if all(callable(getattr(comm, a, None)) for a in ("Get_rank", "Get_size", "Allgather")):
        return comm
    raise TypeError(f"{name} must be an mpi4py communicator (e.g. mpi4py.MPI.COMM_WORLD) or an object with "
                    f"Get_rank(), Get_size() and Allgather(sendbuf, recvbuf), got {type(comm).__name__}")


def exchange(comm: Any, what: str, error: BaseException | None, C: int | None, count: int,
             payload: np.ndarray | None, rows: int = 2, *, tag: int) -> tuple[np.ndarray, np.ndarray]:
    """All-gather a header ``[ok, C, count, tag]`` and then a ``(rows, C)`` float64 payload from every rank.

    Collective. If any rank reports an error (``error`` not None there), the ranks' operation tags
    (:func:`op_tag`) differ or the channel counts differ, every rank raises (the failing rank its own
    error) before the payload exchange, so no rank is left waiting. A rank that holds no data and does
    not know C passes ``C=None`` (and ``count=0``); it sends zeros of the others' C. Returns ``(counts (P,) int64, gathered (P, rows, C) float64)``.
    Internal building block of the synchronized forward/backward and of
    ``precise_statistics(..., comm=)``.
    """
    P = int(comm.Get_size())
    if error is not None:
        head = np.array([0, -1, 0, tag], dtype=np.int64)
    else:
        head = np.array([1, -2 if C is None else C, count, tag], dtype=np.int64)
    heads = np.empty((P, _HEADER), dtype=np.int64)
    comm.Allgather(head, heads)
    if error is not None:
        raise error
    bad = np.flatnonzero(heads[:, 0] == 0)
    if bad.size:
        raise ValueError(f"{what}: invalid input on rank(s) {bad.tolist()} (the error is raised there); "
                         "every rank raises so that none waits in a collective")
    tags = heads[:, 3]
    if (tags != tag).any():
        shown = ", ".join(f"rank {r} in {_describe(int(t))}" for r, t in enumerate(tags))
        raise ValueError(f"{what}: the ranks are in different collective calls ({shown}); every rank must "
                         "make the same calls in the same order")
    chans = heads[:, 1]
    known = chans[chans >= 0]
    if known.size == 0:
        raise ValueError(f"{what}: no rank has any data")
    if (known != known[0]).any():
        shown = ["?" if c < 0 else int(c) for c in chans]
        raise ValueError(f"{what}: x must have the same number of channels on every rank, got "
                         f"{shown} (in rank order)")
    Cg = int(known[0])
    if payload is None or C is None:
        payload = np.zeros((rows, Cg))
    send = np.ascontiguousarray(payload, dtype=np.float64)
    if send.shape != (rows, Cg):
        raise ValueError(f"{what}: payload must have shape {(rows, Cg)}, got {send.shape}")
    gathered = np.empty((P, rows, Cg), dtype=np.float64)
    comm.Allgather(send, gathered)
    return heads[:, 2].copy(), gathered


def merge_in_rank_order(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray) -> tuple[float, np.ndarray,
                                                                                         np.ndarray]:
    """Chan's merge of per-rank (count, mean (C,), M2 (C,)) in rank order; ranks with count 0 are skipped.

    The same float64 operations as the kernels' chunk merge, so one rank's partial merges to itself.
    """
    n = 0.0
    mean = np.zeros(means.shape[1])
    m2 = np.zeros(means.shape[1])
    for p in range(len(counts)):
        nb = float(counts[p])
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, means[p].copy(), m2s[p].copy()
            continue
        tot = n + nb
        delta = means[p] - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2s[p] + delta * delta * (n * (nb / tot))
        n = tot
    return n, mean, m2


# ------------------------------------------------------------------------------ collective cores

def global_stats(comm: Any, what: str, error: BaseException | None, x3: np.ndarray | None, C: int,
                 n_local: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(n, mean, M2) over all ranks of the (A, C, B) views ``x3`` (collective; identical on every rank).

    ``error``: this rank's validation error (raised on every rank after the header exchange).
    Raises ValueError on every rank when the global batch has fewer than 2 values per channel.
    """
    local = np.zeros((2, C))
    if error is None and n_local > 0:
        try:
            local[...] = _run.stats(x3)
        except Exception as e:  # noqa: BLE001  every rank must still reach the header exchange
            error = e
    counts, gathered = exchange(comm, what, error, C, n_local, local, tag=op_tag(OP_FORWARD))
    n, mean, m2 = merge_in_rank_order(counts, gathered[:, 0], gathered[:, 1])
    if n <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got "
                         f"{int(n)} value(s) per channel over all {len(counts)} rank(s)")
    return n, mean, m2


def normalize_into(x: np.ndarray, lay: Layout, y: np.ndarray, y3: np.ndarray, copy: bool, mean: np.ndarray,
                   scale: np.ndarray, shift: np.ndarray, residual: np.ndarray | None = None,
                   relu: bool = False) -> None:
    """y = act((x - mean) * scale + shift [+ residual]) into the buffers from ``output_buffer``."""
    if x.size == 0:
        return
    x3 = lay.view(x)
    r3 = x3 if residual is None else lay.view(residual)
    _run.normalize(x3, None if residual is None else r3, y3, mean, scale, scale, shift, 0.0, False, bool(relu))
    if copy:
        copy_back(y, y3, lay)


def global_grad_sums(comm: Any, what: str, error: BaseException | None, dy3: np.ndarray | None,
                     x3: np.ndarray | None, y3: np.ndarray | None, mean: np.ndarray | None, relu: bool,
                     C: int, n_local: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """(n, sum_dy, dot, local (2, C)) with the global sums added in rank order (collective).

    With ``relu``, dy is masked by ``y3 > 0``. ``local`` holds this rank's own (sum_dy, dot).
    """
    local = np.zeros((2, C))
    if error is None and n_local > 0:
        try:
            local[...] = _run.grad_sums(dy3, x3, y3 if relu else None, mean)
        except Exception as e:  # noqa: BLE001  every rank must still reach the header exchange
            error = e
    counts, gathered = exchange(comm, what, error, C, n_local, local, tag=op_tag(OP_BACKWARD))
    n = float(counts.sum())
    if n == 0:
        raise ValueError(f"{what}: no values on any rank")
    sum_dy = np.zeros(C)
    dot = np.zeros(C)
    for p in range(gathered.shape[0]):  # rank order: identical bits on every rank
        sum_dy += gathered[p, 0]
        dot += gathered[p, 1]
    return n, sum_dy, dot, local


def input_grad_into(dy3: np.ndarray, x3: np.ndarray, y3: np.ndarray | None, dx3: np.ndarray,
                    dres3: np.ndarray | None, mean: np.ndarray, invstd: np.ndarray, g: np.ndarray, n: float,
                    sum_dy: np.ndarray, dot: np.ndarray) -> None:
    """dx = g * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * dot / n) from global sums.

    ``y3`` not None applies the ReLU mask to dy; ``dres3`` not None also receives the masked dy.
    """
    if x3.size == 0:
        return
    k_dy = g * invstd
    k_x = -k_dy * invstd * invstd * dot / n
    k_0 = -k_dy * sum_dy / n
    relu = y3 is not None
    _run.input_grad(dy3, x3, y3 if relu else None, dx3, dres3, np.stack([mean, k_dy, k_x, k_0]))


# ------------------------------------------------------------------------------ functional API

def _update_running(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
                    var_unbiased: np.ndarray, momentum: float) -> None:
    # float64 arithmetic whatever the running dtype (as the kernels do), then stored in place
    rm = running_mean.astype(np.float64)
    rv = running_var.astype(np.float64)
    running_mean[...] = (1.0 - momentum) * rm + momentum * mean
    running_var[...] = (1.0 - momentum) * rv + momentum * var_unbiased


def sync_batch_norm_train(x, gamma, beta, comm, *, axis: int = 1, eps: float = 1e-5,
                          running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None,
                          momentum: float = 0.1, out: np.ndarray | None = None) -> TrainStats:
    """Synchronized training-mode batch norm: normalize this rank's slice with global batch statistics.

    Collective: every rank of ``comm`` must call it (with its own slice, possibly empty). For each
    channel, the mean and biased variance are those of the concatenation of all ranks' ``x`` (merged
    exactly, in rank order, identical bits on every rank); then ``y = (x - mean) * invstd * gamma + beta``
    with ``invstd = 1 / sqrt(var + eps)``, as :func:`fastbn.batch_norm_train` on the global batch.
    Communication: two ``Allgather`` calls, ``32 + 16 * C`` bytes sent per rank.

    Parameters
    ----------
    x : this rank's slice, float32 or float64 (or float16/bfloat16), channel dimension at ``axis``; batch
        sizes may differ between ranks and may be 0 (e.g. shape ``(0, C, H, W)``). C must be the same on
        every rank.
    gamma, beta : (C,) float arrays or None (1 and 0); the same on every rank (not checked).
    comm : mpi4py intracommunicator (see :func:`check_comm`).
    axis, eps, momentum, out : as in :func:`fastbn.batch_norm_train`.
    running_mean, running_var : (C,) float ndarrays updated in place (both or neither) with the global
        mean and the global *unbiased* variance ``var * n / (n - 1)``, n the global count: identical on every
        rank. Updated only when the call succeeds.

    Returns
    -------
    TrainStats(y, mean, invstd): y like x (this rank's slice); mean and invstd float64 (C,), global.

    Raises
    ------
    On every rank, when any rank's input is invalid or its checks fail in any way (that rank raises its
    own error, the others ValueError), when channel counts differ between ranks, when another rank is
    in a different collective call (e.g. a backward), or when the global batch has fewer than 2 values
    per channel (ValueError).

    Example
    -------
    >>> from mpi4py import MPI                                                   # doctest: +SKIP
    >>> import numpy as np, fastbn.distributed
    >>> comm = MPI.COMM_WORLD                                                    # doctest: +SKIP
    >>> x = np.random.default_rng(comm.rank).normal(size=(4 + comm.rank, 8, 5, 5))  # doctest: +SKIP
    >>> rm, rv = np.zeros(8), np.ones(8)
    >>> y, mean, invstd = fastbn.distributed.sync_batch_norm_train(          # doctest: +SKIP
    ...     x, None, None, comm, running_mean=rm, running_var=rv, momentum=0.1)
    """
    what = "sync_batch_norm_train"
    comm = check_comm(comm)
    err = None
    C = n_local = 0
    lay = x3 = None
    try:
        x = as_input(x, "x")
        axis = normalize_axis(axis, x.ndim)
        eps = check_eps(eps)
        lay = resolve_layout(x, axis)
        C = lay.C
        if C == 0:
            raise ValueError(f"x has no channels (shape {x.shape})")
        n_local = lay.A * lay.B
        g = channel_vector(gamma, "gamma", C, 1.0)
        b = channel_vector(beta, "beta", C, 0.0)
        _, momentum = running_pair(running_mean, running_var, momentum, C, x, out)
        g, b = unaliased((g, b), out)
        y, y3, copy = output_buffer(out, "out", lay, x.dtype, (x,))
        x3 = lay.view(x) if n_local else None
    except Exception as e:  # noqa: BLE001  any failure must reach the other ranks, not strand them
        err = e
    n, mean, m2 = global_stats(comm, what, err, x3, C, n_local)
    var = m2 / n
    invstd = 1.0 / np.sqrt(var + eps)
    normalize_into(x, lay, y, y3, copy, mean, invstd * g, b)
    if running_mean is not None:  # unbiased variance as the kernels form it: var * (n / (n - 1))
        _update_running(running_mean, running_var, mean, var * (n / (n - 1.0)), float(momentum))
    return TrainStats(y, mean, invstd)


def sync_batch_norm_backward(dy, x, mean, invstd, gamma, comm, *, axis: int = 1,
                             out: np.ndarray | None = None) -> BackwardResult:
    """Backward of :func:`sync_batch_norm_train` (collective): dx through the global statistics.

    Every rank computes ``sum(dy)`` and ``sum(dy * (x - mean))`` over its slice; the ranks all-gather them
    and add them in rank order; with n the global count and xhat = (x - mean) * invstd:
    ``dx = gamma * invstd * (dy - sum_dy / n - xhat * invstd * dot / n)`` (global sums), which equals the
    single-process training backward on the concatenated batch, restricted to this rank's slice.

    ``dgamma`` and ``dbeta`` are this rank's *contributions* (``sum(dy * xhat)``, ``sum(dy)`` over its
    slice), as in PyTorch's SyncBatchNorm: all-reduce them (sum) together with the other parameters'
    gradients; their sum over ranks is the single-process dgamma/dbeta.

    Parameters
    ----------
    dy : gradient w.r.t. y, x's shape and dtype (this rank's slice, possibly empty).
    x : this rank's forward input.
    mean, invstd : (C,) global statistics returned by :func:`sync_batch_norm_train` (same on every rank).
    gamma : (C,) or None (1).
    comm : the communicator of the forward.
    axis : the channel axis. out : optional buffer for dx (``out=dy`` works).

    Returns
    -------
    BackwardResult(dx, dgamma, dbeta): dx like x; dgamma, dbeta float64 (C,), this rank's contributions.

    Example
    -------
    >>> dx, dgamma, dbeta = fastbn.distributed.sync_batch_norm_backward(   # doctest: +SKIP
    ...     dy, x, mean, invstd, None, comm)
    """
    what = "sync_batch_norm_backward"
    comm = check_comm(comm)
    err = None
    C = n_local = 0
    x3 = dy3 = m = None
    try:
        x = as_input(x, "x")
        dy = like_x(dy, "dy", x)
        axis = normalize_axis(axis, x.ndim)
        lay = resolve_layout(x, axis)
        C = lay.C
        n_local = lay.A * lay.B
        m = channel_vector(mean, "mean", C)
        inv = channel_vector(invstd, "invstd", C)
        g = channel_vector(gamma, "gamma", C, 1.0)
        m, inv, g = unaliased((m, inv, g), out)
        dx, dx3, copy = output_buffer(out, "out", lay, x.dtype, (x, dy))
        x3, dy3 = lay.view(x), lay.view(dy)
    except Exception as e:  # noqa: BLE001  any failure must reach the other ranks, not strand them
        err = e
    n, sum_dy, dot, local = global_grad_sums(comm, what, err, dy3, x3, None, m, False, C, n_local)
    input_grad_into(dy3, x3, None, dx3, None, m, inv, g, n, sum_dy, dot)
    if copy and x.size:
        copy_back(dx, dx3, lay)
    return BackwardResult(dx, local[1] * inv, local[0].copy())



# ------------------------------------------------------------------------------------- the layer

class SyncBatchNorm(BatchNorm):
    """:class:`fastbn.BatchNorm` whose training mode normalizes with statistics of the global batch.

    ``SyncBatchNorm(num_features, comm, **kwargs)`` takes BatchNorm's keyword arguments (axis, eps,
    momentum incl. None, affine, track_running_stats, dtype, center, scale, activation="relu", renorm*,
    convention) except ``virtual_batch_size`` (ghost batches want small-batch statistics, the opposite).
    In training mode ``forward`` and ``backward`` are collective over ``comm``: every rank calls them
    with its own slice (sizes may differ, a rank may have zero samples) and gets exactly what
    single-process BatchNorm gives on the concatenated batch, restricted to its slice: y, dx, and the
    running statistics (global mean and unbiased variance, momentum or cumulative average), identical
    bits on every rank. ``dgamma`` / ``dbeta`` (and ``d_residual``) are this rank's contributions, as in
    PyTorch's SyncBatchNorm: all-reduce (sum) them with the other parameters' gradients. Eval mode is
    BatchNorm's (local, no communication).

    Parameters
    ----------
    num_features : C. comm : an mpi4py intracommunicator (see :func:`check_comm`).
    **kwargs : as :class:`fastbn.BatchNorm`.

    Example
    -------
    >>> from mpi4py import MPI                                        # doctest: +SKIP
    >>> import numpy as np, fastbn
    >>> comm = MPI.COMM_WORLD                                         # doctest: +SKIP
    >>> bn = fastbn.SyncBatchNorm(16, comm, momentum=None)            # doctest: +SKIP
    >>> x = np.random.default_rng(comm.rank).normal(size=(8, 16, 7, 7)).astype(np.float32)  # doctest: +SKIP
    >>> y = bn(x)                                                     # doctest: +SKIP
    >>> dx = bn.backward(np.ones_like(y))                             # doctest: +SKIP
    >>> grads = comm.allreduce(bn.dgamma)   # with the other parameters' gradients   # doctest: +SKIP
    """

    def __init__(self, num_features: int, comm: Any, **kwargs) -> None:
        if kwargs.get("virtual_batch_size") is not None:
            raise ValueError("SyncBatchNorm does not support virtual_batch_size (ghost batches normalize "
                             "with per-sub-batch statistics; SyncBatchNorm with global ones)")
        super().__init__(num_features, **kwargs)
        self.comm = check_comm(comm)
        self._sync_saved = False

    @classmethod
    def from_layer(cls, layer: BatchNorm, comm: Any) -> "SyncBatchNorm":
        """A SyncBatchNorm sharing ``layer``'s configuration, parameters and running statistics (the
        arrays themselves, as PyTorch's ``convert_sync_batchnorm``).

        Example
        -------
        >>> sbn = fastbn.SyncBatchNorm.from_layer(fastbn.BatchNorm(8), MPI.COMM_WORLD)   # doctest: +SKIP
        """
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layer must be a fastbn.BatchNorm, got {type(layer).__name__}")
        if layer.virtual_batch_size is not None:
            raise ValueError("SyncBatchNorm does not support virtual_batch_size")
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new.comm = check_comm(comm)
        new._sync_saved = False
        return new

    def __repr__(self) -> str:
        return "Sync" + super().__repr__()

    def forward(self, x, residual=None, *, training: bool | None = None) -> np.ndarray:
        """As :meth:`fastbn.BatchNorm.forward`; collective over ``comm`` in training mode."""
        training = self.training if training is None else check_flag(training, "training")
        if not training:
            self._sync_saved = False
            return super().forward(x, residual, training=False)
        what = "SyncBatchNorm.forward"
        err = None
        C = self.num_features
        n_local = 0
        lay = x3 = res = None
        try:
            x = as_input(x, "x")
            axis = normalize_axis(self.axis, x.ndim)
            if x.shape[axis] != C:
                raise ValueError(f"x has {x.shape[axis]} channels along axis {self.axis} (shape {x.shape}); "
                                 f"this SyncBatchNorm has num_features={C}")
            res = None if residual is None else like_x(residual, "residual", x)
            lay = resolve_layout(x, axis)
            n_local = lay.A * lay.B
            x3 = lay.view(x) if n_local else None
        except Exception as e:  # noqa: BLE001  any failure must reach the other ranks, not strand them
            err = e
        n, mean, m2 = global_stats(self.comm, what, err, x3, C, n_local)
        var = m2 / n
        invstd = 1.0 / np.sqrt(var + self.eps)
        g = np.ones(C) if self.gamma is None else self.gamma.astype(np.float64)
        b = np.zeros(C) if self.beta is None else self.beta.astype(np.float64)
        scale, shift, r, d = invstd * g, b, None, None
        if self.renorm:  # Keras' batch renormalization, from the global statistics
            s = np.maximum(self.renorm_std.astype(np.float64), np.sqrt(self.eps))
            clip = self._clip
            r = np.minimum(np.maximum(np.sqrt(var + self.eps) / s, clip[0]), clip[1])
            d = np.minimum(np.maximum((mean - self.renorm_mean.astype(np.float64)) / s, -clip[2]), clip[2])
            scale = scale * r
            shift = b + g * d
        relu = self.activation == "relu"
        y, y3, copy = output_buffer(None, "out", lay, x.dtype, (x,))
        normalize_into(x, lay, y, y3, copy, mean, scale, shift, res, relu)
        if self.track_running_stats:
            self._update_running(mean, var * (n / (n - 1.0)), int(n))
            if self.renorm:
                self._update_renorm(mean, np.sqrt(var + self.eps))
        self._saved = _Saved(x, y if relu else None, axis, None, mean[None], invstd[None],
                             None if r is None else r[None], None if d is None else d[None], g, False,
                             res is not None)
        self._sync_saved = True
        return y

    def backward(self, dy) -> np.ndarray:
        """As :meth:`fastbn.BatchNorm.backward`; collective over ``comm`` after a training forward.

        dx uses the global sums; ``dgamma``, ``dbeta``, ``d_residual`` are this rank's contributions.
        """
        s = self._saved
        if not self._sync_saved and not (s is None and self.training):
            return super().backward(dy)
        what = "SyncBatchNorm.backward"
        err = None
        C = self.num_features
        n_local = 0
        dy3 = x3 = y3 = None
        try:
            s, dy = self._saved_dy(dy)
            lay = resolve_layout(s.x, s.axis)
            n_local = lay.A * lay.B
            x3, dy3 = lay.view(s.x), lay.view(dy)
            y3 = None if s.y is None else lay.view(s.y)
        except Exception as e:  # noqa: BLE001  any failure must reach the other ranks, not strand them
            err = e
        mean = None if s is None else s.mean[0]
        n, sum_dy, dot, local = global_grad_sums(self.comm, what, err, dy3, x3, y3, mean, y3 is not None, C,
                                                 n_local)
        inv = s.invstd[0]
        g = s.gamma if s.r is None else s.gamma * s.r[0]
        dx, dx3, copy = output_buffer(None, "out", lay, s.x.dtype, (s.x,))
        dres = dres3 = None
        copy_r = False
        if s.residual:
            dres, dres3, copy_r = output_buffer(None, "residual_out", lay, s.x.dtype, (s.x,))
        input_grad_into(dy3, x3, y3, dx3, dres3, mean, inv, g, n, sum_dy, dot)
        if s.x.size:
            if copy:
                copy_back(dx, dx3, lay)
            if copy_r:
                copy_back(dres, dres3, lay)
        dgamma = local[1] * inv
        if s.r is not None:  # y = gamma * (xhat * r + d) + beta
            dgamma = s.r[0] * dgamma + s.d[0] * local[0]
        self.dgamma = None if self.gamma is None else dgamma.astype(self.dtype)
        self.dbeta = None if self.beta is None else local[0].astype(self.dtype)
        self.d_residual = dres
        self._saved = None
        self._sync_saved = False
        return dx
