"""The ``lightning-methods`` command: LightningCLI for any LightningModule and LightningDataModule.

``lightning-methods fit --config configs/quickstart.yaml`` trains; ``validate``, ``test`` and ``predict`` evaluate;
``--print_config`` shows the full, resolved config. Model and data are chosen by ``class_path`` (subclass mode),
so a user's own modules work as well as ours.

What the datamodule knows is linked into the model so a config never repeats it: ``num_classes`` into the
module, and ``num_classes``, ``in_features``, ``in_channels`` and ``input_size`` into the injected backbone
(``model``, ``student`` or ``teacher``) whenever both sides have the argument. Arguments left out or at their
defaults are filled in; a value given by hand that contradicts the datamodule is an error, not silently overridden.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

__all__ = ["LightningMethodsCLI", "cli_main", "main", "LINKED_ATTRIBUTES", "BACKBONE_ARGUMENTS"]

#: datamodule attributes copied into models (when the datamodule defines them)
LINKED_ATTRIBUTES = ("num_classes", "in_features", "in_channels", "input_size")
#: names of the injected-backbone arguments that receive them
BACKBONE_ARGUMENTS = ("model", "student", "teacher")


def _config_mappings(args: Any) -> list[dict]:
    """The configs in ``args`` (YAML files or strings, or a dict) and its ``--model...`` overrides, in order."""
    if isinstance(args, dict):
        return [args]
    mappings: list[dict] = []
    args = list(args or [])
    for i, arg in enumerate(args):
        value = None
        if arg in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                loaded = yaml.safe_load(Path(value).read_text() if Path(value).is_file() else value)
            except (yaml.YAMLError, OSError):
                continue
            if isinstance(loaded, dict):
                mappings.extend([loaded, *(v for v in loaded.values() if isinstance(v, dict))])  # also `fit: {...}`
            continue
        # overrides: --model=X, --model.class_path=X, --model[.init_args].<backbone>[.class_path]=X, ...
        if arg == "--model" or arg.startswith(("--model=", "--model.")):
            key, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                value = args[i + 1]
            parts = [part for part in key.split(".")[1:] if part != "init_args"]
            if parts in ([], ["class_path"]):
                mappings.append({"model": {"class_path": value}})
            elif parts[0] in BACKBONE_ARGUMENTS:
                names_class = parts[1:] in ([], ["class_path"])
                mappings.append({"model": {"init_args": {parts[0]: {"class_path": value if names_class else None}}}})
    return mappings


def _peek_classes(args: Any) -> dict[str, str | None]:
    """Which module and backbones the config chooses: ``{"": module class_path, "<backbone>": class_path}``.

    Values are ``None`` where the config names the argument but its class cannot be read off the arguments.
    """
    found: dict[str, str | None] = {}
    for mapping in _config_mappings(args):
        model = mapping.get("model")
        if isinstance(model, str):
            found[""] = model
        if not isinstance(model, dict):
            continue
        if model.get("class_path"):
            found[""] = model["class_path"]
        init_args = model.get("init_args", model)
        if not isinstance(init_args, dict):
            continue
        for name in BACKBONE_ARGUMENTS:
            if name in init_args:
                value = init_args[name]
                class_path = value if isinstance(value, str) else (value or {}).get("class_path") if isinstance(value, dict) else None
                found[name] = class_path or found.get(name)
    return found


def _accepts(class_path: str | None, parameter: str) -> bool:
    """Whether the class at ``class_path`` takes ``parameter`` (True when the class cannot be resolved here)."""
    if not class_path or "." not in class_path:
        return True
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return True
    return parameter in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _default_of(class_path: str | None, parameter: str) -> Any:
    """The default of ``parameter`` in the signature of the class at ``class_path`` (None if none or unknown)."""
    try:
        module_name, _, name = (class_path or "").rpartition(".")
        default = inspect.signature(getattr(importlib.import_module(module_name), name)).parameters[parameter].default
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default


def _link_targets(classes: dict[str, str | None]) -> dict[str, str]:
    """Link target -> datamodule attribute, for the module and backbones that take the argument.

    jsonargparse fails on a link into a backbone argument the module lacks, and LightningCLI stores every applied
    link in the checkpoint's hyperparameters (so a link into a parameter the class lacks breaks
    ``load_from_checkpoint``): links go only where the chosen classes accept them.
    """
    targets = {}
    if _accepts(classes.get(""), "num_classes"):
        targets["model.init_args.num_classes"] = "num_classes"
    for backbone in BACKBONE_ARGUMENTS:
        if backbone not in classes:
            continue
        for attr in LINKED_ATTRIBUTES:
            if _accepts(classes[backbone], attr):
                targets[f"model.init_args.{backbone}.init_args.{attr}"] = attr
    return targets


class LightningMethodsCLI(LightningCLI):
    """LightningCLI with datamodule-to-model links and an optional test run after ``fit``.

    Adds one top-level option to ``fit``: ``test_after_fit: true`` runs ``trainer.test`` on the datamodule when
    fitting ends (on the best checkpoint when a ``ModelCheckpoint`` monitors a metric), so one command trains and
    prints test metrics.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raw = kwargs.get("args")
        self._link_map = _link_targets(_peek_classes(sys.argv[1:] if raw is None else raw))
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        for target, attr in self._link_map.items():
            parser.link_arguments(f"data.{attr}", target, apply_on="instantiate")
        # LightningCLI builds every subcommand's parser with this hook and offers no public way to tell them apart;
        # the option is accepted everywhere and only `fit` acts on it.
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only (ignored by other subcommands): run `test` on the datamodule when fitting ends.",
        )

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        given = {}
        for key in self._link_map:
            try:
                value = config[key]
                class_path = config[key.rsplit(".init_args.", 1)[0] + ".class_path"]
            except (KeyError, TypeError):
                continue
            if value is not None and value != _default_of(class_path, key.rsplit(".", 1)[1]):
                given[key] = value
        super().instantiate_classes()
        for key, value in given.items():
            attr = self._link_map[key]
            data_value = getattr(self.datamodule, attr, None)
            if data_value is not None and data_value != value:
                option = key.replace(".init_args", "")
                raise ValueError(
                    f"`{option}={value}` contradicts the datamodule ({type(self.datamodule).__name__}.{attr} = "
                    f"{data_value}). The CLI links `{attr}` from the datamodule: remove it from your config."
                )

    def after_fit(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.get("test_after_fit"):
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and getattr(ckpt, "monitor", None) and ckpt.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


class RunConfigCallback(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``, except where it would write ``config.yaml`` into the working directory.

    Without a logger and a ``default_root_dir`` of its own, a run's log directory is the working directory: running
    a config from a checkout would then rewrite ``./config.yaml``. Such a run writes ``runs/config.yaml`` instead
    (``runs/`` is ignored by git); with a logger or a given ``default_root_dir`` (even the working directory) the
    config goes where Lightning puts it.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `default_root_dir` left at its default (the working directory); one the user gave, even the working
        # directory itself, is where they asked for the config
        given_root = (self.config.get("trainer") or {}).get("default_root_dir")
        if trainer.logger is None and given_root is None and Path(trainer.default_root_dir).resolve() == Path.cwd().resolve():
            self.save_to_log_dir = False
            self._to_runs = True
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(self, "_to_runs", False):
            path = Path(trainer.default_root_dir) / "runs" / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile)


def cli_main(args: list[str] | dict | None = None, run: bool = True) -> LightningMethodsCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` for programmatic use and tests."""
    return LightningMethodsCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Entry point of the ``lightning-methods`` console script."""
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
