"""The script every MPI rank runs for tests/test_distributed.py: ``mpiexec -n P python mpi_worker.py OUTDIR``
(``... OUTDIR failures``: only the failure-behaviour checks, check_failures).

Every rank builds the same global batches from fixed seeds, takes its own slice (unequal sizes, and a
rank with zero samples), runs the synchronized kernels / layers, and compares its results with the
single-process result on the concatenated batch: the float64 NumPy reference (tests/naive.py) and fastbn's
own single-process BN. Per-channel results (mean, invstd, running statistics) must also be bitwise
identical on every rank. Each rank writes ``OUTDIR/rank<r>.json`` with its number of checks and its
failures; an unexpected exception writes its traceback and aborts the job (so no rank hangs).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

import fastbn
import naive
from fastbn import distributed as fd

RTOL = {"float32": 1e-5, "float64": 1e-12}
comm = MPI.COMM_WORLD
P = comm.Get_size()
RANK = comm.Get_rank()

# per-rank sample counts of the global batch (rank order); every list has a rank with zero samples
# or unequal sizes
SPLITS = {2: [[5, 3], [7, 0]], 3: [[4, 0, 3], [2, 3, 1]]}[P] if P in (2, 3) else [[2] * P]
# a batch large enough for several reduction chunks per rank (the chunk-merge paths) and > 32768
# elements (the parallel kernels)
BIG = {2: [1100, 400], 3: [900, 0, 600]}.get(P, [300] * P)


class Checker:
    def __init__(self):
        self.checks = 0
        self.failures: list[str] = []

    def ok(self, cond: bool, what: str) -> None:
        self.checks += 1
        if not cond:
            self.failures.append(what)

    def close(self, actual, ref, tol: float, what: str) -> None:
        a = np.asarray(actual, np.float64)
        r = np.asarray(ref, np.float64)
        self.checks += 1
        if a.shape != r.shape:
            self.failures.append(f"{what}: shape {a.shape} != {r.shape}")
            return
        if r.size == 0:
            return
        scale = max(float(np.abs(r).max()), 1e-300)
        err = float(np.abs(a - r).max())
        if not err <= tol * scale:
            self.failures.append(f"{what}: max abs error {err:.3e} > {tol:.0e} * {scale:.3e}")

    def same_on_all_ranks(self, arrays: dict, what: str) -> None:
        """Bitwise identical per-channel results on every rank."""
        mine = {k: np.ascontiguousarray(v).tobytes() for k, v in arrays.items()}
        everyone = comm.allgather(mine)
        for k in arrays:
            self.ok(all(e[k] == mine[k] for e in everyone), f"{what}: {k} differs between ranks")

    def raises(self, fn, exc, match: str, what: str) -> None:
        self.checks += 1
        try:
            fn()
        except exc as e:
            if match not in str(e):
                self.failures.append(f"{what}: raised {type(e).__name__}({e!s}) without {match!r}")
            return
        except Exception as e:  # noqa: BLE001
            self.failures.append(f"{what}: raised {type(e).__name__}({e!s}), expected {exc.__name__}")
            return
        self.failures.append(f"{what}: did not raise")


def make_global(layout: str, n: int, C: int, dtype, seed: int, spatial=(3, 4)):
    """A global batch (n samples), its dy, and the channel axis, from a fixed seed (same on every rank)."""
    rng = np.random.default_rng(seed)
    if layout == "NCHW":
        shape, axis = (n, C, *spatial), 1
    elif layout == "NHWC":
        shape, axis = (n, *spatial, C), -1
    else:
        shape, axis = (n, C), 1
    offs = rng.uniform(-3, 3, C)
    x = rng.normal(0.0, 1.5, shape) + offs.reshape([C if i == axis % len(shape) else 1 for i in range(len(shape))])
    dy = rng.normal(0.0, 1.0, shape)
    return x.astype(dtype), dy.astype(dtype), axis


def my_slice(arr: np.ndarray, sizes: list[int]) -> np.ndarray:
    start = sum(sizes[:RANK])
    return arr[start:start + sizes[RANK]]


def check_functional(ck: Checker) -> None:
    cases = [(lay, dt, sizes) for lay in ("NCHW", "NHWC", "NC") for dt in ("float32", "float64")
             for sizes in SPLITS]
    cases += [("NCHW", dt, BIG) for dt in ("float32", "float64")] + [("NHWC", "float32", BIG)]
    for ci, (layout, dtype, sizes) in enumerate(cases):
        C = 5 if layout != "NC" else 7
        big = sizes is BIG
        spatial = (4, 4) if big else (3, 4)
        if big:
            C = 3
        tag = f"{layout}-{dtype}-{sizes}"
        tol = RTOL[dtype]
        rng = np.random.default_rng(100 + ci)
        gamma, beta = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
        rm0, rv0 = rng.uniform(-0.2, 0.2, C), rng.uniform(0.5, 2.0, C)
        rm, rv = rm0.astype(dtype), rv0.astype(dtype)          # updated by the synchronized calls
        srm, srv = rm.copy(), rv.copy()                          # single-process fastbn
        erm, erv = rm0.astype(np.float64), rv0.astype(np.float64)  # naive reference
        for step in range(3):
            xg, dyg, axis = make_global(layout, sum(sizes), C, dtype, seed=1000 * ci + step, spatial=spatial)
            x, dy = my_slice(xg, sizes), my_slice(dyg, sizes)
            y, mean, invstd = fd.sync_batch_norm_train(x, gamma, beta, comm, axis=axis, running_mean=rm,
                                                       running_var=rv, momentum=0.1)
            ry, rmean, rinv, rvar, n = naive.train_forward(xg, gamma, beta, axis=axis)
            erm, erv = naive.running_update(erm, erv, rmean, rvar, n, 0.1)
            sy, smean, sinv = fastbn.batch_norm_train(xg, gamma, beta, axis=axis, running_mean=srm,
                                                      running_var=srv, momentum=0.1)
            ck.ok(y.shape == x.shape and y.dtype == x.dtype, f"{tag}: y shape/dtype")
            ck.close(y, my_slice(ry, sizes), tol, f"{tag} step {step}: y vs naive")
            ck.close(y, my_slice(sy, sizes), tol, f"{tag} step {step}: y vs single-process fastbn")
            ck.close(mean, rmean, 1e-12, f"{tag} step {step}: mean")
            ck.close(invstd, rinv, 1e-12, f"{tag} step {step}: invstd")
            ck.close(rm, erm, tol, f"{tag} step {step}: running_mean")
            ck.close(rv, erv, tol, f"{tag} step {step}: running_var")
            ck.close(rm, srm, tol, f"{tag} step {step}: running_mean vs single-process fastbn")
            ck.close(rv, srv, tol, f"{tag} step {step}: running_var vs single-process fastbn")
            ck.same_on_all_ranks({"mean": mean, "invstd": invstd, "rm": rm, "rv": rv}, f"{tag} step {step}")
        # gradients of the last step
        dx, dgamma, dbeta = fd.sync_batch_norm_backward(dy, x, mean, invstd, gamma, comm, axis=axis)
        rdx, rdg, rdb = naive.backward(dyg, xg, rmean, rinv, gamma, axis=axis)
        ck.ok(dx.shape == x.shape and dx.dtype == x.dtype, f"{tag}: dx shape/dtype")
        ck.close(dx, my_slice(rdx, sizes), tol, f"{tag}: dx vs naive")
        sdx, _, _ = fastbn.batch_norm_backward(dyg, xg, smean, sinv, gamma, axis=axis)
        ck.close(dx, my_slice(sdx, sizes), tol, f"{tag}: dx vs single-process fastbn")
        # dgamma/dbeta are per-rank contributions: their sum over ranks is the single-process gradient
        parts = comm.allgather((dgamma, dbeta))
        ck.close(sum(p[0] for p in parts), rdg, 1e-11, f"{tag}: sum of dgamma over ranks")
        ck.close(sum(p[1] for p in parts), rdb, 1e-11, f"{tag}: sum of dbeta over ranks")
        # out= buffers, in place on dy
        dyc = dy.copy()
        dx2, _, _ = fd.sync_batch_norm_backward(dyc, x, mean, invstd, gamma, comm, axis=axis, out=dyc)
        ck.ok(dx2 is dyc and np.array_equal(dx2, dx), f"{tag}: backward out=dy in place")


def check_errors(ck: Checker) -> None:
    rng = np.random.default_rng(7)
    last = P - 1
    x = rng.normal(size=(3, 4, 5))
    # channel counts differ between ranks: every rank raises, none hangs
    xc = rng.normal(size=(3, 5 if RANK == last else 4, 5))
    ck.raises(lambda: fd.sync_batch_norm_train(xc, None, None, comm), ValueError,
              "same number of channels", "channel mismatch (forward)")
    ck.raises(lambda: fd.sync_batch_norm_backward(xc, xc, np.zeros(xc.shape[1]), np.ones(xc.shape[1]), None,
                                                  comm), ValueError, "same number of channels",
              "channel mismatch (backward)")
    # bad input on one rank only: that rank raises its own error, the others a ValueError naming it
    g = np.ones(3) if RANK == last else np.ones(4)
    ck.raises(lambda: fd.sync_batch_norm_train(x, g, None, comm), ValueError,
              "gamma must have shape" if RANK == last else f"invalid input on rank(s) [{last}]",
              "bad gamma on the last rank")
    rmbad = np.zeros(3) if RANK == 0 else np.zeros(4)
    rmk = np.zeros(4)
    rvk = np.ones(4)
    ck.raises(lambda: fd.sync_batch_norm_train(x, None, None, comm, running_mean=rmbad, running_var=np.ones(rmbad.size)),
              ValueError, "running_mean must have shape" if RANK == 0 else "invalid input on rank(s) [0]",
              "bad running_mean on rank 0")
    # one value per channel over all ranks
    x1 = rng.normal(size=(1 if RANK == 0 else 0, 4))
    ck.raises(lambda: fd.sync_batch_norm_train(x1, None, None, comm, running_mean=rmk, running_var=rvk),
              ValueError, "Expected more than 1 value per channel", "one value over all ranks")
    ck.ok(np.array_equal(rmk, np.zeros(4)) and np.array_equal(rvk, np.ones(4)), "running stats untouched on error")
    ck.raises(lambda: fd.sync_batch_norm_train(x, None, None, "comm"), TypeError,
              "comm must be an mpi4py communicator", "comm not a communicator")
    # the collectives are still in step after the errors
    y, mean, _ = fd.sync_batch_norm_train(x, None, None, comm)
    ref = naive.train_forward(np.concatenate(comm.allgather(x)), axis=1)
    ck.close(mean, ref[1], 1e-12, "a call after the errors")


def check_precise(ck: Checker) -> None:
    rng = np.random.default_rng(11)
    C = 6
    # rank r has r*2 batches of varied sizes (rank 0 none); offsets large against the spread
    all_batches = [[rng.normal(1e3, 2.0, (int(rng.integers(1, 5)), C, 3, 3)) for _ in range(2 * r)]
                   for r in range(P)]
    mine = all_batches[RANK]
    s = fastbn.precise_statistics(iter(mine), axis=1, comm=comm)
    cat = np.concatenate([b for bs in all_batches for b in bs])
    ck.ok(s.count == cat.size // C, "precise: count")
    ck.close(s.mean, cat.mean(axis=(0, 2, 3)), 1e-12, "precise: mean over ranks")
    ck.close(s.var, cat.var(axis=(0, 2, 3)), 1e-12, "precise: var over ranks")
    ck.same_on_all_ranks({"mean": s.mean, "var": s.var}, "precise")
    su = fastbn.precise_statistics(mine, axis=1, comm=comm, unbiased=True)
    ck.close(su.var, cat.var(axis=(0, 2, 3), ddof=1), 1e-12, "precise: unbiased var over ranks")
    # a rank with a channel mismatch: every rank raises
    bad = [rng.normal(size=(2, C + (1 if RANK == P - 1 else 0), 3))]
    ck.raises(lambda: fastbn.precise_statistics(bad, comm=comm), ValueError, "same number of channels",
              "precise: channel mismatch")


LAYER_CONFIGS = [
    dict(),                                                        # PyTorch defaults, float32 NCHW
    dict(momentum=None, axis=-1, dtype=np.float64),                # cumulative average, NHWC
    dict(activation="relu", dtype=np.float64),                     # fused residual add + ReLU
    dict(renorm=True, renorm_clipping=dict(rmax=1.5, dmax=0.5)),   # batch renormalization
    dict(convention="keras", momentum=0.99, eps=1e-3, axis=-1),    # Keras' conventions
    dict(affine=False, momentum=0.3, dtype=np.float64),
]


def check_layers(ck: Checker) -> None:
    """SyncBatchNorm on the slices == BatchNorm on the concatenated batch, over several steps."""
    sizes = SPLITS[0]
    for ci, cfg in enumerate(LAYER_CONFIGS):
        C = 5
        axis = cfg.get("axis", 1)
        dtype = np.dtype(cfg.get("dtype", np.float32)).name
        layout = "NHWC" if axis == -1 else "NCHW"
        tol = RTOL[dtype]
        tag = f"SyncBatchNorm {cfg}"
        ref = fastbn.BatchNorm(C, **cfg)
        bn = fd.SyncBatchNorm(C, comm, **cfg)
        if ref.gamma is not None:
            rng = np.random.default_rng(ci)
            ref.gamma[...] = bn.gamma[...] = rng.uniform(0.5, 1.5, C)
            ref.beta[...] = bn.beta[...] = rng.uniform(-0.5, 0.5, C)
        for step in range(3):
            xg, dyg, _ = make_global(layout, sum(sizes), C, dtype, seed=5000 + 10 * ci + step)
            resg = (make_global(layout, sum(sizes), C, dtype, seed=7000 + step)[0]
                    if cfg.get("activation") else None)
            ry = ref(xg, resg)
            rdx = ref.backward(dyg)
            y = bn(my_slice(xg, sizes), None if resg is None else my_slice(resg, sizes))
            dx = bn.backward(my_slice(dyg, sizes))
            ck.close(y, my_slice(ry, sizes), tol, f"{tag} step {step}: y")
            ck.close(dx, my_slice(rdx, sizes), tol, f"{tag} step {step}: dx")
            ck.close(bn.running_mean, ref.running_mean, tol, f"{tag} step {step}: running_mean")
            ck.close(bn.running_var, ref.running_var, tol, f"{tag} step {step}: running_var")
            ck.ok(bn.num_batches_tracked == ref.num_batches_tracked, f"{tag}: num_batches_tracked")
            if bn.gamma is not None:
                parts = comm.allgather((bn.dgamma.astype(np.float64), bn.dbeta.astype(np.float64)))
                ck.close(sum(p[0] for p in parts), ref.dgamma, tol, f"{tag} step {step}: sum of dgamma")
                ck.close(sum(p[1] for p in parts), ref.dbeta, tol, f"{tag} step {step}: sum of dbeta")
            if resg is not None:
                ck.close(bn.d_residual, my_slice(ref.d_residual, sizes), tol, f"{tag}: d_residual")
            same = {"rm": bn.running_mean, "rv": bn.running_var}
            if bn.renorm:
                same.update(renorm_mean=bn.renorm_mean, renorm_std=bn.renorm_std)
            ck.same_on_all_ranks(same, f"{tag} step {step}")
        # eval mode is local and uses the (synchronized) running statistics
        xe = make_global(layout, 3, C, dtype, seed=9)[0]
        ck.close(bn.eval()(xe), ref.eval()(xe), tol, f"{tag}: eval forward")
    # precise BN across ranks into a SyncBatchNorm, through a forward (the layer's own, collective)
    bn = fd.SyncBatchNorm(4, comm, momentum=0.1, dtype=np.float64)
    batches = [make_global("NCHW", 6, 4, "float64", seed=300 + i)[0] for i in range(3)]
    mine = [my_slice(b, sizes) for b in batches]
    s = fastbn.update_bn_stats(bn, mine, forward=bn, comm=comm)
    cat = np.concatenate(batches)
    ck.close(bn.running_mean, cat.mean(axis=(0, 2, 3)), 1e-12, "update_bn_stats(forward=bn): running_mean")
    ck.close(bn.running_var, cat.var(axis=(0, 2, 3), ddof=1), 1e-12, "update_bn_stats(forward=bn): running_var")
    ck.ok(s.count == cat.size // 4 and bn.num_batches_tracked == 0 and bn.training,
          "update_bn_stats: count, num_batches_tracked and mode restored")
    # and from arrays directly, into a plain BatchNorm
    plain = fastbn.BatchNorm(4, axis=1)
    fastbn.update_bn_stats(plain, mine, comm=comm)
    ck.close(plain.running_var, cat.var(axis=(0, 2, 3), ddof=1), 1e-6, "update_bn_stats(arrays): running_var")
    ck.same_on_all_ranks({"rv": plain.running_var}, "update_bn_stats(arrays)")
    # a layer given the wrong channel count on one rank: every rank raises, the next call works
    last = P - 1
    bn = fd.SyncBatchNorm(4, comm)
    xw = np.ones((2, 5 if RANK == last else 4, 3), np.float32)
    ck.raises(lambda: bn(xw), ValueError, "num_features=4" if RANK == last else f"invalid input on rank(s) [{last}]",
              "SyncBatchNorm: wrong channels on one rank")
    ck.raises(lambda: bn.backward(xw), RuntimeError, "forward() first",  # no rank has a forward saved
              "SyncBatchNorm: backward without forward")
    xs = np.arange(24, dtype=np.float32).reshape(2, 4, 3) + RANK
    y = bn(xs)
    ref = naive.train_forward(np.concatenate(comm.allgather(xs)), axis=1)[0]
    ck.close(y, my_slice(ref, [2] * P), 1e-5, "SyncBatchNorm: a call after the errors")


class Failing:
    """An array-like whose conversion raises ``exc`` (a torch tensor that requires grad raises
    RuntimeError there; a huge allocation MemoryError)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __array__(self, *args, **kwargs):
        raise self.exc


def check_failures(ck: Checker) -> None:
    """Any failure on one rank before the collective raises on every rank; ranks in different calls
    raise on every rank; afterwards the collectives are still in step."""
    last = P - 1
    rng = np.random.default_rng(21)
    x = rng.normal(3.0, 1.0, (3, 4, 5))
    for exc in (RuntimeError("tensor requires grad"), MemoryError(), OverflowError("too large")):
        g = Failing(exc) if RANK == last else None
        ck.raises(lambda: fd.sync_batch_norm_train(x, g, None, comm),
                  type(exc) if RANK == last else ValueError,
                  str(exc) if RANK == last else f"invalid input on rank(s) [{last}]",
                  f"{type(exc).__name__} on the last rank (forward)")
        m = Failing(exc) if RANK == last else np.zeros(4)
        ck.raises(lambda: fd.sync_batch_norm_backward(x, x, m, np.ones(4), None, comm),
                  type(exc) if RANK == last else ValueError,
                  str(exc) if RANK == last else f"invalid input on rank(s) [{last}]",
                  f"{type(exc).__name__} on the last rank (backward)")
        bn = fd.SyncBatchNorm(4, comm, dtype=np.float64)
        xb = Failing(exc) if RANK == last else x
        ck.raises(lambda: bn(xb), type(exc) if RANK == last else ValueError,
                  str(exc) if RANK == last else f"invalid input on rank(s) [{last}]",
                  f"{type(exc).__name__} on the last rank (SyncBatchNorm)")
    eps = 10**400 if RANK == 0 else 1e-5
    ck.raises(lambda: fd.sync_batch_norm_train(x, None, None, comm, eps=eps), ValueError,
              "eps" if RANK == 0 else "invalid input on rank(s) [0]", "eps=10**400 on rank 0")
    # rank 0 in the forward, the others in the backward
    y, mean, invstd = fd.sync_batch_norm_train(x, None, None, comm)
    if RANK == 0:
        call = lambda: fd.sync_batch_norm_train(x + 50.0, None, None, comm)  # noqa: E731
    else:
        call = lambda: fd.sync_batch_norm_backward(x, x, mean, invstd, None, comm)  # noqa: E731
    ck.raises(call, ValueError, "rank 0 in a training forward, rank 1 in a backward", "forward vs backward")
    bn = fd.SyncBatchNorm(4, comm, dtype=np.float64)
    bn(x)
    ck.raises((lambda: bn(x)) if RANK == 0 else (lambda: bn.backward(np.ones_like(x))), ValueError,
              "different collective calls", "SyncBatchNorm forward vs backward")
    # still in step: the same global statistics on every rank, equal to the reference
    y2, mean2, invstd2 = fd.sync_batch_norm_train(x, None, None, comm)
    ref = naive.train_forward(np.concatenate(comm.allgather(x)), axis=1)
    ck.close(mean2, ref[1], 1e-12, "a call after the failures: mean")
    ck.close(invstd2, ref[2], 1e-12, "a call after the failures: invstd")
    ck.same_on_all_ranks({"mean": mean2, "invstd": invstd2}, "after the failures")


def main(outdir: str, mode: str = "all") -> None:
    ck = Checker()
    try:
        if mode == "failures":
            check_failures(ck)
        else:
            check_functional(ck)
            check_errors(ck)
            check_precise(ck)
            check_layers(ck)
    except Exception:  # noqa: BLE001
        ck.failures.append("unexpected exception:\n" + traceback.format_exc())
        _write(outdir, ck)
        sys.stderr.write(ck.failures[-1])
        sys.stderr.flush()
        comm.Abort(1)
    _write(outdir, ck)


def _write(outdir: str, ck: Checker) -> None:
    with open(os.path.join(outdir, f"rank{RANK}.json"), "w") as f:
        json.dump({"rank": RANK, "size": P, "checks": ck.checks, "failures": ck.failures}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
