"""GPU smoke test: every technique of the contract registry, a few steps on CUDA in mixed precision.

For each entry of ``tests/contracts`` (every public module and callback) and each precision (``bf16-mixed`` and
``16-mixed`` by default) it fits the entry's tiny configuration for a few steps on the device, then validates once,
and checks:

* every training loss is finite;
* every piece of the technique's state lives on the device while it trains and evaluates: parameters, buffers
  (ResMem's memory, DPSGD-F's fitted preprocessing), and tensors or modules held outside the module tree
  (DistillationModule's frozen teacher and cached logit table).

Without a GPU it says so and exits 0. ``--device cpu`` runs the same code path on the CPU (``bf16-mixed`` only:
Lightning has no ``16-mixed`` on CPU), which is how the script itself is tested.

    python benchmarks/gpu_smoke.py                         # CUDA, bf16-mixed and 16-mixed, every entry
    python benchmarks/gpu_smoke.py --device cpu            # the same checks on the CPU
    python benchmarks/gpu_smoke.py --entries ResMem --precision bf16-mixed

Exits 1 when any entry fails, after printing a table of every (entry, precision) run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the registry lives in tests/contracts
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # nothing here may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_PRECISIONS = ("bf16-mixed", "16-mixed")


class DeviceCheck(pl.Callback):
    """Records training losses and every tensor of the technique that is not on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.losses: list[float] = []
        self.misplaced: set[str] = set()

    def _check(self, module: pl.LightningModule, when: str) -> None:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.numel() and tensor.device.type != self.device.type:
                self.misplaced.add(f"{name} on {tensor.device} ({when})")
        # state held outside the module tree: a frozen teacher kept out of parameters(), a cache object and its tables
        registered = set(module._modules) | set(module._parameters) | set(module._buffers)
        for name, value in vars(module).items():
            if name not in registered and not name.startswith("_trainer"):
                self._walk(value, name, when, depth=0)

    def _walk(self, value: Any, name: str, when: str, depth: int) -> None:
        if depth > 3 or isinstance(value, (pl.Trainer, pl.LightningModule, pl.LightningDataModule, pl.Callback)):
            return
        if isinstance(value, torch.Tensor):
            if value.numel() and value.device.type != self.device.type:
                self.misplaced.add(f"{name} on {value.device} ({when})")
        elif isinstance(value, nn.Module):
            for sub, tensor in [*value.named_parameters(), *value.named_buffers()]:
                if tensor.numel() and tensor.device.type != self.device.type:
                    self.misplaced.add(f"{name}.{sub} on {tensor.device} ({when})")
        elif isinstance(value, dict):
            for key, item in value.items():
                self._walk(item, f"{name}[{key!r}]", when, depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                self._walk(item, f"{name}[{i}]", when, depth + 1)
        elif hasattr(value, "__dict__") and type(value).__module__.startswith(("lightning_methods", "callbacks")):
            for key, item in vars(value).items():  # our own helper objects (e.g. a logit cache)
                self._walk(item, f"{name}.{key}", when, depth + 1)

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss.detach().float()))
        self._check(module, "training")

    def on_validation_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self._check(module, "evaluation")


def smoke(entry: Any, device: str, precision: str, steps: int) -> dict[str, Any]:
    """Fit ``entry`` for ``steps`` steps on ``device`` in ``precision``, validate once; return what was checked."""
    pl.seed_everything(0)
    built = entry.build()
    check = DeviceCheck(torch.device(device))
    kwargs = dict(entry.trainer_kwargs)
    kwargs.update(built.trainer_kwargs)
    kwargs.update(
        accelerator=device, devices=1, precision=precision, max_steps=steps, limit_val_batches=1,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[*built.callbacks, check],
    )
    trainer = pl.Trainer(**kwargs)
    trainer.fit(built.module, built.datamodule)
    trainer.validate(built.module, built.datamodule, verbose=False)  # evaluation state (e.g. a memory) on the device
    problems = []
    if not check.losses:
        problems.append("no training loss recorded")
    if any(not math.isfinite(v) for v in check.losses):
        problems.append(f"non-finite loss: {check.losses}")
    if check.misplaced:
        problems.append("off the device: " + "; ".join(sorted(check.misplaced)[:5]))
    return {"steps": trainer.global_step, "loss": check.losses[-1] if check.losses else float("nan"), "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--precision", nargs="+", default=None, help="default: bf16-mixed and 16-mixed (bf16-mixed on cpu)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--entries", nargs="+", default=None, help="registry entry names (default: all)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU on this machine, nothing to check (exit 0). "
              "`--device cpu` runs the same checks on the CPU.")
        return 0
    precisions = args.precision or (["bf16-mixed"] if args.device == "cpu" else list(DEFAULT_PRECISIONS))
    if args.device == "cuda" and "bf16-mixed" in precisions and not torch.cuda.is_bf16_supported():
        print("gpu_smoke: this GPU has no bf16 support; skipping bf16-mixed.")
        precisions = [p for p in precisions if p != "bf16-mixed"]
    if args.device == "cpu" and "16-mixed" in precisions:
        print("gpu_smoke: Lightning has no 16-mixed on CPU; skipping it.")
        precisions = [p for p in precisions if p != "16-mixed"]
    torch.set_num_threads(min(4, torch.get_num_threads()))

    from tests.contracts.registry import load_entries

    entries = load_entries()
    if args.entries:
        unknown = set(args.entries) - {e.name for e in entries}
        if unknown:
            parser.error(f"unknown entries {sorted(unknown)}; registered: {[e.name for e in entries]}")
        entries = [e for e in entries if e.name in args.entries]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"gpu_smoke on {device_name}: {len(entries)} entries x {precisions}, {args.steps} steps each")
    rows, failed = [], 0
    for entry in entries:
        for precision in precisions:
            start = time.perf_counter()
            try:
                result = smoke(entry, args.device, precision, args.steps)
            except Exception as err:  # report every entry, then fail
                result = {"steps": 0, "loss": float("nan"), "problems": [f"{type(err).__name__}: {err}".splitlines()[0][:200]]}
                traceback.print_exc()
            failed += bool(result["problems"])
            status = "ok" if not result["problems"] else "FAIL: " + " | ".join(result["problems"])
            rows.append(f"| {entry.name} | {precision} | {result['steps']} | {result['loss']:.4g} | "
                        f"{time.perf_counter() - start:.1f} s | {status} |")
    print("\n| entry | precision | steps | last loss | time | result |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ngpu_smoke: {len(rows) - failed} of {len(rows)} runs passed on {device_name}.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
