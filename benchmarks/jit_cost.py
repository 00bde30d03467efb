"""Import time and JIT compile time, each in a fresh interpreter (asv ``timeraw_`` / ``track_``)."""
import statistics
import subprocess
import sys

# Import cost, as CPU time inside fresh interpreters. A ``timeraw_`` wall-clock benchmark of the import
# swung 295 -> 175 ms between two runs of the same code on this shared 2-core machine (a process that
# waits for a core is charged for the wait); the process's own CPU time (``time.process_time``, as
# ``-X importtime`` measures in-process) does not count that wait, and the median over
# ``_IMPORT_RUNS`` fresh interpreters drops the remaining outliers.
_IMPORT_RUNS = 11
_IMPORT_FASTBN = "import fastbn; fastbn.batch_norm_train"  # the functional API: imports numba
_IMPORT_BASELINE = "import numpy, numba"  # what fastbn needs anyway


def _import_cpu_ms(stmt: str) -> float:
    code = f"import time; t0 = time.process_time(); {stmt}; print(time.process_time() - t0)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return 1e3 * float(out.split()[-1])


def _import_medians() -> tuple[float, float]:
    own, base = [], []
    for _ in range(_IMPORT_RUNS):  # interleaved, so a busy spell hits both alike
        own.append(_import_cpu_ms(_IMPORT_FASTBN))
        base.append(_import_cpu_ms(_IMPORT_BASELINE))
    return statistics.median(own), statistics.median(base)


def track_import_fastbn_cpu():
    """CPU ms of ``import fastbn`` + first use of a public name (imports numba; compiles nothing),
    median of 11 fresh interpreters."""
    return _import_medians()[0]


track_import_fastbn_cpu.unit = "ms"
track_import_fastbn_cpu.timeout = 300


def track_import_fastbn_over_numba():
    """The same, over the CPU time of ``import numpy, numba`` measured interleaved with it: fastbn's own
    share of the import (1.0 = nothing on top of its dependencies), independent of the machine's speed."""
    own, base = _import_medians()
    return own / base


track_import_fastbn_over_numba.unit = "ratio"
track_import_fastbn_over_numba.timeout = 300


# JIT cost: CPU seconds in fresh interpreters with every cache empty (a copy of the package without its
# __pycache__, an empty NUMBA_CACHE_DIR and HOME), median of 3 (the measure of issue 12's targets).
_JIT_RUNS = 3
_FIRST_CALLS = (
    "import time; t0 = time.process_time()\n"
    "import numpy as np, fastbn\n"
    "x = np.random.default_rng(0).normal(3.0, 2.0, (32, 64, 28, 28)).astype(np.float32)\n"
    "y, m, s = fastbn.batch_norm_train(x)\n"
    "fastbn.batch_norm_backward(np.ones_like(x), x, m, s)\n"
    "fastbn.batch_norm_infer(x, m, 1.0 / s**2 - 1e-5)\n"
    "t1 = time.process_time()\n"
    "bn = fastbn.BatchNorm(64)\n"
    "bn(x); bn.backward(np.ones_like(x)); bn.eval(); bn(x)\n"
    "print(t1 - t0, time.process_time() - t1)\n"
)


def _cold_cpu_s() -> tuple[float, float]:
    import pathlib
    import tempfile

    from fastbn._isolated import copy_package, fresh_env

    with tempfile.TemporaryDirectory() as d:
        site = copy_package(pathlib.Path(d) / "site")
        env = fresh_env(site, d, pathlib.Path(d) / "c")
        out = subprocess.run([sys.executable, "-c", _FIRST_CALLS], env=env, cwd=d, check=True,
                             capture_output=True, text=True).stdout
    first, layer = (float(v) for v in out.split()[-2:])
    return first, layer


def track_jit_cold_train_backward_infer_cpu():
    """CPU s of import + the first float32 training forward, backward and inference on a (32, 64, 28, 28)
    batch with every cache empty (target: at most 5 s), median of 3 fresh interpreters."""
    return statistics.median(_cold_cpu_s()[0] for _ in range(_JIT_RUNS))


track_jit_cold_train_backward_infer_cpu.unit = "s"
track_jit_cold_train_backward_infer_cpu.timeout = 900


def track_jit_layer_after_functional_cpu():
    """CPU s of the layer's first training forward, backward and eval forward right after the functional
    API's (they share compiled kernels: expected ~0), median of 3 fresh interpreters."""
    return statistics.median(_cold_cpu_s()[1] for _ in range(_JIT_RUNS))


track_jit_layer_after_functional_cpu.unit = "s"
track_jit_layer_after_functional_cpu.timeout = 900


def timeraw_first_call_cold_compile():
    """Import + first training forward of a small input (the serial variant) with every cache empty."""
    return (
        "import numpy as np, fastbn\n"
        "fastbn.batch_norm_train(np.ones((4, 8, 16), np.float32))\n"
    ), (
        "import os, sys, tempfile\n"
        "from fastbn._isolated import copy_package\n"
        "d = str(copy_package(tempfile.mkdtemp()))\n"
        "for m in [m for m in sys.modules if m.split('.')[0] == 'fastbn']: del sys.modules[m]\n"
        "sys.path.insert(0, d)\n"
        "os.environ['NUMBA_CACHE_DIR'] = tempfile.mkdtemp(); os.environ['HOME'] = d\n"
    )


timeraw_first_call_cold_compile.repeat = 1
timeraw_first_call_cold_compile.number = 1
timeraw_first_call_cold_compile.timeout = 600


def timeraw_first_call_cached():
    """Import + first training forward in a fresh process whose on-disk cache is warm (loads, no compile)."""
    code = "import numpy as np, fastbn; fastbn.batch_norm_train(np.ones((4, 8, 16), np.float32))"
    setup = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}], check=True)"
    return code, setup
