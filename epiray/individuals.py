"""The eDICE paper's personalised ("individuals", ENTEx-style) protocol.

A compendium of *donors* (individuals), each with tracks of several tissues × assays: the
store's experiments of one assembly whose manifest rows carry a ``donor``. The biosample is
the tissue, named the same in every donor. For each target donor and each of its tracks (or a
chosen subset), the track is held out and imputed from the donor's remaining tracks, then
scored against the measurement (leave-one-out, paper Fig. 4d-g and 5c-d).

Strategies (``strategies`` of :class:`IndividualsConfig`)
--------------------------------------------------------
``avg``
    Mean of the target assay over the target donor's *other tissues* (METHODS §6): personal,
    not tissue-specific.
``track_avg``
    Mean of the same tissue-assay over the *other donors*: tissue-specific, not personal.
``edice_other``
    eDICE trained on the other donors, then imputing the held-out track from the target
    donor's remaining tracks as support (no fine-tuning; paper: "eDICE Train Other Ind.").
``edice_other_tl``
    The same model, fine-tuned on the target donor's remaining tracks with the training
    objective (mask some observed tracks per bin, predict them from the rest) before imputing
    (paper: "eDICE Other Ind. TL", its best). Only the signal embedders and the output MLP
    are fine-tuned; the global embeddings and the attention blocks stay frozen
    (``finetune_freeze``; paper: 5 epochs at 1e-5).
``edice_target``
    eDICE trained from scratch on the target donor's remaining tracks only ("eDICE Train
    Target").

How the other donors train one model: every donor's bins are separate examples of the same
tissue × assay matrix, so the other donors' ``[tracks, bins]`` arrays are concatenated along
the bin axis under one vocabulary (tissues and assays shared by name). That model does not
depend on which track of the target is held out, so it is trained once per target donor and
copied for every held-out track (and saved, so a re-run reuses it).

Tracks measured in some donors only
-----------------------------------
The protocol uses the (tissue, assay) pairs measured in *every* donor (the paper selects the
29 pairs available for all four ENTEx individuals): TrackAVG needs the pair in the other
donors, and the donors' matrices must hold the same tracks to be stacked. An experiment whose
pair is missing in some donor is an error naming it and the donors that lack the pair
(``incomplete_tracks: error``, the default), or, with ``incomplete_tracks: exclude``, left out
of the analysis with a warning naming every excluded experiment (also written to
``excluded.csv`` and counted in the summary). Two experiments of the same (donor, tissue,
assay) and experiments without a donor are always errors. ``avg`` is undefined for a pair
whose assay is measured in no other tissue; its row is kept with NaN metrics (``n_sources`` 0)
and a warning names the track.

Scores and outputs (``out``)
----------------------------
Each held-out track is scored with :func:`epiray.metrics.score_track` (MSE, Pearson, Spearman,
top-1% MSEs, AUROC/AUPRC of peak bins — bins above the track's 99th percentile — and peak
precision/recall), plus ``auprc_individual``: the AUPRC of the target's *individual-specific*
peak bins, with the bins of peaks shared with any other donor's same track masked out (paper
Fig. 5c). Outputs:

* ``results/donor=<d>/<experiment>.json`` — one file per finished (donor, track), all its
  strategies, written atomically; a re-run keeps them and skips those tracks (resume). They
  record a fingerprint of everything that changes results; a re-run with a different config
  raises instead of mixing results (use a new ``out`` or ``--overwrite``).
* ``models/donor=<d>/edice_other.pt`` — the model trained on the other donors (reused).
* ``individuals.parquet`` / ``.csv`` — the per-track table: ``donor, experiment, biosample,
  assay, model`` (the strategy), ``chrom, n_bins, n_sources, seconds`` and the metrics.
* ``summary.parquet`` / ``.csv`` — per strategy: tracks, mean metrics, and how many tracks
  ``edice_other_tl`` beats it on (lower MSE, higher Pearson, higher AUPRC).
* MLflow (through :mod:`epiray.tracking`): a parent run ``individuals.<chrom>`` with the config
  as params and artifact, the per-track table as its score table, the summary table and mean
  metrics per strategy (``mse/<strategy>``, ``edice_other_tl_better_mse/<strategy>``, ...);
  one child run ``individuals.<chrom>.<donor>`` per target donor with that donor's tracks,
  mean metrics and the per-epoch training MSE of its other-donor model (when trained in this
  invocation).

Parallelism
-----------
The work of one target donor (train its other-donor model, then every held-out track) is one
Ray task (``executor: ray``), asking for ``num_cpus`` CPUs and ``num_gpus`` GPUs (``auto``: 1
when the cluster has GPUs); tasks of different donors run concurrently. Each task reads its
data from the store and writes its result files itself, so ``out`` and the store must be on
storage every node sees (as for ``epiray train``). ``executor: local`` runs the same function
in-process, donor after donor.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from epiray.config import Section, dump_config
from epiray.errors import ConfigError, EpirayError, EpirayWarning, InputDataError, collect
from epiray.loop import LoopParams, fit
from epiray.metrics import METRIC_NAMES
from epiray.models import Vocabulary, chrom_data_from_numpy, default_device
from epiray.models.edice import EDice, EDiceParams
from epiray.store import MANIFEST, Store, atomic_write_bytes, atomic_write_text
from epiray.tracking import TrackingConfig

log = logging.getLogger(__name__)

__all__ = [
    "BASELINES",
    "STRATEGIES",
    "Cohort",
    "IndividualsConfig",
    "IndividualsResult",
    "avg_baseline",
    "donor_task",
    "finetune",
    "fingerprint",
    "impute_donor",
    "plan_cohort",
    "run_individuals",
    "score_imputation",
    "simulate_individuals",
    "summarize",
    "track_avg_baseline",
    "train_edice",
    "write_individuals_compendium",
]

Strategy = Literal["avg", "track_avg", "edice_other", "edice_other_tl", "edice_target"]
STRATEGIES: tuple[str, ...] = ("avg", "track_avg", "edice_other", "edice_other_tl", "edice_target")
BASELINES: tuple[str, ...] = ("avg", "track_avg")
#: The strategy the summary compares every other one with.
REFERENCE = "edice_other_tl"
#: Metrics of the table (from :func:`epiray.metrics.score_track`, without the region MSEs,
#: which need annotations) plus ``auprc_individual``.
METRICS: tuple[str, ...] = (
    *(m for m in METRIC_NAMES if m not in ("mse_prom", "mse_gene", "mse_enh", "mse_var")),
    "auprc_individual",
)
RESULTS_DIR = "results"
MODELS_DIR = "models"
TABLE = "individuals"
SUMMARY = "summary"


# ------------------------------------------------------------------------------------ config
def _loop(epochs: int, lr: float) -> LoopParams:
    return LoopParams(epochs=epochs, lr=lr, batch_size=3840, patience=None)


class IndividualsConfig(Section):
    """The ``individuals`` job (see the module docstring).

    Attributes
    ----------
    store, out
        The store, and the output folder (results, tables, cached models).
    assembly, chrom
        The experiments of ``assembly`` on one chromosome (the paper: chr21).
    donors
        Target donors (``all``: every donor). Every donor of the store trains the other-donor
        models whatever this selects.
    biosamples, assays
        Hold out only tracks of these tissues / assays (None: all).
    max_tracks_per_donor
        Hold out at most this many tracks per target donor, drawn with ``seed``.
    strategies
        Which of :data:`STRATEGIES` to run.
    incomplete_tracks
        Experiments of a (tissue, assay) pair that some donor lacks: ``error`` or ``exclude``
        (warned, named, counted).
    model
        eDICE hyperparameters (:class:`~epiray.models.edice.EDiceParams`).
    train_other, train_target, finetune
        Loop settings of the model trained on the other donors, of the model trained on the
        target donor only, and of the transfer-learning fine-tune (default: the paper's 50
        epochs at 3e-4 and 5 epochs at 1e-5).
    finetune_freeze
        Parts frozen while fine-tuning (the paper: global embeddings and attention).
    seed
        Seeds the track subset, every model's initialisation and batch draws.
    executor
        ``ray`` (one Ray task per target donor) or ``local`` (in-process).
    num_cpus, num_gpus
        Resources of each Ray task (``num_gpus: auto``: 1 when the cluster has GPUs).
    tracking
        MLflow settings.
    """

    store: str
    out: str
    assembly: str
    chrom: str
    donors: list[str] | Literal["all"] = "all"
    biosamples: list[str] | None = None
    assays: list[str] | None = None
    max_tracks_per_donor: int | None = Field(None, ge=1)
    strategies: list[Strategy] = list(STRATEGIES)
    incomplete_tracks: Literal["error", "exclude"] = "error"
    model: EDiceParams = EDiceParams()
    train_other: LoopParams = _loop(50, 3e-4)
    train_target: LoopParams = _loop(50, 3e-4)
    finetune: LoopParams = _loop(5, 1e-5)
    finetune_freeze: list[str] = ["global_embeddings", "attention"]
    seed: int = 0
    executor: Literal["ray", "local"] = "ray"
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float | Literal["auto"] = "auto"
    tracking: TrackingConfig = TrackingConfig(experiment="epiray-individuals")

    @field_validator("strategies")
    @classmethod
    def _check_strategies(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"strategies: expected at least one of {list(STRATEGIES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"strategies: listed twice in {v}")
        return v

    @field_validator("finetune_freeze")
    @classmethod
    def _check_freeze(cls, v: list[str]) -> list[str]:
        bad = sorted(set(v) - EDice.freezable)
        if bad:
            raise ValueError(
                f"finetune_freeze: {bad} unknown; expected some of {sorted(EDice.freezable)}"
            )
        if {"signal_embedders", "mlp"} <= set(v):
            raise ValueError("finetune_freeze: freezes everything; leave something to fine-tune")
        return v


# ------------------------------------------------------------------------------------ plan
@dataclass
class Cohort:
    """The validated experiments of the protocol, as a donor × pair grid.

    Attributes
    ----------
    donors
        Donor names, sorted (axis 0 of the grid).
    biosamples, assays
        Tissue and assay of each (tissue, assay) pair measured in every donor, sorted (axis 1).
    experiments
        ``[D][C]`` experiment ids: donor ``d``'s experiment of pair ``c``.
    vocab
        One vocabulary over every donor (tissues and assays shared by name).
    targets
        ``{donor: [pair indices to hold out]}`` after the donor/biosample/assay filters.
    excluded
        Experiments left out (``incomplete_tracks: exclude``): ``experiment, donor,
        biosample, assay, reason``.
    n_bins
        Bins of the chromosome.
    """

    donors: list[str]
    biosamples: list[str]
    assays: list[str]
    experiments: list[list[str]]
    vocab: Vocabulary
    targets: dict[str, list[int]]
    excluded: pd.DataFrame
    n_bins: int

    @property
    def n_pairs(self) -> int:
        """Tracks per donor, ``C``."""
        return len(self.biosamples)

    def experiment_table(self) -> pd.DataFrame:
        """One row per experiment in scope: ``experiment, donor, biosample, assay, pair``."""
        return pd.DataFrame(
            [
                {
                    "experiment": e,
                    "donor": d,
                    "biosample": self.biosamples[c],
                    "assay": self.assays[c],
                    "pair": c,
                }
                for d, row in zip(self.donors, self.experiments)
                for c, e in enumerate(row)
            ]
        )


def plan_cohort(store: Store, cfg: IndividualsConfig) -> Cohort:
    """Validate the store's experiments for the protocol and lay them out per donor.

    Parameters
    ----------
    store
        The store.
    cfg
        The job config (assembly, chrom, filters, ``incomplete_tracks``, strategies).

    Returns
    -------
    Cohort

    Raises
    ------
    InputDataError
        Once, listing every problem: experiments without a donor (naming each experiment and
        its source file), duplicate (donor, tissue, assay) experiments, experiments lacking
        the chromosome, incomplete pairs under ``incomplete_tracks: error``, too few donors
        or tracks, unknown donors/tissues/assays in the filters.
    """
    where = f"individuals store {store.root} (manifest {store.root / MANIFEST})"
    exps = store.experiments(assembly=cfg.assembly)
    if exps.empty:
        raise InputDataError(
            f"{where}: no experiment of assembly {cfg.assembly!r}; expected the donors' "
            f"tracks. Stored assemblies: {sorted(store.summary.get('assemblies', {}))}."
        )
    if cfg.chrom not in store.chrom_sizes(cfg.assembly):
        raise InputDataError(
            f"{where}: chrom {cfg.chrom!r} not in assembly {cfg.assembly!r}; expected one of "
            f"{sorted(store.chrom_sizes(cfg.assembly))}. Fix chrom in the config."
        )
    problems: list[str] = []
    donor = exps["donor"].astype(object)
    no_donor = exps[donor.isna() | (donor.astype(str).str.strip() == "")]
    if len(no_donor):
        listing = ", ".join(f"{r.experiment} (file {r.path})" for r in no_donor.itertuples())
        problems.append(
            f"{len(no_donor)} experiment(s) of assembly {cfg.assembly!r} have no donor: "
            f"{listing}; expected a donor for every experiment (the protocol groups tracks by "
            "donor). Fill the manifest's donor column and re-ingest with --resume"
        )
    exps = exps.drop(no_donor.index)
    info = store.summary["experiments"]
    for e in exps["experiment"]:
        if cfg.chrom not in info[e].get("chroms", {}):
            problems.append(
                f"experiment {e} ({info[e].get('path')}): no data for chrom {cfg.chrom!r}; "
                "expected every experiment on the chosen chromosome. Ingest it"
            )
    dup = exps[exps.duplicated(["donor", "biosample", "assay"], keep=False)]
    for (d, b, a), g in dup.groupby(["donor", "biosample", "assay"]):
        problems.append(
            f"donor {d!r} has {len(g)} experiments of ({b}, {a}): {sorted(g['experiment'])}; "
            "expected one track per (donor, tissue, assay). Merge replicates before ingesting"
        )
    collect(problems, where)

    donors = sorted(exps["donor"].unique())
    pairs_of = {d: set(zip(g["biosample"], g["assay"])) for d, g in exps.groupby("donor")}
    common = set.intersection(*pairs_of.values())
    incomplete = exps[[(b, a) not in common for b, a in zip(exps["biosample"], exps["assay"])]]
    excluded = pd.DataFrame(columns=["experiment", "donor", "biosample", "assay", "reason"])
    if len(incomplete):
        rows = []
        for r in incomplete.itertuples():
            lacking = [d for d in donors if (r.biosample, r.assay) not in pairs_of[d]]
            rows.append(
                {
                    "experiment": r.experiment,
                    "donor": r.donor,
                    "biosample": r.biosample,
                    "assay": r.assay,
                    "reason": f"({r.biosample}, {r.assay}) not measured in donor(s) "
                    + ", ".join(lacking),
                }
            )
        excluded = pd.DataFrame(rows)
        listing = "; ".join(f"{r['experiment']}: {r['reason']}" for r in rows)
        if cfg.incomplete_tracks == "error":
            problems.append(
                f"{len(rows)} experiment(s) of a (tissue, assay) pair not measured in every "
                f"donor: {listing}; expected every pair in every donor (the protocol stacks "
                "the donors' matrices and TrackAVG averages the other donors). Set "
                "incomplete_tracks: exclude to leave them out, or add the missing tracks"
            )
        else:
            msg = (
                f"{where}: excluded {len(rows)} experiment(s) whose (tissue, assay) pair is "
                f"not measured in every donor (incomplete_tracks: exclude): {listing}"
            )
            warnings.warn(msg, EpirayWarning, stacklevel=2)
            log.warning(msg)
    pairs = sorted(common)
    needs_others = set(cfg.strategies) - {"avg", "edice_target"}
    if needs_others and len(donors) < 2:
        problems.append(
            f"strategies {sorted(needs_others)} need other donors; expected at least 2 donors, "
            f"got {donors}. Add donors or run only avg and edice_target"
        )
    if len(pairs) < 2:
        problems.append(
            f"{len(pairs)} (tissue, assay) pair(s) measured in every donor; expected at least "
            "2 (one to hold out, the rest as support)"
        )
    for name, wanted, known in (
        ("donors", None if cfg.donors == "all" else cfg.donors, donors),
        ("biosamples", cfg.biosamples, sorted({b for b, _ in pairs})),
        ("assays", cfg.assays, sorted({a for _, a in pairs})),
    ):
        bad = sorted(set(wanted or ()) - set(known))
        if bad:
            problems.append(
                f"config {name}: {bad} not in the protocol; expected some of {known}. Fix the "
                "filter"
            )
    collect(problems, where)

    by_key = {(r.donor, r.biosample, r.assay): r.experiment for r in exps.itertuples()}
    grid = [[by_key[(d, b, a)] for b, a in pairs] for d in donors]
    table = exps[exps["experiment"].isin({e for row in grid for e in row})]
    nb = store.n_bins(cfg.assembly, cfg.chrom)
    vocab = Vocabulary.from_records(
        table[["experiment", "biosample", "assay", "species"]],
        chrom=cfg.chrom,
        n_bins=nb,
        assembly=cfg.assembly,
        store_hash=store.summary.get("manifest_hash"),
        checksums={
            e: info[e].get("checksum") for e in table["experiment"] if info[e].get("checksum")
        },
    )
    targets: dict[str, list[int]] = {}
    rng = np.random.default_rng(cfg.seed)
    chosen = donors if cfg.donors == "all" else sorted(set(cfg.donors))
    for d in chosen:
        keep = [
            c
            for c, (b, a) in enumerate(pairs)
            if (cfg.biosamples is None or b in cfg.biosamples)
            and (cfg.assays is None or a in cfg.assays)
        ]
        if cfg.max_tracks_per_donor is not None and len(keep) > cfg.max_tracks_per_donor:
            keep = sorted(rng.choice(keep, cfg.max_tracks_per_donor, replace=False).tolist())
        targets[d] = keep
    return Cohort(
        donors=donors,
        biosamples=[b for b, _ in pairs],
        assays=[a for _, a in pairs],
        experiments=grid,
        vocab=vocab,
        targets=targets,
        excluded=excluded,
        n_bins=nb,
    )


# ------------------------------------------------------------------------------------ baselines
def avg_baseline(
    values: np.ndarray, biosample: Sequence[int], assay: Sequence[int], donor: int, pair: int
) -> tuple[np.ndarray | None, int]:
    """AVG: mean of the target assay over the target donor's other tissues.

    Parameters
    ----------
    values
        ``[D, C, n]`` float: every donor's tracks of the ``C`` (tissue, assay) pairs, arcsinh
        scale.
    biosample, assay
        ``[C]`` int: tissue and assay of each pair.
    donor, pair
        The held-out track ``values[donor, pair]``.

    Returns
    -------
    (track, n_sources)
        ``[n]`` float32 mean (accumulated in float64) and the number of tracks averaged;
        ``(None, 0)`` when the assay is measured in no other tissue.
    """
    src = [
        c for c in range(len(assay)) if assay[c] == assay[pair] and biosample[c] != biosample[pair]
    ]
    if not src:
        return None, 0
    return values[donor, src].astype(np.float64).mean(0).astype(np.float32), len(src)


def track_avg_baseline(values: np.ndarray, donor: int, pair: int) -> tuple[np.ndarray | None, int]:
    """TrackAVG: mean of the same tissue-assay over the other donors.

    Parameters
    ----------
    values
        ``[D, C, n]`` float, as for :func:`avg_baseline`.
    donor, pair
        The held-out track ``values[donor, pair]``.

    Returns
    -------
    (track, n_sources)
        ``[n]`` float32 mean and the number of donors averaged; ``(None, 0)`` with one donor.
    """
    src = [d for d in range(values.shape[0]) if d != donor]
    if not src:
        return None, 0
    return values[src, pair].astype(np.float64).mean(0).astype(np.float32), len(src)


# ------------------------------------------------------------------------------------ eDICE
def _chrom_data(values: np.ndarray, biosample, assay, chrom: str, device: torch.device):
    """``[C, n]`` tracks as a ChromData on ``device`` (the bins may be stacked donors)."""
    return chrom_data_from_numpy(values, biosample, assay, chrom=chrom, device=device)


def train_edice(
    params: EDiceParams,
    vocab: Vocabulary,
    data,
    loop: LoopParams,
    seed: int,
) -> tuple[EDice, list[dict[str, Any]]]:
    """A fresh eDICE trained on ``data`` with the mask-and-predict objective.

    Returns
    -------
    (model, history)
        The model (on ``data.device``) and the loop's per-epoch metrics.
    """
    torch.manual_seed(seed)
    model = EDice.build(params, vocab, data)
    state = fit(model, data, loop, seed=seed)
    return model, state.history


def finetune(
    model: EDice,
    data,
    loop: LoopParams,
    freeze: Sequence[str] = ("global_embeddings", "attention"),
    seed: int = 0,
) -> EDice:
    """Transfer learning: a copy of ``model`` fine-tuned on ``data``, ``freeze`` kept fixed.

    The copy's parts named in ``freeze`` (by default the global embeddings and the attention
    blocks) are frozen; the rest (signal embedders and output MLP) is trained with the same
    mask-and-predict objective on the tracks of ``data`` (paper: 5 epochs at 1e-5 between
    individuals). ``model`` itself is left unchanged, so it can be reused for the next track.

    Parameters
    ----------
    model
        A trained eDICE.
    data
        The target donor's remaining tracks (ChromData).
    loop
        Fine-tuning loop settings.
    freeze
        Parts to keep fixed (see ``EDice.freezable``).
    seed
        Seed of the batch draws and dropout.

    Returns
    -------
    EDice
        The fine-tuned copy.
    """
    tuned = copy.deepcopy(model)
    tuned.freeze(set(freeze))
    torch.manual_seed(seed)
    fit(tuned, data, loop, seed=seed)
    tuned.eval()
    return tuned


# ------------------------------------------------------------------------------------ scoring
def score_imputation(y: np.ndarray, yhat: np.ndarray, others: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`METRICS` of one imputed track.

    Parameters
    ----------
    y, yhat
        ``[n]`` truth and imputation, arcsinh scale.
    others
        ``[D-1, n]`` the same tissue-assay in the other donors (for ``auprc_individual``), or
        ``[0, n]``.

    Returns
    -------
    dict
        ``auprc_individual``: AUPRC of ``yhat`` for the truth's peak bins (above its 99th
        percentile) after masking out the bins that are peaks of the truth *and* of some other
        donor's track (above that track's own 99th percentile): the individual-specific peaks
        of the paper's Fig. 5c. NaN without other donors or individual-specific peaks.
    """
    from epiray.metrics import PEAK_QUANTILE, auprc, score_track

    s = score_track(y, yhat)
    out = {k: float(s[k]) for k in METRICS if k in s}
    out["auprc_individual"] = float("nan")
    if len(others):
        thr = float(np.quantile(y, PEAK_QUANTILE))
        other_peak = (others > np.quantile(others, PEAK_QUANTILE, axis=1, keepdims=True)).any(0)
        keep = ~((y > thr) & other_peak)
        if keep.sum() >= 2:
            out["auprc_individual"] = float(auprc(y[keep], yhat[keep], peak_threshold=thr))
    return out


# ------------------------------------------------------------------------------------ donor work
def _track_seed(seed: int, experiment: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(experiment.encode())) % (2**31 - 1)


def _result_path(out: Path, donor: str, experiment: str) -> Path:
    return out / RESULTS_DIR / f"donor={donor}" / f"{experiment}.json"


def _model_path(out: Path, donor: str) -> Path:
    return out / MODELS_DIR / f"donor={donor}" / "edice_other.pt"


def impute_donor(
    values: np.ndarray,
    cohort: Cohort,
    donor: str,
    pairs: Sequence[int],
    cfg: IndividualsConfig,
    *,
    device: torch.device | str = "cpu",
    model_file: Path | None = None,
    fingerprint: str = "",
    on_track: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """All strategies for the held-out ``pairs`` of one donor (no Ray, no MLflow).

    Parameters
    ----------
    values
        ``[D, C, n]`` float32 tracks of the cohort (donors and pairs in cohort order).
    cohort
        The plan.
    donor
        Target donor.
    pairs
        Pair indices to hold out in turn.
    cfg
        Strategies, model and loop settings, seed.
    device
        Where the models train.
    model_file
        Cache of the other-donor model: loaded when it holds ``fingerprint``, else written
        after training.
    fingerprint
        Identifies the config the cache belongs to.
    on_track
        Called as ``on_track(experiment, rows)`` after each held-out track.

    Returns
    -------
    dict
        ``rows`` (one dict per strategy and track), ``history`` (per-epoch metrics of the
        other-donor model when trained here, else empty), ``model_reused`` (bool).
    """
    dev = torch.device(device)
    d = cohort.donors.index(donor)
    vocab = cohort.vocab
    bio = [vocab.biosample_index(b) for b in cohort.biosamples]
    assay = [vocab.assay_index(a) for a in cohort.assays]
    others = [k for k in range(len(cohort.donors)) if k != d]
    strategies = list(cfg.strategies)
    history: list[dict[str, Any]] = []
    reused = False
    other_model = None
    if {"edice_other", "edice_other_tl"} & set(strategies) and pairs:
        stacked = np.concatenate([values[k] for k in others], axis=1)
        data_o = _chrom_data(stacked, bio, assay, cohort.vocab.chrom, dev)
        seed = _track_seed(cfg.seed, f"other:{donor}")
        if model_file is not None and model_file.is_file():
            saved = torch.load(model_file, map_location="cpu", weights_only=False)
            if saved.get("fingerprint") == fingerprint:
                other_model = EDice.build(cfg.model, vocab, data_o)
                other_model.load_state_dict(saved["state_dict"])
                reused = True
        if other_model is None:
            t0 = time.perf_counter()
            other_model, history = train_edice(cfg.model, vocab, data_o, cfg.train_other, seed)
            log.info(
                "donor %s: eDICE on %d other donors (%d bins) trained in %.1f s, train MSE %.4f",
                donor,
                len(others),
                stacked.shape[1],
                time.perf_counter() - t0,
                history[-1]["train_mse"] if history else float("nan"),
            )
            if model_file is not None:
                buf = io.BytesIO()
                torch.save(
                    {
                        "fingerprint": fingerprint,
                        "state_dict": {k: v.cpu() for k, v in other_model.state_dict().items()},
                        "history": history,
                    },
                    buf,
                )
                atomic_write_bytes(model_file, buf.getvalue())
        other_model.eval()
        del data_o, stacked

    rows: list[dict[str, Any]] = []
    for c in pairs:
        exp = cohort.experiments[d][c]
        seed = _track_seed(cfg.seed, exp)
        y = values[d, c]
        y_others = values[others, c]
        keep = [j for j in range(cohort.n_pairs) if j != c]
        data_t = _chrom_data(
            values[d, keep], [bio[j] for j in keep], [assay[j] for j in keep], vocab.chrom, dev
        )
        track_rows = []
        for s in strategies:
            t0 = time.perf_counter()
            n_sources = len(keep)
            if s == "avg":
                pred, n_sources = avg_baseline(values, bio, assay, d, c)
                if pred is None:
                    msg = (
                        f"individuals donor {donor} experiment {exp}: avg undefined (assay "
                        f"{cohort.assays[c]!r} measured in no other tissue of the donor); "
                        "its row has NaN metrics"
                    )
                    warnings.warn(msg, EpirayWarning, stacklevel=2)
                    log.warning(msg)
            elif s == "track_avg":
                pred, n_sources = track_avg_baseline(values, d, c)
            elif s == "edice_other":
                pred = other_model.predict(data_t, bio[c], assay[c]).float().cpu().numpy()
            elif s == "edice_other_tl":
                tuned = finetune(other_model, data_t, cfg.finetune, cfg.finetune_freeze, seed)
                pred = tuned.predict(data_t, bio[c], assay[c]).float().cpu().numpy()
                del tuned
            else:  # edice_target
                model, _ = train_edice(cfg.model, vocab, data_t, cfg.train_target, seed)
                model.eval()
                pred = model.predict(data_t, bio[c], assay[c]).float().cpu().numpy()
                del model
            seconds = time.perf_counter() - t0
            scores = (
                score_imputation(y, pred, y_others)
                if pred is not None
                else dict.fromkeys(METRICS, float("nan"))
            )
            track_rows.append(
                {
                    "donor": donor,
                    "experiment": exp,
                    "biosample": cohort.biosamples[c],
                    "assay": cohort.assays[c],
                    "model": s,
                    "chrom": vocab.chrom,
                    "n_bins": int(y.shape[0]),
                    "n_sources": int(n_sources),
                    "seconds": seconds,
                    **scores,
                }
            )
        log.info(
            "donor %s %s: %s",
            donor,
            exp,
            ", ".join(f"{r['model']} mse {r['mse']:.4f}" for r in track_rows),
        )
        rows += track_rows
        if on_track is not None:
            on_track(exp, track_rows)
    return {"rows": rows, "history": history, "model_reused": reused}


def _write_result(out: Path, donor: str, experiment: str, rows, fingerprint: str) -> None:
    payload = {"fingerprint": fingerprint, "donor": donor, "experiment": experiment, "rows": rows}
    atomic_write_text(_result_path(out, donor, experiment), json.dumps(payload, indent=1))


def donor_task(job: dict[str, Any]) -> dict[str, Any]:
    """One target donor's work (a Ray task or a local call): read, impute, write results.

    Parameters
    ----------
    job
        ``config`` (the job config as a JSON dict), ``cohort`` (:func:`_cohort_dict`),
        ``donor``, ``pairs``, ``fingerprint``, ``threads`` (torch threads to use, or None to
        leave the setting alone).

    Returns
    -------
    dict
        As :func:`impute_donor`, plus ``donor``, ``device`` and ``error`` (None, or the
        message of an :class:`~epiray.errors.EpirayError` raised by the work).
    """
    cfg = IndividualsConfig.model_validate(job["config"])
    cohort = _cohort_from_dict(job["cohort"])
    out = Path(cfg.out)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device = default_device()
    try:
        store = Store.open(cfg.store)
        flat = [e for row in cohort.experiments for e in row]
        values = store.read(cfg.assembly, cfg.chrom, flat).reshape(
            len(cohort.donors), cohort.n_pairs, -1
        )
        res = impute_donor(
            values,
            cohort,
            job["donor"],
            job["pairs"],
            cfg,
            device=device,
            model_file=_model_path(out, job["donor"]),
            fingerprint=job["fingerprint"],
            on_track=lambda exp, rows: _write_result(
                out, job["donor"], exp, rows, job["fingerprint"]
            ),
        )
    except EpirayError as e:
        return {"donor": job["donor"], "rows": [], "history": [], "error": str(e)}
    return {**res, "donor": job["donor"], "device": str(device), "error": None}


def _cohort_dict(c: Cohort) -> dict[str, Any]:
    return {
        "donors": c.donors,
        "biosamples": c.biosamples,
        "assays": c.assays,
        "experiments": c.experiments,
        "vocab": c.vocab.to_dict(),
        "targets": c.targets,
        "n_bins": c.n_bins,
    }


def _cohort_from_dict(d: dict[str, Any]) -> Cohort:
    return Cohort(
        donors=list(d["donors"]),
        biosamples=list(d["biosamples"]),
        assays=list(d["assays"]),
        experiments=[list(r) for r in d["experiments"]],
        vocab=Vocabulary.from_dict(d["vocab"]),
        targets={k: list(v) for k, v in d["targets"].items()},
        excluded=pd.DataFrame(),
        n_bins=int(d["n_bins"]),
    )


# ------------------------------------------------------------------------------------ driver
@dataclass
class IndividualsResult:
    """What :func:`run_individuals` produced.

    Attributes
    ----------
    table
        The per-track table (every finished track of the selected targets).
    summary
        Per-strategy summary (:func:`summarize`).
    computed, reused
        ``(donor, experiment)`` of the tracks computed in this call / kept from earlier ones.
    out
        The output folder.
    mlflow_run_id
        The MLflow run, or None with tracking off.
    other_history
        ``{donor: per-epoch loop metrics}`` of the other-donor models trained in this call
        (not of those reused from an earlier one).
    """

    table: pd.DataFrame
    summary: pd.DataFrame
    computed: list[tuple[str, str]] = field(default_factory=list)
    reused: list[tuple[str, str]] = field(default_factory=list)
    out: Path = Path(".")
    mlflow_run_id: str | None = None
    other_history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def fingerprint(cfg: IndividualsConfig, store: Store, cohort: Cohort) -> str:
    """Hash of everything that changes a track's result: the data in scope (experiment ids and
    source checksums), the chromosome, the strategies, the model and loop settings and the
    seed. The target filters and resources are not part of it."""
    checks = store.summary["experiments"]
    key = {
        "assembly": cfg.assembly,
        "chrom": cfg.chrom,
        "experiments": [
            [(e, checks[e].get("checksum")) for e in row] for row in cohort.experiments
        ],
        "strategies": sorted(cfg.strategies),
        "model": cfg.model.model_dump(mode="json"),
        "train_other": cfg.train_other.model_dump(mode="json"),
        "train_target": cfg.train_target.model_dump(mode="json"),
        "finetune": cfg.finetune.model_dump(mode="json"),
        "finetune_freeze": sorted(cfg.finetune_freeze),
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_results(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for p in sorted((out / RESULTS_DIR).glob("donor=*/*.json")):
        try:
            payload = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EpirayError(
                f"individuals {out}: result file {p} is unreadable ({e}); expected a file "
                "written by this job. Delete it to recompute that track."
            ) from None
        found[(payload["donor"], payload["experiment"])] = payload
    return found


def _check_fingerprints(out: Path, found: dict, fp: str) -> None:
    stale = [f"{d}/{e}" for (d, e), p in found.items() if p.get("fingerprint") != fp]
    for m in sorted((out / MODELS_DIR).glob("donor=*/edice_other.pt")):
        saved = torch.load(m, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != fp:
            stale.append(str(m.relative_to(out)))
    if stale:
        raise ConfigError(
            f"individuals {out}: {len(stale)} earlier result(s) were made with another config "
            f"or other data (e.g. {stale[:3]}); expected results of fingerprint {fp} only. "
            "Use a new out folder, or --overwrite to delete the earlier results."
        )


def _num_gpus(cfg: IndividualsConfig) -> float:
    if cfg.num_gpus != "auto":
        return float(cfg.num_gpus)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _run_jobs(cfg: IndividualsConfig, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if cfg.executor == "local":
        return [donor_task(j) for j in jobs]
    import ray

    from epiray.runtime import ensure_ray

    ensure_ray()
    remote = ray.remote(donor_task).options(num_cpus=cfg.num_cpus, num_gpus=_num_gpus(cfg))
    threads = max(1, int(cfg.num_cpus))
    refs = {remote.remote({**j, "threads": threads}): j["donor"] for j in jobs}
    results = []
    for ref, donor in refs.items():
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as e:  # the worker died (OOM, node loss) or crashed
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results.append(
                {"donor": donor, "rows": [], "history": [], "error": f"Ray task failed ({first})"}
            )
    return results


def summarize(table: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Per-strategy means and how often ``reference`` beats each strategy.

    Parameters
    ----------
    table
        The per-track table (columns ``donor, experiment, model`` and :data:`METRICS`).
    reference
        The strategy compared with the others (default ``edice_other_tl``).

    Returns
    -------
    pandas.DataFrame
        Indexed by strategy (``model``), in :data:`STRATEGIES` order: ``n_tracks``, the mean
        of every metric (NaN-aware; ``n_undefined_<metric>`` is not reported, NaNs come only
        from undefined baselines or tracks without individual-specific peaks), and for every
        strategy other than ``reference``: ``n_paired`` and ``{reference}_better_mse`` (lower
        MSE), ``_better_pearson``, ``_better_auprc`` (higher), counted over tracks where both
        are defined.
    """
    if table.empty:
        return pd.DataFrame()
    order = [s for s in STRATEGIES if s in set(table["model"])]
    means = table.groupby("model")[list(METRICS)].mean().reindex(order)
    means.insert(0, "n_tracks", table.groupby("model")["experiment"].count().reindex(order))
    if reference in order:
        key = ["donor", "experiment"]
        ref = table[table["model"] == reference].set_index(key)
        for s in order:
            if s == reference:
                continue
            other = table[table["model"] == s].set_index(key)
            both = ref.join(other, how="inner", lsuffix="_ref", rsuffix="_other")
            means.loc[s, "n_paired"] = float(both["mse_other"].notna().sum())
            for metric, lower in (("mse", True), ("pearson", False), ("auprc", False)):
                a, b = both[f"{metric}_ref"], both[f"{metric}_other"]
                ok = a.notna() & b.notna()
                better = (a[ok] < b[ok]) if lower else (a[ok] > b[ok])
                means.loc[s, f"{reference}_better_{metric}"] = float(better.sum())
    means.index.name = "model"
    return means


def _write_table(df: pd.DataFrame, path: Path) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, index=df.index.name is not None)
    atomic_write_bytes(path.with_suffix(".parquet"), buf.getvalue())
    atomic_write_text(path.with_suffix(".csv"), df.to_csv(index=df.index.name is not None))


def run_individuals(cfg: IndividualsConfig, *, overwrite: bool = False) -> IndividualsResult:
    """Run the personalised leave-one-out protocol (see the module docstring).

    Parameters
    ----------
    cfg
        The job config.
    overwrite
        Delete earlier results, cached models and tables in ``out`` first. Without it, finished
        (donor, track) results of the same config are kept and skipped (resume), and results
        of another config are an error.

    Returns
    -------
    IndividualsResult

    Raises
    ------
    InputDataError
        A bad cohort (:func:`plan_cohort`).
    ConfigError
        ``out`` holds results of another config.
    EpirayError
        A donor's work failed (the tracks it finished are kept; run again to resume).
    """
    from epiray.tracking import start_run

    store = Store.open(cfg.store)
    cohort = plan_cohort(store, cfg)
    out = Path(cfg.out)
    if overwrite:
        for sub in (RESULTS_DIR, MODELS_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg, store, cohort)
    found = _read_results(out)
    _check_fingerprints(out, found, fp)
    dump_config(cfg, out / "individuals.resolved.yaml")
    if len(cohort.excluded):
        atomic_write_text(out / "excluded.csv", cohort.excluded.to_csv(index=False))

    wanted = [
        (d, cohort.experiments[cohort.donors.index(d)][c], c)
        for d, cs in cohort.targets.items()
        for c in cs
    ]
    reused = [(d, e) for d, e, _ in wanted if (d, e) in found]
    todo: dict[str, list[int]] = {}
    for d, e, c in wanted:
        if (d, e) not in found:
            todo.setdefault(d, []).append(c)
    log.info(
        "individuals: %d donors, %d tracks each; %d held-out tracks to compute, %d kept from "
        "an earlier run",
        len(cohort.donors),
        cohort.n_pairs,
        sum(len(v) for v in todo.values()),
        len(reused),
    )
    config = cfg.model_dump(mode="json")
    jobs = [
        {
            "config": config,
            "cohort": _cohort_dict(cohort),
            "donor": d,
            "pairs": pairs,
            "fingerprint": fp,
            "threads": None,
        }
        for d, pairs in todo.items()
    ]
    results = _run_jobs(cfg, jobs) if jobs else []
    computed = []
    for r in results:
        by_exp: dict[str, list[dict]] = {}
        for row in r["rows"]:
            by_exp.setdefault(row["experiment"], []).append(row)
        for exp, rows in by_exp.items():
            if not _result_path(out, r["donor"], exp).is_file():  # a worker without shared out
                _write_result(out, r["donor"], exp, rows, fp)
            computed.append((r["donor"], exp))
    errors = [f"donor {r['donor']}: {r['error']}" for r in results if r.get("error")]
    collect(
        errors,
        f"individuals {out}: work failed (finished tracks are kept; run again to resume)",
        EpirayError,
    )

    found = _read_results(out)
    rows = [row for d, e, _ in wanted for row in found[(d, e)]["rows"]]
    table = pd.DataFrame(rows)
    summary = summarize(table)
    if len(cohort.excluded):
        summary["n_excluded_experiments"] = len(cohort.excluded)
    _write_table(table, out / TABLE)
    _write_table(summary, out / SUMMARY)
    history = {r["donor"]: r["history"] for r in results if r.get("history")}

    with start_run(
        cfg.tracking,
        model="individuals",
        chrom=cfg.chrom,
        params=cfg,
        base_dir=out,
        tags={"epiray.store_hash": store.store_hash, "epiray.fingerprint": fp},
    ) as run:
        run.log_config(cfg)
        if len(table):
            run.log_scores(table)
            run.log_table(summary, "tables/summary")
            for s, r in summary.iterrows():
                run.log_metrics(
                    {
                        f"{m}/{s}": r[m]
                        for m in ("mse", "pearson", "auprc", "auprc_individual")
                        if pd.notna(r[m])
                    }
                )
                if f"{REFERENCE}_better_mse" in r and pd.notna(r[f"{REFERENCE}_better_mse"]):
                    run.log_metrics({f"{REFERENCE}_better_mse/{s}": r[f"{REFERENCE}_better_mse"]})
        if len(cohort.excluded):
            run.log_table(cohort.excluded, "tables/excluded")
        for donor, rows_d in table.groupby("donor", sort=True) if len(table) else []:
            means = rows_d.groupby("model")[["mse", "pearson", "auprc"]].mean()
            with run.child(
                name=f"individuals.{cfg.chrom}.{donor}", tags={"epiray.donor": donor}
            ) as child:
                child.log_scores(rows_d)
                child.log_metrics(
                    {
                        f"{m}/{s}": v
                        for s, r in means.iterrows()
                        for m, v in r.items()
                        if pd.notna(v)
                    }
                )
                for h in history.get(donor, []):
                    child.log_metrics({"train_other/mse": h["train_mse"]}, step=h["epoch"])
        run_id = run.run_id
    return IndividualsResult(table, summary, computed, reused, out, run_id, history)


# ------------------------------------------------------------------------------------ synthetic
def simulate_individuals(
    n_donors: int = 3,
    n_tissues: int = 4,
    n_assays: int = 3,
    n_bins: int = 4000,
    *,
    seed: int = 0,
    tissue_scale: float = 1.0,
    donor_scale: float = 0.5,
    donor_tissue_scale: float = 0.5,
    noise: float = 0.25,
    batch_sd: float = 0.2,
) -> np.ndarray:
    """Raw (non-negative, pre-arcsinh) signal of a synthetic individuals compendium.

    ``signal[d, t, a, i] = (0.5 + Σ_k C[a,k] g_k(i) + Σ_k T[a,k] g_{t,k}(i)
    + Σ_k P[a,k] g_{d,k}(i) + X[a] g_{d,t}(i)) × gain_d × noise``: peaky genome factors (sparse
    spikes smoothed over a few bins) that are shared by everyone (``g_k``), tissue-specific
    and shared across donors (``g_{t,k}``), donor-specific and shared across that donor's
    tissues (``g_{d,k}``), and donor×tissue-specific (``g_{d,t}``, weaker); assay loadings
    ``C, T, P, X`` are drawn per assay, so assays differ in how tissue- or donor-specific they
    are. ``gain_d`` is a donor batch effect, ``noise`` independent log-normal per bin. The
    defaults make tissue identity the larger effect (as in ENTEx, where TrackAVG is a strong
    baseline), with personal signal that TrackAVG misses.

    Parameters
    ----------
    n_donors, n_tissues, n_assays, n_bins
        Sizes.
    seed
        Random seed (the same seed gives the same array).
    tissue_scale, donor_scale, donor_tissue_scale
        Multipliers of the tissue-, donor- and donor×tissue-specific loadings.
    noise
        Standard deviation of the log-normal noise.
    batch_sd
        Standard deviation of ``log(gain_d)``.

    Returns
    -------
    numpy.ndarray
        float32 ``[n_donors, n_tissues, n_assays, n_bins]``, values >= 0.
    """
    from scipy.ndimage import convolve1d

    rng = np.random.default_rng(seed)

    def peaks(shape: tuple[int, ...], density: float, width: int) -> np.ndarray:
        spikes = (rng.random(shape) < density) * rng.gamma(2.0, 4.0, shape)
        return convolve1d(spikes, np.bartlett(2 * width + 3)[1:-1], axis=-1, mode="constant")

    k, n = 2, n_bins
    shared = peaks((k, n), 0.008, 4)
    tissue = peaks((n_tissues, k, n), 0.008, 4)
    donor = peaks((n_donors, k, n), 0.005, 3)
    donor_tissue = peaks((n_donors, n_tissues, n), 0.003, 3)
    load = {
        name: scale * rng.gamma(2.0, 0.5, (n_assays, k))
        for name, scale in (("shared", 1.0), ("tissue", tissue_scale), ("donor", donor_scale))
    }
    x = donor_tissue_scale * rng.gamma(2.0, 0.5, n_assays)
    signal = (
        0.5
        + np.einsum("ak,kn->an", load["shared"], shared)[None, None]
        + np.einsum("ak,tkn->tan", load["tissue"], tissue)[None]
        + np.einsum("ak,dkn->dan", load["donor"], donor)[:, None]
        + x[None, None, :, None] * donor_tissue[:, :, None]
    )
    gain = np.exp(rng.normal(0.0, batch_sd, n_donors))[:, None, None, None]
    return (signal * gain * rng.lognormal(0.0, noise, signal.shape)).astype(np.float32)


def write_individuals_compendium(
    out: str | Path,
    n_donors: int = 3,
    n_tissues: int = 4,
    n_assays: int = 3,
    n_bins: int = 4000,
    *,
    seed: int = 0,
    assembly: str = "idSyn1",
    chrom: str = "chr1",
    bin_size: int = 25,
    overwrite: bool = False,
    **design: float,
) -> Path:
    """Write a synthetic individuals compendium as pre-binned ``.npy`` tracks with a manifest.

    Layout: ``genomes/<assembly>.chrom.sizes`` (one chromosome of ``n_bins × bin_size`` bases),
    ``tracks/<donor>/<tissue>.<assay>.npy`` (raw signal per bin, float32; ingest applies
    arcsinh), ``manifest.tsv`` with experiment ``<donor>.<tissue>.<assay>``, species
    ``human``, biosample = tissue (``T1``, ...; shared across donors), assay (``A1``, ...),
    category ``histone_modification`` and ``donor`` (``D1``, ...). Ingest it with
    ``epiray ingest --manifest OUT/manifest.tsv --store STORE``.

    Parameters
    ----------
    out
        Output folder.
    n_donors, n_tissues, n_assays, n_bins, seed, **design
        Passed to :func:`simulate_individuals`.
    assembly, chrom, bin_size
        The one-chromosome assembly.
    overwrite
        Replace an existing folder.

    Returns
    -------
    Path
        The manifest.

    Raises
    ------
    InputDataError
        ``out`` exists and is not empty, without ``overwrite``.
    """
    from epiray.manifest import write_manifest

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputDataError(
                f"individuals compendium {out}: folder exists and is not empty; expected a new "
                "folder. Pass overwrite=True to replace it."
            )
        shutil.rmtree(out)
    signal = simulate_individuals(n_donors, n_tissues, n_assays, n_bins, seed=seed, **design)
    atomic_write_text(
        out / "genomes" / f"{assembly}.chrom.sizes", f"{chrom}\t{n_bins * bin_size}\n"
    )
    rows = []
    for d in range(n_donors):
        for t in range(n_tissues):
            for a in range(n_assays):
                donor, tissue, assay = f"D{d + 1}", f"T{t + 1}", f"A{a + 1}"
                rel = Path("tracks") / donor / f"{tissue}.{assay}.npy"
                buf = io.BytesIO()
                np.save(buf, signal[d, t, a])
                atomic_write_bytes(out / rel, buf.getvalue())
                rows.append(
                    {
                        "experiment": f"{donor}.{tissue}.{assay}",
                        "species": "human",
                        "assembly": assembly,
                        "biosample": tissue,
                        "assay": assay,
                        "category": "histone_modification",
                        "path": str(rel),
                        "donor": donor,
                    }
                )
    manifest = out / "manifest.tsv"
    write_manifest(pd.DataFrame(rows), manifest)
    return manifest
