"""Ray Train: one model per (chromosome, fold), data-parallel over bins.

The driver (:func:`train`) validates the config, builds the folds and the vocabulary, and runs
one ``TorchTrainer`` per (chromosome, fold). Each worker (:func:`train_fn_per_worker`) owns a
5 kbp-aligned range of the chromosome's bins, loads its slab from the store onto its device
once, and runs :func:`epiray.loop.fit` (dense gradients all-reduced, genome factors
worker-local). Every epoch each worker writes its shard of the model into the checkpoint
directory (Ray Train merges the workers' files) and reports; a killed run resumes from the last
checkpoint when started again with the same config. After training, each worker predicts the
held-out experiments on its bins; the driver scores them against the store, adds the average
activity baseline and records everything in MLflow.

Trained-model layout (a checkpoint directory)::

    meta.json          model, params, vocabulary, store hash, assembly, chrom, shards, roles
    rank{r}.pt         epiray.loop checkpoint of worker r's slab
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from epiray.calibration import Calibration, average_activity, blend
from epiray.config import Section, dump_config
from epiray.errors import ConfigError, EpirayError
from epiray.evaluate import AVERAGE_ACTIVITY
from epiray.folds import heldout_fraction
from epiray.loader import Aux, load_chrom_data, shard_bounds, slab_size
from epiray.loop import (
    LoopParams,
    TrainState,
    fit,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from epiray.models import ChromData, SlabSize, Vocabulary, get_model
from epiray.store import Store, atomic_write_text
from epiray.tracking import TrackingConfig

log = logging.getLogger(__name__)

META = "meta.json"


# ------------------------------------------------------------------------------------ config
class ModelSection(Section):
    """``model``: a registered model name and its hyperparameters (validated by its Params)."""

    name: str = "avocado"
    params: dict[str, Any] = {}


class FoldSection(Section):
    """``folds``: which experiments train and which are held out (see :mod:`epiray.folds`).

    ``scheme``
        ``all`` (also spelled ``none``): train on every track of the target assembly, none
        held out for testing — the setting for imputing the pairs never measured (one run per
        chromosome, fold ``all``). ``experiment``: ``k``-fold cross-validation of the
        experiments. ``zero_shot``: ``k`` partitions of the assays of ``category``, each fold
        holding out every target-species experiment of one partition. ``zero_shot_category``:
        the whole category at once. ``loo``: one fold per experiment. ``manifest``: the
        manifest's ``fold`` column. ``predictd``: the PREDICTD split
        (``predictd_splits``).
    ``fold``
        The fold to train (an index into the scheme's folds) or ``all`` of them.
    """

    scheme: Literal[
        "all",
        "none",
        "experiment",
        "zero_shot",
        "zero_shot_category",
        "loo",
        "manifest",
        "predictd",
    ] = "experiment"
    k: int = Field(3, ge=2)
    fold: int | Literal["all"] = 0
    seed: int = 0
    category: str = "protein_binding"
    predictd_splits: str | None = None


class ValidationSection(Section):
    """``validation``: what early stopping and best-epoch selection are measured on.

    ``scheme``
        ``cells`` (the default): random blocks of ``block_bins`` bins of every target-species
        training track — a ``fraction`` of them, at most ``max_cells`` cells per chromosome —
        are never trained on and are predicted after every epoch, as unobserved tracks would
        be. No experiment is withheld whole: every track still trains on the rest of the
        chromosome, and every bin keeps its other tracks. ``experiments``: ``per_assay`` whole
        training experiments of every assay that keeps at least ``min_train`` are moved to
        validation (deterministically by ``seed``) and never trained on. ``none``: no
        validation; training runs ``train.epochs``.
    ``refit``
        After training with validation, train a fresh model on every cell (validation cells
        included) for the number of epochs validation chose, with the learning rate the
        selection run had in each of them (a ``plateau`` schedule's halvings replayed), and
        keep that one. Under ``scheme: experiments`` the refit trains on the validation
        experiments too.
    ``calibrate``
        Fit the weight ``w`` of the model against the average activity of each assay on
        whole validation experiments, after training and before any refit, and impute
        ``w · model + (1 − w) · AA`` from then on (the run's held-out predictions, ``epiray
        impute``); AA is the mean of the run's observed target-species tracks of the assay,
        and an assay with none (zero-shot) keeps the model alone (:mod:`epiray.calibration`).
        Under ``scheme: cells`` it withholds ``per_assay`` experiments of every assay that
        keeps ``min_train`` (as ``scheme: experiments`` does) for the weight alone: early
        stopping stays on the cells, and without ``refit`` the model never trains on them.
        The weight is in the checkpoint meta (``calibration``) and in MLflow
        (``calibration/weight``).
    Validation experiments given by the fold (PREDICTD) are always scored as well.
    """

    scheme: Literal["cells", "experiments", "none"] = "cells"
    fraction: float = Field(0.05, gt=0.0, le=0.5)
    block_bins: int = Field(200, ge=1)
    max_cells: int = Field(500_000, ge=1)
    seed: int = 0
    per_assay: int = Field(1, ge=0)
    min_train: int = Field(2, ge=1)
    refit: bool = False
    calibrate: bool = False

    @model_validator(mode="after")
    def _calibrate_needs_experiments(self) -> ValidationSection:
        if self.calibrate and (self.scheme == "none" or self.per_assay < 1):
            raise ValueError(
                f"validation.calibrate needs whole validation experiments, per_assay >= 1 of "
                f"every assay (got scheme {self.scheme!r}, per_assay {self.per_assay}): the "
                "weight against average activity is fitted on whole tracks the model never "
                "trained on. Set scheme: cells or experiments with per_assay >= 1, or "
                "calibrate: false."
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _per_assay_means_experiments(cls, v: Any) -> Any:
        # `validation: {per_assay: N}` (the earlier form, no scheme) keeps its meaning
        if isinstance(v, dict) and "per_assay" in v and "scheme" not in v:
            v = {**v, "scheme": "experiments" if v["per_assay"] else "none"}
        return v

    def cells_holdout(self, n_tracks: int, n_bins: int) -> dict[str, Any] | None:
        """The validation cells of a run on ``n_tracks`` training tracks of ``n_bins`` bins
        (``scheme: cells``; the run spec's ``holdout``), None for the other schemes."""
        if self.scheme != "cells":
            return None
        return {
            "fraction": heldout_fraction(n_tracks, n_bins, self.fraction, self.max_cells),
            "block_bins": self.block_bins,
            "seed": self.seed,
        }


class ScalingSection(Section):
    """``scaling``: Ray Train workers."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    #: ``reuse``: CPU workers start with glibc keeping freed memory for reuse
    #: (:data:`epiray.runtime.REUSE_MALLOC_TUNABLES`, +12 % samples/s on CPU); ``system``:
    #: the C library's defaults. GPU workers always keep the defaults.
    cpu_malloc: Literal["reuse", "system"] = "reuse"
    #: torch threads of a CPU worker; ``auto``: the node's cores (those the process may run
    #: on) shared by the run's workers on that node. Ray's own default, one thread per
    #: reserved CPU, would leave a laptop's second core idle with one worker.
    threads_per_worker: int | Literal["auto"] = "auto"


class TrainConfig(Section):
    """The ``train`` job: one model per (chromosome, fold)."""

    store: str
    out: str
    assembly: str
    chroms: list[str] | Literal["all"] = "all"
    model: ModelSection = ModelSection()
    synteny: str | None = None
    aux_species: bool = False
    folds: FoldSection = FoldSection()
    validation: ValidationSection = ValidationSection()
    train: LoopParams = LoopParams()
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingConfig = TrackingConfig()
    value_dtype: Literal["float32", "float16"] = "float32"
    predict_heldout: bool = True
    baseline: bool = True
    variant_name: str | None = None

    @field_validator("model")
    @classmethod
    def _check_model(cls, m: ModelSection) -> ModelSection:
        klass = get_model(m.name)
        try:
            klass.Params.model_validate(m.params)
        except Exception as e:  # pydantic ValidationError -> readable ConfigError text
            raise ValueError(f"model.params for {m.name!r}: {e}") from None
        return m

    def model_params(self):
        """The validated hyperparameters of the configured model."""
        return get_model(self.model.name).Params.model_validate(self.model.params)

    @property
    def label(self) -> str:
        """Name of the model in runs and tables, e.g. ``avocado`` or ``avocado_cross_species``."""
        if self.variant_name:
            return self.variant_name
        v = getattr(self.model_params(), "variant", None)
        return f"{self.model.name}_{v}" if v else self.model.name


# ------------------------------------------------------------------------------------ plan
@dataclass
class RunSpec:
    """Everything one (chromosome, fold) run needs; plain data, sent to every worker."""

    store: str
    assembly: str
    chrom: str
    fold: str
    model: str
    params: dict[str, Any]
    vocab: dict[str, Any]
    train: list[str]
    validate: list[str]
    evaluate: list[str]
    unscored: list[str]
    aux_name: str | None
    aux: list[str]
    loop: dict[str, Any]
    value_dtype: str
    out_dir: str
    store_hash: str
    label: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    holdout: dict[str, Any] | None = None
    refit: bool = False
    threads: int | None = None
    #: validation experiments withheld from ``train`` (``validation.scheme: experiments``, or
    #: ``calibrate``; a subset of ``validate``); a refit trains on them too, and so does the
    #: final model of a calibration beside validation cells
    withheld: list[str] = field(default_factory=list)
    #: the fold's training experiments before any was withheld, in the store's order
    all_train: list[str] = field(default_factory=list)
    #: fit the blend with average activity on the validation experiments
    #: (``validation.calibrate``; :mod:`epiray.calibration`)
    calibrate: bool = False
    #: the run's first line (:func:`run_summary`)
    summary: str = ""


def experiment_table(store: Store) -> pd.DataFrame:
    """The store's experiments as the table :mod:`epiray.folds` expects."""
    df = store.experiments()
    return df[
        ["experiment", "species", "assembly", "biosample", "assay", "category", "fold", "donor"]
    ].copy()


#: fold schemes that train on every track (no experiment held out for testing)
TRAIN_ON_ALL = ("all", "none")


def build_folds(cfg: TrainConfig, table: pd.DataFrame, target_species: str):
    """The :class:`epiray.folds.Folds` of the config."""
    from epiray import folds as F

    f = cfg.folds
    if f.scheme in TRAIN_ON_ALL:
        return F.Folds("none", (F.Fold("all", tuple(sorted(table["experiment"])), ()),))
    if f.scheme == "experiment":
        return F.experiment_folds(table, k=f.k, target_species=target_species, seed=f.seed)
    if f.scheme == "zero_shot":
        return F.zero_shot_folds(
            table, k=f.k, target_species=target_species, category=f.category, seed=f.seed
        )
    if f.scheme == "zero_shot_category":
        return F.zero_shot_category_fold(table, target_species=target_species, category=f.category)
    if f.scheme == "loo":
        return F.leave_one_out_folds(table, target_species=target_species)
    if f.scheme == "manifest":
        return F.manifest_folds(table)
    if not f.predictd_splits:
        raise ConfigError(
            "train config: folds.scheme predictd needs folds.predictd_splits "
            "(the predictd_splits.json file)."
        )
    return F.predictd_folds(table, f.predictd_splits)


def plan_runs(cfg: TrainConfig) -> tuple[Store, list[RunSpec]]:
    """Validate the config against the store and list the (chromosome, fold) runs.

    Everything a run needs is checked here, before a worker starts (``epiray train --plan``
    and sweeps call it too): chromosomes, folds, training data, and the other-species tracks
    (:func:`check_other_species`).

    Raises
    ------
    ConfigError, StoreError
        Unknown assembly/chromosome/synteny, a cross-species model without synteny and
        ``aux_species``, no training data, ...
    """
    store = Store.open(cfg.store)
    asm = store.assembly(cfg.assembly)
    chroms = list(asm.chrom_sizes) if cfg.chroms == "all" else list(cfg.chroms)
    missing = [c for c in chroms if c not in asm.chrom_sizes]
    if missing:
        raise ConfigError(
            f"train config: chroms {missing} not in assembly {cfg.assembly} of store "
            f"{store.root}; expected some of {sorted(asm.chrom_sizes)}."
        )
    table = experiment_table(store)
    target_species = asm.species
    params = cfg.model_params()
    check_other_species(cfg, store, params)
    use_aux = cfg.synteny is not None and cfg.aux_species
    in_scope = table[
        (table["assembly"] == cfg.assembly) | (use_aux & (table["species"] != target_species))
    ]
    folds = build_folds(cfg, in_scope, target_species)
    fold_list = list(folds)
    if cfg.folds.fold != "all":
        if cfg.folds.fold >= len(fold_list):
            raise ConfigError(
                f"train config: folds.fold {cfg.folds.fold}; expected < {len(fold_list)} "
                f"folds of scheme {cfg.folds.scheme!r}."
            )
        fold_list = [fold_list[cfg.folds.fold]]
    species = dict(zip(in_scope["experiment"], in_scope["species"], strict=True))
    rng_seed = cfg.folds.seed
    specs = []
    checksums = {
        e: v.get("checksum") for e, v in store.summary["experiments"].items() if v.get("checksum")
    }
    for chrom in chroms:
        nb = store.n_bins(cfg.assembly, chrom)
        vocab = Vocabulary.from_records(
            in_scope,
            chrom=chrom,
            n_bins=nb,
            assembly=cfg.assembly,
            store_hash=store.summary.get("manifest_hash"),
            checksums=checksums,
        )
        for fold in fold_list:
            role = {e: fold.role(e) for e in in_scope["experiment"]}
            tgt = in_scope[in_scope["assembly"] == cfg.assembly]
            train = [e for e in tgt["experiment"] if role[e] == "train"]
            validate = [e for e in tgt["experiment"] if role[e] == "validate"]
            extra_val: list[str] = []
            all_train = list(train)
            if cfg.validation.scheme == "experiments" or cfg.validation.calibrate:
                train, extra_val = _pick_validation(tgt, train, cfg.validation, rng_seed)
                validate += extra_val
            # beside validation cells, the final model trains on every training track
            holdout = cfg.validation.cells_holdout(len(all_train), nb)
            aux = (
                [
                    e
                    for e in in_scope.loc[in_scope["assembly"] != cfg.assembly, "experiment"]
                    if role[e] == "train"
                ]
                if use_aux
                else []
            )
            if not train:
                raise ConfigError(
                    f"train config: fold {fold.name} of chrom {chrom} has no training "
                    f"experiments of {cfg.assembly}."
                )
            if needs_other_species(params) and not aux:
                raise ConfigError(
                    f"train config: model {cfg.model.name} variant {params.variant} trains on "
                    f"other-species tracks, but fold {fold.name} of chrom {chrom} has none "
                    f"through synteny {cfg.synteny!r} (the store's other-species experiments "
                    "are all held out, or there are none); expected at least one. Ingest the "
                    "other species' tracks, choose another fold scheme, or use variant: "
                    "mouse_only."
                )
            name = f"{cfg.label}.{chrom}.{fold.name}"
            specs.append(
                RunSpec(
                    store=str(store.root),
                    assembly=cfg.assembly,
                    chrom=chrom,
                    fold=str(fold.name),
                    model=cfg.model.name,
                    params=params.model_dump(mode="json"),
                    vocab=vocab.to_dict(),
                    train=train,
                    validate=validate,
                    evaluate=[e for e in tgt["experiment"] if role[e] == "evaluate"],
                    unscored=[e for e in tgt["experiment"] if role[e] == "unscored"],
                    aux_name=cfg.synteny if use_aux else None,
                    aux=aux,
                    loop=cfg.train.model_dump(mode="json"),
                    value_dtype=cfg.value_dtype,
                    out_dir=str(Path(storage_path(cfg)) / name),
                    store_hash=store.store_hash,
                    label=cfg.label,
                    holdout=holdout,
                    refit=cfg.validation.refit and (holdout is not None or bool(validate)),
                    threads=None
                    if cfg.scaling.threads_per_worker == "auto"
                    else cfg.scaling.threads_per_worker,
                    withheld=extra_val,
                    all_train=all_train,
                    calibrate=cfg.validation.calibrate,
                )
            )
            specs[-1].summary = run_summary(specs[-1], species, cfg)
    return store, specs


def needs_other_species(params: Any) -> bool:
    """Whether a model's params train it on other-species tracks (Avocado's
    ``cross_species`` and ``concat`` variants): without them it cannot be built."""
    return getattr(params, "variant", None) in ("cross_species", "concat")


def check_other_species(cfg: TrainConfig, store: Store, params: Any = None) -> None:
    """Refuse, before anything starts, a config whose other-species tracks cannot work.

    Checked: ``synteny`` names a mapping of the store onto ``assembly``; ``aux_species: true``
    comes with a ``synteny``; a model that trains on other-species tracks
    (:func:`needs_other_species`) has both.

    Raises
    ------
    ConfigError
        Naming the keys to set, their values and the store's synteny mappings.
    """
    params = params if params is not None else cfg.model_params()
    mappings = store.summary.get("synteny", {}) or {}
    onto = sorted(
        n for n, m in mappings.items() if m.get("mouse_assembly") in (None, cfg.assembly)
    )
    if onto:
        has = f"store {store.root} has the synteny mappings {onto} onto {cfg.assembly}"
    elif mappings:
        has = (
            f"store {store.root} has no synteny mapping onto {cfg.assembly} (only "
            f"{sorted(mappings)}); build one with `epiray synteny --store {store.root} "
            f"--chain CHAIN --mouse-assembly {cfg.assembly} --human-assembly ASM --name NAME`"
        )
    else:
        has = (
            f"store {store.root} has no synteny mapping yet; build one with `epiray synteny "
            f"--store {store.root} --chain CHAIN --mouse-assembly {cfg.assembly} "
            "--human-assembly ASM --name NAME`"
        )
    example = onto[0] if onto else "NAME"
    if cfg.synteny is not None:
        if cfg.synteny not in mappings:
            raise ConfigError(
                f"train config: synteny {cfg.synteny!r} is not in store {store.root}; expected "
                f"one of its mappings, got {cfg.synteny!r} ({has}). Set synteny: {example}, "
                "or synteny: null (and aux_species: false) to train without other species."
            )
        target = mappings[cfg.synteny].get("mouse_assembly")
        if target not in (None, cfg.assembly):
            raise ConfigError(
                f"train config: synteny {cfg.synteny!r} maps onto assembly {target}; expected "
                f"a mapping onto the target assembly {cfg.assembly} ({has}). Set "
                f"synteny: {example}, or assembly: {target}."
            )
    variant = getattr(params, "variant", None)
    if needs_other_species(params) and (cfg.synteny is None or not cfg.aux_species):
        missing = ([f"synteny: {example}"] if cfg.synteny is None else []) + (
            [] if cfg.aux_species else ["aux_species: true"]
        )
        raise ConfigError(
            f"train config: model {cfg.model.name} variant {variant} trains on other-species "
            f"tracks mapped through synteny; expected synteny and aux_species: true, got "
            f"synteny: {cfg.synteny or 'null'}, aux_species: {str(cfg.aux_species).lower()} "
            f"(0 other-species tracks). Set {' and '.join(missing)} ({has}), or use "
            "variant: mouse_only."
        )
    if cfg.aux_species and cfg.synteny is None:
        raise ConfigError(
            f"train config: aux_species: true adds the other species' tracks through a "
            f"synteny mapping; expected synteny set, got synteny: null. Set synteny: {example} "
            f"({has}), or aux_species: false."
        )


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g} %"


def run_summary(spec: RunSpec, species: dict[str, str], cfg: TrainConfig | None = None) -> str:
    """The first line of a run: what it trains on and what it holds out, e.g.
    ``avocado_mouse_only chr1: training on all 29 mouse tracks, 5 % of their bins held out for
    validation`` or ``edice chr1 fold0: training on 137 tracks (29 mouse + 108 human through
    synteny hs2mm), 8 held out for testing, 5 % of the mouse tracks' bins held out for
    validation``.

    Parameters
    ----------
    spec
        The run.
    species
        Experiment -> species of the run's experiments.
    cfg
        Its config: says when ``validation.max_cells`` lowered the held-out share, and how
        many epochs a run without validation trains.
    """

    def by_species(exps: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in exps:
            out[species.get(e, "?")] = out.get(species.get(e, "?"), 0) + 1
        return out

    own = by_species(spec.train)
    aux = by_species(spec.aux)
    own_txt = " + ".join(f"{n} {sp}" for sp, n in own.items())
    held_whole = spec.evaluate or spec.unscored or spec.validate
    every = "" if held_whole else "all "
    if aux:
        aux_txt = " + ".join(f"{n} {sp}" for sp, n in aux.items())
        n = len(spec.train) + len(spec.aux)
        tracks = f"{every}{n} tracks ({own_txt} + {aux_txt} through synteny {spec.aux_name})"
    else:
        tracks = f"{every}{own_txt} tracks"
    parts = [f"training on {tracks}"]
    if spec.evaluate:
        parts.append(f"{len(spec.evaluate)} held out for testing")
    if spec.unscored:
        parts.append(f"{len(spec.unscored)} held out unscored")
    kept = [e for e in spec.validate if not (spec.holdout and e in set(spec.withheld))]
    if kept:
        parts.append(f"{len(kept)} held out for validation")
    if spec.holdout and spec.withheld:
        parts.append(f"{len(spec.withheld)} held out for calibration")
    if spec.holdout:
        frac = spec.holdout["fraction"]
        whose = f"the {' and '.join(own)} tracks'" if aux else "their"
        text = f"{_percent(frac)} of {whose} bins held out for validation"
        if cfg is not None and frac < cfg.validation.fraction:
            text += (
                f" ({_percent(cfg.validation.fraction)} lowered to at most "
                f"{cfg.validation.max_cells:,} cells by validation.max_cells)"
            )
        parts.append(text)
    if spec.calibrate:
        parts.append("imputations blended with average activity by the weight those fit")
    if spec.refit:
        what = "every track and bin" if spec.withheld else "every bin"
        parts.append(f"then retrained on {what} for the epochs validation chose")
    elif not spec.holdout and not spec.validate:
        epochs = f"all {cfg.train.epochs} epochs" if cfg is not None else "every epoch"
        parts.append(f"no validation: trains {epochs}")
    where = f"{spec.label} {spec.chrom}" + ("" if spec.fold == "all" else f" {spec.fold}")
    return f"{where}: " + ", ".join(parts)


def _pick_validation(
    tgt: pd.DataFrame, train: list[str], v: ValidationSection, seed: int
) -> tuple[list[str], list[str]]:
    if v.per_assay == 0:
        return train, []
    rng = np.random.default_rng(seed)
    sub = tgt[tgt["experiment"].isin(train)].sort_values("experiment")
    val = []
    for _, g in sub.groupby("assay", sort=True):
        if len(g) - v.per_assay >= v.min_train:
            val += list(rng.choice(g["experiment"].to_numpy(), v.per_assay, replace=False))
    return [e for e in train if e not in set(val)], sorted(val)


def storage_path(cfg: TrainConfig) -> str:
    """Where Ray Train keeps runs and checkpoints: ``EPIRAY_STORAGE_PATH`` (shared storage on a
    cluster) or the config's ``out``."""
    return os.environ.get("EPIRAY_STORAGE_PATH") or str(Path(cfg.out).resolve())


# ------------------------------------------------------------------------------------ worker
_BIN_PARTS = ("data", "genome", "genome_adam")


def _gib_parts(memory: dict[str, int], digits: int) -> str:
    return ", ".join(f"{k} {v / 2**30:.{digits}f}" for k, v in memory.items() if k != "total")


def describe_memory(memory: dict[str, int], size: SlabSize) -> str:
    """One line: the estimated bytes of a worker (``memory_estimate``) by part."""
    parts = _gib_parts(memory, 2)
    return (
        f"memory per worker ≈ {memory['total'] / 2**30:.2f} GiB ({parts} GiB) for bins "
        f"[{size.lo}, {size.hi}), {size.experiments} tracks, {size.aux_tracks} other-species "
        f"tracks on {size.aux_rows} alignment rows"
    )


def check_worker_memory(
    memory: dict[str, int], device: torch.device, where: str, world: int, free: int | None = None
) -> None:
    """Refuse, before loading, a slab that cannot fit on the worker's GPU.

    ``free`` defaults to the CUDA device's free memory; CPU workers are not checked (the host's
    memory is shared by the node's workers and Ray's object store). The error says how many
    workers would fit: the data and genome parts shrink with the worker's bins, the dense
    parameters and the step's working memory do not.
    """
    if free is None:
        if device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(device)
    need = memory["total"]
    if need <= free:
        return
    per_bins = sum(memory.get(k, 0) for k in _BIN_PARTS)  # parts that shrink with bins
    fixed = need - per_bins
    gib = 2**30
    if fixed < free:
        workers = math.ceil(world * per_bins / (free - fixed))
        fix = f"Set scaling.num_workers to at least {workers} (each worker then holds fewer bins)"
    else:
        fix = "Lower train.batch_size (the step's working memory alone does not fit)"
    raise EpirayError(
        f"{where}: a worker needs ≈ {need / gib:.1f} GiB ({_gib_parts(memory, 1)} GiB) but "
        f"its device has {free / gib:.1f} GiB free; expected the slab to fit. "
        f"{fix}, set value_dtype: float16 (half the data), or train on fewer tracks."
    )


def worker_memory(
    spec: RunSpec, store: Store, lo: int, hi: int
) -> tuple[SlabSize, dict[str, int] | None]:
    """The slab sizes of the worker owning bins ``[lo, hi)`` of a run, and the model's estimate
    of its memory (None when the model gives none); no values are read."""
    klass = get_model(spec.model)
    size = slab_size(
        store,
        spec.assembly,
        spec.chrom,
        lo,
        hi,
        spec.train,
        validate=spec.validate,
        aux=Aux(spec.aux_name, spec.aux) if spec.aux_name and spec.aux else None,
        value_dtype=torch.float16 if spec.value_dtype == "float16" else torch.float32,
    )
    loop = LoopParams.model_validate(spec.loop)
    batch = loop.batch_size
    if batch == "auto":  # the largest auto may choose: an upper bound of the step's memory
        batch = loop.max_batch_size or klass.max_batch_size
    params = klass.Params.model_validate(spec.params)
    return size, klass.memory_estimate(params, Vocabulary.from_dict(spec.vocab), size, batch)


def memory_plan(cfg: TrainConfig) -> pd.DataFrame:
    """Every run's workers and their estimated memory (GiB), without training: what
    ``epiray train --plan`` prints before a job is submitted."""
    store, specs = plan_runs(cfg)
    world = cfg.scaling.num_workers
    rows = []
    for spec in specs:
        n_bins = store.n_bins(spec.assembly, spec.chrom)
        for rank in range(world):
            lo, hi = shard_bounds(n_bins, world, rank)
            size, mem = worker_memory(spec, store, lo, hi)
            row = {
                "model": spec.label,
                "chrom": spec.chrom,
                "fold": spec.fold,
                "worker": rank,
                "bins": size.bins,
                "tracks": size.experiments + size.val_experiments,
                "aux_tracks": size.aux_tracks,
                "aux_rows": size.aux_rows,
            }
            row.update({f"{k}_gib": v / 2**30 for k, v in (mem or {}).items()})
            rows.append(row)
    return pd.DataFrame(rows)


def wants_checkpoint(state, params: LoopParams, since: float = math.inf) -> bool:
    """Whether the per-epoch report after ``state.epoch`` carries a checkpoint: every
    ``params.checkpoint_every`` epochs (``auto``: once ``params.checkpoint_seconds`` have
    passed ``since`` the last one), except after the run's last epoch, whose final report
    (always checkpointed) follows at once, so the chromosome's factors are not written twice."""
    last = state.stopped or state.epoch >= params.epochs
    if last:
        return False
    if params.checkpoint_every == "auto":
        return since >= params.checkpoint_seconds
    return state.epoch % params.checkpoint_every == 0


def _agreed_seconds(seconds: float) -> float:
    """The longest of the workers' ``seconds`` (one all-reduce when distributed), so every
    worker takes the same time-based checkpoint decision."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([seconds], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    return seconds


def regime_tags(state, loop_params: LoopParams) -> dict[str, str]:
    """MLflow tags of a run's training regime (:func:`epiray.loop.regime`) and, once it has
    ended, whether it may be undertrained: too few steps allowed, or validation still
    improving at the last epoch."""
    reg = state.regime or {}
    tags = {
        f"epiray.regime.{k}": str(reg[k])
        for k in ("batch_size", "steps_per_epoch", "max_steps", "epoch_examples")
        if k in reg
    }
    reasons = [reg["warning"]] if reg.get("warning") else []
    finished = state.stopped or state.epoch >= loop_params.epochs
    if (
        finished
        and not state.stopped
        and state.best_epoch == state.epoch
        and state.epoch > 1
        and np.isfinite(state.best_val)
    ):
        reasons.append(
            f"validation still improving at the last epoch ({state.epoch}); raise train.epochs"
        )
    tags["epiray.undertrained"] = "; ".join(reasons) if reasons else "no"
    return tags


def quiet_ray_train() -> None:
    """Silence Ray Train's per-report INFO lines in this process (epiray logs one line per
    epoch itself); its warnings and errors still show."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray Train v2 logs each report through a logger named after its file
        from ray.train.v2._internal.execution import context as _context

        _context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass


def worker_threads(local_workers: int) -> int:
    """torch threads for one of ``local_workers`` CPU workers on this node: the cores this
    process may run on, shared evenly (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_workers))


def calibrate(model, data: ChromData, spec: RunSpec, vocab: Vocabulary, run=None):
    """Fit the run's blend with average activity on its validation experiments
    (``validation.calibrate``; :mod:`epiray.calibration`), summed over every worker's bins.

    Returns the :class:`~epiray.calibration.Calibration` as a dict for the checkpoint meta, or
    None when no validation experiment has training tracks of its assay (the model stays
    alone, with a warning).
    """
    import torch.distributed as dist

    from epiray.calibration import calibration_sums, fit_weight

    sums = calibration_sums(model, data)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on = sums.to(data.device)
        dist.all_reduce(on)
        sums = on.cpu()
    if dist.is_available() and dist.is_initialized():
        sums[5] /= dist.get_world_size()  # every worker has every validation track
    cal = fit_weight(sums)
    if cal is None:
        log.warning(
            "calibration of %s on %s: no validation experiment whose assay has training "
            "tracks, so there is no weight to fit; the model's imputations stay unblended.",
            spec.label,
            spec.chrom,
        )
        return None
    for e in spec.train + spec.validate:
        assay = vocab.assays[vocab.experiment_index(e).assay]
        cal.average_activity.setdefault(assay, []).append(e)
    log.info(
        "calibration: weight %.3f of the model against average activity on %d validation "
        "tracks (MSE model %.4f, average activity %.4f, blend %.4f)",
        cal.weight,
        cal.tracks,
        cal.mse_model,
        cal.mse_average_activity,
        cal.mse_blend,
    )
    if run is not None:
        run.log_metrics(
            {
                "calibration/weight": cal.weight,
                "calibration/mse_model": cal.mse_model,
                "calibration/mse_average_activity": cal.mse_average_activity,
                "calibration/mse_blend": cal.mse_blend,
            },
            step=0,
        )
        run.set_tags({"epiray.calibration_weight": f"{cal.weight:.4f}"})
    return cal.to_dict()


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: load the slab, train (resuming if a checkpoint exists), predict."""
    import ray.train
    import ray.train.torch

    spec = RunSpec(**config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # one line per epoch from rank 0; Ray Train's own per-report lines are noise here
    quiet_ray_train()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(spec.threads or worker_threads(ctx.get_local_world_size()))
    logging.getLogger("epiray").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    store = Store.open(spec.store)
    vocab = Vocabulary.from_dict(spec.vocab)
    n_bins = store.n_bins(spec.assembly, spec.chrom)
    lo, hi = shard_bounds(n_bins, world, rank)
    value_dtype = torch.float16 if spec.value_dtype == "float16" else torch.float32
    aux = Aux(spec.aux_name, spec.aux) if spec.aux_name and spec.aux else None
    loop_params = LoopParams.model_validate(spec.loop)
    klass = get_model(spec.model)
    size, memory = worker_memory(spec, store, lo, hi)
    if memory is not None:
        check_worker_memory(memory, device, f"train {spec.label} {spec.chrom}", world)
        log.info("rank %d: %s", rank, describe_memory(memory, size))
    hold = spec.holdout or {}
    # the refit trains on the withheld validation experiments too, in the store's order
    withheld = set(spec.withheld)
    kept = withheld | set(spec.train)
    everything = [e for e in spec.all_train if e in kept]
    refit_train = (
        everything
        if len(everything) == len(spec.train) + len(withheld)
        else (spec.train + [e for e in spec.withheld if e not in spec.train])
    )
    refit_validate = [e for e in spec.validate if e not in withheld]
    # calibrate beside validation cells: a calibration model without the withheld experiments
    # fits the weight first, then the final model trains on every track (cells as validation)
    separate = spec.calibrate and spec.holdout is not None and bool(spec.withheld)

    def tracks_of(phase: str) -> tuple[list[str], list[str]]:
        if phase == "refit" or (phase == "fit" and separate):
            return refit_train, refit_validate
        return spec.train, spec.validate

    def load(phase: str):
        train_on, validate_on = tracks_of(phase)
        return load_chrom_data(
            store,
            spec.assembly,
            spec.chrom,
            lo,
            hi,
            vocab,
            train_on,
            validate=validate_on,
            aux=aux,
            device=device,
            value_dtype=value_dtype,
            heldout_fraction=0.0 if phase == "refit" else hold.get("fraction", 0.0),
            heldout_block=hold.get("block_bins", 200),
            heldout_seed=hold.get("seed", 0),
        )

    ckpt = ray.train.get_checkpoint()
    resumed: dict[str, Any] = {}
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / META).is_file():
                resumed = json.loads((Path(d) / META).read_text())
    data = load(resumed.get("phase") or ("calibrate" if separate else "fit"))
    if rank == 0 and data.heldout is not None:
        log.info(
            "validation: %d cells of the %d training tracks held out on this worker's bins "
            "(blocks of %d bins, %.2f%% of them)",
            data.n_heldout_cells,
            data.n_experiments,
            data.heldout_block,
            100 * hold.get("fraction", 0.0),
        )

    # `epiray extend` (epiray.extend): the model starts from a trained run, only what is new
    # trains; what it records beside the usual meta (trainable parameters, parent) is kept here
    extension = spec.extra.get("extend")
    extension_meta: dict[str, Any] = {}

    def fresh_model():
        # seeded initialisation: the same config trains the same model (dense parameters are
        # then broadcast from rank 0; each rank's own rows get their own stream)
        seed_everything(loop_params.seed + 7919 * rank)
        if extension:
            from epiray.extend import start_extension

            model, start, extra_meta = start_extension(spec, data, rank)
            extension_meta.update(extra_meta)
            return model, start
        return klass.build(klass.Params.model_validate(spec.params), vocab, data), None

    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model, state = load_checkpoint(
                Path(d) / f"rank{rank}.pt", data, store_summary=store.summary
            )
            if extension:
                from epiray.extend import resume_extension

                extension_meta.update(resume_extension(spec, model, Path(d) / META))
        log.info("rank %d resumes %s after epoch %d", rank, spec.label, state.epoch)
    else:
        model, state = fresh_model()

    run = None
    if rank == 0 and spec.mlflow_run_id:
        from epiray.tracking import TrackedRun, TrackingConfig, client

        mlc = client(spec.tracking_uri)
        run = TrackedRun(
            TrackingConfig(tracking_uri=spec.tracking_uri), mlc, spec.mlflow_run_id, None, None
        )

    if run is not None:
        # the allocator settings the workers run with (scaling.cpu_malloc), for speed audits
        tags = {"epiray.worker_glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
        if memory is not None:
            tags["epiray.memory_per_worker_gib"] = f"{memory['total'] / 2**30:.3f}"
            tags["epiray.memory_per_worker"] = describe_memory(memory, size)
        if data.heldout is not None:
            tags["epiray.validation_cells_rank0"] = str(data.n_heldout_cells)
        run.set_tags(tags)
    shards = [list(shard_bounds(n_bins, world, r)) for r in range(world)]
    # phase 1's outcome (chosen length, calibration), kept in the refit's checkpoints and
    # restored with them
    selection: dict[str, Any] = {
        k: resumed[k]
        for k in (
            "calibration_epochs",
            "calibration_history",
            "selection_epochs",
            "selected_epochs",
            "best_val_mse",
            "selection_history",
            "calibration",
        )
        if k in resumed
    }

    def save(d: Path, state, final: bool) -> None:
        save_checkpoint(d / f"rank{rank}.pt", model, state)
        if rank == 0:
            meta = {
                "model": spec.model,
                "label": spec.label,
                "params": spec.params,
                "vocab": spec.vocab,
                "store": spec.store,
                "store_hash": spec.store_hash,
                "assembly": spec.assembly,
                "chrom": spec.chrom,
                "fold": spec.fold,
                "n_bins": n_bins,
                "shards": shards,
                "train": tracks_of(state.phase)[0],
                "validate": tracks_of(state.phase)[1],
                "evaluate": spec.evaluate,
                "aux_name": spec.aux_name,
                "aux": spec.aux,
                "value_dtype": spec.value_dtype,
                "holdout": spec.holdout,
                "phase": state.phase,
                "epoch": state.epoch,
                "final": final,
                "best_epoch": state.best_epoch,
                "regime": state.regime,
                "history": [
                    {k: v for k, v in h.items() if not isinstance(v, list)} for h in state.history
                ],
                **selection,
                # the MLflow run, so a run extended later (`epiray extend`) links to it
                "mlflow_run_id": spec.mlflow_run_id,
                **extension_meta,
            }
            (d / META).write_text(json.dumps(meta, indent=1))

    clock = {"last": time.perf_counter(), "reported": time.perf_counter(), "tagged": False}

    def report(state, metrics: dict[str, Any], final: bool = False, tag: str = "") -> None:
        params = refit_params(state) if state.phase == "refit" else loop_params
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None
        }
        clean["final"] = float(final)
        clean["refit"] = float(state.phase == "refit")
        # epochs of the earlier phases: checkpoint names and MLflow steps keep counting
        offset = selection.get("calibration_epochs", 0) + selection.get("selection_epochs", 0)
        if run is not None and not clock["tagged"] and state.regime:
            run.set_tags(regime_tags(state, params) | {"epiray.undertrained": "pending"})
            clock["tagged"] = True
        if run is not None and not final and not tag:
            if state.phase == "fit":
                run.log_epoch(
                    int(metrics["epoch"]),
                    train={
                        "mse": metrics["train_mse"],
                        "examples_per_s": metrics["examples_per_s"],
                    },
                    val={"mse": metrics["val_mse"]}
                    if metrics.get("val_mse") is not None
                    else None,
                )
            elif state.phase == "calibrate":
                got = {"calibration/train_mse": metrics["train_mse"]}
                if metrics.get("val_mse") is not None:
                    got["calibration/val_mse"] = metrics["val_mse"]
                run.log_metrics(got, step=state.epoch)
            else:
                step = offset + state.epoch
                run.log_metrics({"refit/train_mse": metrics["train_mse"]}, step=step)
        now = time.perf_counter()
        since, since_report = (
            _agreed_seconds(x) for x in (now - clock["last"], now - clock["reported"])
        )
        if not final and not tag and not wants_checkpoint(state, params, since):
            # Ray Train's controller takes one report per poll (2 s): reporting every short
            # epoch would make every epoch last that long. Tune's ASHA counts epochs.
            if since_report >= params.report_seconds:
                ray.train.report(clean)
                clock["reported"] = time.perf_counter()
            return
        clock["last"] = clock["reported"] = time.perf_counter()
        name = f"epoch{offset + state.epoch:04d}{'_final' if final else tag}"
        with tempfile.TemporaryDirectory() as d:
            save(Path(d), state, final)
            ray.train.report(
                clean, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name
            )

    def refit_params(state) -> LoopParams:
        return loop_params.model_copy(
            update={"epochs": state.selected_epochs, "patience": None, "restore_best": False}
        )

    def done(state, params) -> bool:
        return state.stopped or state.epoch >= params.epochs

    if state is None and separate:
        state = TrainState(phase="calibrate")
    if state is not None and state.phase == "calibrate":
        # phase 0: the calibration model, without the experiments the weight is fitted on
        if not done(state, loop_params):
            state = fit(model, data, loop_params, callback=report, start_state=state)
        elif loop_params.restore_best and state.best_state is not None:
            model.load_state_dict(state.best_state)
        if "calibration" not in selection:
            selection["calibration"] = calibrate(model, data, spec, vocab, run)
        if spec.extra.get("calibration_only"):
            # train(calibration_only=True): the weight is the run's product; no final model
            report(state, dict(state.history[-1]) if state.history else {}, final=True)
            return
        report(state, dict(state.history[-1]) if state.history else {}, tag="_calibrated")
        selection.update(
            calibration_epochs=state.epoch,
            calibration_history=[
                {k: v for k, v in h.items() if not isinstance(v, list)} for h in state.history
            ],
        )
        log.info(
            "calibration model done after %d epochs; training the model on every track",
            state.epoch,
        )
        data = load("fit")
        model, state = fresh_model()
    # phase 1: train with validation (or without, for train.epochs)
    if state is None or (state.phase == "fit" and not done(state, loop_params)):
        state = fit(model, data, loop_params, callback=report, start_state=state)
    elif state.phase == "fit" and loop_params.restore_best and state.best_state is not None:
        model.load_state_dict(state.best_state)
    if state.phase == "fit" and spec.calibrate and "calibration" not in selection:
        selection["calibration"] = calibrate(model, data, spec, vocab, run)
    if state.phase == "fit" and spec.refit:
        # phase 2: a fresh model on every cell for the epochs validation chose
        refit_state = state.refit(loop_params.lr)
        chosen = refit_state.selected_epochs
        selection.update(
            selection_epochs=state.epoch,
            selected_epochs=chosen,
            best_val_mse=state.best_val if np.isfinite(state.best_val) else None,
            selection_history=[
                {k: v for k, v in h.items() if not isinstance(v, list)} for h in state.history
            ],
        )
        if run is not None:
            run.set_tags(regime_tags(state, loop_params) | {"epiray.refit_epochs": str(chosen)})
        report(state, dict(state.history[-1]) if state.history else {}, tag="_selected")
        log.info("refit: training a fresh model on every cell for %d epochs", chosen)
        state = refit_state
    if state.phase == "refit":
        selection.setdefault("selected_epochs", state.selected_epochs)
        data.heldout = None
        if data.n_experiments != len(refit_train):
            data = load("refit")  # the withheld validation experiments join the training
        if state.epoch == 0:
            model, _ = fresh_model()
        if not done(state, refit_params(state)):
            state = fit(model, data, refit_params(state), callback=report, start_state=state)
    final_params = refit_params(state) if state.phase == "refit" else loop_params
    if run is not None:
        run.set_tags(regime_tags(state, final_params))
    last = dict(state.history[-1]) if state.history else {"epoch": state.epoch}
    report(
        state,
        {
            **last,
            "best_epoch": state.best_epoch,
            "best_val_mse": state.best_val if np.isfinite(state.best_val) else None,
        },
        final=True,
    )
    data.heldout = None  # imputations use every observed cell

    # predictions of the held-out experiments on this worker's bins (blended with average
    # activity by the calibration's weight, when the run has one)
    cal = Calibration.from_dict(selection.get("calibration"))
    out = Path(spec.out_dir) / "predictions"
    model.eval()
    with torch.no_grad():
        for e in spec.evaluate + spec.unscored:
            key = vocab.experiment_index(e)
            pred = model.predict(data, key.biosample, key.assay).float()
            if cal is not None:
                pred = blend(pred, average_activity(data, key.assay), cal.weight)
            pred = pred.cpu().numpy()
            p = out / e / f"{lo:012d}-{hi:012d}.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp.npy")
            np.save(tmp, pred)
            tmp.replace(p)


# ------------------------------------------------------------------------------------ driver
@dataclass
class RunResult:
    """What one (chromosome, fold) run produced."""

    spec: RunSpec
    checkpoint: str
    scores: pd.DataFrame
    history: pd.DataFrame
    mlflow_run_id: str | None


def _use_gpu(s: ScalingSection) -> bool:
    if s.use_gpu == "auto":
        import ray

        return bool(ray.cluster_resources().get("GPU", 0))
    return bool(s.use_gpu)


def worker_runtime_env(s: ScalingSection, use_gpu: bool) -> dict[str, Any]:
    """The Ray runtime env of a run's Train workers (merged into the job's by Ray)."""
    if use_gpu or s.cpu_malloc == "system":
        return {}
    from epiray.runtime import REUSE_MALLOC_TUNABLES

    return {"env_vars": {"GLIBC_TUNABLES": REUSE_MALLOC_TUNABLES}}


def run_one(
    spec: RunSpec,
    cfg: TrainConfig,
    parent=None,
    *,
    trial: str | None = None,
    callbacks: Sequence[Any] = (),
    tags: dict[str, str] | None = None,
    config: Any = None,
) -> RunResult:
    """Train one (chromosome, fold) with a ``TorchTrainer``, then score the held-out tracks.

    The run starts by logging its first line (:attr:`RunSpec.summary`: what it trains on and
    holds out) and writing its resolved config to ``<out>/<run name>.resolved.yaml`` (one
    file per run, written atomically; the same YAML is the MLflow run's ``config.yaml``); its
    MLflow run records the store as its input dataset (:func:`log_store_input`).

    ``trial`` (a Ray Tune trial id) is appended to the MLflow run name and tagged;
    ``callbacks`` are Ray Train ``UserCallback`` objects for the run's ``RunConfig`` (a sweep
    passes ``ray.tune.integration.ray_train.TuneReportCallback`` so per-epoch metrics reach
    Tune). ``tags`` are added to the MLflow run; ``config`` is the config recorded as the
    run's resolved config and params instead of ``cfg`` (``epiray extend`` records its own).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from epiray.tracking import start_run

    name = Path(spec.out_dir).name
    log.info("%s", spec.summary or f"training {name}")
    config = cfg if config is None else config
    # the config of this run, beside its run directory (one file per run: never another's)
    dump_config(config, Path(cfg.out) / f"{name}.resolved.yaml")
    store = Store.open(spec.store)
    tracked = start_run(
        cfg.tracking,
        model=spec.label,
        chrom=spec.chrom,
        fold=spec.fold.removeprefix("fold"),
        trial=trial,
        params=config,
        parent=parent,
        base_dir=cfg.out,
        resume=True,
        tags={"epiray.store_hash": spec.store_hash, **(tags or {})},
    )
    with tracked:
        spec.mlflow_run_id, spec.tracking_uri = tracked.run_id, tracked.tracking_uri
        tracked.log_config(config)
        if spec.summary:
            tracked.set_tags({"epiray.summary": spec.summary})
        log_store_input(tracked, store)
        use_gpu = _use_gpu(cfg.scaling)
        resources = {"CPU": cfg.scaling.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config={"spec": spec.__dict__},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers,
                use_gpu=use_gpu,
                resources_per_worker=resources,
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage_path(cfg),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=0),
                callbacks=list(callbacks) or None,
                worker_runtime_env=worker_runtime_env(cfg.scaling, use_gpu),
            ),
        )
        result = trainer.fit()
        if result.error:
            raise EpirayError(f"train {name}: training failed: {result.error}")
        ckpt = result.checkpoint.path
        history = pd.DataFrame(json.loads((Path(ckpt) / META).read_text())["history"])
        if spec.extra.get("calibration_only"):
            # the calibration model's weight is in its checkpoint; it imputes nothing
            tracked.set_tags({"epiray.checkpoint": ckpt, "epiray.calibration_only": "true"})
            return RunResult(spec, ckpt, pd.DataFrame(), history, tracked.run_id)
        scores = score_run(store, spec)
        aa = fold_average_activity(store, spec) if cfg.baseline or tracked.enabled else {}
        if cfg.baseline:
            baseline = score_average_activity(store, spec, aa)
            scores = pd.concat([scores, baseline], ignore_index=True)
        tracked.set_tags({"epiray.checkpoint": ckpt})
        if len(scores):
            tracked.log_scores(scores)
            own = scores[scores["model"] == spec.label]
            tracked.log_metrics(
                {
                    f"test/{k}": own[k].mean()
                    for k in ("mse", "pearson")
                    if k in own and own[k].notna().any()
                }
            )
        if tracked.enabled:
            reads = get_model(cfg.model.name).predicts_from_tracks
            shards = load_shards(ckpt, device="cpu", store=store, tracks=reads)
            log_run_plots(tracked, spec, store, scores, shards, aa)
            if cfg.tracking.log_model:
                step = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
                log_trained_model(tracked, shards, cfg.tracking.log_model_max_context_mb, step)
        return RunResult(spec, ckpt, scores, history, tracked.run_id)


def log_store_input(tracked, store: Store) -> None:
    """Record the store as the run's input dataset in MLflow: its folder name, its content
    hash (:attr:`~epiray.store.Store.store_hash`) as digest, its location and a profile
    (experiments in all and per assembly, assemblies with their species, bin size, dtype,
    manifest hash, synteny mappings)."""
    if not tracked.enabled:
        return
    s = store.summary
    exps = s.get("experiments", {})
    per_assembly: dict[str, int] = {}
    for v in exps.values():
        per_assembly[v.get("assembly", "?")] = per_assembly.get(v.get("assembly", "?"), 0) + 1
    profile = {
        "experiments": len(exps),
        "experiments_per_assembly": per_assembly,
        "assemblies": {
            a: {"species": v.get("species"), "chroms": len(v.get("chrom_sizes", {}))}
            for a, v in s.get("assemblies", {}).items()
        },
        "bin_size": s.get("bin_size"),
        "dtype": s.get("dtype"),
        "manifest_hash": s.get("manifest_hash"),
        "synteny": sorted(s.get("synteny", {}) or {}),
    }
    tracked.log_dataset(store.root.name, store.store_hash, store.root, profile)


def log_run_plots(
    tracked,
    spec: RunSpec,
    store: Store,
    scores: pd.DataFrame,
    shards,
    average_activity: dict[str, tuple[np.ndarray, str]],
) -> list[str]:
    """PNG plots of a finished run: per-experiment MSE against average activity, a track view
    of a held-out experiment (signal, average activity, imputation around its strongest bin)
    and the 2-D projection of the learned biosample and assay representations.
    ``average_activity`` is :func:`fold_average_activity` of the run.

    Returns
    -------
    list[str]
        The artifact paths logged.
    """
    from epiray import plots

    logged = []
    if AVERAGE_ACTIVITY in set(scores.get("model", ())) and (scores["model"] == spec.label).any():
        path = "plots/mse_vs_average_activity.png"
        tracked.log_figure(plots.plot_metric_scatter(scores, AVERAGE_ACTIVITY, spec.label), path)
        logged.append(path)
    if spec.evaluate:
        e = sorted(spec.evaluate)[0]
        y = store.read(spec.assembly, spec.chrom, [e])[0].astype(np.float32)
        pred = _read_predictions(spec, e)
        aa = average_activity.get(e)
        w = plots.peak_window(y)
        path = f"plots/tracks_{e}.png"
        fig = plots.plot_tracks(
            y[w],
            {spec.label: pred[w]},
            None if aa is None else aa[0][w],
            chrom=spec.chrom,
            start=w.start,
            title=e,
        )
        tracked.log_figure(fig, path)
        logged.append(path)
    model = shards[0][0] if shards else None
    emb = model.embeddings() if model is not None else None
    if emb is not None:
        vocab = model.vocab
        species = {}
        for key in vocab.experiments.values():
            species.setdefault(key.biosample, key.species)
        path = "plots/factors.png"
        fig = plots.plot_factors(
            emb[0].float().cpu().numpy(),
            list(vocab.biosamples),
            emb[1].float().cpu().numpy(),
            list(vocab.assays),
            biosample_groups=[species.get(i, "?") for i in range(len(vocab.biosamples))],
        )
        tracked.log_figure(fig, path)
        logged.append(path)
    return logged


def log_trained_model(tracked, shards, max_context_mb: float, step: int = 0) -> list[str]:
    """Log a finished run's model to its MLflow run, one logged model per worker shard.

    ``shards`` come from :func:`load_shards`. Avocado's context is its bin range; eDICE's
    holds the observed tracks it imputes from, unless they exceed ``max_context_mb`` (then the
    bin range only, tagged and warned).

    Returns
    -------
    list[str]
        The logged-model ids, in shard order.
    """
    from epiray.tracking import MODEL_NAME, prediction_context

    ids, context_kind = [], "bin_range"
    for rank, (model, data) in enumerate(shards):
        context = prediction_context(data)
        if type(model).predicts_from_tracks:
            mb = (
                sum(
                    t.numel() * t.element_size()
                    for t in (data.values, data.aux_values)
                    if isinstance(t, torch.Tensor)
                )
                / 2**20
            )
            if mb <= max_context_mb:
                context, context_kind = data, "tracks"
            else:
                context_kind = "bin_range"
                log.warning(
                    "train: the logged model of %s (shard %d) leaves out its %.0f MB of "
                    "observed tracks (tracking.log_model_max_context_mb = %.0f); give it a "
                    "context to impute, or raise the limit.",
                    tracked.run_id,
                    rank,
                    mb,
                    max_context_mb,
                )
        name = MODEL_NAME if len(shards) == 1 else f"{MODEL_NAME}-shard{rank}"
        ids.append(tracked.log_model(model, context, name=name, step=step))
    tracked.set_tags({"epiray.model_context": context_kind, "epiray.model_shards": len(shards)})
    return ids


def _read_predictions(spec: RunSpec, experiment: str) -> np.ndarray:
    d = Path(spec.out_dir) / "predictions" / experiment
    parts = sorted(d.glob("*-*.npy"))
    if not parts:
        raise EpirayError(
            f"train {spec.label} {spec.chrom} fold {spec.fold}: no predictions "
            f"for {experiment} in {d}."
        )
    return np.concatenate([np.load(p) for p in parts if not p.name.endswith(".tmp.npy")])


def score_run(store: Store, spec: RunSpec, model_name: str | None = None) -> pd.DataFrame:
    """Per-experiment scores of a finished run's held-out predictions."""
    from epiray.metrics import score_track

    exps = store.experiments().set_index("experiment")
    rows = []
    for e in spec.evaluate:
        y = store.read(spec.assembly, spec.chrom, [e])[0]
        yhat = _read_predictions(spec, e)
        rows.append(_score_row(model_name or spec.label, e, exps, spec, score_track(y, yhat)))
    return pd.DataFrame(rows)


def _score_row(model: str, e: str, exps: pd.DataFrame, spec: RunSpec, s: dict) -> dict:
    r = exps.loc[e]
    return {
        "model": model,
        "experiment": e,
        "biosample": r["biosample"],
        "assay": r["assay"],
        "category": r["category"],
        "species": r["species"],
        "fold": spec.fold,
        "chrom": spec.chrom,
        **{k: float(v) for k, v in s.items()},
    }


def average_activity_tracks(
    store: Store,
    assembly: str,
    chrom: str,
    train: Sequence[str],
    held_out: Sequence[str],
    evaluate: Sequence[str],
) -> dict[str, tuple[np.ndarray, str]]:
    """The average activity baseline (METHODS §4) of every experiment of ``evaluate``.

    The mean of the fold's target-species training experiments of the same assay, streamed
    one track at a time. For an assay with no training experiment (a zero-shot fold) it is, as
    in the cross-species paper's zero-shot comparison, the mean of the *other* held-out
    experiments of that assay — data the models never see, so a strong reference rather than
    a competitor (source ``"held_out"``). An assay with a single experiment has no baseline.

    Returns
    -------
    dict
        ``experiment -> (float32 [n_bins], source)`` with source ``"train"`` or ``"held_out"``.
    """
    exps = store.experiments().set_index("experiment")
    by_assay: dict[str, list[str]] = {}
    for e in train:
        by_assay.setdefault(exps.loc[e, "assay"], []).append(e)
    held: dict[str, list[str]] = {}
    for e in held_out:
        held.setdefault(exps.loc[e, "assay"], []).append(e)

    def mean_of(tracks: list[str]) -> np.ndarray:
        from epiray.calibration import mean_track

        return mean_track(store, assembly, chrom, tracks)

    out, cache = {}, {}
    for e in evaluate:
        a = exps.loc[e, "assay"]
        if a in by_assay:
            if a not in cache:
                cache[a] = mean_of(by_assay[a])
            out[e] = (cache[a], "train")
        else:
            others = [t for t in held.get(a, []) if t != e]
            if others:
                out[e] = (mean_of(others), "held_out")
    return out


def fold_average_activity(store: Store, spec: RunSpec) -> dict[str, tuple[np.ndarray, str]]:
    """:func:`average_activity_tracks` of every scored experiment of the run's fold."""
    return average_activity_tracks(
        store,
        spec.assembly,
        spec.chrom,
        spec.train + spec.validate,
        spec.evaluate + spec.unscored,
        spec.evaluate,
    )


def score_average_activity(
    store: Store, spec: RunSpec, aa: dict[str, tuple[np.ndarray, str]] | None = None
) -> pd.DataFrame:
    """Scores of the fold's average activity baseline; ``aa`` is
    :func:`fold_average_activity` when the caller already has it."""
    from epiray.metrics import score_track

    exps = store.experiments().set_index("experiment")
    if aa is None:
        aa = fold_average_activity(store, spec)
    rows = []
    for e, (track, source) in aa.items():
        y = store.read(spec.assembly, spec.chrom, [e])[0]
        row = _score_row(AVERAGE_ACTIVITY, e, exps, spec, score_track(y, track))
        rows.append({**row, "baseline_source": source})
    return pd.DataFrame(rows)


def train(cfg: TrainConfig, *, parent=None, calibration_only: bool = False) -> list[RunResult]:
    """Run the ``train`` job: every (chromosome, fold) of the config, one after another.

    Re-running the same config resumes unfinished runs from their last checkpoint (Ray
    Train's job-level restoration by run name and storage path) and retrains nothing that
    already finished... only if its checkpoint exists; finished runs are trained again only
    when ``out`` was cleared. Each run's resolved config is ``<out>/<run name>.resolved.yaml``
    (:func:`run_one`).

    ``calibration_only``: a config that calibrates beside validation cells trains only its
    calibration models, whose final checkpoints hold the weights (meta ``calibration``) and
    which impute nothing (scores empty). The calibrated run's final model is the one the same
    config without ``calibrate`` trains, seed for seed, so an existing uncalibrated run plus
    these weights is the calibrated run (``benchmarks/bench_quality.py --final-from``).
    """
    from epiray.runtime import ensure_ray

    _, specs = plan_runs(cfg)
    if calibration_only:
        v = cfg.validation
        if not (v.calibrate and v.scheme == "cells"):
            raise ConfigError(
                f"train: calibration_only needs validation.calibrate beside validation cells "
                f"(got scheme {v.scheme!r}, calibrate {v.calibrate}); only there is the "
                "calibration model separate from the final one."
            )
        for spec in specs:
            if not spec.withheld:
                raise ConfigError(
                    f"train {spec.label} {spec.chrom} {spec.fold}: calibration_only, but no "
                    f"assay keeps {v.min_train} training experiments beside a withheld one, "
                    "so there is no calibration model to train."
                )
            spec.extra["calibration_only"] = True
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    ensure_ray()
    return [run_one(spec, cfg, parent=parent) for spec in specs]


def write_summary(results: Sequence[RunResult], path: Path) -> pd.DataFrame:
    """All runs' scores in one table (Parquet + CSV), returned."""
    scores = (
        pd.concat([r.scores for r in results], ignore_index=True) if results else pd.DataFrame()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path.with_suffix(".csv"), scores.to_csv(index=False))
    return scores


# ------------------------------------------------------------------------- trained models
def final_checkpoint(run_dir: str | Path) -> Path:
    """The final checkpoint directory of a finished run (``epochNNNN_final``).

    Raises
    ------
    EpirayError
        The run directory is missing or its training never finished.
    """
    run_dir = Path(run_dir)
    finals = sorted(run_dir.glob("epoch*_final")) if run_dir.is_dir() else []
    if not finals:
        raise EpirayError(
            f"trained model {run_dir}: no final checkpoint; expected a finished run of "
            "`epiray train` there. Train that chromosome first (or fix the model path)."
        )
    return finals[-1]


def load_shards(
    checkpoint: str | Path,
    device: torch.device | str | None = None,
    store: Store | None = None,
    tracks: bool = True,
) -> list[tuple[Any, Any]]:
    """Every worker shard of a trained model as ``(model, ChromData)``, tiling its chromosome.

    The shards are rebuilt on ``device`` from the store the model was trained on (checked
    against the model's vocabulary), so models that impute from observed tracks (eDICE) have
    them. ``tracks=False`` reads no track: each ChromData carries only its bin range (enough
    for models whose ``predicts_from_tracks`` is False, e.g. Avocado).
    """
    from epiray.models import default_device

    checkpoint = Path(checkpoint)
    meta = json.loads((checkpoint / META).read_text())
    store = store or Store.open(meta["store"])
    vocab = Vocabulary.from_dict(meta["vocab"])
    dev = torch.device(device) if device is not None else default_device()
    dtype = torch.float16 if meta["value_dtype"] == "float16" else torch.float32
    aux = Aux(meta["aux_name"], meta["aux"]) if meta.get("aux_name") and meta.get("aux") else None
    shards = []
    for rank, (lo, hi) in enumerate(meta["shards"]):
        if not tracks:
            data = ChromData(
                chrom=meta["chrom"],
                lo=lo,
                hi=hi,
                n_bins=vocab.n_bins,
                values=torch.zeros(0, hi - lo, device=dev),
                biosample=torch.zeros(0, dtype=torch.long, device=dev),
                assay=torch.zeros(0, dtype=torch.long, device=dev),
            )
            model, _ = load_checkpoint(
                checkpoint / f"rank{rank}.pt", data, store_summary=store.summary
            )
            model.eval()
            shards.append((model, data))
            continue
        data = load_chrom_data(
            store,
            meta["assembly"],
            meta["chrom"],
            lo,
            hi,
            vocab,
            meta["train"],
            aux=aux,
            device=dev,
            value_dtype=dtype,
        )
        model, _ = load_checkpoint(
            checkpoint / f"rank{rank}.pt", data, store_summary=store.summary
        )
        model.eval()
        shards.append((model, data))
    return shards


def load_predictor(model: str | Sequence[str], chrom: str, autocast: str = "off"):
    """The imputation predictor of one chromosome.

    Parameters
    ----------
    model
        Run directory pattern with a ``{chrom}`` placeholder, e.g.
        ``quickstart/runs/avocado_cross_species.{chrom}.fold0`` (``epiray train`` names runs
        ``{model label}.{chrom}.{fold}`` under its ``out``); or a list of them, whose
        predictions are averaged (:class:`~epiray.impute.EnsemblePredictor`).
    chrom
        Chromosome.
    autocast
        The predictions' arithmetic (``ImputeConfig.autocast``; :class:`ModelPredictor`).

    Raises
    ------
    EpirayError
        No finished model for ``chrom``.
    """
    from epiray.impute import EnsemblePredictor, ModelPredictor

    if not isinstance(model, str):
        members = [load_predictor(m, chrom, autocast) for m in model]
        return EnsemblePredictor(members, names=list(model))
    if "{chrom}" not in model:
        raise ConfigError(
            f"impute model {model!r}: expected a run directory pattern with a {{chrom}} "
            "placeholder, e.g. runs/avocado_mouse_only.{chrom}.fold0."
        )
    from epiray.calibration import AverageActivityReader, Calibration

    checkpoint = final_checkpoint(model.format(chrom=chrom))
    meta = json.loads((checkpoint / META).read_text())
    store = Store.open(meta["store"])
    shards = load_shards(checkpoint, store=store)
    cal = Calibration.from_dict(meta.get("calibration"))
    reader = (
        AverageActivityReader(store, meta["assembly"], meta["chrom"], cal.average_activity)
        if cal is not None
        else None
    )
    return ModelPredictor(shards, autocast=autocast, calibration=cal, average_activity=reader)
