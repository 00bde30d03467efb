"""fastbn's compiler pipeline (``fastbn/_pipeline.py``): a branch on a boolean-literal argument is removed
before type inference, so a kernel variant's dead flag paths are never typed or lowered.

The first tests compile small functions in this process (nothing cached). The last runs a fresh
interpreter on a copy of the package with an empty cache, so that the row writer it inspects is compiled
there, not loaded.
"""
import numba
import numpy as np
import pytest
from conftest import cold_env, run_json
from numba.core.errors import TypingError

from fastbn import _pipeline

TIMEOUT_S = 600


def _inner(x, flag):
    if flag:
        return x.no_such_attribute  # cannot be typed: compiles only if this branch is removed first
    return x + 1.0


def _outer_false(x):
    return _pipeline_inner(x, False)


def _outer_true(x):
    return _pipeline_inner(x, True)


_pipeline_inner = numba.njit(pipeline_class=_pipeline.Compiler)(_inner)


def test_a_dead_branch_on_a_literal_flag_is_never_typed():
    f = numba.njit(pipeline_class=_pipeline.Compiler)(_outer_false)
    assert f(np.float64(2.0)) == 3.0
    (sig,) = _pipeline_inner.signatures
    assert sig[1] == numba.types.literal(False)  # the callee keeps the literal type of its argument


def test_the_live_branch_is_still_typed():
    with pytest.raises(TypingError):
        numba.njit(pipeline_class=_pipeline.Compiler)(_outer_true)(np.float64(2.0))


def test_numbas_own_pipeline_types_the_dead_branch():
    # what the pass is for: without it the same call fails to compile
    inner = numba.njit(_inner)
    glb = {"_pipeline_inner": inner}
    outer = type(_outer_false)(_outer_false.__code__, glb, "outer")
    with pytest.raises(TypingError):
        numba.njit(outer)(np.float64(2.0))


def test_fastbn_dispatchers_use_the_pipeline():
    from fastbn._kernels import entries, rows

    assert rows.act_run._compiler.pipeline_class is _pipeline.Compiler
    assert entries.normalize.get(parallel=False)._compiler.pipeline_class is _pipeline.Compiler


SCRIPT = r'''
import json
import numpy as np
from fastbn._kernels import entries, rows

x = np.random.default_rng(0).normal(3.0, 2.0, (4, 3, 640))
out = {}
for stream in (False, True):
    y = np.empty_like(x)
    m, k, t = np.full(3, 3.0), np.full(3, 0.5), np.full(3, 1.0)
    entries.normalize.get(parallel=False, OWNED=True, STREAM=stream)(1, x, x, y, m, k, m, t, 0.0, False, 0, 3)
    out[str(stream)] = float(np.abs(y - ((x - 3.0) * 0.5 + 1.0)).max())
typed = {}
for sig, res in rows.act_run.overloads.items():
    typed[str(sig[-1])] = "global(stream_store" in str(res.type_annotation)
print(json.dumps({"err": out, "typed": typed}))
'''


def test_the_streaming_store_loop_is_typed_only_in_streaming_variants(tmp_path):
    res = run_json(SCRIPT, cold_env(tmp_path), tmp_path, timeout=TIMEOUT_S)
    assert res["err"]["False"] < 1e-12 and res["err"]["True"] < 1e-12
    assert res["typed"] == {"Literal[bool](False)": False, "Literal[bool](True)": True}
