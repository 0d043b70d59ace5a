"""ResMem: residual memorization with k-nearest neighbours.

Yang, Lukasik, Nagarajan, Li, Rawat, Zaheer, Menon, Kumar. *ResMem: Learn what you can and memorize the rest.*
NeurIPS 2023, arXiv:2302.01576.

The paper's two-stage algorithm (its Fig. 1 and the algorithm it illustrates), and where each step lives below:

1. Train a base model ``f`` as usual (:class:`~lightning_methods.classifier.ClassifierModule`'s training: ``fit``).
2. On the training set, memorize the residuals ``r_i = y_i - f(x_i)`` (:meth:`ResMem.build_memory`). For
   classification (the paper's image-classification experiments) ``y_i`` is one-hot and ``f(x) = softmax(z(x) / T)``
   with a temperature ``T``: with ``T = 1`` an interpolating network leaves ~0 residuals, so ``T`` is a
   hyperparameter (:func:`residuals`).
3. At test time add the residuals of the ``k`` nearest training points in embedding space, weighted by
   ``w_i(x) ∝ exp(-||phi(x) - phi(x_i)|| / sigma)`` normalised over the ``k``:
   ``f_ResMem(x) = f(x) + sum_i w_i(x) r_i`` (:func:`resmem_weights`, :func:`combine`, :meth:`ResMem.predict`).
   ``phi`` is the base model's penultimate (pre-logit) representation, L2-normalised so ``sigma`` does not depend
   on its scale. The classifier predicts ``argmax f_ResMem(x)``, which is not a distribution.
4. ``(k, sigma, T)`` are chosen on held-out data (:meth:`ResMem.tune`), or leave-one-out on the memory itself,
   where a training point is never its own neighbour.

Regression (``task="regression"``) is the same with ``f(x)`` the model's output and ``r_i = y_i - f(x_i)``.
The nearest neighbours are exact (:mod:`lightning_methods._knn`: blocked matrix multiply + top-k in torch, or faiss).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from lightning_methods._distributed import map_in_order, world
from lightning_methods._knn import BACKENDS, build_knn_index, faiss_available
from lightning_methods._layers import default_embedding_layer, forward_with_embedding
from lightning_methods._utils import check_targets, probe_output
from lightning_methods.classifier import ClassifierModule, hard_targets

__all__ = ["ResMem", "residuals", "resmem_weights", "combine", "base_prediction", "DEFAULT_TUNE_GRID"]

TASKS = ("classification", "regression")
#: the grid of :meth:`ResMem.tune` when none is given (the paper-brief's CPU-scale grid)
DEFAULT_TUNE_GRID: dict[str, list[float]] = {"k": [5, 20, 50], "sigma": [0.05, 0.2], "temperature": [1.0, 2.0]}
_MEMORY = ("memory_embeddings", "memory_outputs", "memory_targets", "memory_residual_values", "memory_residual_index")


# -- the math of ResMem (pure functions) ---------------------------------------------------------------------------
def base_prediction(outputs: torch.Tensor, temperature: float, task: str = "classification") -> torch.Tensor:
    """The base model's prediction ``f(x)``: ``softmax(z / T)`` for classification, the output for regression."""
    return torch.softmax(outputs / temperature, dim=-1) if task == "classification" else outputs


def residuals(targets: torch.Tensor, outputs: torch.Tensor, temperature: float, task: str = "classification") -> torch.Tensor:
    """``r = y - f(x)`` with ``f`` from :func:`base_prediction` (targets one-hot/soft for classification)."""
    return targets - base_prediction(outputs, temperature, task)


def resmem_weights(sq_dists: torch.Tensor, sigma: float) -> torch.Tensor:
    """``w_i ∝ exp(-||phi(x) - phi(x_i)|| / sigma)``, normalised over the last dimension (the ``k`` neighbours).

    Args:
        sq_dists: squared Euclidean distances to the neighbours, ``(..., k)``.
        sigma: bandwidth; small values put all the weight on the nearest neighbour.
    """
    return torch.softmax(-sq_dists.clamp_min(0).sqrt() / sigma, dim=-1)


def combine(base: torch.Tensor, neighbour_residuals: torch.Tensor, sq_dists: torch.Tensor, sigma: float) -> torch.Tensor:
    """``f(x) + sum_i w_i r_i``: base predictions ``(N, C)``, residuals ``(N, k, C)``, squared distances ``(N, k)``."""
    return base + (resmem_weights(sq_dists, sigma).unsqueeze(-1) * neighbour_residuals).sum(1)


# -- small private helpers -----------------------------------------------------------------------------------------
def _check_hyperparameters(k: Any, sigma: Any, temperature: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` (neighbours) must be a positive integer, got {k!r}.")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"`sigma` (kernel bandwidth) must be a positive number, got {sigma!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")


def _resize_memory_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Let ``load_state_dict`` replace the memory whatever its size (an empty memory included)."""
    for name in _MEMORY:
        value = state_dict.get(prefix + name)
        if value is not None:
            setattr(module, name, torch.empty_like(value, device=getattr(module, name).device))
    module._memory_version += 1


class ResMem(ClassifierModule):
    """ResMem (Yang et al., NeurIPS 2023): a base model plus a k-nearest-neighbour memory of its training residuals.

    ``fit`` trains the injected backbone exactly like :class:`~lightning_methods.classifier.ClassifierModule` (or
    not at all with ``max_epochs=0``: wrap an already trained backbone), then builds the memory in one pass over the
    training set: the L2-normalised output of ``embedding_layer`` (a submodule name, read with a forward hook, so any
    backbone works unchanged), the model's outputs and the targets of every training example. Under DDP each rank
    embeds an interleaved shard and the shards are all-gathered, so every rank holds the full memory, in dataset
    order. With ``tune_on_val`` it then picks ``(k, sigma, temperature)`` on the validation split. Predictions are
    ``f(x) + sum_i w_i r_i`` over the ``k`` nearest training points (see the module docstring for the equations).

    Logs ``val_acc`` / ``test_acc`` (the base model) and ``val_resmem_acc`` / ``test_resmem_acc`` (ResMem) with
    torchmetrics once the memory exists (``*_mse`` / ``*_resmem_mse`` for regression); ``predict_step`` returns
    ResMem scores ``(N, C)`` (argmax for the class) or regression outputs.

    Args:
        model: the backbone, returning logits ``(N, C)`` (classification) or predictions ``(N,)`` / ``(N, D)``.
        num_classes: number of classes (the CLI links it from the datamodule); leave unset for regression.
        embedding_layer: name of the submodule whose output is the embedding (``"avgpool"`` for a torchvision
            ResNet); defaults to the backbone's ``PENULTIMATE`` attribute (``"embedding"`` for :mod:`~lightning_methods.nets`).
        k: neighbours per prediction.
        sigma: bandwidth of the weights ``exp(-distance / sigma)`` (distances between unit vectors are in [0, 2]).
        temperature: ``T`` of ``softmax(z / T)`` in the base prediction and the residuals (classification).
        task: ``"classification"`` or ``"regression"``.
        normalize: L2-normalise embeddings (the paper's choice; keeps ``sigma`` scale-free).
        tune_on_val: after building the memory in ``fit``, pick ``(k, sigma, temperature)`` on the validation split.
        tune_grid: the grid of ``tune_on_val``: ``{"k": [...], "sigma": [...], "temperature": [...]}``; a key left
            out keeps its value; ``None`` uses :data:`DEFAULT_TUNE_GRID`.
        knn_backend: ``"torch"`` (exact blocked search on the model's device) or ``"faiss"`` (``IndexFlatL2``, CPU;
            needs ``faiss-cpu``); both return the same neighbours.
        block_size: keys per tile of the torch search (a tile holds ``512 x block_size`` scores).
        residual_top_m: keep only the ``m`` largest-magnitude entries of each memorised residual (the paper's
            sparse residuals for large label spaces, Sec. 3): once the memory is built and tuned, it holds
            ``N x m`` values and class indices instead of the ``N x C`` outputs and targets. ``None`` keeps the
            dense memory, which ``tune`` needs (the residuals depend on the temperature).
        memory_batch_size: batch size of the memory pass and of tuning.
        save_path: where to write a checkpoint (weights, memory, chosen hyperparameters) once ``fit`` has built the
            memory. Checkpoints that ``ModelCheckpoint`` writes during ``fit`` predate the memory.
        optimizer: optimizer of the base model's training (as ``ClassifierModule``).
        lr_scheduler: optional scheduler (as ``ClassifierModule``).
        label_smoothing: label smoothing of the base model's training loss (classification).

    Note:
        The memory is built from the final weights, when training ends (or at the start of ``fit`` when there is
        nothing to train), from ``datamodule.dataset("train")`` (unaugmented) when the datamodule has it, else from
        the training dataloader's dataset, in order and without its sampler. It is part of the ``state_dict`` (the
        ``memory_*`` buffers, with ``k``, ``sigma`` and ``temperature`` as extra state), so it is saved in
        checkpoints, restored by ``load_from_checkpoint`` and sent back from ``ddp_spawn`` workers; loading a
        checkpoint written before the memory existed empties it. Memory size (:attr:`memory_bytes`) is
        ``N x (dim + C)`` floats plus ``N`` integer labels (soft targets: ``N x C`` more floats), or
        ``N x (dim + 2 m)`` numbers with ``residual_top_m=m``.

        One rule for ``(k, sigma, temperature)``: they belong to the memory. What ``tune`` chooses is written into
        ``hparams`` (so the checkpoint's hyperparameters hold it) and saved with the memory, and ``load_state_dict``
        restores it (also when a ``ddp_spawn`` worker hands its state back); a value given explicitly that differs
        from the saved one (``load_from_checkpoint(path, k=5)``, or a module built with another ``k`` and resumed)
        wins over it. ``fit`` trains a new base model, so it drops the
        memory of the previous one when it starts (nothing is evaluated against a stale memory) and builds a new one
        when training ends. :meth:`predict` always runs the backbone in eval mode.

    Example::

        >>> from lightning_methods.nets import MLP
        >>> from torch.utils.data import TensorDataset
        >>> resmem = ResMem(MLP(in_features=8, num_classes=3, hidden_sizes=[16]), num_classes=3, k=4)
        >>> resmem.build_memory(TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,))))
        >>> resmem.memory_size, resmem.predict(torch.randn(5, 8)).shape
        (32, torch.Size([5, 3]))
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int | None = None,
        embedding_layer: str | None = None,
        k: int = 20,
        sigma: float = 0.1,
        temperature: float = 1.0,
        task: Literal["classification", "regression"] = "classification",
        normalize: bool = True,
        tune_on_val: bool = False,
        tune_grid: dict[str, list[float]] | None = None,
        knn_backend: Literal["torch", "faiss"] = "torch",
        block_size: int = 4096,
        residual_top_m: int | None = None,
        memory_batch_size: int = 512,
        save_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {TASKS}, got {task!r}.")
        if task == "regression" and num_classes is not None:
            raise ValueError("`num_classes` is for classification: leave it unset with `task='regression'`.")
        # the parent's accuracy metrics go unused in regression; a placeholder class count keeps its checks happy
        super().__init__(
            model, num_classes if task == "classification" else 2, optimizer, lr_scheduler, label_smoothing
        )
        _check_hyperparameters(k, sigma, temperature)
        if knn_backend not in BACKENDS:
            raise ValueError(f"`knn_backend` must be one of {BACKENDS}, got {knn_backend!r}.")
        if knn_backend == "faiss" and not faiss_available():
            raise ValueError("`knn_backend='faiss'` needs faiss (`pip install faiss-cpu`); or use 'torch' (exact, same results).")
        if residual_top_m is not None and task != "classification":
            raise ValueError("`residual_top_m` (sparse residuals) is for classification; leave it None for regression.")
        if residual_top_m is not None and (isinstance(residual_top_m, bool) or not isinstance(residual_top_m, int)
                                           or not 1 <= residual_top_m <= num_classes):
            raise ValueError(f"`residual_top_m` must be an integer in [1, num_classes={num_classes}], got {residual_top_m!r}.")
        for name, value in (("block_size", block_size), ("memory_batch_size", memory_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.task = task
        self.num_classes = num_classes
        self.embedding_layer = default_embedding_layer(model, embedding_layer)
        self.k, self.sigma, self.temperature = k, float(sigma), float(temperature)
        self.normalize = normalize
        self.tune_on_val = tune_on_val
        self.tune_grid = self._check_grid(tune_grid) if tune_grid is not None else None
        self.knn_backend = knn_backend
        self.block_size = block_size
        self.residual_top_m = residual_top_m
        self.memory_batch_size = memory_batch_size
        self.save_path = save_path
        for name in _MEMORY:
            self.register_buffer(name, torch.empty(0))
        self._memory_version = 0
        self._knn_cache: tuple[tuple, Any] | None = None
        self.register_load_state_dict_pre_hook(_resize_memory_hook)
        if task == "classification":
            self.val_resmem_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_resmem_acc = MulticlassAccuracy(num_classes, average="micro")
        else:
            self.val_mse, self.val_resmem_mse = MeanSquaredError(), MeanSquaredError()
            self.test_mse, self.test_resmem_mse = MeanSquaredError(), MeanSquaredError()

    # -- configuration checks ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_grid(grid: dict[str, Sequence[float]]) -> dict[str, list]:
        if not isinstance(grid, dict) or not set(grid) <= set(DEFAULT_TUNE_GRID):
            raise ValueError(f"`tune_grid` must be a dict with keys among {sorted(DEFAULT_TUNE_GRID)}, got {grid!r}.")
        checked: dict[str, list] = {}
        for key, values in grid.items():
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values:
                raise ValueError(f"`tune_grid[{key!r}]` is empty.")
            if key == "k":
                if any(float(v) != int(v) for v in values):
                    raise ValueError(f"`tune_grid['k']` must hold integers, got {values!r}.")
                values = [int(v) for v in values]
            else:
                values = [float(v) for v in values]
            checked[key] = values
        for k, s, t in itertools.product(checked.get("k", [1]), checked.get("sigma", [1.0]), checked.get("temperature", [1.0])):
            _check_hyperparameters(k, s, t)
        return checked

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer else None
        if self.task == "classification":
            super().setup(stage)
        input_shape = getattr(dm, "input_shape", None)
        if input_shape is not None:  # the layer must run in forward and give one vector per example
            self._with_embedding(lambda: probe_output(self.model, tuple(input_shape)))
        if stage == "fit" and dm is not None and callable(getattr(dm, "dataset", None)):
            n = len(dm.dataset("train"))
            if self.k > n:
                raise ValueError(f"`k={self.k}` is larger than the training set ({n} examples): the memory holds {n}.")
            if self.tune_on_val and len(dm.dataset("val")) == 0:
                raise ValueError("`tune_on_val=True` needs a validation split; the datamodule's is empty.")
            if self.tune_on_val:
                self._tune_grid_for(n)  # every grid value checked now, not after training

    def _tune_grid_for(self, n: int) -> dict[str, list]:
        """The tuning grid for a memory of ``n`` examples: a given grid must fit it; the default grid is clipped."""
        if self.tune_grid is not None:
            too_large = [k for k in self.tune_grid.get("k", []) if k > n]
            if too_large:
                raise ValueError(
                    f"`tune_grid['k']` holds {too_large}, more neighbours than the {n} training examples the memory "
                    f"will hold: use values <= {n}."
                )
            return self.tune_grid
        grid = dict(DEFAULT_TUNE_GRID)
        ks = [k for k in grid["k"] if k <= n]
        if len(ks) < len(grid["k"]):
            rank_zero_info(f"ResMem: the default tuning grid's k is clipped to the {n} training examples: k in {ks or [n]}.")
        grid["k"] = ks or [n]
        return grid

    # -- the embedding pass ----------------------------------------------------------------------------------------
    def _forward_with_embedding(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the backbone: its outputs and the (normalised) embedding, flattened to ``(N, dim)``."""
        return self._with_embedding(lambda: self.model(x))

    def _with_embedding(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, emb = forward_with_embedding(self.model, self.embedding_layer, None, lambda _: forward())
        emb = emb.float()
        return outputs, F.normalize(emb, dim=1) if self.normalize else emb

    def _flat_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            if outputs.ndim != 2 or outputs.shape[1] != self.num_classes:
                raise ValueError(
                    f"The backbone outputs shape {tuple(outputs.shape)}, expected (batch, num_classes={self.num_classes})."
                )
            return outputs.float()
        return outputs.reshape(len(outputs), -1).float()

    def _memory_targets(self, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            check_targets(outputs, targets)
            return targets if targets.ndim == 1 else targets.float()  # class indices stay integers (N,)
        flat = outputs.reshape(len(outputs), -1)
        if targets.numel() != flat.numel():
            raise ValueError(f"Regression targets of shape {tuple(targets.shape)} do not match outputs {tuple(outputs.shape)}.")
        return targets.reshape(flat.shape).float()

    @torch.no_grad()
    def embed(self, data: Dataset | DataLoader, batch_size: int | None = None) -> tuple[torch.Tensor, ...]:
        """Embeddings, outputs and targets of every example of ``data``, in order, on every rank.

        One pass of the backbone in eval mode. Under ``torch.distributed`` each rank embeds examples
        ``rank, rank + world, ...`` and the shards are all-gathered (so the result equals the 1-process one).

        Args:
            data: a map-style dataset of ``(inputs, targets)`` pairs, or a DataLoader over one (its dataset and
                ``collate_fn`` are used; its sampler, shuffling included, is not).
            batch_size: examples per forward; defaults to ``memory_batch_size``.

        Returns:
            ``(embeddings (N, dim), outputs (N, C), targets)`` with targets class indices ``(N,)`` or soft ``(N, C)``
            for classification.
        """
        was_training = self.model.training
        self.model.eval()

        def one_batch(batch: Any) -> tuple[torch.Tensor, ...]:
            x, y = move_data_to_device((batch[0], batch[1]), self.device)
            outputs, emb = self._forward_with_embedding(x)
            return emb, self._flat_outputs(outputs), self._memory_targets(y, outputs)

        try:
            return map_in_order(data, one_batch, batch_size or self.memory_batch_size)
        finally:
            self.model.train(was_training)

    # -- the memory ------------------------------------------------------------------------------------------------
    @property
    def has_memory(self) -> bool:
        return self.memory_embeddings.numel() > 0

    @property
    def memory_size(self) -> int:
        """Number of training examples in the memory (0 before it is built)."""
        return self.memory_embeddings.shape[0] if self.has_memory else 0

    @property
    def memory_residuals(self) -> torch.Tensor:
        """The memorized residuals ``r_i = y_i - f(x_i)`` at the current temperature, ``(N, C)`` (dense)."""
        self._require_memory()
        return self._residuals_of(torch.arange(self.memory_size, device=self.memory_embeddings.device))

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the memory buffers."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _MEMORY)

    @property
    def is_sparse(self) -> bool:
        """Whether the memory holds top-m sparse residuals (:meth:`sparsify`) instead of outputs and targets."""
        return self.memory_residual_values.numel() > 0

    def _dense_targets(self, targets: torch.Tensor) -> torch.Tensor:
        if self.task == "classification" and not targets.is_floating_point():
            return F.one_hot(targets, self.num_classes).to(self.memory_outputs.dtype)
        return targets

    def _residuals_of(self, idx: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Residuals of the memory rows ``idx`` (any shape), ``(*idx.shape, C)``."""
        if self.is_sparse:
            values, index = self.memory_residual_values[idx], self.memory_residual_index[idx]
            dense = values.new_zeros(*idx.shape, self.num_classes)
            return dense.scatter_(-1, index.long(), values)
        t = self.temperature if temperature is None else temperature
        return residuals(self._dense_targets(self.memory_targets[idx]), self.memory_outputs[idx], t, self.task)

    def sparsify(self, m: int) -> None:
        """Keep the ``m`` largest-magnitude entries of each residual at the current temperature (Sec. 3 of the
        paper) and drop the dense outputs and targets; ``tune`` is no longer possible afterwards."""
        self._require_memory()
        if self.task != "classification" or self.is_sparse:
            raise RuntimeError("sparsify() needs a dense classification memory.")
        r = self.memory_residuals
        index = r.abs().topk(m, dim=1).indices
        # class indices in the narrowest integer type that holds them (the memory is the point of sparsifying)
        small = torch.int16 if self.num_classes <= 2**15 else torch.int32
        self.memory_residual_values, self.memory_residual_index = r.gather(1, index), index.to(small)
        self.memory_outputs, self.memory_targets = r.new_empty(0), r.new_empty(0)
        self._memory_version += 1

    def build_memory(self, data: Dataset | DataLoader, batch_size: int | None = None) -> None:
        """Embed the training set once and memorize it (see :meth:`embed` for ``data`` and DDP behaviour).

        ``fit`` calls this when training ends; call it yourself to wrap a trained backbone without a Trainer.
        Outputs (logits) rather than residuals are stored, so the temperature can be tuned without a rebuild.
        """
        embeddings, outputs, targets = self.embed(data, batch_size)
        if self.k > len(embeddings):
            raise ValueError(f"`k={self.k}` is larger than the memory ({len(embeddings)} examples): use `k <= {len(embeddings)}`.")
        self.memory_embeddings, self.memory_outputs, self.memory_targets = embeddings, outputs, targets
        self.memory_residual_values, self.memory_residual_index = embeddings.new_empty(0), embeddings.new_empty(0, dtype=torch.long)
        self._memory_version += 1

    def clear_memory(self) -> None:
        """Empty the memory (``fit`` does this when it starts: the memory belongs to the previous base model)."""
        for name in _MEMORY:
            setattr(self, name, getattr(self, name).new_empty(0))
        self._memory_version += 1

    def _require_memory(self) -> None:
        if not self.has_memory:
            raise RuntimeError(
                "ResMem has no memory yet: fit it (the memory is built when training ends), call "
                "`build_memory(train_dataset)`, or load a checkpoint written after the memory was built (`save_path`)."
            )

    def search(self, embeddings: torch.Tensor, k: int | None = None, exclude: torch.Tensor | None = None):
        """Exact ``k`` nearest memory entries of (normalised) embeddings: ``(squared_distances, indices)``."""
        self._require_memory()
        key = (self._memory_version, self.memory_embeddings.device, self.memory_embeddings.dtype, self.knn_backend, self.block_size)
        if self._knn_cache is None or self._knn_cache[0] != key:
            self._knn_cache = (key, build_knn_index(self.memory_embeddings, self.knn_backend, self.block_size))
        return self._knn_cache[1].search(embeddings, self.k if k is None else k, exclude)

    def _combine(self, outputs: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        sq_dists, idx = self.search(embeddings)
        r = self._residuals_of(idx)
        base = base_prediction(self._flat_outputs(outputs), self.temperature, self.task)
        return combine(base, r, sq_dists, self.sigma)

    @torch.no_grad()
    def predict(self, x: Any) -> torch.Tensor:
        """ResMem prediction ``f(x) + sum_i w_i r_i`` for a batch of inputs, with the backbone in eval mode (no
        dropout; its mode is restored afterwards).

        Returns scores ``(N, C)`` for classification (argmax gives the class; not a distribution) or predictions in
        the backbone's output shape for regression.
        """
        self._require_memory()
        was_training = self.model.training
        self.model.eval()
        try:
            outputs, emb = self._forward_with_embedding(x)
        finally:
            self.model.train(was_training)
        return self._combine(outputs, emb).reshape(outputs.shape)

    # -- choosing (k, sigma, T) ------------------------------------------------------------------------------------
    @torch.no_grad()
    def tune(
        self,
        data: Dataset | DataLoader | None = None,
        k: Sequence[int] | None = None,
        sigma: Sequence[float] | None = None,
        temperature: Sequence[float] | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        """Pick ``(k, sigma, temperature)`` on held-out data and set them (paper: tuned on held-out data).

        The held-out set is embedded once and searched once with the largest ``k``; every grid point then reuses
        those neighbours. With ``data=None`` the memory itself is used, leave-one-out: a training point is never
        its own neighbour. Accuracy is maximised (classification) or mean squared error minimised (regression);
        ties go to the first grid point in ``temperature, k, sigma`` order.

        Args:
            data: held-out ``(inputs, targets)`` data (never the training set itself), or ``None`` for leave-one-out.
            k, sigma, temperature: candidate values; one left out keeps its current value, all left out use
                :data:`DEFAULT_TUNE_GRID`.
            batch_size: examples per forward; defaults to ``memory_batch_size``.

        Returns:
            ``{"k", "sigma", "temperature", "score", "base_score", "metric", "results"}`` where ``results`` lists
            every grid point's score.
        """
        self._require_memory()
        if self.is_sparse:
            raise RuntimeError("The memory holds sparse residuals (`residual_top_m`): tune before `sparsify`.")
        if k is None and sigma is None and temperature is None:
            grid = self._check_grid(DEFAULT_TUNE_GRID)
        else:
            given = {"k": k, "sigma": sigma, "temperature": temperature}
            grid = self._check_grid({key: v for key, v in given.items() if v is not None})
        ks = grid.get("k", [self.k])
        sigmas = grid.get("sigma", [self.sigma])
        temps = grid.get("temperature", [self.temperature])
        exclude = None
        if data is None:
            emb, outputs, targets = self.memory_embeddings, self.memory_outputs, self.memory_targets
            exclude = torch.arange(len(emb), device=emb.device)
        else:
            emb, outputs, targets = self.embed(data, batch_size)
        sq_dists, idx = self.search(emb, max(ks), exclude)  # raises for k larger than the memory

        classification = self.task == "classification"
        labels = (targets.argmax(1) if targets.ndim == 2 else targets) if classification else targets

        def score(pred: torch.Tensor) -> float:
            if classification:
                return (pred.argmax(1) == labels).float().mean().item()
            return (pred - labels).pow(2).mean().item()

        better = (lambda a, b: a > b) if classification else (lambda a, b: a < b)
        results, best = [], None
        for t in temps:
            base = base_prediction(outputs, t, self.task)
            r = self._residuals_of(idx, t)
            for kk, s in itertools.product(ks, sigmas):
                value = score(combine(base, r[:, :kk], sq_dists[:, :kk], s))
                results.append({"k": kk, "sigma": s, "temperature": t, "score": value})
                if best is None or better(value, best["score"]):
                    best = results[-1]
        assert best is not None
        choice = [best]
        if world()[0] > 1:  # identical inputs give identical choices; rank 0's is authoritative all the same
            dist.broadcast_object_list(choice, src=0)
        best = choice[0]
        self.k, self.sigma, self.temperature = best["k"], best["sigma"], best["temperature"]
        self.hparams.update(k=self.k, sigma=self.sigma, temperature=self.temperature)  # what a checkpoint records
        return {
            **best,
            "base_score": score(base_prediction(outputs, 1.0, self.task)),
            "metric": "accuracy" if classification else "mse",
            "results": results,
        }

    # -- Lightning hooks: training, building the memory, evaluation ----------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return super().loss(logits, targets)
        return F.mse_loss(self._flat_outputs(logits), self._memory_targets(targets, logits))

    def update_train_metrics(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if self.task == "classification":
            return super().update_train_metrics(loss, logits, targets)
        self.train_loss_mean.update(loss.detach(), len(targets))  # no accuracy in regression

    def _nothing_to_train(self) -> bool:
        trainer = self.trainer
        return trainer.max_epochs == 0 or trainer.max_steps == 0 or trainer.limit_train_batches == 0

    def on_fit_start(self) -> None:
        if self._nothing_to_train():  # a trained backbone: build the memory now, on the device, under DDP
            self._build_after_fit()
        else:  # a memory from an earlier fit belongs to the old base model: never evaluate against it
            self.clear_memory()

    def on_train_end(self) -> None:
        # not `on_fit_end`: by then the strategy has torn down (model moved to CPU)
        self._build_after_fit()

    def _fit_data(self, split: str) -> Dataset | DataLoader:
        dm = self.trainer.datamodule
        if dm is not None and callable(getattr(dm, "dataset", None)):
            return dm.dataset(split)  # the unaugmented split
        loader = self.trainer.train_dataloader if split == "train" else self.trainer.val_dataloaders
        if loader is None and dm is not None:
            loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"ResMem could not find the {split} data to {'memorize' if split == 'train' else 'tune on'}: fit with a "
                "datamodule, or call `build_memory(train_dataset)` / `tune(val_dataset)` yourself."
            )
        return loader

    def _build_after_fit(self) -> None:
        self.build_memory(self._fit_data("train"))
        if self.tune_on_val:
            grid = self._tune_grid_for(self.memory_size)
            result = self.tune(self._fit_data("val"), **grid)
            rank_zero_info(
                f"ResMem tuned on the validation split: k={result['k']}, sigma={result['sigma']}, "
                f"temperature={result['temperature']}: {result['metric']} {result['base_score']:.4f} (base) -> "
                f"{result['score']:.4f} (ResMem)."
            )
        if self.residual_top_m is not None:
            self.sparsify(self.residual_top_m)
        if self.save_path:
            self.trainer.save_checkpoint(self.save_path)

    def _warn_without_memory(self) -> None:
        if not self.has_memory:
            rank_zero_warn("ResMem has no memory yet: logging the base model's metrics only (fit or `build_memory` first).")

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking and self.trainer.state.fn != "fit":
            self._warn_without_memory()

    def on_test_start(self) -> None:
        self._warn_without_memory()

    def evaluate(self, batch: Any, stage: str) -> None:
        # one forward gives the base model's outputs and the embedding; metrics accumulate and are logged once per
        # epoch, as ClassifierModule does
        x, y = batch[0], batch[1]
        outputs, emb = self._forward_with_embedding(x)
        if self.task == "classification":
            self.update_eval_metrics(outputs, y, stage)
            if self.has_memory:
                getattr(self, f"{stage}_resmem_acc").update(self._combine(outputs, emb), hard_targets(y))
            return
        targets = self._memory_targets(y, outputs)
        getattr(self, f"{stage}_mse").update(self._flat_outputs(outputs), targets)
        if self.has_memory:
            getattr(self, f"{stage}_resmem_mse").update(self._combine(outputs, emb), targets)

    def epoch_metrics(self, stage: str) -> list[str]:
        names = ("resmem_acc",) if self.task == "classification" else ("mse", "resmem_mse")
        return super().epoch_metrics(stage) + [f"{stage}_{name}" for name in names]

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict(x)

    # -- state -----------------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"k": self.k, "sigma": self.sigma, "temperature": self.temperature}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        _check_hyperparameters(state["k"], state["sigma"], state["temperature"])
        overridden = self.__dict__.pop("_overridden", set())
        for name in ("k", "sigma", "temperature"):
            if name not in overridden:
                setattr(self, name, state[name])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # runs before load_state_dict: a value this module was built with that differs from the one saved with the
        # memory was given explicitly (load_from_checkpoint(path, k=5); Lightning has already merged such overrides
        # into checkpoint["hyper_parameters"], so compare with the saved state): it must survive set_extra_state
        stored = (checkpoint.get("state_dict") or {}).get("_extra_state") or {}
        self.__dict__["_overridden"] = {
            name for name in ("k", "sigma", "temperature") if name in stored and stored[name] != getattr(self, name)
        }

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_knn_cache"] = None  # a faiss index does not pickle (ddp_spawn, deepcopy); it is rebuilt on demand
        return state
