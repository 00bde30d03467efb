"""Every Example section in fastbn's docstrings runs and prints what it shows (doctest), one test per
module. Modules that need a missing optional package (torch, onnx, mpi4py) are skipped with the reason.
Examples marked ``# doctest: +SKIP`` are those that need several processes; the guides' copies of them
run in tests/test_docs.py."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys

import pytest

import fastbn


def _modules() -> list[str]:
    names = ["fastbn"]
    for info in pkgutil.walk_packages(fastbn.__path__, "fastbn."):
        if info.name.startswith("fastbn._") or "._" in info.name or info.name.endswith("__main__"):
            continue  # private modules: their docstrings are for us, the public names carry the examples
        names.append(info.name)
    return names


MODULES = _modules()


def test_public_modules_found():
    assert {"fastbn.functional", "fastbn.kernels", "fastbn.fold", "fastbn.layer"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional extra
        pytest.skip(f"{name} needs {e.name}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = finder.find(module, name)
    # public names a package re-exports from its private modules (fastbn.torch's from fastbn.torch._sync)
    for attr in getattr(module, "__all__", ()):
        obj = getattr(module, attr)
        home = getattr(obj, "__module__", "") or ""
        if home.startswith("fastbn.") and "._" in home and home != name:
            tests += finder.find(obj, f"{name}.{attr}", module=sys.modules[home],
                                 globs=vars(sys.modules[home]).copy())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures: list[str] = []
    for t in tests:
        runner.run(t, out=failures.append)
    assert runner.failures == 0, "".join(failures)
    if not any(ex for t in tests for ex in t.examples):
        pytest.skip(f"{name} has no examples")
