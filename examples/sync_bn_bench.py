"""Synchronized vs local batch norm: time per training step (forward + backward) and bytes communicated.

    mpiexec -n 2 python -m mpi4py examples/sync_bn_bench.py --repeat 100     # also --dtype float64

Each global batch (e.g. NCHW (32, 64, 56, 56)) is split evenly over the ranks. Per rank and shape:

- local:  ``batch_norm_train`` + ``batch_norm_backward`` on the rank's slice (what each rank would do
  without synchronization; statistics of its slice only);
- sync:   ``sync_batch_norm_train`` + ``sync_batch_norm_backward`` on the same slice (global statistics);
- allgather: the two collectives of one step alone (header + (2, C) payload, twice), i.e. the latency
  part of the synchronized step;
- copy: ``np.copyto`` of the slice (one read + one write), a yardstick for a memory-bound pass.

A synchronized step reads x (and dy) once more than a local one can: a collective sits between each
statistics pass and the pass that uses its result, so the slice cannot stay in cache in between.

A step's time is the slowest rank's (ranks start each repeat together after a barrier); medians over
``--repeat`` repeats, the four measurements interleaved. Numba threads per rank = cores // ranks, so
the ranks do not oversubscribe. Bytes are counted by wrapping the communicator: they depend on C only,
not on the batch.
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
from mpi4py import MPI

import fastbn
import fastbn.distributed as fd

SHAPES = [("NCHW", (32, 64, 56, 56)), ("NHWC", (32, 64, 56, 56)), ("NCHW", (32, 256, 14, 14)),
          ("NC", (256, 1024))]


class CountingComm:
    """Forwards fastbn's collectives to an mpi4py communicator and counts the bytes moved."""

    def __init__(self, comm):
        self.comm = comm
        self.sent = 0
        self.received = 0

    def Get_rank(self):
        return self.comm.Get_rank()

    def Get_size(self):
        return self.comm.Get_size()

    def Allgather(self, send, recv):
        self.sent += send.nbytes
        self.received += recv.nbytes
        self.comm.Allgather(send, recv)


def slice_of(layout: str, shape: tuple, rank: int, P: int, dtype) -> tuple[np.ndarray, np.ndarray, int]:
    N = shape[0]
    n = N // P + (1 if rank < N % P else 0)
    rng = np.random.default_rng(rank)
    logical = (n, *shape[1:])
    if layout == "NHWC":
        arr_shape, axis = (n, *shape[2:], shape[1]), -1
    else:
        arr_shape, axis = logical, 1
    x = (rng.standard_normal(arr_shape, dtype=np.float32) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(arr_shape, dtype=np.float32).astype(dtype)
    return x, dy, axis


def timed(comm, fns: list, repeat: int) -> list[float]:
    """Median over repeats of the slowest rank's time of each fn(), in ms; the fns run interleaved
    (fn 0, fn 1, ..., then again) so that drifts of a shared machine hit all of them alike."""
    for fn in fns:
        fn()
        fn()  # warm (compilation, page faults)
    times = np.empty((repeat, len(fns)))
    for r in range(repeat):
        for j, fn in enumerate(fns):
            comm.Barrier()
            t = time.perf_counter()
            fn()
            times[r, j] = time.perf_counter() - t
    slowest = np.max(np.array(comm.allgather(times)), axis=0)
    return [1e3 * float(v) for v in np.median(slowest, axis=0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    threads = max(1, (os.cpu_count() or 1) // P)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    dtype = np.dtype(args.dtype)
    rows = []
    for layout, shape in SHAPES:
        C = shape[1]
        x, dy, axis = slice_of(layout, shape, rank, P, dtype)
        g, b = np.ones(C), np.zeros(C)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        y, dx = np.empty_like(x), np.empty_like(x)

        def local():
            _, m, i = fastbn.batch_norm_train(x, g, b, axis=axis, running_mean=rm, running_var=rv, out=y)
            fastbn.batch_norm_backward(dy, x, m, i, g, axis=axis, out=dx)

        def sync(c=comm):
            _, m, i = fd.sync_batch_norm_train(x, g, b, c, axis=axis, running_mean=rm, running_var=rv, out=y)
            fd.sync_batch_norm_backward(dy, x, m, i, g, c, axis=axis, out=dx)

        head, heads = np.zeros(3, np.int64), np.zeros((P, 3), np.int64)
        pay, pays = np.zeros((2, C)), np.zeros((P, 2, C))

        def allgathers():
            for _ in range(2):
                comm.Allgather(head, heads)
                comm.Allgather(pay, pays)

        def copy():
            np.copyto(y, x)

        t_local, t_sync, t_comm, t_copy = timed(comm, [local, sync, allgathers, copy], args.repeat)
        counting = CountingComm(comm)
        sync(counting)
        rows.append((layout, shape, x.shape, t_local, t_sync, t_comm, t_copy, counting.sent, counting.received))
    if rank == 0:
        print(f"{P} ranks x {numba.get_num_threads()} Numba thread(s), {dtype.name}, median of {args.repeat} "
              f"(slowest rank per repeat); one step = training forward + backward on the rank's slice")
        print(f"{'layout':6} {'global shape':>18} {'slice per rank':>20} {'local ms':>9} {'sync ms':>9} "
              f"{'sync/local':>10} {'2 allgathers ms':>15} {'copy ms':>8} {'bytes sent/rank':>15} "
              f"{'bytes recv/rank':>15}")
        for layout, shape, sl, tl, ts, tc, tcp, sent, recv in rows:
            print(f"{layout:6} {str(shape):>18} {str(sl):>20} {tl:9.2f} {ts:9.2f} {ts / tl:10.2f} {tc:15.3f} "
                  f"{tcp:8.2f} {sent:15d} {recv:15d}")


if __name__ == "__main__":
    main()
