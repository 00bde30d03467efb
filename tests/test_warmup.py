"""``python -m fastbn warmup`` fills a cache directory that a read-only process then loads without
compiling anything, with the same results (issue 12, item 1). Subprocesses with timeouts, on a copy of
the package without any cache, so that nothing is loaded from elsewhere."""
import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np

import fastbn
from fastbn._isolated import copy_package, fresh_env

TIMEOUT_S = 600

CHILD = """
import json, sys
import numpy as np
from numba.core import event
compiles = []
class L(event.Listener):
    def on_start(self, ev): compiles.append(str(ev.data["dispatcher"].py_func.__name__))
    def on_end(self, ev): pass
event.register("numba:compile", L())
import fastbn
x = np.random.default_rng(1).normal(2.0, 3.0, (4, 16, 2, 3)).astype(np.float32)
rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
y, m, s = fastbn.batch_norm_train(x, running_mean=rm, running_var=rv)
dx, dg, db = fastbn.batch_norm_backward(np.ones_like(x), x, m, s)
yi = fastbn.batch_norm_infer(x, rm, rv)
np.savez(sys.argv[1], y=y, dx=dx, yi=yi, dg=dg)
print(json.dumps({"compiles": compiles}))
"""


def _lock(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_warmed_cache_loads_read_only_without_compiling(tmp_path):
    site, home, cache = tmp_path / "site", tmp_path / "home", tmp_path / "cache"
    copy_package(site)
    home.mkdir()
    env = fresh_env(site, home, cache)
    warm = subprocess.run([sys.executable, "-m", "fastbn", "warmup", "--dtypes", "float32", "--kernels",
                           "train,normalize,backward", "--layouts", "cf-short", "--plain", "--cache-dir", str(cache)],
                          env=env, cwd=str(home), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert "done: 6 variants" in warm.stdout
    # a first run with the cache writable records the results (and must not compile either)
    first = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "a.npz")], env=env, cwd=str(home),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout.splitlines()[-1])["compiles"] == []
    _lock(cache)
    try:
        second = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "b.npz")], env=env, cwd=str(home),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        for p in [cache, *cache.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout.splitlines()[-1])["compiles"] == []
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    for k in a.files:
        assert np.array_equal(a[k], b[k]), k
    # and the results are right
    x = np.random.default_rng(1).normal(2.0, 3.0, (4, 16, 2, 3)).astype(np.float32)
    assert np.array_equal(a["y"], fastbn.batch_norm_train(x).y)


def test_warmup_without_warming_compiles(tmp_path):
    # the check can fail: with an empty cache the same child compiles
    site, home, cache = tmp_path / "site", tmp_path / "home", tmp_path / "cache"
    copy_package(site)
    home.mkdir()
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "c.npz")], env=fresh_env(site, home, cache),
                         cwd=str(home), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1])["compiles"] != []


def test_warmup_rejects_bad_arguments():
    for args in (["--dtypes", "float16x"], ["--kernels", "nope"], ["--layouts", ""]):
        r = subprocess.run([sys.executable, "-m", "fastbn", "warmup", *args], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "error" in r.stderr, (args, r.stderr)
