"""fastbn.torch.SyncBatchNorm: 1, 2 and 3 processes over gloo (tests/torch_dist_worker.py), each run with a
timeout so that a hang fails the test; plus the single-process behaviour and convert_sync_batchnorm."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import pytest

from conftest import assert_close

torch = pytest.importorskip("torch")
fbt = pytest.importorskip("fastbn.torch")
nn = torch.nn

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_dist_worker.py")
SCENARIOS = 7  # "ok" lines per rank without the error cases
ERRORS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sync_batchnorm_over_gloo(world):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a rank hung (killed after 240 s):\n" + "\n".join(p.communicate()[0] for p in procs))
    report = "\n".join(f"--- rank {r} (exit {p.returncode})\n{o}" for r, (p, o) in enumerate(zip(procs, outs)))
    assert all(p.returncode == 0 for p in procs), report
    want = SCENARIOS + (ERRORS if world > 1 else 0)
    assert all(o.count("ok ") == want for o in outs), report


def test_without_torch_distributed_it_is_plain_batch_norm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4).double()
    mine = fbt.SyncBatchNorm(4).double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(x.shape, dtype=torch.float64)
    for m in (ref, mine):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * w).sum().backward()
        m.out, m.dx = y.detach(), xi.grad
    assert_close(mine.out.numpy(), ref.out.numpy(), 1e-12)
    assert_close(mine.dx.numpy(), ref.dx.numpy(), 1e-12)
    assert_close(mine.running_var.numpy(), ref.running_var.numpy(), 1e-12)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        mine(torch.randn(4))


def test_convert_sync_batchnorm_shares_parameters_and_names_subclasses():
    from torch_standins import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2),
                          nn.BatchNorm1d(2), BatchNormAct2d(2)).eval()
    weight, rm = model[1].weight, model[1].running_mean
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fbt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model and type(model[1]) is fbt.SyncBatchNorm and type(model[4]) is fbt.SyncBatchNorm
    assert model[1].weight is weight and model[1].running_mean is rm and not model[1].training
    assert type(model[5]) is BatchNormAct2d and "5 (BatchNormAct2d)" in str(w[0].message)
    single = fbt.convert_sync_batchnorm(nn.BatchNorm3d(2), process_group=None)
    assert type(single) is fbt.SyncBatchNorm
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fbt.convert_sync_batchnorm(3)


def test_fold_model_folds_sync_batchnorm():
    model = fbt.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-2, 2)
    folded, report = fbt.fold_model(model, torch.randn(2, 3, 5, 5, dtype=torch.float64), return_report=True)
    assert len(report.folded) == 1, str(report)


def test_convert_turns_torch_sync_batchnorm_into_fastbn_one():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    bn = model[1]
    fbt.convert(model)
    assert model[1] is bn and type(bn) is fbt.SyncBatchNorm
    y = model(torch.randn(2, 3, 4, 4))  # no torch.distributed: plain BN on the CPU
    assert y.shape == (2, 4, 4, 4) and int(bn.num_batches_tracked) == 1
