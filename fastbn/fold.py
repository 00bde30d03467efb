"""Fold frozen (inference-mode) batch normalization into neighbouring linear layers.

Pure NumPy. Every function computes in float64 and returns arrays of the weight's dtype; inputs are never
modified. BN here is the inference affine map ``y = x * s + t`` per channel with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` (``gamma = 1``, ``beta = 0`` when ``None``).

Two directions:

- BN *after* a layer (conv/dense -> BN): scale the weight along its output-channel axis,
  ``W' = W * s``, ``b' = (b - mean) * s + beta`` (``b = 0`` without bias). Always exact.
- BN *before* a layer (BN -> dense/conv): scale along the input-channel axis, ``W' = W * s`` and
  ``b' = b + (W applied to the constant t)``. Exact for dense layers and for convolutions without zero
  padding; with zero padding the padded border sees 0 instead of ``t``, so :func:`fold_conv_before` refuses.

Weight layouts:

===========================  =========================================  ===========================
layer                        PyTorch / ONNX (``layout="torch"``)        Keras / TF (``layout="keras"``)
===========================  =========================================  ===========================
dense                        (out, in)                                  (in, out)
convolution                  (O, I/groups, *k)                          (*k, I/groups, O)
transposed convolution       (I, O/groups, *k)                          (*k, O, I)  (groups = 1)
depthwise (Keras)            (C*m, 1, *k) with ``groups=C``             (*k, C, m)  (``depthwise=True``)
===========================  =========================================  ===========================

In the transposed PyTorch layout the output channel of element ``[i, j]`` is
``(i // (I/groups)) * (O/groups) + j`` -- *not* simply axis 1 when ``groups > 1``.
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

from fastbn._validate import check_flag, real_number

__all__ = ["bn_to_affine", "fold_conv", "fold_dense", "fold_conv_keras", "fold_dense_keras",
           "fold_dense_before", "fold_conv_before"]

# float16/32/64 only: longdouble would silently lose precision in the float64 computation, and
# integer/complex weights are almost certainly a caller mistake.
_FLOAT_KINDS = (np.float16, np.float32, np.float64)


# ----------------------------------------------------------------------------------------------- checks
def _as_float_array(name: str, value: Any) -> np.ndarray:
    if value is None:
        raise TypeError(f"{name} must be an array, got None")
    arr = np.asarray(value)
    if arr.dtype.type not in _FLOAT_KINDS:
        raise TypeError(f"{name} must be a float16/float32/float64 array, got dtype {arr.dtype}")
    return arr


def _vector(name: str, value: Any, n: int, what: str, default: float | None = None) -> np.ndarray:
    """A per-channel vector as float64 (a fresh array), or ``default`` filled when value is None."""
    if value is None:
        if default is None:
            raise TypeError(f"{name} must be an array of length {n}, got None")
        return np.full(n, default, dtype=np.float64)
    arr = _as_float_array(name, value)
    if arr.shape != (n,):
        raise ValueError(f"{name} has shape {arr.shape}, expected ({n},): one value per {what}")
    return arr.astype(np.float64)  # astype copies, so the caller's array is never touched


def _check_eps(eps: Any) -> float:
    eps = real_number(eps, "eps", "a real number")
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _check_groups(groups: Any) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    return int(groups)


def _check_layout(layout: Any) -> str:
    if layout not in ("torch", "keras"):
        raise ValueError(f"layout must be 'torch' (PyTorch/ONNX) or 'keras' (Keras/TF), got {layout!r}")
    return layout


def _affine64(gamma: Any, beta: Any, mean: Any, var: Any, eps: Any, n: int, what: str
              ) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) in float64 after validating all BN parameters against ``n`` channels."""
    eps = _check_eps(eps)
    mean64 = _vector("mean", mean, n, what)
    var64 = _vector("var", var, n, what)
    gamma64 = _vector("gamma", gamma, n, what, default=1.0)
    beta64 = _vector("beta", beta, n, what, default=0.0)
    denom = var64 + eps
    # `not (denom > 0)` also catches NaN; a zero or negative denominator has no real inverse sqrt.
    bad = ~(denom > 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"var + eps must be > 0 for every channel; channel {i} has var={var64[i]!r}, "
                         f"eps={eps!r}")
    s = gamma64 / np.sqrt(denom)
    t = beta64 - mean64 * s
    return s, t


# ----------------------------------------------------------------------------------- channel index maps
def _channel_maps(shape: tuple[int, ...], n_kernel: int, layout: str, groups: int, transposed: bool,
                  depthwise: bool) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Output and input channel index of every weight element, as broadcastable int arrays.

    Returns ``(c_out, c_in, out_idx, in_idx)``; ``s[out_idx]`` broadcasts against the weight. The maps
    are tiny (no kernel axes materialized), so this costs nothing for large weights.
    """
    kdims = (1,) * n_kernel
    if layout == "torch":
        a, b = shape[0], shape[1]
        if transposed:  # (I, O/groups, *k)
            if a % groups:
                raise ValueError(f"groups={groups} does not divide the weight's input channels "
                                 f"(axis 0 of shape {shape})")
            i_per_g = a // groups
            c_in, c_out = a, b * groups
            out2 = (np.arange(a) // i_per_g)[:, None] * b + np.arange(b)[None, :]
            return c_out, c_in, out2.reshape((a, b) + kdims), np.arange(a).reshape((a, 1) + kdims)
        # (O, I/groups, *k)
        if a % groups:
            raise ValueError(f"groups={groups} does not divide the weight's output channels "
                             f"(axis 0 of shape {shape})")
        o_per_g = a // groups
        c_out, c_in = a, b * groups
        in2 = (np.arange(a) // o_per_g)[:, None] * b + np.arange(b)[None, :]
        return c_out, c_in, np.arange(a).reshape((a, 1) + kdims), in2.reshape((a, b) + kdims)
    # keras: kernel axes first, then two channel axes
    a, b = shape[-2], shape[-1]
    if depthwise:  # (*k, C, depth_multiplier): output channel i * m + q (TF's depthwise_conv2d order)
        if groups != 1:
            raise ValueError("groups must be 1 with depthwise=True (the depthwise kernel implies it)")
        out2 = np.arange(a)[:, None] * b + np.arange(b)[None, :]
        return a * b, a, out2.reshape(kdims + (a, b)), np.arange(a).reshape(kdims + (a, 1))
    if transposed:  # (*k, O, I); Keras transposed convolutions have no groups
        if groups != 1:
            raise ValueError("groups > 1 is not supported for Keras transposed kernels (*k, O, I)")
        return a, b, np.arange(a).reshape(kdims + (a, 1)), np.arange(b).reshape(kdims + (1, b))
    # (*k, I/groups, O)
    if b % groups:
        raise ValueError(f"groups={groups} does not divide the kernel's output channels "
                         f"(last axis of shape {shape})")
    o_per_g = b // groups
    in2 = np.arange(a)[:, None] + (np.arange(b) // o_per_g)[None, :] * a
    return b, a * groups, np.arange(b).reshape(kdims + (1, b)), in2.reshape(kdims + (a, b))


def _weight(weight: Any, layout: str, min_ndim: int, max_ndim: int, what: str) -> np.ndarray:
    w = _as_float_array("weight", weight)
    if not min_ndim <= w.ndim <= max_ndim:
        want = f"{min_ndim}" if min_ndim == max_ndim else f"{min_ndim} to {max_ndim}"
        raise ValueError(f"weight must have {want} dimensions for {what} ({layout} layout), "
                         f"got shape {w.shape}")
    if 0 in w.shape:
        raise ValueError(f"weight has an empty axis: shape {w.shape}")
    return w


def _bias(bias: Any, n: int) -> np.ndarray:
    return _vector("bias", bias, n, "output channel", default=0.0)


def _fold_after(w: np.ndarray, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: Any,
                maps: tuple[int, int, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    c_out, _, out_idx, _ = maps
    s, t = _affine64(gamma, beta, mean, var, eps, c_out, "output channel of weight")
    b64 = _bias(bias, c_out)
    w_new = w.astype(np.float64) * s[out_idx]
    b_new = b64 * s + t  # == (b - mean) * s + beta
    return w_new.astype(w.dtype), b_new.astype(w.dtype)


def _fold_before(w: np.ndarray, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: Any,
                 maps: tuple[int, int, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    c_out, c_in, out_idx, in_idx = maps
    s, t = _affine64(gamma, beta, mean, var, eps, c_in, "input channel of weight")
    b64 = _bias(bias, c_out)
    w64 = w.astype(np.float64)
    # b' = b + (layer applied to the constant input t): sum W * t[in] over every axis along which the
    # output channel does not vary, leaving the output-channel axes in out-channel order.
    contrib = w64 * t[in_idx]
    sum_axes = tuple(ax for ax in range(w.ndim) if out_idx.shape[ax] == 1)
    b_add = contrib.sum(axis=sum_axes).reshape(-1)
    assert b_add.shape == (c_out,)  # holds for every non-transposed layout handled here
    return (w64 * s[in_idx]).astype(w.dtype), (b64 + b_add).astype(w.dtype)


# ------------------------------------------------------------------------------------------- public API
def bn_to_affine(gamma: Any, beta: Any, mean: Any, var: Any, eps: float = 1e-5
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Frozen BN as a per-channel affine map ``y = x * scale + shift``.

    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale``; gamma/beta may be None
    (affine=False: 1 and 0). All arrays are 1-D of length C. Computed in float64, returned in the
    NumPy promotion of the given arrays' dtypes.

    >>> import numpy as np
    >>> s, t = bn_to_affine(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([4.0]), eps=0.0)
    >>> s, t
    (array([1.]), array([-2.]))
    """
    m = _as_float_array("mean", mean)
    if m.ndim != 1:
        raise ValueError(f"mean must be 1-D (one value per channel), got shape {m.shape}")
    s, t = _affine64(gamma, beta, mean, var, eps, m.shape[0], "channel (len(mean))")
    dtype = np.result_type(*(np.asarray(a).dtype for a in (gamma, beta, mean, var) if a is not None))
    return s.astype(dtype), t.astype(dtype)


def fold_conv(weight: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float = 1e-5, *,
              groups: int = 1, transposed: bool = False, layout: str = "torch"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN that follows a convolution into the convolution's weight and bias.

    ``weight``: (O, I/groups, *k) for ``Conv{1,2,3}d``/ONNX Conv; with ``transposed=True`` the
    transposed-convolution layout (I, O/groups, *k) (ConvTranspose, any groups). ``layout="keras"``
    selects Keras kernels instead, see :func:`fold_conv_keras`. ``bias``: (O,) or None (a bias is
    created). gamma, beta, mean, var: (O,); gamma/beta may be None (affine=False).
    Returns ``(weight', bias')`` in the weight's dtype (float16/32/64), computed in float64.

    >>> import numpy as np
    >>> w = np.ones((4, 2, 3, 3), np.float32)           # Conv2d(4, 4, 3, groups=2)
    >>> m, v = np.full(4, 5.0, np.float32), np.full(4, 4.0, np.float32)
    >>> w2, b2 = fold_conv(w, None, None, None, m, v, eps=0.0, groups=2)
    >>> float(w2[0, 0, 0, 0]), float(b2[0])
    (0.5, -2.5)
    """
    layout = _check_layout(layout)
    groups = _check_groups(groups)
    w = _weight(weight, layout, 3, 32, "a convolution")
    return _fold_after(w, bias, gamma, beta, mean, var, eps,
                       _channel_maps(w.shape, w.ndim - 2, layout, groups, check_flag(transposed, "transposed"),
                                     False))


def fold_conv_keras(kernel: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any,
                    eps: float = 1e-3, *, groups: int = 1, depthwise: bool = False,
                    transposed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN that follows a Keras/TF convolution into its kernel and bias.

    ``kernel``: (*k, I/groups, O) for ConvND; ``depthwise=True``: (*k, C, depth_multiplier) for
    DepthwiseConvND (output channel ``c * depth_multiplier + q``); ``transposed=True``: (*k, O, I) for
    ConvNDTranspose. BN vectors have one value per output channel. Note ``eps`` defaults to 1e-3,
    Keras's BatchNormalization default. Returns ``(kernel', bias')`` in the kernel's dtype.

    >>> import numpy as np
    >>> k = np.ones((3, 3, 2, 4))                      # Conv2D(4, 3) on 2 input channels
    >>> k2, b2 = fold_conv_keras(k, np.zeros(4), None, None, np.ones(4), np.full(4, 4.0), eps=0.0)
    >>> float(k2[0, 0, 0, 0]), float(b2[0])
    (0.5, -0.5)
    """
    groups = _check_groups(groups)
    w = _weight(kernel, "keras", 3, 32, "a convolution")
    return _fold_after(w, bias, gamma, beta, mean, var, eps,
                       _channel_maps(w.shape, w.ndim - 2, "keras", groups,
                                     check_flag(transposed, "transposed"), check_flag(depthwise, "depthwise")))


def fold_dense(weight: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: float = 1e-5,
               *, layout: str = "torch") -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN that follows a dense layer into its weight and bias.

    ``weight``: (out, in) (``torch.nn.Linear``, ONNX Gemm with transB=1); ``layout="keras"``: (in, out).
    ``bias``: (out,) or None. BN vectors: (out,). Returns ``(weight', bias')`` in the weight's dtype.

    >>> import numpy as np
    >>> w2, b2 = fold_dense(np.eye(2), None, None, None, np.array([1.0, 2.0]), np.array([3.0, 0.0]),
    ...                     eps=1.0)
    >>> w2.tolist(), b2.tolist()
    ([[0.5, 0.0], [0.0, 1.0]], [-0.5, -2.0])
    """
    layout = _check_layout(layout)
    w = _weight(weight, layout, 2, 2, "a dense layer")
    return _fold_after(w, bias, gamma, beta, mean, var, eps, _channel_maps(w.shape, 0, layout, 1, False,
                                                                           False))


def fold_dense_keras(kernel: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any,
                     eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fold_dense` for a Keras Dense kernel (in, out); ``eps`` defaults to Keras's 1e-3.

    >>> import numpy as np
    >>> k2, b2 = fold_dense_keras(np.ones((3, 2)), None, None, None, np.zeros(2), np.full(2, 4.0), eps=0.0)
    >>> k2.tolist(), b2.tolist()
    ([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], [0.0, 0.0])
    """
    return fold_dense(kernel, bias, gamma, beta, mean, var, eps, layout="keras")


def fold_dense_before(weight: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any,
                      eps: float = 1e-5, *, layout: str = "torch") -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN that *precedes* a dense layer: ``dense(BN(x)) == dense'(x)`` exactly.

    ``W' = W * s`` along the input axis and ``b' = b + W @ t``. ``weight``: (out, in), or (in, out) with
    ``layout="keras"``; ``bias``: (out,) or None; BN vectors: (in,), the BN channels being the dense
    layer's input features. Returns ``(weight', bias')`` in the weight's dtype.

    >>> import numpy as np
    >>> w2, b2 = fold_dense_before(np.ones((1, 2)), None, None, None, np.array([1.0, 1.0]),
    ...                            np.array([3.0, 3.0]), eps=1.0)
    >>> w2.tolist(), b2.tolist()
    ([[0.5, 0.5]], [-1.0])
    """
    layout = _check_layout(layout)
    w = _weight(weight, layout, 2, 2, "a dense layer")
    return _fold_before(w, bias, gamma, beta, mean, var, eps, _channel_maps(w.shape, 0, layout, 1, False,
                                                                            False))


def _padding_is_zero(padding: Any, n_kernel: int, kernel_size: Sequence[int]) -> bool:
    if isinstance(padding, str):
        p = padding.lower()
        if p == "valid":
            return True
        if p == "same":  # 'same' pads (k - 1) * dilation in total: none only for 1-wide kernels
            return all(k == 1 for k in kernel_size)
        raise ValueError(f"padding must be an int, a sequence of ints, 'valid' or 'same'; got {padding!r}")
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        return int(padding) == 0
    try:
        vals = [int(p) for p in padding]
    except TypeError:
        raise TypeError(f"padding must be an int, a sequence of ints, 'valid' or 'same'; "
                        f"got {padding!r}") from None
    return all(v == 0 for v in vals)


def fold_conv_before(weight: Any, bias: Any, gamma: Any, beta: Any, mean: Any, var: Any,
                     eps: float = 1e-5, *, padding: Any, padding_mode: str = "zeros", groups: int = 1,
                     layout: str = "torch", depthwise: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BN that *precedes* a convolution: exact only when the convolution pads no zeros.

    ``W' = W * s`` along the input-channel axis and ``b' = b + conv(t)`` where ``conv(t)`` is the
    response to the constant input ``t`` (a sum over the kernel). With zero padding the border outputs
    see padded zeros where the unfolded model sees BN(0) = t, so this raises ValueError; ``padding``
    (int, per-side sequence, 'valid' or 'same') is therefore required. Non-zero padding is accepted
    with ``padding_mode`` 'reflect', 'replicate' or 'circular', which pad with copies of BN outputs.
    ``weight``: (O, I/groups, *k), or with ``layout="keras"`` (*k, I/groups, O) or (``depthwise=True``)
    (*k, C, m). BN vectors: one value per *input* channel. Transposed convolutions are not supported
    (a constant input does not give a constant output at their borders). Returns ``(weight', bias')``.

    >>> import numpy as np
    >>> w2, b2 = fold_conv_before(np.ones((1, 1, 3)), None, None, None, np.ones(1), np.full(1, 3.0),
    ...                           eps=1.0, padding=0)
    >>> w2.ravel().tolist(), b2.tolist()
    ([0.5, 0.5, 0.5], [-1.5])
    >>> try:
    ...     fold_conv_before(np.ones((1, 1, 3)), None, None, None, np.ones(1), np.ones(1), padding=1)
    ... except ValueError as e:
    ...     print(str(e).split(" (")[0])
    cannot fold BN into a following convolution with zero padding
    """
    layout = _check_layout(layout)
    groups = _check_groups(groups)
    w = _weight(weight, layout, 3, 32, "a convolution")
    n_kernel = w.ndim - 2
    ksize = w.shape[2:] if layout == "torch" else w.shape[:n_kernel]
    if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', "
                         f"got {padding_mode!r}")
    if not _padding_is_zero(padding, n_kernel, ksize) and padding_mode == "zeros":
        raise ValueError(
            f"cannot fold BN into a following convolution with zero padding (padding={padding!r}): the "
            "border outputs would see padded zeros where the original model sees BN(0) = beta - "
            "mean * gamma / sqrt(var + eps), so the folded layer would differ there. Fold only "
            "unpadded convolutions (or pad explicitly before the BN).")
    return _fold_before(w, bias, gamma, beta, mean, var, eps,
                        _channel_maps(w.shape, n_kernel, layout, groups, False,
                                      check_flag(depthwise, "depthwise")))
