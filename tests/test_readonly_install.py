"""A read-only installation (package directory and HOME read-only, as in a locked-down container).

The package is copied into a temporary site directory (with or without the Numba cache built in
its ``__pycache__``), made read-only together with a fake HOME, and a fresh interpreter runs a kernel
with a timeout. It must give the right result, loading the shipped cache when there is one, writing a
cache only where it can (NUMBA_CACHE_DIR, a private temp dir) and running uncached otherwise.
As root, write permission bits do not bind; the child then drops CAP_DAC_OVERRIDE first.
"""
from __future__ import annotations

import ctypes
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fastbn._isolated import copy_package, fresh_env

TIMEOUT_S = 180

# batch_norm_infer on a small float64 input (the serial infer kernel): the cheapest cold compile
CHILD = """
import json, os, sys, tempfile
import numpy as np
tempfile.tempdir = os.environ["TMPDIR"]  # even when read-only: no fallback to the machine's /tmp
site, locked = sys.argv[1], sys.argv[2] == "locked"
probe = os.path.join(site, "fastbn", "probe")
try:
    open(probe, "w").close()
    os.remove(probe)
    writable = True
except OSError:
    writable = False
if locked and writable:
    print(json.dumps({"readonly": False}))
    sys.exit(0)
import fastbn
from fastbn._kernels.entries import normalize
from fastbn._kernels.plan import layout_of
assert fastbn.__file__.startswith(site), fastbn.__file__
x = np.random.default_rng(0).normal(3.0, 2.0, (4, 3, 5))
rm, rv = np.array([1.0, 2.0, 3.0]), np.array([0.5, 4.0, 9.0])
y = fastbn.batch_norm_infer(x, rm, rv, eps=1e-5)
ref = (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5)
st = normalize.get(False, **dict(zip(("CL", "OWNED", "SHORT"), layout_of(4, 3, 5)))).stats
print(json.dumps({"readonly": True, "err": float(np.abs(y - ref).max()),
                  "hits": sum(st.cache_hits.values()), "misses": sum(st.cache_misses.values())}))
"""


def _drop_dac_override() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH out of the bounding set
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        if writable:
            p.chmod(mode | stat.S_IWUSR)
        else:
            p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def install(tmp_path):
    """make(shipped_cache) -> a site dir holding a copy of fastbn; read_only(*dirs) locks dirs."""
    locked: list[Path] = []

    def make(shipped_cache: bool) -> Path:
        return copy_package(tmp_path / "site", with_cache=shipped_cache)

    def read_only(*dirs: Path) -> None:
        for d in dirs:
            d.mkdir(exist_ok=True)
            _set_writable(d, False)
            locked.append(d)

    yield make, read_only
    for d in locked:
        _set_writable(d, True)


def run_child(site: Path, home: Path, tmpdir: Path, cache_dir: Path | None = None, locked: bool = True) -> dict:
    env = fresh_env(site, home, cache_dir, tmpdir=tmpdir)
    pre = _drop_dac_override if os.geteuid() == 0 else None
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(site), "locked" if locked else "open"], env=env, cwd=str(home),
                             capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=pre)
    except subprocess.SubprocessError as e:
        pytest.fail(f"the child did not finish: {e}")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if not res["readonly"]:
        pytest.skip("cannot make a directory read-only for this user here")
    assert res["err"] < 1e-12
    return res


def test_shipped_cache_loads_read_only(install, tmp_path):
    """A package whose __pycache__ holds the compiled kernels runs read-only without compiling."""
    make, read_only = install
    site = make(shipped_cache=True)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    run_child(site, home, tmp, locked=False)  # warm the copy's cache (a hit when the source tree's is warm)
    read_only(site, home, tmp)
    res = run_child(site, home, tmp)
    assert res["hits"] >= 1 and res["misses"] == 0, res


def test_no_cache_anywhere_runs_uncached(install, tmp_path):
    make, read_only = install
    site = make(shipped_cache=False)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    read_only(site, home, tmp)
    for _ in range(2):  # nothing is cached anywhere: the second process compiles again
        res = run_child(site, home, tmp)
        assert res["misses"] == 1 and res["hits"] == 0, res
    assert not (site / "fastbn" / "_kernels" / "__pycache__").exists()


def test_writable_cache_dirs_are_used(install, tmp_path):
    """Read-only package and HOME: the cache goes to NUMBA_CACHE_DIR (then read-only too, as an image
    built with it would have it) or, without it, to a private directory in TMPDIR."""
    make, read_only = install
    site = make(shipped_cache=False)
    home, tmp, cache = tmp_path / "home", tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    read_only(site, home)
    first = run_child(site, home, tmp, cache_dir=cache)
    assert first["misses"] == 1
    read_only(cache)
    again = run_child(site, home, tmp, cache_dir=cache)
    assert again["hits"] == 1 and again["misses"] == 0, again
    # no NUMBA_CACHE_DIR: a private per-user directory under TMPDIR
    first = run_child(site, home, tmp)
    assert first["misses"] == 1
    private = tmp / f"fastbn-numba-{os.getuid()}"
    assert private.is_dir() and stat.S_IMODE(private.stat().st_mode) == 0o700
    again = run_child(site, home, tmp)
    assert again["hits"] == 1 and again["misses"] == 0, again


def test_foreign_temp_cache_dir_is_ignored(install, tmp_path):
    """A cache dir in TMPDIR that others can write is never read (entries are pickles)."""
    make, read_only = install
    site = make(shipped_cache=False)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    private = tmp / f"fastbn-numba-{os.getuid()}"
    private.mkdir(parents=True)
    private.chmod(0o777)
    read_only(site, home)
    res = run_child(site, home, tmp)
    assert res["misses"] == 1
    assert list(private.iterdir()) == []
