"""Fork children and threads under every threading layer (fastbn/_dispatch.py).

Each scenario runs in a fresh interpreter with a timeout: a child killed by GNU OpenMP, a hung
``Pool.map`` or an aborting workqueue layer fails the test instead of taking pytest down with it.
Every scenario compares the results of the forked children / threads bit for bit with the parent's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest

import fastbn
from fastbn import _dispatch

ROOT = Path(fastbn.__file__).resolve().parents[1]
TIMEOUT_S = 240  # a cold Numba cache compiles the large-input kernels first (~1 min on 2 cores)

# The same calls in parent, fork children and threads: inputs over SERIAL_MAX_ELEMS, so the parent
# starts Numba's thread pool; every public family (functional, fused, layer, statistics).
COMMON = """
import numpy as np, fastbn, numba
rng = np.random.default_rng(0)
x = rng.normal(2.0, 3.0, (16, 32, 12, 12)).astype(np.float32)
dy = rng.normal(size=x.shape).astype(np.float32)

def work(i=0):
    y, m, s = fastbn.batch_norm_train(x)
    dx = fastbn.batch_norm_backward(dy, x, m, s).dx
    z = fastbn.batch_norm_relu_infer(x, m, 1.0 / s ** 2, residual=dy)
    bn = fastbn.BatchNorm(32)
    yl = bn(x)
    p = fastbn.partial_stats(x)
    return b"".join(a.tobytes() for a in (y, m, s, dx, z, yl, bn.backward(dy), p.m2))
"""


def run_script(body: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **env_extra)
    code = COMMON + textwrap.dedent(body)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             timeout=TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {TIMEOUT_S} s:\n{(e.stderr or b'')[-3000:]!r}")
    assert out.returncode == 0, f"exit {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out


FORK_POOL = """
import multiprocessing as mp
ref = work()
layer = numba.threading_layer()          # the parent's pool is running
with mp.get_context("fork").Pool(2) as pool:
    res = pool.map_async(work, range(4)).get(timeout=60)
assert all(r == ref for r in res), "a fork child's results differ from the parent's"
# the parent keeps its parallel kernels, and a child can fork again
assert work() == ref
with mp.get_context("fork").Pool(1) as pool:
    assert pool.apply_async(work).get(timeout=60) == ref
print("ok", layer)
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_fork_pool_after_parallel_call(layer):
    """10.2: children of a process that ran parallel kernels get the parent's results."""
    env = {} if layer == "default" else {"NUMBA_THREADING_LAYER": layer}
    out = run_script(FORK_POOL, **env)
    assert out.stdout.startswith("ok")


def test_os_fork_child_after_parallel_call():
    """A bare os.fork (no multiprocessing machinery) in a process whose thread pool is running."""
    out = run_script("""
        import os
        ref = work()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            ok = work() == ref
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        _, status = os.waitpid(pid, 0)
        assert status == 0 and got == b"1", (status, got)
        print("ok")
    """)
    assert "ok" in out.stdout


def test_torch_dataloader_workers_call_fastbn():
    """10.2: a torch DataLoader (fork workers) whose dataset normalizes with fastbn."""
    pytest.importorskip("torch")
    out = run_script("""
        import torch
        from torch.utils.data import DataLoader, Dataset

        class DS(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return np.frombuffer(work(i), np.uint8).copy()

        ref = np.frombuffer(work(), np.uint8)
        loader = DataLoader(DS(), batch_size=2, num_workers=2, timeout=120,
                            multiprocessing_context="fork")
        batches = [b.numpy() for b in loader]
        assert len(batches) == 2 and all((row == ref).all() for b in batches for row in b)
        print("ok")
    """)
    assert "ok" in out.stdout


def test_workqueue_layer_many_threads():
    """10.3: under the workqueue layer, 8 threads calling parallel kernels neither abort nor differ."""
    out = run_script("""
        import threading
        ref = work()
        assert numba.threading_layer() == "workqueue"
        bad, errors = [], []
        def loop():
            try:
                for _ in range(6):
                    if work() != ref:
                        bad.append(1)
            except BaseException as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=loop) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors and not bad, (errors, len(bad))
        print("ok")
    """, NUMBA_THREADING_LAYER="workqueue")
    assert "ok" in out.stdout


# ------------------------------------------------------------------------------- in process


class _Recorder:
    """A stand-in kernel: records which variant ran, with which thread count."""

    def __init__(self):
        self.calls = []

    def variant(self, key):
        return lambda nth, *args: self.calls.append((key[0], nth) + args)


def test_call_follows_size_and_thread_count(threads):
    k = _Recorder()
    _dispatch.call(k, (), _dispatch.SERIAL_MAX_ELEMS - 1, "small")
    big = _dispatch.SERIAL_MAX_ELEMS
    n = numba.get_num_threads()
    _dispatch.call(k, (), big, "big")
    threads(1)
    _dispatch.call(k, (), big, "one thread")
    assert k.calls[0] == (False, 1, "small")
    assert k.calls[1] == ((True, n, "big") if n > 1 else (False, 1, "big"))
    assert k.calls[2] == (False, 1, "one thread")


def test_workqueue_guard_runs_serial_when_the_pool_is_busy(monkeypatch):
    """The workqueue guard: a caller that finds the pool taken runs the serial variant (same bits)."""
    monkeypatch.setattr(_dispatch, "_free", False)
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    k = _Recorder()
    _dispatch._call_slow(k, (), (1,))
    with _dispatch._pool_lock:
        _dispatch._call_slow(k, (), (2,))
    assert k.calls == [(True, 2, 1), (False, 1, 2)]


def test_every_wrapper_dispatches_through_call():
    """No public module chooses a kernel variant itself (one dispatch point for forks and layers)."""
    pkg = Path(fastbn.__file__).parent
    offenders = []
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith("_kernels/") or rel in ("_dispatch.py", "_jit.py", "_run.py", "kernels.py", "bench.py"):
            continue  # kernels.py exports the raw entry points; bench.py times the raw bound kernels
        text = path.read_text()
        if ".parallel(" in text or ".serial(" in text or ".variant(" in text or "_kernels.entries" in text:
            offenders.append(rel)
    assert not offenders, offenders
