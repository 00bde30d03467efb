"""``python -m fastbn fold IN.onnx -o OUT.onnx [--check]``: fold BatchNormalization nodes of an ONNX model.

Exit status (``EXIT_*`` below): 0 done (and --check passed); 1 --check found a difference beyond
tolerance (the output is still written, for inspection); 2 usage error, missing extra, unreadable or
invalid input, or the output could not be written; 3 --check could not run the models at all (e.g.
onnxruntime has no kernel for a float64 model; the output is written, unchecked).

``--check`` compares the folded model with the input *as it was read* (kept in memory), so
``-o IN.onnx`` (fold in place) checks against the original, not against itself. The output is written
atomically (a temporary file in the same directory, renamed over it); an existing file keeps its
permission bits, a new one gets the umask's; a symlink is written through (the link stays); a
non-regular file (``/dev/null``, a FIFO, ``/dev/stdout``) is written to as it is, never replaced. When
the output is this process's stdout, the report goes to stderr.
onnx and onnxruntime are imported only inside ``run`` so that ``python -m fastbn --help`` stays fast.
"""
from __future__ import annotations

import argparse
import math
import os
import stat
import sys
import tempfile
from typing import Any, TextIO

import numpy as np

# Show a progress line on a terminal from this many BN nodes on (or always with --progress).
PROGRESS_MIN_BNS = 20
_TWO_GB = 2**31

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR, EXIT_CHECK_NOT_RUN = 0, 1, 2, 3
_EPILOG = ("exit status: 0 folded (and --check passed); 1 --check found a difference beyond tolerance; "
           "2 usage error, bad input or output not written; 3 --check could not run the models")


def _tolerance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fold`` subcommand's options: ``IN.onnx``, ``-o OUT.onnx``, ``--check`` with its
    ``--rtol``, ``--atol``, ``--seed`` and ``--dynamic-size``, and ``--progress``.

    Example
    -------
    >>> import argparse
    >>> from fastbn.cli import fold
    >>> p = argparse.ArgumentParser(prog="python -m fastbn fold")
    >>> fold.add_arguments(p)
    >>> args = p.parse_args(["net.onnx", "-o", "folded.onnx", "--check", "--rtol", "1e-4"])
    >>> args.input, args.output, args.check, args.rtol, args.atol
    ('net.onnx', 'folded.onnx', True, 0.0001, 0.0001)
    """
    parser.epilog = _EPILOG
    parser.add_argument("input", metavar="IN.onnx", help="ONNX model to fold")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the result")
    parser.add_argument("--check", action="store_true",
                        help="run both models with onnxruntime on random inputs and compare the outputs")
    parser.add_argument("--rtol", type=_tolerance, default=1e-3,
                        help="--check tolerance relative to each output's largest magnitude (default 1e-3)")
    parser.add_argument("--atol", type=_tolerance, default=1e-4,
                        help="--check absolute tolerance (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --check random inputs (default 0)")
    parser.add_argument("--dynamic-size", type=int, default=1, metavar="N",
                        help="size given to symbolic/unknown input dimensions in --check (default 1)")
    parser.add_argument("--progress", action="store_true",
                        help="always show the progress line "
                             f"(default: only on a terminal, for >= {PROGRESS_MIN_BNS} BNs)")


def _err(msg: str) -> int:
    print(f"fastbn fold: error: {msg}", file=sys.stderr)
    return EXIT_ERROR


def random_inputs(model: Any, rng: np.random.Generator, dynamic_size: int = 1) -> dict[str, np.ndarray]:
    """Random feeds for the graph inputs that are not initializers (symbolic dims -> dynamic_size).

    Returns ``{input name: array}`` in each input's shape and NumPy dtype: standard normal values for
    floating inputs, 0 and 1 for integer and bool ones (often indices or masks). Needs ``onnx``.

    Example
    -------
    >>> import numpy as np, onnx.parser
    >>> from fastbn.cli.fold import random_inputs
    >>> model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    ... net (float[N, 3] x, int64[2] k) => (float[N, 3] y) { y = Identity(x) }''')
    >>> feeds = random_inputs(model, np.random.default_rng(0), dynamic_size=2)
    >>> {name: (a.shape, a.dtype.name) for name, a in feeds.items()}
    {'x': ((2, 3), 'float32'), 'k': ((2,), 'int64')}
    """
    import onnx

    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise ValueError(f"input '{vi.name}' is not a tensor; --check supports tensor inputs only")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dynamic_size
                      for d in tt.shape.dim)
        if np.issubdtype(dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, 2, shape).astype(dtype)  # small: often indices
        else:
            raise ValueError(f"input '{vi.name}' has dtype {dtype}; --check cannot make random values")
    return feeds


def compare_models(original: Any, folded: Any, *, seed: int = 0, dynamic_size: int = 1
                   ) -> list[tuple[str, tuple[int, ...], float, float, float]]:
    """Run both models (ModelProto or path) with onnxruntime on the same random inputs.

    Returns ``(output name, shape, max abs diff, max rel diff, max |reference|)`` per output, where the
    relative difference is the absolute one divided by the reference output's largest magnitude.
    Needs ``onnx`` and ``onnxruntime``.

    Example
    -------
    A MatMul followed by a BatchNormalization, against its folded form (one Gemm):

    >>> import onnx.parser, fastbn.onnx
    >>> from fastbn.cli.fold import compare_models
    >>> model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    ... net (float[N, 2] x) => (float[N, 2] y)
    ... <float[2, 2] w = {1, 2, 3, 4}, float[2] s = {2, 3}, float[2] b = {0.5, -1}, float[2] m = {1, 2},
    ...  float[2] v = {4, 9}>
    ... { [fc] h = MatMul(x, w)
    ...   [bn] y = BatchNormalization(h, s, b, m, v) }''')
    >>> folded, report = fastbn.onnx.fold_model(model)
    >>> rows = compare_models(model, folded)                 # symbolic N -> dynamic_size=1
    >>> [(name, shape, max_rel < 1e-6) for name, shape, max_abs, max_rel, scale in rows]
    [('y', (1, 2), True)]
    """
    import onnx
    import onnxruntime as ort

    def session(m: Any) -> Any:
        so = ort.SessionOptions()
        # Compare the graphs as written: onnxruntime's own fusions (it folds Conv+BN itself) would
        # otherwise make the original model run something other than what the file says.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        src = m if isinstance(m, (str, os.PathLike)) else m.SerializeToString()
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])

    proto = onnx.load(original, load_external_data=False) if isinstance(original, (str, os.PathLike)) \
        else original
    feeds = random_inputs(proto, np.random.default_rng(seed), dynamic_size)
    s_ref, s_new = session(original), session(folded)
    names = [o.name for o in s_ref.get_outputs()]
    ref = s_ref.run(names, feeds)
    new = s_new.run(names, feeds)
    rows = []
    for name, a, b in zip(names, ref, new):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            rows.append((name, a64.shape, float("inf"), float("inf"), 0.0))
            continue
        same_nan = np.isnan(a64) & np.isnan(b64)
        diff = np.where(same_nan, 0.0, np.abs(a64 - b64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        max_abs = float(diff.max()) if diff.size else 0.0
        finite = np.abs(a64[np.isfinite(a64)])
        scale = float(finite.max()) if finite.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        rows.append((name, a64.shape, max_abs, max_rel, scale))
    return rows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_stdout(st: os.stat_result) -> bool:
    try:
        return os.path.samestat(st, os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # stdout closed or replaced by a non-file object
        return False


def _output_kind(path: str) -> str:
    """'stdout' (this process's stdout), 'stream' (another non-regular file) or 'file' (regular/new)."""
    try:
        st = os.stat(path)  # follows symlinks: the file that would be written
    except OSError:
        return "file"
    if _is_stdout(st):
        return "stdout"
    return "file" if stat.S_ISREG(st.st_mode) else "stream"


def _save(onnx: Any, model: Any, path: str, kind: str) -> None:
    """Write ``model`` to ``path`` as the module docstring says (atomic for files, through for streams)."""
    if kind != "file":
        if model.ByteSize() >= _TWO_GB:
            raise ValueError("a model over 2 GB is saved with an external data file; write it to a regular file")
        data = model.SerializeToString()
        if kind == "stdout":
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            with open(path, "wb") as f:
                f.write(data)
        return
    target = os.path.realpath(path)  # through a symlink: the link stays, its target is replaced
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # an existing file keeps its permissions
    except FileNotFoundError:
        mode = 0o666 & ~_umask()  # a new one gets what open() would give it
    fd, tmp = tempfile.mkstemp(prefix=".fastbn-fold-", suffix=".onnx", dir=os.path.dirname(target))
    os.close(fd)
    try:
        if model.ByteSize() >= _TWO_GB:  # protobuf cannot serialize more than 2 GB in one message
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(target) + ".data")
        else:
            onnx.save_model(model, tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _reason(e: Exception) -> str:
    # an OSError's own text names the temporary file; the user knows only OUT.onnx
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _check_sources(model: Any, folded: Any, args: argparse.Namespace, input_replaced: bool,
                   kind: str) -> tuple[Any, Any] | str:
    """What to give compare_models: the models in memory (the original as read), or for models over
    2 GB their files; a reason string when neither is possible."""
    if model.ByteSize() < _TWO_GB and folded.ByteSize() < _TWO_GB:
        return model, folded
    if input_replaced:
        return "the input was overwritten and a model over 2 GB cannot be checked from memory"
    if kind != "file":
        return "a model over 2 GB can be checked only from a regular output file"
    return args.input, args.output


def run(args: argparse.Namespace) -> int:
    """Fold ``args.input`` into ``args.output``; see the module docstring for exit codes.

    Example
    -------
    ``python -m fastbn fold net.onnx -o folded.onnx --check`` on a MatMul followed by a BatchNormalization:

    >>> import argparse, os, tempfile, onnx, onnx.parser
    >>> from fastbn.cli import fold
    >>> model = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 17]>
    ... net (float[N, 2] x) => (float[N, 2] y)
    ... <float[2, 2] w = {1, 2, 3, 4}, float[2] s = {2, 3}, float[2] b = {0.5, -1}, float[2] m = {1, 2},
    ...  float[2] v = {4, 9}>
    ... { [fc] h = MatMul(x, w)
    ...   [bn] y = BatchNormalization(h, s, b, m, v) }''')
    >>> tmp = tempfile.TemporaryDirectory()
    >>> src, dst = os.path.join(tmp.name, "net.onnx"), os.path.join(tmp.name, "folded.onnx")
    >>> onnx.save(model, src)
    >>> p = argparse.ArgumentParser(prog="python -m fastbn fold")
    >>> fold.add_arguments(p)
    >>> fold.run(p.parse_args([src, "-o", dst, "--check"]))            # doctest: +ELLIPSIS
    folded 1 of 1 BatchNormalization node(s)
      folded  bn -> Gemm fc: folded into the preceding Gemm
    wrote .../folded.onnx
    check: output 'y' (1, 2): max abs diff ..., max rel diff ... (relative to max |output| = ...)
    check: PASSED (atol=0.0001, rtol=0.001, seed=0)
    0
    >>> [n.op_type for n in onnx.load(dst).graph.node]
    ['Gemm']
    >>> tmp.cleanup()
    """
    try:
        import onnx

        import fastbn.onnx as fonnx
    except ImportError as e:
        return _err(f"the fold command needs the optional extra: pip install 'fastbn[onnx]' ({e})")
    if args.check:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return _err("--check needs onnxruntime: pip install 'fastbn[onnx]'")
    if args.dynamic_size < 1:
        return _err("--dynamic-size must be >= 1")
    if os.path.isdir(args.input):
        return _err(f"{args.input} is a directory, not an ONNX file")
    try:
        model = fonnx.load_model(args.input)  # kept as read: --check compares against it
    except (OSError, ValueError, TypeError) as e:
        return _err(str(e))
    kind = _output_kind(args.output)
    out: TextIO = sys.stderr if kind == "stdout" else sys.stdout  # stdout carries the model then
    try:
        input_replaced = kind == "file" and os.path.samefile(args.input, args.output)
    except OSError:
        input_replaced = False
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    show = args.progress or (n_bn >= PROGRESS_MIN_BNS and sys.stderr.isatty())

    last = [0]

    def progress(i: int, n: int, name: str) -> None:
        line = f"[{i:>{len(str(n))}}/{n}] folding {name}"
        # pad with spaces over a longer previous line (no terminal escape codes: logs stay readable)
        sys.stderr.write("\r" + line.ljust(last[0]))
        sys.stderr.flush()
        last[0] = len(line)

    try:
        folded, report = fonnx.fold_model(model, progress=progress if show else None)
    except (ValueError, onnx.checker.ValidationError) as e:
        return _err(f"folding failed: {e}")
    finally:
        if show:
            sys.stderr.write("\n")
    print(report, file=out)
    try:
        _save(onnx, folded, args.output, kind)
    except (OSError, ValueError) as e:
        return _err(f"cannot write {args.output}: {_reason(e)}")
    print(f"wrote {args.output}", file=out)
    if not args.check:
        return EXIT_OK
    sources = _check_sources(model, folded, args, input_replaced, kind)
    if isinstance(sources, str):
        print(f"check: NOT RUN: {sources}", file=out)
        return EXIT_CHECK_NOT_RUN
    try:
        rows = compare_models(*sources, seed=args.seed, dynamic_size=args.dynamic_size)
    except Exception as e:  # onnxruntime errors are varied; report them in one line
        print(f"check: NOT RUN: onnxruntime could not run the models: {str(e).strip().splitlines()[0]}",
              file=out)
        return EXIT_CHECK_NOT_RUN
    ok = True
    for name, shape, max_abs, max_rel, scale in rows:
        good = max_abs <= args.atol + args.rtol * scale
        ok &= good
        flag = "" if good else "  <-- beyond tolerance"
        print(f"check: output '{name}' {tuple(shape)}: max abs diff {max_abs:.3g}, max rel diff "
              f"{max_rel:.3g} (relative to max |output| = {scale:.3g}){flag}", file=out)
    print(f"check: {'PASSED' if ok else 'FAILED'} (atol={args.atol:g}, rtol={args.rtol:g}, seed={args.seed})",
          file=out)
    if not ok:
        print(f"check: {args.output} was written but differs from {args.input} as it was read", file=sys.stderr)
    return EXIT_OK if ok else EXIT_MISMATCH
