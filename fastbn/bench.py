"""Benchmark runner behind ``python -m fastbn bench``: fastbn against PyTorch and the machine's bound.

Per case (``fastbn.cases``), every contender runs once per round, in rotating order, for ``repeat``
rounds; figures are medians with their spread (interquartile range / median), and ratios are taken round
by round (both sides measured within milliseconds of each other) before their median, so a noisy machine
moves both sides together.

- **kernel for kernel**: fastbn with ``out=`` against PyTorch's kernel writing into the same output
  buffer (``native_batch_norm.out``), or PyTorch's allocating call where that is faster (it is on some
  channels-last backward shapes); both read the same input arrays.
- **API vs API**: both allocating: fastbn's public call against ``F.batch_norm`` (and the backward op
  autograd runs). For outputs over glibc's mmap threshold (32 MiB) PyTorch's allocation maps fresh pages
  on every call, which this column includes and the kernel column does not.
- **physical bound**: the fastest of a plain parallel copy, a streaming-store copy and torch's own copy
  of the bytes the kernel must read and write (x -> y; x + dy -> dx), plus the fastest read (ours or
  ``torch.sum``) of the inputs its layout must read a second time (``Case.extra_reads``); efficiency is
  bound time / fastbn time.

A figure whose spread exceeds ``SUSPECT_SPREAD``, or an efficiency above ``SUSPECT_EFFICIENCY`` (faster
than the bound: a broken measurement), is reported as *suspect*, never as a met target.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from fastbn.cases import OUT_OF_L3_SHAPE, TINY_SHAPE, Case, bench_cases

# targets (issue 9), kernel for kernel: (kernel, layout) -> minimum speed-up over PyTorch
SPEEDUP_TARGETS = {("train", "NCHW"): 3.0, ("train", "NHWC"): 1.3, ("train", "NC"): 1.3}
DEFAULT_SPEEDUP = {"backward": 1.3, "infer": 1.0, "train": 1.3}
OUT_OF_L3_INFER_SPEEDUP = 1.2
# float16/bfloat16 against PyTorch's own kernel on the same dtype (issue 11.3): faster than it
HALF_SPEEDUP = 1.0
OUT_OF_L3_SHAPES = {OUT_OF_L3_SHAPE}  # NCHW (64,128,56,56) and its channels-last twin (64,56,56,128)
BOUND_TARGET = 0.85
TINY_MAX_US = 15.0
SUSPECT_SPREAD = 0.10  # relative interquartile range above which a figure is not trusted
SUSPECT_EFFICIENCY = 1.05


@dataclass
class Stat:
    """Median (ms) and spread (interquartile range / median) of one figure.

    Example
    -------
    >>> from fastbn.bench import Stat
    >>> Stat.of([0.001, 0.002, 0.004])                 # seconds per round in, milliseconds out
    Stat(ms=2.0, spread=0.75)
    """

    ms: float
    spread: float

    @classmethod
    def of(cls, seconds: list[float]) -> "Stat":
        a = np.asarray(seconds) * 1e3
        med = float(np.median(a))
        iqr = float(np.percentile(a, 75) - np.percentile(a, 25))
        return cls(med, iqr / med if med > 0 else 0.0)


@dataclass
class Ratio:
    """Median of per-round ratios and their spread.

    Example
    -------
    Round 3 ran slower on both sides (the machine was busy); its ratio is unchanged:

    >>> from fastbn.bench import Ratio
    >>> Ratio.of([2.0, 2.0, 6.0], [1.0, 1.0, 3.0])     # e.g. PyTorch's seconds over fastbn's
    Ratio(value=2.0, spread=0.0)
    """

    value: float
    spread: float

    @classmethod
    def of(cls, num: list[float], den: list[float]) -> "Ratio":
        r = np.asarray(num) / np.asarray(den)
        med = float(np.median(r))
        iqr = float(np.percentile(r, 75) - np.percentile(r, 25))
        return cls(med, iqr / med if med > 0 else 0.0)


@dataclass
class Result:
    """One case's figures (:func:`bench_case`): the case (``case`` id, ``kernel``, ``layout``, logical
    ``shape``, ``dtype``, ``mib`` of x), fastbn with ``out=`` and allocating, the physical ``bound`` (and
    which runners made it, ``bound_parts``), ``efficiency`` (bound time / fastbn time); with PyTorch, its
    kernel (``torch_kernel``, in the faster ``torch_kernel_form``, "out" or "alloc"), its API and the
    speed-ups (None without PyTorch); ``targets``, as :func:`check_targets` returns them. Times are
    :class:`Stat` (ms), speed-ups :class:`Ratio`.

    Example
    -------
    >>> from fastbn.bench import Stat, bench_case
    >>> from fastbn.cases import Case
    >>> r = bench_case(Case("train", "NCHW", (4, 8, 4, 4), "float32"), repeat=3, with_torch=False)
    >>> r.case, r.shape, round(r.mib, 4), isinstance(r.fastbn_out, Stat), r.kernel_speedup
    ('train-NCHW-4x8x4x4-float32', (4, 8, 4, 4), 0.002, True, None)
    """

    case: str
    kernel: str
    layout: str
    shape: tuple
    dtype: str
    mib: float
    fastbn_out: Stat
    fastbn_alloc: Stat
    bound: Stat
    bound_parts: dict
    efficiency: float
    torch_kernel: Stat | None = None
    torch_kernel_form: str = ""
    torch_api: Stat | None = None
    kernel_speedup: Ratio | None = None
    api_speedup: Ratio | None = None
    targets: dict = field(default_factory=dict)


def have_torch() -> bool:
    """Whether PyTorch can be imported (the comparison columns need it).

    Example
    -------
    >>> import importlib.util
    >>> from fastbn.bench import have_torch
    >>> have_torch() == (importlib.util.find_spec("torch") is not None)
    True
    """
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def _bound_runners(case: Case, inp: dict, with_torch: bool) -> tuple[dict, dict]:
    """({name: the one-pass read+write of the case's bytes}, {name: the extra reads its layout forces})."""
    from fastbn._kernels.roofline import stream_add, stream_copy, stream_read

    def flat(a):  # 2-byte floats as int16: the same bytes, in a dtype Numba and torch both take
        return a.reshape(-1).view(np.int16) if case.half else a.reshape(-1)

    x = flat(inp["x"])
    dst = flat(inp["out"])
    partial = np.empty(1024)
    if case.kernel == "backward":
        dy = flat(inp["dy"])
        write = {"copy": lambda: stream_add(x, dy, dst, False), "copy_nt": lambda: stream_add(x, dy, dst, True)}
    else:
        write = {"copy": lambda: stream_copy(x, dst, False), "copy_nt": lambda: stream_copy(x, dst, True)}
    extra = [flat(inp[k]) for k in case.extra_reads]
    reads = {}
    if extra:
        reads["read"] = lambda: [stream_read(a, partial) for a in extra]
    if with_torch:
        import torch

        tx, tdst = torch.from_numpy(x), torch.from_numpy(dst)
        if case.kernel == "backward":
            tdy = torch.from_numpy(dy)
            write["torch_copy"] = lambda: torch.add(tx, tdy, out=tdst)
        else:
            write["torch_copy"] = lambda: tdst.copy_(tx)
        if extra:
            textra = [torch.from_numpy(a) for a in extra]
            reads["torch_sum"] = lambda: [t.sum() for t in textra]
    return write, reads


def time_rounds(fns: dict[str, Callable], repeat: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each callable over ``repeat`` rounds; every callable runs once per round, the order
    rotating from round to round (a fixed order lets one contender always run on a warm cache).

    Returns ``{name: [seconds of round 0, round 1, ...]}``, after ``warmup`` untimed calls of each.

    Example
    -------
    >>> from fastbn.bench import time_rounds
    >>> calls = []
    >>> t = time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeat=3, warmup=1)
    >>> {name: len(seconds) for name, seconds in t.items()}
    {'a': 3, 'b': 3}
    >>> "".join(calls)                                 # warm-up "ab", then rounds "ab", "ba", "ab"
    'ababbaab'
    """
    for f in fns.values():  # JIT compile or cache load, page faults
        for _ in range(warmup):
            f()
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(repeat):
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def bench_case(case: Case, repeat: int, with_torch: bool) -> Result:
    """Measure one case over ``repeat`` interleaved rounds (see the module docstring): fastbn with
    ``out=`` and allocating, the physical bound, and PyTorch's kernel and API when ``with_torch``.

    Example
    -------
    A tiny case and 3 rounds show the structure; figures need more rounds on a quiet machine:

    >>> from fastbn.bench import bench_case
    >>> from fastbn.cases import Case
    >>> r = bench_case(Case("train", "NCHW", (4, 8, 4, 4), "float32"), repeat=3, with_torch=False)
    >>> r.fastbn_out.ms > 0, r.torch_kernel is None, sorted(r.bound_parts)
    (True, True, ['write'])
    >>> got, need, status = r.targets["tiny_us"]       # the tiny shape's latency target (us)
    >>> need, status in ("ok", "MISS", "suspect")
    (15.0, True)
    """
    inp = case.make_inputs()
    fns = {"out": case.runner(inp, use_out=True), "alloc": case.runner(inp, use_out=False)}
    write, reads = _bound_runners(case, inp, with_torch)
    fns.update({f"w_{k}": f for k, f in write.items()})
    fns.update({f"r_{k}": f for k, f in reads.items()})
    if with_torch:
        tk = case.torch_kernels(inp)
        fns["torch_out"], fns["torch_alloc"] = tk["out"], tk["alloc"]
        fns["torch_api"] = case.torch_runner(inp)
    t = time_rounds(fns, repeat)
    # the bound: fastest writer + fastest reader, compared round by round as a sum of the medians
    w_best = min(write, key=lambda k: np.median(t[f"w_{k}"]))
    bound_rounds = list(t[f"w_{w_best}"])
    parts = {"write": w_best}
    if reads:
        r_best = min(reads, key=lambda k: np.median(t[f"r_{k}"]))
        bound_rounds = [a + b for a, b in zip(bound_rounds, t[f"r_{r_best}"])]
        parts["reads"] = r_best
    res = Result(case.id, case.kernel, case.layout, case.shape, case.dtype,
                 case.numel * case.itemsize / 2**20,
                 Stat.of(t["out"]), Stat.of(t["alloc"]), Stat.of(bound_rounds), parts, 0.0)
    res.efficiency = Ratio.of(bound_rounds, t["out"]).value
    if with_torch:
        form = "out" if np.median(t["torch_out"]) <= np.median(t["torch_alloc"]) else "alloc"
        res.torch_kernel = Stat.of(t[f"torch_{form}"])
        res.torch_kernel_form = form
        res.torch_api = Stat.of(t["torch_api"])
        res.kernel_speedup = Ratio.of(t[f"torch_{form}"], t["out"])
        res.api_speedup = Ratio.of(t["torch_api"], t["alloc"])
    res.targets = check_targets(case, res)
    return res


def _status(ok: bool, suspect: bool) -> str:
    return "suspect" if suspect else ("ok" if ok else "MISS")


def speedup_target(case: Case) -> float:
    """The speed-up over PyTorch's kernel ``case`` must reach (kernel for kernel); float16 and bfloat16
    cases against PyTorch's kernel on the same dtype.

    Example
    -------
    >>> from fastbn.bench import speedup_target
    >>> from fastbn.cases import Case
    >>> speedup_target(Case("train", "NCHW", (32, 64, 56, 56), "float32"))
    3.0
    >>> speedup_target(Case("train", "NCHW", (64, 128, 56, 56), "float16"))
    1.0
    """
    if case.half:
        return HALF_SPEEDUP
    if case.kernel == "infer" and case.shape in OUT_OF_L3_SHAPES:
        return OUT_OF_L3_INFER_SPEEDUP
    if case.shape == TINY_SHAPE:
        return 1.0
    return SPEEDUP_TARGETS.get((case.kernel, case.layout), DEFAULT_SPEEDUP[case.kernel])


def check_targets(case: Case, r: Result) -> dict:
    """{target: (achieved, required, status)}; status is "ok", "MISS" or "suspect" (noisy, or faster
    than the physical bound).

    Example
    -------
    Made-up figures: a 3.5x speed-up where NCHW training must reach 3x, measured cleanly, then noisily:

    >>> from fastbn.bench import Ratio, Result, Stat, check_targets
    >>> from fastbn.cases import Case
    >>> case = Case("train", "NCHW", (32, 64, 56, 56), "float32")
    >>> t = Stat(ms=2.0, spread=0.02)
    >>> r = Result(case.id, case.kernel, case.layout, case.shape, case.dtype, 24.5, t, t, Stat(1.2, 0.01),
    ...            {"write": "copy"}, 0.6, kernel_speedup=Ratio(3.5, 0.03))
    >>> check_targets(case, r)
    {'vs_torch': (3.5, 3.0, 'ok')}
    >>> r.kernel_speedup = Ratio(3.5, 0.25)             # spread above SUSPECT_SPREAD: never a met target
    >>> check_targets(case, r)
    {'vs_torch': (3.5, 3.0, 'suspect')}
    """
    out = {}
    noisy_fastbn = r.fastbn_out.spread > SUSPECT_SPREAD
    if r.kernel_speedup is not None:
        need = speedup_target(case)
        sus = r.kernel_speedup.spread > SUSPECT_SPREAD or noisy_fastbn
        out["vs_torch"] = (r.kernel_speedup.value, need, _status(r.kernel_speedup.value >= need, sus))
    if case.shape == TINY_SHAPE:
        us = 1e3 * r.fastbn_alloc.ms
        out["tiny_us"] = (us, TINY_MAX_US, _status(us <= TINY_MAX_US, r.fastbn_alloc.spread > SUSPECT_SPREAD))
    if case.shape in OUT_OF_L3_SHAPES:
        sus = r.efficiency > SUSPECT_EFFICIENCY or noisy_fastbn or r.bound.spread > SUSPECT_SPREAD
        out["bound"] = (r.efficiency, BOUND_TARGET, _status(r.efficiency >= BOUND_TARGET, sus))
    elif r.efficiency > SUSPECT_EFFICIENCY:
        out["bound"] = (r.efficiency, 0.0, "suspect")
    return out


def latency_under_load(cases: list[Case], calls: int, with_torch: bool) -> list[dict]:
    """p50/p90 latency of fastbn (``out=``) and PyTorch's kernel with one competing CPU-bound process on
    the machine (a busy loop started here and stopped at the end).

    Returns one dict per case: ``{"case": id, "fastbn": {"p50": ms, "p90": ms}}`` (and ``"torch"``).

    Example
    -------
    >>> from fastbn.bench import latency_under_load
    >>> from fastbn.cases import Case
    >>> rows = latency_under_load([Case("train", "NCHW", (4, 8, 4, 4), "float32")], calls=5, with_torch=False)
    >>> rows[0]["case"], sorted(rows[0]["fastbn"])
    ('train-NCHW-4x8x4x4-float32', ['p50', 'p90'])
    """
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    rows = []
    try:
        time.sleep(0.5)
        for case in cases:
            inp = case.make_inputs()
            fns = {"fastbn": case.runner(inp, use_out=True)}
            if with_torch:
                tk = case.torch_kernels(inp)
                fns["torch"] = tk["out"]
            t = time_rounds(fns, calls)
            row = {"case": case.id}
            for k, v in t.items():
                a = np.asarray(v) * 1e3
                row[k] = {"p50": float(np.median(a)), "p90": float(np.percentile(a, 90))}
            rows.append(row)
    finally:
        hog.kill()
        hog.wait()
    return rows


def peak_memory_growth(case: Case, calls: int = 100) -> dict:
    """Memory over ``calls`` warm calls, with out= and allocating, in a fresh process (MiB).

    ``traced``: tracemalloc's peak above the starting point (NumPy's allocations are traced: an
    allocating call shows one output, a flat ``out=`` call ~0). ``rss``: growth of the process's peak RSS.

    Returns ``{"out": {"traced": MiB, "rss": MiB}, "alloc": {...}}``, or ``{"error": message}``.

    Example
    -------
    >>> from fastbn.bench import peak_memory_growth
    >>> from fastbn.cases import Case
    >>> m = peak_memory_growth(Case("train", "NCHW", (4, 8, 4, 4), "float32"), calls=3)
    >>> sorted(m), sorted(m["out"])
    (['alloc', 'out'], ['rss', 'traced'])
    """
    code = (
        "import resource, json, tracemalloc\n"
        "from fastbn.cases import Case\n"
        f"c = Case({case.kernel!r}, {case.layout!r}, {tuple(case.shape)!r}, {case.dtype!r})\n"
        "inp = c.make_inputs()\n"
        "res = {}\n"
        "for use_out in (True, False):\n"
        "    f = c.runner(inp, use_out=use_out); f(); f()\n"
        "    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    tracemalloc.start(); base = tracemalloc.get_traced_memory()[0]\n"
        f"    for _ in range({calls}): f()\n"
        "    peak = tracemalloc.get_traced_memory()[1] - base; tracemalloc.stop()\n"
        "    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    res['out' if use_out else 'alloc'] = {'traced': peak / 2**20, 'rss': (rss1 - rss0) / 1024}\n"
        "print(json.dumps(res))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr else "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def thread_scaling(cases: list[Case], max_threads: int, repeat: int) -> list[dict]:
    """fastbn (out=) median ms at 1..max_threads threads for each case.

    Returns one dict per case: ``{"case": id, "ms": {threads: median ms}}``. Numba's thread count is
    restored afterwards.

    Example
    -------
    >>> from fastbn.bench import thread_scaling
    >>> from fastbn.cases import Case
    >>> rows = thread_scaling([Case("train", "NCHW", (4, 8, 4, 4), "float32")], max_threads=1, repeat=3)
    >>> rows[0]["case"], list(rows[0]["ms"])
    ('train-NCHW-4x8x4x4-float32', [1])
    """
    import numba

    rows = []
    saved = numba.get_num_threads()
    try:
        for case in cases:
            inp = case.make_inputs()
            f = case.runner(inp, use_out=True)
            row = {"case": case.id, "ms": {}}
            for n in range(1, max_threads + 1):
                numba.set_num_threads(n)
                row["ms"][n] = Stat.of(time_rounds({"f": f}, repeat)["f"]).ms
            rows.append(row)
    finally:
        numba.set_num_threads(saved)
    return rows


def environment() -> dict:
    """What a benchmark ran on: :func:`fastbn.cli.info.collect` (versions, threading layer, threads,
    CPU) plus the Python version and, when installed, PyTorch's version and thread count.

    Example
    -------
    >>> from fastbn.bench import environment
    >>> env = environment()
    >>> {"fastbn", "numba", "numpy", "python", "cpu", "num_threads"} <= set(env)
    True
    """
    from fastbn.cli.info import collect

    env = collect()
    env["python"] = sys.version.split()[0]
    if have_torch():
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    return env


def to_json(path: str, results: list[Result], extra: dict) -> None:
    """Write ``{"results": [each Result as a dict], **extra}`` to ``path`` as JSON.

    Example
    -------
    >>> import json, os, tempfile
    >>> from fastbn.bench import bench_case, to_json
    >>> from fastbn.cases import Case
    >>> r = bench_case(Case("train", "NCHW", (4, 8, 4, 4), "float32"), repeat=3, with_torch=False)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     to_json(os.path.join(d, "bench.json"), [r], {"threads": 1})
    ...     with open(os.path.join(d, "bench.json")) as f:
    ...         saved = json.load(f)
    >>> saved["threads"], saved["results"][0]["shape"], sorted(saved["results"][0]["fastbn_out"])
    (1, [4, 8, 4, 4], ['ms', 'spread'])
    """
    with open(path, "w") as f:
        json.dump({"results": [asdict(r) for r in results], **extra}, f, indent=1, default=str)


__all__ = ["Result", "Stat", "Ratio", "bench_case", "bench_cases", "check_targets", "latency_under_load",
           "peak_memory_growth", "thread_scaling", "environment", "to_json", "have_torch", "time_rounds"]
