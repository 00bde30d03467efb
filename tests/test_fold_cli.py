"""``python -m fastbn fold`` as an operator uses it: in place with --check, onto devices, FIFOs, stdout
and symlinks, file modes, and a one-line error with the documented exit status for each mistake.

Most cases call ``fastbn.__main__.main`` in process (fast); stdout as the output runs in a subprocess.
No test writes to the machine's own /dev/null or /dev/stdout: a broken implementation would replace
them. A device node of /dev/null's kind is made in a temporary directory instead (as root).
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fastbn.onnx as fonnx  # noqa: E402
from fastbn.__main__ import main  # noqa: E402
from fastbn.cli.fold import EXIT_CHECK_NOT_RUN, EXIT_ERROR, EXIT_MISMATCH  # noqa: E402
from test_fold_onnx import REPO, bn_inits, bn_node, make_model, ops  # noqa: E402


def conv_bn_model(path, seed=0):
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)), **bn_inits(rng, 4)}
    m = make_model([helper.make_node("Conv", ["x", "w"], ["h"]), bn_node("h", "y")],
                   [("x", [1, 3, 6, 6])], ["y"], inits)
    onnx.save(m, str(path))
    return path


def fold(*args) -> int:
    return main(["fold", *map(str, args)])


def folded_ok(data: bytes) -> bool:
    m = onnx.load_from_string(data)
    return "BatchNormalization" not in ops(m) and "Conv" in ops(m)


def broken_fold(monkeypatch):
    """Make fold_model return a wrong model (its weights perturbed): --check must catch it."""
    real = fonnx.fold_model

    def broken(model, **kw):
        out, rep = real(model, **kw)
        for t in out.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.1 + 0.1, t.name))
        return out, rep

    monkeypatch.setattr(fonnx, "fold_model", broken)


# ------------------------------------------------------------------------------------ --check in place

def test_in_place_check_compares_against_the_original(tmp_path, capsys, monkeypatch):
    src = conv_bn_model(tmp_path / "m.onnx")
    original = src.read_bytes()
    assert fold(src, "-o", src, "--check") == 0
    assert folded_ok(src.read_bytes()) and "PASSED" in capsys.readouterr().out
    src.write_bytes(original)
    broken_fold(monkeypatch)
    assert fold(src, "-o", src, "--check") == EXIT_MISMATCH  # not a comparison of the result with itself
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "beyond tolerance" in captured.out
    assert "as it was read" in captured.err


def test_check_that_cannot_run_has_its_own_exit_status(tmp_path, capsys):
    """A float64 model: onnxruntime has no float64 Conv, so --check cannot run (not a mismatch)."""
    D = TensorProto.DOUBLE
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)), "w")]
    inits += [numpy_helper.from_array(v.astype(np.float64), f"bn_{k[-1]}")
              for k, v in bn_inits(rng, 4).items()]
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["h"]), bn_node("h", "y")], "g",
                          [helper.make_tensor_value_info("x", D, [1, 3, 5, 5])],
                          [helper.make_tensor_value_info("y", D, [1, 4, 3, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src, dst = tmp_path / "f64.onnx", tmp_path / "out.onnx"
    onnx.save(m, str(src))
    assert fold(src, "-o", dst, "--check") == EXIT_CHECK_NOT_RUN
    assert "check: NOT RUN" in capsys.readouterr().out
    assert folded_ok(dst.read_bytes())


# ------------------------------------------------------------------------------------------ outputs

def test_output_through_a_symlink(tmp_path):
    src = conv_bn_model(tmp_path / "m.onnx")
    real, link = tmp_path / "real.onnx", tmp_path / "link.onnx"
    link.symlink_to(real)  # dangling: the target is created
    for _ in range(2):  # then the existing target is replaced
        assert fold(src, "-o", link) == 0
        assert link.is_symlink() and os.readlink(link) == str(real)
        assert folded_ok(real.read_bytes())


def test_file_modes_follow_the_umask_or_the_existing_file(tmp_path):
    src = conv_bn_model(tmp_path / "m.onnx")
    old = os.umask(0o022)
    try:
        new = tmp_path / "new.onnx"
        assert fold(src, "-o", new) == 0
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        os.umask(0o077)
        existing = tmp_path / "existing.onnx"
        existing.write_bytes(b"")
        existing.chmod(0o640)
        assert fold(src, "-o", existing) == 0
        assert stat.S_IMODE(existing.stat().st_mode) == 0o640
        src.chmod(0o644)
        assert fold(src, "-o", src) == 0  # in place
        assert stat.S_IMODE(src.stat().st_mode) == 0o644 and folded_ok(src.read_bytes())
    finally:
        os.umask(old)


def test_output_to_a_fifo_is_written_through(tmp_path):
    src = conv_bn_model(tmp_path / "m.onnx")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader exists: the writer's open() won't block
    try:
        assert fold(src, "-o", fifo) == 0
        assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
        data = b""
        while chunk := os.read(rd, 1 << 16):
            data += chunk
    finally:
        os.close(rd)
    assert folded_ok(data)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mknod needs root")
def test_output_to_a_character_device_keeps_the_device(tmp_path):
    src = conv_bn_model(tmp_path / "m.onnx")
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the device /dev/null is
    assert fold(src, "-o", null) == 0
    assert stat.S_ISCHR(os.stat(null).st_mode), "the device node was replaced by a regular file"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fastbn")] == []


@pytest.mark.skipif(not os.path.exists("/proc/self/fd/1"), reason="needs /proc/self/fd")
def test_output_to_stdout_carries_only_the_model(tmp_path):
    src = conv_bn_model(tmp_path / "m.onnx")
    r = subprocess.run([sys.executable, "-m", "fastbn", "fold", str(src), "-o", "/proc/self/fd/1", "--check"],
                       cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert folded_ok(r.stdout)
    assert b"PASSED" in r.stderr and b"wrote" in r.stderr  # the report went to stderr


# ------------------------------------------------------------------------------ one-line errors

@pytest.mark.parametrize("argv,usage", [
    (["fold", "in.onnx", "-o", "out.onnx", "--bogus"], "usage: python -m fastbn fold"),
    (["info", "--bogus"], "usage: python -m fastbn info"),
])
def test_unknown_flag_gets_the_subcommand_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(usage) and "COMMAND" not in err
    assert err.strip().splitlines()[-1].endswith("error: unrecognized arguments: --bogus")


@pytest.mark.parametrize("flag,value", [("--rtol", "-1"), ("--atol", "nan"), ("--rtol", "inf"),
                                        ("--atol", "abc")])
def test_bad_tolerances_are_usage_errors(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fold(tmp_path / "in.onnx", "-o", tmp_path / "out.onnx", flag, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}:" in err and err.startswith("usage: python -m fastbn fold")


def test_directory_input(tmp_path, capsys):
    assert fold(tmp_path, "-o", tmp_path / "out.onnx") == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastbn fold: error: {tmp_path} is a directory, not an ONNX file"]


def test_cannot_write_names_the_output_not_a_temporary_file(tmp_path, capsys):
    src = conv_bn_model(tmp_path / "m.onnx")
    out = tmp_path / "no-such-dir" / "out.onnx"
    assert fold(src, "-o", out) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {out}:" in err[0] and ".fastbn-fold" not in err[0], err
