"""Half precision, measured: fastbn's kernels on float16 and bfloat16 input against fastbn's float32 kernel
on the same shape, and against PyTorch's own kernel on the same half dtype (float32 parameters).

    python examples/half_precision_bench.py                      # every half case of the benchmark registry
    python examples/half_precision_bench.py --kernel train --layout NCHW --repeat 31

For each (kernel, layout, shape) of ``fastbn.cases`` with half cases, every contender runs once per round,
in an order rotating from round to round (``fastbn.bench.time_rounds``): fastbn with ``out=`` in float32,
float16 and bfloat16, and torch's kernel (``native_batch_norm(.out)`` / ``native_batch_norm_backward(.out)``,
the faster of the ``.out`` and allocating forms, as ``python -m fastbn bench`` takes it) in the same three
dtypes. Ratios are taken round by round; printed: median [25th, 75th percentile]. bfloat16 needs
ml_dtypes (``pip install "fastbn[bf16]"``); torch is optional.
"""
from __future__ import annotations

import argparse

import numba
import numpy as np

from fastbn.bench import have_torch, time_rounds
from fastbn.cases import HALF_DTYPES, Case, bench_cases, have_bfloat16


def _q(a) -> str:
    p25, p50, p75 = np.percentile(a, [25, 50, 75])
    return f"{p50:5.2f} [{p25:.2f}, {p75:.2f}]"


def measure(kernel: str, layout: str, shape: tuple, repeat: int, with_torch: bool) -> dict:
    dtypes = ("float32", "float16") + (("bfloat16",) if have_bfloat16() else ())
    fns = {}
    for dt in dtypes:
        case = Case(kernel, layout, shape, dt)
        inp = case.make_inputs()
        fns[f"fastbn {dt}"] = case.runner(inp, use_out=True)
        if with_torch:
            tk = case.torch_kernels(inp)
            fns[f"torch.out {dt}"], fns[f"torch.alloc {dt}"] = tk["out"], tk["alloc"]
    t = {k: np.asarray(v) for k, v in time_rounds(fns, repeat).items()}
    if with_torch:  # per dtype, torch's faster form
        for dt in dtypes:
            out, alloc = t.pop(f"torch.out {dt}"), t.pop(f"torch.alloc {dt}")
            t[f"torch {dt}"] = out if np.median(out) <= np.median(alloc) else alloc
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("train", "infer", "backward"), action="append")
    ap.add_argument("--layout", choices=("NCHW", "NHWC"), action="append")
    ap.add_argument("--repeat", type=int, default=21)
    args = ap.parse_args()
    with_torch = have_torch()
    groups = []
    for c in bench_cases(kernels=tuple(args.kernel or ("train", "infer", "backward")),
                         layouts=tuple(args.layout or ("NCHW", "NHWC"))):
        if c.dtype in HALF_DTYPES and (c.kernel, c.layout, c.shape) not in groups:
            groups.append((c.kernel, c.layout, c.shape))
    threads = numba.get_num_threads()
    if with_torch:
        import torch

        torch.set_num_threads(threads)
    print(f"{threads} threads (Numba and torch); ms: median [p25, p75] of {args.repeat} interleaved rounds")
    for kernel, layout, shape in groups:
        t = measure(kernel, layout, shape, args.repeat, with_torch)
        name = f"{kernel} {layout} {'x'.join(map(str, shape))}"
        f32 = t["fastbn float32"]
        head = f"\n{name}: fastbn float32 {_q(f32 * 1e3)} ms"
        if with_torch:
            head += f", torch float32 {_q(t['torch float32'] * 1e3)} ms"
        print(head)
        for dt in HALF_DTYPES:
            if f"fastbn {dt}" not in t:
                continue
            mine = t[f"fastbn {dt}"]
            line = f"  {dt:8s} fastbn {_q(mine * 1e3)} ms; float32 kernel / this {_q(f32 / mine)}x"
            if with_torch:
                line += f"; torch {dt} {_q(t[f'torch {dt}'] * 1e3)} ms, torch / fastbn {_q(t[f'torch {dt}'] / mine)}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
