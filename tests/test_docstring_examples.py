"""Every Example section in fastbn's docstrings runs and prints what it shows (doctest), one test per
module. Modules that need a missing optional package (torch, onnx, mpi4py) are skipped with the reason;
so is the rest of a docstring whose example imports one (``fastbn.cli.fold``'s examples need onnx),
after the module's other examples have run. Examples marked ``# doctest: +SKIP`` are those that need
several processes; the guides' copies of them run in tests/test_docs.py."""
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
OPTIONAL = {"torch", "onnx", "onnxruntime", "onnxscript", "mpi4py", "matplotlib"}


def _extra(e: BaseException | None) -> str | None:
    """The optional package a failed import lacks (fastbn.onnx re-raises onnx's error with a hint), or None."""
    while e is not None:
        if isinstance(e, ImportError) and (e.name or "").split(".")[0] in OPTIONAL:
            return e.name
        e = e.__cause__
    return None


class _NeedsExtra(Exception):
    pass


class _Runner(doctest.DocTestRunner):
    """Stops a docstring's examples at the import of a missing optional package (the rest need it too);
    the docstring is then neither a failure nor a success."""

    def report_unexpected_exception(self, out, test, example, exc_info):
        extra = _extra(exc_info[1])
        if extra is not None:
            raise _NeedsExtra(extra)
        super().report_unexpected_exception(out, test, example, exc_info)


def test_public_modules_found():
    assert {"fastbn.functional", "fastbn.kernels", "fastbn.fold", "fastbn.layer"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional extra
        pytest.skip(f"{name} needs {_extra(e) or e.name}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = finder.find(module, name)
    needs: set[str] = set()
    # public names a package re-exports from its private modules (fastbn.torch's from fastbn.torch._sync)
    for attr in getattr(module, "__all__", ()):
        try:
            obj = getattr(module, attr)
        except ImportError as e:  # resolved on first access: fastbn.torch's names import torch
            if _extra(e) is None:
                raise
            needs.add(_extra(e))
            continue
        home = getattr(obj, "__module__", "") or ""
        if home.startswith("fastbn.") and "._" in home and home != name:
            tests += finder.find(obj, f"{name}.{attr}", module=sys.modules[home],
                                 globs=vars(sys.modules[home]).copy())
    runner = _Runner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures: list[str] = []
    stopped = False
    for t in tests:
        flags = runner.optionflags
        try:
            runner.run(t, out=failures.append)
        except _NeedsExtra as e:
            needs.add(str(e))
            stopped = True
            runner.optionflags = flags  # the stopped example's directives, which run() restores on return
    assert runner.failures == 0, "".join(failures)
    if stopped:
        pytest.skip(f"some of {name}'s examples need {', '.join(sorted(needs))}")
    if not any(ex for t in tests for ex in t.examples):
        pytest.skip(f"{name} needs {', '.join(sorted(needs))}" if needs else f"{name} has no examples")
