"""``python -m fastbn bench``: the benchmark matrix (fastbn.cases) against PyTorch and the physical bound.

See ``fastbn.bench`` for what is measured. The table has one row per case:

- ``out ms``: fastbn with ``out=`` (median, spread in %); ``torch ms``: PyTorch's kernel on the same memory
  (``.out``, or ``alloc`` where its allocating call was faster); ``kernel x``: speed-up, kernel for kernel;
- ``api x``: speed-up of fastbn's allocating call over ``F.batch_norm`` (includes PyTorch's allocator);
- ``bound ms``: the physical bound; ``eff``: bound / fastbn time;
- targets: ok, MISS, or suspect (a noisy figure, or faster than the bound), never counted as met.
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the ``bench`` subcommand's options: which cases (``--quick``, ``--kernel``, ``--layout``,
    ``--dtype``, each repeatable), ``--threads``, ``--repeat``, outputs (``--json``, ``--plot``) and the
    extra sections (``--under-load``, ``--no-extras``).

    Example
    -------
    >>> import argparse
    >>> from fastbn.cli import bench
    >>> p = argparse.ArgumentParser(prog="python -m fastbn bench")
    >>> bench.add_arguments(p)
    >>> args = p.parse_args(["--quick", "--kernel", "train", "--kernel", "infer", "--dtype", "float32"])
    >>> args.quick, args.kernel, args.layout, args.dtype, args.repeat
    (True, ['train', 'infer'], None, ['float32'], None)
    """
    p.add_argument("--quick", action="store_true", help="fewer shapes and rounds (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="threads for fastbn and PyTorch (default: Numba's)")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds per case (default 15, quick 5)")
    p.add_argument("--kernel", action="append", choices=["train", "infer", "backward"],
                   help="only these kernels (repeatable)")
    p.add_argument("--layout", action="append", choices=["NCHW", "NHWC", "NC"], help="only these layouts")
    p.add_argument("--dtype", action="append", choices=["float32", "float64", "float16", "bfloat16"],
                   help="only these dtypes (bfloat16: with ml_dtypes installed)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a chart (needs matplotlib: the bench extra)")
    p.add_argument("--under-load", action="store_true",
                   help="also measure p50/p90 latency with one competing CPU-bound process")
    p.add_argument("--no-extras", action="store_true", help="skip the memory and thread-scaling sections")


def _pct(spread: float) -> str:
    return f"{100 * spread:3.0f}%"


def _print_table(results) -> None:
    head = (f"{'case':36s} {'MiB':>6s} {'out ms':>13s} {'torch ms':>18s} {'kernel x':>11s} {'api x':>11s} "
            f"{'bound ms':>13s} {'eff':>5s}  targets")
    print(head)
    print("-" * len(head))
    for r in results:
        marks = []
        for name, (got, need, status) in r.targets.items():
            if name == "tiny_us":
                marks.append(f"{status} {got:.1f}us<={need:.0f}")
            elif name == "bound":
                marks.append(f"{status} eff>={need:.2f}" if need else f"{status} eff {got:.2f}")
            else:
                marks.append(f"{status} >={need:.1f}x")
        tk = (f"{r.torch_kernel.ms:8.3f} {_pct(r.torch_kernel.spread)} {r.torch_kernel_form:5s}"
              if r.torch_kernel else f"{'-':>18s}")
        ks = f"{r.kernel_speedup.value:6.2f}x {_pct(r.kernel_speedup.spread)}" if r.kernel_speedup else f"{'-':>11s}"
        api = f"{r.api_speedup.value:6.2f}x {_pct(r.api_speedup.spread)}" if r.api_speedup else f"{'-':>11s}"
        print(f"{r.case:36s} {r.mib:6.1f} {r.fastbn_out.ms:8.3f} {_pct(r.fastbn_out.spread)} {tk} {ks} {api} "
              f"{r.bound.ms:8.3f} {_pct(r.bound.spread)} {r.efficiency:5.2f}  {', '.join(marks)}")


def _plot(results, path: str, env: dict, threads: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.case.replace("-float", "-f") for r in results]
    colors = {"ok": "tab:green", "MISS": "tab:red", "suspect": "tab:gray"}
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.34 * len(results)), 9), sharex=True)
    xs = range(len(results))
    vs = [r.kernel_speedup.value if r.kernel_speedup else float("nan") for r in results]
    need = [r.targets.get("vs_torch", (0, float("nan"), "ok"))[1] for r in results]
    col = [colors[r.targets.get("vs_torch", (0, 0, "suspect"))[2]] for r in results]
    axes[0].bar(xs, vs, color=col)
    axes[0].scatter(xs, need, marker="_", s=200, color="k", label="target")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_yscale("log")  # one 50x bar must not flatten the others
    axes[0].set_ylabel("speed-up over PyTorch,\nkernel for kernel (log)")
    axes[0].legend(loc="upper right")
    eff = [r.efficiency for r in results]
    ecol = [colors[r.targets["bound"][2]] if "bound" in r.targets else "tab:blue" for r in results]
    axes[1].bar(xs, eff, color=ecol)
    axes[1].axhline(0.85, color="k", ls="--", lw=0.8, label="0.85 of the bound (out-of-L3 target)")
    axes[1].set_ylim(0, max(1.2, min(2.0, max(eff) * 1.1)))
    axes[1].set_ylabel("efficiency\n(bound time / fastbn time)")
    axes[1].legend(loc="upper right")
    axes[1].set_xticks(list(xs))
    axes[1].set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    fig.suptitle(f"fastbn vs PyTorch {env.get('torch', '-')} on {env['cpu']}, {threads} "
                 f"thread{'s' if threads != 1 else ''} (green: met, red: missed, grey: suspect)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args) -> int:
    """Run the benchmark (``python -m fastbn bench``): print one table row per case, the extra sections
    and the targets met; write ``--json`` / ``--plot`` when asked. Returns 0, or 2 for bad arguments.

    Example
    -------
    One small case (``infer-NC-256x1024-float32``: 1 MiB), 3 rounds, on one thread; the figures of so
    short a run are noise, and a real run takes minutes:

    >>> import argparse, json, os, tempfile
    >>> from fastbn.cli import bench
    >>> p = argparse.ArgumentParser(prog="python -m fastbn bench")
    >>> bench.add_arguments(p)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> out = os.path.join(tmp.name, "bench.json")
    >>> args = p.parse_args(["--quick", "--kernel", "infer", "--layout", "NC", "--dtype", "float32",
    ...                      "--repeat", "3", "--threads", "1", "--no-extras", "--json", out])
    >>> bench.run(args)                                              # doctest: +ELLIPSIS
    fastbn bench: 1 cases, 1 thread, medians of 3 interleaved rounds ...
    case ... targets
    ---...
    infer-NC-256x1024-float32 ...
    <BLANKLINE>
    targets met: ...
    wrote .../bench.json
    0
    >>> with open(out) as f:
    ...     saved = json.load(f)
    >>> [r["case"] for r in saved["results"]], saved["threads"], saved["repeat"]
    (['infer-NC-256x1024-float32'], 1, 3)
    >>> tmp.cleanup()
    """
    import numba

    from fastbn import bench
    from fastbn.cases import OUT_OF_L3_SHAPE, Case

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print('fastbn bench: --plot needs matplotlib: pip install "fastbn[bench]"', file=sys.stderr)
            return 2
    if args.repeat is not None and args.repeat < 3:
        print("fastbn bench: --repeat must be at least 3 (medians and spreads need rounds)", file=sys.stderr)
        return 2
    saved = numba.get_num_threads()
    threads = args.threads or saved
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        print(f"fastbn bench: --threads must be in 1..{numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS)",
              file=sys.stderr)
        return 2
    repeat = args.repeat or (5 if args.quick else 15)
    with_torch = bench.have_torch()
    kernels = tuple(args.kernel or ("train", "infer", "backward"))
    layouts = tuple(args.layout or ("NCHW", "NHWC", "NC"))
    cases = [c for c in bench.bench_cases(quick=args.quick, kernels=kernels, layouts=layouts)
             if not args.dtype or c.dtype in args.dtype]
    results = []
    extra = {}
    t0 = time.perf_counter()
    torch_threads = None
    try:
        numba.set_num_threads(threads)
        if with_torch:
            import torch
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        env = bench.environment()
        print(f"fastbn bench: {len(cases)} cases, {threads} thread{'s' if threads != 1 else ''}, medians of "
              f"{repeat} interleaved rounds (spread: interquartile range / median; suspect above "
              f"{100 * bench.SUSPECT_SPREAD:.0f}%); PyTorch {env.get('torch', 'not installed')}; {env['cpu']} "
              f"({env['threading_layer']} layer)", flush=True)
        tty = sys.stderr.isatty()
        for i, case in enumerate(cases, 1):
            line = f"[{i:3d}/{len(cases)}] {case.id:44s}"
            print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            results.append(bench.bench_case(case, repeat, with_torch))
        if tty:
            print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
        _print_table(results)
        if args.under_load:
            load_cases = [c for c in cases if c.dtype == "float32" and c.shape != OUT_OF_L3_SHAPE]
            rows = bench.latency_under_load(load_cases, max(50, 4 * repeat), with_torch)
            print("\nlatency with one competing CPU-bound process (ms): fastbn p50 / p90   torch p50 / p90")
            for row in rows:
                f, t = row["fastbn"], row.get("torch")
                ts = f"{t['p50']:8.3f} / {t['p90']:8.3f}" if t else "-"
                flag = "" if not t else ("ok" if f["p90"] <= t["p90"] else "MISS p90")
                print(f"  {row['case']:38s} {f['p50']:8.3f} / {f['p90']:8.3f}   {ts}  {flag}")
            extra["under_load"] = rows
        if not args.no_extras:
            print("\nthread scaling (fastbn with out=, median ms):")
            scale_cases = [Case(k, lay, (32, 64, 56, 56), "float32") for k in kernels for lay in ("NCHW", "NHWC")
                           if lay in layouts]
            rows = bench.thread_scaling(scale_cases, threads, max(5, repeat // 2))
            for row in rows:
                ms = row["ms"]
                print(f"  {row['case']:38s} " + "  ".join(f"{n}t {v:7.3f}" for n, v in ms.items())
                      + f"   speed-up {ms[1] / ms[max(ms)]:.2f}x")
            extra["thread_scaling"] = rows
            mib = Case("train", "NCHW", OUT_OF_L3_SHAPE, "float32").numel * 4 / 2**20
            print(f"\nmemory over 100 warm calls, {'x'.join(map(str, OUT_OF_L3_SHAPE))} NCHW float32 "
                  f"(x is {mib:.0f} MiB; a fresh process per kernel): peak traced allocation / peak RSS growth, MiB")
            mem = {}
            for k in kernels:
                m = mem[k] = bench.peak_memory_growth(Case(k, "NCHW", OUT_OF_L3_SHAPE, "float32"))
                if "error" in m:
                    print(f"  {k:9s} failed: {m['error']}")
                    continue
                print(f"  {k:9s} with out= {m['out']['traced']:7.2f} / {m['out']['rss']:6.1f}   "
                      f"allocating {m['alloc']['traced']:7.2f} / {m['alloc']['rss']:6.1f}")
            extra["peak_rss_growth_mib"] = mem
    finally:
        numba.set_num_threads(saved)
        if torch_threads is not None:
            import torch
            torch.set_num_threads(torch_threads)
    counted = [(r.case, n, got, need, st) for r in results for n, (got, need, st) in r.targets.items()
               if need]
    met = sum(1 for *_, st in counted if st == "ok")
    suspect = [c for c in counted if c[4] == "suspect"]
    missed = [c for c in counted if c[4] == "MISS"]
    print(f"\ntargets met: {met}/{len(counted)}, missed {len(missed)}, suspect {len(suspect)}"
          + ("" if with_torch else " (PyTorch not installed: speed-up targets not checked)")
          + f"; {time.perf_counter() - t0:.0f} s")
    for case, name, got, need, st in missed + suspect:
        print(f"  {st}: {case} {name}: {got:.2f} (target {need})")
    extra["environment"] = env
    extra["threads"] = threads
    extra["repeat"] = repeat
    if args.json:
        bench.to_json(args.json, results, extra)
        print(f"wrote {args.json}")
    if args.plot:
        _plot(results, args.plot, env, threads)
        print(f"wrote {args.plot}")
    return 0
