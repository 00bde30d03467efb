"""The README's examples run as written.

Every ```python block runs, in order, in one fresh interpreter per block inside a shared temporary
directory (a later block may read a file an earlier one wrote, e.g. the exported ONNX model). Blocks
meant for several processes run with 2 of them (under mpiexec, or torch.distributed.run for the
torchrun one), or are skipped when the launcher is missing. A block that needs a missing optional package is skipped with the reason.
"""
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
OPTIONAL = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime", "mpi4py": "mpi4py",
            "matplotlib": "matplotlib"}


def _missing(code: str) -> list[str]:
    need = {m for m in OPTIONAL if re.search(rf"\b(import|from) {m}\b|fastbn\.{m}\b|fastbn\.onnx", code)}
    if "fastbn.onnx" in code:
        need |= {"onnx", "onnxruntime"}
    return sorted(m for m in need if importlib.util.find_spec(m) is None)


def _mpiexec():
    here = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, workdir):
    code = BLOCKS[index]
    missing = _missing(code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    script = workdir / f"block_{index}.py"
    script.write_text(code)
    cmd = [sys.executable, str(script)]
    if "torchrun" in code:  # torch.distributed (gloo) over 2 local processes
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    elif "mpiexec" in code:
        mpiexec = _mpiexec()
        if mpiexec is None:
            pytest.skip("needs mpiexec")
        cmd = [mpiexec, "-n", "2"] + cmd
    env = dict(os.environ, MPLBACKEND="Agg")
    r = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
    # what a user running the example would see (Python's default warning filters)
    warned = re.findall(r"\w*(?:DeprecationWarning|FutureWarning): .*", r.stderr)
    assert not warned, f"README block {index} printed deprecation warnings:\n{code}\n" + "\n".join(warned)
