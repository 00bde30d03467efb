"""``python -m fastbn warmup``: compile every kernel variant into Numba's on-disk cache ahead of use.

For container images: run it once at build time (``--cache-dir`` to choose where the cache goes), then run
the image read-only: the kernels load from the cache and nothing compiles at start. See the deployment
guide for a recipe. Exit status 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys


def _csv(choices: tuple, what: str):
    def parse(text: str) -> tuple:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {', '.join(choices)}"
                                             + (f"; got {', '.join(bad)}" if bad else ""))
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``warmup`` subcommand's options: comma-separated ``--dtypes``, ``--kernels`` and
    ``--layouts`` (default: all, float16 and bfloat16 on request), ``--plain``, ``--cache-dir DIR`` and
    ``--list``.

    Example
    -------
    >>> import argparse
    >>> from fastbn.cli import warmup
    >>> p = argparse.ArgumentParser(prog="python -m fastbn warmup")
    >>> warmup.add_arguments(p)
    >>> args = p.parse_args(["--dtypes", "float32", "--layouts", "cl,cf-short"])
    >>> args.dtypes, args.layouts, args.plain, args.cache_dir
    (('float32',), ('cl', 'cf-short'), False, None)
    """
    from fastbn._warmup import DTYPES, HALF_DTYPES, KERNEL_FLAGS, LAYOUTS

    p.add_argument("--dtypes", type=_csv(DTYPES + HALF_DTYPES, "--dtypes"), default=DTYPES,
                   help="dtypes to compile for (default: float32,float64; also float16, bfloat16)")
    p.add_argument("--kernels", type=_csv(tuple(KERNEL_FLAGS) + ("numba-api",), "--kernels"),
                   default=tuple(KERNEL_FLAGS) + ("numba-api",),
                   help="kernels (default: all, and numba-api: the fastbn.kernels wrappers for Numba code)")
    p.add_argument("--layouts", type=_csv(tuple(LAYOUTS), "--layouts"), default=tuple(LAYOUTS),
                   help="layouts (default: all)")
    p.add_argument("--plain", action="store_true",
                   help="only the variants without fused flags (ReLU, residual, renorm): what the functional "
                        "API and a plain layer use")
    p.add_argument("--cache-dir", metavar="DIR", help="write the cache here (sets NUMBA_CACHE_DIR); run the image "
                   "with NUMBA_CACHE_DIR=DIR too")
    p.add_argument("--list", action="store_true", help="list the variants and exit")


def run(args) -> int:
    """Compile the selected kernel variants into the on-disk cache (``--cache-dir``: into that directory,
    setting ``NUMBA_CACHE_DIR`` for this process), or with ``--list`` only list them. Returns 0, or 2 for
    a ``--cache-dir`` that cannot be created or written.

    Example
    -------
    With ``--list``, what ``python -m fastbn warmup --kernels train --dtypes float32 --layouts cl --plain``
    would compile (each variant takes seconds):

    >>> import argparse
    >>> from fastbn.cli import warmup
    >>> p = argparse.ArgumentParser(prog="python -m fastbn warmup")
    >>> warmup.add_arguments(p)
    >>> warmup.run(p.parse_args(["--kernels", "train", "--dtypes", "float32", "--layouts", "cl", "--plain",
    ...                          "--list"]))
    train float32 parallel cl
    train float32 parallel cl +stream
    train float32 serial cl
    train float32 serial cl +stream
    4 variants
    0
    """
    if args.cache_dir:
        path = os.path.abspath(args.cache_dir)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            print(f"fastbn warmup: cannot create --cache-dir {path}: {e.strerror}", file=sys.stderr)
            return 2
        if not os.access(path, os.W_OK):
            print(f"fastbn warmup: --cache-dir {path} is not writable", file=sys.stderr)
            return 2
        os.environ["NUMBA_CACHE_DIR"] = path
        from numba.core import config  # read by the cache locators, created with the kernels (below)

        config.CACHE_DIR = path
    from fastbn import _warmup

    kernels = [k for k in args.kernels if k != "numba-api"]
    selected = list(_warmup.variants(kernels, args.dtypes, args.layouts, args.plain))
    if args.list:
        for v in selected:
            print(v)
        print(f"{len(selected)} variants" + (" + the numba-api wrappers" if "numba-api" in args.kernels else ""))
        return 0
    tty = sys.stdout.isatty()

    def progress(i: int, n: int, v, seconds: float) -> None:
        line = f"[{i:4d}/{n}] {str(v):60s} {seconds:6.1f} s"
        print("\r" + line if tty else line, end="" if tty else "\n", flush=True)

    from fastbn._run import _ema  # noqa: F401  (the cache locators now see NUMBA_CACHE_DIR)

    print(f"fastbn warmup: {len(selected)} kernel variants"
          + (f", cache in {os.environ['NUMBA_CACHE_DIR']}" if args.cache_dir else ""), flush=True)
    total = _warmup.warm(selected, progress)
    _warmup.compile_helpers(args.dtypes)
    if "numba-api" in args.kernels:
        print(("\r" if tty else "") + "numba-api wrappers (every layout's variant)...", flush=True)
        _warmup.compile_numba_api(args.dtypes)
    if tty:
        print()
    print(f"done: {len(selected)} variants in {total:.0f} s")
    return 0
