"""The kernels' builtins as intrinsics (``fastbn/_kernels/prims.py``): each gives what the builtin it
replaces gives, and the kernels compile none of Numba's overloads of those builtins.

The last test runs a fresh interpreter on a copy of the package with an empty cache, so that the kernels
it watches are compiled there, not loaded.
"""
import itertools
import math

import numba
import numpy as np
import pytest
from conftest import cold_env, run_json

from fastbn._kernels.prims import compute_empty, f64_empty, flat_from, max2, min2, zero_of

TIMEOUT_S = 600
VALUES = [-2.5, -0.0, 0.0, 1.0, 3.0, math.inf, -math.inf, math.nan]


@numba.njit
def _both_float(a, b):
    return min2(a, b), min(a, b), max2(a, b), max(a, b)


@numba.njit
def _both_mixed(i, b):
    return min2(i, b), min(i, b), max2(b, i), max(b, i)


@numba.njit
def _literals(n):
    # a literal on one side, as in min(C, SLAB_ELEMS): same type and value as the builtin
    return min2(n, 1024), min(n, 1024), max2(1, n), max(1, n)


def _same(a, b):
    return type(a) is type(b) and (a == b and math.copysign(1, a) == math.copysign(1, b)
                                   or (a != a and b != b))


@pytest.mark.parametrize("a,b", list(itertools.product(VALUES, VALUES)))
def test_min2_max2_are_the_builtins_on_floats(a, b):
    m2, m, x2, x = _both_float(a, b)
    assert _same(m2, m) and _same(x2, x), (a, b, m2, m, x2, x)


@pytest.mark.parametrize("i,b", [(3, 2.5), (-1, 0.0), (7, math.nan), (0, -0.0)])
def test_min2_max2_are_the_builtins_on_mixed_types(i, b):
    m2, m, x2, x = _both_mixed(i, b)
    assert _same(m2, m) and _same(x2, x)


@pytest.mark.parametrize("n", [0, 5, 1024, 5000, -3])
def test_min2_max2_with_a_literal(n):
    m2, m, x2, x = _literals(n)
    assert (m2, x2) == (m, x) and type(m2) is type(m)
    assert _literals.nopython_signatures[0].return_type == numba.typeof((1, 1, 1, 1))


@numba.njit
def _allocs(n, x):
    a = f64_empty((2, n))
    b = f64_empty(n)
    c = compute_empty((3, n), x)
    a[:] = 1.5
    c[:] = 2.5
    return a, b, c, zero_of(x)


@pytest.mark.parametrize("dtype,compute", [(np.float32, np.float32), (np.float64, np.float64),
                                           (np.uint16, np.float32), (np.int16, np.float32)])
def test_allocation_shapes_and_compute_dtypes(dtype, compute):
    a, b, c, z = _allocs(7, np.zeros(3, dtype))
    assert a.shape == (2, 7) and a.dtype == np.float64 and a.flags.c_contiguous and (a == 1.5).all()
    assert b.shape == (7,) and b.dtype == np.float64
    assert c.shape == (3, 7) and c.dtype == compute and (c == 2.5).all()
    assert z == 0 and math.copysign(1, z) == 1.0
    sig = [s for s in _allocs.nopython_signatures if s.args[1].dtype == numba.from_dtype(dtype)][0]
    assert sig.return_type[3] == numba.from_dtype(compute)  # the zero is typed in the compute dtype


def test_allocation_refuses_a_negative_size_like_np_empty():
    with pytest.raises(ValueError, match="negative dimensions"):
        _allocs(-1, np.zeros(3, np.float32))


def test_allocation_refuses_a_size_that_overflows_like_np_empty():
    with pytest.raises(ValueError, match="array is too big"):
        _allocs(2**61, np.zeros(3, np.float32))


def test_no_typing_for_what_is_not_an_array():
    with pytest.raises(numba.core.errors.TypingError):
        numba.njit(lambda: zero_of(1.0))()


@numba.njit
def _flat_write(arr, start):
    v = flat_from(arr, start)
    for i in range(v.shape[0]):
        v[i] = i
    return v.shape[0]


@numba.njit
def _flat_view(arr, start):
    return flat_from(arr, start)


@pytest.mark.parametrize("start", [0, 1, 7, 23, 24, 30, -2])
def test_flat_from_is_reshape_then_slice(start):
    x = np.arange(24.0).reshape(2, 3, 4)
    v = _flat_view(x, start)
    ref = x.reshape(x.size)[max(0, min(start, x.size)):]
    assert v.shape == ref.shape and (v == ref).all()
    y = np.zeros((2, 3, 4), np.float32)
    n = _flat_write(y, start)  # a view: writes land in the array
    assert n == ref.size and (y.reshape(-1)[24 - n:] == np.arange(n)).all() and (y.reshape(-1)[:24 - n] == 0).all()


def test_flat_from_keeps_read_only_and_the_base_alive():
    x = np.arange(12.0).reshape(3, 4, 1)
    x.flags.writeable = False
    v = _flat_view(x, 4)
    assert not v.flags.writeable and (v == np.arange(4.0, 12.0)).all()
    v = _flat_view(np.arange(10.0).reshape(2, 5, 1), 3)  # its array is gone: the view holds it
    assert (v == np.arange(3.0, 10.0)).all()


def test_flat_from_checks_arrays_not_typed_contiguous():
    f = numba.njit("float64[:](float64[:, :, :], int64)")(lambda a, s: flat_from(a, s))  # layout 'A'
    x = np.arange(48.0).reshape(2, 6, 4)
    assert (f(x, 5) == x.reshape(-1)[5:]).all()  # C-contiguous at run time: accepted
    assert (f(x[:1], 2) == x[:1].reshape(-1)[2:]).all()
    assert (f(x[:, 2:3, :][:1], 0) == x[0, 2]).all()  # extents of 1 need no particular stride
    for bad in (x[:, :3, :], x[:, :1, :], np.asfortranarray(x), x[:, :, ::2]):
        with pytest.raises(ValueError, match="C-contiguous"):
            f(bad, 0)


SCRIPT = r'''
import json
import numpy as np
from numba.core import event

names = []

class Listener(event.Listener):
    def on_start(self, ev):
        names.append(ev.data["dispatcher"].py_func.__qualname__)

    def on_end(self, ev):
        pass

event.register("numba:compile", Listener())
import fastbn

for shape, axis in (((8, 16, 28, 28), 1), ((8, 14, 14, 32), 3), ((8, 32, 7, 7), 1)):
    x = np.random.default_rng(0).normal(3.0, 2.0, shape).astype(np.float32)
    y, m, s = fastbn.batch_norm_train(x, axis=axis)
    fastbn.batch_norm_backward(np.ones_like(x), x, m, s, axis=axis)
    fastbn.batch_norm_infer(x, m, 1.0 / s**2 - 1e-5, axis=axis)
print(json.dumps(names))
'''


def test_kernels_compile_no_overload_of_the_builtins(tmp_path):
    names = run_json(SCRIPT, cold_env(tmp_path), tmp_path, timeout=TIMEOUT_S)
    assert any(n.startswith("train__par") for n in names) and any(n.startswith("backward__par") for n in names)
    builtins = [n for n in names if n.startswith(("ol_min", "ol_max", "ol_np_empty", "ol_np_zeros",
                                                  "_compute_empty"))]
    assert builtins == [], builtins
