"""Every public name the three packages export resolves (timm-style: a new export is tested the moment it exists)."""

import importlib

import pytest

PACKAGES = ("lightning_methods", "callbacks", "datamodules")
EXPORTS = [(pkg, name) for pkg in PACKAGES for name in importlib.import_module(pkg)._EXPORTS]


@pytest.mark.parametrize(("package", "name"), EXPORTS, ids=[f"{p}.{n}" for p, n in EXPORTS])
def test_export_resolves(package, name):
    module = importlib.import_module(package)
    value = getattr(module, name)
    assert value is not None
    assert name in dir(module) and name in module.__all__
    doc = getattr(value, "__doc__", None)
    assert doc and doc.strip(), f"{package}.{name} has no docstring"


def test_unknown_attribute_is_an_attribute_error():
    import lightning_methods

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_methods.Nope
