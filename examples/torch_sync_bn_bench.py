"""fastbn.torch.SyncBatchNorm over torch.distributed (gloo): synchronized vs local step time, bytes per step.

    python examples/torch_sync_bn_bench.py --world 2 --repeat 30        # spawns the ranks itself
    torchrun --nproc_per_node 2 examples/torch_sync_bn_bench.py         # or under torchrun

Each global batch is split evenly over the ranks. Per rank and shape, one training step (forward +
backward of the BN layer alone, ``y = bn(x); y.backward(dy)``) with:

- torch:  ``torch.nn.BatchNorm2d`` on the rank's slice (local statistics; torch's own SyncBatchNorm
  refuses CPU tensors, so this is what a CPU DDP job runs today);
- local:  ``fastbn.torch.BatchNorm2d`` on the slice (local statistics);
- sync:   ``fastbn.torch.SyncBatchNorm`` on the slice (statistics of the global batch);
- gathers: the four all-gathers of one synchronized step alone (two headers, two (2, C) payloads).

A step's time is the slowest rank's (a barrier before each); medians over ``--repeat``, the four
interleaved. Torch and Numba threads per rank = cores // ranks. Bytes are counted by wrapping
``torch.distributed.all_gather`` during one synchronized step.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

import numba
import numpy as np
import torch
import torch.distributed as dist

import fastbn.torch as fbt
import fastbn.torch._sync as sync_impl

SHAPES = [("NCHW", (32, 64, 56, 56)), ("channels_last", (32, 64, 56, 56)), ("NCHW", (32, 256, 14, 14)),
          ("NC", (256, 1024))]


class _CountingDist:
    """torch.distributed with all_gather counting the bytes this rank sends and receives."""

    def __init__(self) -> None:
        self.sent = self.received = 0

    def __getattr__(self, name):
        return getattr(dist, name)

    def all_gather(self, outs, t, group=None):
        self.sent += t.numel() * t.element_size()
        self.received += sum(o.numel() * o.element_size() for o in outs)
        return dist.all_gather(outs, t, group=group)


def _timed(fns, repeat):
    for fn in fns:
        fn()
        fn()  # warm: compilation, page faults
    times = np.empty((repeat, len(fns)))
    for r in range(repeat):
        for j, fn in enumerate(fns):
            dist.barrier()
            t = time.perf_counter()
            fn()
            times[r, j] = time.perf_counter() - t
    t = torch.from_numpy(times)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank per repeat
    return [1e3 * float(v) for v in np.median(t.numpy(), axis=0)]


def run(rank: int, world: int, repeat: int, dtype: torch.dtype) -> None:
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    rows = []
    for layout, shape in SHAPES:
        N, C = shape[:2]
        n = N // world + (1 if rank < N % world else 0)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn((n,) + shape[1:], generator=g, dtype=dtype) * 2 + 1
        dy = torch.randn(x.shape, generator=g, dtype=dtype)
        if layout == "channels_last":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        kind = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
        local_cls = fbt.BatchNorm1d if len(shape) == 2 else fbt.BatchNorm2d
        mods = [kind(C, dtype=dtype), local_cls(C, dtype=dtype), fbt.SyncBatchNorm(C, dtype=dtype)]

        def step(m):
            def fn():
                m(x).backward(dy)
                x.grad = None
            return fn

        P = world
        heads = [torch.empty(4, dtype=torch.int64) for _ in range(P)]
        pays = [torch.empty(2, C, dtype=torch.float64) for _ in range(P)]
        head, pay = torch.zeros(4, dtype=torch.int64), torch.zeros(2, C, dtype=torch.float64)

        def gathers():
            for _ in range(2):
                dist.all_gather(heads, head)
                dist.all_gather(pays, pay)

        t_torch, t_local, t_sync, t_comm = _timed([step(m) for m in mods] + [gathers], repeat)
        counting = _CountingDist()
        sync_impl.dist = counting
        try:
            step(mods[2])()
        finally:
            sync_impl.dist = dist
        rows.append((layout, shape, tuple(x.shape), t_torch, t_local, t_sync, t_comm, counting.sent,
                     counting.received))
    if rank == 0:
        print(f"{world} ranks (gloo) x {threads} thread(s), {str(dtype).replace('torch.', '')}, median of "
              f"{repeat} (slowest rank per repeat); one step = BN forward + backward on the rank's slice")
        print(f"{'layout':13} {'global shape':>18} {'slice per rank':>20} {'torch BN ms':>11} {'local ms':>9} "
              f"{'sync ms':>8} {'sync/local':>10} {'gathers ms':>10} {'sent B':>7} {'recv B':>7}")
        for layout, shape, sl, tt, tl, ts, tc, sent, recv in rows:
            print(f"{layout:13} {str(shape):>18} {str(sl):>20} {tt:11.2f} {tl:9.2f} {ts:8.2f} {ts / tl:10.2f} "
                  f"{tc:10.3f} {sent:7d} {recv:7d}")


def _spawned(rank: int, world: int, port: int, repeat: int, dtype: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    run(rank, world, repeat, getattr(torch, dtype))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        run(dist.get_rank(), dist.get_world_size(), args.repeat, getattr(torch, args.dtype))
        dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.world, port, args.repeat, args.dtype), nprocs=args.world)


if __name__ == "__main__":
    main()
