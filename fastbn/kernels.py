"""The jitted kernels, for calling from your own ``@numba.njit`` code (or directly from Python).

Every kernel works on a C-contiguous 3-D view ``(A, C, B)`` of the data: ``A`` outer positions,
``C`` channels, ``B`` inner positions, so a channels-first (N, C, H, W) array is ``x.reshape(N, C, H*W)``,
a channels-last (N, H, W, C) array is ``x.reshape(N*H*W, C, 1)`` and a dense (N, C) array is
``x.reshape(N, C, 1)``. ``B == 1`` selects the channels-last loops. Per-channel arrays are float (C,) arrays
(any float dtype, read-only allowed); ``mean``, ``invstd``, ``dgamma``, ``dbeta`` outputs are float64;
running statistics may be float32 or float64. The kernels check shapes (raising ValueError) but not dtypes
or contiguity: that is the public wrappers' job (``fastbn.batch_norm_train`` & co.).

- ``train_forward(x, gamma, beta, eps, y, mean, invstd, running_mean, running_var, momentum, update_running)``
  writes y, mean, invstd; updates the running statistics in place when ``update_running`` is True
  (pass any float64 arrays, e.g. ``np.empty(0)``, otherwise).
- ``infer_forward(x, running_mean, running_var, gamma, beta, eps, y)``; ``y`` may be ``x``.
- ``backward(dy, x, mean, invstd, gamma, dx, dgamma, dbeta, frozen)``; ``frozen=True`` for eval mode.

Each runs its loops on Numba's thread pool; ``<name>_serial`` is the same kernel without a parallel region
(same results, bit for bit), for small inputs or for calling from inside your own ``prange`` loop. They
choose the compiled variant for the input's layout at run time, so their first compile builds every
layout's variant (channels-last; channels-first with long or short rows, many or few channels): about
15-25 s per kernel, once (Numba's on-disk cache keeps it, for your function too with ``cache=True``).
They do not use streaming stores (``fastbn.batch_norm_train`` & co. do, for outputs over 16 MiB).

The fused (ReLU, residual add, renorm) and piecewise (synchronized BN) kernels behind the rest of fastbn
are compiled per flag combination: ``variant(name, parallel=True, **flags)`` returns one as a Numba
dispatcher, callable from Python or from your ``njit`` code. Their contracts are in the docstrings of
``fastbn._kernels.entries`` (``train``, ``normalize``, ``backward``, ``stats``, ``grad_sums``,
``input_grad``); the flags ``CL``, ``OWNED``, ``SHORT`` must match the input's layout
(``fastbn._kernels.plan.layout_of(A, C, B)``).

Example
-------
>>> import numba, numpy as np
>>> from fastbn import kernels
>>> @numba.njit
... def normalize_nchw(x, eps):
...     N, C, H, W = x.shape
...     x3 = x.reshape(N, C, H * W)
...     y3 = np.empty_like(x3)
...     mean, invstd = np.empty(C), np.empty(C)
...     kernels.train_forward_serial(x3, np.ones(C), np.zeros(C), eps, y3, mean, invstd,
...                                  np.empty(0), np.empty(0), 0.1, False)
...     return y3.reshape(N, C, H, W), mean, invstd
>>> y, mean, invstd = normalize_nchw(np.random.default_rng(0).random((4, 3, 5, 5)), 1e-5)
>>> bool(abs(y.mean()) < 1e-12)
True
"""
from __future__ import annotations

import types
from typing import Any

import numpy as np

from fastbn._jit import _jit, helper
from fastbn._kernels import entries
from fastbn._kernels.intrin import num_threads, writable
from fastbn._kernels.plan import CF_CHUNK_ELEMS, SHORT_ROW, SPLIT_BELOW_CHANNELS

# the layouts (CL, OWNED, SHORT) a run-time choice covers, in the order of _layout_index
_LAYOUTS = ((True, False, False), (False, True, False), (False, True, True), (False, False, False),
            (False, False, True))
_NO = np.zeros(1)
_NO_CLIP = np.array([0.0, np.inf, np.inf])
# Set per wrapper by _public (each wrapper is compiled from a copy of its function with these filled in).
PARALLEL = True
_V0 = _V1 = _V2 = _V3 = _V4 = None


@helper
def _layout_index(A, C, B):
    if B == 1:
        return 0
    short = B < SHORT_ROW
    if C >= SPLIT_BELOW_CHANNELS or A <= max(1, CF_CHUNK_ELEMS // B):
        return 2 if short else 1
    return 4 if short else 3


@helper
def _as_f64(v, C):
    out = np.empty(C)
    for c in range(C):
        out[c] = v[c]
    return out


def _train_forward(x, gamma, beta, eps, y, mean, invstd, running_mean, running_var, momentum, update_running):
    """Training-mode forward: batch statistics, normalized output, optional running-statistics update.

    ``train_forward(x, gamma, beta, eps, y, mean, invstd, running_mean, running_var, momentum,
    update_running)`` writes ``y = (x - mean) * invstd * gamma + beta``, the batch ``mean`` and
    ``invstd = 1 / sqrt(var + eps)`` (biased variance) per channel. When ``update_running`` is true it
    then updates ``running_mean`` and ``running_var`` in place, PyTorch's way:
    ``r = (1 - momentum) * r + momentum * batch`` with the unbiased batch variance; otherwise they are
    not read (pass ``np.empty(0)``).

    Parameters
    ----------
    x : (A, C, B) float32 or float64, C-contiguous (read-only allowed)
    gamma, beta : (C,) any float dtype
    eps : float
    y : (A, C, B), x's dtype, C-contiguous; may be ``x``
    mean, invstd : (C,) float64, written
    running_mean, running_var : (C,) float32 or float64, updated in place when ``update_running``
    momentum : float
    update_running : bool

    Notes
    -----
    Statistics accumulate in float64 with a per-chunk shift (no ``E[x^2] - E[x]^2`` cancellation), in
    an order fixed by the shape: the same bits for any thread count and for ``train_forward_serial``.
    Raises ValueError when a per-channel array's length is not C.

    Example
    -------
    >>> import numpy as np
    >>> from fastbn import kernels
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 4, 25)).astype(np.float32)  # NCHW, H*W=25
    >>> y = np.empty_like(x)
    >>> mean, invstd = np.empty(4), np.empty(4)
    >>> rm, rv = np.zeros(4), np.ones(4)
    >>> kernels.train_forward(x, np.ones(4), np.zeros(4), 1e-5, y, mean, invstd, rm, rv, 0.1, True)
    >>> bool(np.allclose(mean, x.mean(axis=(0, 2), dtype=np.float64)))
    True
    >>> bool(np.allclose(rm, 0.1 * mean))
    True
    """
    A, C, B = x.shape
    if gamma.shape[0] != C or beta.shape[0] != C or mean.shape[0] != C or invstd.shape[0] != C:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    if update_running and (running_mean.shape[0] != C or running_var.shape[0] != C):
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    xw = writable(x)
    g = _as_f64(gamma, C)
    b = _as_f64(beta, C)
    st = np.empty((5, C))
    nth = num_threads() if PARALLEL else 1
    i = _layout_index(A, C, B)
    if i == 0:
        _V0(nth, xw, xw, y, g, b, eps, _NO, _NO, _NO_CLIP, st, 0, C)
    elif i == 1:
        _V1(nth, xw, xw, y, g, b, eps, _NO, _NO, _NO_CLIP, st, 0, C)
    elif i == 2:
        _V2(nth, xw, xw, y, g, b, eps, _NO, _NO, _NO_CLIP, st, 0, C)
    elif i == 3:
        _V3(nth, xw, xw, y, g, b, eps, _NO, _NO, _NO_CLIP, st, 0, C)
    else:
        _V4(nth, xw, xw, y, g, b, eps, _NO, _NO, _NO_CLIP, st, 0, C)
    n = float(A * B)
    for c in range(C):
        mean[c] = st[0, c]
        invstd[c] = st[2, c]
        if update_running:
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * st[0, c]
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * (st[1, c] * (n / (n - 1.0)))


def _infer_forward(x, running_mean, running_var, gamma, beta, eps, y):
    """Inference-mode forward with given statistics.

    ``infer_forward(x, running_mean, running_var, gamma, beta, eps, y)`` writes
    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``.

    Parameters
    ----------
    x : (A, C, B) float32 or float64, C-contiguous (read-only allowed)
    running_mean, running_var, gamma, beta : (C,) any float dtype
    eps : float
    y : (A, C, B), x's dtype, C-contiguous; may be ``x`` (in place)

    Notes
    -----
    The per-channel scale and shift are computed in float64 and applied in x's dtype. Raises ValueError
    when a per-channel array's length is not C.

    Example
    -------
    >>> import numpy as np
    >>> from fastbn import kernels
    >>> x = np.random.default_rng(0).normal(size=(32, 16, 1))          # dense (N, C) as (N, C, 1)
    >>> rm, rv = np.full(16, 0.5), np.full(16, 4.0)
    >>> y = np.empty_like(x)
    >>> kernels.infer_forward(x, rm, rv, np.ones(16), np.zeros(16), 0.0, y)
    >>> bool(np.allclose(y, (x - 0.5) / 2.0))
    True
    """
    A, C, B = x.shape
    if (running_mean.shape[0] != C or running_var.shape[0] != C or gamma.shape[0] != C
            or beta.shape[0] != C):
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    xw = writable(x)
    m = _as_f64(running_mean, C)
    v = _as_f64(running_var, C)
    g = _as_f64(gamma, C)
    b = _as_f64(beta, C)
    nth = num_threads() if PARALLEL else 1
    i = _layout_index(A, C, B)
    if i == 0:
        _V0(nth, xw, xw, y, m, g, v, b, eps, True, 0, C)
    elif i == 1:
        _V1(nth, xw, xw, y, m, g, v, b, eps, True, 0, C)
    elif i == 2:
        _V2(nth, xw, xw, y, m, g, v, b, eps, True, 0, C)
    elif i == 3:
        _V3(nth, xw, xw, y, m, g, v, b, eps, True, 0, C)
    else:
        _V4(nth, xw, xw, y, m, g, v, b, eps, True, 0, C)


def _backward(dy, x, mean, invstd, gamma, dx, dgamma, dbeta, frozen):
    """Backward: input gradient and the gradients of gamma and beta.

    ``backward(dy, x, mean, invstd, gamma, dx, dgamma, dbeta, frozen)`` writes
    ``dgamma = sum(dy * (x - mean)) * invstd``, ``dbeta = sum(dy)`` and ``dx``: with ``frozen=False``
    (training mode, ``mean``/``invstd`` the batch statistics of ``train_forward``)
    ``dx = gamma * invstd * (dy - dbeta / n - (x - mean) * invstd * dgamma / n)``, n = A * B; with
    ``frozen=True`` (eval mode, the statistics are constants) ``dx = dy * gamma * invstd``.

    Parameters
    ----------
    dy, x : (A, C, B) float32 or float64 (one dtype), C-contiguous (read-only allowed)
    mean, invstd, gamma : (C,) any float dtype
    dx : (A, C, B), x's dtype, C-contiguous; may be ``dy``
    dgamma, dbeta : (C,) float64, written
    frozen : bool

    Notes
    -----
    The sums accumulate in float64 in a shape-fixed order (same bits for any thread count). Raises
    ValueError when a per-channel array's length is not C.

    Example
    -------
    >>> import numpy as np
    >>> from fastbn import kernels
    >>> rng = np.random.default_rng(0)
    >>> x, dy = rng.normal(size=(2, 16, 8, 1)), rng.normal(size=(2, 16, 8, 1))
    >>> x, dy = x.reshape(2 * 16 * 8 // 8, 8, 1), dy.reshape(32, 8, 1)     # NHWC as (N*H*W, C, 1)
    >>> mean, invstd = x.mean(axis=(0, 2)), 1 / np.sqrt(x.var(axis=(0, 2)) + 1e-5)
    >>> dx, dgamma, dbeta = np.empty_like(x), np.empty(8), np.empty(8)
    >>> kernels.backward(dy, x, mean, invstd, np.ones(8), dx, dgamma, dbeta, False)
    >>> bool(np.allclose(dbeta, dy.sum(axis=(0, 2))))
    True
    >>> bool(np.allclose(dx.sum(axis=(0, 2)), 0.0))      # the batch-statistics gradient sums to zero
    True
    """
    A, C, B = x.shape
    if mean.shape[0] != C or invstd.shape[0] != C or gamma.shape[0] != C or dgamma.shape[0] != C \
            or dbeta.shape[0] != C:
        raise ValueError("fastbn kernel: per-channel arrays must have length C")
    xw = writable(x)
    dyw = writable(dy)
    m = _as_f64(mean, C)
    s = _as_f64(invstd, C)
    g = _as_f64(gamma, C)
    out = np.empty((2, C))
    nth = num_threads() if PARALLEL else 1
    i = _layout_index(A, C, B)
    if i == 0:
        _V0(nth, dyw, xw, xw, dx, dx, m, s, g, frozen, out, 0, C)
    elif i == 1:
        _V1(nth, dyw, xw, xw, dx, dx, m, s, g, frozen, out, 0, C)
    elif i == 2:
        _V2(nth, dyw, xw, xw, dx, dx, m, s, g, frozen, out, 0, C)
    elif i == 3:
        _V3(nth, dyw, xw, xw, dx, dx, m, s, g, frozen, out, 0, C)
    else:
        _V4(nth, dyw, xw, xw, dx, dx, m, s, g, frozen, out, 0, C)
    for c in range(C):
        dgamma[c] = out[0, c]
        dbeta[c] = out[1, c]


def _public(fn: Any, kern: Any, parallel: bool) -> Any:
    """An njit wrapper of ``fn`` whose _V0.._V4 are ``kern``'s plain variants for the five layouts."""
    glb = dict(fn.__globals__)
    glb["PARALLEL"] = parallel
    for i, (cl, owned, short) in enumerate(_LAYOUTS):
        glb[f"_V{i}"] = kern.get(parallel, CL=cl, OWNED=owned, SHORT=short)
    name = fn.__name__.lstrip("_") + ("" if parallel else "_serial")
    new = types.FunctionType(fn.__code__, glb, name, fn.__defaults__, fn.__closure__)
    new.__qualname__ = name
    new.__module__ = fn.__module__
    doc = fn.__doc__
    if not parallel:  # the same text, for the serial kernel
        head, rest = doc.split("\n", 1)
        doc = (f"{head}\n\n    The serial variant of ``{name[:-7]}``: no parallel region (for small inputs, or inside your\n"
               f"    own ``prange`` loop), bitwise the same results.\n{rest}").replace(
            f"kernels.{name[:-7]}(", f"kernels.{name}(").replace(f"``{name[:-7]}(", f"``{name}(")
    new.__doc__ = doc
    return _jit(new)


train_forward = _public(_train_forward, entries.train, True)
train_forward_serial = _public(_train_forward, entries.train, False)
infer_forward = _public(_infer_forward, entries.normalize, True)
infer_forward_serial = _public(_infer_forward, entries.normalize, False)
backward = _public(_backward, entries.backward, True)
backward_serial = _public(_backward, entries.backward, False)

_ENTRIES = {k: getattr(entries, k) for k in ("train", "normalize", "backward", "stats", "grad_sums",
                                             "input_grad")}


def variant(name: str, parallel: bool = True, **flags: bool) -> Any:
    """The compiled variant of one of fastbn's kernels (a Numba dispatcher; compiles on first call).

    ``name``: ``train``, ``normalize``, ``backward``, ``stats``, ``grad_sums`` or ``input_grad`` (see
    ``fastbn._kernels.entries`` for their arguments; the first is the thread count, 1 when not
    ``parallel``). ``flags``: CL, OWNED, SHORT (the input's layout, ``fastbn._kernels.plan.layout_of``) and
    the kernel's own (RELU, HAS_RES, RENORM, WRITE_D, STREAM); unnamed flags are False.

    Example
    -------
    >>> import numpy as np
    >>> from fastbn import kernels
    >>> from fastbn._kernels.plan import layout_of
    >>> x = np.random.default_rng(0).normal(size=(16, 4, 1)).astype(np.float32)   # dense (N, C)
    >>> cl, owned, short = layout_of(*x.shape)
    >>> stats = kernels.variant("stats", False, CL=cl, OWNED=owned, SHORT=short)
    >>> out = np.empty((2, 4))
    >>> stats(1, x, out, 0, 4)                        # out[0] = mean, out[1] = sum of squared deviations
    >>> bool(np.allclose(out[0], x.mean(axis=(0, 2))))
    True
    """
    if name not in _ENTRIES:
        raise ValueError(f"unknown kernel {name!r}; one of {sorted(_ENTRIES)}")
    return _ENTRIES[name].get(parallel, **flags)


__all__ = ["train_forward", "train_forward_serial", "infer_forward", "infer_forward_serial", "backward",
           "backward_serial", "variant"]
