"""The examples of the README and of the documentation (docs/**/*.md) run as written, and the API
reference covers every public name.

- Every ```python block runs in a fresh interpreter, in document order, inside a temporary directory
  shared by the blocks of the same page (a later block may read a file an earlier one wrote, e.g. the
  exported ONNX model), and must print no deprecation warning. Blocks meant for several processes run
  with 2 of them (under mpiexec, or torch.distributed.run for the torchrun one), or are skipped when the
  launcher is missing. A block that needs a missing optional package is skipped with the reason.
- In ```console transcripts, the ``$ python -m fastbn ...`` commands run in that directory and must
  exit 0 (their printed output is an example, not compared: timings and rounding vary).
- In ```bash blocks (installs, asv, benchmarks: CI runs the Quickstart, pytest-benchmark and asv ones),
  every ``python -m fastbn ...`` command must parse with fastbn's own argument parser and every script
  or test path a command names must exist.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
OPTIONAL = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
            "mpi4py": "mpi4py", "matplotlib": "matplotlib", "ml_dtypes": "ml_dtypes"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)


def _blocks(kinds: set[str]) -> list:
    out = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            if m.group(1) in kinds:
                out.append(pytest.param(rel, m.group(1), m.group(2), id=f"{rel}-{i}"))
    return out


def _missing(code: str) -> list[str]:
    need = {m for m in OPTIONAL if re.search(rf"\b(import|from) {m}\b|fastbn\.{m}\b", code)}
    if "fastbn.onnx" in code or "fastbn fold" in code:
        need |= {"onnx", "onnxruntime"}
    if re.search(r"[\"'\s](?!fastbn\.)\w+\.onnx\b", code):  # an ONNX file: the docs' come from torch's exporter
        need |= {"torch", "onnx", "onnxscript"}
    return sorted(m for m in need if importlib.util.find_spec(m) is None)


def _mpiexec():
    here = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One temporary directory per page, shared by that page's blocks."""
    made = {}

    def get(page: str) -> pathlib.Path:
        if page not in made:
            made[page] = tmp_path_factory.mktemp(re.sub(r"\W", "_", page))
        return made[page]
    return get


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=path)


def _no_deprecation(what: str, code: str, stderr: str) -> None:
    # what a user running the example would see (Python's default warning filters)
    warned = re.findall(r"\w*(?:DeprecationWarning|FutureWarning): .*", stderr)
    assert not warned, f"{what} printed deprecation warnings:\n{code}\n" + "\n".join(warned)


@pytest.mark.parametrize("page, kind, code", _blocks({"python", "console"}))
def test_example_runs(page, kind, code, workdirs):
    missing = _missing(code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    workdir = workdirs(page)
    if kind == "console":
        commands = [line[2:] for line in code.splitlines() if line.startswith("$ python -m fastbn ")]
        if not commands:
            pytest.skip("no fastbn command in this transcript")
        for command in commands:
            argv = shlex.split(command)
            r = subprocess.run([sys.executable, *argv[1:]], cwd=workdir, capture_output=True, text=True,
                               timeout=600, env=_env())
            assert r.returncode == 0, f"{page}: `{command}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            _no_deprecation(f"{page}: `{command}`", command, r.stderr)
        return
    script = workdir / f"block_{hashlib.sha1(code.encode()).hexdigest()[:10]}.py"
    script.write_text(code)
    cmd = [sys.executable, str(script)]
    if "torchrun" in code:  # torch.distributed (gloo) over 2 local processes
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    elif "mpiexec" in code:
        mpiexec = _mpiexec()
        if mpiexec is None:
            pytest.skip("needs mpiexec")
        cmd = [mpiexec, "-n", "2"] + cmd
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, f"{page} block failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
    _no_deprecation(f"{page} block", code, r.stderr)


def _commands(code: str) -> list[list[str]]:
    """The commands of a bash block: comments dropped, `&&` chains split, `$ ` prompts removed."""
    out = []
    for line in code.splitlines():
        line = line.split(" #")[0].strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            out.append(shlex.split(part))
    return out


@pytest.mark.parametrize("page, kind, code", _blocks({"bash", "sh", "shell"}))
def test_shell_commands_are_valid(page, kind, code):
    from fastbn.__main__ import build_parser

    for argv in _commands(code):
        if argv[:2] == ["mpiexec", "-n"]:
            argv = argv[3:]
        if argv[:1] != ["python"]:
            continue  # pip, asv, torchrun, mkdocs, ...: run by CI or by hand
        if argv[1:3] == ["-m", "fastbn"]:
            try:
                build_parser().parse_args(argv[3:])
            except SystemExit as e:
                pytest.fail(f"{page}: `{' '.join(argv)}` does not parse (exit {e.code})")
        elif argv[1:3] == ["-m", "pytest"]:
            for arg in argv[3:]:
                if arg.startswith("tests/"):
                    assert (ROOT / arg.split("::")[0]).exists(), f"{page}: {arg} does not exist"
        elif argv[1].endswith(".py"):
            assert (ROOT / argv[1]).exists(), f"{page}: {argv[1]} does not exist"


def _public_names() -> dict[str, list[str]]:
    """{module: public names} as the package declares them (no optional extra needed)."""
    import ast

    import fastbn
    import fastbn.torch

    names = {"fastbn": sorted(fastbn._EXPORTS), "fastbn.torch": sorted(fastbn.torch._EXPORTS)}
    for mod in ("kernels", "functional", "fused", "layer", "stats", "precise", "fold", "distributed",
                "onnx"):
        # read __all__ from the source: fastbn.onnx imports onnx, which may not be installed
        tree = ast.parse((ROOT / "fastbn" / f"{mod}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names[f"fastbn.{mod}"] = sorted(ast.literal_eval(node.value))
    return names


def test_api_reference_covers_every_public_name():
    entries = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        text = page.read_text()
        entries |= {m.split(".")[-1] for m in re.findall(r"^::: ([\w.]+)", text, flags=re.M)}
        # an entry shown under another name (`heading: "train_forward"` on fastbn.kernels._train_forward,
        # whose docstring the public dispatcher carries) documents that name
        entry = None
        for line in text.splitlines():
            if line.startswith("::: "):
                entry = line
            elif entry and line.startswith(" ") and (m := re.fullmatch(r'\s+heading: "(\w+)"', line)):
                entries.add(m.group(1))
            elif not line.startswith(" "):
                entry = None
    missing = []
    for module, names in _public_names().items():
        for name in names:
            documented = name in entries or (name.endswith("_serial") and name[:-len("_serial")] in entries)
            if not documented:
                missing.append(f"{module}.{name}")
    assert not missing, f"no '::: ...' entry in docs/api/ for: {', '.join(missing)}"
