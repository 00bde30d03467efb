"""Compile every kernel variant ahead of use (``python -m fastbn warmup``), for images built once and run
read-only with no compile at start.

A variant (see ``fastbn._jit.Kernel``) is a kernel compiled for one dtype, parallel or serial, one layout
(channels-last; channels-first with many or few channels, long or short rows) and one set of flags (ReLU,
residual, renorm, the backward's residual gradient, streaming stores). Each is compiled by running it once
on a small input of its layout, which also writes it to Numba's on-disk cache.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

# layout name -> ((CL, OWNED, SHORT), a small (A, C, B) shape with that layout)
LAYOUTS = {
    "cl": ((True, False, False), (64, 8, 1)),
    "cf-long": ((False, True, False), (2, 16, 256)),
    "cf-short": ((False, True, True), (2, 16, 8)),
    "cf-few-long": ((False, False, False), (65, 2, 256)),
    "cf-few-short": ((False, False, True), (2049, 2, 8)),
}
# kernel -> its own flags, in the order of its Kernel (after CL, OWNED, SHORT)
KERNEL_FLAGS = {
    "train": ("RELU", "HAS_RES", "RENORM", "STREAM"),
    "normalize": ("RELU", "HAS_RES", "STREAM"),
    "backward": ("RELU", "WRITE_D", "STREAM"),
    "stats": (),
    "grad_sums": ("RELU",),
    "input_grad": ("RELU", "WRITE_D", "STREAM"),
}
DTYPES = ("float32", "float64")
# 2-byte inputs, compiled on request (``--dtypes float16,bfloat16``): the kernels take them as the integer
# arrays of their bits (``fastbn/_kernels/half.py``), so warming them needs no ml_dtypes
HALF_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    parallel: bool
    layout: str
    flags: tuple  # values for KERNEL_FLAGS[kernel]

    def __str__(self) -> str:
        on = [f.lower() for f, v in zip(KERNEL_FLAGS[self.kernel], self.flags) if v]
        return (f"{self.kernel} {self.dtype} {'parallel' if self.parallel else 'serial'} {self.layout}"
                + (f" +{'+'.join(on)}" if on else ""))


def variants(kernels=tuple(KERNEL_FLAGS), dtypes=DTYPES, layouts=tuple(LAYOUTS), plain: bool = False
             ) -> Iterator[Variant]:
    """Every variant a user can reach (``plain``: only those without fused flags, what the functional
    API and the plain layer use). Streaming stores exist only for the layouts that use them."""
    for kernel, dtype, layout, parallel in itertools.product(kernels, dtypes, layouts, (True, False)):
        names = KERNEL_FLAGS[kernel]
        for values in itertools.product((False, True), repeat=len(names)):
            flags = dict(zip(names, values))
            if plain and any(v for f, v in flags.items() if f != "STREAM"):
                continue
            if flags.get("STREAM") and LAYOUTS[layout][0][2]:
                continue  # short channels-first rows never stream (plan.streams)
            yield Variant(kernel, dtype, parallel, layout, values)


def _args(v: Variant) -> tuple:
    """Arguments of the types fastbn._run passes, on a small input of the variant's layout."""
    (_, _, _), (A, C, B) = LAYOUTS[v.layout]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((A, C, B))
    if v.dtype == "float16":  # the bits of 2-byte floats, as fastbn._run passes them
        x = x.astype(np.float16).view(np.uint16)
    elif v.dtype == "bfloat16":  # (the upper half of a float32)
        x = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
    else:
        x = x.astype(v.dtype)
    y = np.empty_like(x)
    ones, zeros = np.ones(C), np.zeros(C)
    nth = 2 if v.parallel else 1
    if v.kernel == "train":
        return (nth, x, x.copy(), y, ones, zeros, 1e-5, ones, ones, np.array([0.0, np.inf, np.inf]),
                np.empty((5, C)), 0, C)
    if v.kernel == "normalize":
        return (nth, x, x.copy(), y, zeros, ones, ones, zeros, 1e-5, True, 0, C)
    if v.kernel == "backward":
        return (nth, x.copy(), x, x.copy(), y, np.empty_like(x), zeros, ones, ones, False, np.empty((2, C)), 0, C)
    if v.kernel == "stats":
        return (nth, x, np.empty((2, C)), 0, C)
    if v.kernel == "grad_sums":
        return (nth, x.copy(), x, x.copy(), zeros, np.empty((2, C)), 0, C)
    return (nth, x.copy(), x, x.copy(), y, np.empty_like(x), np.ones((4, C)), 0, C)


def compile_variant(v: Variant) -> None:
    from fastbn._kernels import entries

    kern = getattr(entries, v.kernel)
    flags = dict(zip(("CL", "OWNED", "SHORT"), LAYOUTS[v.layout][0]))
    flags.update(zip(KERNEL_FLAGS[v.kernel], v.flags))
    kern.get(v.parallel, **flags)(*_args(v))


def compile_helpers(dtypes=DTYPES) -> None:
    """The small helpers the Python side calls directly (the running-statistics update)."""
    from fastbn._run import _ema, _ema_pair

    # the running statistics' dtypes: half inputs' are float32 (or float64), never 2-byte
    for dt in sorted({d if d in DTYPES else "float32" for d in dtypes}):
        _ema(np.zeros(2, dt), np.zeros(2), 0.1, 1.0)
        _ema_pair(np.zeros(2, dt), np.zeros(2, dt), np.zeros(2), np.zeros(2), 0.1, 1.0)


def compile_numba_api(dtypes=DTYPES) -> None:
    """fastbn.kernels' wrappers for Numba code (each builds every layout's variant)."""
    from fastbn import kernels

    for dt in (d for d in dtypes if d in DTYPES):  # (it takes float32 and float64 only)
        x = np.ones((2, 3, 4), dt)
        y = np.empty_like(x)
        c = np.ones(3)
        for par in (True, False):
            tf = kernels.train_forward if par else kernels.train_forward_serial
            inf = kernels.infer_forward if par else kernels.infer_forward_serial
            bw = kernels.backward if par else kernels.backward_serial
            tf(x, c, c, 1e-5, y, np.empty(3), np.empty(3), np.empty(3), np.empty(3), 0.1, False)
            inf(x, c, c, c, c, 1e-5, y)
            bw(x, x, c, c, c, y, np.empty(3), np.empty(3), False)


def warm(selected: list[Variant], progress: Callable[[int, int, Variant, float], None] | None = None) -> float:
    """Compile (or load) every selected variant; returns the seconds taken."""
    t0 = time.perf_counter()
    for i, v in enumerate(selected, 1):
        t = time.perf_counter()
        compile_variant(v)
        if progress is not None:
            progress(i, len(selected), v, time.perf_counter() - t)
    return time.perf_counter() - t0
