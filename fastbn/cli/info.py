"""``python -m fastbn info``: Numba version, threading layer, thread count, CPU features, cache dir."""
from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``info`` subcommand's options: it has none.

    Example
    -------
    >>> import argparse
    >>> from fastbn.cli import info
    >>> p = argparse.ArgumentParser(prog="python -m fastbn info")
    >>> info.add_arguments(p)
    >>> p.parse_args([])
    Namespace()
    """


def collect() -> dict:
    """What ``info`` reports, as a dict: versions (str), threading layer (str), thread counts (int),
    CPU name (str) and features (list of str), the kernels' cache directory (str). Compiles nothing.

    Example
    -------
    >>> import numba
    >>> from fastbn.cli.info import collect
    >>> env = collect()
    >>> sorted(env)
    ['NUMBA_NUM_THREADS', 'cache_dir', 'cpu', 'cpu_features', 'fastbn', 'num_threads', 'numba', 'numpy',
     'os_cpu_count', 'threading_layer', 'threading_layer_requested']
    >>> env["num_threads"] == numba.get_num_threads(), env["numba"] == numba.__version__
    (True, True)
    """
    import llvmlite.binding as llvm
    import numba
    import numpy as np

    import fastbn
    from fastbn import kernels

    # Numba picks the threading layer when it starts its thread pool, which get_num_threads() does
    # (numba/np/ufunc/parallel.py: _launch_threads loads the layer's library); that compiles nothing
    # (running a parallel kernel here used to compile one: 3.6 s with an empty cache).
    num_threads = numba.get_num_threads()
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not initialized"
    feats = llvm.get_host_cpu_features()
    wanted = ["avx512f", "avx512bw", "avx512vl", "avx2", "fma", "avx", "sse4.2", "neon", "sve"]
    cache = kernels.infer_forward._cache._cache_path
    return {
        "fastbn": fastbn.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "threading_layer": layer,
        "threading_layer_requested": numba.config.THREADING_LAYER,
        "num_threads": num_threads,
        "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS,
        "cpu": llvm.get_host_cpu_name(),
        "cpu_features": [f for f in wanted if feats.get(f, False)],
        "os_cpu_count": os.cpu_count(),
        "cache_dir": cache,
    }


def run(args) -> int:
    """Print :func:`collect`'s report, one ``name value`` line each; returns 0 (``python -m fastbn info``).

    Example
    -------
    >>> import argparse
    >>> from fastbn.cli import info
    >>> info.run(argparse.Namespace())                # doctest: +ELLIPSIS
    fastbn                     ...
    numba                      ...
    numpy                      ...
    threading_layer            ...
    0
    """
    info = collect()
    for k, v in info.items():
        if isinstance(v, list):
            v = " ".join(v)
        print(f"{k:26s} {v}")
    if info["threading_layer"] == "workqueue":
        print("note: workqueue layer in use (libgomp/tbb not found); parallel regions cost 25-90 us there, "
              "so small inputs run serial kernels")
    return 0
