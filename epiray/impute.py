"""Trained models -> imputed tracks: one bigWig per imputed (biosample, assay) pair.

The flow has two phases so that prediction parallelises per chromosome while each bigWig keeps
a single writer (a bigWig is written chromosome by chromosome, in header order, by one writer):

1. **Predict** — one unit of work per chromosome (optionally split into groups of pairs). A unit
   asks ``predictor_for(chrom)`` for the chromosome's trained model, then predicts its pairs in
   batches of ``pair_batch`` pairs × ``chunk_bins`` bins, writing each pair's values into a
   *spill*: ``OUT/.parts/{experiment}/{chrom}.npy`` (float32, arcsinh scale, one value per 25 bp
   bin), a memory-mapped ``.npy`` written under a hidden temporary name and renamed when
   complete. Memory per unit is ``pair_batch × chunk_bins`` floats plus the page cache of the
   spills; never ``pairs × genome``. Units run as Ray tasks (``num_gpus`` per task when the
   cluster has GPUs) or in a plain in-process loop.
2. **Write** — one writer per imputed experiment reads its spills in header order (memory
   mapped; one chromosome in memory at a time), applies the scale and writes
   ``OUT/{biosample}.{assay}.{scale}.bw`` atomically (temporary name, then rename), then the
   sidecar ``OUT/{biosample}.{assay}.{scale}.json`` and removes the spills.

Pairs go through both phases in waves of ``pairs_per_wave`` (default: one wave), which bounds
the spill folder to ``pairs_per_wave × genome bins × 4`` bytes.

The bigWig header lists every chromosome of the assembly (``chrom_sizes`` when given, else the
store's); only the imputed chromosomes carry data, as 25 bp spans (the last bin clipped to the
chromosome end).

Before anything runs, every requested pair is checked against the vocabulary of each
chromosome's model (:class:`ModelScope`): a pair whose biosample or assay the model never saw
is refused (explicit pair list) or left out and recorded in ``OUT/impute.unimputable.json``
(``pairs: unobserved``), so ``epiray info`` tells it apart from unfinished work.

Resume: a bigWig whose sidecar matches the request (model, store hash, scale, chromosomes,
sizes) and whose size equals the recorded one is skipped; finished spills are reused; a bigWig
without its sidecar (a crash between the two renames) is redone. Errors while predicting are
collected per chromosome and raised once as :class:`~epiray.errors.EpirayError` naming each
chromosome, after the other chromosomes' spills are saved, so a resumed run does only the rest.

The model side is one narrow interface, :class:`Predictor`; :class:`ModelPredictor` adapts
trained :class:`~epiray.models.ImputationModel` shards to it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import Field, field_validator

from epiray import __version__
from epiray.config import Section
from epiray.errors import ConfigError, EpirayError, StoreError, collect
from epiray.genome import n_bins, read_chrom_sizes
from epiray.store import Store, atomic_write_text, validate_experiment_id

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "PARTS",
    "ImputeConfig",
    "ImputeResult",
    "ImputedPair",
    "ModelPredictor",
    "ModelScope",
    "UNIMPUTABLE",
    "PairSpec",
    "Predictor",
    "describe_outputs",
    "impute",
    "model_scopes",
    "predict_unit",
    "read_outputs",
    "read_unimputable",
    "resolve_pairs",
    "run_scope",
    "unimputable_pairs",
    "unobserved_pairs",
    "write_experiment",
]

FORMAT = "epiray-impute/1"
PARTS = ".parts"
SPILL_KEY = "key.json"
SCALES = ("arcsinh", "signal")
Scale = Literal["arcsinh", "signal"]
#: Sidecar fields that must equal the request for a finished bigWig to be reused.
MATCH_KEYS = (
    "format",
    "experiment",
    "biosample",
    "assay",
    "assembly",
    "scale",
    "bin_size",
    "chroms",
    "chrom_sizes",
    "model",
    "store_hash",
)


# --------------------------------------------------------------------------------------- config
class PairSpec(Section):
    """One (biosample, assay) pair to impute.

    ``species`` / ``assembly``, when given, must name the target assembly of the run (they
    document a pair list shared between runs and catch a list meant for the other species).
    """

    biosample: str
    assay: str
    species: str | None = None
    assembly: str | None = None


class ImputeConfig(Section):
    """The ``impute`` job: trained per-chromosome models -> imputed bigWigs.

    Attributes
    ----------
    store
        The store the models were trained on (vocabulary, chromosome sizes, store hash).
    output_dir
        Where the bigWigs, their sidecars and the ``.parts`` spill folder go.
    model
        The trained model: a model directory or a tracking run id; or a list of them, an
        **ensemble** whose imputation is the mean of its members' predictions on the arcsinh
        scale (:class:`EnsemblePredictor`; e.g. runs of one config with other seeds, or of
        different models), which imputes the pairs every member can. Recorded in every
        sidecar (:func:`model_label`); the caller turns it into ``predictor_for(chrom)``.
    assembly
        Target assembly (e.g. ``mmSyn1``): the coordinates of the imputed tracks.
    pairs
        ``"unobserved"``: every (biosample, assay) pair of the target assembly not observed in
        the store (biosamples and assays from the store's experiments of that assembly); or an
        explicit list of :class:`PairSpec`. Pairs the model cannot impute (a biosample or
        assay it never saw) are an error in a list, and left out with a warning (recorded for
        ``epiray info``) from ``"unobserved"``; see :func:`impute`.
    zero_shot_assays
        With ``"unobserved"``: also impute assays seen only in other species of the store.
    chroms
        ``"all"`` (every chromosome stored for the assembly), ``"primary"``, ``"autosomes+X"``
        or an explicit list.
    chrom_sizes
        Optional UCSC ``.chrom.sizes`` of the full assembly for the bigWig header (default: the
        chromosomes stored for the assembly). Must agree with the store on shared chromosomes.
    scale
        ``arcsinh`` (the model's scale) or ``signal`` (``sinh`` back-transform).
    chunk_bins, pair_batch
        Bins and pairs per predictor call: memory per call is ``pair_batch × chunk_bins``
        float32 values.
    pairs_per_task
        Pairs per unit of work (one model load each); ``None``: every pair of a chromosome in
        one unit.
    pairs_per_wave
        Impute the pairs in waves of this many (predict every chromosome, write the bigWigs,
        drop the spills, next wave): bounds the spill folder to ``pairs_per_wave × genome
        bins × 4`` bytes (all pairs at once need ``pairs × bins × 4``, e.g. 120 M bins of a
        human genome are 480 MB per pair). ``None``: one wave.
    executor
        ``ray``: Ray tasks (a local runtime is started if none is running); ``local``: an
        in-process loop; ``auto``: Ray when it is initialised, else local.
    num_cpus, num_gpus
        Resources per prediction task; ``num_gpus: auto`` asks for 1 GPU when the cluster has
        any, else 0.
    overwrite, resume
        Existing outputs of requested pairs raise unless one is set: ``overwrite`` deletes them
        first; ``resume`` keeps finished bigWigs and spills and does the rest.
    keep_parts
        Keep the spills after each bigWig is written (they allow another ``scale`` without
        predicting again).
    autocast
        Arithmetic of the predictions (:class:`ModelPredictor`): ``off`` (the default: float32,
        so the bigWigs equal the model's float32 predictions), ``auto`` (bf16 where native and
        faster, as in training) or ``bf16`` (about 0.4 % of a value of bf16 rounding).
    """

    store: str
    output_dir: str
    model: str | list[str]
    assembly: str
    pairs: Literal["unobserved"] | list[PairSpec] = "unobserved"
    zero_shot_assays: bool = False
    chroms: Literal["all", "primary", "autosomes+X"] | list[str] = "all"
    chrom_sizes: str | None = None
    scale: Scale = "arcsinh"
    chunk_bins: int = Field(262_144, ge=1)
    pair_batch: int = Field(16, ge=1)
    pairs_per_task: int | None = Field(None, ge=1)
    pairs_per_wave: int | None = Field(None, ge=1)
    executor: Literal["auto", "ray", "local"] = "auto"
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | Literal["auto"] = "auto"
    overwrite: bool = False
    resume: bool = False
    keep_parts: bool = False
    autocast: Literal["auto", "bf16", "off"] = "off"

    @field_validator("autocast", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        from epiray.precision import yaml_off

        return yaml_off(v)

    @field_validator("model")
    @classmethod
    def _members(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError(
                "an empty list; expected a trained model, or a list of two or more to average"
            )
        twice = sorted({m for m in v if v.count(m) > 1})
        if twice:
            raise ValueError(
                f"{twice} listed more than once; expected each ensemble member once (a run "
                "listed twice would count double in the mean)"
            )
        return v[0] if len(v) == 1 else list(v)

    @property
    def model_label(self) -> str:
        """:attr:`model` in words (:func:`model_label`)."""
        return model_label(self.model)


def model_label(model: str | Sequence[str]) -> str:
    """A model as sidecars, messages and ``epiray info`` name it: the model itself, or for an
    ensemble ``mean of N models (a, b, ...)``."""
    if isinstance(model, str):
        return model
    return f"mean of {len(model)} models ({', '.join(model)})"


# --------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class ImputedPair:
    """A (biosample, assay) pair to impute on the target assembly.

    Attributes
    ----------
    biosample, assay
        Names as in the store.
    category
        Activity category of the assay (from the store's experiments).
    species, assembly
        Target species and assembly.
    observed
        The pair is an experiment of the store (imputing it is allowed, e.g. for comparison).
    zero_shot
        The assay was never observed in the target assembly (only in another species).
    """

    biosample: str
    assay: str
    category: str
    species: str
    assembly: str
    observed: bool = False
    zero_shot: bool = False

    @property
    def experiment(self) -> str:
        """``{biosample}.{assay}``: the name of the imputed experiment."""
        return f"{self.biosample}.{self.assay}"

    def filename(self, scale: str) -> str:
        """``{biosample}.{assay}.{scale}.bw``."""
        return f"{self.experiment}.{scale}.bw"


def _assay_categories(store: Store, assembly: str) -> dict[str, str]:
    """Assay -> category; the target assembly's records win over other species'."""
    exps = store.experiments()
    cats: dict[str, str] = {}
    target = exps[exps["assembly"] == assembly]
    for df in (target, exps[exps["assembly"] != assembly]):
        for a, c in zip(df["assay"], df["category"]):
            cats.setdefault(str(a), str(c) if c else "other")
    return cats


def unobserved_pairs(
    store: Store, assembly: str, *, zero_shot_assays: bool = False
) -> list[ImputedPair]:
    """Every (biosample, assay) pair of ``assembly`` that the store does not observe.

    Parameters
    ----------
    store
        The store.
    assembly
        Target assembly; its biosamples and assays are those of its experiments in the store.
    zero_shot_assays
        Also pair the biosamples with assays observed only in other assemblies of the store.

    Returns
    -------
    list of ImputedPair
        Sorted by (biosample, assay).

    Raises
    ------
    StoreError
        The assembly is not in the store or has no experiments.
    """
    asm = store.assembly(assembly)
    exps = store.experiments()
    target = exps[exps["assembly"] == assembly]
    if target.empty:
        raise StoreError(
            f"store {store.root}: assembly {assembly!r} has no experiments; expected at least "
            "one to define its biosamples and assays. Ingest experiments of that assembly."
        )
    biosamples = sorted(set(target["biosample"].astype(str)))
    own = set(target["assay"].astype(str))
    assays = set(own)
    if zero_shot_assays:
        assays |= set(exps["assay"].astype(str))
    observed = set(zip(target["biosample"].astype(str), target["assay"].astype(str)))
    cats = _assay_categories(store, assembly)
    return [
        ImputedPair(b, a, cats.get(a, "other"), asm.species, assembly, False, a not in own)
        for b in biosamples
        for a in sorted(assays)
        if (b, a) not in observed
    ]


def resolve_pairs(store: Store, cfg: ImputeConfig) -> list[ImputedPair]:
    """The pairs ``cfg`` asks for, validated against the store (every problem at once).

    Raises
    ------
    ConfigError
        Unknown biosample or assay, a pair for another assembly/species, a duplicate, or a name
        that cannot name a file.
    """
    asm = store.assembly(cfg.assembly)
    if cfg.pairs == "unobserved":
        pairs = unobserved_pairs(store, cfg.assembly, zero_shot_assays=cfg.zero_shot_assays)
    else:
        exps = store.experiments()
        target = exps[exps["assembly"] == cfg.assembly]
        biosamples = set(target["biosample"].astype(str))
        own = set(target["assay"].astype(str))
        every = set(exps["assay"].astype(str))
        observed = set(zip(target["biosample"].astype(str), target["assay"].astype(str)))
        cats = _assay_categories(store, cfg.assembly)
        problems: list[str] = []
        pairs, seen = [], set()
        for i, p in enumerate(cfg.pairs):
            where = f"pairs[{i}] ({p.biosample}, {p.assay})"
            if p.assembly is not None and p.assembly != cfg.assembly:
                problems.append(
                    f"{where}: assembly {p.assembly!r}; expected the run's assembly "
                    f"{cfg.assembly!r}. Impute other assemblies in their own run."
                )
            if p.species is not None and p.species != asm.species:
                problems.append(
                    f"{where}: species {p.species!r}; expected {asm.species!r} (assembly "
                    f"{cfg.assembly}). Impute other species in their own run."
                )
            if p.biosample not in biosamples:
                problems.append(
                    f"{where}: unknown biosample for assembly {cfg.assembly}; expected one of "
                    f"{sorted(biosamples)[:12]}{' ...' if len(biosamples) > 12 else ''}."
                )
            if p.assay not in every:
                problems.append(
                    f"{where}: unknown assay; expected one of {sorted(every)[:12]}"
                    f"{' ...' if len(every) > 12 else ''}."
                )
            if (p.biosample, p.assay) in seen:
                problems.append(f"{where}: listed twice; expected each pair once.")
            seen.add((p.biosample, p.assay))
            pairs.append(
                ImputedPair(
                    p.biosample,
                    p.assay,
                    cats.get(p.assay, "other"),
                    asm.species,
                    cfg.assembly,
                    (p.biosample, p.assay) in observed,
                    p.assay not in own,
                )
            )
        collect(problems, f"impute {cfg.output_dir}: pair list", ConfigError)
    problems = [
        f"pair ({p.biosample}, {p.assay}): {msg}"
        for p in pairs
        if (msg := validate_experiment_id(p.experiment))
    ]
    collect(problems, f"impute {cfg.output_dir}: output names", ConfigError)
    return sorted(pairs, key=lambda p: (p.biosample, p.assay))


# --------------------------------------------------------------------------------------- model
@runtime_checkable
class Predictor(Protocol):
    """One trained model for one chromosome, as imputation sees it.

    ``predictor_for(chrom)`` returns a ``Predictor`` (or a plain callable with the signature of
    :meth:`predict_chrom`). It runs inside the prediction task, so loading happens on the
    task's device; it must be picklable (a module-level function or class, or a
    ``functools.partial`` of one) to travel to Ray tasks. A chromosome without a model must
    raise (it is reported as an error naming the chromosome, never left as a hole).
    """

    def predict_chrom(
        self, chrom: str, pairs: Sequence[tuple[str, str]], lo: int, hi: int
    ) -> np.ndarray:
        """Imputed values of ``pairs`` over bins ``[lo, hi)`` of ``chrom``.

        Parameters
        ----------
        chrom
            Chromosome of the target assembly.
        pairs
            ``(biosample, assay)`` names.
        lo, hi
            Bin range (25 bp bins, 0-based half-open).

        Returns
        -------
        numpy.ndarray
            float32 ``[len(pairs), hi - lo]``, arcsinh scale.
        """
        ...


PredictorFor = Callable[[str], Any]


class ModelPredictor:
    """A :class:`Predictor` over trained :class:`~epiray.models.ImputationModel` shards.

    A chromosome may be trained by several workers, each owning bins ``[lo, hi)`` of it (its
    own genome factors); the shards must tile ``[0, n_bins)``. The model contract predicts a
    shard's whole slab at once, so the predictions of the pairs of the latest call are kept
    (``len(pairs) × n_bins`` float32 on the host, i.e. ``ImputeConfig.pair_batch`` tracks) and
    later chunks of the same pairs are slices of them.

    Parameters
    ----------
    shards
        ``(model, data)`` per slab: the trained model and the :class:`~epiray.models.ChromData`
        it was built for (only ``chrom``, ``lo``, ``hi``, ``n_bins`` and the device are used).
    autocast
        ``off`` (float32), ``bf16``, or ``auto``: bf16 autocast on CUDA and on a CPU with native
        bf16 units where a probe finds it faster (:func:`epiray.precision.resolve_autocast`),
        as in training. bf16 predictions differ from float32 ones by bf16 rounding (about
        0.4 % of a value; ``tests/test_impute.py`` bounds it).
    calibration, average_activity
        A run trained with ``validation.calibrate``: its
        :class:`~epiray.calibration.Calibration`, and ``assay -> AA over the chromosome``
        (None for an assay without observed tracks); imputations are ``w · model + (1 − w) ·
        AA`` (:func:`epiray.calibration.blend`), as the run's own held-out predictions.

    Raises
    ------
    EpirayError
        The shards are empty, from different chromosomes, or do not tile the chromosome.
    """

    def __init__(
        self,
        shards: Sequence[tuple[Any, Any]],
        autocast: str = "off",
        calibration: Any = None,
        average_activity: Callable[[str], np.ndarray | None] | None = None,
    ) -> None:
        self.autocast = autocast
        self.calibration = calibration
        self.average_activity = average_activity
        if calibration is not None and average_activity is None:
            raise EpirayError(
                "ModelPredictor: a calibration without average_activity; expected the "
                "reader of the assays' average activity it blends with "
                "(epiray.calibration.AverageActivityReader)."
            )
        self.precision = None  # resolved at the first prediction, on the shards' device
        if not shards:
            raise EpirayError(
                "ModelPredictor: no model shards; expected at least one (model, data) pair. "
                "Load the chromosome's checkpoints first."
            )
        self.shards = sorted(shards, key=lambda s: s[1].lo)
        chroms = {d.chrom for _, d in self.shards}
        self.chrom = self.shards[0][1].chrom
        self.n_bins = int(self.shards[0][1].n_bins)
        edges = [(d.lo, d.hi) for _, d in self.shards]
        tiles = all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
        if len(chroms) > 1 or edges[0][0] != 0 or edges[-1][1] != self.n_bins or not tiles:
            raise EpirayError(
                f"ModelPredictor chroms {sorted(chroms)}: shards cover bins {edges}; expected "
                f"one chromosome tiled from 0 to n_bins = {self.n_bins} without gaps. Load "
                "every worker's checkpoint of the chromosome."
            )
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def _full(self, pair: tuple[str, str]) -> np.ndarray:
        from epiray.precision import resolve_autocast

        out = np.empty(self.n_bins, dtype=np.float32)
        for model, data in self.shards:
            if self.precision is None:
                self.precision = resolve_autocast(
                    self.autocast, data.device, what=f"predict:{model.name}"
                )
                log.info("impute %s with %s: %s", self.chrom, model.name, self.precision.reason)
            b = model.vocab.biosample_index(pair[0])
            a = model.vocab.assay_index(pair[1])
            model.eval()
            with self.precision.context():
                pred = model.predict(data, b, a)
            out[data.lo : data.hi] = pred.float().cpu().numpy()
        if self.calibration is not None:
            from epiray.calibration import blend

            out = blend(out, self.average_activity(pair[1]), self.calibration.weight)
            out = np.asarray(out, dtype=np.float32)
        return out

    def predict_chrom(
        self, chrom: str, pairs: Sequence[tuple[str, str]], lo: int, hi: int
    ) -> np.ndarray:
        """See :meth:`Predictor.predict_chrom`.

        Raises
        ------
        EpirayError
            ``chrom`` is not the shards' chromosome, or a name is not in the vocabulary (one
            error naming every such pair, before predicting any).
        """
        if chrom != self.chrom:
            raise EpirayError(
                f"ModelPredictor chrom {self.chrom!r}: asked for chrom {chrom!r}; expected "
                f"{self.chrom!r}. Load the model of that chromosome."
            )
        keys = [tuple(p) for p in pairs]
        vocab = self.shards[0][0].vocab
        bad = [
            f"({b}, {a}): unknown "
            + " and ".join(
                f"{kind} {name!r}"
                for kind, name, known in (
                    ("biosample", b, vocab.biosamples),
                    ("assay", a, vocab.assays),
                )
                if name not in known
            )
            for b, a in keys
            if b not in vocab.biosamples or a not in vocab.assays
        ]
        if bad:
            raise EpirayError(
                f"impute chrom {chrom!r}: the model cannot impute {_short(bad, 8)}; expected "
                f"names among its {len(vocab.biosamples)} biosamples and {len(vocab.assays)} "
                "assays (it has no factors for others). Impute assays only another species "
                f"measured with a cross-species model (e.g. {_CROSS_SPECIES_CONFIG}), train "
                "again for names added to the store since, or leave those pairs out."
            )
        self._cache = {k: v for k, v in self._cache.items() if k in keys}
        for k in keys:
            if k not in self._cache:
                self._cache[k] = self._full(k)
        if not keys:
            return np.empty((0, hi - lo), dtype=np.float32)
        return np.stack([self._cache[k][lo:hi] for k in keys])


class EnsemblePredictor:
    """A :class:`Predictor` that averages the predictions of several trained models of one
    chromosome (``ImputeConfig.model`` as a list).

    The mean is taken on the arcsinh scale, the scale the models are trained and scored on (it
    is the prediction that minimises the members' mean squared error there), in float64 and
    returned as float32. Averaging runs that differ only in their seed removes most of the
    seed-to-seed spread of small compendia (``benchmarks/RESULTS.md``, "Seed ensembles"); it
    costs one training per member and, here, each member's prediction memory (a
    :class:`ModelPredictor` keeps ``pair_batch`` whole-chromosome tracks).

    Parameters
    ----------
    members
        Predictors of the same chromosome (or plain callables with the signature of
        :meth:`Predictor.predict_chrom`).
    names
        The members' names, for errors (default: ``member 1``, ...).

    Raises
    ------
    EpirayError
        No members, or ``names`` of another length.
    """

    def __init__(self, members: Sequence[Any], names: Sequence[str] | None = None) -> None:
        if not members:
            raise EpirayError(
                "EnsemblePredictor: no members; expected at least one trained model."
            )
        self.members = list(members)
        self.names = (
            list(names)
            if names is not None
            else [f"member {i + 1}" for i in range(len(self.members))]
        )
        if len(self.names) != len(self.members):
            raise EpirayError(
                f"EnsemblePredictor: {len(self.names)} names for {len(self.members)} members; "
                "expected one name per member."
            )

    def predict_chrom(
        self, chrom: str, pairs: Sequence[tuple[str, str]], lo: int, hi: int
    ) -> np.ndarray:
        """The members' mean (see :meth:`Predictor.predict_chrom`).

        Raises
        ------
        EpirayError
            A member returns another shape than ``[len(pairs), hi - lo]`` (named, with the
            chromosome).
        """
        total = None
        want = (len(pairs), hi - lo)
        for member, name in zip(self.members, self.names):
            call = getattr(member, "predict_chrom", member)
            got = np.asarray(call(chrom, pairs, lo, hi), dtype=np.float64)
            if got.shape != want:
                raise EpirayError(
                    f"impute chrom {chrom!r}: ensemble member {name} returned shape "
                    f"{got.shape} for bins [{lo}, {hi}); expected {want}, as every member. "
                    "Check that the member is a model of this chromosome."
                )
            total = got if total is None else total + got
        return (total / len(self.members)).astype(np.float32)


# --------------------------------------------------------------------------------------- scope
#: Where :func:`impute` records the requested pairs the model cannot impute (``epiray info``).
UNIMPUTABLE = "impute.unimputable.json"
UNIMPUTABLE_FORMAT = "epiray-impute-unimputable/1"
#: The final checkpoint of an ``epiray train`` run (as :func:`epiray.train.final_checkpoint`;
#: read here without importing the training stack, so ``epiray info`` stays fast).
_FINAL_GLOB, _META = "epoch*_final", "meta.json"
_CROSS_SPECIES_CONFIG = "configs/train_avocado_cross_species.yaml"


@dataclass(frozen=True)
class ModelScope:
    """What the trained model of one chromosome can impute.

    A model imputes a (biosample, assay) pair only if it has factors (Avocado) or global
    embeddings (eDICE) for both names, i.e. both are in its vocabulary. A mouse-only model's
    vocabulary holds the mouse biosamples and assays of its store; a cross-species model's also
    the other species' assays (and biosamples), which is how it imputes assays never measured
    in mouse. A name in the vocabulary whose every experiment was held out (a zero-shot fold)
    has factors that were never fitted: the model predicts it, without data for it.

    Attributes
    ----------
    chrom
        Chromosome of the model.
    source
        Where it was read (the run directory), for messages.
    description
        The model in words (name, variant, fold), for messages.
    biosamples, assays
        Its vocabulary.
    assembly
        Target assembly it was trained for, if known.
    cross_species
        Its vocabulary holds experiments of more than one species.
    fitted_biosamples, fitted_assays
        The names some training (or validation, or other-species) experiment covered; None
        when unknown.
    """

    chrom: str
    source: str
    description: str
    biosamples: frozenset[str]
    assays: frozenset[str]
    assembly: str | None = None
    cross_species: bool = False
    fitted_biosamples: frozenset[str] | None = None
    fitted_assays: frozenset[str] | None = None

    def missing(self, biosample: str, assay: str) -> list[str]:
        """``"biosample"`` and/or ``"assay"``: the names of the pair the model never saw."""
        return [
            kind
            for kind, name, known in (
                ("biosample", biosample, self.biosamples),
                ("assay", assay, self.assays),
            )
            if name not in known
        ]

    def unfitted(self, biosample: str, assay: str) -> list[str]:
        """The names of the pair in the vocabulary that no training experiment covered."""
        out = []
        if self.fitted_biosamples is not None and biosample not in self.fitted_biosamples:
            out.append(f"biosample {biosample}")
        if self.fitted_assays is not None and assay not in self.fitted_assays:
            out.append(f"assay {assay}")
        return out

    @classmethod
    def from_vocabulary(cls, vocab: Any, chrom: str, source: str) -> ModelScope:
        """The scope of a :class:`~epiray.models.Vocabulary` (or its ``to_dict`` form)."""
        get = vocab.get if isinstance(vocab, Mapping) else lambda k, d=None: getattr(vocab, k, d)
        exps = get("experiments") or {}
        species = {str(k[2]) for k in exps.values()}
        return cls(
            chrom=chrom,
            source=source,
            description=f"vocabulary of {len(get('biosamples'))} biosamples and "
            f"{len(get('assays'))} assays",
            biosamples=frozenset(map(str, get("biosamples"))),
            assays=frozenset(map(str, get("assays"))),
            assembly=get("assembly"),
            cross_species=len(species) > 1,
        )

    @classmethod
    def common(cls, scopes: Sequence[ModelScope], source: str) -> ModelScope:
        """The scope of an ensemble of ``scopes`` (one chromosome): what every member can
        impute. A name counts as fitted only where every member fitted it; the ensemble is
        cross-species when every member is; members of other assemblies than the first are
        named in ``assembly`` (``a,b``), which the assembly check then refuses."""

        def meet(sets):
            return None if any(x is None for x in sets) else frozenset.intersection(*sets)

        assemblies = sorted({s.assembly for s in scopes if s.assembly})
        return cls(
            chrom=scopes[0].chrom,
            source=source,
            description=f"mean of {len(scopes)}: " + "; ".join(s.description for s in scopes),
            biosamples=meet([s.biosamples for s in scopes]),
            assays=meet([s.assays for s in scopes]),
            assembly=",".join(assemblies) or None,
            cross_species=all(s.cross_species for s in scopes),
            fitted_biosamples=meet([s.fitted_biosamples for s in scopes]),
            fitted_assays=meet([s.fitted_assays for s in scopes]),
        )

    @classmethod
    def from_run_meta(cls, meta: Mapping[str, Any], chrom: str, source: str) -> ModelScope:
        """The scope of an ``epiray train`` checkpoint's ``meta.json``."""
        base = cls.from_vocabulary(meta["vocab"], chrom, source)
        vocab = meta["vocab"]
        bios, assays, exps = vocab["biosamples"], vocab["assays"], vocab.get("experiments") or {}
        fitted = None
        if isinstance(meta.get("train"), list):
            fitted = [
                exps[e]
                for e in [*meta["train"], *(meta.get("aux") or []), *(meta.get("validate") or [])]
                if e in exps
            ]
        variant = (meta.get("params") or {}).get("variant")
        words = [str(meta.get("model") or "model")]
        if variant:
            words.append(str(variant))
        if meta.get("fold") not in (None, "all"):
            words.append(f"fold {meta['fold']}")
        cal = meta.get("calibration")
        return ModelScope(
            chrom=chrom,
            source=source,
            description=f"{' '.join(words)}; {len(bios)} biosamples, {len(assays)} assays"
            + (", cross-species" if base.cross_species else "")
            + (
                f", blended with average activity (model weight {float(cal['weight']):.2f})"
                if isinstance(cal, dict) and "weight" in cal
                else ""
            ),
            biosamples=base.biosamples,
            assays=base.assays,
            assembly=meta.get("assembly") or base.assembly,
            cross_species=base.cross_species,
            fitted_biosamples=None if fitted is None else frozenset(bios[k[0]] for k in fitted),
            fitted_assays=None if fitted is None else frozenset(assays[k[1]] for k in fitted),
        )


def _run_meta(run_dir: Path) -> dict[str, Any] | None:
    """``meta.json`` of the final checkpoint of a run directory, or None."""
    finals = sorted(run_dir.glob(_FINAL_GLOB)) if run_dir.is_dir() else []
    meta = _read_json(finals[-1] / _META) if finals else None
    return meta if isinstance(meta, dict) and isinstance(meta.get("vocab"), dict) else None


def run_scope(model: str | Sequence[str], chrom: str) -> ModelScope | None:
    """The scope of ``epiray train``'s run ``model.format(chrom=chrom)`` (for a list, an
    ensemble: :meth:`ModelScope.common` of its members').

    Returns None when ``model`` is not a run directory pattern with ``{chrom}`` or the run has
    no final checkpoint (the loader reports that when it is asked for the model); for an
    ensemble, when that holds for any member.
    """
    if not isinstance(model, str):
        scopes = [run_scope(m, chrom) for m in model]
        if not scopes or any(sc is None for sc in scopes):
            return None
        return ModelScope.common(scopes, model_label(model))
    if "{chrom}" not in model:
        return None
    try:
        run = Path(model.format(chrom=chrom))
    except (KeyError, IndexError, ValueError):
        return None
    meta = _run_meta(run)
    if meta is None:
        return None
    try:
        return ModelScope.from_run_meta(meta, chrom, str(run))
    except (KeyError, IndexError, TypeError):
        return None


def _pattern_of(predictor_for: Any, model: str | list[str]) -> str | list[str]:
    """The run pattern(s) ``predictor_for`` loads: ``functools.partial(load_predictor, P)`` ->
    P."""
    func = getattr(predictor_for, "func", None)
    args = getattr(predictor_for, "args", ())
    if (
        getattr(func, "__name__", "") == "load_predictor"
        and args
        and isinstance(args[0], (str, list, tuple))
    ):
        return args[0]
    return model


def model_scopes(
    cfg: ImputeConfig, chroms: Sequence[str], predictor_for: PredictorFor | None = None
) -> dict[str, ModelScope]:
    """The scope of the model of every chromosome that can be read before predicting.

    ``predictor_for`` with a ``vocabulary(chrom)`` method (returning a
    :class:`~epiray.models.Vocabulary`, or None when unknown) is asked; otherwise
    ``cfg.model`` (or the pattern of ``functools.partial(load_predictor, pattern)``) is read
    as ``epiray train`` run directories, ``{chrom}`` standing for the chromosome. Chromosomes
    whose model cannot be read are left out (loading it reports why).
    """
    hook = getattr(predictor_for, "vocabulary", None)
    scopes: dict[str, ModelScope] = {}
    for chrom in chroms:
        if callable(hook):
            try:
                vocab = hook(chrom)
            except Exception as e:  # reported by the loader, in the task, naming the chrom
                log.debug("impute: no vocabulary for %s before predicting: %s", chrom, e)
                continue
            if vocab is not None:
                scopes[chrom] = ModelScope.from_vocabulary(vocab, chrom, cfg.model_label)
            continue
        scope = run_scope(_pattern_of(predictor_for, cfg.model), chrom)
        if scope is not None:
            scopes[chrom] = scope
    return scopes


def _short(names: Sequence[str], n: int = 6) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def unimputable_pairs(
    pairs: Sequence[ImputedPair], scopes: Mapping[str, ModelScope], model: str | Sequence[str]
) -> list[dict[str, Any]]:
    """The pairs some chromosome's model cannot impute, one record each (JSON-ready).

    Each record: ``experiment``, ``biosample``, ``assay``, ``assembly``, ``zero_shot``,
    ``missing`` (``"biosample"`` / ``"assay"``), ``chroms`` (those whose model lacks it, of
    ``checked``), ``model``, ``cross_species`` (the model is) and ``reason`` (one phrase).
    """
    out = []
    cross = any(s.cross_species for s in scopes.values())
    # the chromosomes of a run share one vocabulary: check each distinct one once
    vocabs: dict[tuple[frozenset[str], frozenset[str]], list[str]] = {}
    for chrom, scope in scopes.items():
        vocabs.setdefault((scope.biosamples, scope.assays), []).append(chrom)
    for p in pairs:
        missing: dict[str, list[str]] = {}
        for (bios, assays), chroms in vocabs.items():
            if p.biosample not in bios:
                missing.setdefault("biosample", []).extend(chroms)
            if p.assay not in assays:
                missing.setdefault("assay", []).extend(chroms)
        if not missing:
            continue
        chroms = sorted({c for cs in missing.values() for c in cs}, key=list(scopes).index)
        out.append(
            {
                "experiment": p.experiment,
                "biosample": p.biosample,
                "assay": p.assay,
                "assembly": p.assembly,
                "zero_shot": p.zero_shot,
                "missing": [k for k in ("biosample", "assay") if k in missing],
                "chroms": chroms,
                "checked": len(scopes),
                "model": model_label(model),
                "cross_species": cross,
                "reason": _reason(
                    p.zero_shot, [k for k in ("biosample", "assay") if k in missing]
                ),
            }
        )
    return out


def _reason(zero_shot: bool | None, missing: Sequence[str]) -> str:
    """Why the model cannot impute a pair (``zero_shot`` None: not known)."""
    if list(missing) == ["assay"] and zero_shot:
        return "assay never seen by this model (only another species measured it)"
    return " and ".join(missing) + " never seen by this model"


def _groups(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The entries per missing name (``"assay GATA1"``, ``"biosample B and assay A"``)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for e in entries:
        names = [f"{k} {e[k]}" for k in e.get("missing", [])] or ["pair"]
        groups.setdefault(" and ".join(names), []).append(e)
    return groups


def _group_lines(entries: Sequence[Mapping[str, Any]], indent: str) -> list[str]:
    """One line per missing name: why, the pairs it blocks (shortened), on which chroms."""
    groups = _groups(entries)
    lines = []
    for i, (what, es) in enumerate(groups.items()):
        if i == 12:
            lines.append(f"{indent}... and {len(groups) - 12} more names")
            break
        pairs = _short([f"({e['biosample']}, {e['assay']})" for e in es])
        chroms = es[0].get("chroms") or []
        where = ""
        if 0 < len(chroms) < int(es[0].get("checked") or 0):
            where = f" (models of {', '.join(chroms)} only)"
        lines.append(f"{indent}{what}: {es[0]['reason']}{where}: {len(es)} pairs {pairs}")
    return lines


def unimputable_advice(
    entries: Sequence[Mapping[str, Any]], drop: str = "or leave them out of the request"
) -> str:
    """What would impute the pairs of ``entries`` (records of :func:`unimputable_pairs`),
    ending with ``drop`` (how not to ask for them)."""
    cross = any(e.get("cross_species") for e in entries)
    assays = [e for e in entries if "assay" in e["missing"]]
    zs = sorted({e["assay"] for e in assays if e.get("zero_shot")})
    own = sorted({e["assay"] for e in assays if e.get("zero_shot") is False})
    unknown = sorted({e["assay"] for e in assays if e.get("zero_shot") is None})
    bios = sorted({e["biosample"] for e in entries if "biosample" in e["missing"]})
    other = (
        f"train a cross-species model (e.g. {_CROSS_SPECIES_CONFIG}), which learns them from "
        "that species' tracks through synteny, and impute with it"
        if not cross
        else "this cross-species model was trained without them: train it again on the "
        "current store"
    )
    transfer = (
        "train again on the current store, or add them by transfer (Vocabulary.extend and the "
        "model's extend fit only their new factors)"
    )
    tips = []
    if zs:
        tips.append(f"assays only another species measured ({_short(zs)}): {other}")
    if unknown:
        tips.append(
            f"assays {_short(unknown)}: if only another species measured them, {other}; "
            f"else {transfer}"
        )
    if own:
        tips.append(
            f"assays the model was trained without ({_short(own)}; added to the store since, "
            f"or another store): {transfer}"
        )
    if bios:
        tips.append(f"biosamples the model was trained without ({_short(bios)}): {transfer}")
    tips.append(drop)
    return "To impute them: " + "; ".join(tips) + "."


def _scope_words(scopes: Mapping[str, ModelScope]) -> str:
    desc = list(dict.fromkeys(s.description for s in scopes.values()))
    return "; ".join(desc[:3]) + (" ..." if len(desc) > 3 else "")


def _check_models(
    cfg: ImputeConfig, pairs: list[ImputedPair], scopes: Mapping[str, ModelScope], out: Path
) -> tuple[list[ImputedPair], list[dict[str, Any]]]:
    """Split ``pairs`` into those every chromosome's model can impute and records of the rest.

    Raises
    ------
    ConfigError
        A model trained for another assembly; with an explicit pair list, any pair a model
        cannot impute (listed with what would impute it); with ``unobserved``, when no pair is
        left.
    """
    other = {c: s.assembly for c, s in scopes.items() if s.assembly and s.assembly != cfg.assembly}
    if other:
        raise ConfigError(
            f"impute {out}: model {cfg.model_label} was trained for assembly "
            f"{sorted(set(other.values()))} (chroms {sorted(other)}); expected assembly "
            f"{cfg.assembly}. Use a model trained on {cfg.assembly}, or set assembly."
        )
    if not scopes:
        return pairs, []
    bad = unimputable_pairs(pairs, scopes, cfg.model_label)
    names = {e["experiment"] for e in bad}
    keep = [p for p in pairs if p.experiment not in names]
    if cfg.pairs != "unobserved":
        drop = "or leave them out of pairs"
    elif cfg.zero_shot_assays and any(e["zero_shot"] for e in bad):
        drop = "or set zero_shot_assays: false not to ask for them"
    else:
        drop = "or list the pairs to impute in pairs"
    if bad and (cfg.pairs != "unobserved" or not keep):
        what = " (no unobserved pair is left)" if cfg.pairs == "unobserved" else ""
        raise ConfigError(
            "\n".join(
                [
                    f"impute {out}: {len(bad)} of {len(pairs)} requested pairs cannot be "
                    f"imputed by model {cfg.model_label} ({_scope_words(scopes)}){what}; "
                    "expected "
                    "every pair's biosample and assay among those the model has factors for. "
                    "Nothing was written.",
                    *_group_lines(bad, "  - "),
                    unimputable_advice(bad, drop),
                ]
            )
        )
    if bad:
        counts = [f"{what} ({len(es)} pairs)" for what, es in _groups(bad).items()]
        log.warning(
            "impute %s: leaving out %d of %d unobserved pairs that model %s cannot impute: "
            "%s. %s `epiray info %s` lists them.",
            out,
            len(bad),
            len(pairs),
            cfg.model_label,
            _short(counts),
            unimputable_advice(bad, drop),
            out,
        )
    # a run's vocabulary and experiment roles are the same on every chromosome
    first = next(iter(scopes.values()))
    unfitted = {p.experiment: first.unfitted(p.biosample, p.assay) for p in keep}
    unfitted = {k: v for k, v in unfitted.items() if v}
    if unfitted:
        log.warning(
            "impute %s: %s of model %s were in no training experiment (held out by its fold): "
            "their factors were never fitted, so those %d pairs are its guess without data "
            "for them",
            out,
            _short(sorted({n for v in unfitted.values() for n in v})),
            cfg.model_label,
            len(unfitted),
        )
    return keep, bad


def read_unimputable(path: str | Path) -> list[dict[str, Any]]:
    """The records of requested pairs the model could not impute in an output folder
    (:data:`UNIMPUTABLE`); empty when there are none or the file is unreadable."""
    data = _read_json(Path(path) / UNIMPUTABLE)
    if not isinstance(data, dict) or data.get("format") != UNIMPUTABLE_FORMAT:
        return []
    return [e for e in data.get("pairs", []) if isinstance(e, dict) and "experiment" in e]


def _update_unimputable(
    out: Path, requested: Sequence[ImputedPair], bad: Sequence[Mapping[str, Any]]
) -> None:
    """Record ``bad`` in :data:`UNIMPUTABLE`; forget earlier records of the other requested
    pairs (imputable now); keep records of pairs this run did not ask for."""
    old = read_unimputable(out)
    asked = {p.experiment for p in requested}
    new = [e for e in old if e["experiment"] not in asked] + [dict(e) for e in bad]
    new.sort(key=lambda e: e["experiment"])
    path = out / UNIMPUTABLE
    if new == old and (bool(new) == path.is_file()):
        return
    if not new:
        path.unlink(missing_ok=True)
        return
    atomic_write_text(
        path,
        json.dumps({"format": UNIMPUTABLE_FORMAT, "pairs": new}, indent=1, sort_keys=True),
    )


# --------------------------------------------------------------------------------------- paths
def _parts_dir(out: Path, experiment: str) -> Path:
    return out / PARTS / experiment


def _spill_path(out: Path, experiment: str, chrom: str) -> Path:
    return _parts_dir(out, experiment) / f"{chrom}.npy"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _spill_ok(path: Path, n: int) -> bool:
    """A finished spill: a readable float32 ``.npy`` of ``n`` values."""
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.dtype == np.float32 and arr.shape == (n,)


# --------------------------------------------------------------------------------------- plan
@dataclass
class _Plan:
    out: Path
    store_root: str
    store_hash: str
    assembly: str
    species: str
    bin_size: int
    scale: str
    model: str
    chroms: list[str]
    header: dict[str, int]
    pairs: list[ImputedPair]
    todo: list[ImputedPair] = field(default_factory=list)
    skipped: list[ImputedPair] = field(default_factory=list)
    #: every pair asked for, and the records of those the model cannot impute (left out)
    requested: list[ImputedPair] = field(default_factory=list)
    unimputable: list[dict[str, Any]] = field(default_factory=list)

    def n_bins(self, chrom: str) -> int:
        return n_bins(self.header[chrom], self.bin_size)

    def key(self, pair: ImputedPair) -> dict[str, Any]:
        """The sidecar fields that identify a finished output."""
        return {
            "format": FORMAT,
            "experiment": pair.experiment,
            "biosample": pair.biosample,
            "assay": pair.assay,
            "assembly": self.assembly,
            "scale": self.scale,
            "bin_size": self.bin_size,
            "chroms": list(self.chroms),
            "chrom_sizes": [[c, int(n)] for c, n in self.header.items()],
            "model": self.model,
            "store_hash": self.store_hash,
        }

    def spill_key(self, pair: ImputedPair) -> dict[str, Any]:
        """What the spills of ``pair`` depend on (not the scale: spills are arcsinh)."""
        return {
            "format": FORMAT,
            "experiment": pair.experiment,
            "assembly": self.assembly,
            "bin_size": self.bin_size,
            "model": self.model,
            "store_hash": self.store_hash,
        }


def _header(store: Store, cfg: ImputeConfig, chroms: list[str]) -> dict[str, int]:
    stored = store.chrom_sizes(cfg.assembly)
    if cfg.chrom_sizes is None:
        return stored
    sizes = read_chrom_sizes(cfg.chrom_sizes)
    bad = {c: (stored[c], sizes.get(c)) for c in chroms if sizes.get(c) != stored[c]}
    if bad:
        raise ConfigError(
            f"impute chrom_sizes {cfg.chrom_sizes}: disagrees with the store's assembly "
            f"{cfg.assembly}; expected the stored lengths, got (store, file) {bad}. Use the "
            "chrom sizes the store was ingested with."
        )
    return sizes


def _read_json(path: Path) -> Any:
    """The JSON content of ``path``, or None when missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sidecar_path(bw: Path) -> Path:
    return bw.with_suffix(".json")


def _clean_tmp(out: Path) -> int:
    """Remove hidden temporaries a killed run left (``.name.tmp-xxxxxxxx``)."""
    n = 0
    for d in [out, *(p for p in (out / PARTS).glob("*") if p.is_dir())]:
        for p in d.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def plan(cfg: ImputeConfig, predictor_for: PredictorFor | None = None) -> _Plan:
    """Validate the request and decide what is left to do (driver side, before any task).

    Every requested pair is checked against the vocabulary of every chromosome's model that
    :func:`model_scopes` can read (``epiray train`` run directories, or a ``vocabulary``
    method of ``predictor_for``) before anything is written or deleted.

    Raises
    ------
    ConfigError
        Bad options, pairs or chromosome sizes; pairs the model cannot impute (see
        :func:`impute`); existing outputs without ``overwrite`` or ``resume``; a finished
        output made by another model or store under ``resume``.
    StoreError
        The store or the assembly is missing.
    """
    if cfg.overwrite and cfg.resume:
        raise ConfigError(
            f"impute {cfg.output_dir}: overwrite and resume both set; expected at most one. "
            "Choose --overwrite (redo everything) or --resume (keep finished outputs)."
        )
    store = Store.open(cfg.store)
    asm = store.assembly(cfg.assembly)
    chroms = asm.select(cfg.chroms)
    requested = resolve_pairs(store, cfg)
    if not requested:
        raise ConfigError(
            f"impute {cfg.output_dir}: nothing to impute for assembly {cfg.assembly}; expected "
            "at least one pair (every pair is observed). List pairs explicitly or set "
            "zero_shot_assays."
        )
    out = Path(cfg.output_dir)
    pairs, unimputable = _check_models(
        cfg, requested, model_scopes(cfg, chroms, predictor_for), out
    )
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"impute output_dir {out}: not a directory; expected a directory, got a file. "
            "Choose another output_dir."
        )
    p = _Plan(
        out=out,
        store_root=str(store.root),
        store_hash=store.store_hash,
        assembly=cfg.assembly,
        species=asm.species,
        bin_size=store.bin_size,
        scale=cfg.scale,
        model=cfg.model_label,
        chroms=chroms,
        header=_header(store, cfg, chroms),
        pairs=pairs,
        requested=requested,
        unimputable=unimputable,
    )
    if cfg.overwrite or cfg.resume:
        n = _clean_tmp(out) if out.is_dir() else 0
        if n:
            log.info("impute: removed %d temporary files of an interrupted run", n)
    existing, problems = [], []
    for pair in pairs:
        bw = out / pair.filename(cfg.scale)
        side = _sidecar_path(bw)
        parts = _parts_dir(out, pair.experiment)
        found = [x for x in (bw, side, parts) if x.exists()]
        if not found:
            p.todo.append(pair)
            continue
        if cfg.overwrite:
            for x in found:
                shutil.rmtree(x) if x.is_dir() else x.unlink()
            p.todo.append(pair)
            continue
        if not cfg.resume:
            existing += [str(x) for x in found]
            continue
        if bw.is_file() and side.is_file():
            meta = _read_json(side) or {}
            want = p.key(pair)
            got = {k: meta.get(k) for k in MATCH_KEYS}
            if got != want:
                diff = {k: (want[k], got[k]) for k in MATCH_KEYS if want[k] != got[k]}
                problems.append(
                    f"{bw}: made for another request; expected (this run, the sidecar) {diff}. "
                    "Pass overwrite to replace it, or use another output_dir"
                )
                continue
            if meta.get("size") == bw.stat().st_size:
                p.skipped.append(pair)
                continue
        # unfinished: a bigWig without its sidecar, a damaged one, or spills only
        for x in (bw, side):
            x.unlink(missing_ok=True)
        if parts.is_dir() and _read_json(parts / SPILL_KEY) != p.spill_key(pair):
            log.info("impute: discarding stale spills of %s (other model or store)", pair)
            shutil.rmtree(parts)
        p.todo.append(pair)
    if existing:
        more = f" ... ({len(existing)} in all)" if len(existing) > 8 else ""
        raise ConfigError(
            f"impute output_dir {out}: outputs of requested pairs already exist; expected none, "
            f"got {existing[:8]}{more}. Pass resume to keep finished ones and do the rest, or "
            "overwrite to redo them."
        )
    collect(problems, f"impute output_dir {out}", ConfigError)
    return p


# --------------------------------------------------------------------------------------- predict
def _as_values(x: Any, chrom: str, batch: Sequence[ImputedPair], lo: int, hi: int) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float32)
    names = [p.experiment for p in batch]
    if arr.shape != (len(batch), hi - lo):
        raise EpirayError(
            f"impute chrom {chrom!r} bins [{lo}, {hi}): predictor returned shape {arr.shape}; "
            f"expected ({len(batch)}, {hi - lo}) for pairs {names}. Fix predict_chrom."
        )
    if not np.isfinite(arr).all():
        bad = [names[i] for i in np.flatnonzero(~np.isfinite(arr).all(axis=1))]
        raise EpirayError(
            f"impute chrom {chrom!r} bins [{lo}, {hi}): predictor returned non-finite values "
            f"for {bad}; expected finite arcsinh-scale values. Check the model of {chrom}."
        )
    return arr


def _name_chrom(chrom: str, exc: BaseException, what: str) -> str:
    """One message naming ``chrom`` (the cause's own message kept whole)."""
    prefix = f"impute chrom {chrom!r}"
    if isinstance(exc, EpirayError):
        msg = str(exc)
        return msg if msg.startswith(prefix) else f"{prefix}: {what}: {msg}"
    return (
        f"{prefix}: {what} failed; expected it to succeed, got {type(exc).__name__}: {exc}. "
        "Fix the model or drop the chromosome from chroms."
    )


def predict_unit(
    unit: Mapping[str, Any], predictor_for: PredictorFor, chunk_bins: int, pair_batch: int
) -> dict[str, Any]:
    """Predict one unit of work (one chromosome, some pairs) into spills.

    Parameters
    ----------
    unit
        ``out`` (output dir), ``chrom``, ``n_bins`` and ``pairs`` (dicts of
        :class:`ImputedPair` fields) whose spills of ``chrom`` are missing.
    predictor_for
        ``chrom -> Predictor``, called once here.
    chunk_bins, pair_batch
        Bins and pairs per predictor call.

    Returns
    -------
    dict
        ``chrom``, ``written`` (experiments whose spill was written), ``error`` (a message
        naming the chromosome, or None), ``load_s`` and ``predict_s`` (seconds).
    """
    chrom, n, out = unit["chrom"], int(unit["n_bins"]), Path(unit["out"])
    pairs = [ImputedPair(**p) for p in unit["pairs"]]
    res: dict[str, Any] = {"chrom": chrom, "written": [], "error": None}
    t0 = time.perf_counter()
    try:
        pred = predictor_for(chrom)
    except Exception as e:
        res["error"] = _name_chrom(chrom, e, "loading the model")
        return res
    fn = getattr(pred, "predict_chrom", pred)
    if not callable(fn):
        res["error"] = (
            f"impute chrom {chrom!r}: predictor_for returned {type(pred).__name__}; expected a "
            "Predictor (predict_chrom) or a callable. Fix the model loader."
        )
        return res
    t1 = time.perf_counter()
    for s in range(0, len(pairs), pair_batch):
        batch = pairs[s : s + pair_batch]
        names = [(p.biosample, p.assay) for p in batch]
        finals = [_spill_path(out, p.experiment, chrom) for p in batch]
        tmps = [_tmp_name(f) for f in finals]
        maps = []
        try:
            for f, t in zip(finals, tmps):
                f.parent.mkdir(parents=True, exist_ok=True)
                maps.append(np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=(n,)))
            for lo in range(0, n, chunk_bins):
                hi = min(lo + chunk_bins, n)
                vals = _as_values(fn(chrom, names, lo, hi), chrom, batch, lo, hi)
                for m, v in zip(maps, vals):
                    m[lo:hi] = v
            for m, t, f in zip(maps, tmps, finals):
                m.flush()
                os.replace(t, f)
            res["written"] += [p.experiment for p in batch]
        except Exception as e:
            res["error"] = _name_chrom(chrom, e, f"predicting {[p.experiment for p in batch]}")
            break
        finally:
            del maps
            for t in tmps:
                t.unlink(missing_ok=True)
    res["load_s"], res["predict_s"] = t1 - t0, time.perf_counter() - t1
    return res


# --------------------------------------------------------------------------------------- write
class _Sinh:
    """``sinh`` of a spill, evaluated when the writer converts it (one chromosome at a time)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.sinh(np.asarray(self.values, dtype=np.float64))
        return out if dtype is None else out.astype(dtype, copy=False)


def _load_spill(path: Path, n: int) -> np.ndarray:
    arr = np.load(path, mmap_mode="r")
    if arr.dtype != np.float32 or arr.shape != (n,):
        raise EpirayError(
            f"impute spill {path}: shape {arr.shape} {arr.dtype}; expected ({n},) float32. "
            "Delete it and run again with resume."
        )
    return arr


def write_experiment(job: Mapping[str, Any]) -> dict[str, Any]:
    """Assemble one imputed experiment's bigWig from its spills, then its sidecar.

    Parameters
    ----------
    job
        ``out``, ``pair`` (:class:`ImputedPair` fields), ``header`` (chrom -> length, the
        bigWig header in order), ``chroms`` (imputed chromosomes), ``bin_size``, ``scale``,
        ``sidecar`` (the request key and provenance) and ``keep_parts``.

    Returns
    -------
    dict
        ``experiment``, ``path``, ``size`` (bytes), ``error`` (or None), ``write_s``.
    """
    from epiray.bigwig import write_bigwig

    t0 = time.perf_counter()
    out, pair = Path(job["out"]), ImputedPair(**job["pair"])
    header, bin_size, scale = dict(job["header"]), int(job["bin_size"]), job["scale"]
    bw = out / pair.filename(scale)
    res: dict[str, Any] = {"experiment": pair.experiment, "path": str(bw), "error": None}
    try:
        spills = {
            c: _load_spill(_spill_path(out, pair.experiment, c), n_bins(header[c], bin_size))
            for c in job["chroms"]
        }
        stats = {}
        for c, v in spills.items():
            stats[c] = {
                "n_bins": len(v),
                "mean": float(np.mean(v, dtype=np.float64)),
                "min": float(v.min()),
                "max": float(v.max()),
            }
        tracks = {c: (_Sinh(v) if scale == "signal" else v) for c, v in spills.items()}
        write_bigwig(bw, header, tracks, bin_size)
        meta = {
            **job["sidecar"],
            "category": pair.category,
            "species": pair.species,
            "observed": pair.observed,
            "zero_shot": pair.zero_shot,
            "file": bw.name,
            "size": bw.stat().st_size,
            "stats_arcsinh": stats,
            "epiray_version": __version__,
        }
        atomic_write_text(_sidecar_path(bw), json.dumps(meta, indent=1, sort_keys=True))
        res["size"] = meta["size"]
        if not job.get("keep_parts"):
            shutil.rmtree(_parts_dir(out, pair.experiment), ignore_errors=True)
    except Exception as e:
        res["error"] = (
            str(e)
            if isinstance(e, EpirayError)
            else f"impute {bw}: writing failed; {type(e).__name__}: {e}"
        )
    res["write_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------- run
@dataclass
class ImputeResult:
    """What :func:`impute` did.

    Attributes
    ----------
    written, skipped
        bigWig paths written now / kept from an earlier run (resume).
    pairs
        Every requested pair the model can impute (written now or kept).
    bins_written
        Bins written to bigWigs now (pairs × bins of the imputed chromosomes).
    spills_written, spills_reused
        Per (experiment, chromosome) spills predicted now / found finished.
    predict_s, write_s, total_s
        Wall-clock seconds of the two phases and of the whole call.
    unimputable
        Records (see :func:`unimputable_pairs`) of the unobserved pairs left out because the
        model cannot impute them (also in ``OUT/impute.unimputable.json``).
    """

    written: list[Path]
    skipped: list[Path]
    pairs: list[ImputedPair]
    bins_written: int = 0
    spills_written: int = 0
    spills_reused: int = 0
    predict_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    unimputable: list[dict[str, Any]] = field(default_factory=list)


def _use_ray(cfg: ImputeConfig) -> bool:
    if cfg.executor == "local":
        return False
    import ray

    if cfg.executor == "ray":
        from epiray.runtime import ensure_ray

        ensure_ray()
        return True
    return ray.is_initialized()


def _run_tasks(fn, items: list, use_ray: bool, options: dict[str, Any], *args) -> list[dict]:
    """``fn(item, *args)`` for every item: Ray tasks (errors returned, never raised) or a loop."""
    if not use_ray:
        return [fn(item, *args) for item in items]
    import ray

    remote = ray.remote(fn).options(**options)
    arg_refs = [ray.put(a) for a in args]
    refs = {remote.remote(item, *arg_refs): item for item in items}
    results = []
    for ref, item in refs.items():
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as e:  # the worker died (OOM, segfault, node loss)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = item.get("chrom") or item.get("pair", {}).get("biosample")
            error = (
                f"impute {where!r}: the Ray task failed ({first}); expected it to finish. "
                "Check the worker's memory and run again with resume."
            )
            results.append({"chrom": item.get("chrom"), "written": [], "error": error})
    return results


def _gpus(cfg: ImputeConfig) -> float:
    if cfg.num_gpus != "auto":
        return float(cfg.num_gpus)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _predict_wave(
    cfg: ImputeConfig,
    p: _Plan,
    todo: list[ImputedPair],
    predictor_for: PredictorFor,
    use_ray: bool,
    result: ImputeResult,
) -> None:
    """Predict the missing spills of ``todo``; raise once for every failed chromosome."""
    units = []
    for chrom in p.chroms:
        nb = p.n_bins(chrom)
        need = []
        for pair in todo:
            if _spill_ok(_spill_path(p.out, pair.experiment, chrom), nb):
                result.spills_reused += 1
            else:
                need.append(asdict(pair))
        step = cfg.pairs_per_task or max(len(need), 1)
        for s in range(0, len(need), step):
            units.append(
                {"out": str(p.out), "chrom": chrom, "n_bins": nb, "pairs": need[s : s + step]}
            )
    log.info(
        "impute: %d pairs, %d prediction units on %d chroms, %d spills reused",
        len(todo),
        len(units),
        len(p.chroms),
        result.spills_reused,
    )
    if not units:
        return
    options = {"num_cpus": cfg.num_cpus, "num_gpus": _gpus(cfg)} if use_ray else {}
    done = _run_tasks(
        predict_unit, units, use_ray, options, predictor_for, cfg.chunk_bins, cfg.pair_batch
    )
    result.spills_written += sum(len(r["written"]) for r in done)
    errors = [r["error"] for r in done if r["error"]]
    collect(
        list(dict.fromkeys(errors)),
        f"impute {p.out}: prediction failed (finished spills are kept; run again with resume)",
        EpirayError,
    )


def _write_wave(
    cfg: ImputeConfig, p: _Plan, todo: list[ImputedPair], use_ray: bool, result: ImputeResult
) -> None:
    """One writer per experiment of ``todo``; raise once for every bigWig that failed."""
    jobs = [
        {
            "out": str(p.out),
            "pair": asdict(pair),
            "header": p.header,
            "chroms": p.chroms,
            "bin_size": p.bin_size,
            "scale": p.scale,
            "sidecar": {**p.key(pair), "store": p.store_root},
            "keep_parts": cfg.keep_parts,
        }
        for pair in todo
    ]
    done = _run_tasks(write_experiment, jobs, use_ray, {"num_cpus": 1} if use_ray else {})
    collect(
        [r["error"] for r in done if r["error"]], f"impute {p.out}: writing failed", EpirayError
    )
    result.written += [Path(r["path"]) for r in done]
    result.bins_written += len(todo) * sum(p.n_bins(c) for c in p.chroms)


def impute(cfg: ImputeConfig, predictor_for: PredictorFor) -> ImputeResult:
    """Impute every requested pair genome-wide and write one bigWig per pair.

    Parameters
    ----------
    cfg
        The job (see :class:`ImputeConfig`).
    predictor_for
        ``chrom -> Predictor``; called inside each prediction task (see :class:`Predictor`).

    Every requested pair is first checked against the vocabulary of each chromosome's model
    (read from ``epiray train``'s run directories when ``cfg.model`` is a ``{chrom}`` pattern,
    or from ``predictor_for.vocabulary(chrom)`` when it has that method), before any Ray work
    and before anything is written or deleted. A pair whose biosample or assay a model never
    saw (e.g. an assay only human measured, asked of a mouse-only model) cannot be imputed:

    - with an explicit ``pairs`` list, that is a :class:`~epiray.errors.ConfigError` naming
      every such pair, why, and what would impute it (a cross-species model for assays only
      the other species measured; training again, or adding the name by transfer, for names
      the model was trained without); nothing is written, so the corrected request needs no
      ``resume``;
    - with ``pairs: unobserved`` (every pair the store does not observe), they are left out
      with one warning naming them and what would impute them, recorded in
      ``OUT/impute.unimputable.json``, and listed by ``epiray info`` apart from unfinished
      work; the rest is imputed. If none is left, it is the ConfigError above.

    Nothing is ever substituted for a pair the model cannot impute.

    Returns
    -------
    ImputeResult

    Raises
    ------
    ConfigError
        See :func:`plan`.
    EpirayError
        One error listing every chromosome whose model failed to load or predict (its spills
        are missing; every other finished spill is kept for ``resume``), or every bigWig that
        could not be written.
    """
    t_start = time.perf_counter()
    p = plan(cfg, predictor_for)
    out = p.out
    out.mkdir(parents=True, exist_ok=True)
    _update_unimputable(out, p.requested, p.unimputable)
    result = ImputeResult(
        [], [out / x.filename(p.scale) for x in p.skipped], p.pairs, 0, 0, 0, 0.0, 0.0, 0.0
    )
    result.unimputable = list(p.unimputable)
    if not p.todo:
        result.total_s = time.perf_counter() - t_start
        return result
    use_ray = _use_ray(cfg)
    wave = cfg.pairs_per_wave or len(p.todo)
    for w in range(0, len(p.todo), wave):
        todo = p.todo[w : w + wave]
        for pair in todo:
            atomic_write_text(
                _parts_dir(out, pair.experiment) / SPILL_KEY,
                json.dumps(p.spill_key(pair), sort_keys=True),
            )
        t0 = time.perf_counter()
        _predict_wave(cfg, p, todo, predictor_for, use_ray, result)
        t1 = time.perf_counter()
        _write_wave(cfg, p, todo, use_ray, result)
        result.predict_s += t1 - t0
        result.write_s += time.perf_counter() - t1
        log.info("impute: %d of %d pairs written", w + len(todo), len(p.todo))
    parts = out / PARTS
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    result.total_s = time.perf_counter() - t_start
    return result


# --------------------------------------------------------------------------------------- info
def read_outputs(path: str | Path) -> list[dict[str, Any]]:
    """The sidecars of every imputed bigWig in an output folder (sorted by file name).

    Only sidecars of format :data:`FORMAT` whose bigWig exists are returned; each dict gains
    ``path`` (the bigWig).
    """
    out = []
    for side in sorted(Path(path).glob("*.json")):
        meta = _read_json(side)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            continue
        bw = side.parent / meta.get("file", "")
        if bw.is_file():
            out.append({**meta, "path": str(bw)})
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def describe_outputs(path: str | Path) -> str:
    """A readable summary of an imputation output folder (what ``epiray info`` prints).

    Lists the imputed pairs (an assay × biosample table per assembly and scale), per chromosome
    coverage, the model and store they came from, sizes, the requested pairs the model cannot
    impute (recorded by :func:`impute`, or, for folders of earlier versions, ``.parts`` folders
    of pairs the model's run directories show it never saw), unfinished work left in
    ``.parts`` (that ``resume`` would finish) and whether a track hub is present.

    Raises
    ------
    EpirayError
        ``path`` is not a directory or holds no imputed tracks nor unfinished work.
    """
    import pandas as pd

    root = Path(path)
    if not root.is_dir():
        raise EpirayError(
            f"impute output {root}: not a directory; expected an impute output_dir. Check the "
            "path."
        )
    outs = read_outputs(root)
    parts = root / PARTS
    pending = sorted(p for p in parts.glob("*") if p.is_dir()) if parts.is_dir() else []
    record = read_unimputable(root)
    if not outs and not pending and not record:
        raise EpirayError(
            f"impute output {root}: no imputed tracks; expected {{biosample}}.{{assay}}."
            "{scale}.bw files with their .json sidecars. Run `epiray impute` first."
        )
    lines = [f"imputed tracks in {root}"]
    if outs:
        df = pd.DataFrame(outs)
        total = int(df["size"].sum())
        lines.append(
            f"  {len(df)} bigWigs, {_mb(total)} in all, epiray {df['epiray_version'].iloc[0]}"
        )
        for (asm, scale), g in df.groupby(["assembly", "scale"], sort=True):
            species = g["species"].iloc[0]
            n_zs, n_obs = int(g["zero_shot"].sum()), int(g["observed"].sum())
            lines.append(
                f"  assembly {asm} ({species}), scale {scale}: {len(g)} pairs "
                f"({n_zs} zero-shot assay, {n_obs} observed), {_mb(g['size'].sum())}, "
                f"bin {g['bin_size'].iloc[0]} bp"
            )
            for (model, sh), gm in g.groupby(["model", "store_hash"], sort=True):
                lines.append(f"    model {model}, store hash {sh}: {len(gm)} pairs")
            header = dict(g["chrom_sizes"].iloc[0])
            cover: dict[str, int] = {}
            for chroms in g["chroms"]:
                for c in chroms:
                    cover[c] = cover.get(c, 0) + 1
            lines.append(
                f"    header {len(header)} chroms; imputed chroms (pairs with data, bins):"
            )
            for c in header:
                if c in cover:
                    nb = n_bins(header[c], int(g["bin_size"].iloc[0]))
                    lines.append(f"      {c}: {cover[c]}/{len(g)} pairs, {nb:,} bins")
            missing = [c for c in header if c not in cover]
            if missing:
                more = " ..." if len(missing) > 10 else ""
                lines.append(f"      no data: {', '.join(missing[:10])}{more}")
            tab = pd.crosstab(g["assay"], g["biosample"]).map(lambda v: "x" if v else ".")
            cats = g.groupby("assay")["category"].first()
            tab.index = [f"{a} ({cats[a]})" for a in tab.index]
            lines.append("    imputed pairs (x) per assay and biosample:")
            lines += ["      " + x for x in tab.to_string().splitlines()]
            means = {
                r.experiment: np.average(
                    [s["mean"] for s in r.stats_arcsinh.values()],
                    weights=[s["n_bins"] for s in r.stats_arcsinh.values()],
                )
                for r in g.itertuples()
            }
            lo, hi = min(means, key=means.get), max(means, key=means.get)
            lines.append(
                f"    mean imputed value (arcsinh): {min(means.values()):.3f} ({lo}) .. "
                f"{max(means.values()):.3f} ({hi})"
            )
    recorded = {e["experiment"] for e in record}
    stale = _stale_unimputable([d for d in pending if d.name not in recorded])
    impossible = recorded | {e["experiment"] for e in stale}
    for what, entries in (("", record), (f" (left in {PARTS}/ by an earlier run)", stale)):
        by_model: dict[str, list[dict[str, Any]]] = {}
        for e in entries:
            by_model.setdefault(str(e.get("model")), []).append(e)
        for model, es in by_model.items():
            lines.append(
                f"  not imputable by model {model}: {len(es)} requested pairs{what}, never "
                "predicted (resume cannot finish them):"
            )
            lines += _group_lines(es, "    ")
            lines.append("    " + unimputable_advice(es))
    leftover = [d.name for d in pending if d.name in recorded]
    if leftover:
        lines.append(
            f"    {PARTS}/ still holds folders of {len(leftover)} of them from an earlier run: "
            f"nothing there to finish; delete {_short([f'{PARTS}/{n}' for n in leftover], 3)}"
        )
    unfinished = [d for d in pending if d.name not in impossible]
    if unfinished:
        n_sp = sum(len(list(p.glob("*.npy"))) for p in unfinished)
        lines.append(
            f"  unfinished: {len(unfinished)} experiments with {n_sp} chromosome spills in "
            f"{PARTS}/ (finish them with resume)"
        )
    hub = root / "hub.txt"
    lines.append(
        f"  track hub: {hub if hub.is_file() else 'none (write one with write_trackhub)'}"
    )
    return "\n".join(lines)


def _pattern_scopes(model: str) -> dict[str, ModelScope]:
    """The scopes of every existing run of the run pattern ``model`` (by chromosome)."""
    pattern = "*".join(glob.escape(part) for part in model.split("{chrom}"))
    scopes = {}
    for run in sorted(glob.glob(pattern)):
        meta = _run_meta(Path(run))
        chrom = meta.get("chrom") if meta else None
        if not isinstance(chrom, str) or Path(model.format(chrom=chrom)) != Path(run):
            continue
        try:
            scopes[chrom] = ModelScope.from_run_meta(meta, chrom, run)
        except (KeyError, IndexError, TypeError):
            continue
    return scopes


def _stale_unimputable(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Records of ``.parts`` folders (of earlier versions) whose pair the model never saw.

    The model is the run pattern in the folder's ``key.json``; the (biosample, assay) split
    of the folder name is the one the model knows best. Folders whose model cannot be read
    are left to be reported as unfinished.
    """
    cache: dict[str, dict[str, ModelScope]] = {}
    out = []
    for d in dirs:
        key = _read_json(d / SPILL_KEY)
        model = key.get("model") if isinstance(key, dict) else None
        if not isinstance(model, str) or "{chrom}" not in model:
            continue
        if model not in cache:
            cache[model] = _pattern_scopes(model)
        scopes = cache[model]
        if not scopes:
            continue
        splits = [(d.name[:i], d.name[i + 1 :]) for i, c in enumerate(d.name) if c == "."]
        if not splits or any(all(not s.missing(b, a) for s in scopes.values()) for b, a in splits):
            continue  # imputable: unfinished work
        first = next(iter(scopes.values()))
        b, a = min(splits, key=lambda ba: len(first.missing(*ba)))
        pair = ImputedPair(b, a, "other", "", str(key.get("assembly") or ""))
        for e in unimputable_pairs([pair], scopes, model):
            out.append({**e, "zero_shot": None, "reason": _reason(None, e["missing"])})
    return out
