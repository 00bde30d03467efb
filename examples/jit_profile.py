"""Where the first (cold) compile of fastbn's kernels spends its time: CPU seconds per Numba compiler pass
and per LLVM step, each exclusive of the passes nested in it (a call to a helper compiles the helper
inside its caller's type inference).

Runs a fresh interpreter on a copy of the installed package with every cache empty (as the asv
``jit_cost`` benchmarks do) and times the first float32 training forward, backward and inference on a
(32, 64, 28, 28) batch:

    python examples/jit_profile.py [--top 12]

The LLVM rows: ``optimize functions`` (per-function passes on each compiled function's own module),
``optimize module`` (the module passes after the callees' code is linked in: every level of calls above a
loop optimizes it again), ``machine code`` (adding the linked module to the JIT engine, which emits
machine code for it). The ``pass:`` rows are Numba's front end (bytecode to typed IR, inlining, the
parallel-loop passes, lowering to LLVM IR).
"""
from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

_PROFILED = r'''
import collections, json, time
import numpy as np
from numba.core import codegen, compiler_machinery

excl = collections.Counter()
stack = []  # [name, accumulated exclusive seconds, start of the current stretch]


def timed(name, fn, *args):
    now = time.process_time()
    if stack:
        stack[-1][1] += now - stack[-1][2]
    stack.append([name, 0.0, now])
    try:
        return fn(*args)
    finally:
        now = time.process_time()
        _, acc, t0 = stack.pop()
        excl[name] += acc + now - t0
        if stack:
            stack[-1][2] = now


run_pass = compiler_machinery.PassManager._runPass
compiler_machinery.PassManager._runPass = (
    lambda self, index, pss, state: timed("pass: " + pss.name(), run_pass, self, index, pss, state))
for attr, label in (("_optimize_functions", "llvm: optimize functions"),
                    ("_optimize_final_module", "llvm: optimize module"),
                    ("_finalize_final_module", "llvm: machine code")):
    orig = getattr(codegen.CPUCodeLibrary, attr)
    setattr(codegen.CPUCodeLibrary, attr,
            (lambda orig, label: lambda self, *a: timed(label, orig, self, *a))(orig, label))

t0 = time.process_time()
import fastbn
x = np.random.default_rng(0).normal(3.0, 2.0, (32, 64, 28, 28)).astype(np.float32)
y, m, s = fastbn.batch_norm_train(x)
fastbn.batch_norm_backward(np.ones_like(x), x, m, s)
fastbn.batch_norm_infer(x, m, 1.0 / s**2 - 1e-5)
print(json.dumps({"total": time.process_time() - t0, "parts": dict(excl)}))
'''


def profile() -> dict:
    """``{"total": CPU s, "parts": {name: exclusive CPU s}}`` of a cold run in a fresh interpreter."""
    import json

    from fastbn._isolated import copy_package, fresh_env

    with tempfile.TemporaryDirectory() as d:
        site = copy_package(pathlib.Path(d) / "site")
        env = fresh_env(site, d, pathlib.Path(d) / "cache")
        proc = subprocess.run([sys.executable, "-c", _PROFILED], env=env, cwd=d, capture_output=True,
                              text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the profiled run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=12, help="rows to print (default 12)")
    args = ap.parse_args(argv)
    r = profile()
    parts = sorted(r["parts"].items(), key=lambda kv: -kv[1])
    llvm = sum(v for k, v in parts if k.startswith("llvm"))
    total = r["total"]
    print(f"cold float32 training forward + backward + inference: {total:.2f} s CPU")
    print(f"  LLVM (optimization, machine code): {llvm:.2f} s ({llvm / total:.0%}); "
          f"Numba's passes: {sum(r['parts'].values()) - llvm:.2f} s")
    for name, sec in parts[:args.top]:
        print(f"  {name:44s} {sec:6.2f} s  {sec / total:4.0%}")


if __name__ == "__main__":
    main()
