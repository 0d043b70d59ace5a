"""Frozen second models (a teacher, an expensive cascade stage, an EMA copy) held beside a LightningModule.

A frozen model is used, never trained by the module that holds it. Held as a registered submodule it would be in
``parameters()`` (so in the optimizer and in DDP's gradient buckets), in every checkpoint, and switched to train mode
by ``module.train()``. :class:`HoldsFrozenModels` keeps it outside the module tree instead:

* never in ``parameters()``, the optimizer, DDP's buckets or ``state_dict()`` (unless declared ``persistent``, for
  state the module does learn, such as an EMA copy: then it is saved under its name and restored on load);
* always in ``eval()`` mode and with ``requires_grad=False``;
* moved and cast with the module: ``.to(device)``, ``.double()`` and Lightning's precision plugins reach it, because
  they all go through ``nn.Module._apply``.

:func:`load_backbone` reads a backbone's weights from a ``ClassifierModule`` checkpoint (any subclass whose backbone
is ``model``) or a plain state dict, with ``torch.load(weights_only=True)``: loading a checkpoint never runs code
from it, unless the caller explicitly passes ``trusted=True`` for a file they made themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FrozenSlot", "HoldsFrozenModels", "freeze", "load_backbone", "read_checkpoint"]


def freeze(model: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` and ``eval()``, in place; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"A frozen model must be an nn.Module, got {type(model).__name__}.")
    model.requires_grad_(False)
    return model.eval()


class FrozenSlot:
    """A class attribute naming a frozen model of a :class:`HoldsFrozenModels` module.

    ``self.teacher = net`` freezes ``net`` and holds it outside the module tree; ``self.teacher`` returns it (in eval
    mode; None until set). With ``persistent=True`` its weights are saved in the module's ``state_dict`` under the
    slot's name and loaded back (an EMA copy); otherwise they are never saved (a teacher loaded from elsewhere).

    Example::

        >>> class Student(HoldsFrozenModels, nn.Module):
        ...     teacher = FrozenSlot()
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(2, 2)
        ...         self.teacher = nn.Linear(2, 2)
        >>> s = Student()
        >>> [name for name, _ in s.named_parameters()], list(s.state_dict()), s.teacher.training
        (['net.weight', 'net.bias'], ['net.weight', 'net.bias'], False)
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        model = obj.__dict__.get("_frozen_models", {}).get(self.name)
        if model is not None and model.training:  # someone called .train() on it directly: frozen means eval
            model.eval()
        return model

    def __set__(self, obj: Any, value: nn.Module | None) -> None:
        obj.set_frozen(self.name, value, persistent=self.persistent)


class HoldsFrozenModels:
    """Mixin for an ``nn.Module`` (put it before ``nn.Module``/``LightningModule`` in the bases) that holds frozen
    models: declare each as a class attribute ``name = FrozenSlot()``, or call :meth:`set_frozen` directly."""

    _frozen_slot_names: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._frozen_slot_names = frozenset(
            name for klass in cls.__mro__ for name, value in vars(klass).items() if isinstance(value, FrozenSlot)
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ would register a module value as a submodule without asking the descriptor
        if name in self._frozen_slot_names:
            getattr(type(self), name).__set__(self, value)
        else:
            super().__setattr__(name, value)

    def set_frozen(self, name: str, model: nn.Module | None, persistent: bool = False) -> None:
        """Hold ``model`` frozen under ``name`` (None removes it), on the device of this module's parameters (and in
        their dtype when the module was cast away from the default dtype)."""
        models: dict[str, nn.Module] = self.__dict__.setdefault("_frozen_models", {})
        persistent_names: set[str] = self.__dict__.setdefault("_frozen_persistent", set())
        if model is None:
            models.pop(name, None)
            persistent_names.discard(name)
            return
        freeze(model)
        reference = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
        if reference is None:
            reference = next(iter(self.buffers()), None)  # type: ignore[attr-defined]
        if reference is not None:
            model.to(device=reference.device)
            # a model set after the module was cast (a precision plugin's "64-true"/"bf16-true", `.double()`; e.g. a
            # teacher swapped at an epoch start) must take that dtype too, or it fails on the cast inputs; a module
            # still in the default dtype keeps a model the caller gave in another dtype on purpose
            if reference.is_floating_point() and reference.dtype != torch.get_default_dtype():
                model.to(dtype=reference.dtype)
        models[name] = model
        if persistent:
            persistent_names.add(name)
            if not self.__dict__.get("_frozen_hooks"):
                self.register_state_dict_post_hook(_save_persistent)  # type: ignore[attr-defined]
                self.register_load_state_dict_pre_hook(_load_persistent)  # type: ignore[attr-defined]
                self.__dict__["_frozen_hooks"] = True

    def frozen_models(self) -> dict[str, nn.Module]:
        """The frozen models held, by name."""
        return dict(self.__dict__.get("_frozen_models", {}))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        for model in self.__dict__.get("_frozen_models", {}).values():
            model._apply(fn, *args, **kwargs)
        return self


def _save_persistent(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    models = module.__dict__.get("_frozen_models", {})
    for name in sorted(module.__dict__.get("_frozen_persistent", ())):
        for key, value in models[name].state_dict().items():
            state_dict[f"{prefix}{name}.{key}"] = value.detach()


def _load_persistent(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    models = module.__dict__.get("_frozen_models", {})
    for name in sorted(module.__dict__.get("_frozen_persistent", ())):
        start = f"{prefix}{name}."
        own = {key[len(start) :]: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(start)]}
        if own:  # absent from an older checkpoint: keep the current copy (load_state_dict reports nothing missing)
            models[name].load_state_dict(own)


# --------------------------------------------------------------------------------------------------------------------
# Backbones from checkpoints
# --------------------------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, arg: str = "checkpoint", trusted: bool = False) -> dict:
    """``torch.load`` a checkpoint file on the CPU with ``weights_only=True`` (a clear error when it cannot).

    Args:
        path: the file.
        arg: the argument name used in error messages.
        trusted: also unpickle arbitrary objects (``weights_only=False``). Unpickling runs code stored in the file:
            only for a file you made yourself, e.g. a checkpoint of another library that pickles its hyperparameters.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`{arg}={str(path)!r}` does not exist. Point it at a checkpoint of a trained ClassifierModule (e.g. the "
            "`last.ckpt` a ModelCheckpoint wrote; `lightning-methods fit --config configs/distillation/teacher.yaml` "
            "writes checkpoints/teacher/last.ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:
        hint = "" if trusted else (
            " If it holds pickled Python objects (a checkpoint of another library) and you made it yourself, load it "
            "with `trusted=True`: unpickling runs code stored in the file."
        )
        raise ValueError(f"`{arg}={str(path)!r}` is not a readable PyTorch checkpoint: {err}.{hint}") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"`{arg}={str(path)!r}` holds a {type(checkpoint).__name__}, not a checkpoint or state dict.")
    return dict(checkpoint)


def _backbone_state_dict(checkpoint: Mapping, key: str = "model") -> dict[str, torch.Tensor]:
    state = checkpoint.get("state_dict", checkpoint)
    # ClassifierModule and its subclasses hold the backbone under `model.`; anything else (a bare
    # `torch.save(net.state_dict())`) is taken as the backbone itself.
    prefixed = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(f"{key}.")}
    return prefixed or {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _backbone_config(checkpoint: Mapping) -> Mapping | None:
    """The ``class_path``/``init_args`` config of the backbone, when the checkpoint was written by the CLI."""
    hparams = checkpoint.get("hyper_parameters") or {}
    for name in ("model", "student"):
        config = hparams.get(name)
        if isinstance(config, Mapping) and "class_path" in config:
            return config
    return None


def _build_backbone(config: Mapping) -> nn.Module:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=nn.Module)
    parsed = parser.parse_object({"backbone": dict(config)})
    return parser.instantiate_classes(parsed).backbone


def load_backbone(
    path: str | Path, backbone: nn.Module | None = None, arg: str = "checkpoint", trusted: bool = False
) -> nn.Module:
    """Load a backbone from a ``ClassifierModule`` checkpoint (or a subclass's) or a plain state dict.

    Args:
        path: the checkpoint file.
        backbone: the architecture to load into. When omitted, it is rebuilt from the checkpoint's hyperparameters,
            which works for checkpoints written by the ``lightning-methods`` CLI.
        arg: the argument name used in error messages.
        trusted: see :func:`read_checkpoint` (off: the file is loaded with ``weights_only=True``).

    Returns:
        The backbone with the checkpoint's weights (the given object when ``backbone`` is passed); not frozen.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the checkpoint holds another architecture, or records none and ``backbone`` is missing.
    """
    checkpoint = read_checkpoint(path, arg, trusted)
    if backbone is None:
        config = _backbone_config(checkpoint)
        if config is None:
            raise ValueError(
                f"`{arg}={str(path)!r}` does not record its backbone's architecture (it was not written by the "
                "lightning-methods CLI): pass the architecture too, e.g. `teacher=SmallCNN(num_classes=10)`."
            )
        backbone = _build_backbone(config)
    candidates = [_backbone_state_dict(checkpoint)]
    if "state_dict" not in checkpoint:  # a plain state dict may be a backbone whose own submodule is called `model`
        candidates.append({k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)})
    try:
        first_error: RuntimeError | None = None
        for state in candidates:
            try:
                backbone.load_state_dict(state, strict=True)  # a success overwrites every weight of the backbone
                break
            except RuntimeError as err:
                first_error = first_error or err
        else:
            raise first_error  # type: ignore[misc]
    except RuntimeError as err:
        detail = str(err).split("\n\t", 1)[-1][:400]
        raise ValueError(
            f"`{arg}={str(path)!r}` holds weights of another architecture than the given "
            f"{type(backbone).__name__}: {detail}. Pass the backbone (and its arguments) the checkpoint was trained with."
        ) from err
    return backbone
