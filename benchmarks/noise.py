"""How far apart do two asv runs of the *same* commit land? The answer is the ``--factor`` to give
``asv continuous`` on this machine: a ratio above it between two commits is more than noise.

Runs ``asv run --python=same --set-commit-hash <commit>`` ``--runs`` times (the current environment and
working tree, no build), keeps each run's result per benchmark and parameter combination, and prints
for each the ratio max / min of the values over the runs, worst first, then the largest ratio overall
and the factor it suggests (rounded up to 0.05)::

    python benchmarks/noise.py --runs 3                          # every benchmark, 9-12 min per run here
    python benchmarks/noise.py --runs 5 --bench "InferForward"   # one suite
    asv continuous --factor F main HEAD                           # F: the suggested factor

``--json FILE`` writes every value. Run it on the machine and at the load that ``asv continuous``
will see: a busy machine gives a larger factor (docs/guides/asv.md has the numbers measured here).
(asv imports every module of ``benchmarks/`` to find benchmarks, so this one imports asv only inside
``main``, and defines no ``time_``/``track_`` names.)
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys

QUOTE = "'"  # asv stores string parameters repr()-quoted

def _results_file(commit: str) -> str:
    files = glob.glob(os.path.join(".asv", "results", "*", f"{commit[:8]}-existing-*.json"))
    if not files:
        raise SystemExit(f"noise.py: asv wrote no result file for {commit[:8]} under .asv/results")
    return max(files, key=os.path.getmtime)


def _values(path: str) -> dict[str, float]:
    """{"bench.name[param, ...]": value} for every finite result in one asv result file."""
    import itertools

    from asv import results

    res = results.Results.load(path)
    out = {}
    for name in res.get_all_result_keys():
        params = res.get_result_params(name)
        values = res.get_result_value(name, params)
        combos = list(itertools.product(*params)) if params else [()]
        for combo, v in zip(combos, values):
            if v is not None and math.isfinite(v) and v > 0:
                key = name + (f"[{', '.join(p.strip(QUOTE) for p in combo)}]" if combo else "")
                out[key] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="asv runs of the same commit (default 3, at least 2)")
    ap.add_argument("--bench", default=None, help="asv's --bench regular expression (default: every benchmark)")
    ap.add_argument("--commit", default="HEAD", help="commit the results are recorded under (default HEAD)")
    ap.add_argument("--top", type=int, default=25, help="rows to print, worst first (default 25)")
    ap.add_argument("--json", metavar="FILE", help="write every run's values to FILE")
    args = ap.parse_args(argv)
    if args.runs < 2:
        ap.error(f"--runs must be at least 2, got {args.runs}")

    commit = subprocess.run(["git", "rev-parse", args.commit], check=True, capture_output=True,
                            text=True).stdout.strip()
    subprocess.run(["asv", "machine", "--yes"], check=True, stdout=subprocess.DEVNULL)
    # asv drops PYTHONPATH in the benchmark processes; ASV_PYTHONPATH puts this working tree's fastbn
    # first, whichever fastbn the environment has installed
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, os.environ.get("ASV_PYTHONPATH")]
    env = dict(os.environ, ASV_PYTHONPATH=os.pathsep.join(p for p in paths if p))
    runs: list[dict[str, float]] = []
    for i in range(args.runs):
        cmd = ["asv", "run", "--python=same", "--set-commit-hash", commit]
        if args.bench:
            cmd += ["--bench", args.bench]
        print(f"== run {i + 1}/{args.runs}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env=env)
        runs.append(_values(_results_file(commit)))

    keys = sorted(set.intersection(*(set(r) for r in runs)))
    if not keys:
        raise SystemExit("noise.py: no benchmark has a result in every run")
    ratios = {k: max(r[k] for r in runs) / min(r[k] for r in runs) for k in keys}
    order = sorted(keys, key=ratios.get, reverse=True)
    print(f"\nmax / min over {args.runs} runs of commit {commit[:8]} ({len(keys)} results), worst first:")
    for k in order[:args.top]:
        vals = "  ".join(f"{r[k]:.4g}" for r in runs)
        print(f"  {ratios[k]:6.2f}  {k}   ({vals})")
    by_bench: dict[str, list[float]] = {}
    for k, v in ratios.items():
        by_bench.setdefault(k.split("[")[0], []).append(v)
    print("\nper benchmark (over its parameter combinations): median and largest ratio")
    for name, vals in sorted(by_bench.items()):
        vals.sort()
        print(f"  {vals[len(vals) // 2]:6.2f} {vals[-1]:8.2f}  {name}")
    ordered = sorted(ratios.values())
    worst = ordered[-1]
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    factor = math.ceil(worst * 20 - 1e-9) / 20
    print(f"\nlargest ratio {worst:.2f} ({order[0]}); 90% of results within {p90:.2f}; median "
          f"{ordered[len(ordered) // 2]:.2f}")
    print(f"suggested: asv continuous --factor {factor:.2f} (a smaller ratio between two commits can be noise)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "runs": runs, "ratios": ratios, "factor": factor}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
