"""The ``Example::`` blocks of the three packages' docstrings run and print what they show (doctest).

Equivalent to ``pytest --doctest-modules lightning_methods callbacks datamodules``, but part of the default ``pytest``
run (``testpaths = tests``) and one test per module, so a new module's examples are tested the moment it exists.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("lightning_methods", "callbacks", "datamodules")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            names.append(f"{package}.{info.name}")
    return sorted(names)


MODULES = _modules()


def test_the_examples_exist():
    finder = doctest.DocTestFinder()
    with_examples = [m for m in MODULES if any(t.examples for t in finder.find(importlib.import_module(m)))]
    assert {"lightning_methods.classifier", "lightning_methods.nets", "callbacks.mixup"} <= set(with_examples)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=dict(vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see above)"
