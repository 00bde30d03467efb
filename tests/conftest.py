import json
import subprocess
import sys

import numba
import numpy as np
import pytest

from fastbn.cases import test_cases

RTOL = {"float32": 1e-5, "float64": 1e-12}


def assert_close(actual, reference, rtol, what=""):
    """max |actual - reference| <= rtol * max |reference| (scale-relative, robust near zeros)."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
    scale = max(np.abs(reference).max(), 1e-300)
    err = np.abs(actual - reference).max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def at_line_offset(n, dtype, offset_bytes):
    """An uninitialized 1-D array of n values of ``dtype`` whose data starts ``offset_bytes`` past a
    64-byte line boundary (streaming stores write whole lines: tests place data at every offset class)."""
    dtype = np.dtype(dtype)
    buf = np.empty(n + 64 // dtype.itemsize + 1, dtype)
    o = ((offset_bytes - buf.ctypes.data) % 64) // dtype.itemsize
    return buf[o:o + n]


def cold_env(tmp_path):
    """The environment of a fresh interpreter running a copy of fastbn with an empty compile cache, all
    under ``tmp_path`` (``fastbn._isolated``): what it compiles, it compiles there, not loads."""
    from fastbn._isolated import copy_package, fresh_env

    return fresh_env(copy_package(tmp_path / "site"), tmp_path, tmp_path / "cache")


def run_json(script, env, cwd, *args, timeout=600):
    """Run ``python -c script *args`` in ``env`` (a subprocess with a timeout, so a hang fails the test)
    and return the JSON of its last stdout line; fails the test if it exits non-zero."""
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def threads():
    """Set Numba's thread count inside a test and restore it afterwards."""
    saved = numba.get_num_threads()
    try:
        yield numba.set_num_threads
    finally:
        numba.set_num_threads(saved)


def cases_for(kernel):
    return [pytest.param(c, id=c.id) for c in test_cases() if c.kernel == kernel]


# pytest-benchmark: the normal test run calls each benchmark once, untimed (a smoke test of its output).
# Timing is on only when asked for, with any option that needs timings. This replaces
# ``--benchmark-disable`` in pyproject's addopts, which made ``--benchmark-only`` (and autosave/compare)
# fail with "Can't have both --benchmark-only and --benchmark-disable options".
_TIMING_OPTIONS = ("benchmark_only", "benchmark_enable", "benchmark_autosave", "benchmark_save",
                   "benchmark_compare", "benchmark_compare_fail", "benchmark_json", "benchmark_histogram")


def pytest_configure(config):
    if not hasattr(config.option, "benchmark_disable"):  # pytest-benchmark not installed
        return
    if not any(getattr(config.option, name, None) for name in _TIMING_OPTIONS):
        config.option.benchmark_disable = True
