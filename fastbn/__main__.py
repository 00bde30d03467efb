"""Command line: ``python -m fastbn {demo,info,bench,fold} ...``.

Each subcommand lives in ``fastbn/cli/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``.
The modules are imported only to build the parser; heavy imports (torch, onnx, matplotlib) happen inside
``run`` so ``python -m fastbn info`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("fastbn.cli.demo", "run a training forward/backward on a sample batch and check it against NumPy"),
    "info": ("fastbn.cli.info", "report Numba version, threading layer, threads, CPU features, cache dir"),
    "bench": ("fastbn.cli.bench", "benchmark the kernels against PyTorch and a memory-bandwidth roofline"),
    "fold": ("fastbn.cli.fold", "fold BatchNormalization nodes of an ONNX model into neighbouring layers"),
    "warmup": ("fastbn.cli.warmup", "compile every kernel variant into the on-disk cache (for read-only images)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastbn", description="fastbn: fast batch-norm kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # a subcommand whose module is not in this build
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would report these with the top-level usage; the subcommand's is the useful one
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
