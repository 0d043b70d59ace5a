"""The ``lightning-methods`` command: LightningCLI for any LightningModule and LightningDataModule.

``lightning-methods fit --config configs/quickstart.yaml`` trains; ``validate``, ``test`` and ``predict`` evaluate;
``--print_config`` shows the full, resolved config. Model and data are chosen by ``class_path`` (subclass mode),
so a user's own modules work as well as ours.

What the datamodule knows is linked into the model so a config never repeats it: ``num_classes`` into the
module, and ``num_classes``, ``in_features``, ``in_channels`` and ``input_size`` into the injected backbone
(``model``, ``student`` or ``teacher``) whenever both sides have the argument. A value given by hand that
contradicts the datamodule is an error, not silently overridden.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import LightningCLI

__all__ = ["LightningMethodsCLI", "cli_main", "main", "LINKED_ATTRIBUTES", "BACKBONE_ARGUMENTS"]

#: datamodule attributes copied into models (when the datamodule defines them)
LINKED_ATTRIBUTES = ("num_classes", "in_features", "in_channels", "input_size")
#: names of the injected-backbone arguments that receive them
BACKBONE_ARGUMENTS = ("model", "student", "teacher")


def _config_mappings(args: Any) -> list[dict]:
    """The YAML/dict configs and dotted overrides in ``args``, as mappings, in the order given."""
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
            text = Path(value).read_text() if Path(value).is_file() else value
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            if isinstance(loaded, dict):
                mappings.append(loaded)
        match = re.match(r"--model\.(?:init_args\.)?(\w+)", arg)
        if match:
            mappings.append({"model": {"init_args": {match.group(1): None}}})
    return mappings


def _backbones_in(args: Any) -> list[str]:
    """The backbone arguments (``model``, ``student``, ``teacher``) that the given config sets.

    jsonargparse cannot link into an argument the chosen module does not have (it fails instead of skipping), so
    links go only to the backbones the config actually names; a module's backbones are always named in its config.
    """
    found: set[str] = set()
    for mapping in _config_mappings(args):
        for section in [mapping, *(v for v in mapping.values() if isinstance(v, dict))]:  # also `fit: {model: ...}`
            model = section.get("model")
            if isinstance(model, dict):
                init_args = model.get("init_args", model)
                if isinstance(init_args, dict):
                    found.update(name for name in BACKBONE_ARGUMENTS if name in init_args)
    return [name for name in BACKBONE_ARGUMENTS if name in found]


def _link_targets(backbones: Any = BACKBONE_ARGUMENTS) -> dict[str, str]:
    targets = {"model.init_args.num_classes": "num_classes"}
    for backbone in backbones:
        for attr in LINKED_ATTRIBUTES:
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
        self._link_map = _link_targets(_backbones_in(sys.argv[1:] if raw is None else raw))
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
            except (KeyError, TypeError):
                continue
            if value is not None:
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


def cli_main(args: list[str] | dict | None = None, run: bool = True) -> LightningMethodsCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` for programmatic use and tests."""
    return LightningMethodsCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
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
