"""The model-agnostic training loop: pure torch, optionally torch.distributed.

One call of :func:`fit` trains any :class:`~epiray.models.ImputationModel` on one worker's
:class:`~epiray.models.ChromData`. Per step: ``model.loss(batch).backward()``; the gradients of
the dense parameters are averaged across workers in one flattened all-reduce (when
torch.distributed is initialised with world size > 1) and applied with Adam; the sparse
(worker-local) parameters are updated only in the rows the batch touched. Each epoch ends with
validation on the held-out tracks (sums all-reduced, so the metric is global), early stopping,
best-state tracking and a callback (where Ray Train reports a checkpoint).

Ray Train wraps this in ``epiray.train``; this module imports no Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import Tensor, nn

from epiray.config import Section
from epiray.errors import ConfigError, EpirayError
from epiray.models import ChromData, ImputationModel, Vocabulary, get_model
from epiray.precision import Precision, resolve_autocast, step_probe, yaml_off
from epiray.store import atomic_open

__all__ = [
    "LoopParams",
    "Regime",
    "RowAdam",
    "TrainState",
    "fit",
    "host_copy",
    "load_checkpoint",
    "regime",
    "save_checkpoint",
    "validate",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class LoopParams(Section):
    """Training-loop settings (the ``train`` section of a config).

    Attributes
    ----------
    epochs
        Maximum epochs. An epoch is the model's pass over the worker's bins (Avocado: one
        example per bin, a random training track each, as the paper; eDICE: ``n_targets``
        cells per bin); with validation, early stopping (``patience``) usually ends training
        sooner.
    batch_size
        Examples per step on each worker, or ``auto`` (the default): the epoch's examples
        divided by ``steps_per_epoch``, within ``[min_batch_size, max_batch_size]``. Then an
        epoch is ``steps_per_epoch`` optimiser steps whatever the slab holds — a 25,000-bin
        worker and a 7.8 M-bin worker both learn — and the global batch (workers × batch)
        does not depend on the number of workers. The original Avocado used 40,000, which
        on a small worker means one step per epoch (:func:`regime` warns).
    steps_per_epoch
        Optimiser steps per epoch that ``batch_size: auto`` aims for.
    min_batch_size, max_batch_size
        Bounds of ``batch_size: auto``; ``max_batch_size`` defaults to the model's
        ``max_batch_size`` (Avocado: 40,000, the paper's; eDICE: 40,000 target cells).
    lr, betas, eps
        Adam settings for dense and sparse parameters (PyTorch defaults, as the paper's
        "default hyperparameters").
    sparse_lr
        Learning rate of the sparse (genome) parameters, default ``lr``. A genome row is
        visited once per epoch, so it moves far less per epoch than the dense parameters;
        a larger rate lets it keep up.
    lr_schedule
        ``constant`` (the paper) or ``cosine``: both rates fall per epoch along a half cosine
        from their value in epoch 1 towards 0 after ``epochs`` epochs, so the last epoch's
        model is a settled one rather than a point on a noisy curve (what a retrain for a
        fixed number of epochs needs). Set from the epoch count alone, so resuming is exact.
        ``plateau``: both rates are multiplied by ``plateau_factor`` every
        ``plateau_patience`` epochs without a better validation MSE (so a run that has
        stopped improving at one rate settles at a smaller one before ``patience`` ends it);
        without validation it is ``constant``.
    plateau_patience, plateau_factor
        See ``lr_schedule: plateau``.
    seed
        Seed of the device generator that draws batches (worker ``r`` uses ``seed + 7919 r``).
    patience
        Stop after this many epochs without a better validation MSE; None never stops early.
    min_delta
        Smallest decrease of validation MSE that counts as better.
    restore_best
        After training, load the parameters of the epoch with the best validation MSE.
    sparse_optimizer
        ``row_adam`` (row-wise lazy Adam with index ops, the faster on CPU; see
        ``benchmarks/bench_avocado.py``) or ``sparse_adam`` (``torch.optim.SparseAdam``);
        both update only the rows (and Adam moments) a batch touched.
    autocast
        ``auto``: bf16 autocast on CUDA, and on a CPU with native bf16 units (AMX or
        AVX-512 BF16) where a short probe, cached per machine, finds it faster; float32
        elsewhere (:func:`epiray.precision.resolve_autocast`). ``bf16``: bf16 autocast
        anywhere. ``off``: float32 throughout. The run's first line and its MLflow tag
        ``epiray.autocast`` say which was used.
    compile
        Wrap ``model.loss`` in ``torch.compile`` (a GPU option; compile time is minutes).
    max_batches_per_epoch
        Cut every epoch short after this many steps (benchmarks, smoke tests).
    checkpoint_every
        Write a checkpoint after every this many epochs (and always after the last one, early
        stopping included); metrics are reported every epoch regardless. ``auto`` (the
        default) writes one when ``checkpoint_seconds`` have passed since the last (so short
        epochs are not dominated by writing the model); 1 checkpoints every epoch. A checkpoint
        holds the genome factors with their two Adam
        moments (and, with early stopping, the best epoch's copy): 29.2 x 16 bytes per bin at
        paper sizes, 3.7 GB for mouse chr1, 8 to 14 s to write on the project's VM, while an
        epoch of its 7.8 M examples at the GPU target of 10 M examples/s takes under one. A
        killed run repeats at most ``checkpoint_every - 1`` epochs, exactly (the batch
        generator is checkpointed).
    checkpoint_seconds
        With ``checkpoint_every: auto``: the least time between two checkpoints.
    min_steps
        A run whose epochs allow fewer optimiser steps than this in all is warned about, and
        tagged, before it starts (:func:`regime`): too few to learn.
    progress_seconds
        Inside a long epoch, log a progress line this often (0: never). The first epoch
        also logs the estimated time per epoch and for the run after its first steps.
    report_seconds
        Under Ray Train: the least time between two metric reports to Ray (checkpoints and
        the final report are always sent; MLflow gets every epoch). Ray's controller takes
        one report per 2 s poll, so reporting every short epoch would stretch it to 2 s.
        Sweeps report every epoch (0): ASHA's rungs count epochs.
    """

    epochs: int = Field(100, ge=1)
    batch_size: int | Literal["auto"] = "auto"
    steps_per_epoch: int = Field(64, ge=1)
    min_batch_size: int = Field(256, ge=1)
    max_batch_size: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    sparse_lr: float | None = Field(None, gt=0)
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    plateau_patience: int = Field(4, ge=1)
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    seed: int = 0
    patience: int | None = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0)
    restore_best: bool = True
    sparse_optimizer: Literal["row_adam", "sparse_adam"] = "row_adam"
    autocast: Literal["auto", "bf16", "off"] = "auto"
    compile: bool = False
    max_batches_per_epoch: int | None = Field(None, ge=1)
    checkpoint_every: int | Literal["auto"] = "auto"
    checkpoint_seconds: float = Field(60.0, ge=0)
    min_steps: int = Field(2000, ge=1)
    progress_seconds: float = Field(30.0, ge=0)
    report_seconds: float = Field(5.0, ge=0)

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return yaml_off(v)

    @field_validator("batch_size", "checkpoint_every")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'auto'; got {v}")
        return v


@dataclass
class TrainState:
    """Everything needed to resume a run after an epoch (saved in every checkpoint).

    Attributes
    ----------
    epoch
        Epochs completed.
    history
        One dict per epoch: ``epoch``, ``train_mse``, ``val_mse`` (or None), ``examples``,
        ``seconds``, ``examples_per_s``.
    dense_opt, sparse_opt
        Optimiser state per parameter *name* (so it survives freezing and added parameters).
    generator
        State of the device generator that draws batches.
    torch_rng, cuda_rng
        Global RNG states (models with dropout draw from them).
    best_val, best_epoch
        Best validation MSE so far and its epoch.
    best_state
        Model ``state_dict`` at ``best_epoch`` (when ``restore_best``), else None. Kept in
        host memory: on a GPU a second copy of the genome factors would not fit the budget
        that ``memory_estimate`` checks.
    bad_epochs
        Epochs since the last improvement.
    stopped
        True once early stopping fired.
    regime
        :func:`regime` of the run as a dict (batch size, steps per epoch, warning).
    phase
        ``fit`` (training, with validation when there is any) or ``refit`` (a fresh model on
        every cell for ``selected_epochs``, the epochs validation chose); ``calibrate``: the
        calibration model trained before ``fit`` without the experiments it is calibrated on
        (``validation.calibrate`` beside validation cells).
    selected_epochs
        In the refit phase, its length.
    lr_drops
        Validation plateaus met (every ``plateau_patience`` epochs without improvement).
    lr_plan
        In the refit phase, the learning-rate factor of each epoch of the selection run (its
        ``lr`` history over the base rate): the refit replays them epoch by epoch, so a
        ``plateau`` schedule's halvings, which need validation, happen at the same epochs and
        the refit trains in the regime whose length validation chose. None: the schedule's
        own factors.
    """

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    dense_opt: dict[str, dict[str, Any]] = field(default_factory=dict)
    sparse_opt: dict[str, dict[str, Any]] = field(default_factory=dict)
    generator: Tensor | None = None
    torch_rng: Tensor | None = None
    cuda_rng: Tensor | None = None
    best_val: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, Tensor] | None = None
    bad_epochs: int = 0
    stopped: bool = False
    regime: dict[str, Any] = field(default_factory=dict)
    phase: Literal["calibrate", "fit", "refit"] = "fit"
    selected_epochs: int | None = None
    lr_drops: int = 0
    lr_plan: list[float] | None = None

    def refit(self, base_lr: float) -> TrainState:
        """The start state of a refit after this finished selection run: a fresh model's
        state for the epochs validation chose (the best, else every epoch run), replaying this
        run's learning-rate factor of each (``lr_plan``; ``base_lr`` is its base rate)."""
        chosen = self.best_epoch or self.epoch
        plan = [h["lr"] / base_lr for h in self.history[:chosen]] or None
        return TrainState(phase="refit", selected_epochs=chosen, lr_plan=plan)

    def for_new_phase(self, keep_sparse: bool = True) -> TrainState:
        """A fresh state that keeps only the optimiser moments (transfer phases).

        Pass it as ``start_state`` when continuing with other data or other trainable parts
        (new biosamples or assays): epochs, history and best state restart, while parameters
        trained before resume with their Adam moments. For another chromosome or slab pass
        ``keep_sparse=False``: its genome factors are new rows, so their moments start at
        zero (the dense moments are still carried for later phases).
        """
        sparse = dict(self.sparse_opt) if keep_sparse else {}
        return TrainState(dense_opt=dict(self.dense_opt), sparse_opt=sparse)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``torch.save``."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# sparse optimiser
# ---------------------------------------------------------------------------------------------


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam for parameters with sparse (COO) row gradients.

    Same update as ``torch.optim.SparseAdam``: only the rows present in the gradient (summed
    over duplicates) change, and only their first/second moments are updated; the step count
    (bias correction) is per parameter. Implemented with ``index_select`` / ``index_copy_`` /
    ``index_add_`` on the unique rows, so a step costs O(rows in the batch), whatever the
    table size.

    Parameters
    ----------
    params
        Parameters whose ``.grad`` is a sparse COO tensor (``nn.Embedding(sparse=True)``).
    lr, betas, eps
        As in Adam.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # noqa: D102
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise EpirayError(
                        f"RowAdam: parameter of shape {tuple(p.shape)} has a dense gradient; "
                        "expected a sparse COO gradient (nn.Embedding(sparse=True)). List it "
                        "in the model's dense_parameters instead."
                    )
                g = p.grad
                rows = g._indices()[0]
                if g.is_coalesced() or rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
                    vals = g._values()  # already sorted and unique (Avocado's dedupe)
                else:
                    g = g.coalesce()
                    rows, vals = g.indices()[0], g.values()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m = state["exp_avg"].index_select(0, rows).lerp_(vals, 1 - b1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(b2)
                v.addcmul_(vals, vals, value=1 - b2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                # eps outside the bias correction, as SparseAdam and Keras' Adam
                step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(eps)), alpha=-step_size)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def host_copy(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters and buffers copied to host memory (cloned on CPU): what
    ``restore_best`` keeps of the best epoch, outside the device's memory budget."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class Regime:
    """How long a run trains and in what steps, resolved for one worker's slab.

    Attributes
    ----------
    batch_size
        Examples per step (``train.batch_size``, or what ``auto`` chose).
    steps_per_epoch
        Optimiser steps per epoch.
    epoch_examples
        Examples per epoch.
    max_steps
        ``epochs × steps_per_epoch``: the most the run can take.
    bins, tracks
        The slab's bins and training tracks.
    warning
        Why the run may be too short to learn, or None.
    """

    batch_size: int
    steps_per_epoch: int
    epoch_examples: int
    max_steps: int
    bins: int
    tracks: int
    warning: str | None = None

    def describe(self) -> str:
        """One line: the batch, the steps, and the bound on the run's length."""
        return (
            f"batch {self.batch_size:,}, {self.steps_per_epoch:,} steps per epoch "
            f"({self.epoch_examples:,} examples over {self.bins:,} bins x {self.tracks} "
            f"tracks), at most {self.max_steps:,} steps"
        )


def regime(params: LoopParams, model: ImputationModel, data: ChromData) -> Regime:
    """Resolve ``batch_size: auto`` and check the run's length for one worker's slab.

    The batch is the epoch's examples over ``steps_per_epoch`` within the bounds; an explicit
    batch is kept. The run is flagged (``warning``) when its epochs allow fewer than
    ``params.min_steps`` optimiser steps: e.g. the original Avocado's batch of 40,000 on a
    25,000-bin worker takes one step per epoch, and 30 epochs of that learn nearly nothing.
    """
    examples = model.epoch_examples(data)
    if params.batch_size == "auto":
        top = params.max_batch_size or model.max_batch_size
        batch = min(top, max(params.min_batch_size, math.ceil(examples / params.steps_per_epoch)))
    else:
        batch = int(params.batch_size)
    steps = model.steps_per_epoch(data, batch)
    if params.max_batches_per_epoch is not None:
        steps = min(steps, params.max_batches_per_epoch)
    total = steps * params.epochs
    warning = None
    if total < params.min_steps:
        fix = (
            "Set train.batch_size: auto"
            if params.batch_size != "auto"
            else "Raise train.steps_per_epoch"
        )
        warning = (
            f"{model.name} on {data.chrom} bins [{data.lo}, {data.hi}): at most {total:,} "
            f"optimiser steps ({params.epochs} epochs x {steps} steps of {batch:,} examples); "
            f"expected at least {params.min_steps:,} to learn (train.min_steps). {fix}, or "
            "raise train.epochs."
        )
    return Regime(
        batch_size=batch,
        steps_per_epoch=steps,
        epoch_examples=examples,
        max_steps=total,
        bins=data.n_local,
        tracks=data.n_experiments,
        warning=warning,
    )


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _opt_state_by_name(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, dict]:
    # References, not copies: a genome-scale Adam state is GBs; checkpoints serialise it.
    return {names[id(p)]: dict(st) for p, st in opt.state.items()}


def _load_opt_state(
    opt: torch.optim.Optimizer,
    saved: Mapping[str, Mapping[str, Any]],
    model: nn.Module,
    where: str,
) -> None:
    by_name = dict(model.named_parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    fused = bool(opt.defaults.get("fused"))
    for name, st in saved.items():
        p = by_name.get(name)
        if p is None or id(p) not in in_opt:
            continue  # a parameter frozen now keeps its state in TrainState, not in opt
        for k, v in st.items():
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape != p.shape:
                raise EpirayError(
                    f"{where}: optimiser state {k!r} of parameter {name!r} has shape "
                    f"{tuple(v.shape)} but the parameter has {tuple(p.shape)}: the state was "
                    "saved for another slab (chromosome or bins). Start a model for another "
                    "chromosome with state.for_new_phase(keep_sparse=False), or resume on the "
                    "slab and vocabulary the checkpoint was written for."
                )
        # Adam keeps its step count on the CPU unless fused (then on the parameter's device).
        opt.state[p] = {
            k: (v.to(p.device) if isinstance(v, Tensor) and (v.dim() > 0 or fused) else v)
            for k, v in st.items()
        }


def seed_everything(seed: int) -> None:
    """Seed torch's global CPU and CUDA generators (model initialisation, dropout)."""
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def validate(
    model: ImputationModel,
    data: ChromData,
    params: LoopParams | None = None,
    precision: Precision | None = None,
) -> dict[str, Any] | None:
    """Validation MSE on the held-out cells and/or held-out tracks, global across workers.

    Parameters
    ----------
    model
        The model.
    data
        The worker's slab: ``heldout`` (validation cells of the training tracks, predicted
        with :meth:`~epiray.models.ImputationModel.predict_cells`) and/or ``val_values``
        ``[V, hi-lo]`` (whole held-out tracks, one ``predict`` each).
    params
        For the autocast setting; defaults to :class:`LoopParams` defaults.
    precision
        The arithmetic to predict in (what :func:`fit` trains in); default: resolved from
        ``params.autocast``.

    Returns
    -------
    dict or None
        ``val_mse``: the MSE over every held-out cell when ``data.heldout`` is set, else the
        mean over held-out tracks of each track's MSE; ``val_mse_cells`` and ``val_cells``
        (cells) and ``val_mse_tracks`` (a ``[V]`` list, tracks) when present. None when there
        is nothing held out. Squared-error sums and counts are summed over workers before
        dividing, so every worker returns the same global figures.
    """
    has_cells = data.heldout is not None
    has_tracks = data.val_values is not None and data.val_values.shape[0] > 0
    if not (has_cells or has_tracks):
        return None
    params = params or LoopParams()
    dev = data.device
    _, world = _world()
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    amp = (precision or resolve_autocast(params.autocast, dev)).context()
    with torch.no_grad(), amp:
        if has_cells:
            track, bins = data.heldout_cells()
            sums = torch.zeros(2, dtype=torch.float64, device=dev)
            step = 1 << 20
            for start in range(0, track.shape[0], step):
                sl = slice(start, start + step)
                pred = model.predict_cells(data, track[sl], bins[sl]).float()
                truth = data.values[track[sl], bins[sl]].float()
                sums[0] += ((pred - truth).double() ** 2).sum()
            sums[1] = track.shape[0]
            if world > 1:
                dist.all_reduce(sums)
            out["val_cells"] = int(sums[1])
            out["val_mse_cells"] = float(sums[0] / sums[1]) if sums[1] > 0 else None
        if has_tracks:
            v = data.val_values.shape[0]
            sums = torch.zeros(v + 1, dtype=torch.float64, device=dev)
            for j in range(v):
                pred = model.predict(data, int(data.val_biosample[j]), int(data.val_assay[j]))
                diff = pred.float() - data.val_values[j].float()
                sums[j] = (diff.double() ** 2).sum()
            sums[v] = data.n_local
            if world > 1:
                dist.all_reduce(sums)
            per_track = (sums[:v] / sums[v]).tolist()
            out["val_mse_tracks"] = per_track
            out["val_mse_experiments"] = sum(per_track) / v
    model.train(was_training)
    out["val_mse"] = out["val_mse_cells"] if has_cells else out["val_mse_experiments"]
    if out["val_mse"] is None:
        return None
    return out


# ---------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------


def fit(
    model: ImputationModel,
    data: ChromData,
    params: LoopParams | None = None,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    patience: int | None = None,
    callback: Callable[[TrainState, dict[str, Any]], None] | None = None,
    start_state: TrainState | None = None,
) -> TrainState:
    """Train ``model`` on the worker's slab ``data``.

    Parameters
    ----------
    model
        Any registered model, built for ``data`` (moved to ``data.device`` here).
    data
        The worker's :class:`ChromData`; ``val_values`` (optional) are held-out tracks for
        validation MSE, early stopping and best-state selection.
    params
        Loop settings; the keyword arguments below override single fields.
    epochs, batch_size, lr, seed, patience
        Overrides of the :class:`LoopParams` fields of the same names (None keeps the
        field; to never stop early set ``LoopParams(patience=None)``).
    callback
        Called after every epoch on every worker as ``callback(state, metrics)`` with the
        resumable :class:`TrainState` and that epoch's metrics dict (``epoch``, ``train_mse``,
        ``val_mse``, ...). Ray Train saves a checkpoint and calls ``ray.train.report`` here.
    start_state
        A :class:`TrainState` from :func:`load_checkpoint` (with the model restored from the
        same checkpoint): training resumes after ``start_state.epoch`` with the same optimiser
        moments, generator state and history, so the result matches an uninterrupted run.
        Also used to keep optimiser state across transfer phases.

    Returns
    -------
    TrainState
        Final state; ``state.history`` holds one metrics dict per epoch. With
        ``restore_best`` and validation tracks, the model holds the best epoch's parameters.

    Notes
    -----
    With torch.distributed initialised and world size > 1, dense parameters are broadcast from
    rank 0 at the start, their gradients are averaged over the workers that had a batch in one
    flattened all-reduce per step (which also tells every worker when all have finished the
    epoch, so shards of unequal size never deadlock), and train/validation sums are all-reduced.
    """
    params = params or LoopParams()
    over = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed}
    over["patience"] = patience
    upd = {k: v for k, v in over.items() if v is not None}
    if upd:
        params = LoopParams.model_validate({**params.model_dump(), **upd})
    dev = data.device
    model.to(dev)
    model.train()
    rank, world = _world()
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    names = _names(model)
    dense = [p for p in model.dense_parameters() if p.requires_grad]
    sparse = [p for p in model.sparse_parameters() if p.requires_grad]
    if not dense and not sparse:
        raise ConfigError(
            f"fit model {model.name!r}: every parameter is frozen; expected something to "
            "train. Freeze less."
        )
    if params.compile and sparse and _torch_version() < (2, 8):
        raise EpirayError(
            f"loop.compile: torch {torch.__version__} cannot compile a model with sparse "
            "embedding gradients (pytorch issue 150656, fixed in torch 2.8). Upgrade torch "
            "or set loop.compile: false."
        )
    if world > 1:
        for p in model.dense_parameters():
            dist.broadcast(p.data, src=0)

    dense_opt = _make_dense_opt(dense, params, dev) if dense else None
    sparse_cls = RowAdam if params.sparse_optimizer == "row_adam" else torch.optim.SparseAdam
    sparse_opt = (
        sparse_cls(sparse, lr=params.sparse_lr or params.lr, betas=params.betas, eps=params.eps)
        if sparse
        else None
    )
    gen = torch.Generator(device=dev)
    gen.manual_seed(params.seed + 7919 * rank)
    state = start_state if start_state is not None else TrainState()
    if start_state is not None:
        where = f"fit {model.name} on {data.chrom} bins [{data.lo}, {data.hi})"
        if dense_opt is not None:
            _load_opt_state(dense_opt, start_state.dense_opt, model, where)
        if sparse_opt is not None:
            _load_opt_state(sparse_opt, start_state.sparse_opt, model, where)
        if start_state.generator is not None:
            if start_state.generator.numel() == gen.get_state().numel():
                gen.set_state(start_state.generator)
            else:  # saved on another kind of device (a GPU run resumed on CPU, or back)
                gen.manual_seed(params.seed + 7919 * rank + 104_729 * state.epoch)
                log.warning(
                    "resuming at epoch %d on %s: the batch generator's saved state is from "
                    "another kind of device, so batches are drawn from a generator reseeded "
                    "from the seed and epoch; the run is reproducible from here, not "
                    "identical to an uninterrupted one",
                    state.epoch,
                    dev.type,
                )
        if start_state.torch_rng is not None:
            torch.set_rng_state(start_state.torch_rng)
        if start_state.cuda_rng is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(start_state.cuda_rng, dev)

    loss_fn = torch.compile(model.loss) if params.compile else model.loss
    reg = regime(params, model, data)
    precision = resolve_autocast(
        params.autocast,
        dev,
        probe=step_probe(_probe_step(model, data, params, reg.batch_size)),
        what=_probe_key(model, reg.batch_size),
    )
    if world > 1:  # every worker trains in the same arithmetic
        flag = torch.tensor([float(precision.bf16)], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if precision.bf16 and not bool(flag.item()):
            precision = Precision(False, precision.device, "float32 (not bf16 on every worker)")
    amp = precision.context()
    if reg.warning and state.epoch == 0 and rank == 0:
        log.warning("%s", reg.warning)
    state.regime = {**reg.__dict__, "precision": precision.reason}
    if rank == 0:
        log.info("training %s: %s; %s", model.name, reg.describe(), precision.reason)
    params = params.model_copy(update={"batch_size": reg.batch_size})

    start_epoch = state.epoch
    while state.epoch < params.epochs and not state.stopped:
        if state.lr_plan:
            factor = state.lr_plan[min(state.epoch, len(state.lr_plan) - 1)]
        else:
            factor = _lr_factor(params, state.epoch, state.lr_drops)
        for opt, base in ((dense_opt, params.lr), (sparse_opt, params.sparse_lr or params.lr)):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = base * factor
        t0 = time.perf_counter()
        progress = _Progress(reg, params, state.epoch, first=state.epoch == start_epoch)
        sums = _train_epoch(
            model, data, params, loss_fn, amp, gen, dense, dense_opt, sparse_opt, progress
        )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        if world > 1:
            dist.all_reduce(sums)
        loss_sum, examples = float(sums[0]), int(sums[1])
        state.epoch += 1
        metrics: dict[str, Any] = {
            "epoch": state.epoch,
            "train_mse": loss_sum / max(examples, 1),
            "examples": examples,
            "seconds": seconds,
            "examples_per_s": examples / seconds if seconds > 0 else float("nan"),
            "lr": params.lr * factor,
        }
        val = validate(model, data, params, precision)
        metrics["val_mse"] = None if val is None else val["val_mse"]
        if val is not None:
            metrics.update({k: val[k] for k in ("val_mse_cells", "val_mse_tracks") if k in val})
            if val["val_mse"] < state.best_val - params.min_delta:
                state.best_val, state.best_epoch, state.bad_epochs = val["val_mse"], state.epoch, 0
                if params.restore_best:
                    state.best_state = host_copy(model)
            else:
                state.bad_epochs += 1
                if params.patience is not None and state.bad_epochs >= params.patience:
                    state.stopped = True
                elif state.bad_epochs % params.plateau_patience == 0:
                    state.lr_drops += 1  # used by lr_schedule: plateau
        state.history.append(metrics)
        state.dense_opt = _merge_opt(state.dense_opt, dense_opt, names)
        state.sparse_opt = _merge_opt(state.sparse_opt, sparse_opt, names)
        state.generator = gen.get_state()
        state.torch_rng = torch.get_rng_state()
        state.cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        log.info("%s", _epoch_line(state, metrics, params))
        if callback is not None:
            callback(state, metrics)

    if params.restore_best and state.best_state is not None:
        model.load_state_dict(state.best_state)
    return state


def _epoch_line(state: TrainState, m: Mapping[str, Any], params: LoopParams) -> str:
    """``epoch 12/300: train 0.0412, validation 0.0655 (best 0.0650 at 10), 812,000
    examples/s, 1.2 s, ≤ 5.8 min left``."""
    val = m.get("val_mse")
    vtext = ""
    if val is not None:
        vtext = f", validation {val:.4f} (best {state.best_val:.4f} at {state.best_epoch})"
    left = 0.0
    if not state.stopped and state.epoch < params.epochs:
        done = state.history[-5:]
        left = sum(h["seconds"] for h in done) / len(done) * (params.epochs - state.epoch)
    end = "stopping early" if state.stopped else f"≤ {duration(left)} left"
    return (
        f"epoch {state.epoch}/{params.epochs}: train {m['train_mse']:.4f}{vtext}, "
        f"{m['examples_per_s']:,.0f} examples/s, {duration(m['seconds'])}, {end}"
    )


def duration(seconds: float) -> str:
    """A duration for people: ``42 s``, ``3.5 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m:02d} min"


class _Progress:
    """Progress lines inside an epoch (rank 0's log; other ranks log warnings only).

    In the first epoch a run trains here, once a few steps are timed: the estimated time per
    epoch and the bound on the run's time (at ``epochs`` epochs; early stopping is usually
    sooner), so a long run says so before it has spent it. Afterwards, every
    ``params.progress_seconds``: the step, the speed and the time left in the epoch.
    """

    def __init__(self, reg: Regime, params: LoopParams, epoch: int, first: bool) -> None:
        self.reg, self.params, self.epoch = reg, params, epoch
        self.t0 = self.last = time.perf_counter()
        self.estimated = not first

    def step(self, steps: int) -> None:
        now = time.perf_counter()
        total = self.reg.steps_per_epoch
        if not self.estimated and (steps >= 5 or now - self.t0 > 5.0) and steps < total:
            per_step = (now - self.t0) / steps
            epoch_s = per_step * total
            left = self.params.epochs - self.epoch
            log.info(
                "timing: %.3f s per step, so ≈ %s per epoch and at most %s for %d epochs (%s)",
                per_step,
                duration(epoch_s),
                duration(epoch_s * left),
                left,
                self.reg.describe(),
            )
            self.estimated = True
            self.last = now
        elif self.params.progress_seconds and now - self.last >= self.params.progress_seconds:
            rate = steps * self.reg.batch_size / (now - self.t0)
            left = (now - self.t0) / steps * (total - steps)
            log.info(
                "epoch %d: step %d of %d, %.0f examples/s, ≈ %s left in the epoch",
                self.epoch + 1,
                steps,
                total,
                rate,
                duration(left),
            )
            self.last = now


def _probe_step(
    model: ImputationModel, data: ChromData, params: LoopParams, batch_size: int
) -> Callable[[], None]:
    """One forward and backward pass of ``model`` on a batch of its own, drawn from a
    generator of its own (the run's batches are not touched), gradients discarded: what the
    bf16 probe of ``autocast: auto`` times."""
    batch = None

    def step() -> None:
        nonlocal batch
        if batch is None:
            gen = torch.Generator(device=data.device)
            gen.manual_seed(params.seed + 1_000_003)
            batch = next(iter(model.batches(data, gen, batch_size)))
        model.loss(batch).backward()
        model.zero_grad(set_to_none=True)

    return step


def _probe_key(model: ImputationModel, batch_size: int) -> str:
    """What the bf16 probe measured: the model, its sizes and the batch (to a power of 2)."""
    sizes = model.params.model_dump(mode="json")
    return f"{model.name}:{json.dumps(sizes, sort_keys=True)}:{1 << batch_size.bit_length()}"


def _lr_factor(params: LoopParams, epoch: int, lr_drops: int = 0) -> float:
    """Multiplier of both learning rates in the epoch after ``epoch`` completed ones
    (``lr_drops``: the plateaus met so far, for ``lr_schedule: plateau``)."""
    if params.lr_schedule == "constant":
        return 1.0
    if params.lr_schedule == "plateau":
        return params.plateau_factor**lr_drops
    return 0.5 * (1.0 + math.cos(math.pi * epoch / params.epochs))


def _make_dense_opt(
    dense: list[nn.Parameter], params: LoopParams, dev: torch.device
) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"lr": params.lr, "betas": params.betas, "eps": params.eps}
    if dev.type in ("cuda", "cpu"):
        kw["fused"] = True
    try:
        return torch.optim.Adam(dense, **kw)
    except (RuntimeError, TypeError):  # fused not supported for this device/dtype
        kw.pop("fused", None)
        return torch.optim.Adam(dense, **kw)


def _merge_opt(
    saved: dict[str, dict[str, Any]], opt: torch.optim.Optimizer | None, names: dict[int, str]
) -> dict[str, dict[str, Any]]:
    """Saved state updated with the live optimiser's (frozen parameters keep theirs)."""
    out = dict(saved)
    if opt is not None:
        out.update(_opt_state_by_name(opt, names))
    return out


def _train_epoch(
    model: ImputationModel,
    data: ChromData,
    params: LoopParams,
    loss_fn: Callable,
    amp: contextlib.AbstractContextManager,
    gen: torch.Generator,
    dense: list[nn.Parameter],
    dense_opt: torch.optim.Optimizer | None,
    sparse_opt: torch.optim.Optimizer | None,
    progress: _Progress | None = None,
) -> Tensor:
    """One epoch; returns ``[loss × examples summed, examples]`` (float64, this worker)."""
    dev = data.device
    _, world = _world()
    sums = torch.zeros(2, dtype=torch.float64, device=dev)
    it: Iterator = iter(model.batches(data, gen, params.batch_size))
    steps = 0
    while True:
        batch = None
        if params.max_batches_per_epoch is None or steps < params.max_batches_per_epoch:
            batch = next(it, None)
        if batch is not None:
            with amp:
                loss = loss_fn(batch)
            reg = model.penalty()
            (loss if reg is None else loss + reg).backward()
            sums[0] += loss.detach().double() * batch.size
            sums[1] += batch.size
        if world > 1:
            have = 1.0 if batch is not None else 0.0
            n_have = _all_reduce_grads(dense, have, dev)
            if n_have == 0:
                break
        elif batch is None:
            break
        if dense_opt is not None:
            dense_opt.step()
            dense_opt.zero_grad(set_to_none=True)
        if sparse_opt is not None:
            if batch is not None:
                sparse_opt.step()
            sparse_opt.zero_grad(set_to_none=True)
        steps += 1
        if progress is not None:
            progress.step(steps)
    return sums


def _all_reduce_grads(dense: list[nn.Parameter], have: float, dev: torch.device) -> float:
    """Average dense grads over the workers that had a batch; returns how many had one."""
    grads = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in dense
    ]
    flag = torch.tensor([have], dtype=torch.float32, device=dev)
    bucket = torch.cat([*grads, flag])
    dist.all_reduce(bucket)
    n_have = float(bucket[-1])
    if n_have > 0:
        bucket.div_(n_have)
        at = 0
        for p in dense:
            n = p.numel()
            g = bucket[at : at + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            at += n
    return n_have


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, model: ImputationModel, state: TrainState) -> Path:
    """Write model, vocabulary, hyperparameters and loop state to ``path`` (atomically).

    Each worker saves its own file (genome factors are worker-local); rank 0's dense
    parameters equal every other rank's.

    Parameters
    ----------
    path
        Target file, e.g. ``ckpt/rank0.pt``; parent directories are created.
    model, state
        What :func:`fit` trained and returned (or passed to its callback).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model.name,
        "params": model.params.model_dump(mode="json"),
        "vocab": model.vocab.to_dict(),
        "slab": {"lo": getattr(model, "lo", None), "hi": getattr(model, "hi", None)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "loop": _to_cpu(state.to_dict()),
    }
    with atomic_open(path) as f:  # fsynced before the rename makes it the checkpoint
        torch.save(payload, f)
    return path


def _to_cpu(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    return x


def read_checkpoint(path: Path, *, fix: str, mmap: bool = False) -> dict[str, Any]:
    """The payload of a checkpoint file written by :func:`save_checkpoint`, checked for its
    format; tensors stay on the CPU (``mmap``: read lazily from the file).

    Raises
    ------
    EpirayError
        Naming the file when it cannot be read or is not an epiray checkpoint of this
        format; ``fix`` says what to do instead.
    """
    try:
        payload = torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise EpirayError(
            f"checkpoint {path}: cannot read it ({exc}); expected a file written by "
            f"`epiray train` (epiray.loop.save_checkpoint). {fix}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise EpirayError(
            f"checkpoint {path}: unknown format; expected epiray checkpoint format "
            f"{CHECKPOINT_FORMAT}, got {got}. {fix}"
        )
    return payload


def load_checkpoint(
    path: str | Path,
    data: ChromData,
    *,
    store_summary: Mapping[str, Any] | None = None,
) -> tuple[ImputationModel, TrainState]:
    """Rebuild a model and its loop state from :func:`save_checkpoint`'s file.

    Parameters
    ----------
    path
        The checkpoint file.
    data
        The slab to rebuild the model on (same bins as when saved; the model's device).
    store_summary
        When given, the saved vocabulary is checked against this store summary.

    Returns
    -------
    (model, state)
        Pass both to :func:`fit` (``start_state=state``) to resume.

    Raises
    ------
    EpirayError
        If the file is not an epiray checkpoint.
    StoreError
        If ``store_summary`` does not hold the experiments the model was trained on.
    """
    path = Path(path)
    payload = read_checkpoint(path, fix="Point at a complete checkpoint.")
    vocab = Vocabulary.from_dict(payload["vocab"])
    if store_summary is not None:
        vocab.check_matches(store_summary)
    cls = get_model(payload["model"])
    prm = cls.Params.model_validate(payload["params"])
    model = cls.from_state(prm, vocab, data, payload["state_dict"])
    model.to(data.device)
    state = TrainState.from_dict(payload["loop"])  # best_state stays in host memory
    return model, state
