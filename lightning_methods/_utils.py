"""Small private helpers shared by the techniques of this package (not public API)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from types import FrameType
from typing import Any

import torch
from torch import nn

__all__ = [
    "lazy_exports",
    "save_hparams",
    "check_num_classes",
    "check_targets",
    "probe_output",
]


def lazy_exports(module_name: str, exports: Mapping[str, str]):
    """Build the ``__getattr__`` / ``__dir__`` pair of a package that imports its members on first use.

    A technique's heavy dependencies (transformers, opacus, faiss) are imported only when that technique is
    touched, so ``import lightning_methods`` stays cheap and one broken optional piece never breaks the others.

    Args:
        module_name: ``__name__`` of the package.
        exports: public name -> submodule (relative, e.g. ``".classifier"``) that defines it; a name equal to the
            submodule's own name exports the submodule itself.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        submodule = importlib.import_module(exports[name], module_name)
        value = submodule if exports[name].lstrip(".") == name else getattr(submodule, name)
        globals_ = importlib.import_module(module_name).__dict__
        globals_[name] = value  # cache: later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(module_name).__dict__) | set(exports))

    return __getattr__, __dir__


def _cli_given_hparams() -> dict | None:
    """The hyperparameters LightningCLI hands to the module being instantiated, or None outside the CLI.

    LightningCLI passes the parsed config (``class_path`` / ``init_args`` dicts for nested modules) through a
    context variable so that ``load_from_checkpoint`` can rebuild injected backbones. There is no public accessor;
    if a Lightning release moves it we fall back to the plain-Python behaviour (modules are not saved).
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - depends on the Lightning release
        return None
    return _given_hyperparameters.get()


def _is_plain_data(value: Any) -> bool:
    """Whether ``value`` survives ``torch.load(weights_only=True)``: numbers, strings, None and containers of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    return False


def save_hparams(module: Any, frame: FrameType | None = None, ignore: list[str] | None = None) -> None:
    """``save_hyperparameters`` that stores only plain data, so checkpoints load with ``weights_only=True``.

    Built from the CLI, a backbone (or optimizer) argument is stored as its ``class_path``/``init_args`` config, so
    ``load_from_checkpoint(path)`` rebuilds it with no arguments. Built in Python, it is an object (a module, a
    class, a ``functools.partial``): it is left out of the hyperparameters (a backbone's weights are in the
    ``state_dict`` anyway) and must be passed again, ``load_from_checkpoint(path, model=...)``, as Lightning
    recommends for modules. Pickling such objects would make the checkpoint unloadable under ``weights_only=True``
    (the default of ``torch.load`` since torch 2.6) and tie it to the code's import paths.
    """
    frame = frame if frame is not None else inspect.currentframe().f_back  # type: ignore[union-attr]
    given = _cli_given_hparams()
    ignore = list(ignore or [])
    if given is None:
        from lightning.pytorch.core.mixins import HyperparametersMixin
        from lightning.pytorch.utilities.parsing import collect_init_args

        # the same frames save_hyperparameters reads: this class's __init__ and those of its subclasses
        for init_args in collect_init_args(frame, [], classes=(HyperparametersMixin,)):
            ignore += [k for k, v in init_args.items() if not _is_plain_data(v)]
    else:
        ignore += [k for k, v in given.items() if not _is_plain_data(v)]
    module.save_hyperparameters(ignore=ignore, frame=frame)


def check_num_classes(num_classes: int, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`{name}` must be an integer >= 2, got {num_classes!r}.")
    return num_classes


def probe_output(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Run ``model`` on two zero inputs of ``input_shape`` in eval mode, without gradients or side effects."""
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(2, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)


def check_model_against_data(model: nn.Module, num_classes: int, datamodule: Any, arg: str = "model") -> None:
    """Fail before training when the backbone, ``num_classes`` and the datamodule disagree.

    Checks the datamodule's ``num_classes`` (when it has one) and the backbone's output width on a probe input of
    the datamodule's ``input_shape``: a mismatch otherwise surfaces as a shape error deep inside the loss.
    """
    if datamodule is None:
        return
    data_classes = getattr(datamodule, "num_classes", None)
    if data_classes is not None and data_classes != num_classes:
        raise ValueError(
            f"`num_classes={num_classes}` but {type(datamodule).__name__} has {data_classes} classes. "
            f"Set `num_classes={data_classes}` (the CLI links it from the datamodule when you leave it out)."
        )
    input_shape = getattr(datamodule, "input_shape", None)
    if input_shape is None:
        return
    try:
        out = probe_output(model, tuple(input_shape))
    except Exception as err:  # a shape error here is the user's config, not our bug: say so
        raise ValueError(
            f"`{arg}` ({type(model).__name__}) cannot take inputs of shape {tuple(input_shape)} from "
            f"{type(datamodule).__name__}: {err}. Check its input size arguments (e.g. `in_features`)."
        ) from err
    if out.ndim != 2 or out.shape[-1] != num_classes:
        raise ValueError(
            f"`{arg}` ({type(model).__name__}) outputs shape {tuple(out.shape[1:])} per example but "
            f"`num_classes={num_classes}`: its last layer must output {num_classes} logits."
        )


def check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Validate a batch of class-index or soft targets against ``logits`` of shape ``(N, C)``."""
    if targets.ndim == 1:
        if targets.is_floating_point():
            raise TypeError("Integer class-index targets must have an integer dtype, got " f"{targets.dtype}.")
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"Got {targets.shape[0]} targets for {logits.shape[0]} inputs.")
    elif targets.ndim == 2:
        if targets.shape != logits.shape:
            raise ValueError(f"Soft targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}.")
    else:
        raise ValueError(f"Targets must be class indices (N,) or soft targets (N, C); got shape {tuple(targets.shape)}.")
