"""The subcommands of ``python -m fastbn COMMAND``, one module each (the parser: ``fastbn.__main__``).

- ``demo``: a training forward/backward and an inference forward on a sample batch, checked against NumPy;
- ``info``: Numba version, threading layer, threads, CPU features, cache directory;
- ``bench``: the benchmark matrix (``fastbn.cases``) against PyTorch and the memory-bandwidth bound;
- ``fold``: folding BatchNormalization nodes of an ONNX model (the ``onnx`` extra);
- ``warmup``: compiling kernel variants into Numba's on-disk cache ahead of use.

Each module has ``add_arguments(parser)``, which registers its options on an ``argparse`` parser, and
``run(args) -> int``, which does the work and returns the exit status; heavy imports happen in ``run``.

Example
-------
>>> from fastbn.__main__ import build_parser, main
>>> args = build_parser().parse_args(["demo", "--shape", "4,8,4,4"])
>>> args.command, args.shape, args.dtype
('demo', (4, 8, 4, 4), 'float32')
>>> main(["warmup", "--kernels", "stats", "--dtypes", "float64", "--layouts", "cl", "--list"])  # exit status 0
stats float64 parallel cl
stats float64 serial cl
2 variants
0
"""
