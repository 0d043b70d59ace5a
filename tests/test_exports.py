"""Every public name the three packages export is the right kind of object, from the file ``_EXPORTS`` names
(timm-style: a new export is tested the moment it exists)."""

import importlib
import inspect
import types

import lightning.pytorch as pl
import pytest
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import Metric

PACKAGES = ("lightning_methods", "callbacks", "datamodules")
EXPORTS = [(pkg, name) for pkg in PACKAGES for name in importlib.import_module(pkg)._EXPORTS]

# What each package exports: LightningModules, torchmetrics Metrics and backbones (nn.Module), Callbacks, DataModules
# (and the Dataset they build on); lowercase names are submodules or functions.
KINDS = {
    "lightning_methods": (pl.LightningModule, Metric, nn.Module),
    "callbacks": (pl.Callback,),
    "datamodules": (pl.LightningDataModule, Dataset),
}


@pytest.mark.parametrize(("package", "name"), EXPORTS, ids=[f"{p}.{n}" for p, n in EXPORTS])
def test_export_is_the_right_kind_from_the_named_file(package, name):
    module = importlib.import_module(package)
    value = getattr(module, name)
    target = importlib.import_module(module._EXPORTS[name], package)
    assert name in dir(module) and name in module.__all__
    if inspect.isclass(value):
        assert issubclass(value, KINDS[package]), f"{package}.{name} is a {value.__mro__[1].__name__} subclass"
        assert getattr(target, name) is value  # the file `_EXPORTS` names provides it (it may re-export it)
    elif isinstance(value, types.ModuleType):
        assert value is target, f"{package}.{name} should be the submodule {target.__name__}"
    else:
        assert name.islower() and inspect.isfunction(value), f"{package}.{name} is a {type(value).__name__}"
        assert getattr(target, name) is value
    doc = getattr(value, "__doc__", None)
    assert doc and doc.strip(), f"{package}.{name} has no docstring"


def test_every_technique_is_exported():
    assert {"ClassifierModule", "DistillationModule", "ResMem"} <= set(importlib.import_module("lightning_methods").__all__)
    assert {"MixupCallback", "PrivacyBudget"} <= set(importlib.import_module("callbacks").__all__)


def test_unknown_attribute_is_an_attribute_error():
    import lightning_methods

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_methods.Nope
