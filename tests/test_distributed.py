"""Synchronized BN: real MPI runs (mpiexec -n 2 and -n 3 of tests/mpi_worker.py) and in-process runs over
a thread-backed communicator (no MPI needed), against the single-process result on the concatenated batch.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import fastbn
import naive
from conftest import RTOL, assert_close
from fastbn import distributed as fd

HERE = Path(__file__).resolve().parent
MPI_TIMEOUT_S = 300  # cold Numba compilation in every rank takes ~1 min here; warm runs take ~3 s


# ---------------------------------------------------------------------------------------------------
# real MPI


def _mpiexec() -> str | None:
    near = Path(sys.executable).parent / "mpiexec"
    if near.exists():
        return str(near)
    return shutil.which("mpiexec")


def _skip_reason() -> str | None:
    try:
        import mpi4py  # noqa: F401  (the package only: importing mpi4py.MPI would initialize MPI here)
    except ImportError:
        return "mpi4py is not installed (pip install 'fastbn[mpi]' installs mpi4py and MPICH)"
    if _mpiexec() is None:
        return "mpiexec not found next to the Python executable or on PATH (pip install mpich)"
    return None


def _run_mpi(ranks: int, outdir: Path, *args: str, timeout: int = MPI_TIMEOUT_S) -> list[dict]:
    """``mpiexec -n ranks python -m mpi4py mpi_worker.py outdir *args``; the per-rank results.

    ``python -m mpi4py`` aborts the job on an exception that a rank does not catch (the README's advice);
    a rank that hangs fails the test at the timeout instead of blocking the suite.
    """
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ)
    # 2 cores here: keep ranks x threads near the core count (oversubscribed MPI ranks busy-poll)
    env["NUMBA_NUM_THREADS"] = "2" if ranks == 2 else "1"
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", str(HERE / "mpi_worker.py"),
           str(outdir), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=HERE,
                            start_new_session=True, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank: a hung rank fails the test
        out, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {ranks} did not finish in {timeout} s (a rank hung?)\n{out[-4000:]}")
    assert proc.returncode == 0, f"mpiexec -n {ranks} exited with {proc.returncode}:\n{out[-4000:]}"
    results = []
    for r in range(ranks):
        f = outdir / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result:\n{out[-4000:]}"
        res = json.loads(f.read_text())
        assert res["size"] == ranks
        results.append(res)
    return results


def _failures(results: list[dict]) -> list[str]:
    return [f"rank {r}: {msg}" for r, res in enumerate(results) for msg in res["failures"]]


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_ranks_match_single_process(ranks, tmp_path):
    results = _run_mpi(ranks, tmp_path)
    for r, res in enumerate(results):
        assert res["checks"] > 500, f"rank {r} ran only {res['checks']} checks"
    failures = _failures(results)
    assert not failures, "\n".join(failures[:30])


def test_mpi_any_failure_on_one_rank_raises_on_every_rank(tmp_path):
    """RuntimeError / MemoryError / OverflowError on one rank, eps=10**400, a forward on one rank
    against a backward on the other: every rank raises, none hangs, and the next calls still agree."""
    results = _run_mpi(2, tmp_path, "failures", timeout=180)
    for r, res in enumerate(results):
        assert res["checks"] >= 10, f"rank {r} ran only {res['checks']} checks"
    failures = _failures(results)
    assert not failures, "\n".join(failures[:30])


# ---------------------------------------------------------------------------------------------------
# in process: a communicator over threads (each "rank" is a thread), so the merge logic, unequal and
# empty slices and the error protocol are tested without MPI


class _Group:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list = [None] * size


class ThreadComm:
    """The part of mpi4py's communicator interface fastbn uses: Get_rank, Get_size, Allgather."""

    def __init__(self, group: _Group, rank: int):
        self.group, self.rank = group, rank
        self.bytes_sent = 0

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.group.size

    def Allgather(self, send, recv) -> None:
        g = self.group
        g.slots[self.rank] = np.array(send, copy=True)
        self.bytes_sent += g.slots[self.rank].nbytes
        g.barrier.wait()
        recv[...] = np.stack(g.slots).reshape(recv.shape)
        g.barrier.wait()


def run_ranks(size: int, fn):
    """Run fn(comm) on `size` threads; returns per-rank ("ok", result) or ("err", exception)."""
    group = _Group(size)
    results: list = [None] * size

    def go(r):
        try:
            results[r] = ("ok", fn(ThreadComm(group, r)))
        except BaseException as e:  # noqa: BLE001
            results[r] = ("err", e)

    threads = [threading.Thread(target=go, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None for r in results), "a rank hung"
    return results


def _values(results):
    for kind, v in results:
        if kind == "err":
            raise v
    return [v for _, v in results]


SHAPES = [((40, 64, 9, 9), 1), ((1500, 3, 4, 4), 1), ((40, 9, 9, 64), -1), ((20000, 3), 1), ((6, 5), 1)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_one_rank_is_bitwise_local_bn(shape, axis, dtype):
    """With one rank, synchronized BN gives single-process BN's bits: the functional forward those of
    batch_norm_train, the backward and SyncBatchNorm those of the BatchNorm layer (its fused kernels)."""
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    C = shape[axis]
    g, b = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm2, rv2 = rm.copy(), rv.copy()
    y, m, i = fastbn.batch_norm_train(x, g, b, axis=axis, running_mean=rm, running_var=rv)
    ref = fastbn.BatchNorm(C, axis=axis, dtype=np.float64, momentum=None)
    ref.gamma[...], ref.beta[...] = g, b
    ry = ref(x)
    rdx = ref.backward(dy)

    def step(comm):
        fwd = fd.sync_batch_norm_train(x, g, b, comm, axis=axis, running_mean=rm2, running_var=rv2)
        bwd = fd.sync_batch_norm_backward(dy, x, fwd.mean, fwd.invstd, g, comm, axis=axis)
        layer = fd.SyncBatchNorm(C, comm, axis=axis, dtype=np.float64, momentum=None)
        layer.gamma[...], layer.beta[...] = g, b
        ly = layer(x)
        return fwd, bwd, ly, layer.backward(dy), layer

    [((y2, m2, i2), (dx2, dg2, db2), ly, ldx, layer)] = _values(run_ranks(1, step))
    for a, e in [(y, y2), (m, m2), (i, i2), (rm, rm2), (rv, rv2), (rdx, dx2), (ref.dgamma, dg2),
                 (ref.dbeta, db2), (ry, ly), (rdx, ldx), (ref.dgamma, layer.dgamma),
                 (ref.running_mean, layer.running_mean), (ref.running_var, layer.running_var)]:
        assert np.array_equal(a, e)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
@pytest.mark.parametrize("sizes", [[4, 0, 3], [0, 5], [1, 1, 1, 1]])
def test_threads_match_concatenated_batch(layout, dtype, sizes):
    rng = np.random.default_rng(1)
    C = 5
    N = sum(sizes)
    shape, axis = {"NCHW": ((N, C, 3, 2), 1), "NHWC": ((N, 3, 2, C), -1), "NC": ((N, C), 1)}[layout]
    x = (rng.normal(0, 2, shape) + 1e3).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    g, b = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
    starts = np.cumsum([0] + sizes)

    def step(comm):
        r = comm.Get_rank()
        xs, dys = x[starts[r]:starts[r + 1]], dy[starts[r]:starts[r + 1]]
        rm, rv = np.zeros(C), np.ones(C)
        for _ in range(2):
            y, mean, invstd = fd.sync_batch_norm_train(xs, g, b, comm, axis=axis, running_mean=rm,
                                                       running_var=rv, momentum=0.3)
        dx, dgamma, dbeta = fd.sync_batch_norm_backward(dys, xs, mean, invstd, g, comm, axis=axis)
        return y, mean, invstd, rm, rv, dx, dgamma, dbeta

    res = _values(run_ranks(len(sizes), step))
    ry, rmean, rinv, rvar, n = naive.train_forward(x, g, b, axis=axis)
    erm, erv = naive.running_update(np.zeros(C), np.ones(C), rmean, rvar, n, 0.3)
    erm, erv = naive.running_update(erm, erv, rmean, rvar, n, 0.3)
    rdx, rdg, rdb = naive.backward(dy, x, rmean, rinv, g, axis=axis)
    tol = RTOL[dtype]
    assert_close(np.concatenate([r[0] for r in res]), ry, tol, "y")
    assert_close(np.concatenate([r[5] for r in res]), rdx, tol, "dx")
    assert_close(sum(r[6] for r in res), rdg, 1e-11, "dgamma (sum over ranks)")
    assert_close(sum(r[7] for r in res), rdb, 1e-11, "dbeta (sum over ranks)")
    for k, ref in [(1, rmean), (2, rinv), (3, erm), (4, erv)]:
        assert_close(res[0][k], ref, 1e-12)
        for r in res[1:]:
            assert np.array_equal(r[k], res[0][k]), "per-channel results must be identical on every rank"


def test_errors_raise_on_every_rank():
    def bad_channels(comm):
        r = comm.Get_rank()
        return fd.sync_batch_norm_train(np.ones((2, 3 + r, 4)), None, None, comm)

    for kind, e in run_ranks(3, bad_channels):
        assert kind == "err" and isinstance(e, ValueError) and "[3, 4, 5]" in str(e)

    def bad_gamma_on_rank1(comm):
        g = np.ones(2) if comm.Get_rank() == 1 else None
        return fd.sync_batch_norm_train(np.ones((2, 3, 4)), g, None, comm)

    res = run_ranks(3, bad_gamma_on_rank1)
    assert "gamma must have shape (3,)" in str(res[1][1])
    assert all("invalid input on rank(s) [1]" in str(res[r][1]) for r in (0, 2))

    def bad_dy_dtype(comm):
        x = np.ones((2, 3, 4))
        dy = x.astype(np.float32) if comm.Get_rank() == 0 else x
        return fd.sync_batch_norm_backward(dy, x, np.zeros(3), np.ones(3), None, comm)

    res = run_ranks(2, bad_dy_dtype)
    assert isinstance(res[0][1], TypeError) and "dy must have x's dtype" in str(res[0][1])
    assert isinstance(res[1][1], ValueError)

    def too_few(comm):
        x = np.ones((1, 3)) if comm.Get_rank() == 0 else np.ones((0, 3))
        return fd.sync_batch_norm_train(x, None, None, comm)

    for kind, e in run_ranks(2, too_few):
        assert kind == "err" and "Expected more than 1 value per channel" in str(e)


class Failing:
    """An array-like whose conversion raises ``exc`` (a torch tensor that requires grad raises
    RuntimeError there; a huge allocation MemoryError)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __array__(self, *args, **kwargs):
        raise self.exc


def _expect_raised_everywhere(results, failing: int, exc: BaseException) -> None:
    assert results[failing] == ("err", exc)
    for r, (kind, e) in enumerate(results):
        if r != failing:
            assert kind == "err" and isinstance(e, ValueError), (r, kind, e)
            assert f"invalid input on rank(s) [{failing}]" in str(e)


@pytest.mark.parametrize("exc", [RuntimeError("requires grad"), MemoryError(), OverflowError("huge")])
def test_any_failure_before_the_collective_raises_on_every_rank(exc):
    """Not only ValueError/TypeError: whatever one rank's checks raise reaches every rank."""
    x = np.ones((2, 3, 4))
    calls = [  # (call, the argument the other ranks pass where rank 1 passes Failing(exc))
        (lambda comm, a: fd.sync_batch_norm_train(x, a, None, comm), None),
        (lambda comm, a: fd.sync_batch_norm_backward(x, x, a, np.ones(3), None, comm), np.zeros(3)),
        (lambda comm, a: fd.SyncBatchNorm(3, comm, dtype=np.float64)(a), x),
        (lambda comm, a: fastbn.precise_statistics([a], comm=comm), x),
        (lambda comm, a: fastbn.update_bn_stats(fastbn.BatchNorm(3), [a], comm=comm), x),
    ]
    for call, good in calls:
        def go(comm):
            return call(comm, Failing(exc) if comm.Get_rank() == 1 else good)
        _expect_raised_everywhere(run_ranks(3, go), 1, exc)


def test_bad_arguments_on_one_rank_raise_on_every_rank():
    """Argument checks that ran before any collective: eps=10**400, precise/update_bn_stats arguments."""
    x = np.ones((2, 3, 4))

    def big_eps(comm):
        return fd.sync_batch_norm_train(x, None, None, comm, eps=10**400 if comm.Get_rank() == 0 else 1e-5)

    res = run_ranks(2, big_eps)
    assert isinstance(res[0][1], ValueError) and "eps" in str(res[0][1])
    assert "invalid input on rank(s) [0]" in str(res[1][1])

    def bad_max_batches(comm):
        return fastbn.precise_statistics([x], comm=comm, max_batches=-1 if comm.Get_rank() == 1 else None)

    res = run_ranks(2, bad_max_batches)
    assert "max_batches" in str(res[1][1]) and "invalid input on rank(s) [1]" in str(res[0][1])

    def bad_layers(comm):
        layers = "bn" if comm.Get_rank() == 1 else fastbn.BatchNorm(3)
        return fastbn.update_bn_stats(layers, [x], comm=comm)

    res = run_ranks(2, bad_layers)
    assert isinstance(res[1][1], TypeError) and "invalid input on rank(s) [1]" in str(res[0][1])

    def layer_channels_differ(comm):  # rank 1 has no data and a layer of another width
        bn = fastbn.BatchNorm(3 if comm.Get_rank() == 0 else 4)
        return fastbn.update_bn_stats(bn, [x] if comm.Get_rank() == 0 else [], comm=comm)

    for kind, e in run_ranks(2, layer_channels_differ):
        assert kind == "err" and "same number of channels" in str(e)


def test_ranks_in_different_calls_raise_on_every_rank():
    """Rank 0 in the forward while rank 1 is in the backward: both raise (no silently merged sums)."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, (4, 3, 5))

    def go(comm):
        y, mean, invstd = fd.sync_batch_norm_train(x, None, None, comm)
        if comm.Get_rank() == 0:
            return fd.sync_batch_norm_train(x + 50.0, None, None, comm)
        return fd.sync_batch_norm_backward(x, x, mean, invstd, None, comm)

    for kind, e in run_ranks(2, go):
        assert kind == "err" and isinstance(e, ValueError), e
        assert "rank 0 in a training forward, rank 1 in a backward" in str(e)

    def layers(comm):
        bn = fd.SyncBatchNorm(3, comm, dtype=np.float64)
        bn(x)
        if comm.Get_rank() == 1:
            return bn.backward(np.ones_like(x))
        return bn(x)

    for kind, e in run_ranks(2, layers):
        assert kind == "err" and "different collective calls" in str(e)

    def precise_layers(comm):  # one rank updates two layers, the other one: the counts differ
        bns = [fastbn.BatchNorm(3) for _ in range(2 - comm.Get_rank())]
        return fastbn.update_bn_stats(bns, [x], forward=lambda b: [bn(b) for bn in bns], comm=comm)

    for kind, e in run_ranks(2, precise_layers):
        assert kind == "err" and "rank 0 in precise statistics (layer 0 of 2), rank 1 in precise" in str(e)


@pytest.mark.parametrize("comm,exc,match", [
    (None, TypeError, "comm must be an mpi4py communicator"),
    (42, TypeError, "got int"),
    (object(), TypeError, "Allgather"),
])
def test_bad_comm(comm, exc, match):
    x = np.ones((4, 3))
    with pytest.raises(exc, match=match):
        fd.sync_batch_norm_train(x, None, None, comm)
    with pytest.raises(exc, match=match):
        fd.sync_batch_norm_backward(x, x, np.zeros(3), np.ones(3), None, comm)


def test_bytes_per_step_do_not_depend_on_batch():
    """Communication is O(C): a header of 4 int64 and a (2, C) float64 payload per rank and call."""
    C = 16
    for N in (4, 64):
        x = np.random.default_rng(0).normal(size=(N, C, 5, 5))

        def step(comm):
            y, mean, invstd = fd.sync_batch_norm_train(x, None, None, comm)
            fd.sync_batch_norm_backward(x, x, mean, invstd, None, comm)
            return comm.bytes_sent

        assert _values(run_ranks(2, step)) == [2 * (32 + 16 * C)] * 2


def test_precise_statistics_over_thread_ranks():
    rng = np.random.default_rng(3)
    per_rank = [[rng.normal(50, 3, (int(rng.integers(1, 6)), 4, 5)) for _ in range(k)] for k in (3, 0, 2)]

    def go(comm):
        return fastbn.precise_statistics(per_rank[comm.Get_rank()], axis=1, comm=comm)

    res = _values(run_ranks(3, go))
    cat = np.concatenate([b for bs in per_rank for b in bs])
    assert_close(res[0].mean, cat.mean(axis=(0, 2)), 1e-12)
    assert_close(res[0].var, cat.var(axis=(0, 2)), 1e-12)
    assert all(np.array_equal(r.var, res[0].var) and r.count == cat.shape[0] * 5 for r in res)


def test_module_imports_without_mpi4py():
    code = ("import sys; sys.modules['mpi4py'] = None; sys.modules['mpi4py.MPI'] = None\n"
            "import fastbn.distributed, fastbn.precise, fastbn.stats\n"
            "assert 'mpi4py.MPI' not in sys.modules or sys.modules['mpi4py.MPI'] is None\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("cfg", [dict(), dict(momentum=None, axis=-1, dtype=np.float64),
                                 dict(activation="relu", dtype=np.float64),
                                 dict(renorm=True, renorm_clipping=dict(rmax=1.5, dmax=0.5))])
def test_sync_layer_matches_batchnorm_on_concatenation(cfg):
    rng = np.random.default_rng(5)
    C, sizes = 4, [3, 0, 4]
    starts = np.cumsum([0] + sizes)
    axis = cfg.get("axis", 1)
    dt = cfg.get("dtype", np.float32)
    shape = (sum(sizes), C, 3, 2) if axis == 1 else (sum(sizes), 3, 2, C)
    xs = [(rng.normal(0, 2, shape) + 3).astype(dt) for _ in range(3)]
    dys = [rng.normal(size=shape).astype(dt) for _ in range(3)]
    res = rng.normal(size=shape).astype(dt) if cfg.get("activation") else None
    ref = fastbn.BatchNorm(C, **cfg)
    ref.gamma[...] = rng.uniform(0.5, 1.5, C)
    expect = []
    for x, dy in zip(xs, dys):
        y = ref(x, res)
        expect.append((y, ref.backward(dy), ref.dgamma.astype(np.float64), ref.running_mean.copy(),
                       ref.running_var.copy()))

    def go(comm):
        sl = slice(starts[comm.Get_rank()], starts[comm.Get_rank() + 1])
        bn = fd.SyncBatchNorm(C, comm, **cfg)
        bn.gamma[...] = ref.gamma
        out = []
        for x, dy in zip(xs, dys):
            y = bn(x[sl], None if res is None else res[sl])
            out.append((y, bn.backward(dy[sl]), bn.dgamma.astype(np.float64), bn.running_mean.copy(),
                        bn.running_var.copy()))
        return out

    got = _values(run_ranks(3, go))
    tol = RTOL[np.dtype(dt).name]
    for step, (y, dx, dg, rm, rv) in enumerate(expect):
        assert_close(np.concatenate([g[step][0] for g in got]), y, tol, "y")
        assert_close(np.concatenate([g[step][1] for g in got]), dx, tol, "dx")
        assert_close(sum(g[step][2] for g in got), dg, tol, "dgamma summed over ranks")
        for g in got:
            assert np.array_equal(g[step][3], got[0][step][3]) and np.array_equal(g[step][4], got[0][step][4])
        assert_close(got[0][step][3], rm, tol, "running_mean")
        assert_close(got[0][step][4], rv, tol, "running_var")


def test_sync_layer_arguments():
    group = _Group(1)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        fd.SyncBatchNorm(4, None)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        fd.SyncBatchNorm(4, ThreadComm(group, 0), virtual_batch_size=2)
    base = fastbn.BatchNorm(3, momentum=None)
    sbn = fd.SyncBatchNorm.from_layer(base, ThreadComm(group, 0))
    assert isinstance(sbn, fastbn.BatchNorm) and sbn.running_mean is base.running_mean
    assert fastbn.SyncBatchNorm is fd.SyncBatchNorm
    x = np.random.default_rng(0).normal(size=(6, 3))
    y = sbn(x)  # one rank: plain batch norm
    assert_close(y, naive.train_forward(x, axis=1)[0], 1e-5)
    sbn.eval()
    assert_close(sbn(x), naive.infer_forward(x, sbn.running_mean, sbn.running_var, axis=1), 1e-5)
    with pytest.raises(ValueError, match="num_features=3"):
        sbn.train()(np.ones((4, 5)))
