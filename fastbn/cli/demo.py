"""``python -m fastbn demo``: a training forward + backward and an inference forward on a sample batch,
checked against a float64 NumPy reference, with timings."""
from __future__ import annotations

import argparse
import math
import time

import numpy as np


def _shape(text: str) -> tuple:
    """``--shape``: comma-separated positive integers N,C[,spatial...] with more than one value per channel."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers N,C[,H,W...], got {text!r}"
                                         ) from None
    if len(shape) < 2:
        raise argparse.ArgumentTypeError(f"expected at least N,C (two sizes), got {text!r}")
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    if math.prod(shape) // shape[1] < 2:  # N * H * W values per channel
        raise argparse.ArgumentTypeError("training needs more than 1 value per channel (N x H x W >= 2), "
                                         f"got {text!r}")
    return shape


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``demo`` subcommand's options: ``--shape N,C[,spatial...]`` (the NCHW batch),
    ``--dtype`` (float32 or float64), ``--repeat`` (timed calls per kernel).

    Example
    -------
    >>> import argparse
    >>> from fastbn.cli import demo
    >>> p = argparse.ArgumentParser(prog="python -m fastbn demo")
    >>> demo.add_arguments(p)
    >>> args = p.parse_args(["--shape", "4,8,4,4", "--repeat", "3"])
    >>> args.shape, args.dtype, args.repeat
    ((4, 8, 4, 4), 'float32', 3)
    """
    p.add_argument("--shape", type=_shape, default=(32, 64, 28, 28),
                   help="N,C,H,W of the sample batch (default 32,64,28,28; any number of spatial sizes)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=_positive_int, default=20, help="timed repeats per kernel (median reported)")


def _reference(x, dy, axis):
    """float64 NumPy reference: y, mean, invstd, dx, dgamma, dbeta."""
    xd = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    dyd = np.moveaxis(dy.astype(np.float64), axis, -1).reshape(xd.shape)
    n = xd.shape[0]
    mean = xd.mean(0)
    invstd = 1 / np.sqrt(((xd - mean) ** 2).mean(0) + 1e-5)
    xh = (xd - mean) * invstd
    db = dyd.sum(0)
    dg = (dyd * xh).sum(0)
    dx = invstd * (dyd - db / n - xh * dg / n)
    back = lambda a: np.moveaxis(a.reshape(*np.moveaxis(x, axis, -1).shape), -1, axis)
    return back(xh), mean, invstd, back(dx), dg, db


def _median_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def run(args) -> int:
    """Run the demo (``python -m fastbn demo``): on a random batch of ``args.shape`` (NCHW, and its
    channels-last copy) in ``args.dtype``, a training forward, backward and inference forward, checked
    against a float64 NumPy reference and timed. Returns 0 when every check passes, else 1.

    Example
    -------
    >>> import argparse
    >>> from fastbn.cli import demo
    >>> p = argparse.ArgumentParser(prog="python -m fastbn demo")
    >>> demo.add_arguments(p)
    >>> demo.run(p.parse_args(["--shape", "4,8,4,4", "--repeat", "3"]))      # doctest: +ELLIPSIS
    fastbn ... demo: batch (4, 8, 4, 4) float32 (0.0 MiB), ... threads, numba ...
    <BLANKLINE>
    NCHW (axis=1)   shape (4, 8, 4, 4)
    ...-> OK (tolerance 1e-05)
    <BLANKLINE>
    NHWC (axis=-1)  shape (4, 4, 4, 8)
    ...-> OK (tolerance 1e-05)
    <BLANKLINE>
    result: all checks passed
    0
    """
    import numba

    import fastbn

    shape = args.shape
    rng = np.random.default_rng(0)
    x_nchw = rng.normal(3.0, 2.0, shape).astype(args.dtype)
    dy_nchw = rng.normal(size=shape).astype(args.dtype)
    tol = 1e-5 if args.dtype == "float32" else 1e-12
    mib = x_nchw.nbytes / 2**20
    print(f"fastbn {fastbn.__version__} demo: batch {shape} {args.dtype} ({mib:.1f} MiB), "
          f"{numba.get_num_threads()} threads, numba {numba.__version__}")
    ok = True
    for name, axis, x, dy in [("NCHW (axis=1) ", 1, x_nchw, dy_nchw),
                              ("NHWC (axis=-1)", -1, np.ascontiguousarray(np.moveaxis(x_nchw, 1, -1)),
                               np.ascontiguousarray(np.moveaxis(dy_nchw, 1, -1)))]:
        C = x.shape[axis]
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        t0 = time.perf_counter()
        y, mean, invstd = fastbn.batch_norm_train(x, axis=axis, running_mean=rm, running_var=rv)
        dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)
        yi = fastbn.batch_norm_infer(x, mean, 1 / invstd**2 - 1e-5, axis=axis)
        first = time.perf_counter() - t0
        out, dxo = np.empty_like(x), np.empty_like(x)
        t_train = _median_ms(lambda: fastbn.batch_norm_train(x, axis=axis, out=out), args.repeat)
        t_back = _median_ms(lambda: fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, out=dxo), args.repeat)
        t_inf = _median_ms(lambda: fastbn.batch_norm_infer(x, mean, 1 / invstd**2, axis=axis, out=out), args.repeat)
        t0 = time.perf_counter()
        ry, rmean, rinv, rdx, rdg, rdb = _reference(x, dy, axis)
        t_ref = 1e3 * (time.perf_counter() - t0)
        errs = {
            "y": np.abs(y - ry).max() / np.abs(ry).max(),
            "mean": np.abs(mean - rmean).max() / np.abs(rmean).max(),
            "invstd": np.abs(invstd - rinv).max() / np.abs(rinv).max(),
            "dx": np.abs(dx - rdx).max() / np.abs(rdx).max(),
            "dgamma": np.abs(dgamma - rdg).max() / np.abs(rdg).max(),
            "dbeta": np.abs(dbeta - rdb).max() / np.abs(rdb).max(),
            "y (infer)": np.abs(yi - ry).max() / np.abs(ry).max(),
        }
        worst = max(errs.values())
        ok &= worst <= tol
        print(f"\n{name}  shape {x.shape}")
        print(f"  first call (compile or load from Numba's cache): {first:.2f} s")
        print(f"  training forward {t_train:7.2f} ms | backward {t_back:7.2f} ms | inference {t_inf:7.2f} ms"
              f"   (NumPy float64 reference, forward+backward once: {t_ref:.0f} ms)")
        print(f"  batch mean of channel 0: {mean[0]:.5f}, std: {1 / invstd[0]:.5f}; "
              f"running_mean[0] after one step: {rm[0]:.5f}")
        print("  max relative error vs float64 NumPy reference: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
              + f"  -> {'OK' if worst <= tol else 'FAIL'} (tolerance {tol:.0e})")
    print("\nresult:", "all checks passed" if ok else "CHECK FAILED")
    return 0 if ok else 1
