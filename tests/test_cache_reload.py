"""A function compiled against kernels that were *loaded* from the cache must itself load from the cache
and run. Numba (issues #8578, #9938) forgot, in such a function's cache entry, that it must start the
thread pool; the process that loaded it segfaulted on its first parallel region. Seen in
``fastbn.kernels.backward`` after an edit of ``kernels.py``; the same happens to a user's cached
training step, calling our kernels, after the user edits their own file.

Three processes share one empty cache: the first compiles everything; then the user's script and
``fastbn/kernels.py`` (in a copy of the package) change, so the second recompiles the wrappers and the
user's function against the parallel kernel variants it loads; the third loads all of that and runs it.
Each process has a timeout, and a crash shows as its return code.
"""
import subprocess
import sys

import numpy as np

from fastbn._isolated import copy_package, fresh_env

TIMEOUT_S = 600

USER = '''
import sys
import numba
import numpy as np
from fastbn import kernels


@numba.njit(cache=True)
def user_step(x, gamma, beta):
    """A user's training step: forward through fastbn's parallel kernel, then its backward."""
    A, C, B = x.shape
    y = np.empty_like(x)
    mean, invstd = np.empty(C), np.empty(C)
    kernels.train_forward(x, gamma, beta, 1e-5, y, mean, invstd, np.empty(0), np.empty(0), 0.1, False)
    dx, dgamma, dbeta = np.empty_like(x), np.empty(C), np.empty(C)
    kernels.backward(y, x, mean, invstd, gamma, dx, dgamma, dbeta, False)
    return y, dx, dgamma


rng = np.random.default_rng(3)
out = {}
for name, shape in (("cl", (64, 8, 1)), ("cf", (4, 32, 300)), ("short", (4, 32, 25))):
    x = rng.normal(1.0, 2.0, shape)
    C = shape[1]
    y, dx, dg = user_step(x, np.full(C, 1.5), np.zeros(C))
    yi = np.empty_like(x)
    kernels.infer_forward(x, np.zeros(C), np.ones(C), np.ones(C), np.zeros(C), 0.0, yi)
    out[name + "_y"], out[name + "_dx"], out[name + "_dg"], out[name + "_yi"] = y, dx, dg, yi
np.savez(sys.argv[1], **out)
'''


def _run(args, env, cwd, what):
    r = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"


def test_callers_of_cached_parallel_kernels_load_and_run(tmp_path):
    site, home, cache = tmp_path / "site", tmp_path / "home", tmp_path / "cache"
    copy_package(site)
    home.mkdir()
    env = fresh_env(site, home, cache)
    script = home / "user.py"
    script.write_text(USER)
    results = []
    for i in range(3):
        if i == 1:  # edits: the callers' entries go stale, the kernel variants' stay valid
            script.write_text(USER + "# edited\n")
            with open(site / "fastbn" / "kernels.py", "a") as f:
                f.write("# edited\n")
        out = home / f"out{i}.npz"
        _run([sys.executable, str(script), str(out)], env, home, f"user process {i + 1}")
        results.append(np.load(out))
    for key in results[0].files:
        for r in results[1:]:
            np.testing.assert_array_equal(results[0][key], r[key], err_msg=key)
    x = np.random.default_rng(3).normal(1.0, 2.0, (64, 8, 1))  # the first case, against NumPy
    mean, var = x.mean(axis=(0, 2), keepdims=True), x.var(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(results[2]["cl_y"], 1.5 * (x - mean) / np.sqrt(var + 1e-5), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(results[2]["cl_yi"], x, rtol=0, atol=0)
