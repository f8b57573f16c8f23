"""Ray Tune sweeps over folds × chromosomes × model variants × hyperparameters.

A sweep is one Ray Tune experiment. Its *cells* are every combination of the config's
``variants`` and ``grid`` axes, expanded further to one (chromosome, fold) each — exactly the
runs :func:`epiray.train.plan_runs` lists for that combination. Every cell is run
``num_samples`` times, each time with fresh values drawn from ``search``. A trial is one
(cell, sample): a Tune *function trainable* (:func:`_trainable`) that builds the trial's
:class:`~epiray.train.TrainConfig` and calls :func:`epiray.train.run_one`, which runs the Ray
Train ``TorchTrainer`` and scores the held-out experiments.

Ray 2.60 runs Train V2: a ``TorchTrainer`` is not a Tune trainable itself. The trainable is the
Train *driver*; its workers are separate actors in a placement group of their own. So

* per-epoch metrics reach Tune through :class:`ray.tune.integration.ray_train.TuneReportCallback`
  (a Train ``RunConfig`` callback), which is what the ASHA scheduler reads (``val_mse``, time
  attribute ``epoch``);
* the trainable requests no CPU (only ``trainable_memory_mb`` of Ray's ``memory`` resource:
  Tune refuses an all-zero request), and the number of trials running at once is limited to
  what the cluster can hold of their Train workers: ``workers × cpus_per_worker`` CPUs (and
  ``workers`` GPUs) per trial against ``ray.cluster_resources()`` (or ``max_concurrent_trials``
  on an autoscaling cluster).

Records:

* Tune's experiment (``<storage>/<name>``, ``storage`` = ``EPIRAY_STORAGE_PATH`` or ``out``),
  with ``epiray_sweep.json`` (the cells and the MLflow parent run id). Running the same config
  again restores it (``Tuner.restore``): finished trials keep their results, unfinished ones
  start again and their Train runs resume from their last checkpoint.
* MLflow: a parent run ``sweep.<name>`` and one child per trial, named
  ``<label>.<chrom>.fold<k>.<trial id>`` (the run :func:`~epiray.train.run_one` records:
  params, per-epoch metrics, scores). Trials the scheduler stopped early end ``KILLED``
  (tagged ``epiray.stopped_early``), never ``RUNNING``. The parent holds the trial table, the
  best configuration per (scheme, fold, chromosome, model), the held-out scores of the selected
  trials and, per fold scheme, the comparison table (:func:`epiray.evaluate.comparison_table`)
  as artifacts (``tables/``) and metrics (``<scheme>/<model>/<metric>_<column>``), and each
  selected model's held-out mean per fold (``heldout_<metric>/<model>/<fold>``, charted by
  the MLflow UI; :func:`log_heldout_per_fold`).

Model selection uses validation only: per (model, chromosome, scheme, fold) the finished trial
with the best ``best_<metric>`` is kept, and only its held-out scores enter the comparison. The
average activity baseline, which every trial of a fold computes identically, enters once.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from epiray.config import Section, load_config, load_yaml, parse_config
from epiray.errors import ConfigError, EpirayError, collect
from epiray.evaluate import AVERAGE_ACTIVITY, comparison_table, format_table
from epiray.train import TrainConfig, plan_runs

log = logging.getLogger(__name__)

#: File in the Tune experiment directory recording the cells and the MLflow parent run.
STATE_FILE = "epiray_sweep.json"
#: Keys every cell pins (one chromosome and one fold per trial).
_PINNED = ("chroms", "folds.fold")
_STATE_FORMAT = "epiray.sweep/1"
#: Train config keys a ``search`` may not draw (they belong in ``grid``).
_STRUCTURAL = ("store", "out", "assembly", "chroms", "synteny", "aux_species", "variant_name")


# ------------------------------------------------------------------------------------ config
class SearchDomain(Section):
    """One hyperparameter's search distribution (exactly one field set).

    Attributes
    ----------
    uniform, loguniform
        ``[low, high]`` (floats; loguniform needs ``low > 0``).
    choice
        Values drawn with equal probability.
    randint
        ``[low, high)`` integers.
    """

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    choice: list[Any] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> SearchDomain:
        set_ = [k for k in ("uniform", "loguniform", "choice", "randint") if getattr(self, k)]
        if len(set_) != 1:
            raise ValueError(
                f"expected exactly one of uniform, loguniform, choice, randint, got {set_}"
            )
        lo_hi = self.uniform or self.loguniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"expected low < high, got {list(lo_hi)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    def to_tune(self):
        """The Ray Tune domain (``tune.uniform``, ``tune.loguniform``, ...)."""
        from ray import tune

        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.randint is not None:
            return tune.randint(*self.randint)
        return tune.choice(list(self.choice))

    def example(self) -> Any:
        """A value of the domain (its lower end or first choice), to validate configs with."""
        if self.choice is not None:
            return self.choice[0]
        lo_hi = self.uniform or self.loguniform or self.randint
        return lo_hi[0]

    def upper(self) -> float:
        """The largest value the domain can give."""
        if self.choice is not None:
            nums = [v for v in self.choice if isinstance(v, (int, float))]
            return max(nums) if nums else math.nan
        if self.randint is not None:
            return self.randint[1] - 1
        return (self.uniform or self.loguniform)[1]


class SchedulerSection(Section):
    """``scheduler``: early stopping of unpromising trials.

    Attributes
    ----------
    kind
        ``asha`` (asynchronous successive halving on ``metric``/``mode``) or ``fifo`` (every
        trial runs to the end).
    grace_period
        Epochs every trial runs before ASHA may stop it.
    reduction_factor
        ASHA keeps the best ``1 / reduction_factor`` of trials at each rung.
    max_t
        ASHA's time horizon in epochs; default: the largest ``train.epochs`` of any trial + 1
        (so that reaching the last epoch never counts as a stop and every surviving trial
        predicts and scores its held-out experiments).
    brackets
        ASHA brackets.
    """

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, ge=1)
    brackets: int = Field(1, ge=1)


class SweepConfig(Section):
    """The ``sweep`` job: a Ray Tune experiment over training runs.

    Attributes
    ----------
    name
        Tune experiment name (its directory under the storage path) and MLflow parent run name
        ``sweep.<name>``.
    out
        Output folder: Tune experiment (unless ``EPIRAY_STORAGE_PATH`` is set), the trials' Train
        runs, the MLflow database of a relative SQLite tracking URI, the summary tables.
    train
        The base :class:`~epiray.train.TrainConfig`, inline or the path of a train YAML.
    variants
        Named model variants: ``{name: {dotted.key: value}}``; one grid axis. The name becomes
        the trial's model label (``variant_name``) unless the overrides set it.
    grid
        ``{dotted.key: [values]}``: every combination is swept (``model.params.variant``,
        ``folds.fold``, ``folds.scheme``, ``chroms`` as ``[[chr1], [chr2]]``, ...). Chromosomes
        and folds left at ``all`` are expanded, one trial per (chromosome, fold).
    search
        ``{dotted.key: {uniform|loguniform|choice|randint: ...}}``, drawn per trial.
    num_samples
        Trials per cell (each draws fresh ``search`` values).
    metric, mode
        What ASHA and model selection optimise (reported every epoch by the Train run).
    scheduler
        ASHA settings.
    max_concurrent_trials
        Upper limit of trials running at once; None: as many as the cluster's resources hold
        now (set it on an autoscaling cluster, whose resources grow with the work).
    trainable_memory_mb
        Ray ``memory`` the trial driver (the trainable) reserves; it takes no CPU.
    seed
        Seed of the ``search`` sampler (None: random).
    resume
        Restore an interrupted sweep of the same name (``Tuner.restore``); false refuses to
        reuse an existing experiment directory.
    comparison_metrics
        Metrics of the comparison tables.
    verbose
        Tune's console verbosity (0 silent, 1 status, 2 every result).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100)
    out: str
    train: TrainConfig
    variants: dict[str, dict[str, Any]] = {}
    grid: dict[str, list[Any]] = {}
    search: dict[str, SearchDomain] = {}
    num_samples: int = Field(1, ge=1)
    metric: str = "val_mse"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSection = SchedulerSection()
    max_concurrent_trials: int | None = Field(None, ge=1)
    trainable_memory_mb: int = Field(256, ge=1)
    seed: int | None = None
    resume: bool = True
    comparison_metrics: list[str] = ["mse", "pearson"]
    verbose: int = Field(1, ge=0, le=3)

    @field_validator("train", mode="before")
    @classmethod
    def _train_file(cls, v: Any) -> Any:
        if isinstance(v, (str, os.PathLike)):
            return load_config(TrainConfig, v)
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, g: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, values in g.items():
            if not values:
                raise ValueError(f"grid.{k}: empty list; expected at least one value")
        return g

    @model_validator(mode="after")
    def _axes(self) -> SweepConfig:
        both = sorted(set(self.grid) & set(self.search))
        if both:
            raise ValueError(f"keys {both} are in both grid and search; expected one of them")
        structural = sorted(
            k for k in self.search if k in _STRUCTURAL or k.startswith(("folds.", "scaling."))
        )
        if structural:
            raise ValueError(
                f"search keys {structural} choose the data, fold or resources of a trial; "
                "expected them in grid (drawn values cannot be validated or scheduled up front)"
            )
        return self


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Load a sweep YAML; relative paths (also ``train: FILE``) resolve against its folder.

    Raises
    ------
    ConfigError
        Unknown keys, bad values, or an invalid train config (naming the file).
    """
    path = Path(path).resolve()
    data = load_yaml(path)
    train = data.get("train")
    if isinstance(train, str):
        p = Path(train).expanduser()
        data["train"] = str(p if p.is_absolute() else (path.parent / p).resolve())
    return parse_config(SweepConfig, data, path, base=path.parent)


# ------------------------------------------------------------------------------------ cells
def apply_overrides(
    base: TrainConfig, overrides: Mapping[str, Any], where: str = "sweep"
) -> TrainConfig:
    """A copy of ``base`` with dotted keys set (``model.params.n_nodes: 128``).

    Raises
    ------
    ConfigError
        For a key that does not lead into a mapping, or a config that no longer validates
        (unknown keys, bad values), naming ``where``.
    """
    data = base.model_dump(mode="json")
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"{where}: key {key!r} goes through {'.'.join(parts[: i + 1])!r}, which is "
                    f"a {type(nxt).__name__}; expected a section. Check the dotted key."
                )
            node = nxt
        node[parts[-1]] = value
    return parse_config(TrainConfig, data, where)


@dataclass(frozen=True)
class Cell:
    """One (variant, grid point, chromosome, fold): what a trial trains, before ``search``.

    Attributes
    ----------
    id
        ``<label>.<chrom>.<scheme>.<fold>`` (+ the other grid values): Tune's grid value.
    overrides
        Dotted keys set on the base config (``chroms`` and ``folds.fold`` pinned).
    label, chrom, scheme, fold
        The model label, chromosome, fold scheme and fold name of the run.
    variant
        The variant name, or None.
    grid
        The values of the grid keys that vary (hyperparameters), ``{dotted.key: value}``.
    epochs
        ``train.epochs`` of the cell.
    workers, cpus_per_worker, use_gpu
        Ray Train scaling of the trial.
    """

    id: str
    overrides: dict[str, Any]
    label: str
    chrom: str
    scheme: str
    fold: str
    variant: str | None
    grid: dict[str, Any]
    epochs: int
    workers: int
    cpus_per_worker: float
    use_gpu: bool | str

    @property
    def unit(self) -> str:
        """``<label>.<chrom>.<scheme>.<fold>``: trials of one unit are ranked against each other
        (ASHA, best configuration); cells of a unit differ only in hyperparameters."""
        return ".".join([self.label, self.chrom, self.scheme, self.fold])


def _varying(cfg: SweepConfig) -> list[str]:
    """Grid keys with several values besides chromosome, fold and fold scheme: the
    hyperparameters of the grid."""
    skip = (*_PINNED, "folds.scheme", "variant_name")
    return [k for k, v in cfg.grid.items() if len(v) > 1 and k not in skip]


def _fmt(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if not isinstance(v, str) else v


def plan_cells(cfg: SweepConfig) -> list[Cell]:
    """Expand variants × grid × (chromosome, fold) and validate every trial config.

    Each combination is checked the way ``epiray train`` checks a config (against the store:
    assembly, chromosomes, synteny, folds, training data), with the first value of every
    ``search`` domain; problems of all combinations are raised at once.

    Returns
    -------
    list of Cell
        In axis order (variants first, then the grid keys in config order).

    Raises
    ------
    ConfigError
        Listing every combination that does not validate, a combination without validation
        experiments when the metric is a validation metric, duplicate labels.
    """
    axes: list[tuple[str, list[Any]]] = []
    if cfg.variants:
        axes.append(("@variant", list(cfg.variants)))
    axes += [(k, list(v)) for k, v in cfg.grid.items()]
    example = {k: d.example() for k, d in cfg.search.items()}
    varying = _varying(cfg)
    problems: list[str] = []
    cells: list[Cell] = []
    for combo in itertools.product(*[values for _, values in axes]) if axes else [()]:
        point = dict(zip([k for k, _ in axes], combo, strict=True))
        variant = point.pop("@variant", None)
        overrides: dict[str, Any] = {}
        if variant is not None:
            overrides["variant_name"] = variant
            overrides.update(cfg.variants[variant])
        overrides.update(point)
        where = f"sweep {cfg.name}: " + (
            ", ".join(f"{k}={_fmt(v)}" for k, v in overrides.items()) or "the base config"
        )
        try:
            tcfg = apply_overrides(cfg.train, {**overrides, **example}, where)
        except ConfigError as e:  # names `where` already
            problems.append(str(e).replace("\n", "\n    "))
            continue
        try:
            _, specs = plan_runs(tcfg)
        except EpirayError as e:
            problems.append(f"{where}: " + str(e).replace("\n", "\n    "))
            continue
        other = {k: v for k, v in point.items() if k in varying}
        per_chrom: dict[str, int] = {}
        for spec in specs:
            i = per_chrom.get(spec.chrom, 0)
            per_chrom[spec.chrom] = i + 1
            fold_index = tcfg.folds.fold if tcfg.folds.fold != "all" else i
            if cfg.metric.startswith("val") and not spec.validate and not spec.holdout:
                problems.append(
                    f"{where}: chrom {spec.chrom} {spec.fold} has no validation experiments "
                    f"or cells (validation.scheme: {tcfg.validation.scheme}); expected some, as "
                    f"trials are ranked by {cfg.metric}. Set validation.scheme: cells (the "
                    "default) or experiments in the train config."
                )
                continue
            cid = ".".join(
                [tcfg.label, spec.chrom, tcfg.folds.scheme, spec.fold]
                + [f"{k}={_fmt(v)}" for k, v in other.items()]
            )
            cells.append(
                Cell(
                    id=cid,
                    overrides={**overrides, "chroms": [spec.chrom], "folds.fold": fold_index},
                    label=tcfg.label,
                    chrom=spec.chrom,
                    scheme=tcfg.folds.scheme,
                    fold=spec.fold,
                    variant=variant,
                    grid=other,
                    epochs=tcfg.train.epochs,
                    workers=tcfg.scaling.num_workers,
                    cpus_per_worker=tcfg.scaling.cpus_per_worker,
                    use_gpu=tcfg.scaling.use_gpu,
                )
            )
    ids = [c.id for c in cells]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(
            f"sweep {cfg.name}: cells {dup[:3]} appear more than once; expected distinct model "
            "labels per variant. Give each variant its own variant_name."
        )
    collect(problems, f"sweep {cfg.name}", ConfigError)
    if not cells:
        raise ConfigError(f"sweep {cfg.name}: no trials; expected at least one. Check the grid.")
    return cells


def trial_resources(cells: Sequence[Cell], cluster: Mapping[str, float]) -> dict[str, float]:
    """CPUs and GPUs the Train workers of the largest trial take.

    ``use_gpu: auto`` counts as GPU when ``cluster`` has GPUs (as :mod:`epiray.train` decides).
    """
    has_gpu = bool(cluster.get("GPU", 0))
    cpu = max(c.workers * c.cpus_per_worker for c in cells)
    gpu = max(
        (c.workers if (c.use_gpu is True or (c.use_gpu == "auto" and has_gpu)) else 0)
        for c in cells
    )
    return {"CPU": float(cpu), "GPU": float(gpu)}


def concurrency_limit(
    cells: Sequence[Cell], cluster: Mapping[str, float], cap: int | None = None
) -> int:
    """How many trials fit on ``cluster`` at once (at least 1).

    Parameters
    ----------
    cells
        The sweep's cells.
    cluster
        ``ray.cluster_resources()``: ``{"CPU": n, "GPU": m, ...}``.
    cap
        ``max_concurrent_trials``: used instead when given.
    """
    if cap is not None:
        return cap
    need = trial_resources(cells, cluster)
    fits = [math.floor(cluster.get("CPU", 0) / need["CPU"] + 1e-9)]
    if need["GPU"]:
        fits.append(math.floor(cluster.get("GPU", 0) / need["GPU"] + 1e-9))
    n = min(fits)
    if n < 1:
        log.warning(
            "one trial needs %s but the cluster offers %s now; running one trial at a time "
            "(the autoscaler must add nodes). Set max_concurrent_trials on autoscaling clusters.",
            need,
            {k: cluster.get(k, 0) for k in need},
        )
        n = 1
    return n


# ------------------------------------------------------------------------------------ scheduler
def cell_asha(
    groups: Mapping[str, str],
    *,
    metric: str,
    mode: str,
    max_t: int,
    grace_period: int,
    reduction_factor: float,
    brackets: int = 1,
    group_key: str = "cell",
):
    """ASHA that compares each trial only with trials of the same model, chromosome and fold.

    One ``AsyncHyperBandScheduler`` per group, ``groups[trial.config[group_key]]`` (the cell's
    :attr:`Cell.unit`): trials of another fold, chromosome or model variant are validated on
    other data, so their ``val_mse`` is not comparable (a single ASHA would stop every trial of
    a fold whose validation set is harder). Trials that differ only in hyperparameters (grid or
    search) compete. A group of one trial is never stopped early.

    Parameters
    ----------
    groups
        Cell id -> group name.
    metric, mode, max_t, grace_period, reduction_factor, brackets
        ASHA's (time attribute: ``epoch``).
    group_key
        The config key holding the cell id.

    Returns
    -------
    ray.tune.schedulers.FIFOScheduler
        The scheduler (a ``FIFOScheduler`` subclass: trials start in submission order).
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    class CellASHAScheduler(FIFOScheduler):
        def __init__(self) -> None:
            super().__init__()
            self._metric, self._mode = metric, mode
            self._groups: dict[str, Any] = {}
            self._of: dict[str, str] = {}

        def _asha(self, trial) -> Any:
            cell = str(trial.config.get(group_key))
            g = groups.get(cell, cell)
            self._of[trial.trial_id] = g
            if g not in self._groups:
                self._groups[g] = ASHAScheduler(
                    time_attr="epoch",
                    metric=metric,
                    mode=mode,
                    max_t=max_t,
                    grace_period=grace_period,
                    reduction_factor=reduction_factor,
                    brackets=brackets,
                )
            return self._groups[g]

        def set_search_properties(self, metric_, mode_, **spec) -> bool:
            return metric_ in (None, metric) and mode_ in (None, mode)

        def on_trial_add(self, tune_controller, trial) -> None:
            self._asha(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result) -> str:
            return self._asha(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result) -> None:
            asha = self._asha(trial)
            if trial.trial_id in asha._trial_info:
                asha.on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial) -> None:
            asha = self._asha(trial)
            if trial.trial_id in asha._trial_info:
                asha.on_trial_remove(tune_controller, trial)

        def on_trial_error(self, tune_controller, trial) -> None:
            self.on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            stopped = sum(a._num_stopped for a in self._groups.values())
            return f"Using ASHA per group ({len(self._groups)}): num_stopped={stopped}"

    return CellASHAScheduler()


# ------------------------------------------------------------------------------------ trial
def _trainable(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: one (cell, sample) — build the config, run and score it.

    Per-epoch metrics reach Tune from the Train run (``TuneReportCallback``); after scoring, a
    last report adds the held-out results (``test_<metric>``, the score table as JSON).
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from epiray.train import run_one

    cell = ctx["cells"][config["cell"]]
    search = dict(config.get("search") or {})
    trial_id = tune.get_context().get_trial_id()
    where = f"sweep {ctx['name']} trial {trial_id} ({config['cell']})"
    cfg = apply_overrides(TrainConfig.model_validate(ctx["train"]), cell["overrides"], where)
    # ASHA decides at rungs counted in epochs: every epoch's result must reach Tune
    cfg = apply_overrides(
        cfg, {**search, "out": ctx["runs_dir"], "train.report_seconds": 0.0}, where
    )
    _, specs = plan_runs(cfg)
    if len(specs) != 1:  # plan_cells pinned one chromosome and one fold
        raise EpirayError(f"{where}: {len(specs)} runs planned; expected 1.")
    spec = specs[0]
    out = Path(spec.out_dir)
    spec.out_dir = str(out.with_name(f"{out.name}.{trial_id}"))  # Train run name per trial
    result = run_one(
        spec, cfg, parent=ctx["parent_run_id"], trial=trial_id, callbacks=[TuneReportCallback()]
    )
    hist = result.history
    last: dict[str, Any] = {}
    if len(hist):
        row = hist.iloc[-1]
        last = {k: float(v) for k, v in row.items() if _is_number(v)}
    metric = ctx["metric"]
    best_key = f"best_{metric}"
    if best_key not in last and metric in hist:
        vals = hist[metric].dropna()
        if len(vals):
            best = vals.min() if ctx["mode"] == "min" else vals.max()
            last[best_key] = float(best)
    scores = result.scores
    own = scores[scores["model"] == spec.label] if len(scores) else scores
    base = scores[scores["model"] == AVERAGE_ACTIVITY] if len(scores) else scores
    final = {
        **last,
        "scored": 1.0,
        "n_scored": float(len(own)),
        "scores_json": scores.to_json(orient="records"),
        "mlflow_run_id": result.mlflow_run_id or "",
        "checkpoint": result.checkpoint,
    }
    for m in ctx["comparison_metrics"]:
        if m in own and own[m].notna().any():
            final[f"test_{m}"] = float(own[m].mean())
        if m in base and base[m].notna().any():
            final[f"baseline_{m}"] = float(base[m].mean())
    tune.report(final)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v)


def _trial_dirname(trial) -> str:
    return trial.trial_id


# ------------------------------------------------------------------------------------ driver
@dataclass
class SweepResult:
    """What a sweep produced.

    Attributes
    ----------
    name
        The sweep name.
    path
        Tune's experiment directory.
    mlflow_run_id
        The parent MLflow run (None when tracking is off).
    restored
        Whether an interrupted sweep was restored.
    trials
        One row per trial: ``trial_id, cell, model, chrom, scheme, fold, variant, status``
        (``finished``, ``stopped`` by the scheduler, ``error``), ``epochs``, the metric, its
        best value, ``test_*``/``baseline_*``, ``mlflow_run_id`` and one column per grid and
        search key.
    best
        The best finished trial per (scheme, fold, chrom, model), ranked by
        ``best_<metric>``; ``best_in_fold`` marks the best model of each (scheme, fold, chrom).
    scores
        Held-out scores of the selected trials (``scheme`` column added), average activity
        deduplicated.
    comparison
        ``{scheme: {metric: comparison table}}`` (:func:`epiray.evaluate.comparison_table`).
    """

    name: str
    path: str
    mlflow_run_id: str | None
    restored: bool
    trials: pd.DataFrame
    best: pd.DataFrame
    scores: pd.DataFrame
    comparison: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)

    def format(self, fmt: Literal["text", "markdown"] = "text") -> str:
        """The trial counts, the best configurations and the comparison tables, rendered."""
        counts = self.trials["status"].value_counts().to_dict() if len(self.trials) else {}
        lines = [
            f"sweep {self.name}: {len(self.trials)} trials "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
            f"Tune experiment: {self.path}",
        ]
        if self.mlflow_run_id:
            lines.append(f"MLflow parent run: {self.mlflow_run_id}")
        if len(self.best):
            lines += ["", "best configuration per fold and model (by validation):"]
            lines.append(format_table(self.best, fmt, index=False).rstrip("\n"))
        for scheme, tables in self.comparison.items():
            for metric, table in tables.items():
                lines += ["", f"held-out {metric}, {scheme} folds:"]
                lines.append(format_table(table, fmt).rstrip("\n"))
        return "\n".join(lines) + "\n"


def sweep_storage(cfg: SweepConfig) -> Path:
    """Tune's storage path: ``EPIRAY_STORAGE_PATH`` (shared storage on a cluster) or ``out``."""
    return Path(os.environ.get("EPIRAY_STORAGE_PATH") or Path(cfg.out).resolve())


def _state_params(cfg: SweepConfig) -> dict[str, Any]:
    # what identifies the sweep (params of the parent run); operational switches left out
    return cfg.model_dump(
        mode="json", exclude={"resume", "max_concurrent_trials", "verbose", "comparison_metrics"}
    )


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume) a sweep and summarise it.

    Validates every trial config against the store first, connects to Ray
    (:func:`epiray.runtime.ensure_ray`), opens the MLflow parent run, runs the Tune experiment
    and, when it ends, closes the runs of trials stopped early, selects the best trial per
    (model, chromosome, scheme, fold) by validation, builds the comparison tables of their
    held-out scores and logs everything on the parent run.

    Raises
    ------
    ConfigError
        Invalid trial configs; an existing experiment with ``resume: false``; a resumed sweep
        whose cells changed.
    EpirayError
        When every trial failed.
    """
    import ray
    from mlflow.exceptions import MlflowException
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from epiray.runtime import ensure_ray
    from epiray.store import atomic_write_text
    from epiray.tracking import TrackedRun, _register_open, client, start_run

    cells = plan_cells(cfg)
    by_id = {c.id: c for c in cells}
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    exp_dir = sweep_storage(cfg) / cfg.name
    state_path = exp_dir / STATE_FILE
    restored = exp_dir.exists() and tune.Tuner.can_restore(str(exp_dir))
    state: dict[str, Any] = {}
    if exp_dir.exists() and any(exp_dir.iterdir()):
        if not cfg.resume:
            raise ConfigError(
                f"sweep {cfg.name}: experiment directory {exp_dir} exists; expected a new sweep "
                "with resume: false. Set resume: true to continue it, or pick another name."
            )
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("cells") != [c.id for c in cells]:
                raise ConfigError(
                    f"sweep {cfg.name}: the cells of {exp_dir} differ from this config's; "
                    f"expected the same variants, grid, chromosomes and folds, got "
                    f"{len(cells)} cells against {len(state.get('cells', []))}. Use another "
                    "name for a changed sweep."
                )
            old = state.get("config") or {}
            new = json.loads(json.dumps(_state_params(cfg)))
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                raise ConfigError(
                    f"sweep {cfg.name}: {changed} changed since the sweep in {exp_dir} started; "
                    "expected the same config to resume it (Tune keeps the original search "
                    "space and scheduler). Use another name for a changed sweep."
                )

    tracking = cfg.train.tracking
    if tracking.enabled:
        tracking = tracking.model_copy(update={"tracking_uri": tracking.resolved_uri(out)})
    train_base = cfg.train.model_copy(update={"tracking": tracking})

    ensure_ray()
    cluster = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if tracking.enabled and len(alive) > 1 and tracking.tracking_uri.startswith("sqlite:"):
        log.warning(
            "sweep %s: %d Ray nodes log to the SQLite database %s; trials on other nodes can "
            "only reach it on shared storage (and SQLite locks poorly there). Use an MLflow "
            "server (tracking.tracking_uri: http://HOST:PORT) on a cluster.",
            cfg.name,
            len(alive),
            tracking.tracking_uri,
        )
    limit = concurrency_limit(cells, cluster, cfg.max_concurrent_trials)
    limit = min(limit, len(cells) * cfg.num_samples)
    log.info(
        "sweep %s: %d cells x %d samples, up to %d trials at once (%s per trial, cluster %s)",
        cfg.name,
        len(cells),
        cfg.num_samples,
        limit,
        trial_resources(cells, cluster),
        {k: cluster.get(k, 0) for k in ("CPU", "GPU")},
    )

    parent = None
    parent_id = state.get("mlflow_run_id")
    if tracking.enabled and parent_id:
        mlc = client(tracking.resolved_uri(out))
        try:
            run = mlc.get_run(parent_id)
        except MlflowException:
            log.warning(
                "sweep %s: MLflow run %s of the interrupted sweep is not in %s; starting a new "
                "parent run",
                cfg.name,
                parent_id,
                tracking.tracking_uri,
            )
        else:
            mlc.update_run(parent_id, status="RUNNING")
            parent = TrackedRun(tracking, mlc, parent_id, run.info.experiment_id, out)
            _register_open(parent)  # ended KILLED at exit if the sweep is interrupted
    if parent is None:
        parent = start_run(
            tracking,
            name=f"sweep.{cfg.name}",
            params=_state_params(cfg),
            tags={"epiray.sweep": cfg.name, "epiray.tune_path": str(exp_dir)},
            base_dir=out,
        )
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        state_path,
        json.dumps(
            {
                "format": _STATE_FORMAT,
                "cells": [c.id for c in cells],
                "mlflow_run_id": parent.run_id,
                "config": _state_params(cfg),
            },
            indent=1,
        ),
    )
    atomic_write_text(out / f"{cfg.name}.sweep.resolved.yaml", _dump(cfg))

    with parent:
        ctx = {
            "name": cfg.name,
            "cells": {c.id: {"overrides": c.overrides} for c in cells},
            "train": train_base.model_dump(mode="json"),
            "runs_dir": str(out / cfg.name / "runs"),
            "parent_run_id": parent.run_id,
            "metric": cfg.metric,
            "mode": cfg.mode,
            "comparison_metrics": list(cfg.comparison_metrics),
        }
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, ctx=ctx),
            tune.PlacementGroupFactory([{"CPU": 0, "memory": cfg.trainable_memory_mb * 2**20}]),
        )
        if restored:
            log.info("sweep %s: restoring the Tune experiment in %s", cfg.name, exp_dir)
            tuner = tune.Tuner.restore(
                str(exp_dir), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            sched = FIFOScheduler()
            if cfg.scheduler.kind == "asha":
                max_epochs = max(c.epochs for c in cells)
                if "train.epochs" in cfg.search:
                    max_epochs = max(max_epochs, int(cfg.search["train.epochs"].upper()))
                sched = cell_asha(
                    {c.id: c.unit for c in cells},
                    metric=cfg.metric,
                    mode=cfg.mode,
                    max_t=cfg.scheduler.max_t or max_epochs + 1,
                    grace_period=cfg.scheduler.grace_period,
                    reduction_factor=cfg.scheduler.reduction_factor,
                    brackets=cfg.scheduler.brackets,
                )
            param_space: dict[str, Any] = {"cell": tune.grid_search([c.id for c in cells])}
            if cfg.search:
                param_space["search"] = {k: d.to_tune() for k, d in cfg.search.items()}
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    num_samples=cfg.num_samples,
                    scheduler=sched,
                    # the generator enforces the limit (Tune ignores max_concurrent_trials
                    # when a BasicVariantGenerator is given)
                    search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=limit),
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=cfg.name,
                    storage_path=str(sweep_storage(cfg)),
                    verbose=cfg.verbose,
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        before = _live_placement_groups()
        grid = tuner.fit()
        release_placement_groups(before)
        trials = trials_table(grid, by_id, cfg)
        _close_trial_runs(parent, trials)
        best = best_table(trials, cfg)
        scores, comparison = compare(trials, best, cfg)
        result = SweepResult(
            name=cfg.name,
            path=str(exp_dir),
            mlflow_run_id=parent.run_id,
            restored=restored,
            trials=trials,
            best=best,
            scores=scores,
            comparison=comparison,
        )
        _log_summary(parent, result, out, cfg.train.store)
        n_err = int((trials["status"] == "error").sum())
        if n_err:
            log.warning("sweep %s: %d of %d trials failed", cfg.name, n_err, len(trials))
        if n_err == len(trials):
            first = next((e for e in trials["error"] if e), "")
            raise EpirayError(
                f"sweep {cfg.name}: all {len(trials)} trials failed; expected at least one to "
                f"finish. First error: {first}"
            )
    return result


def _live_placement_groups() -> set[str]:
    """Ids of the cluster's placement groups that are not removed (from the GCS)."""
    import ray

    return {
        pg_id
        for pg_id, info in ray.util.placement_group_table().items()
        if info.get("state") != "REMOVED"
    }


def release_placement_groups(before: set[str], timeout_s: float = 60.0) -> list[str]:
    """Make sure the trials' placement groups are gone when the sweep returns.

    A trial that ASHA stops is killed with the Ray Train controller it started; Train's
    cleaner actor removes the controller's placement group only when it next polls, so for a
    while the CPUs/GPUs of a stopped trial stay reserved and the next Ray Train run of the same
    driver can wait on them. Every placement group created during the sweep (not in
    ``before``) and still alive is waited for up to ``timeout_s``, then removed: the tuner has
    returned, so no trial is running. (Ray Train runs started by *other* drivers while the
    sweep ran would be waited on too; run sweeps as their own job, as ``jobs/sweep.py`` does.)

    Returns
    -------
    list[str]
        Ids removed here (the cleaner had not got to them).
    """
    import time

    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    deadline = time.monotonic() + timeout_s
    while True:
        left = sorted(_live_placement_groups() - before)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for pg_id in left:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
    if left:
        log.warning(
            "sweep: removed %d placement group(s) of finished trials still held after %.0f s",
            len(left),
            timeout_s,
        )
    return left


def _dump(cfg: SweepConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------ summary
def trials_table(grid, cells: Mapping[str, Cell], cfg: SweepConfig) -> pd.DataFrame:
    """One row per trial of a Tune ``ResultGrid`` (see :class:`SweepResult`)."""
    rows = []
    best_key = f"best_{cfg.metric}"
    for i in range(len(grid)):
        r = grid[i]
        m = dict(r.metrics or {})
        conf = r.config or {}
        cell = cells.get(conf.get("cell"))
        if cell is None:
            continue
        status = "error" if r.error else ("finished" if m.get("scored") else "stopped")
        row: dict[str, Any] = {
            "trial_id": m.get("trial_id") or Path(str(r.path)).name,
            "cell": cell.id,
            "model": cell.label,
            "chrom": cell.chrom,
            "scheme": cell.scheme,
            "fold": cell.fold,
            "variant": cell.variant,
            "status": status,
            "epochs": int(m["epoch"]) if _is_number(m.get("epoch")) else 0,
            cfg.metric: m.get(cfg.metric, math.nan),
            best_key: m.get(best_key, m.get(cfg.metric, math.nan)),
        }
        for k in cfg.comparison_metrics:
            row[f"test_{k}"] = m.get(f"test_{k}", math.nan)
            row[f"baseline_{k}"] = m.get(f"baseline_{k}", math.nan)
        row["mlflow_run_id"] = m.get("mlflow_run_id") or None
        row["error"] = str(r.error).splitlines()[0][:500] if r.error else ""
        for k, v in cell.grid.items():
            row[k] = v if v is None or isinstance(v, (bool, int, float, str)) else _fmt(v)
        for k, v in (conf.get("search") or {}).items():
            row[k] = v
        row["scores_json"] = m.get("scores_json")
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["scheme", "fold", "chrom", "model", "trial_id"], kind="stable")
    return df.reset_index(drop=True)


def best_table(trials: pd.DataFrame, cfg: SweepConfig) -> pd.DataFrame:
    """Best finished trial per (scheme, fold, chrom, model) by ``best_<metric>``."""
    best_key = f"best_{cfg.metric}"
    done = trials[trials["status"] == "finished"] if len(trials) else trials
    if not len(done):
        return pd.DataFrame()
    keys = ["scheme", "fold", "chrom", "model"]
    asc = cfg.mode == "min"
    ranked = done.sort_values([*keys, best_key], ascending=[True] * 4 + [asc], kind="stable")
    counts = done.groupby(keys).size().rename("n_trials")
    best = ranked.groupby(keys, sort=False).head(1).merge(counts, on=keys)
    pick = best.groupby(["scheme", "fold", "chrom"])[best_key]
    top = pick.transform("min" if asc else "max")
    best["best_in_fold"] = best[best_key] == top
    hp = _varying(cfg) + list(cfg.search)
    cols = [
        *keys,
        "trial_id",
        "n_trials",
        "epochs",
        best_key,
        *[f"test_{m}" for m in cfg.comparison_metrics],
        "best_in_fold",
        *[c for c in hp if c in best],
    ]
    return best[cols].reset_index(drop=True)


def compare(
    trials: pd.DataFrame, best: pd.DataFrame, cfg: SweepConfig
) -> tuple[pd.DataFrame, dict[str, dict[str, pd.DataFrame]]]:
    """Held-out scores of the selected trials and the comparison table of each fold scheme.

    The average activity rows of a (scheme, fold, chrom, experiment) are computed by every
    trial of that fold; they are kept once.
    """
    if not len(best):
        return pd.DataFrame(), {}
    chosen = trials.set_index("trial_id").loc[best["trial_id"]]
    frames = []
    for scheme, js in zip(chosen["scheme"], chosen["scores_json"], strict=True):
        if js:
            df = pd.read_json(io.StringIO(js), orient="records")
            if len(df):
                df.insert(0, "scheme", scheme)
                frames.append(df)
    if not frames:
        return pd.DataFrame(), {}
    scores = pd.concat(frames, ignore_index=True)
    is_base = scores["model"] == AVERAGE_ACTIVITY
    keys = ["scheme", "model", "experiment", "chrom", "fold"]
    base = scores[is_base]
    dedup = base.drop_duplicates(keys)
    metric_cols = [m for m in cfg.comparison_metrics if m in base]
    if len(base) != len(dedup) and metric_cols:
        spread = base.groupby(keys)[metric_cols].agg(lambda s: s.max() - s.min()).max().max()
        if spread > 1e-6:
            log.warning(
                "average activity differs by up to %.3g between trials of the same fold "
                "(variants with different validation splits?); keeping the first",
                spread,
            )
    scores = pd.concat([dedup, scores[~is_base]], ignore_index=True)
    models = [AVERAGE_ACTIVITY] if is_base.any() else []
    models += list(dict.fromkeys(m for m in best["model"] if m != AVERAGE_ACTIVITY))
    tables: dict[str, dict[str, pd.DataFrame]] = {}
    for scheme, sub in scores.groupby("scheme", sort=False):
        present = [m for m in models if m in set(sub["model"])]
        tables[scheme] = {}
        for metric in cfg.comparison_metrics:
            if metric in sub and sub[metric].notna().any():
                tables[scheme][metric] = comparison_table(
                    sub.drop(columns="scheme"), metric=metric, models=present
                )
    return scores, tables


def _close_trial_runs(parent, trials: pd.DataFrame) -> None:
    """End the MLflow runs of trials the scheduler stopped as ``KILLED``, and any trial run left
    ``RUNNING``.

    A stopped trial's actor is removed with its placement group: its Train run dies under it
    (the run then ends ``FAILED`` with an ``ActorDiedError``) or the process exits before the
    run ends. Either way the run did not fail; it was stopped. Runs of finished trials are
    ``FINISHED``; failed trials stay ``FAILED``.
    """
    if not parent.enabled:
        return
    from epiray.tracking import TAG_PARENT

    mlc = parent.client
    stopped = set(trials.loc[trials["status"] == "stopped", "trial_id"]) if len(trials) else set()
    runs = mlc.search_runs(
        [parent.experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent.run_id}'",
        max_results=10000,
    )
    for run in runs:
        trial = run.data.tags.get("epiray.trial")
        status = run.info.status
        if trial in stopped:
            mlc.set_tag(run.info.run_id, "epiray.stopped_early", "true")
        if status == "RUNNING" or (trial in stopped and status == "FAILED"):
            log.info("ending MLflow run %s of trial %s as KILLED", run.info.run_name, trial)
            mlc.set_terminated(run.info.run_id, status="KILLED")


def _log_summary(parent, result: SweepResult, out: Path, store_root: str | None = None) -> None:
    """Tables to the parent run and to ``out/<name>/``; the held-out means per fold and the
    store (``store_root``, the trials' input dataset) to the parent run."""
    from epiray.store import atomic_write_text

    trials = result.trials.drop(columns=["scores_json"], errors="ignore")
    folder = out / result.name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "trials.csv", trials.to_csv(index=False))
    atomic_write_text(folder / "summary.md", result.format("markdown"))
    if len(result.best):
        atomic_write_text(folder / "best.csv", result.best.to_csv(index=False))
    if len(result.scores):
        atomic_write_text(folder / "scores.csv", result.scores.to_csv(index=False))
    if not parent.enabled:
        return
    parent.log_table(trials, "tables/trials")
    if len(result.best):
        parent.log_table(result.best, "tables/best")
    if len(result.scores):
        parent.log_table(result.scores, "tables/selected_scores")
    metrics: dict[str, float] = {}
    for scheme, tables in result.comparison.items():
        for metric, table in tables.items():
            parent.log_table(table, f"tables/comparison_{scheme}_{metric}")
            for model, row in table.iterrows():
                for col, v in row.items():
                    if col != "n" and _is_number(v):
                        metrics[f"{scheme}/{model}/{metric}_{col}"] = float(v)
    counts = trials["status"].value_counts() if len(trials) else {}
    for s in ("finished", "stopped", "error"):
        metrics[f"trials/{s}"] = float(counts.get(s, 0))
    parent.log_metrics(metrics)
    log_heldout_per_fold(parent, result)
    if store_root is not None:
        from epiray.store import Store
        from epiray.train import log_store_input

        log_store_input(parent, Store.open(store_root))
    parent.log_text(result.format("markdown"), "tables/summary.md")


def log_heldout_per_fold(parent, result: SweepResult) -> dict[str, float]:
    """Each selected model's held-out mean per fold on the parent run:
    ``heldout_<metric>/<model>/<fold>`` (``heldout_<metric>/<scheme>/<model>/<fold>`` when the
    sweep has several fold schemes), and per model a series over folds (step = fold index),
    for the MLflow UI's charts (:func:`epiray.tracking.log_heldout_comparison`)."""
    from epiray.tracking import log_heldout_comparison

    logged: dict[str, float] = {}
    if not len(result.scores) or "scheme" not in result.scores:
        return logged
    schemes = list(dict.fromkeys(result.scores["scheme"]))
    for scheme in schemes:
        sub = result.scores[result.scores["scheme"] == scheme].drop(columns="scheme")
        for metric in result.comparison.get(scheme, {}):
            name = f"heldout_{metric}" + (f"/{scheme}" if len(schemes) > 1 else "")
            logged |= log_heldout_comparison(parent, sub, metric=metric, name=name)
    return logged


# ------------------------------------------------------------------------------------ CLI
def add_cli_args(p: argparse.ArgumentParser) -> None:
    """Options of ``epiray sweep`` (``COMMANDS["sweep"] = (help, add_cli_args, cli_run)``)."""
    p.add_argument(
        "--config", type=Path, required=True, help="sweep YAML (see configs/sweep_cv.yaml)"
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse to continue an existing sweep of the same name (default: resume it)",
    )
    p.add_argument(
        "--max-concurrent", type=int, help="override max_concurrent_trials (trials at once)"
    )
    p.add_argument("--name", help="override the sweep name")


def cli_run(args: argparse.Namespace, stream: IO[str] | None = None) -> SweepResult:
    """Run ``epiray sweep``: load the config, apply the options, run, write the summary.

    Parameters
    ----------
    args
        Parsed options of :func:`add_cli_args`.
    stream
        Where the summary goes (default standard output).
    """
    cfg = load_sweep_config(args.config)
    upd: dict[str, Any] = {}
    if args.no_resume:
        upd["resume"] = False
    if args.max_concurrent is not None:
        upd["max_concurrent_trials"] = args.max_concurrent
    if args.name:
        upd["name"] = args.name
    if upd:
        cfg = SweepConfig.model_validate({**cfg.model_dump(mode="json"), **upd})
    result = run_sweep(cfg)
    (stream or sys.stdout).write(result.format("text"))
    return result


__all__: list[str] = [
    "Cell",
    "SchedulerSection",
    "SearchDomain",
    "SweepConfig",
    "SweepResult",
    "add_cli_args",
    "apply_overrides",
    "best_table",
    "cli_run",
    "compare",
    "concurrency_limit",
    "load_sweep_config",
    "log_heldout_per_fold",
    "plan_cells",
    "run_sweep",
    "sweep_storage",
    "trial_resources",
    "trials_table",
]
