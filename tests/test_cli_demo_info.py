"""The demo and info subcommands and the torch extra's import error, each in a subprocess with a timeout:
bad arguments end in the subcommand's usage and a one-line error with exit code 2 (never a traceback or
NumPy warnings), ``info`` compiles nothing, and ``fastbn.torch`` without torch names the extra."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def _run(args, code=None, timeout=120, env=ENV):
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fastbn", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["--shape", "a,b"], "argument --shape: expected comma-separated integers N,C[,H,W...], got 'a,b'"),
    (["--shape", "1,4"], "argument --shape: training needs more than 1 value per channel"),
    (["--shape", "8"], "argument --shape: expected at least N,C (two sizes), got '8'"),
    (["--shape", "4,0,3"], "argument --shape: sizes must be positive, got '4,0,3'"),
    (["--repeat", "0"], "argument --repeat: expected a positive integer, got '0'"),
    (["--repeat", "-3"], "argument --repeat: expected a positive integer, got '-3'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
], ids=["shape-letters", "shape-one-value", "shape-1d", "shape-zero", "repeat-0", "repeat-negative",
        "unknown-flag"])
def test_demo_bad_arguments(args, message):
    r = _run(["demo", *args])
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("usage: python -m fastbn demo ")
    assert lines[-1].startswith(f"python -m fastbn demo: error: {message}"), r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr and r.stdout == ""


@pytest.mark.parametrize("argv", [["info", "--bogus"], ["info", "extra"]])
def test_info_unknown_argument_gets_its_own_usage(argv):
    r = _run(argv)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "usage: python -m fastbn info [-h]", r.stderr
    assert lines[-1] == f"python -m fastbn info: error: unrecognized arguments: {argv[1]}"


def test_info_compiles_nothing(tmp_path):
    """With an empty kernel cache, ``info`` still reports the threading layer and compiles no function."""
    code = ("import numba.core.event as ev, sys\n"
            "from fastbn.__main__ import main\n"
            "with ev.install_recorder('numba:compile') as rec:\n"
            "    rc = main(['info'])\n"
            "print('compiled:', len(rec.buffer))\n"
            "sys.exit(rc)\n")
    r = _run(None, code=code, env=dict(ENV, NUMBA_CACHE_DIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())
    assert fields["compiled:"] == "0"
    assert fields["threading_layer"] in {"omp", "tbb", "workqueue"}
    assert int(fields["num_threads"]) >= 1


def test_torch_extra_missing_names_the_extra():
    code = ("import sys\n"
            "sys.modules['torch'] = None  # as if torch were not installed\n"
            "import fastbn.torch\n"
            "try:\n"
            "    fastbn.torch.BatchNorm2d\n"
            "except ModuleNotFoundError as e:\n"
            "    print(e)\n")
    r = _run(None, code=code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'fastbn.torch.BatchNorm2d needs PyTorch, an optional extra: pip install "fastbn[torch]"'
