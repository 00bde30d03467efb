"""``fastbn.BatchNorm``: a thin stateful layer over fastbn's kernels (NumPy in, NumPy out).

Training/inference mode, running statistics, ``backward`` from what ``forward`` saved, PyTorch's
state_dict key names, two conventions (PyTorch's and Keras'), a fused ReLU / residual-add + ReLU,
batch renormalization and ghost (virtual) batches.

What Keras does, read from its sources (the conventions below follow them):

- Keras 3 (``keras/src/layers/normalization/batch_normalization.py``): ``moving = moving * momentum +
  batch * (1 - momentum)`` for both statistics, with ``variance`` from ``ops.moments``: the *biased*
  batch variance. Defaults momentum=0.99, epsilon=1e-3, axis=-1. That is fastbn's Keras convention.
- tf_keras 2.x (``tf_keras/layers/normalization/batch_normalization.py``): the non-fused path
  (2-D input, float64, renorm, virtual batches) also feeds ``tf.nn.moments``' biased variance. Its
  fused path (4-D/5-D float32 input, channel axis 1 or last, none of those options) calls TF's
  FusedBatchNorm, whose CPU kernel (``tensorflow/core/kernels/fused_batch_norm_op.cc``) updates the
  moving variance with ``batch_variance * rest_size_adjust``, rest_size_adjust = n / (n - 1), i.e. the
  *unbiased* variance; V2 layers set ``_bessels_correction_test_only = True``, so tf_keras does not undo
  it. fastbn follows Keras 3 (biased); a tf_keras fused-path model differs by that n / (n - 1) factor.
- Renorm (tf_keras; not in the Keras 3 sources read): separate ``renorm_mean`` / ``renorm_stddev``
  (initialized 0 and 1) updated with ``renorm_momentum`` toward the batch mean and ``sqrt(var + eps)``;
  ``r = sqrt(var + eps) / s``, ``d = (mean - renorm_mean) / s`` with ``s = max(renorm_stddev,
  sqrt(eps))``, both computed before the update, clipped to [rmin, rmax] and [-dmax, dmax] (missing keys:
  0, inf, inf), wrapped in stop_gradient; ``y = gamma * (xhat * r + d) + beta``. With renorm, tf_keras
  tracks ``moving_stddev`` (momentum toward ``sqrt(var + eps)``) and sets ``moving_variance =
  relu(moving_stddev**2 - eps)``.
- Virtual batches (tf_keras): the batch is reshaped to ``(virtual_batch_size, -1, ...)``, so sample i
  belongs to virtual batch ``i % (N // virtual_batch_size)`` (interleaved); the moving statistics are
  updated once per step with the average over virtual batches of their means and (biased) variances.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from fastbn._validate import (as_input, check_eps, check_flag, check_momentum, check_running_var, like_x,
                              normalize_axis, real_number, resolve_layout)
from fastbn.fused import apply_core, backward_core, ema_update, train_core

__all__ = ["BatchNorm"]

_F64 = np.float64
_CLIP_KEYS = ("rmax", "rmin", "dmax")
_ORDERS = ("contiguous", "interleaved")


@dataclass
class _Saved:
    """What ``backward`` needs from the last ``forward`` (per-group arrays are (G, C) float64)."""

    x: np.ndarray
    y: np.ndarray | None  # the output, kept for the ReLU mask (None without ReLU)
    axis: int
    groups: list | None  # virtual batches as slices of axis 0; None: the whole batch
    mean: np.ndarray
    invstd: np.ndarray
    r: np.ndarray | None  # renorm corrections (None without renorm)
    d: np.ndarray | None
    gamma: np.ndarray  # float64 (C,), as used in the forward
    frozen: bool  # eval mode: statistics are constants
    residual: bool


def _int_arg(v, name: str, minimum: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if int(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _clip_arg(clipping) -> tuple[dict, np.ndarray]:
    if clipping is None:
        clipping = {}
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping must be a dict with keys among {_CLIP_KEYS}, got "
                        f"{type(clipping).__name__}")
    bad = set(clipping) - set(_CLIP_KEYS)
    if bad:
        raise ValueError(f"renorm_clipping has unknown keys {sorted(bad)}; allowed: {list(_CLIP_KEYS)}")
    vals = {}
    for k, v in clipping.items():
        if v is None:
            continue
        vals[k] = real_number(v, f"renorm_clipping[{k!r}]", "a number or None")
        if np.isnan(vals[k]):
            raise ValueError(f"renorm_clipping[{k!r}] must be a number or None, got {v!r}")
    rmin, rmax, dmax = vals.get("rmin", 0.0), vals.get("rmax", np.inf), vals.get("dmax", np.inf)
    if rmax <= 0 or rmin > rmax:
        raise ValueError(f"renorm_clipping needs 0 < rmax and rmin <= rmax, got rmin={rmin}, rmax={rmax}")
    if dmax < 0:
        raise ValueError(f"renorm_clipping['dmax'] must be >= 0, got {dmax}")
    return dict(clipping), np.array([rmin, rmax, dmax])


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)


class BatchNorm:
    """Batch normalization layer over NumPy arrays, running fastbn's kernels.

    Parameters
    ----------
    num_features : C, the size of the channel axis.
    axis : the channel axis of the inputs (1: NCHW / (N, C) / (N, C, L); -1: channels-last).
    eps : added to the variance.
    momentum : PyTorch convention: weight of the new batch, ``running = (1 - m) * running + m * batch``
        (default 0.1); ``None`` is the cumulative average (factor ``1 / num_batches_tracked``).
        Keras convention: weight of the old value, ``moving = moving * m + batch * (1 - m)``.
    affine : learnable gamma (``weight``) and beta (``bias``); ``center`` / ``scale`` override each.
    track_running_stats : keep running statistics (else batch statistics are used in eval mode too).
    dtype : float32 or float64, the dtype of the parameters and running statistics (inputs may be
        float32, float64, float16 or bfloat16).
    center, scale : beta and gamma separately (Keras' switches); None: ``affine``.
    activation : None or ``"relu"``: ``y = relu(bn(x) [+ residual])`` fused into the kernels.
    renorm, renorm_clipping, renorm_momentum : batch renormalization (Ioffe 2017) as Keras defines it:
        ``y = gamma * (xhat * r + d) + beta`` in training with ``r = sqrt(var + eps) / s`` and
        ``d = (mean - renorm_mean) / s``, ``s = max(renorm_std, sqrt(eps))``, from the renorm moving
        statistics before this step's update, clipped by ``{"rmin", "rmax", "dmax"}`` (defaults 0, inf,
        inf), constants in the backward. ``renorm_momentum`` has the convention's meaning (default: 0.01
        PyTorch / 0.99 Keras, i.e. 1% new). Inference uses the running statistics.
    virtual_batch_size : ghost batch norm: in training, statistics per virtual batch of this many samples
        along axis 0 (it must divide the batch). Running statistics are updated once per step with the
        mean over virtual batches of their means and variances (unbiased per virtual batch in the PyTorch
        convention, biased in Keras'). Inference is unchanged.
    virtual_batch_order : ``"contiguous"`` (samples ``[g*v, (g+1)*v)``, the PyTorch-convention default,
        zero-copy for C-ordered and channels-last input) or ``"interleaved"`` (samples ``g, g+G, ...`` as
        tf_keras' reshape to ``(v, G, ...)``, the Keras default; copies each virtual batch).
    convention : ``"torch"`` or ``"keras"`` (the meaning of momentum and of the moving variance). Prefer
        :meth:`BatchNorm.keras`, which also has Keras' argument names and defaults.

    Attributes
    ----------
    gamma, beta : (C,) parameters of ``dtype`` (None when disabled); ``dgamma``, ``dbeta`` after
    ``backward``; running_mean, running_var, num_batches_tracked (None without running statistics);
    renorm_mean, renorm_std (renorm); d_residual (gradient of the residual after ``backward``).

    Example
    -------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(4)                       # NCHW, PyTorch convention
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 5, 5)).astype(np.float32)
    >>> y = bn(x)                                      # training mode: batch statistics
    >>> dx = bn.backward(np.ones_like(y))              # dgamma, dbeta stored on bn
    >>> bn.gamma -= 0.1 * bn.dgamma
    >>> y_eval = bn.eval()(x)                          # running statistics
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    def __init__(self, num_features: int, *, axis: int = 1, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype=np.float32,
                 center: bool | None = None, scale: bool | None = None, activation: str | None = None,
                 renorm: bool = False, renorm_clipping: dict | None = None,
                 renorm_momentum: float | None = None, virtual_batch_size: int | None = None,
                 virtual_batch_order: str | None = None, convention: str = "torch") -> None:
        if convention not in ("torch", "keras"):
            raise ValueError(f"convention must be 'torch' or 'keras', got {convention!r}")
        self.convention = convention
        self.num_features = C = _int_arg(num_features, "num_features", 1)
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.axis = int(axis)
        self.eps = check_eps(eps)
        if momentum is None:
            if convention == "keras":
                raise ValueError("momentum=None (cumulative average) exists only in the PyTorch convention")
            self.momentum = None
        else:
            self.momentum = check_momentum(momentum)
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        self.dtype = dt
        affine = check_flag(affine, "affine")
        self.center = affine if center is None else check_flag(center, "center")
        self.scale = affine if scale is None else check_flag(scale, "scale")
        self.affine = self.center and self.scale
        self.track_running_stats = check_flag(track_running_stats, "track_running_stats")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.activation = activation
        self.renorm = check_flag(renorm, "renorm")
        self.renorm_clipping, self._clip = _clip_arg(renorm_clipping)
        if renorm_momentum is None:
            renorm_momentum = 0.99 if convention == "keras" else 0.01
        self.renorm_momentum = check_momentum(renorm_momentum, "renorm_momentum")
        if self.renorm and not self.track_running_stats:
            raise ValueError("renorm=True needs track_running_stats=True (r and d use moving statistics)")
        self.virtual_batch_size = (None if virtual_batch_size is None
                                   else _int_arg(virtual_batch_size, "virtual_batch_size", 1))
        if virtual_batch_order is None:
            virtual_batch_order = "interleaved" if convention == "keras" else "contiguous"
        if virtual_batch_order not in _ORDERS:
            raise ValueError(f"virtual_batch_order must be one of {_ORDERS}, got {virtual_batch_order!r}")
        self.virtual_batch_order = virtual_batch_order

        self.training = True
        self.gamma = np.ones(C, dt) if self.scale else None
        self.beta = np.zeros(C, dt) if self.center else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dt)
            self.running_var = np.ones(C, dt)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.renorm_mean = np.zeros(C, dt) if self.renorm else None
        self.renorm_std = np.ones(C, dt) if self.renorm else None
        # Keras renorm tracks the moving stddev and derives the moving variance from it
        self.moving_std = np.ones(C, dt) if self.renorm and convention == "keras" else None
        self.dgamma = self.dbeta = self.d_residual = None
        self._saved: _Saved | None = None

    @classmethod
    def keras(cls, num_features: int, *, axis: int = -1, momentum: float = 0.99, epsilon: float = 1e-3,
              center: bool = True, scale: bool = True, renorm: bool = False, renorm_clipping: dict | None = None,
              renorm_momentum: float = 0.99, virtual_batch_size: int | None = None,
              activation: str | None = None, dtype=np.float32) -> "BatchNorm":
        """A layer with Keras' ``BatchNormalization`` arguments, meanings and defaults.

        ``momentum`` is the weight of the old value: ``moving = moving * momentum + batch * (1 -
        momentum)`` with the biased batch variance (Keras 3); epsilon 1e-3, channels-last ``axis=-1``;
        ``center`` (beta) and ``scale`` (gamma) separately; ``renorm*`` as tf_keras; ghost batches
        interleaved as tf_keras forms them. ``num_features`` is needed up front (Keras infers it from
        the first input). The state_dict still uses PyTorch's key names (weight, bias, running_mean,
        running_var, ...), so Keras' ``[gamma, beta, moving_mean, moving_variance]`` map to them.

        Example
        -------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm.keras(3)                 # NHWC
        >>> x = np.random.default_rng(0).normal(size=(4, 5, 5, 3))
        >>> _ = bn(x)
        >>> bool(np.allclose(bn.running_mean, 0.01 * x.mean(axis=(0, 1, 2)), atol=1e-7))
        True
        """
        return cls(num_features, axis=axis, eps=epsilon, momentum=momentum, center=center, scale=scale,
                   renorm=renorm, renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
                   virtual_batch_size=virtual_batch_size, activation=activation, dtype=dtype,
                   convention="keras")

    # ----------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "BatchNorm":
        """Set training mode (batch statistics, running statistics updated); returns self."""
        self.training = check_flag(mode, "mode")
        return self

    def eval(self) -> "BatchNorm":
        """Set inference mode (running statistics); returns self."""
        return self.train(False)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("activation", "virtual_batch_size")
                        if getattr(self, k) is not None)
        if self.renorm:
            extra += f", renorm=True, renorm_clipping={self.renorm_clipping!r}"
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, momentum={self.momentum}, "
                f"center={self.center}, scale={self.scale}, track_running_stats={self.track_running_stats}, "
                f"convention={self.convention!r}{extra})")

    # ----------------------------------------------------------------------------------- forward
    def __call__(self, x, residual=None, *, training: bool | None = None) -> np.ndarray:
        return self.forward(x, residual, training=training)

    def forward(self, x, residual=None, *, training: bool | None = None) -> np.ndarray:
        """Normalize x; returns y (x's shape, dtype and memory layout).

        x : float32/float64/float16/bfloat16 array with ``num_features`` channels along ``axis``.
        residual : optional array like x, added before the activation (``y = act(bn(x) + residual)``).
        training : overrides the layer's mode for this call (Keras' ``training=`` argument). In training
        mode (or without running statistics) the batch statistics normalize; in training mode the running
        statistics are updated, only once the whole call has succeeded. Saves what :meth:`backward` needs.
        """
        x = as_input(x, "x")
        axis = normalize_axis(self.axis, x.ndim)
        C = self.num_features
        if x.shape[axis] != C:
            raise ValueError(f"x has {x.shape[axis]} channels along axis {self.axis} (shape {x.shape}); this "
                             f"BatchNorm has num_features={C}")
        res = None if residual is None else like_x(residual, "residual", x)
        training = self.training if training is None else check_flag(training, "training")
        g = np.ones(C) if self.gamma is None else self.gamma.astype(_F64)
        b = np.zeros(C) if self.beta is None else self.beta.astype(_F64)
        relu = self.activation == "relu"
        if not (training or not self.track_running_stats):
            rm = self.running_mean.astype(_F64)
            rv = self.running_var.astype(_F64)
            check_running_var(rv, self.eps)
            invstd = 1.0 / np.sqrt(rv + self.eps)
            y = apply_core(x, axis, rm, g * invstd, b, res, relu, None)
            self._saved = _Saved(x, y if relu else None, axis, None, rm[None], invstd[None], None, None, g,
                                 True, res is not None)
            return y
        groups = self._groups(x, axis) if training and self.virtual_batch_size is not None else None
        renorm = training and self.renorm
        rn = (self.renorm_mean.astype(_F64), self.renorm_std.astype(_F64), self._clip) if renorm else None
        if groups is None:
            outs = [train_core(x, axis, g, b, self.eps, res, relu, None, rn)]
            y = outs[0].y
        else:
            y = resolve_layout(x, axis).empty(x.dtype)
            outs = [train_core(x[s], axis, g, b, self.eps, None if res is None else res[s], relu, y[s], rn)
                    for s in groups]
        mean = np.stack([o.mean for o in outs])
        var = np.stack([o.var for o in outs])
        n = outs[0].n
        if training and self.track_running_stats:
            batch_mean = mean.mean(axis=0)
            batch_var = var.mean(axis=0)  # biased; the mean over virtual batches with ghost batches
            self._update_running(batch_mean, batch_var * (n / (n - 1.0)), n)
            if self.renorm:
                self._update_renorm(batch_mean, np.sqrt(batch_var + self.eps))
        r = np.stack([o.r for o in outs]) if renorm else None
        d = np.stack([o.d for o in outs]) if renorm else None
        self._saved = _Saved(x, y if relu else None, axis, groups, mean, np.stack([o.invstd for o in outs]),
                             r, d, g, False, res is not None)
        return y

    def _groups(self, x: np.ndarray, axis: int) -> list | None:
        v = self.virtual_batch_size
        if axis == 0:
            raise ValueError("virtual_batch_size splits axis 0 (the batch), but axis 0 is the channel axis here")
        N = x.shape[0]
        if N % v:
            raise ValueError(f"virtual_batch_size={v} must divide the batch size, got x.shape[0]={N}")
        G = N // v
        if G == 1:
            return None
        if self.virtual_batch_order == "contiguous":
            return [slice(k * v, (k + 1) * v) for k in range(G)]
        return [slice(k, None, G) for k in range(G)]

    # ------------------------------------------------------------------------------ running stats
    def _update_running(self, mean: np.ndarray, var_unbiased: np.ndarray, n: int | None = None) -> None:
        """Fold one step's statistics into the running ones (no-op without running statistics).

        mean, var_unbiased : (C,) batch mean and unbiased variance (``var * n / (n - 1)``). n : values per
        channel; needed by the Keras convention, whose moving variance takes the biased variance.
        PyTorch convention: increments num_batches_tracked and applies ``momentum`` (or ``1 /
        num_batches_tracked`` when momentum is None). Keras: ``moving * momentum + batch * (1 -
        momentum)`` (with renorm: through the moving stddev, as tf_keras).
        """
        if not self.track_running_stats:
            return
        mean = np.asarray(mean, _F64)
        var_unbiased = np.asarray(var_unbiased, _F64)
        self.num_batches_tracked += 1
        if self.convention == "torch":
            f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            ema_update(self.running_mean, mean, f)
            ema_update(self.running_var, var_unbiased, f)
            return
        if n is None:
            raise TypeError("n (values per channel) is required with convention='keras': Keras' moving "
                            "variance takes the biased batch variance")
        var = var_unbiased * ((n - 1.0) / n)
        k = self.momentum
        self.running_mean[...] = self.running_mean.astype(_F64) * k + mean * (1.0 - k)
        if self.renorm:
            self.moving_std[...] = self.moving_std.astype(_F64) * k + np.sqrt(var + self.eps) * (1.0 - k)
            s = self.moving_std.astype(_F64)
            self.running_var[...] = np.maximum(s * s - self.eps, 0.0)
        else:
            self.running_var[...] = self.running_var.astype(_F64) * k + var * (1.0 - k)

    def _update_renorm(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Move renorm_mean / renorm_std toward the batch mean and sqrt(var + eps) (renorm_momentum)."""
        k = self.renorm_momentum
        if self.convention == "torch":
            ema_update(self.renorm_mean, mean, k)
            ema_update(self.renorm_std, std, k)
        else:
            self.renorm_mean[...] = self.renorm_mean.astype(_F64) * k + mean * (1.0 - k)
            self.renorm_std[...] = self.renorm_std.astype(_F64) * k + std * (1.0 - k)

    # ----------------------------------------------------------------------------------- backward
    def _saved_dy(self, dy) -> tuple[_Saved, np.ndarray]:
        """What the last forward saved, and dy checked against its input (shape and dtype)."""
        s = self._saved
        if s is None:
            raise RuntimeError("backward() needs a forward() first: nothing is saved (each forward() is "
                               "consumed by one backward())")
        dy = as_input(dy, "dy")
        if dy.shape != s.x.shape:
            raise ValueError(f"dy must have the shape of the last forward's input {s.x.shape}, got {dy.shape}")
        return s, like_x(dy, "dy", s.x)

    def backward(self, dy) -> np.ndarray:
        """Gradient of the last forward: returns dx; stores ``dgamma``, ``dbeta`` (and ``d_residual``).

        dy : array of the forward output's shape and dtype. Training-mode forward: the full batch-norm
        gradient (statistics depend on x; per virtual batch with ghost batches; renorm's r and d are
        constants); eval-mode forward: ``dx = dy * gamma / sqrt(running_var + eps)``. With ReLU, dy is
        masked by ``y > 0`` inside the kernels. Each forward is consumed by one backward.
        """
        s, dy = self._saved_dy(dy)
        parts = []
        if s.groups is None:
            g = s.gamma if s.r is None else s.gamma * s.r[0]
            o = backward_core(dy, s.x, s.y, s.axis, s.mean[0], s.invstd[0], g, None, s.residual, None, s.frozen)
            dx, dres = o.dx, o.dresidual
            parts.append((0, o))
        else:
            lay = resolve_layout(s.x, s.axis)
            dx = lay.empty(s.x.dtype)
            dres = lay.empty(s.x.dtype) if s.residual else None
            for i, sl in enumerate(s.groups):
                g = s.gamma if s.r is None else s.gamma * s.r[i]
                o = backward_core(dy[sl], s.x[sl], None if s.y is None else s.y[sl], s.axis, s.mean[i],
                                  s.invstd[i], g, dx[sl], s.residual, None if dres is None else dres[sl],
                                  s.frozen)
                parts.append((i, o))
        dgamma = np.zeros(self.num_features)
        dbeta = np.zeros(self.num_features)
        for i, o in parts:
            # y = gamma * (xhat * r + d) + beta: dgamma = r * sum(g * xhat) + d * sum(g)
            dgamma += o.dgamma if s.r is None else s.r[i] * o.dgamma + s.d[i] * o.dbeta
            dbeta += o.dbeta
        self.dgamma = None if self.gamma is None else dgamma.astype(self.dtype)
        self.dbeta = None if self.beta is None else dbeta.astype(self.dtype)
        self.d_residual = dres
        self._saved = None
        return dx

    # -------------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """Copies of the state under PyTorch's key names (what ``nn.BatchNorm*d.state_dict()`` has).

        weight (gamma), bias (beta), running_mean, running_var, num_batches_tracked (0-d int64), each
        present as in PyTorch (no weight/bias without them, no running statistics without tracking);
        renorm adds renorm_mean and renorm_std (and moving_std in the Keras convention).
        """
        d = {}
        if self.gamma is not None:
            d["weight"] = self.gamma.copy()
        if self.beta is not None:
            d["bias"] = self.beta.copy()
        if self.track_running_stats:
            d["running_mean"] = self.running_mean.copy()
            d["running_var"] = self.running_var.copy()
            d["num_batches_tracked"] = np.array(self.num_batches_tracked, np.int64)
        if self.renorm:
            d["renorm_mean"] = self.renorm_mean.copy()
            d["renorm_std"] = self.renorm_std.copy()
            if self.moving_std is not None:
                d["moving_std"] = self.moving_std.copy()
        return d

    def load_state_dict(self, state_dict, strict: bool = True) -> None:
        """Load a state saved by :meth:`state_dict` or by a PyTorch ``nn.BatchNorm*d`` (tensors accepted).

        Values are cast to the layer's dtype. With ``strict`` the keys must match exactly; all values are
        checked before any is stored. A Keras-convention renorm layer given no ``moving_std`` derives it
        from running_var as ``sqrt(running_var + eps)``.
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = list(self.state_dict())
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict keys do not match: missing {missing}, unexpected {unexpected}")
        new = {}
        for k in expected:
            if k not in state_dict:
                continue
            v = _to_numpy(state_dict[k])
            if k == "num_batches_tracked":
                if v.size != 1 or v.dtype.kind not in "iuf" or v.reshape(-1)[0] != int(v.reshape(-1)[0]):
                    raise ValueError(f"state_dict['num_batches_tracked'] must be one integer, got {v!r}")
                new[k] = int(v.reshape(-1)[0])
                continue
            if v.dtype.kind not in "iuf":
                raise TypeError(f"state_dict[{k!r}] must be numeric, got dtype {v.dtype}")
            if v.shape != (self.num_features,):
                raise ValueError(f"state_dict[{k!r}] must have shape ({self.num_features},), got {v.shape}")
            new[k] = v
        attr = {"weight": "gamma", "bias": "beta"}
        for k, v in new.items():
            if k == "num_batches_tracked":
                self.num_batches_tracked = v
            else:
                getattr(self, attr.get(k, k))[...] = v
        if self.moving_std is not None and "moving_std" not in new and "running_var" in new:
            self.moving_std[...] = np.sqrt(self.running_var.astype(_F64) + self.eps)
