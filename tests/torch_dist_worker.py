"""One rank of tests/test_torch_sync.py: fastbn.torch.SyncBatchNorm over gloo against single-process BN.

Run as ``python torch_dist_worker.py RANK WORLD PORT``. Every rank builds the same global batches (same
seeds), runs its slice through SyncBatchNorm and the whole batch through torch's own BatchNorm (float64
or float32, the reference), and checks y, dx, the summed parameter gradients and the running statistics;
then DDP training steps, then the failure protocol. Prints "ok <name>" per scenario; exits 1 on failure.
"""
from __future__ import annotations

import copy
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import fastbn.torch as fbt

RANK, WORLD, PORT = (int(a) for a in sys.argv[1:4])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# relative to the largest value: one rounding to the half dtype (half an ulp, 2**-8 of bfloat16's at the
# largest binade) and float32 arithmetic
HALF_TOL = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def close(got, ref, tol, what):
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-300)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def split(sizes):
    start = sum(sizes[:RANK])
    return slice(start, start + sizes[RANK])


def summed(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def module_case(name, sizes, tail, dtype, fmt=None, momentum=0.1, steps=2):
    """SyncBatchNorm on ``dtype`` against torch's BatchNorm on the whole batch. A half dtype runs with
    float32 parameters and buffers against torch's float64 BN on the same (rounded) values: y and dx within
    the half dtype's rounding, the rest (float64 statistics, float32 parameters) to 1e-5."""
    C = 5
    g = torch.Generator().manual_seed(len(name))
    half = dtype in HALF_TOL
    ref = BN[2 + len(tail)](C, momentum=momentum).to(torch.float64 if half else dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0, generator=g)
        ref.bias.normal_(generator=g)
    mine = fbt.SyncBatchNorm(C, momentum=momentum).to(torch.float32 if half else dtype)
    mine.load_state_dict(ref.state_dict())
    sl = split(sizes)
    tol = TOL[torch.float32 if half else dtype]
    out_tol = HALF_TOL[dtype] if half else tol
    rnd = torch.float32 if half else dtype  # (drawn in float32, rounded to the half dtype)
    for step in range(steps):
        x = (torch.randn((sum(sizes), C) + tail, generator=g, dtype=rnd) * (1 + step) + 3 * step - 1).to(dtype)
        w = torch.randn(x.shape, generator=g, dtype=rnd).to(dtype)
        xf = x.clone().to(ref.weight.dtype).requires_grad_()
        yf = ref(xf)
        (yf * w.to(xf.dtype)).sum().backward()
        xs = x[sl].clone()
        if fmt is not None:
            xs = xs.contiguous(memory_format=fmt)
        xs.requires_grad_()
        ys = mine(xs)
        (ys * w[sl]).sum().backward()
        assert ys.dtype == dtype and (not sizes[RANK] or xs.grad.dtype == dtype), name
        close(ys, yf[sl], out_tol, f"{name} step {step}: y")
        close(xs.grad, xf.grad[sl], out_tol, f"{name} step {step}: dx")
        if fmt is not None and sizes[RANK]:
            assert ys.is_contiguous(memory_format=fmt) and xs.grad.is_contiguous(memory_format=fmt), name
        close(summed(mine.weight.grad), ref.weight.grad, tol, f"{name} step {step}: sum of weight grads")
        close(summed(mine.bias.grad), ref.bias.grad, tol, f"{name} step {step}: sum of bias grads")
        for k in ("running_mean", "running_var"):
            close(getattr(mine, k), getattr(ref, k), tol, f"{name} step {step}: {k}")
        assert int(mine.num_batches_tracked) == step + 1
        for m in (ref, mine):
            m.zero_grad()
    mine.eval()
    ref.eval()
    x = torch.randn((3, C) + tail, generator=g, dtype=rnd).to(dtype)
    if RANK == 0:  # eval mode does not communicate: one rank alone must not hang
        close(mine(x), ref(x.to(ref.weight.dtype)), out_tol, f"{name}: eval")
    print("ok", name, flush=True)


def ddp_case(name, sizes, steps=2):
    """DDP over a small CNN converted with convert_sync_batchnorm: after each step's gradient all-reduce
    (an average), WORLD * grad equals the single-process gradient of the summed loss; parameters stay
    equal when the synchronized model's learning rate is multiplied by WORLD."""
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 2, 1, bias=False),
                        nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()
    sync = fbt.convert_sync_batchnorm(copy.deepcopy(ref))
    assert isinstance(sync[1], fbt.SyncBatchNorm) and isinstance(sync[4], fbt.SyncBatchNorm)
    mine = nn.parallel.DistributedDataParallel(sync)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05)
    opt = torch.optim.SGD(mine.parameters(), lr=0.05 * WORLD)
    sl = split(sizes)
    for step in range(steps):
        x = torch.randn(sum(sizes), 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
        w = torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64)
        xf = x.clone().requires_grad_()
        (ref(xf) * w).sum().backward()
        xs = x[sl].clone().requires_grad_()
        out = mine(xs)
        (out * w[sl]).sum().backward()
        close(xs.grad, xf.grad[sl], 1e-10, f"{name} step {step}: dx")
        for (k, a), b in zip(ref.named_parameters(), mine.module.parameters()):
            close(b.grad * WORLD, a.grad, 1e-10, f"{name} step {step}: grad {k}")
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    for k, v in ref.state_dict().items():
        close(mine.module.state_dict()[k], v, 1e-10, f"{name}: {k}")
    print("ok", name, flush=True)


def expect_error(name, fn, rank_types):
    """``fn`` must raise on this rank, with the type ``rank_types[RANK]``, and every rank must get here."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        want = rank_types[RANK]
        assert isinstance(e, want), f"{name}: rank {RANK} raised {type(e).__name__}: {e}, expected {want}"
        print(f"ok {name} ({type(e).__name__}: {str(e)[:120]})", flush=True)
    else:
        raise AssertionError(f"{name}: rank {RANK} did not raise")
    dist.barrier()


def error_cases():
    last = WORLD - 1
    bn = fbt.SyncBatchNorm(4)
    # a wrong channel count on the last rank: ValueError there, "invalid input on rank(s)" elsewhere
    x = torch.randn(3, 5 if RANK == last else 4, 2, 2)
    expect_error("bad channels on one rank", lambda: bn(x), [ValueError] * WORLD)
    # not a ValueError: an integer input on rank 0 raises TypeError there, and the others still return
    x = torch.ones(3, 4, 2, 2, dtype=torch.int32) if RANK == 0 else torch.randn(3, 4, 2, 2)
    expect_error("int32 on rank 0", lambda: bn(x), [TypeError] + [ValueError] * (WORLD - 1))
    # a 1-D input on the last rank
    x = torch.randn(4) if RANK == last else torch.randn(3, 4)
    expect_error("1-D input on one rank", lambda: bn(x), [ValueError] * WORLD)
    # rank 0 in the forward while the others are in the backward
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    y = bn(x)
    op = (lambda: bn(x)) if RANK == 0 else (lambda: y.sum().backward())
    expect_error("forward on rank 0, backward elsewhere", op, [ValueError] * WORLD)
    # fewer than 2 values per channel over all ranks
    x = torch.randn(1 if RANK == 0 else 0, 4)
    expect_error("one value in all", lambda: bn(x), [ValueError] * WORLD)
    assert int(bn.num_batches_tracked) == 1  # only the successful forward counted


def main():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{PORT}", rank=RANK, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        uneven = {1: [6], 2: [5, 3], 3: [4, 0, 6]}[WORLD]  # world 3: a rank with no samples
        module_case("float64 NCHW uneven", uneven, (3, 4), torch.float64)
        module_case("float32 channels_last", uneven, (3, 4), torch.float32, fmt=torch.channels_last)
        module_case("float64 (N, C) cumulative", [4] * WORLD, (), torch.float64, momentum=None)
        module_case("float32 (N, C, L)", uneven, (7,), torch.float32)
        module_case("float64 3d channels_last_3d", uneven, (2, 3, 2), torch.float64,
                    fmt=torch.channels_last_3d)
        module_case("bfloat16 channels_last, float32 parameters", uneven, (3, 4), torch.bfloat16,
                    fmt=torch.channels_last)
        ddp_case("DDP float64", uneven)
        if WORLD > 1:
            error_cases()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait in destroy_process_group for ranks that may have failed differently
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
