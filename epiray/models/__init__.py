"""The model contract: data a worker trains on, the vocabulary, the model base class, the registry.

The training loop (:mod:`epiray.loop`, wrapped by Ray Train in ``epiray.train``) sees a model only
through :class:`ImputationModel`. Adding a model is one file in ``epiray/models/`` that subclasses
it and registers itself with ``@register("name")``; the loop does not change.

Per worker the loop holds one :class:`ChromData`: every tensor already lives on the worker's
device, so batches are drawn by indexing on the device (no per-batch host-to-device copies).
The worker owns bins ``[lo, hi)`` of chromosome ``chrom``; "local bin" ``i`` is global bin
``lo + i``. Values are on the arcsinh scale.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from epiray.config import Section
from epiray.errors import ConfigError, EpirayError, StoreError

__all__ = [
    "Batch",
    "ChromData",
    "ExperimentKey",
    "ImputationModel",
    "SlabSize",
    "Vocabulary",
    "available_models",
    "chrom_data_from_numpy",
    "get_model",
    "register",
]


# --------------------------------------------------------------------------------------------
# Data a worker trains on
# --------------------------------------------------------------------------------------------


@dataclass
class ChromData:
    """The slab of one chromosome a worker trains on, as device tensors.

    Attributes
    ----------
    chrom
        Chromosome name of the target species (e.g. ``"chr19"``).
    lo, hi
        This worker owns global bins ``[lo, hi)`` (25 bp bins, 0-based, half-open).
    n_bins
        Bins of the whole chromosome, ``ceil(length / bin_size)``.
    values
        ``[E, hi-lo]`` float16/float32, arcsinh scale: the training tracks of the target species.
        Every track is observed at every bin (missing data were filled by an explicit policy).
    biosample, assay
        ``[E]`` int64: each training track's biosample / assay index in the :class:`Vocabulary`.
    aux_values
        ``[H, A]`` float16/float32 or None: other-species (e.g. human) tracks at the alignment
        rows whose target bin lies in ``[lo, hi)``.
    aux_bin
        ``[A]`` int64 or None: local target bin (``0 .. hi-lo-1``) of each alignment row.
    aux_pos
        ``[A]`` int64 or None: index (``0 .. P-1``) of each row's distinct other-species
        position; rows sharing an other-species bin share an index. Used by models that give
        other-species positions their own factors (Avocado ``concat``).
    aux_pos_chrom, aux_pos_bin
        ``[P]`` int64 or None: chromosome code and bin (in the other species' own 25 bp
        coordinates) of each distinct other-species position, so multi-scale models can group
        them at coarser resolutions. Codes are arbitrary but consistent within one ChromData.
    aux_biosample, aux_assay
        ``[H]`` int64 or None: vocabulary indices of the other-species tracks.
    val_values
        ``[V, hi-lo]`` or None: held-out target-species tracks used for validation only.
    val_biosample, val_assay
        ``[V]`` int64 or None.
    heldout
        ``[E, n_blocks]`` bool or None: validation *cells* of the training tracks. Block ``j``
        of track ``e`` covers the global bins ``[(b0 + j) · heldout_block, (b0 + j + 1) ·
        heldout_block)`` with ``b0 = lo // heldout_block`` (clipped to ``[lo, hi)``); where it
        is True, the track's values are never trained on, only predicted for validation
        (:func:`epiray.folds.heldout_blocks`). Blocks are global, so a cell's role does not
        depend on how the chromosome is sharded.
    heldout_block
        Bins per block of ``heldout`` (200 = 5 kbp, Avocado's coarsest genome scale, so no
        genome factor of a held-out block was fitted to that track there).
    """

    chrom: str
    lo: int
    hi: int
    n_bins: int
    values: Tensor
    biosample: Tensor
    assay: Tensor
    aux_values: Tensor | None = None
    aux_bin: Tensor | None = None
    aux_pos: Tensor | None = None
    aux_pos_chrom: Tensor | None = None
    aux_pos_bin: Tensor | None = None
    aux_biosample: Tensor | None = None
    aux_assay: Tensor | None = None
    val_values: Tensor | None = None
    val_biosample: Tensor | None = None
    val_assay: Tensor | None = None
    heldout: Tensor | None = None
    heldout_block: int = 200

    def __post_init__(self) -> None:
        where = f"ChromData chrom {self.chrom!r} bins [{self.lo}, {self.hi})"
        if not 0 <= self.lo < self.hi <= self.n_bins:
            raise EpirayError(
                f"{where}: bad bin range; expected 0 <= lo < hi <= n_bins = {self.n_bins}, "
                f"got lo={self.lo}, hi={self.hi}. Shard bins inside the chromosome."
            )
        n = self.hi - self.lo
        if self.values.ndim != 2 or self.values.shape[1] != n:
            raise EpirayError(
                f"{where}: values has shape {tuple(self.values.shape)}; expected [E, {n}]. "
                "Read exactly the worker's bins."
            )
        e = self.values.shape[0]
        for name in ("biosample", "assay"):
            t = getattr(self, name)
            if t.shape != (e,):
                raise EpirayError(
                    f"{where}: {name} has shape {tuple(t.shape)}; expected [{e}] "
                    "(one index per training track)."
                )
        aux = [self.aux_values, self.aux_bin, self.aux_biosample, self.aux_assay]
        if any(t is not None for t in aux):
            if any(t is None for t in aux):
                raise EpirayError(
                    f"{where}: aux_values, aux_bin, aux_biosample and aux_assay must be given "
                    "together; expected all or none, got some. Pass the whole alignment block."
                )
            h, a = self.aux_values.shape
            if self.aux_bin.shape != (a,) or self.aux_biosample.shape != (h,):
                raise EpirayError(
                    f"{where}: aux shapes disagree; expected aux_bin [{a}] and aux_biosample "
                    f"[{h}] for aux_values [{h}, {a}], got {tuple(self.aux_bin.shape)} and "
                    f"{tuple(self.aux_biosample.shape)}."
                )
            if self.aux_pos is not None and self.aux_pos.shape != (a,):
                raise EpirayError(
                    f"{where}: aux_pos has shape {tuple(self.aux_pos.shape)}; expected [{a}]."
                )
        if self.val_values is not None:
            if self.val_values.ndim != 2 or self.val_values.shape[1] != n:
                raise EpirayError(
                    f"{where}: val_values has shape {tuple(self.val_values.shape)}; "
                    f"expected [V, {n}]."
                )
            v = self.val_values.shape[0]
            for name in ("val_biosample", "val_assay"):
                t = getattr(self, name)
                if t is None or t.shape != (v,):
                    raise EpirayError(
                        f"{where}: {name} must be a [{v}] index tensor with val_values; "
                        f"got {None if t is None else tuple(t.shape)}."
                    )

        if self.heldout is not None:
            want = (e, (self.hi - 1) // self.heldout_block - self.lo // self.heldout_block + 1)
            if self.heldout.dtype != torch.bool or tuple(self.heldout.shape) != want:
                raise EpirayError(
                    f"{where}: heldout has shape {tuple(self.heldout.shape)} and dtype "
                    f"{self.heldout.dtype}; expected a bool [{want[0]}, {want[1]}] mask (one "
                    f"row per training track, one column per {self.heldout_block}-bin block)."
                )

    @property
    def n_local(self) -> int:
        """Bins this worker owns, ``hi - lo``."""
        return self.hi - self.lo

    def block_of(self, bins: Tensor) -> Tensor:
        """Column of ``heldout`` of each local bin in ``bins`` (int64, same shape)."""
        k = self.heldout_block
        return torch.div(bins + self.lo, k, rounding_mode="floor") - self.lo // k

    def is_heldout(self, track: Tensor, bins: Tensor) -> Tensor:
        """Whether the cells (training track ``track[i]``, local bin ``bins[i]``) are held out
        for validation (bool, same shape; all False without ``heldout``)."""
        if self.heldout is None:
            return torch.zeros(bins.shape, dtype=torch.bool, device=bins.device)
        return self.heldout[track, self.block_of(bins)]

    def heldout_cells(self) -> tuple[Tensor, Tensor]:
        """The validation cells as ``(track, bin)`` int64 ``[N]`` tensors, ordered by bin
        then track (empty without ``heldout``). Built from the held-out blocks, never from a
        ``[E, bins]`` mask."""
        dev = self.device
        if self.heldout is None:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return empty, empty
        k = self.heldout_block
        track, blk = torch.nonzero(self.heldout, as_tuple=True)
        start = (blk + self.lo // k) * k - self.lo  # local first bin of each block
        bins = start[:, None] + torch.arange(k, device=dev)[None]
        inside = (bins >= 0) & (bins < self.n_local)
        track = track[:, None].expand(-1, k)[inside]
        bins = bins[inside]
        order = torch.argsort(bins * self.n_experiments + track)
        return track[order], bins[order]

    @property
    def n_heldout_cells(self) -> int:
        """Validation cells of this slab (0 without ``heldout``)."""
        return int(self.heldout_cells()[0].shape[0])

    @property
    def n_experiments(self) -> int:
        """Training tracks of the target species, ``E``."""
        return int(self.values.shape[0])

    @property
    def n_aux_positions(self) -> int:
        """Distinct other-species positions ``P`` (0 without ``aux_pos``)."""
        if self.aux_pos is None:
            return 0
        if self.aux_pos_bin is not None:
            return int(self.aux_pos_bin.shape[0])
        return int(self.aux_pos.max().item()) + 1 if self.aux_pos.numel() else 0

    @property
    def device(self) -> torch.device:
        """The device every tensor lives on."""
        return self.values.device

    def to(self, device: torch.device | str) -> ChromData:
        """Return a copy with every tensor moved to ``device``."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return ChromData(**kw)


@dataclass(frozen=True)
class SlabSize:
    """The sizes of a worker's :class:`ChromData`: everything its memory depends on.

    Built from a loaded slab with :meth:`of`, or before loading from the store with
    :func:`epiray.loader.slab_size` (so a worker can refuse a slab its device cannot hold).

    Attributes
    ----------
    lo, hi
        The worker's bins ``[lo, hi)`` (coarse genome rows depend on where the slab starts).
    experiments, val_experiments
        Training / validation tracks of the target species.
    aux_tracks, aux_rows, aux_positions
        Other-species tracks, alignment rows in the slab, distinct other-species positions.
    value_bytes
        Bytes per stored value: 2 (float16) or 4 (float32).
    aux_groups
        ``(k, rows)`` for each ``k`` of :attr:`GROUP_BINS`: distinct (other-species chromosome,
        bin // k) among the positions (the coarse factor rows ``concat`` gives them).
    """

    lo: int
    hi: int
    experiments: int
    val_experiments: int = 0
    aux_tracks: int = 0
    aux_rows: int = 0
    aux_positions: int = 0
    value_bytes: int = 2
    aux_groups: tuple[tuple[int, int], ...] = ()

    #: Group sizes (bins) for which ``aux_groups`` counts the distinct other-species rows:
    #: the 250 bp and 5 kbp scales of Avocado's ``concat`` variant.
    GROUP_BINS: ClassVar[tuple[int, ...]] = (10, 200)

    @property
    def bins(self) -> int:
        """Bins the worker owns, ``hi - lo``."""
        return self.hi - self.lo

    @classmethod
    def of(cls, data: ChromData) -> SlabSize:
        """The sizes of a loaded slab."""
        return cls(
            lo=data.lo,
            hi=data.hi,
            experiments=data.n_experiments,
            val_experiments=0 if data.val_values is None else int(data.val_values.shape[0]),
            aux_tracks=0 if data.aux_values is None else int(data.aux_values.shape[0]),
            aux_rows=0 if data.aux_values is None else int(data.aux_values.shape[1]),
            aux_positions=data.n_aux_positions,
            value_bytes=data.values.element_size(),
            aux_groups=_aux_groups(data),
        )

    def data_bytes(self) -> int:
        """Bytes of the slab's tensors (values and their int64 indices), exactly as loaded."""
        n = (self.experiments + self.val_experiments) * (self.bins * self.value_bytes + 16)
        if self.aux_tracks:
            n += self.aux_tracks * (self.aux_rows * self.value_bytes + 16)
            n += self.aux_rows * 16 + self.aux_positions * 16  # aux_bin, aux_pos; chrom, bin
        return n


def _aux_groups(data: ChromData) -> tuple[tuple[int, int], ...]:
    if data.aux_pos_bin is None:
        return ()
    chrom = data.aux_pos_chrom
    if chrom is None:
        chrom = torch.zeros_like(data.aux_pos_bin)
    return tuple(
        (k, int(torch.unique(torch.stack([chrom, data.aux_pos_bin // k]), dim=1).shape[1]))
        for k in SlabSize.GROUP_BINS
    )


def _as_tensor(x: Any, dtype: torch.dtype | None, device: torch.device) -> Tensor | None:
    if x is None:
        return None
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x)
    if dtype is not None:
        t = t.to(dtype)
    return t.to(device)


def chrom_data_from_numpy(
    values: np.ndarray,
    biosample: Sequence[int] | np.ndarray,
    assay: Sequence[int] | np.ndarray,
    *,
    chrom: str = "chr",
    lo: int = 0,
    hi: int | None = None,
    n_bins: int | None = None,
    device: torch.device | str | None = None,
    value_dtype: torch.dtype = torch.float32,
    **optional: Any,
) -> ChromData:
    """Build a :class:`ChromData` from numpy arrays (tests, benchmarks; no store needed).

    Parameters
    ----------
    values
        ``[E, n]`` float arcsinh-scale training tracks; when ``hi`` is None they cover bins
        ``[lo, lo + n)``. If ``values`` is the whole chromosome and ``hi`` is given, only
        columns ``[lo, hi)`` are kept (``values.shape[1]`` must then equal ``n_bins``).
    biosample, assay
        ``[E]`` int vocabulary indices.
    chrom, lo, hi, n_bins
        Coordinates; ``n_bins`` defaults to ``hi`` (a worker owning the chromosome's tail).
    device
        Target device; default CUDA when available, else CPU.
    value_dtype
        dtype of the value tensors on the device (float32 or float16).
    **optional
        Any optional :class:`ChromData` field (``val_values``, ``aux_values``, ``aux_bin`` ...)
        as numpy arrays; value arrays take ``value_dtype``, index arrays int64. A
        ``val_values`` of the whole chromosome is sliced like ``values``.

    Returns
    -------
    ChromData
    """
    dev = torch.device(device) if device is not None else default_device()
    values = np.asarray(values)
    if values.ndim != 2:
        raise EpirayError(
            f"chrom_data_from_numpy: values must be [E, bins]; got shape {values.shape}."
        )
    sliced = hi is not None and values.shape[1] != hi - lo
    if hi is None:
        hi = lo + values.shape[1]
    n_bins = hi if n_bins is None else n_bins
    if sliced:
        if values.shape[1] != n_bins:
            raise EpirayError(
                f"chrom_data_from_numpy: values has {values.shape[1]} bins; expected "
                f"{hi - lo} (the slice) or n_bins = {n_bins} (the chromosome)."
            )
        values = values[:, lo:hi]
    kw: dict[str, Any] = {}
    for name, arr in optional.items():
        if name in ("val_values", "aux_values"):
            arr = np.asarray(arr)
            if name == "val_values" and sliced and arr.shape[1] == n_bins:
                arr = arr[:, lo:hi]
            kw[name] = _as_tensor(arr, value_dtype, dev)
        elif name == "heldout":
            kw[name] = _as_tensor(arr, torch.bool, dev)
        elif name == "heldout_block":
            kw[name] = int(arr)
        elif name in {f.name for f in fields(ChromData)}:
            kw[name] = _as_tensor(arr, torch.long, dev)
        else:
            raise EpirayError(
                f"chrom_data_from_numpy: unknown field {name!r}; expected one of "
                f"{sorted(f.name for f in fields(ChromData))}."
            )
    return ChromData(
        chrom=chrom,
        lo=lo,
        hi=hi,
        n_bins=n_bins,
        values=_as_tensor(values, value_dtype, dev),
        biosample=_as_tensor(np.asarray(biosample), torch.long, dev),
        assay=_as_tensor(np.asarray(assay), torch.long, dev),
        **kw,
    )


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


class ExperimentKey(NamedTuple):
    """Where an experiment sits in the tensor: biosample index, assay index, species."""

    biosample: int
    assay: int
    species: str


@dataclass(frozen=True)
class Vocabulary:
    """Names behind every index a model uses; saved in every checkpoint.

    Attributes
    ----------
    biosamples, assays
        Names in index order (biosample ``i`` is ``biosamples[i]``). New entries are appended,
        so a model's old indices stay valid after :meth:`extend`.
    experiments
        ``{experiment id: ExperimentKey(biosample index, assay index, species)}``.
    chrom
        Chromosome of the target species the genome factors describe.
    n_bins
        Bins of that chromosome.
    assembly
        Target assembly (e.g. ``"mm10"``), or None when not from a store.
    store_hash
        ``manifest_hash`` of the store the model was trained on, or None.
    checksums
        ``{experiment id: source checksum}`` as recorded by the store (may be empty).
    """

    biosamples: tuple[str, ...]
    assays: tuple[str, ...]
    experiments: Mapping[str, ExperimentKey]
    chrom: str
    n_bins: int
    assembly: str | None = None
    store_hash: str | None = None
    checksums: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for kind, names in (("biosample", self.biosamples), ("assay", self.assays)):
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                problems.append(f"duplicate {kind} names {dup}")
        for exp, key in self.experiments.items():
            if not (0 <= key.biosample < len(self.biosamples)):
                problems.append(
                    f"experiment {exp!r}: biosample index {key.biosample} out of range"
                )
            if not (0 <= key.assay < len(self.assays)):
                problems.append(f"experiment {exp!r}: assay index {key.assay} out of range")
        if problems:
            raise EpirayError(
                f"Vocabulary chrom {self.chrom!r}: {'; '.join(problems)}; expected unique names "
                "and indices inside the biosample/assay lists. Build it with "
                "Vocabulary.from_records."
            )

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_records(
        cls,
        records: Sequence[tuple[str, str, str, str]] | Any,
        *,
        chrom: str,
        n_bins: int,
        assembly: str | None = None,
        store_hash: str | None = None,
        checksums: Mapping[str, str] | None = None,
    ) -> Vocabulary:
        """Build a vocabulary from ``(experiment, biosample, assay, species)`` records.

        Parameters
        ----------
        records
            Sequence of 4-tuples, or a pandas DataFrame with columns ``experiment``,
            ``biosample``, ``assay``, ``species`` (e.g. ``Store.experiments()``).
        chrom, n_bins, assembly, store_hash, checksums
            See the class attributes.

        Returns
        -------
        Vocabulary
            Biosamples and assays sorted by name, so the same experiments always give the
            same indices.
        """
        if hasattr(records, "itertuples"):
            records = [
                (r.experiment, r.biosample, r.assay, r.species)
                for r in records.itertuples(index=False)
            ]
        records = [tuple(map(str, r)) for r in records]
        biosamples = tuple(sorted({r[1] for r in records}))
        assays = tuple(sorted({r[2] for r in records}))
        bi = {b: i for i, b in enumerate(biosamples)}
        ai = {a: i for i, a in enumerate(assays)}
        exps: dict[str, ExperimentKey] = {}
        for exp, b, a, s in records:
            if exp in exps:
                raise EpirayError(
                    f"Vocabulary chrom {chrom!r}: experiment {exp!r} listed twice; expected "
                    "unique experiment ids. Deduplicate the manifest."
                )
            exps[exp] = ExperimentKey(bi[b], ai[a], s)
        return cls(
            biosamples,
            assays,
            exps,
            chrom,
            int(n_bins),
            assembly,
            store_hash,
            dict(checksums or {}),
        )

    def extend(
        self,
        records: Sequence[tuple[str, str, str, str]] = (),
        *,
        checksums: Mapping[str, str] | None = None,
    ) -> Vocabulary:
        """Return a vocabulary with new experiments; new biosamples/assays get appended indices.

        Existing indices never change, so a trained model stays valid and only the new rows
        need fitting (see ``ImputationModel.extend``).

        Parameters
        ----------
        records
            ``(experiment, biosample, assay, species)`` tuples of the new experiments.
        checksums
            Their source checksums, if known.
        """
        biosamples = list(self.biosamples)
        assays = list(self.assays)
        exps = dict(self.experiments)
        for exp, b, a, s in records:
            if exp in exps:
                raise EpirayError(
                    f"Vocabulary chrom {self.chrom!r}: experiment {exp!r} already present; "
                    "expected only new experiments. Drop it from the records."
                )
            if b not in biosamples:
                biosamples.append(b)
            if a not in assays:
                assays.append(a)
            exps[exp] = ExperimentKey(biosamples.index(b), assays.index(a), s)
        return Vocabulary(
            tuple(biosamples),
            tuple(assays),
            exps,
            self.chrom,
            self.n_bins,
            self.assembly,
            self.store_hash,
            {**self.checksums, **(checksums or {})},
        )

    def for_chrom(self, chrom: str, n_bins: int) -> Vocabulary:
        """The same names for another chromosome (transfer of a trained model)."""
        return Vocabulary(
            self.biosamples,
            self.assays,
            self.experiments,
            chrom,
            int(n_bins),
            self.assembly,
            self.store_hash,
            self.checksums,
        )

    # -- lookup ---------------------------------------------------------------------------
    def biosample_index(self, name: str) -> int:
        """Index of biosample ``name``; EpirayError listing the known names if absent."""
        try:
            return self.biosamples.index(name)
        except ValueError:
            raise EpirayError(
                f"Vocabulary chrom {self.chrom!r}: unknown biosample {name!r}; expected one of "
                f"{list(self.biosamples)[:20]}{' ...' if len(self.biosamples) > 20 else ''}. "
                "Add it with Vocabulary.extend and fit its factors."
            ) from None

    def assay_index(self, name: str) -> int:
        """Index of assay ``name``; EpirayError listing the known names if absent."""
        try:
            return self.assays.index(name)
        except ValueError:
            raise EpirayError(
                f"Vocabulary chrom {self.chrom!r}: unknown assay {name!r}; expected one of "
                f"{list(self.assays)[:20]}{' ...' if len(self.assays) > 20 else ''}. "
                "Add it with Vocabulary.extend and fit its factors."
            ) from None

    def experiment_index(self, experiment: str) -> ExperimentKey:
        """The (biosample, assay, species) key of ``experiment``."""
        try:
            return self.experiments[experiment]
        except KeyError:
            raise EpirayError(
                f"Vocabulary chrom {self.chrom!r}: unknown experiment {experiment!r}; expected "
                f"one of {len(self.experiments)} experiments in the vocabulary."
            ) from None

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (checkpoints)."""
        return {
            "biosamples": list(self.biosamples),
            "assays": list(self.assays),
            "experiments": {k: list(v) for k, v in self.experiments.items()},
            "chrom": self.chrom,
            "n_bins": self.n_bins,
            "assembly": self.assembly,
            "store_hash": self.store_hash,
            "checksums": dict(self.checksums),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Vocabulary:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(d["biosamples"]),
            tuple(d["assays"]),
            {
                k: ExperimentKey(int(v[0]), int(v[1]), str(v[2]))
                for k, v in d["experiments"].items()
            },
            d["chrom"],
            int(d["n_bins"]),
            d.get("assembly"),
            d.get("store_hash"),
            dict(d.get("checksums") or {}),
        )

    def check_matches(self, summary: Mapping[str, Any], *, strict_hash: bool = False) -> None:
        """Raise StoreError when a store does not hold what this vocabulary was trained on.

        Parameters
        ----------
        summary
            The store summary (``store.json`` contents): ``bin_size``, ``assemblies`` and
            ``experiments`` as in DESIGN.md §1, optionally ``manifest_hash``.
        strict_hash
            Also require ``summary["manifest_hash"] == store_hash``. Off by default: adding
            experiments to a store changes its hash but not the experiments a model knows.

        Raises
        ------
        StoreError
            Listing every mismatch: missing experiments, changed biosample/assay/species,
            changed source checksums, a missing chromosome or a different bin count.
        """
        problems: list[str] = []
        store_exps = summary.get("experiments", {})
        for exp, key in self.experiments.items():
            rec = store_exps.get(exp)
            if rec is None:
                problems.append(f"experiment {exp!r} is not in the store")
                continue
            want = (self.biosamples[key.biosample], self.assays[key.assay], key.species)
            got = (rec.get("biosample"), rec.get("assay"), rec.get("species"))
            if want != got:
                problems.append(
                    f"experiment {exp!r}: expected (biosample, assay, species) {want}, got {got}"
                )
            want_sum = self.checksums.get(exp)
            if want_sum is not None and rec.get("checksum") not in (None, want_sum):
                problems.append(
                    f"experiment {exp!r}: source checksum changed; expected {want_sum}, "
                    f"got {rec.get('checksum')}"
                )
        if self.assembly is not None:
            asm = summary.get("assemblies", {}).get(self.assembly)
            if asm is None:
                problems.append(f"assembly {self.assembly!r} is not in the store")
            else:
                length = asm.get("chrom_sizes", {}).get(self.chrom)
                if length is None:
                    problems.append(f"chrom {self.chrom!r} is not in assembly {self.assembly!r}")
                else:
                    n = math.ceil(int(length) / int(summary.get("bin_size", 25)))
                    if n != self.n_bins:
                        problems.append(
                            f"chrom {self.chrom!r}: expected {self.n_bins} bins, got {n}"
                        )
        if strict_hash and summary.get("manifest_hash") != self.store_hash:
            problems.append(
                f"manifest_hash: expected {self.store_hash}, got {summary.get('manifest_hash')}"
            )
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise StoreError(
                f"model vocabulary chrom {self.chrom!r}: the store does not match the model; "
                f"{len(problems)} problem(s):\n{lines}\nUse the store the model was trained on, "
                "or re-ingest the changed experiments and retrain."
            )


# --------------------------------------------------------------------------------------------
# Model base and registry
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One training batch, drawn on the device by ``ImputationModel.batches``.

    Attributes
    ----------
    size
        Number of training examples (for throughput figures and loss weighting).
    tensors
        Model-specific device tensors (indices, targets, masks); only the model reads them.
    """

    size: int
    tensors: dict[str, Tensor]


class ImputationModel(nn.Module):
    """Base of every imputation model the loop can train.

    Subclasses set ``Params`` (a :class:`epiray.config.Section`) and implement :meth:`build`,
    :meth:`batches`, :meth:`loss`, :meth:`predict`, :meth:`dense_parameters`,
    :meth:`sparse_parameters` and :meth:`freeze`.

    Dense parameters are the same on every worker (their gradients are averaged across workers
    each step and updated with Adam). Sparse parameters are worker-local (e.g. genome factors of
    the worker's own bins); their gradients must be torch sparse COO tensors touching only the
    rows a batch used (``nn.Embedding(sparse=True)``), and the loop updates only those rows.
    """

    Params: ClassVar[type[Section]]
    name: ClassVar[str] = ""
    #: Names :meth:`freeze` accepts.
    freezable: ClassVar[frozenset[str]] = frozenset()
    #: :meth:`predict` reads the observed tracks of its ChromData (eDICE), not only its bin
    #: range (Avocado): a logged model must then carry them.
    predicts_from_tracks: ClassVar[bool] = False
    #: Largest batch (examples per step and worker) ``batch_size: auto`` chooses.
    max_batch_size: ClassVar[int] = 40_000

    def __init__(self, params: Section, vocab: Vocabulary) -> None:
        super().__init__()
        self.params = params
        self.vocab = vocab

    @classmethod
    def build(cls, params: Section, vocab: Vocabulary, data: ChromData) -> ImputationModel:
        """Create a freshly initialised model for ``data`` (on ``data.device``)."""
        raise NotImplementedError

    @classmethod
    def from_state(
        cls,
        params: Section,
        vocab: Vocabulary,
        data: ChromData,
        state_dict: Mapping[str, Tensor],
    ) -> ImputationModel:
        """Rebuild a saved model: :meth:`build` then ``load_state_dict``.

        Models whose parameter shapes depend on their history (e.g. factors added by
        :meth:`extend`) override this to read the shapes from ``state_dict``.
        """
        model = cls.build(params, vocab, data)
        model.load_state_dict(state_dict)
        return model

    def batches(
        self, data: ChromData, generator: torch.Generator, batch_size: int
    ) -> Iterator[Batch]:
        """Yield one epoch of training batches, drawn on the device with ``generator``."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> Tensor:
        """Scalar mean squared error of the batch (float32)."""
        raise NotImplementedError

    def epoch_examples(self, data: ChromData) -> int:
        """Training examples one epoch of :meth:`batches` draws on ``data`` (default: one
        per bin)."""
        return data.n_local

    def steps_per_epoch(self, data: ChromData, batch_size: int) -> int:
        """Batches one epoch of :meth:`batches` yields at ``batch_size``."""
        return max(1, math.ceil(self.epoch_examples(data) / batch_size))

    def penalty(self) -> Tensor | None:
        """Regularisation added to every step's batch loss, or None (the default: none).

        A function of the dense parameters only, so it is the same on every worker and its
        gradient survives the all-reduce average; the loop keeps it out of ``train_mse``.
        """
        return None

    def predict(self, data: ChromData, biosample: int, assay: int) -> Tensor:
        """Imputed track ``[hi-lo]`` float32 (arcsinh scale) of (biosample, assay), on device."""
        raise NotImplementedError

    def predict_many(self, data: ChromData, pairs: list[tuple[int, int]]) -> Tensor:
        """Imputed tracks ``[len(pairs), hi-lo]`` of several (biosample, assay) pairs; models
        that share work between pairs (eDICE: one pass over the bins) override it."""
        if not pairs:
            return torch.zeros(0, data.hi - data.lo, device=data.device)
        return torch.stack([self.predict(data, b, a) for b, a in pairs])

    def predict_cells(self, data: ChromData, track: Tensor, bins: Tensor) -> Tensor:
        """Predictions ``[N]`` float32 of the cells (training track ``track[i]``, local bin
        ``bins[i]``) of ``data``, as imputations: the held-out cells of ``data.heldout`` are
        never inputs. Validation on held-out cells calls it under ``torch.no_grad``.

        This generic version imputes each track over the whole slab with :meth:`predict` and
        picks the cells; models override it to compute only the cells asked for.
        """
        out = torch.empty(track.shape[0], dtype=torch.float32, device=data.device)
        for t in torch.unique(track).tolist():
            sel = torch.nonzero(track == t, as_tuple=True)[0]
            full = self.predict(data, int(data.biosample[t]), int(data.assay[t]))
            out[sel] = full[bins[sel]].float()
        return out

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters shared by all workers (gradients all-reduced), trainable or not."""
        raise NotImplementedError

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Worker-local parameters with sparse row gradients (may be empty)."""
        return []

    def freeze(self, what: set[str]) -> None:
        """Stop training the named parts (``requires_grad = False``); see ``freezable``."""
        raise NotImplementedError

    @classmethod
    def memory_estimate(
        cls, params: Section, vocab: Vocabulary, size: SlabSize, batch_size: int
    ) -> dict[str, int] | None:
        """Bytes one worker needs to train on a slab of ``size``, by part, with ``"total"``;
        None when the model gives no estimate. The loop checks it against the device's
        memory before loading the slab and logs it with the run."""
        return None

    def embeddings(self) -> tuple[Tensor, Tensor] | None:
        """The learned ``[n_biosamples, d]`` and ``[n_assays, d']`` representations (factors
        or global embeddings), in vocabulary order, for the factor plots; None if the model has
        none."""
        return None

    def extend(self, vocab: Vocabulary) -> None:
        """Grow the model for new biosamples/assays appended to its vocabulary.

        Only the new rows are trainable afterwards unless the caller unfreezes the rest.
        """
        raise EpirayError(
            f"model {self.name!r}: adding biosamples or assays is not supported; expected a "
            "model implementing ImputationModel.extend. Retrain with the new experiments."
        )

    def load_dense_state(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load every dense parameter/buffer from ``state_dict``, keeping sparse parameters.

        Transfer to another chromosome: the network and the biosample/assay factors come from
        a trained model, the genome factors stay freshly initialised.
        """
        sparse = {id(p) for p in self.sparse_parameters()}
        names = {n for n, p in self.named_parameters() if id(p) in sparse}
        own = self.state_dict()
        missing = [k for k in own if k not in names and k not in state_dict]
        if missing:
            raise EpirayError(
                f"model {self.name!r}: transfer state lacks {missing}; expected every dense "
                "parameter of the model. Transfer only between models of the same kind."
            )
        sub = {k: v for k, v in state_dict.items() if k in own and k not in names}
        self.load_state_dict(sub, strict=False)

    def check_freeze(self, what: set[str]) -> None:
        """Raise ConfigError if ``what`` names something :meth:`freeze` cannot freeze."""
        bad = set(what) - set(self.freezable)
        if bad:
            raise ConfigError(
                f"model {self.name!r}: cannot freeze {sorted(bad)}; expected a subset of "
                f"{sorted(self.freezable)}. Fix the freeze list."
            )


_REGISTRY: dict[str, type[ImputationModel]] = {}
#: Modules that register the built-in models; imported on first lookup.
_BUILTIN = ("epiray.models.avocado", "epiray.models.edice")


def register(name: str) -> Callable[[type[ImputationModel]], type[ImputationModel]]:
    """Class decorator: make a model available as ``get_model(name)``."""

    def deco(cls: type[ImputationModel]) -> type[ImputationModel]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(
                f"model registry: name {name!r} already used by {_REGISTRY[name].__name__}; "
                f"expected a unique name, got it again for {cls.__name__}. Rename one."
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # a model file not written yet
            if exc.name != mod:
                raise


def available_models() -> list[str]:
    """Names of every registered model."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_model(name: str) -> type[ImputationModel]:
    """The model class registered as ``name``.

    Raises
    ------
    ConfigError
        If no model has that name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(
            f"model registry: unknown model {name!r}; expected one of {sorted(_REGISTRY)}. "
            "Fix model.name in the config."
        )
    return _REGISTRY[name]
