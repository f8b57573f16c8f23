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
from pydantic import Field
from torch import Tensor, nn

from epiray.config import Section
from epiray.errors import ConfigError, EpirayError
from epiray.models import ChromData, ImputationModel, Vocabulary, get_model
from epiray.store import atomic_open

__all__ = [
    "LoopParams",
    "RowAdam",
    "TrainState",
    "fit",
    "host_copy",
    "load_checkpoint",
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
        Maximum epochs.
    batch_size
        Examples per step on each worker (the original Avocado: 40,000).
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
        ``auto``: bf16 autocast on CUDA, none on CPU. ``bf16``: bf16 autocast anywhere.
        ``off``: float32 throughout.
    compile
        Wrap ``model.loss`` in ``torch.compile`` (a GPU option; compile time is minutes).
    max_batches_per_epoch
        Cut every epoch short after this many steps (benchmarks, smoke tests).
    checkpoint_every
        Write a checkpoint after every this many epochs (and always after the last one, early
        stopping included); metrics are reported every epoch regardless. 1, the default,
        checkpoints every epoch. A checkpoint holds the genome factors with their two Adam
        moments (and, with early stopping, the best epoch's copy): 29.2 x 16 bytes per bin at
        paper sizes, 3.7 GB for mouse chr1, 8 to 14 s to write on the project's VM, while an
        epoch of its 7.8 M examples at the GPU target of 10 M examples/s takes under one. A
        killed run repeats at most ``checkpoint_every - 1`` epochs, exactly (the batch
        generator is checkpointed).
    """

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(40_000, ge=1)
    lr: float = Field(1e-3, gt=0)
    sparse_lr: float | None = Field(None, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
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
    checkpoint_every: int = Field(1, ge=1)


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


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _autocast(params: LoopParams, device: torch.device) -> contextlib.AbstractContextManager:
    if params.autocast == "off" or (params.autocast == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
    model: ImputationModel, data: ChromData, params: LoopParams | None = None
) -> dict[str, Any] | None:
    """Validation MSE on ``data.val_values``, global across workers.

    Parameters
    ----------
    model
        The model (its ``predict`` is called once per validation track).
    data
        The worker's slab; ``val_values`` ``[V, hi-lo]``.
    params
        For the autocast setting; defaults to :class:`LoopParams` defaults.

    Returns
    -------
    dict or None
        ``{"val_mse": mean over tracks of each track's MSE, "val_mse_tracks": [V] list}``;
        None when there are no validation tracks. Squared-error sums and bin counts are summed
        over workers before dividing, so every worker returns the same global figures.
    """
    if data.val_values is None or data.val_values.shape[0] == 0:
        return None
    params = params or LoopParams()
    dev = data.device
    v = data.val_values.shape[0]
    sums = torch.zeros(v + 1, dtype=torch.float64, device=dev)
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(params, dev):
        for j in range(v):
            pred = model.predict(data, int(data.val_biosample[j]), int(data.val_assay[j]))
            diff = pred.float() - data.val_values[j].float()
            sums[j] = (diff.double() ** 2).sum()
    sums[v] = data.n_local
    model.train(was_training)
    _, world = _world()
    if world > 1:
        dist.all_reduce(sums)
    per_track = (sums[:v] / sums[v]).tolist()
    return {"val_mse": sum(per_track) / v, "val_mse_tracks": per_track}


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
    amp = _autocast(params, dev)

    while state.epoch < params.epochs and not state.stopped:
        factor = _lr_factor(params, state.epoch)
        for opt, base in ((dense_opt, params.lr), (sparse_opt, params.sparse_lr or params.lr)):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = base * factor
        t0 = time.perf_counter()
        sums = _train_epoch(model, data, params, loss_fn, amp, gen, dense, dense_opt, sparse_opt)
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
        val = validate(model, data, params)
        metrics["val_mse"] = None if val is None else val["val_mse"]
        if val is not None:
            metrics["val_mse_tracks"] = val["val_mse_tracks"]
            if val["val_mse"] < state.best_val - params.min_delta:
                state.best_val, state.best_epoch, state.bad_epochs = val["val_mse"], state.epoch, 0
                if params.restore_best:
                    state.best_state = host_copy(model)
            else:
                state.bad_epochs += 1
                if params.patience is not None and state.bad_epochs >= params.patience:
                    state.stopped = True
        state.history.append(metrics)
        state.dense_opt = _merge_opt(state.dense_opt, dense_opt, names)
        state.sparse_opt = _merge_opt(state.sparse_opt, sparse_opt, names)
        state.generator = gen.get_state()
        state.torch_rng = torch.get_rng_state()
        state.cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        log.info(
            "epoch %d: train_mse %.5f val_mse %s, %.0f examples/s",
            state.epoch,
            metrics["train_mse"],
            metrics["val_mse"],
            metrics["examples_per_s"],
        )
        if callback is not None:
            callback(state, metrics)

    if params.restore_best and state.best_state is not None:
        model.load_state_dict(state.best_state)
    return state


def _lr_factor(params: LoopParams, epoch: int) -> float:
    """Multiplier of both learning rates in the epoch after ``epoch`` completed ones."""
    if params.lr_schedule == "constant":
        return 1.0
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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise EpirayError(
            f"checkpoint {path}: cannot read it ({exc}); expected a file written by "
            "epiray.loop.save_checkpoint. Point at a complete checkpoint."
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise EpirayError(
            f"checkpoint {path}: unknown format; expected epiray checkpoint format "
            f"{CHECKPOINT_FORMAT}, got {got}. "
            "Use a checkpoint from this epiray version."
        )
    vocab = Vocabulary.from_dict(payload["vocab"])
    if store_summary is not None:
        vocab.check_matches(store_summary)
    cls = get_model(payload["model"])
    prm = cls.Params.model_validate(payload["params"])
    model = cls.from_state(prm, vocab, data, payload["state_dict"])
    model.to(data.device)
    state = TrainState.from_dict(payload["loop"])  # best_state stays in host memory
    return model, state
