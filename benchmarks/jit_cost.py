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


def timeraw_first_call_cold_compile():
    """Import + first training forward with an empty Numba cache: compiles the float32 serial kernel."""
    return (
        "import numpy as np, fastbn\n"
        "fastbn.batch_norm_train(np.ones((4, 8, 16), np.float32))\n"
    ), (
        "import os, tempfile\n"
        "os.environ['NUMBA_CACHE_DIR'] = tempfile.mkdtemp()\n"
    )


timeraw_first_call_cold_compile.repeat = 1
timeraw_first_call_cold_compile.number = 1
timeraw_first_call_cold_compile.timeout = 600


def timeraw_first_call_cached():
    """Import + first training forward in a fresh process whose on-disk cache is warm (loads, no compile)."""
    code = "import numpy as np, fastbn; fastbn.batch_norm_train(np.ones((4, 8, 16), np.float32))"
    setup = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}], check=True)"
    return code, setup
