"""Data-parallel training with synchronized batch norm over MPI, checked against one process.

    mpiexec -n 2 python -m mpi4py examples/sync_bn_train.py  # also -n 3, --sizes 9,0,15, --dtype float32

Model: 1x1 conv (3 -> 16 channels) -> SyncBatchNorm + ReLU -> global average pool -> dense (16 -> 10),
softmax cross-entropy, plain SGD, on a synthetic 10-class problem. The global batch of every step is
split unevenly over the ranks (``--sizes``; a rank may get 0 samples). Every rank sums the gradient
contributions of all ranks in rank order (an all-gather, so every rank applies identical updates).

Each rank also trains the same model on the *whole* batch in one process with ``fastbn.BatchNorm``; at
the end rank 0 prints, per rank, how far its parameters and running statistics are from that
single-process run and whether they are bit-identical to rank 0's.
"""
from __future__ import annotations

import argparse

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn.distributed import SyncBatchNorm

C_IN, C_HID, CLASSES, HW = 3, 16, 10, 8


def make_batch(step: int, n: int, dtype):
    """The global batch of one step (the same on every rank): images whose channel means depend on the label."""
    rng = np.random.default_rng(1000 + step)
    labels = rng.integers(0, CLASSES, n)
    centers = np.random.default_rng(7).normal(0, 1, (CLASSES, C_IN))
    x = rng.normal(0, 1, (n, C_IN, HW, HW)) + centers[labels][:, :, None, None] + 4.0
    return x.astype(dtype), labels


class Model:
    def __init__(self, bn, dtype):
        rng = np.random.default_rng(0)  # same initial weights on every rank
        self.w1 = (rng.normal(0, 0.5, (C_HID, C_IN))).astype(dtype)
        self.b1 = np.zeros(C_HID, dtype)
        self.bn = bn
        self.w2 = (rng.normal(0, 0.3, (CLASSES, C_HID))).astype(dtype)
        self.b2 = np.zeros(CLASSES, dtype)

    def params(self):
        return [self.w1, self.b1, self.bn.gamma, self.bn.beta, self.w2, self.b2]

    def loss_and_grads(self, x, labels, n_global):
        """Loss summed over this slice / n_global, and its gradients (this slice's contributions)."""
        h = np.einsum("oc,nchw->nohw", self.w1, x) + self.b1[:, None, None]
        a = self.bn(np.ascontiguousarray(h, dtype=x.dtype))
        p = a.mean(axis=(2, 3))
        z = p @ self.w2.T + self.b2
        z = z - z.max(axis=1, keepdims=True) if len(z) else z
        e = np.exp(z)
        prob = e / e.sum(axis=1, keepdims=True) if len(z) else e
        loss = -np.log(prob[np.arange(len(labels)), labels]).sum() / n_global
        dz = prob.copy()
        dz[np.arange(len(labels)), labels] -= 1.0
        dz /= n_global
        dp = dz @ self.w2
        da = np.broadcast_to((dp / (HW * HW))[:, :, None, None], a.shape).astype(x.dtype)
        dh = self.bn.backward(np.ascontiguousarray(da))   # collective for SyncBatchNorm
        grads = [np.einsum("nohw,nchw->oc", dh, x), dh.sum(axis=(0, 2, 3)), self.bn.dgamma, self.bn.dbeta,
                 dz.T @ p, dz.sum(axis=0)]
        return loss, grads

    def sgd(self, grads, lr):
        for w, g in zip(self.params(), grads):
            w -= (lr * g).astype(w.dtype)


def allreduce_sum(comm, arrays):
    """Sum of every rank's arrays, added in rank order: the same bits on every rank."""
    flat = np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])
    gathered = np.empty((comm.Get_size(), flat.size))
    comm.Allgather(flat, gathered)
    total = gathered[0].copy()
    for p in range(1, len(gathered)):
        total += gathered[p]
    out, i = [], 0
    for a in arrays:
        out.append(total[i:i + np.size(a)].reshape(np.shape(a)))
        i += np.size(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="per-rank samples per step, e.g. 9,0,15 (default: uneven split of 24)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(args.dtype)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
        if len(sizes) != P:
            raise SystemExit(f"--sizes needs {P} values (one per rank), got {len(sizes)}")
    else:  # uneven: rank r's share of 24 samples is proportional to P - r
        w = np.arange(P, 0, -1, dtype=float)
        cuts = np.round(np.cumsum(np.r_[0.0, w]) / w.sum() * 24).astype(int)
        sizes = [int(v) for v in np.diff(cuts)]
    start = sum(sizes[:rank])
    n_global = sum(sizes)

    sync = Model(SyncBatchNorm(C_HID, comm, activation="relu", momentum=0.1, dtype=dtype), dtype)
    single = Model(fastbn.BatchNorm(C_HID, activation="relu", momentum=0.1, dtype=dtype), dtype)

    for step in range(args.steps):
        x, labels = make_batch(step, n_global, dtype)
        mine = slice(start, start + sizes[rank])
        loss, grads = sync.loss_and_grads(x[mine], labels[mine], n_global)
        total = allreduce_sum(comm, [np.array([loss])] + grads)
        sync.sgd(total[1:], args.lr)
        ref_loss, ref_grads = single.loss_and_grads(x, labels, n_global)
        single.sgd(ref_grads, args.lr)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss (synchronized, {P} ranks) {total[0][0]:.6f}   "
                  f"loss (one process) {ref_loss:.6f}", flush=True)

    # agreement: with the single-process run, and between ranks
    def state(m):
        return m.params() + [m.bn.running_mean, m.bn.running_var]

    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(state(sync), state(single)))
    mine_bytes = b"".join(np.ascontiguousarray(a).tobytes() for a in state(sync))
    rows = comm.gather((rank, sizes[rank], diff, mine_bytes), root=0)
    if rank == 0:
        print(f"\n{P} ranks, per-rank samples per step {sizes}, {args.steps} steps, {dtype.name}")
        print("rank  samples  max |sync - single-process| (params, running stats)  identical to rank 0")
        for r, n, d, blob in rows:
            print(f"{r:4d}  {n:7d}  {d:52.3e}  {blob == rows[0][3]}")


if __name__ == "__main__":
    main()
