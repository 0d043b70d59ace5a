"""Read a representation from a named layer of any model, with a forward hook (no surgery on the model).

Techniques that need an embedding (ResMem, post-hoc deferral, Mahalanobis OOD scores, the linearity probe) take a
submodule name and read its output here, so any torchvision / timm / HF model works unchanged.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["resolve_layer", "capture_layers", "layer_output", "forward_with_embedding", "default_embedding_layer"]


def resolve_layer(model: nn.Module, name: Any, arg: str = "embedding_layer", under: str | None = None) -> nn.Module:
    """The submodule ``name`` of ``model``, or a ValueError that suggests the closest names.

    Args:
        model: the model to search.
        name: a dotted submodule name (as in ``model.named_modules()``).
        arg: the argument name used in error messages.
        under: a submodule name to try as a prefix when ``name`` alone is not found (e.g. ``"model"``: a layer of
            a LightningModule's injected backbone may be named without the ``model.`` prefix).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`{arg}` must be a submodule name (a non-empty str), got {name!r}.")
    modules = dict(model.named_modules())
    found = modules.get(name)
    if found is None and under is not None:
        found = modules.get(f"{under}.{name}")
    if found is None:
        names = [n for n in modules if n]
        if under is not None:  # also offer the backbone's own names (without the prefix) that a user would type
            names += [n[len(under) + 1 :] for n in names if n.startswith(f"{under}.")]
        close = difflib.get_close_matches(name, names, n=5) or names[:10]
        raise ValueError(
            f"`{arg}={name!r}`: {type(model).__name__} has no submodule of that name. Closest names: {close} "
            f"(`dict(model.named_modules())` lists them all)."
        )
    return found


def default_embedding_layer(model: nn.Module, name: str | None, arg: str = "embedding_layer") -> str:
    """``name``, or the model's own ``PENULTIMATE`` attribute (the nets of :mod:`lightning_methods.nets` set it)."""
    if name is None:
        name = getattr(model, "PENULTIMATE", None)
        if name is None:
            raise ValueError(
                f"`{arg}` is not set and {type(model).__name__} has no `PENULTIMATE` attribute: name the submodule "
                f"whose output is the embedding, e.g. `{arg}='avgpool'` for a torchvision ResNet."
            )
    resolve_layer(model, name, arg)
    return name


@contextlib.contextmanager
def capture_layers(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the outputs of ``layers`` (name -> submodule) during the forward passes run inside the ``with``.

    The dict yielded holds, after each forward, the latest output of every layer that ran (the first element when
    a layer returns a tuple, as HF blocks do). The hooks are removed on exit, also after an error.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name] = output[0] if isinstance(output, (tuple, list)) and output else output

        return fn

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def layer_output(captured: dict[str, Any], name: str, layer: nn.Module, model: nn.Module, batch: int | None = None,
                 arg: str = "embedding_layer") -> torch.Tensor:
    """The captured output of ``name``, checked: a tensor (the layer ran) with one row per example."""
    out = captured.get(name)
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"`{arg}={name!r}` ({type(layer).__name__}) did not produce a tensor in {type(model).__name__}'s forward "
            "(is it called there?). Pick a submodule that forward runs and that returns one tensor."
        )
    if batch is not None and (out.ndim == 0 or out.shape[0] != batch):
        raise ValueError(
            f"`{arg}={name!r}` outputs shape {tuple(out.shape)}, not one row per example ({batch}): pick a layer "
            "whose output is (batch, ...)."
        )
    return out


def forward_with_embedding(
    model: nn.Module, layer: str, x: Any, forward: Callable[[Any], Any] | None = None, arg: str = "embedding_layer"
) -> tuple[Any, torch.Tensor]:
    """One forward of ``model`` on ``x``: its outputs and the output of ``layer`` flattened to ``(N, dim)``.

    Args:
        model: the model holding ``layer``.
        layer: the submodule name.
        x: the input batch.
        forward: what to run (default ``model(x)``), e.g. a wrapper that also runs ``model``.
        arg: the argument name used in error messages.
    """
    module = resolve_layer(model, layer, arg)
    with capture_layers({layer: module}) as captured:
        outputs = forward(x) if forward is not None else model(x)
    batch = outputs.shape[0] if isinstance(outputs, torch.Tensor) and outputs.ndim > 0 else None
    emb = layer_output(captured, layer, module, model, batch, arg)
    return outputs, emb.reshape(len(emb), -1)  # (N,) -> (N, 1): flatten(1) fails on one dimension
