"""pytest-benchmark over the shared matrix (fastbn.cases.bench_cases).

A normal test run calls each benchmark once, untimed, as a smoke test that checks its output (the hook in
conftest.py disables timing unless an option that needs timings is given). Time them with
``python -m pytest tests/test_benchmarks.py --benchmark-only`` (add ``--benchmark-autosave`` /
``--benchmark-compare`` to track runs, ``-k 4x8x4x4`` for a quick subset).
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fastbn.cases import bench_cases

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("use_out", [True, False], ids=["out", "alloc"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in bench_cases()])
def test_bench(benchmark, case, use_out):
    inp = case.make_inputs()
    run = case.runner(inp, use_out=use_out)
    run()  # JIT warm-up outside the timing
    result = benchmark(run)
    y = result if case.kernel == "infer" else result[0]
    assert y.shape == inp["x"].shape and y.dtype == inp["x"].dtype
    if use_out:
        assert y is inp["out"]
    assert np.isfinite(y).all()


def test_benchmark_only_times(tmp_path):
    """``--benchmark-only`` as the docs give it runs (no clash with the normal run's disabling) and times."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "tests/test_benchmarks.py", "--benchmark-only", "-q", "-p",
           "no:cacheprovider", "-k", "test_bench and infer-NCHW-4x8x4x4-float32-out",
           "--benchmark-max-time=0.05", f"--benchmark-json={out}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    benches = json.loads(out.read_text())["benchmarks"]
    assert [b["name"] for b in benches] == ["test_bench[infer-NCHW-4x8x4x4-float32-out]"]
    assert benches[0]["stats"]["rounds"] > 1 and benches[0]["stats"]["median"] > 0
