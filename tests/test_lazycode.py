"""Machine code on demand (``fastbn/_lazycode.py``): a fastbn helper and a parallel loop's body get no
machine code of their own, a helper's cache entry holds bitcode, a later process links that bitcode into
a new kernel variant, and a user's own ``@njit`` code compiled in the same process takes Numba's normal
path.

Fresh interpreters on a copy of the package with an empty cache (``fastbn._isolated``), each with a
timeout. Results are checked against the float64 NumPy reference of ``tests/naive.py``.
"""
import numpy as np
from conftest import cold_env, run_json

TIMEOUT_S = 600

SCRIPT = r'''
import json, sys
import numba
import numpy as np
import fastbn
from fastbn import _jit
from fastbn._lazycode import _pending
from fastbn._kernels import entries

x = np.random.default_rng(0).normal(3.0, 2.0, (8, 16, 32, 32)).astype(np.float32)  # parallel variant
if sys.argv[1] == "plain":
    y, mean, invstd = fastbn.batch_norm_train(x)
else:
    y, mean, invstd = fastbn.batch_norm_relu_train(x)


@numba.njit
def user_sum(a):
    return a.sum()


user_sum(np.ones(3))
helpers = {name: [_pending(res.library) for res in d.overloads.values()]
           for name, d in _jit._HELPERS.items() if d.overloads}
hits = {name: sum(d.stats.cache_hits.values()) for name, d in _jit._HELPERS.items() if d.overloads}
kernels = [_pending(res.library) for disp in entries.train._variants.values() for res in disp.overloads.values()]
user = [_pending(res.library) for res in user_sum.overloads.values()]


def linked(lib, seen):
    for sub in lib._linking_libraries:
        if id(sub) not in seen:
            seen[id(sub)] = sub
            linked(sub, seen)
    return seen.values()


# the parallel loop's body: linked into the kernel through the gufunc wrapper, never called from Python
bodies = [_pending(lib) for disp in entries.train._variants.values() for res in disp.overloads.values()
          for lib in linked(res.library, {}) if lib.name.startswith("__numba_parfor_gufunc_")]
np.save(sys.argv[2], y)
print(json.dumps({"helpers": helpers, "hits": hits, "kernels": kernels, "user": user, "bodies": bodies}))
'''


def _run(mode, out, env, cwd):
    return run_json(SCRIPT, env, cwd, mode, out, timeout=TIMEOUT_S)


def test_helpers_get_no_machine_code_and_their_bitcode_entries_link(tmp_path):
    from naive import train_forward

    env = cold_env(tmp_path)
    x = np.random.default_rng(0).normal(3.0, 2.0, (8, 16, 32, 32)).astype(np.float32)
    ref = train_forward(x.astype(np.float64))[0]

    first = _run("plain", tmp_path / "plain.npy", env, tmp_path)
    assert first["helpers"], "no fastbn helper was compiled"
    assert all(all(p) for p in first["helpers"].values()), first["helpers"]  # no machine code of their own
    assert first["kernels"] and not any(first["kernels"])  # the kernel Python calls has its machine code
    assert first["bodies"] and all(first["bodies"]), first["bodies"]  # its parallel loop's body has none
    assert first["user"] == [False]  # a user's function: Numba's normal path
    np.testing.assert_allclose(np.load(tmp_path / "plain.npy"), ref, rtol=1e-5, atol=1e-5)

    # a new kernel variant (ReLU) in a new process: the statistics helpers come from the first process's
    # bitcode entries, are linked into it and give the right result
    second = _run("relu", tmp_path / "relu.npy", env, tmp_path)
    assert sum(second["hits"].values()) > 0, second["hits"]
    np.testing.assert_allclose(np.load(tmp_path / "relu.npy"), np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
