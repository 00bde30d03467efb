"""Which compiled variant of a kernel runs a call: the one place that chooses ``.serial`` or ``.parallel``.

Every public function reaches the kernels through ``fastbn._run``, which calls
``call(kernel, flags, size, *args)`` here. The serial variant runs when

- the input is small (``size < SERIAL_MAX_ELEMS``): a parallel region costs more than it saves there;
- the calling thread has one Numba thread (``numba.set_num_threads(1)``);
- this process is a fork child of a process whose OpenMP (or TBB) thread pool was running: GNU OpenMP
  is not fork-safe (Numba terminates such a child with "fork() called from a process already using GNU
  OpenMP", and a ``multiprocessing`` pool waiting for it hangs). A ``torch`` DataLoader worker or a
  ``multiprocessing`` fork pool therefore runs the serial kernels: the same bits, one core each. TBB
  is not available on the machine this was tested on and gets the same treatment; the ``workqueue``
  pool was tested to work in a fork child, which keeps the parallel kernels.

Under Numba's ``workqueue`` threading layer (what Numba falls back to without libgomp or TBB), two
threads launching parallel regions at once abort the process ("Concurrent access has been detected").
There a lock admits one parallel call at a time; a call that finds the lock taken runs the serial
kernel in its own thread instead of waiting (same bits, see ``fastbn._jit.Kernel``). The layer is
known once Numba's thread pool has started; the first large call starts it (``numba.get_num_threads``).

Fork children are recognized through Python's at-fork hook (``os.fork``, ``multiprocessing``, a
torch DataLoader; not a fork from C code that bypasses ``PyOS_AfterFork_Child``). Cost: a small call
pays one comparison; a large one ~0.7 us for ``numba.get_num_threads()``, as before this module.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numba

# Below this many elements the serial kernel runs: a parallel region costs more than it saves there
# (entering one costs ~1.5 us with the OpenMP layer, 25-90 us with workqueue).
SERIAL_MAX_ELEMS = 1 << 15

# Parallel calls may launch freely: the layer is known and allows concurrent launches (omp, tbb).
# False until checked, and again in every fork child (which then takes _pick_slow).
_free = False
# Set in a fork child when the parent's OpenMP/TBB pool was running: no parallel region in this process.
_serial_after_fork = False
# One parallel call at a time under the workqueue layer.
_pool_lock = threading.Lock()


def call(kernel: Any, flags: tuple, size: int, *args: Any) -> Any:
    """Run the variant of ``kernel`` (a :class:`fastbn._jit.Kernel`) for ``flags`` (its compile-time flag
    values) on an input of ``size`` elements: ``kernel.variant((parallel,) + flags)(nth, *args)``, where
    ``nth`` is the number of threads the variant spreads its work over (1 for the serial one)."""
    if size < SERIAL_MAX_ELEMS:
        return kernel.variant((False,) + flags)(1, *args)
    if _free:
        n = numba.get_num_threads()
        if n == 1:
            return kernel.variant((False,) + flags)(1, *args)
        return kernel.variant((True,) + flags)(n, *args)
    return _call_slow(kernel, flags, args)


def _call_slow(kernel: Any, flags: tuple, args: tuple) -> Any:
    global _free
    if _serial_after_fork:
        return kernel.variant((False,) + flags)(1, *args)
    threads = numba.get_num_threads()  # starts Numba's thread pool: the layer is known from here on
    if numba.threading_layer() != "workqueue":
        _free = True
        return call(kernel, flags, SERIAL_MAX_ELEMS, *args)
    if threads == 1 or not _pool_lock.acquire(blocking=False):
        # one thread, or another thread holds the workqueue pool: run here (same bits)
        return kernel.variant((False,) + flags)(1, *args)
    try:
        return kernel.variant((True,) + flags)(threads, *args)
    finally:
        _pool_lock.release()


def _after_fork_in_child() -> None:
    global _free, _serial_after_fork, _pool_lock
    _free = False
    _pool_lock = threading.Lock()  # a fork while another thread held it leaves it locked forever
    try:
        layer = numba.threading_layer()
    except ValueError:  # the parent never started a thread pool: this child may start its own
        return
    if layer != "workqueue":
        _serial_after_fork = True


os.register_at_fork(after_in_child=_after_fork_in_child)
