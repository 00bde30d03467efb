"""The one registry of cases (kernel x layout x shape x dtype) shared by the tests, pytest-benchmark,
asv and ``python -m fastbn bench``.

A :class:`Case` knows how to build its inputs (deterministic, pre-touched), how to call fastbn on them
(allocating or with ``out=``), how to call PyTorch's kernel on the same memory (``.out`` into the same
output buffer, and allocating), and what its physical bound is made of: the bytes the operation must write
and read once (training/inference forward read x and write y; backward reads x and dy and writes dx),
plus the extra reads its layout forces (see :attr:`Case.extra_reads`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import numpy as np

KERNELS = ("train", "infer", "backward")
LAYOUTS = ("NCHW", "NHWC", "NC")  # channels-first (axis=1), channels-last (axis=-1), dense (N, C)

# logical shapes (N, C, *spatial); NHWC cases use the same sizes channels-last
BENCH_SHAPES = {
    "NC": [(256, 1024)],
    "NCHW": [(32, 64, 56, 56), (64, 128, 56, 56), (8, 256, 14, 14), (32, 512, 7, 7), (4, 8, 4, 4)],
}
BENCH_SHAPES["NHWC"] = BENCH_SHAPES["NCHW"]
# float64 runs on these (besides float32 everywhere)
FLOAT64_SHAPES = {(256, 1024), (8, 256, 14, 14), (32, 64, 56, 56), (64, 128, 56, 56)}
OUT_OF_L3_SHAPE = (64, 128, 56, 56)
TINY_SHAPE = (4, 8, 4, 4)
# shapes the quick benchmark run keeps
QUICK_SHAPES = {(256, 1024), (32, 64, 56, 56), (4, 8, 4, 4)}
# 2-byte dtypes (computed in float32; bfloat16 arrays are ml_dtypes'), on the out-of-L3 shape and one
# in-cache shape, channels-first and channels-last; PyTorch runs them with float32 parameters
HALF_DTYPES = ("float16", "bfloat16")
HALF_SHAPES = {OUT_OF_L3_SHAPE, (8, 256, 14, 14)}


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a case's dtype name (bfloat16: ``ml_dtypes.bfloat16``, imported here only).

    Example
    -------
    >>> from fastbn.cases import np_dtype
    >>> np_dtype("float16"), np_dtype("float16").itemsize
    (dtype('float16'), 2)
    """
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def have_bfloat16() -> bool:
    """Whether bfloat16 NumPy arrays can be made here (``ml_dtypes``: ``pip install "fastbn[bf16]"``).

    Example
    -------
    >>> import importlib.util
    >>> from fastbn.cases import have_bfloat16
    >>> have_bfloat16() == (importlib.util.find_spec("ml_dtypes") is not None)
    True
    """
    return importlib.util.find_spec("ml_dtypes") is not None


@dataclass(frozen=True)
class Case:
    """One benchmark or test case: ``kernel`` ("train", "infer" or "backward"), ``layout`` ("NCHW":
    channels-first, axis=1; "NHWC": channels-last, axis=-1; "NC": dense), the logical ``shape``
    (N, C, *spatial) whatever the layout, and the ``dtype`` name ("float32", "float64", "float16" or
    "bfloat16": ml_dtypes' NumPy arrays, 2 bytes a value, computed in float32).

    Example
    -------
    >>> import numpy as np
    >>> from fastbn.cases import Case
    >>> c = Case("train", "NHWC", (4, 8, 4, 4), "float32")      # stored channels-last: (N, H, W, C)
    >>> c.id, c.array_shape, c.axis, c.kernel_shape, c.min_bytes
    ('train-NHWC-4x8x4x4-float32', (4, 4, 4, 8), -1, (64, 8, 1), 4096)
    >>> inp = c.make_inputs()                                   # deterministic (seed 0)
    >>> inp["x"].shape, inp["x"].dtype.name, inp["gamma"].shape, inp["gamma"].dtype.name
    ((4, 4, 4, 8), 'float32', (8,), 'float64')
    >>> y = c.runner(inp, use_out=True)().y                     # fastbn, writing into inp["out"]
    >>> y is inp["out"], bool(np.allclose(y, c.numpy_runner(inp)(), atol=1e-5))
    (True, True)
    """

    kernel: str
    layout: str
    shape: tuple  # logical (N, C, *spatial)
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.kernel}-{self.layout}-{'x'.join(map(str, self.shape))}-{self.dtype}"

    @property
    def axis(self) -> int:
        return -1 if self.layout == "NHWC" else 1

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def array_shape(self) -> tuple:
        if self.layout == "NHWC":
            return (self.shape[0], *self.shape[2:], self.shape[1])
        return tuple(self.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def half(self) -> bool:
        return self.dtype in HALF_DTYPES

    @property
    def itemsize(self) -> int:
        return 2 if self.half else np.dtype(self.dtype).itemsize

    @property
    def min_bytes(self) -> int:
        """Bytes the operation must move at minimum: each input read once, each output written once."""
        arrays = 3 if self.kernel == "backward" else 2
        return arrays * self.numel * self.itemsize

    @property
    def extra_reads(self) -> tuple:
        """Inputs the layout forces to be read a second time: a channel's statistics (or gradient sums)
        need all its values before any output can be written, and where a channel's values do not fit
        in one core's cache (channels-last: every row holds every channel; channels-first with fewer
        than 16 channels: a channel is split over threads) the output pass reads them again."""
        if self.kernel == "infer":
            return ()
        from fastbn._kernels.plan import layout_of

        A, C, B = self.kernel_shape
        cl, owned, _ = layout_of(A, C, B)
        if not (cl or not owned):
            return ()
        return ("x",) if self.kernel == "train" else ("x", "dy")

    @property
    def kernel_shape(self) -> tuple:
        """The (A, C, B) view the kernels see."""
        N, C = self.shape[0], self.shape[1]
        rest = int(np.prod(self.shape[2:], dtype=np.int64))
        if self.layout == "NHWC" or len(self.shape) == 2:
            return (N * rest, C, 1)
        return (N, C, rest)

    def make_inputs(self, seed: int = 0) -> dict:
        """Deterministic inputs with non-trivial statistics; output buffers are pre-touched."""
        rng = np.random.default_rng(seed)
        C = self.channels
        dt = np_dtype(self.dtype)
        x = (rng.standard_normal(self.array_shape, dtype=np.float32) * 2.0 + 0.5).astype(dt)
        inp = {
            "x": x,
            "gamma": rng.uniform(0.5, 1.5, C),
            "beta": rng.uniform(-0.5, 0.5, C),
            "running_mean": rng.uniform(-0.1, 0.1, C),
            "running_var": rng.uniform(0.5, 2.0, C),
            "out": np.zeros_like(x),
        }
        if self.kernel == "backward":
            inp["dy"] = rng.standard_normal(self.array_shape, dtype=np.float32).astype(dt)
            xd = x.astype(np.float64)
            red = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
            inp["mean"] = xd.mean(axis=red)
            inp["invstd"] = 1.0 / np.sqrt(xd.var(axis=red) + 1e-5)
        return inp

    def runner(self, inp: dict, *, use_out: bool) -> Callable[[], object]:
        """A zero-argument callable running fastbn on ``inp`` (running stats are updated in place)."""
        import fastbn

        out = inp["out"] if use_out else None
        ax = self.axis
        x = inp["x"]
        if self.kernel == "train":
            rm, rv, g, b = inp["running_mean"], inp["running_var"], inp["gamma"], inp["beta"]
            return lambda: fastbn.batch_norm_train(x, g, b, axis=ax, running_mean=rm, running_var=rv, out=out)
        if self.kernel == "infer":
            rm, rv, g, b = inp["running_mean"], inp["running_var"], inp["gamma"], inp["beta"]
            return lambda: fastbn.batch_norm_infer(x, rm, rv, g, b, axis=ax, out=out)
        dy, m, s, g = inp["dy"], inp["mean"], inp["invstd"], inp["gamma"]
        return lambda: fastbn.batch_norm_backward(dy, x, m, s, g, axis=ax, out=out)

    def _torch_views(self, inp: dict) -> dict:
        """The inputs as torch tensors on the same memory (NHWC: NCHW tensors in channels_last format);
        per-channel tensors in x's dtype, float32 for 2-byte x (as torch's mixed-precision BN takes them)."""
        import torch

        def view(a):
            if self.dtype == "bfloat16":  # no NumPy dtype in torch: its bits
                t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(a)
            return t.movedim(-1, 1) if self.layout == "NHWC" else t

        td = torch.float32 if self.half else view(inp["x"]).dtype
        v = {"x": view(inp["x"]), "out": view(inp["out"])}
        for k in ("gamma", "beta", "running_mean", "running_var"):
            v[k] = torch.from_numpy(inp[k]).to(td)
        if self.kernel == "backward":
            v["dy"] = view(inp["dy"])
            v["mean"] = torch.from_numpy(inp["mean"]).to(td)
            v["invstd"] = torch.from_numpy(inp["invstd"]).to(td)
            v["dw"] = torch.empty_like(v["gamma"])
            v["db"] = torch.empty_like(v["gamma"])
        v["save_mean"] = torch.empty_like(v["gamma"])
        v["save_invstd"] = torch.empty_like(v["gamma"])
        return v

    def torch_runner(self, inp: dict) -> Callable[[], object]:
        """PyTorch's public API, allocating (``F.batch_norm``; the backward's op, as autograd runs it)."""
        import torch
        import torch.nn.functional as F

        v = self._torch_views(inp)
        x, g, b, rm, rv = v["x"], v["gamma"], v["beta"], v["running_mean"], v["running_var"]
        if self.kernel == "train":
            return lambda: F.batch_norm(x, rm, rv, g, b, training=True, momentum=0.1, eps=1e-5)
        if self.kernel == "infer":
            return lambda: F.batch_norm(x, rm, rv, g, b, training=False, eps=1e-5)
        dy, mean, invstd = v["dy"], v["mean"], v["invstd"]
        return lambda: torch.ops.aten.native_batch_norm_backward(dy, x, g, rm, rv, mean, invstd, True, 1e-5,
                                                                  [True, True, True])

    def torch_kernels(self, inp: dict) -> dict:
        """PyTorch's kernel: ``{"out": writes into the case's output buffer, "alloc": allocates}``.

        ``torch.ops.aten.native_batch_norm(.out)`` / ``native_batch_norm_backward(.out)``, the ops behind
        ``F.batch_norm`` and autograd; the ``.out`` form writes into the same memory as fastbn's ``out=``.
        """
        import torch

        v = self._torch_views(inp)
        aten = torch.ops.aten
        x, g, b, rm, rv, y = v["x"], v["gamma"], v["beta"], v["running_mean"], v["running_var"], v["out"]
        sm, si = v["save_mean"], v["save_invstd"]
        if self.kernel in ("train", "infer"):
            training = self.kernel == "train"
            return {
                "out": lambda: aten.native_batch_norm.out(x, g, b, rm, rv, training, 0.1, 1e-5, out=y,
                                                          save_mean=sm, save_invstd=si),
                "alloc": lambda: aten.native_batch_norm(x, g, b, rm, rv, training, 0.1, 1e-5),
            }
        dy, mean, invstd, dw, db = v["dy"], v["mean"], v["invstd"], v["dw"], v["db"]
        mask = [True, True, True]
        return {
            "out": lambda: aten.native_batch_norm_backward.out(dy, x, g, rm, rv, mean, invstd, True, 1e-5, mask,
                                                               out0=y, out1=dw, out2=db),
            "alloc": lambda: aten.native_batch_norm_backward(dy, x, g, rm, rv, mean, invstd, True, 1e-5, mask),
        }

    def numpy_runner(self, inp: dict) -> Callable[[], object]:
        """A plain NumPy implementation of the same operation (vectorized, float64 statistics)."""
        x = inp["x"]
        red = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
        shp = [1] * x.ndim
        shp[self.axis % x.ndim] = self.channels
        g = inp["gamma"].reshape(shp)
        b = inp["beta"].reshape(shp)
        if self.kernel == "train":
            def run():
                m = x.mean(axis=red, dtype=np.float64).reshape(shp)
                v = ((x - m) ** 2).mean(axis=red).reshape(shp)
                return ((x - m) / np.sqrt(v + 1e-5) * g + b).astype(x.dtype)
            return run
        if self.kernel == "infer":
            a = g / np.sqrt(inp["running_var"].reshape(shp) + 1e-5)
            m = inp["running_mean"].reshape(shp)
            return lambda: ((x - m) * a + b).astype(x.dtype)
        dy = inp["dy"]
        m = inp["mean"].reshape(shp)
        s = inp["invstd"].reshape(shp)
        n = x.size // self.channels

        def run_bwd():
            xh = (x - m) * s
            db = dy.sum(axis=red, dtype=np.float64).reshape(shp)
            dg = (dy * xh).sum(axis=red, dtype=np.float64).reshape(shp)
            return (g * s * (dy - db / n - xh * dg / n)).astype(x.dtype)
        return run_bwd


def bench_cases(*, quick: bool = False, kernels=KERNELS, layouts=LAYOUTS) -> list[Case]:
    """The benchmark matrix: every kernel x layout x shape in float32, float64 on FLOAT64_SHAPES,
    float16 and bfloat16 (when ml_dtypes is installed) on HALF_SHAPES.

    ``quick``: only the shapes in QUICK_SHAPES; ``kernels``, ``layouts``: tuples of names to keep.

    Example
    -------
    >>> from fastbn.cases import bench_cases
    >>> for c in bench_cases(quick=True, kernels=("train",), layouts=("NC",)):
    ...     print(c.id)
    train-NC-256x1024-float32
    train-NC-256x1024-float64
    >>> for c in bench_cases(kernels=("infer",), layouts=("NCHW",)):
    ...     if c.dtype == "float16":
    ...         print(c.id)
    infer-NCHW-64x128x56x56-float16
    infer-NCHW-8x256x14x14-float16
    """
    dtypes = ("float32", "float64", "float16") + (("bfloat16",) if have_bfloat16() else ())
    cases = []
    for kernel in kernels:
        for layout in layouts:
            for shape in BENCH_SHAPES[layout]:
                if quick and shape not in QUICK_SHAPES:
                    continue
                for dtype in dtypes:
                    if dtype == "float64" and shape not in FLOAT64_SHAPES:
                        continue
                    if dtype in HALF_DTYPES and shape not in HALF_SHAPES:
                        continue
                    cases.append(Case(kernel, layout, shape, dtype))
    return cases


def test_cases() -> list[Case]:
    """Small cases with the same kernels, layouts and dtypes (and 1-D/3-D spatial), for the unit tests.

    Example
    -------
    >>> from fastbn.cases import test_cases
    >>> cases = test_cases()
    >>> sorted({c.kernel for c in cases}), sorted({c.layout for c in cases}), sorted({c.dtype for c in cases})
    (['backward', 'infer', 'train'], ['NC', 'NCHW', 'NHWC'], ['float32', 'float64'])
    >>> sorted({len(c.shape) for c in cases})                   # (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W)
    [2, 3, 4, 5]
    """
    shapes = {
        # (3000, 24), (64, 4, 300) and (20, 16, 2000) span several reduction chunks; (64, 4, 300)
        # channels-first takes the split-channel path (C < 16)
        "NC": [(64, 24), (7, 3), (3000, 24)],
        "NCHW": [(4, 6, 5, 7), (3, 40, 3, 3), (2, 5, 3, 4, 6), (5, 3, 11), (64, 4, 300), (20, 16, 2000)],
    }
    shapes["NHWC"] = shapes["NCHW"]
    return [Case(k, lay, s, dt) for k in KERNELS for lay in LAYOUTS for s in shapes[lay]
            for dt in ("float32", "float64")]


test_cases.__test__ = False  # not a pytest test
