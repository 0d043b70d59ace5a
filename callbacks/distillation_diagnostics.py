"""Log the distillation papers' diagnostics while a student trains: confidence exaggeration and supervision complexity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_methods.distillation_diagnostics import (
    collect_logits,
    confidence_deciles,
    empirical_ntk,
    exaggeration_slope,
    supervision_complexity_from_kernel,
)

__all__ = ["DistillationDiagnostics"]


class DistillationDiagnostics(Callback):
    """Measure how a distilled student deviates from its teacher, on fixed train and validation subsets.

    Every ``every_n_epochs`` training epochs (and after the last one) it computes, on the same ``num_samples``
    un-augmented points of each split:

    * the **confidence-exaggeration slope** of Nagarajan et al. (arXiv 2301.12923): least-squares slope of
      ``logit p_s[y*]`` on ``logit p_t[y*]`` (``y*`` the teacher's top class); > 1 = the student exaggerates;
      logged as ``{split}_exaggeration_slope``, with ``{split}_low_conf_gap`` = student minus teacher confidence in
      the teacher's least-confident decile (negative = the student is even less sure there);
    * the **adjusted supervision complexity** of Harutyunyan et al. (arXiv 2301.12245) of the teacher's
      targets ``softmax(z_t / tau)`` (the module's temperature) and of the one-hot labels, under the student's
      current empirical NTK on ``sc_num_samples`` training points: ``sc_teacher`` and ``sc_onehot``.

    Decile tables and all values are kept in :attr:`history` (saved in checkpoints).

    Args:
        num_samples: points per split for the exaggeration diagnostics.
        every_n_epochs: how often to measure.
        splits: datamodule splits to measure on (``"train"``, ``"val"``, ``"test"``).
        supervision_complexity: also compute the supervision complexities (one NTK per measurement: its cost is
            ``sc_num_samples`` Jacobians of the student and an ``n x n`` Cholesky).
        sc_num_samples: training points for the kernel (keep it below the student's parameter count).
        ridge: relative ridge of the Cholesky solve (units of ``tr K / n``).
        seed: seed of the subsets.

    Note:
        Needs a :class:`~lightning_methods.DistillationModule` and a datamodule with ``dataset(split)`` (every
        :class:`~datamodules.ArrayDataModule`). Every DDP rank computes the same values on the same subsets, so
        nothing needs to be reduced.

    Example::

        >>> trainer = pl.Trainer(callbacks=[DistillationDiagnostics(num_samples=256, sc_num_samples=128)])
    """

    def __init__(
        self,
        num_samples: int = 512,
        every_n_epochs: int = 1,
        splits: Sequence[str] = ("train", "val"),
        supervision_complexity: bool = True,
        sc_num_samples: int = 256,
        ridge: float = 1e-6,
        seed: int = 0,
    ) -> None:
        for name, value in (("num_samples", num_samples), ("every_n_epochs", every_n_epochs), ("sc_num_samples", sc_num_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if num_samples < 10:
            raise ValueError(f"`num_samples` must be >= 10 (ten confidence deciles), got {num_samples}.")
        splits = [splits] if isinstance(splits, str) else list(splits)
        if not splits or any(s not in ("train", "val", "test") for s in splits):
            raise ValueError(f"`splits` must be a non-empty list of 'train', 'val', 'test', got {splits!r}.")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.splits = splits
        self.supervision_complexity = supervision_complexity
        self.sc_num_samples = sc_num_samples
        self.ridge = ridge
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "teacher_logits", None)):
            raise TypeError(
                f"DistillationDiagnostics needs a DistillationModule (with a teacher), got {type(pl_module).__name__}."
            )
        datamodule = trainer.datamodule
        if datamodule is None or not callable(getattr(datamodule, "dataset", None)):
            raise ValueError(
                "DistillationDiagnostics needs a datamodule with `dataset(split)` (e.g. any ArrayDataModule) to draw "
                "fixed, un-augmented subsets from."
            )
        generator = torch.Generator().manual_seed(self.seed)
        needed = {*self.splits, *(["train"] if self.supervision_complexity else [])}
        size = max(self.num_samples, self.sc_num_samples if self.supervision_complexity else 0)
        for split in sorted(needed):
            dataset = datamodule.dataset(split)
            index = torch.randperm(len(dataset), generator=generator)[: min(size, len(dataset))].tolist()
            items = [dataset[i] for i in index]
            self._data[split] = (torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items]))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        record: dict[str, Any] = {"epoch": epoch}
        student, teacher = pl_module.model, pl_module.teacher
        for split in self.splits:
            x, _ = self._data[split]
            x = x[: self.num_samples]
            p_s = collect_logits(student, x).softmax(-1)
            p_t = collect_logits(teacher, x).softmax(-1)
            slope = exaggeration_slope(p_s, p_t)["slope"]
            deciles = confidence_deciles(p_s, p_t)
            record[f"{split}_exaggeration_slope"] = slope
            record[f"{split}_low_conf_gap"] = deciles[0]["student_minus_teacher"]
            record[f"{split}_deciles"] = deciles
        if self.supervision_complexity:
            x, y = self._data["train"]
            x, y = x[: self.sc_num_samples], y[: self.sc_num_samples]
            kernel = empirical_ntk(student, x.to(pl_module.device))
            tau = getattr(pl_module, "temperature", 1.0)
            soft = (collect_logits(teacher, x) / tau).softmax(-1)
            num_classes = getattr(pl_module, "num_classes", soft.shape[-1])
            record["sc_teacher"] = supervision_complexity_from_kernel(kernel, soft, self.ridge)
            record["sc_onehot"] = supervision_complexity_from_kernel(kernel, y, self.ridge, num_classes=num_classes)
        self.history.append(record)
        for key, value in record.items():
            if key != "epoch" and not key.endswith("_deciles"):
                pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=True)  # equal on all ranks

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
