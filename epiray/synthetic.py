"""Synthetic human + mouse compendia with known structure (demo data and test ground truth).

:func:`generate` writes a complete, self-describing compendium into a directory:

```
OUT/
  genomes/hsSyn1.chrom.sizes, genomes/mmSyn1.chrom.sizes     UCSC-style chr1, chr2, ...
  tracks/<assembly>/<experiment>.bw                           raw signal (-log10 p-like, >= 0)
  manifest.tsv                                                experiment, species, assembly,
                                                              biosample, assay, category, path
  chains/hsSyn1ToMmSyn1.over.chain.gz                         human (target) -> mouse (query)
  truth/truth.json, truth/<assembly>/<chrom>.npy              every (biosample, assay) pair
  truth/<assembly>/<chrom>.clean.npy                          its noiseless signal (the floor)
  truth/<assembly>/<chrom>.states.npy                         chromatin state of every bin
  truth_alignment.npz                                         bin alignment implied by the chain
  synth.json                                                  params, seed, assemblies, counts
```

The generative model
--------------------
* A shared *merged* coordinate space carries latent chromatin states (promoter, enhancer,
  transcribed, polycomb, heterochromatin, quiescent, insulator) drawn as a Markov chain of
  segments. Each aligned *fragment* of the ancestor is laid out in merged coordinates as
  ``block, human-only gap, mouse-only gap, block, ...``; species-specific insertions get their
  own merged ranges. A species position maps to exactly one merged position, so aligned bases
  share their state by construction, and the chain file is derived from the same tables.
* The human and mouse genomes place the fragments in different orders and orientations
  (inversions give query ``-`` strand chains), separate them with species-specific insertions,
  and duplicate a few fragments in human only (mouse regions covered twice by the chain).
  Chromatin states turn over between species for a fraction of regulatory segments.
* Cell-type *programs* (liver, brain, ...) decide which promoters, enhancers and gene bodies are
  active; the same program exists in both species. Each biosample follows one program with a
  few biosample-specific flips.
* Each assay responds to states, activity and position within a segment (narrow marks peak at
  segment centres, broad marks cover domains); protein-binding assays read out sets of binding
  sites placed in promoters/enhancers of their programs. The raw signal is
  ``background + cap * tanh(response / cap) * multiplicative noise``, mostly 0-3 with peaks of
  20-50, the scale of -log10 p-value tracks.

The truth tensor is stored on the arcsinh scale, rounded to ``truth_dtype`` first; the bigWigs
hold ``sinh`` of those stored values, so ``arcsinh(binned bigWig) == truth`` up to float32
rounding. Every random draw comes from a generator keyed by ``(seed, purpose)``, so the same seed
gives byte-identical manifests and truth arrays.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import math
import os
import shutil
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from scipy.ndimage import uniform_filter1d

from epiray.config import Section
from epiray.errors import ConfigError, InputDataError, collect
from epiray.manifest import CATEGORIES as MANIFEST_CATEGORIES

logger = logging.getLogger(__name__)

SPECIES = ("human", "mouse")
ASSEMBLIES = {"human": "hsSyn1", "mouse": "mmSyn1"}
PREFIXES = {"human": "hs", "mouse": "mm"}
CHAIN_PATH = "chains/hsSyn1ToMmSyn1.over.chain.gz"
MANIFEST_COLUMNS = ("experiment", "species", "assembly", "biosample", "assay", "category", "path")
FORMAT = "epiray-synth/1"

STATES = (
    "promoter",
    "enhancer",
    "transcribed",
    "polycomb",
    "heterochromatin",
    "quiescent",
    "insulator",
)
_S = {name: i for i, name in enumerate(STATES)}
PROM, ENH, TX, PC, HET, QUIES, INS = range(len(STATES))

# Segment lengths (bases): minimum + exponential(mean - minimum).
_SEG_MIN = np.array([400, 300, 2000, 2000, 5000, 800, 150], dtype=np.float64)
_SEG_MEAN = np.array([1200, 800, 8000, 8000, 15000, 4000, 300], dtype=np.float64)
# Markov transitions between consecutive segments (row: from, column: to); no self-transitions.
# Stationary mix: ~30 promoters, ~70 enhancers, ~30 insulators per Mb; gene bodies ~30% and
# quiescent ~35% of the sequence.
_TRANSITIONS = np.array(
    [
        # prom  enh   tx    pc    het   quies ins
        [0.00, 0.10, 0.65, 0.05, 0.00, 0.12, 0.08],  # promoter -> mostly a gene body
        [0.15, 0.00, 0.10, 0.05, 0.00, 0.55, 0.15],  # enhancer
        [0.05, 0.35, 0.00, 0.05, 0.02, 0.43, 0.10],  # transcribed
        [0.30, 0.10, 0.05, 0.00, 0.05, 0.40, 0.10],  # polycomb (bivalent promoters nearby)
        [0.02, 0.05, 0.03, 0.15, 0.00, 0.60, 0.15],  # heterochromatin
        [0.12, 0.55, 0.06, 0.06, 0.06, 0.00, 0.15],  # quiescent
        [0.20, 0.30, 0.10, 0.05, 0.05, 0.30, 0.00],  # insulator
    ]
)
# Segment activity per program: P(constitutive), P(active in a given program otherwise).
_CONSTITUTIVE = np.array([0.45, 0.15, 0.35, 0.0, 0.0, 0.0, 0.0])
_PER_PROGRAM = np.array([0.30, 0.30, 0.30, 0.15, 0.0, 0.0, 0.0])
_REGULATORY = np.array([True, True, True, True, False, False, False])

_NOISE_BP = 120  # correlation length of the noise (about a sequenced fragment)
_CAP = 45.0  # saturation of the raw signal (cap · tanh(response / cap))
_CLEAN_GRID = 257  # points of arcsinh(S) on which the noiseless signal is tabulated

PROGRAMS = ("liver", "brain", "blood", "heart", "esc", "fibroblast")
CATEGORIES = MANIFEST_CATEGORIES


@dataclass(frozen=True)
class SiteSpec:
    """Binding sites of a protein-binding assay, placed in merged (ancestral) coordinates.

    Attributes
    ----------
    states
        Chromatin states whose segments carry sites (a site is lost in a species where its
        segment's state turned over).
    programs
        Site placement favours segments active in these programs.
    expressed
        Programs in which the factor is expressed (``None``: all); elsewhere occupancy is
        scaled by ``off_expression``.
    silent
        Programs in which the factor is not expressed (a repressor like REST).
    requires_activity
        Occupancy also needs the site's segment to be active in the biosample.
    density
        Sites per candidate segment (ignored when ``center``).
    width_bp
        Standard deviation of the binding profile in bases.
    center
        One site at the centre of every candidate segment (CTCF at insulators).
    """

    states: tuple[str, ...]
    programs: tuple[str, ...] = ()
    expressed: tuple[str, ...] | None = None
    silent: tuple[str, ...] = ()
    requires_activity: bool = True
    density: float = 0.5
    width_bp: float = 120.0
    center: bool = False
    off_expression: float = 0.08


@dataclass(frozen=True)
class AssaySpec:
    """How one assay responds to the latent structure.

    Attributes
    ----------
    name, category
        Assay name and activity category (one of :data:`CATEGORIES`).
    terms
        ``(feature, amplitude)`` pairs summed into the response, in raw signal units. Features:
        ``prom_act_narrow`` (active promoter, peaked at the segment centre), ``prom_biv_narrow``
        and ``prom_biv`` (inactive bivalent promoter), ``prom_act_flank`` (active promoter away
        from its centre), ``prom_act``, ``enh_act_narrow``, ``enh_act``, ``enh_inact``,
        ``tx_act`` (active gene body), ``pc_rep`` (repressed polycomb domain), ``het``,
        ``quies``, ``ins_narrow`` (insulator centre) and ``sites`` (the assay's binding sites).
    background
        Mean background level of the raw signal.
    sites
        Binding sites, for protein-binding assays that read them out.
    """

    name: str
    category: str
    terms: tuple[tuple[str, float], ...]
    background: float = 0.3
    sites: SiteSpec | None = None


def _tf(name: str, sites: SiteSpec, height: float = 30.0) -> AssaySpec:
    return AssaySpec(name, "protein_binding", (("sites", height),), 0.27, sites)


ASSAY_CATALOGUE: dict[str, AssaySpec] = {
    a.name: a
    for a in [
        AssaySpec(
            "H3K4me3",
            "histone_modification",
            (("prom_act_narrow", 32.0), ("prom_biv_narrow", 8.0), ("enh_act_narrow", 3.0)),
        ),
        AssaySpec(
            "H3K27ac",
            "histone_modification",
            (("prom_act_narrow", 22.0), ("enh_act_narrow", 18.0)),
        ),
        AssaySpec(
            "H3K4me1",
            "histone_modification",
            (("enh_act", 7.0), ("enh_inact", 1.5), ("prom_act_flank", 5.0), ("tx_act", 0.8)),
        ),
        AssaySpec(
            "H3K27me3",
            "histone_modification",
            (("pc_rep", 4.5), ("prom_biv", 4.0), ("enh_inact", 0.6)),
        ),
        AssaySpec("H3K36me3", "histone_modification", (("tx_act", 5.0),)),
        AssaySpec("H3K9me3", "histone_modification", (("het", 5.0), ("quies", 0.3))),
        AssaySpec(
            "DNase",
            "accessibility",
            (("prom_act_narrow", 26.0), ("enh_act_narrow", 12.0), ("ins_narrow", 10.0)),
            0.21,
        ),
        AssaySpec("RNA", "transcription", (("tx_act", 9.0), ("prom_act", 3.0)), 0.07),
        _tf("CTCF", SiteSpec(("insulator",), requires_activity=False, center=True), 40.0),
        AssaySpec(
            "POLR2A",
            "protein_binding",
            (("prom_act_narrow", 26.0), ("tx_act", 1.5)),
            0.27,
        ),
        AssaySpec(
            "EP300",
            "protein_binding",
            (("enh_act_narrow", 16.0), ("prom_act_narrow", 4.0)),
            0.27,
        ),
        _tf(
            "CEBPB",
            SiteSpec(
                ("enhancer", "promoter"), ("liver", "blood"), ("liver", "blood"), density=0.6
            ),
        ),
        _tf("HNF4A", SiteSpec(("enhancer", "promoter"), ("liver",), ("liver",), density=0.5)),
        _tf(
            "REST",
            SiteSpec(
                ("promoter", "enhancer"),
                ("brain",),
                silent=("brain",),
                requires_activity=False,
                density=0.15,
            ),
            25.0,
        ),
        _tf("GATA1", SiteSpec(("enhancer",), ("blood",), ("blood",), density=0.6)),
        _tf(
            "MEF2A",
            SiteSpec(
                ("enhancer", "promoter"), ("heart", "brain"), ("heart", "brain"), density=0.5
            ),
        ),
    ]
}
DEFAULT_ASSAYS = tuple(ASSAY_CATALOGUE)
DEFAULT_HUMAN_ONLY = ("GATA1", "MEF2A")
PRESETS = ("tiny", "default", "large", "bench")


def _extra_tf(i: int, programs: Sequence[str]) -> AssaySpec:
    """The ``i``-th generic transcription factor ``TF01, TF02, ...`` (0-based ``i``)."""
    n = len(programs)
    progs = tuple(dict.fromkeys([programs[i % n], programs[(3 * i + 1) % n]]))
    return _tf(f"TF{i + 1:02d}", SiteSpec(("enhancer", "promoter"), progs, progs, density=0.4))


class SynthParams(Section):
    """Sizes and rates of a synthetic compendium. All sizes are configurable.

    Genome sizes are targets (within a few percent); chromosome lengths are never multiples of
    ``bin_size``. The experiment design guarantees ``min_*_per_assay`` experiments per assay
    (``mouse_rare_assays`` get ``rare_mouse_experiments``) spread evenly over biosamples, then
    fills up to ``*_experiments`` at random, favouring histone marks, accessibility and RNA.

    Attributes
    ----------
    bin_size
        Bin width in bases (25 in every method of METHODS.md).
    human_genome_bp, mouse_genome_bp, human_chroms, mouse_chroms
        Genome sizes (bases) and chromosome counts of ``hsSyn1`` and ``mmSyn1``.
    aligned_fraction
        Share of the mouse genome in aligned fragments, gaps included (~40% of mouse bins end
        up aligned at the default).
    fragment_mean_bp
        Mean length of an aligned fragment (one chain per human copy).
    block_median_bp, short_block_fraction
        Median ungapped block length (log-normal), and the exact share of blocks shorter than
        25 bp.
    gap_median_bp, large_gap_fraction
        Median chain gap length per side (log-normal), and the share of 1-8 kb gaps. Gaps are
        30% double-sided, 35% human-only (``dq = 0``), 35% mouse-only (``dt = 0``).
    inversion_fraction
        About this share of fragments lie on opposite strands (query ``-`` chains).
    duplication_fraction
        Share of fragments duplicated in human only (their mouse copy is covered twice).
    insertion_slot_fraction
        Share of junctions between fragments that carry species-specific sequence (chromosome
        ends always do).
    state_turnover, activity_turnover, site_turnover
        Per-species loss of enhancers/insulators (promoters at a third of the rate), flips of
        a segment's activity in a program, and loss of binding sites.
    biosample_flip
        Share of regulatory segments whose activity differs from the biosample's program.
    programs
        Cell-type programs shared by both species; biosamples cycle through them.
    human_biosamples, mouse_biosamples
        Biosamples per species (``hs.B1``..., ``mm.B1``...).
    assays
        Assays from :data:`ASSAY_CATALOGUE`; ``extra_protein_binding`` adds generic factors
        ``TF01``... run in both species.
    human_only_assays
        Never run in mouse (zero-shot targets); their mouse truth is still written.
    human_experiments, mouse_experiments, min_human_per_assay, min_mouse_per_assay
        Experiment counts.
    mouse_rare_assays, rare_mouse_experiments
        Mouse assays run fewer times (not evaluable by a 3-fold experiment CV).
    background, noise
        Scale of the background signal, and the log-normal sd of the multiplicative noise.
    truth_dtype
        dtype of the stored truth; the bigWigs hold ``sinh`` of the stored values.
    """

    bin_size: int = Field(25, gt=0)
    human_genome_bp: int = Field(1_900_000, gt=0)
    mouse_genome_bp: int = Field(1_500_000, gt=0)
    human_chroms: int = Field(4, ge=1)
    mouse_chroms: int = Field(3, ge=1)
    aligned_fraction: float = Field(0.6, gt=0.0, lt=1.0)
    fragment_mean_bp: int = Field(30_000, ge=500)
    block_median_bp: int = Field(200, ge=25)
    short_block_fraction: float = Field(0.06, ge=0.0, le=0.5)
    gap_median_bp: int = Field(12, ge=1)
    large_gap_fraction: float = Field(0.03, ge=0.0, le=0.5)
    inversion_fraction: float = Field(0.25, ge=0.0, le=1.0)
    duplication_fraction: float = Field(0.04, ge=0.0, le=0.5)
    insertion_slot_fraction: float = Field(0.35, ge=0.0, le=1.0)
    state_turnover: float = Field(0.1, ge=0.0, le=1.0)
    activity_turnover: float = Field(0.05, ge=0.0, le=1.0)
    site_turnover: float = Field(0.15, ge=0.0, le=1.0)
    biosample_flip: float = Field(0.03, ge=0.0, le=0.5)
    programs: tuple[str, ...] = PROGRAMS
    human_biosamples: int = Field(12, ge=1)
    mouse_biosamples: int = Field(12, ge=1)
    assays: tuple[str, ...] = DEFAULT_ASSAYS
    human_only_assays: tuple[str, ...] = DEFAULT_HUMAN_ONLY
    extra_protein_binding: int = Field(0, ge=0, le=99)
    human_experiments: int = Field(100, ge=1)
    mouse_experiments: int = Field(44, ge=0)
    min_human_per_assay: int = Field(3, ge=1)
    min_mouse_per_assay: int = Field(3, ge=1)
    mouse_rare_assays: tuple[str, ...] = ("H3K9me3",)
    rare_mouse_experiments: int = Field(2, ge=0)
    background: float = Field(1.0, ge=0.0)
    noise: float = Field(0.3, ge=0.0)
    truth_dtype: Literal["float16", "float32"] = "float16"

    @classmethod
    def tiny(cls, **overrides) -> SynthParams:
        """A ~0.5 Mb compendium with 4 biosamples per species, for tests (< 2 s)."""
        base = dict(
            human_genome_bp=300_000,
            mouse_genome_bp=240_000,
            human_chroms=2,
            mouse_chroms=2,
            fragment_mean_bp=12_000,
            human_biosamples=4,
            mouse_biosamples=4,
            human_experiments=40,
            mouse_experiments=30,
            min_human_per_assay=2,
            min_mouse_per_assay=2,
            rare_mouse_experiments=1,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> SynthParams:
        """Named sizes.

        ``tiny``: ~0.5 Mb, 70 experiments (tests). ``default``: the quickstart, mouse 1.5 Mb in 3
        chromosomes (60 k bins), human 1.9 Mb in 4, 12 biosamples per species, 100 human and 44
        mouse experiments. ``large``: the same design on mouse 5.5 Mb (220 k bins) and human
        7 Mb. ``bench``: ``large`` with 16 biosamples per species and 200 experiments (150 human,
        50 mouse).

        Raises
        ------
        ConfigError
            For an unknown name.
        """
        if name == "tiny":
            return cls.tiny(**overrides)
        if name == "default":
            return cls(**overrides)
        large = dict(human_genome_bp=7_000_000, mouse_genome_bp=5_500_000, fragment_mean_bp=60_000)
        if name == "large":
            return cls(**{**large, **overrides})
        if name == "bench":
            base = dict(
                **large,
                human_biosamples=16,
                mouse_biosamples=16,
                human_experiments=150,
                mouse_experiments=50,
            )
            return cls(**{**base, **overrides})
        raise ConfigError(
            f"synthetic preset: unknown name; expected one of {list(PRESETS)}, "
            f"got {name!r}. Pick one of those or pass SynthParams(...) explicitly."
        )

    def all_assays(self) -> tuple[str, ...]:
        """The assay axis (both species): ``assays`` then ``TF01..`` for extra factors."""
        extra = tuple(f"TF{i + 1:02d}" for i in range(self.extra_protein_binding))
        return tuple(self.assays) + extra

    def assay_specs(self) -> list[AssaySpec]:
        """The :class:`AssaySpec` of every assay of :meth:`all_assays`, in order."""
        specs = [ASSAY_CATALOGUE[a] for a in self.assays]
        return specs + [_extra_tf(i, self.programs) for i in range(self.extra_protein_binding)]

    def mouse_assays(self) -> tuple[str, ...]:
        """Assays run in mouse: all but ``human_only_assays``."""
        return tuple(a for a in self.all_assays() if a not in self.human_only_assays)

    def check(self) -> None:
        """Cross-field validation, every problem at once.

        Raises
        ------
        ConfigError
            Unknown or repeated assays/programs, an infeasible experiment design.
        """
        where = "synthetic params"
        problems: list[str] = []
        unknown = [a for a in self.assays if a not in ASSAY_CATALOGUE]
        if unknown:
            problems.append(
                f"{where}: unknown assays {unknown}; expected names from "
                f"{list(ASSAY_CATALOGUE)}. Use extra_protein_binding for more factors."
            )
        for name, seq in (("assays", self.assays), ("programs", self.programs)):
            if len(set(seq)) != len(seq) or not seq:
                problems.append(
                    f"{where}: {name} must be non-empty and unique; got {list(seq)}. "
                    "Remove the duplicates."
                )
        for name, sub in (
            ("human_only_assays", self.human_only_assays),
            ("mouse_rare_assays", self.mouse_rare_assays),
        ):
            bad = [a for a in sub if a not in self.assays]
            if bad:
                problems.append(
                    f"{where}: {name} {bad} are not in assays; expected a subset of "
                    f"{list(self.assays)}. Add them to assays or drop them."
                )
        both = set(self.human_only_assays) & set(self.mouse_rare_assays)
        if both:
            problems.append(
                f"{where}: {sorted(both)} are both human-only and rare in mouse; expected "
                "disjoint lists. Drop them from one."
            )
        if not unknown:
            for spec in self.assay_specs():
                s = spec.sites
                if s is not None and s.programs and not set(s.programs) & set(self.programs):
                    problems.append(
                        f"{where}: assay {spec.name} binds in programs {list(s.programs)}, none "
                        f"of which is in programs {list(self.programs)}. Add one of them."
                    )
        n_all = len(self.all_assays())
        n_mouse = len(self.mouse_assays())
        n_rare = len([a for a in self.mouse_rare_assays if a in self.mouse_assays()])
        if self.min_human_per_assay > self.human_biosamples:
            problems.append(
                f"{where}: min_human_per_assay exceeds human_biosamples; expected <= "
                f"{self.human_biosamples}, got {self.min_human_per_assay}."
            )
        if max(self.min_mouse_per_assay, self.rare_mouse_experiments) > self.mouse_biosamples:
            problems.append(
                f"{where}: min_mouse_per_assay / rare_mouse_experiments exceed mouse_biosamples; "
                f"expected <= {self.mouse_biosamples}, got "
                f"{max(self.min_mouse_per_assay, self.rare_mouse_experiments)}."
            )
        lo, hi = n_all * self.min_human_per_assay, n_all * self.human_biosamples
        if not lo <= self.human_experiments <= hi:
            problems.append(
                f"{where}: human_experiments out of range; expected {lo}..{hi} "
                f"({n_all} assays x {self.human_biosamples} biosamples), got "
                f"{self.human_experiments}. Change human_experiments or the assay minimum."
            )
        lo = (n_mouse - n_rare) * self.min_mouse_per_assay + n_rare * self.rare_mouse_experiments
        hi = (n_mouse - n_rare) * self.mouse_biosamples + n_rare * self.rare_mouse_experiments
        if not lo <= self.mouse_experiments <= hi:
            problems.append(
                f"{where}: mouse_experiments out of range; expected {lo}..{hi} ({n_mouse} mouse "
                f"assays, {n_rare} rare, {self.mouse_biosamples} biosamples), got "
                f"{self.mouse_experiments}. Change mouse_experiments or the assay minimum."
            )
        collect(problems, where, ConfigError)


# ------------------------------------------------------------------------------------ randomness
def _rng(seed: int, *tags: str | int) -> np.random.Generator:
    """An independent generator for ``(seed, *tags)``: adding a draw elsewhere changes nothing
    here."""
    key = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    key += [zlib.crc32(t.encode()) if isinstance(t, str) else int(t) for t in tags]
    return np.random.default_rng(key)


def _exact_mask(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """bool [n] with exactly ``round(fraction * n)`` True (at least one if fraction > 0)."""
    k = 0 if fraction <= 0 or n == 0 else min(n, max(1, round(fraction * n)))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def _ranges(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(first[i], first[i] + count[i])`` over i (int64)."""
    total = int(count.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    return np.repeat(first.astype(np.int64), count) + offsets


# ---------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class Pieces:
    """The pieces of one species' genome, in chromosome order.

    Attributes
    ----------
    chrom
        int64 [P]: chromosome index (into the species' chromosome names).
    start, length
        int64 [P]: 0-based start in the chromosome and length, in bases.
    kind
        int8 [P]: 0 = an aligned fragment, 1 = species-specific insertion.
    ident
        int64 [P]: fragment index (kind 0) or insertion index (kind 1).
    orient
        int8 [P]: +1 / -1, the piece's orientation relative to merged coordinates.
    """

    chrom: np.ndarray
    start: np.ndarray
    length: np.ndarray
    kind: np.ndarray
    ident: np.ndarray
    orient: np.ndarray


@dataclass(frozen=True)
class SynthLayout:
    """How the two genomes are built from merged coordinates; the alignment ground truth.

    Merged coordinates: fragment ``k`` occupies ``[frag_merged_start[k], + frag_merged_len[k])``
    as the elements ``block, human-only gap, mouse-only gap, block, ...`` (zero-length elements
    dropped); insertions follow all fragments. A species sees the blocks and its own gaps.

    Attributes
    ----------
    bin_size
        Bin width in bases.
    chrom_sizes
        species -> {chrom: length in bases}.
    pieces
        species -> :class:`Pieces`.
    el_merged_start, el_len, el_kind, el_frag
        int64 [E] element tables (kind 0 block, 1 human-only gap, 2 mouse-only gap).
    el_vis_start
        species -> int64 [E]: start of the element in that species' concatenated fragment
        coordinates (-1 where the species does not see the element).
    frag_vis_base, frag_vis_len
        species -> int64 [K]: start / length of fragment ``k`` in those coordinates.
    blk_el
        int64 [N]: element index of every aligned block (in merged order).
    blk_frag, blk_size
        int64 [N]: fragment and size (bases) of every block.
    ins_merged_start
        species -> int64 [I]: merged start of every insertion of that species.
    merged_length
        Total length of merged coordinates.
    mouse_piece_of_frag
        int64 [K]: the (unique) mouse piece of every fragment.
    """

    bin_size: int
    chrom_sizes: dict[str, dict[str, int]]
    pieces: dict[str, Pieces]
    el_merged_start: np.ndarray
    el_len: np.ndarray
    el_kind: np.ndarray
    el_frag: np.ndarray
    el_vis_start: dict[str, np.ndarray]
    frag_vis_base: dict[str, np.ndarray]
    frag_vis_len: dict[str, np.ndarray]
    blk_el: np.ndarray
    blk_frag: np.ndarray
    blk_size: np.ndarray
    ins_merged_start: dict[str, np.ndarray]
    merged_length: int
    mouse_piece_of_frag: np.ndarray
    _vis_index: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def n_fragments(self) -> int:
        """Number of aligned fragments."""
        return len(self.frag_vis_len["mouse"])

    def chroms(self, species: str) -> list[str]:
        """Chromosome names of ``species`` in order."""
        return list(self.chrom_sizes[species])

    def _locate(
        self, species: str, chrom: str, pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Merged coordinate, element index (-1 in insertions) and piece index of positions."""
        names = self.chroms(species)
        if chrom not in names:
            raise InputDataError(
                f"synthetic layout: chromosome {chrom!r} not in {ASSEMBLIES[species]}; expected "
                f"one of {names}. Use a chromosome of that assembly."
            )
        pos = np.asarray(pos, dtype=np.int64)
        size = self.chrom_sizes[species][chrom]
        if pos.size and (pos.min() < 0 or pos.max() >= size):
            raise InputDataError(
                f"synthetic layout {ASSEMBLIES[species]} {chrom}: positions out of range; "
                f"expected 0..{size - 1}, got {pos.min()}..{pos.max()}."
            )
        P = self.pieces[species]
        sel = np.flatnonzero(P.chrom == names.index(chrom))
        k = sel[np.searchsorted(P.start[sel], pos, side="right") - 1]
        off = pos - P.start[k]
        off = np.where(P.orient[k] < 0, P.length[k] - 1 - off, off)
        ident = P.ident[k]
        frag = P.kind[k] == 0
        merged = np.empty_like(pos)
        elem = np.full(pos.shape, -1, dtype=np.int64)
        merged[~frag] = self.ins_merged_start[species][ident[~frag]] + off[~frag]
        g = self.frag_vis_base[species][ident[frag]] + off[frag]
        vis = self._vis_index[species]
        vstart = self.el_vis_start[species][vis]
        e = vis[np.searchsorted(vstart, g, side="right") - 1]
        merged[frag] = self.el_merged_start[e] + (g - self.el_vis_start[species][e])
        elem[frag] = e
        return merged, elem, k

    def to_merged(self, species: str, chrom: str, pos: np.ndarray) -> np.ndarray:
        """Merged coordinates of 0-based positions ``pos`` (int64 [n]) on ``species`` ``chrom``.

        Returns
        -------
        numpy.ndarray
            int64 [n]. Aligned bases of the two species share their merged coordinate.
        """
        return self._locate(species, chrom, pos)[0]

    def lift(self, chrom: str, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map human ``hsSyn1`` positions to mouse ``mmSyn1`` through the true alignment.

        Parameters
        ----------
        chrom
            Human chromosome.
        pos
            int64 [n], 0-based positions on it.

        Returns
        -------
        mouse_chrom : numpy.ndarray
            str [n], ``""`` where the base is not in an aligned block.
        mouse_pos : numpy.ndarray
            int64 [n], 0-based forward-strand position, -1 where unaligned.
        strand : numpy.ndarray
            str [n], ``"+"`` / ``"-"`` (relative orientation), ``""`` where unaligned.
        """
        merged, elem, hp = self._locate("human", chrom, pos)
        ok = elem >= 0
        ok[ok] = self.el_kind[elem[ok]] == 0
        e = elem[ok]
        frag = self.el_frag[e]
        g = self.el_vis_start["mouse"][e] + (merged[ok] - self.el_merged_start[e])
        off = g - self.frag_vis_base["mouse"][frag]
        M = self.pieces["mouse"]
        mp = self.mouse_piece_of_frag[frag]
        off = np.where(M.orient[mp] < 0, M.length[mp] - 1 - off, off)
        names = np.array(self.chroms("mouse"))
        mouse_chrom = np.full(len(ok), "", dtype=names.dtype)
        mouse_pos = np.full(len(ok), -1, dtype=np.int64)
        strand = np.full(len(ok), "", dtype="<U1")
        mouse_chrom[ok] = names[M.chrom[mp]]
        mouse_pos[ok] = M.start[mp] + off
        rel = self.pieces["human"].orient[hp[ok]] * M.orient[mp]
        strand[ok] = np.where(rel > 0, "+", "-")
        return mouse_chrom, mouse_pos, strand

    def blocks(self) -> dict[str, np.ndarray]:
        """Every ungapped aligned block of the chain file, in forward coordinates.

        Returns
        -------
        dict
            ``chain`` (int64, 0-based chain index = human piece order), ``human_chrom``,
            ``mouse_chrom`` (str), ``human_start``, ``mouse_start``, ``size`` (int64, bases,
            forward strand) and ``strand`` (int8, +1 / -1 relative orientation), one entry per
            block, sorted by chain then human start.
        """
        H, M = self.pieces["human"], self.pieces["mouse"]
        hp = np.flatnonzero(H.kind == 0)
        frag_of_hp = H.ident[hp]
        first = np.searchsorted(self.blk_frag, np.arange(self.n_fragments))
        count = np.bincount(self.blk_frag, minlength=self.n_fragments)
        cnt = count[frag_of_hp]
        piece = np.repeat(hp, cnt)
        blk = _ranges(first[frag_of_hp], cnt)
        frag, size, el = self.blk_frag[blk], self.blk_size[blk], self.blk_el[blk]
        hv = self.el_vis_start["human"][el] - self.frag_vis_base["human"][frag]
        mv = self.el_vis_start["mouse"][el] - self.frag_vis_base["mouse"][frag]
        oh = H.orient[piece]
        hstart = H.start[piece] + np.where(oh > 0, hv, H.length[piece] - hv - size)
        mp = self.mouse_piece_of_frag[frag]
        om = M.orient[mp]
        mstart = M.start[mp] + np.where(om > 0, mv, M.length[mp] - mv - size)
        chain = np.searchsorted(hp, piece)
        order = np.lexsort((hstart, chain))
        hnames, mnames = np.array(self.chroms("human")), np.array(self.chroms("mouse"))
        return {
            "chain": chain[order],
            "human_chrom": hnames[H.chrom[piece]][order],
            "human_start": hstart[order],
            "mouse_chrom": mnames[M.chrom[mp]][order],
            "mouse_start": mstart[order],
            "size": size[order],
            "strand": (oh * om).astype(np.int8)[order],
        }


def _build_layout(seed: int, p: SynthParams) -> SynthLayout:
    """Draw fragments, gaps, insertions, orders and orientations of both genomes."""
    rng = _rng(seed, "layout")
    sigma_b, sigma_g = 0.9, 1.2
    mean_block = p.block_median_bp * np.exp(sigma_b**2 / 2)
    mean_gap = (1 - p.large_gap_fraction) * p.gap_median_bp * np.exp(sigma_g**2 / 2)
    mean_gap += p.large_gap_fraction * 4500
    unit = mean_block + 0.65 * mean_gap  # mouse bases per block, gaps included
    target = p.aligned_fraction * p.mouse_genome_bp
    n_frag = max(2, max(p.human_chroms, p.mouse_chroms), round(target / p.fragment_mean_bp))
    frag_bp = rng.gamma(2.0, 0.5, n_frag) * (target / n_frag)
    nb = np.maximum(2, np.round(frag_bp / unit)).astype(np.int64)
    n_blk = int(nb.sum())
    blk_frag = np.repeat(np.arange(n_frag), nb)
    size = np.clip(
        np.round(p.block_median_bp * np.exp(sigma_b * rng.standard_normal(n_blk))), 25, 20_000
    ).astype(np.int64)
    short = _exact_mask(rng, n_blk, p.short_block_fraction)
    size[short] = rng.integers(3, 25, int(short.sum()))
    # gaps after every block but the last of its fragment: exact shares of the three kinds
    has_gap = np.ones(n_blk, dtype=bool)
    has_gap[np.cumsum(nb) - 1] = False
    gi = np.flatnonzero(has_gap)
    n_gap = len(gi)
    glen = np.clip(
        np.round(p.gap_median_bp * np.exp(sigma_g * rng.standard_normal((n_gap, 2)))), 1, 2000
    ).astype(np.int64)
    large = _exact_mask(rng, n_gap, p.large_gap_fraction)
    glen[large] = rng.integers(1000, 8000, (int(large.sum()), 2))
    kind = np.full(n_gap, 2)  # 0 both, 1 human-only, 2 mouse-only
    perm = rng.permutation(n_gap)
    n_both, n_h = max(1, round(0.3 * n_gap)), max(1, round(0.35 * n_gap))
    kind[perm[:n_both]] = 0
    kind[perm[n_both : n_both + n_h]] = 1
    gh = np.zeros(n_blk, dtype=np.int64)
    gm = np.zeros(n_blk, dtype=np.int64)
    gh[gi] = np.where(kind != 2, glen[:, 0], 0)
    gm[gi] = np.where(kind != 1, glen[:, 1], 0)

    # element tables in merged coordinates: block, human gap, mouse gap per block
    lens = np.stack([size, gh, gm], axis=1).ravel()
    ekind = np.tile(np.array([0, 1, 2]), n_blk)
    efrag = np.repeat(blk_frag, 3)
    eblk = np.repeat(np.arange(n_blk), 3)
    keep = lens > 0
    lens, ekind, efrag, eblk = lens[keep], ekind[keep], efrag[keep], eblk[keep]
    estart = np.cumsum(lens) - lens
    blk_el = np.flatnonzero(ekind == 0)
    assert np.array_equal(eblk[blk_el], np.arange(n_blk))
    frag_first_el = np.searchsorted(efrag, np.arange(n_frag))
    vis_start, vis_base, vis_len, vis_index = {}, {}, {}, {}
    for sp, hidden in (("human", 2), ("mouse", 1)):
        vlen = np.where(ekind == hidden, 0, lens)
        vs = np.cumsum(vlen) - vlen
        vis_base[sp] = vs[frag_first_el]
        vis_len[sp] = np.bincount(efrag, weights=vlen, minlength=n_frag).astype(np.int64)
        vis_start[sp] = np.where(ekind == hidden, -1, vs)
        vis_index[sp] = np.flatnonzero(ekind != hidden)
    frag_merged_total = int(lens.sum())

    # piece orders: mouse keeps the ancestral order with single-fragment inversions; human
    # shuffles runs of fragments, inverting some runs, and duplicates a few fragments.
    m_order = np.arange(n_frag)
    m_orient = np.where(_exact_mask(rng, n_frag, p.inversion_fraction / 2), -1, 1)
    cuts = np.flatnonzero(rng.random(n_frag - 1) < 1 / 3) + 1
    runs = np.split(np.arange(n_frag), cuts)
    run_perm = rng.permutation(len(runs))
    run_inv = _exact_mask(rng, len(runs), p.inversion_fraction / 2)
    h_order, h_orient = [], []
    for r in run_perm:
        frags = runs[r][::-1] if run_inv[r] else runs[r]
        h_order.append(frags)
        h_orient.append(np.full(len(frags), -1 if run_inv[r] else 1))
    h_order, h_orient = np.concatenate(h_order), np.concatenate(h_orient)
    rel = h_orient[np.argsort(h_order)] * m_orient
    if p.inversion_fraction > 0 and not (rel < 0).any():
        m_orient[0] = -m_orient[0]  # guarantee at least one query '-' chain
    dup = np.flatnonzero(_exact_mask(rng, n_frag, p.duplication_fraction))
    dup_orient = np.where(rng.random(len(dup)) < 0.5, -1, 1)
    at = np.sort(rng.integers(0, n_frag + 1, len(dup)))
    h_order = np.insert(h_order, at, dup)
    h_orient = np.insert(h_orient, at, dup_orient)

    pieces: dict[str, Pieces] = {}
    sizes: dict[str, dict[str, int]] = {}
    ins_start: dict[str, np.ndarray] = {}
    merged_next = frag_merged_total
    problems: list[str] = []
    for sp, order, orient, n_chrom, genome_bp in (
        ("human", h_order, h_orient, p.human_chroms, p.human_genome_bp),
        ("mouse", m_order, m_orient, p.mouse_chroms, p.mouse_genome_bp),
    ):
        flen = vis_len[sp][order]
        # split the fragment sequence into chromosomes of decreasing size, >= 1 fragment each
        w = 1.0 - 0.35 * np.arange(n_chrom) / max(1, n_chrom - 1)
        cum_w = np.cumsum(w)[:-1] / w.sum()
        bounds = np.searchsorted(np.cumsum(flen), cum_w * flen.sum()) + 1
        for i in range(n_chrom - 1):
            lo_b = (bounds[i - 1] if i else 0) + 1
            bounds[i] = min(max(bounds[i], lo_b), len(order) - (n_chrom - 1 - i))
        chunk = np.searchsorted(bounds, np.arange(len(order)), side="right")
        # insertion slots: both chromosome ends always, inner junctions sometimes
        slot_chrom, slot_pos = [], []  # slot before fragment j of its chrom (pos = len: at end)
        for c in range(n_chrom):
            idx = np.flatnonzero(chunk == c)
            inner = np.flatnonzero(rng.random(len(idx) - 1) < p.insertion_slot_fraction) + 1
            pos = np.concatenate([[0], inner, [len(idx)]])
            slot_chrom.append(np.full(len(pos), c))
            slot_pos.append(pos)
        slot_chrom, slot_pos = np.concatenate(slot_chrom), np.concatenate(slot_pos)
        need = genome_bp - int(flen.sum())
        if need < 100 * len(slot_pos):
            problems.append(
                f"synthetic params: {sp}_genome_bp too small for the aligned fragments; "
                f"expected >= {int(flen.sum()) + 100 * len(slot_pos)}, got {genome_bp}. Raise "
                "it or lower aligned_fraction."
            )
            continue
        wins = rng.gamma(0.7, 1.0, len(slot_pos))
        ins_len = np.maximum(100, np.floor(wins / wins.sum() * need)).astype(np.int64)
        # assemble pieces chromosome by chromosome (a loop over pieces, not bases)
        rows = []  # (chrom, kind, ident, orient, length)
        n_ins = 0
        for c in range(n_chrom):
            idx = np.flatnonzero(chunk == c)
            s_here = np.flatnonzero(slot_chrom == c)
            slots = dict(zip(slot_pos[s_here].tolist(), s_here.tolist()))
            for j in range(len(idx) + 1):
                if j in slots:
                    rows.append((c, 1, n_ins, 1, int(ins_len[slots[j]])))
                    n_ins += 1
                if j < len(idx):
                    f = int(order[idx[j]])
                    rows.append((c, 0, f, int(orient[idx[j]]), int(vis_len[sp][f])))
        arr = np.array(rows, dtype=np.int64)
        chrom_of, kind_of, ident, ori, plen = arr.T
        # chromosome lengths never multiples of bin_size: lengthen the last insertion
        sizes_c = np.bincount(chrom_of, weights=plen, minlength=n_chrom).astype(np.int64)
        bump = rng.integers(1, max(2, p.bin_size), n_chrom) * (sizes_c % p.bin_size == 0)
        last = np.searchsorted(chrom_of, np.arange(n_chrom), side="right") - 1
        plen[last] += bump
        ins_len_final = plen[kind_of == 1]
        starts = np.cumsum(plen) - plen
        chrom_first = np.searchsorted(chrom_of, np.arange(n_chrom))
        starts = starts - starts[chrom_first][chrom_of]
        pieces[sp] = Pieces(
            chrom_of, starts, plen, kind_of.astype(np.int8), ident, ori.astype(np.int8)
        )
        sizes_c = np.bincount(chrom_of, weights=plen, minlength=n_chrom).astype(np.int64)
        sizes[sp] = {f"chr{c + 1}": int(n) for c, n in enumerate(sizes_c)}
        ins_start[sp] = merged_next + np.cumsum(ins_len_final) - ins_len_final
        merged_next += int(ins_len_final.sum())
    collect(problems, "synthetic params", ConfigError)

    M = pieces["mouse"]
    mouse_piece_of_frag = np.full(n_frag, -1, dtype=np.int64)
    mf = np.flatnonzero(M.kind == 0)
    mouse_piece_of_frag[M.ident[mf]] = mf
    return SynthLayout(
        bin_size=p.bin_size,
        chrom_sizes=sizes,
        pieces=pieces,
        el_merged_start=estart,
        el_len=lens,
        el_kind=ekind,
        el_frag=efrag,
        el_vis_start=vis_start,
        frag_vis_base=vis_base,
        frag_vis_len=vis_len,
        blk_el=blk_el,
        blk_frag=blk_frag,
        blk_size=size,
        ins_merged_start=ins_start,
        merged_length=merged_next,
        mouse_piece_of_frag=mouse_piece_of_frag,
        _vis_index=vis_index,
    )


# ------------------------------------------------------------------------------- the biology
@dataclass(frozen=True)
class _Sites:
    pos: np.ndarray  # int64 [S] merged position, sorted
    seg: np.ndarray  # int64 [S]
    affinity: np.ndarray  # float32 [S]
    present: dict[str, np.ndarray]  # species -> bool [S]


@dataclass(frozen=True)
class _Biology:
    seg_start: np.ndarray  # int64 [G] merged start of every state segment
    seg_len: np.ndarray  # int64 [G]
    state: dict[str, np.ndarray]  # species -> int8 [G] (after turnover)
    base_state: np.ndarray  # int8 [G]
    strength: np.ndarray  # float32 [G]
    bivalent: np.ndarray  # bool [G]
    activity: dict[str, np.ndarray]  # species -> bool [G, programs]
    sites: dict[str, _Sites]  # assay -> sites


def _draw_states(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Markov chain of state segments covering ``[0, length)``: (starts int64, states int8)."""
    cum = np.cumsum(_TRANSITIONS / _TRANSITIONS.sum(axis=1, keepdims=True), axis=1)
    states: list[int] = []
    lengths: list[np.ndarray] = []
    total, s = 0, QUIES
    chunk = max(64, int(length / 3000))
    while total < length:
        u = rng.random(chunk)
        seq = np.empty(chunk, dtype=np.int8)
        for i in range(chunk):  # one step per segment (thousands), never per base or bin
            s = int(np.searchsorted(cum[s], u[i], side="right"))
            s = min(s, len(STATES) - 1)
            seq[i] = s
        ln = _SEG_MIN[seq] + rng.exponential(1.0, chunk) * (_SEG_MEAN - _SEG_MIN)[seq]
        ln = np.maximum(1, np.round(ln)).astype(np.int64)
        states.extend(seq.tolist())
        lengths.append(ln)
        total += int(ln.sum())
    ln = np.concatenate(lengths)
    n = int(np.searchsorted(np.cumsum(ln), length)) + 1
    starts = np.cumsum(ln[:n]) - ln[:n]
    return starts, np.array(states[:n], dtype=np.int8)


def _build_biology(seed: int, p: SynthParams, layout: SynthLayout) -> _Biology:
    rng = _rng(seed, "states")
    seg_start, base = _draw_states(rng, layout.merged_length)
    seg_len = np.diff(np.append(seg_start, layout.merged_length))
    G, P = len(base), len(p.programs)
    strength = np.exp(0.35 * rng.standard_normal(G)).astype(np.float32)
    bivalent = (base == PROM) & (rng.random(G) < 0.4)
    const = rng.random(G) < _CONSTITUTIVE[base]
    act = const[:, None] | (rng.random((G, P)) < _PER_PROGRAM[base][:, None])
    # a gene body follows the activity of the promoter right before it
    inherit = np.flatnonzero((base[1:] == TX) & (base[:-1] == PROM)) + 1
    act[inherit] = act[inherit - 1]
    state, activity = {}, {}
    for sp in SPECIES:
        r = _rng(seed, "turnover", sp)
        u = r.random(G)
        t = p.state_turnover
        lose = (((base == ENH) | (base == INS)) & (u < t)) | ((base == PROM) & (u < t / 3))
        st = base.copy()
        st[lose] = QUIES
        state[sp] = st
        flip = (r.random((G, P)) < p.activity_turnover) & _REGULATORY[base][:, None]
        activity[sp] = act ^ flip
    sites = {}
    prog_index = {name: i for i, name in enumerate(p.programs)}
    for spec in p.assay_specs():
        s = spec.sites
        if s is None:
            continue
        r = _rng(seed, "sites", spec.name)
        cand = np.flatnonzero(np.isin(base, [_S[x] for x in s.states]))
        if s.center:
            seg = cand
            pos = seg_start[seg] + seg_len[seg] // 2
        else:
            cols = [prog_index[x] for x in s.programs if x in prog_index]
            w = 0.15 + (act[cand][:, cols].mean(axis=1) if cols else 0.0)
            n = int(round(s.density * len(cand)))
            seg = r.choice(cand, size=n, replace=True, p=w / w.sum()) if len(cand) else cand
            pos = seg_start[seg] + np.floor(r.random(len(seg)) * seg_len[seg]).astype(np.int64)
        aff = np.exp(0.4 * r.standard_normal(len(seg))).astype(np.float32)
        present = {}
        for sp in SPECIES:
            ok = np.isin(state[sp][seg], [_S[x] for x in s.states])
            present[sp] = ok & (r.random(len(seg)) >= p.site_turnover / 2)
        order = np.argsort(pos, kind="stable")
        sites[spec.name] = _Sites(
            pos[order], seg[order], aff[order], {k: v[order] for k, v in present.items()}
        )
    return _Biology(seg_start, seg_len, state, base, strength, bivalent, activity, sites)


# --------------------------------------------------------------------------- experiment design
@dataclass(frozen=True)
class _Design:
    biosamples: dict[str, list[str]]  # species -> ids (hs.B1, ...)
    program: dict[str, np.ndarray]  # species -> int64 [B] program index
    observed: dict[str, np.ndarray]  # species -> bool [B, A]
    bio_activity: dict[str, np.ndarray]  # species -> float32 [B, G]


def _choose(
    rng: np.random.Generator,
    mins: np.ndarray,
    allowed: np.ndarray,
    weights: np.ndarray,
    total: int,
    fillable: np.ndarray,
    prefer: np.ndarray,
) -> np.ndarray:
    """Pick ``total`` (biosample, assay) pairs.

    First ``mins[a]`` per assay, in preferred biosamples first (``prefer`` bool [B, A]: a
    factor is profiled where it is expressed), otherwise in the least-assayed biosamples; then
    a random fill among ``fillable`` assays with probability ``weights[a]`` (x3 if preferred).
    """
    B, A = allowed.shape
    obs = np.zeros((B, A), dtype=bool)
    per_bio = np.zeros(B, dtype=np.int64)
    for a in rng.permutation(A):  # a loop over assays
        order = np.lexsort((rng.random(B), per_bio, ~prefer[:, a]))
        take = order[: mins[a]]
        obs[take, a] = True
        per_bio[take] += 1
    left = total - int(obs.sum())
    cand = np.flatnonzero((~obs & allowed & fillable[None, :]).ravel())
    if left > 0:
        w = (weights[None, :] * (1.0 + 2.0 * prefer)).ravel()[cand]
        pick = rng.choice(cand, size=left, replace=False, p=w / w.sum())
        obs.ravel()[pick] = True
    return obs


def _build_design(seed: int, p: SynthParams, bio: _Biology) -> _Design:
    assays = p.all_assays()
    specs = p.assay_specs()
    cats = [s.category for s in specs]
    weight = np.array(
        [
            {"histone_modification": 3.0, "accessibility": 2.5, "transcription": 2.0}.get(c, 1.0)
            for c in cats
        ]
    )
    biosamples, program, observed, bio_act = {}, {}, {}, {}
    P = len(p.programs)
    for sp, B in (("human", p.human_biosamples), ("mouse", p.mouse_biosamples)):
        rng = _rng(seed, "design", sp)
        biosamples[sp] = [f"{PREFIXES[sp]}.B{i + 1}" for i in range(B)]
        prog = (np.arange(B) + int(rng.integers(0, P))) % P
        program[sp] = rng.permutation(prog)
        if sp == "human":
            allowed = np.ones((B, len(assays)), dtype=bool)
            mins = np.full(len(assays), p.min_human_per_assay)
            fillable = np.ones(len(assays), dtype=bool)
            total = p.human_experiments
        else:
            run = np.array([a not in p.human_only_assays for a in assays])
            rare = np.array([a in p.mouse_rare_assays for a in assays])
            allowed = np.broadcast_to(run[None, :], (B, len(assays)))
            mins = np.where(
                run, np.where(rare, p.rare_mouse_experiments, p.min_mouse_per_assay), 0
            )
            fillable = run & ~rare
            total = p.mouse_experiments
        prefer = np.zeros((B, len(assays)), dtype=bool)
        for a, spec in enumerate(specs):
            if spec.sites is not None and spec.sites.expressed is not None:
                prefer[:, a] = np.isin(np.array(p.programs)[program[sp]], spec.sites.expressed)
        observed[sp] = _choose(rng, mins, allowed, weight, total, fillable, prefer)
        act = bio.activity[sp][:, program[sp]].T  # [B, G]
        flip = (rng.random(act.shape) < p.biosample_flip) & _REGULATORY[bio.base_state][None]
        bio_act[sp] = (act ^ flip).astype(np.float32)
    return _Design(biosamples, program, observed, bio_act)


# ------------------------------------------------------------------------------- the signal
def _smooth_noise(rng: np.random.Generator, shape0: int, n: int, step: int, sd: float):
    """float32 [shape0, n]: Gaussian noise at knots every ``step`` bins, linearly
    interpolated."""
    knots = np.arange(0, n + step, step)
    vals = sd * rng.standard_normal((shape0, len(knots)))
    x = np.arange(n)
    i = np.minimum(x // step, len(knots) - 2)
    f = ((x - knots[i]) / step).astype(np.float32)
    return (vals[:, i] * (1 - f) + vals[:, i + 1] * f).astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _clean_curve(noise: float, bg: float) -> tuple[np.ndarray, np.ndarray]:
    """``E[arcsinh(raw) | S]`` of one track as a function of its noiseless signal ``S``.

    ``raw = S · exp(noise · z0 − noise² / 2) + bg · max(z1 + 0.3, 0)`` with ``z0, z1``
    independent standard normals (:func:`_chrom_truth`'s noise model, per bin). The expectation
    is a quadrature: Gauss–Hermite over ``z0``, and over ``z1`` a point mass at 0 (probability
    ``Φ(−0.3)``) plus Gauss–Legendre on ``[−0.3, 8]``, on a grid of ``u = arcsinh(S)``.

    Returns
    -------
    (u, f)
        float64 ``[_CLEAN_GRID]``: the grid of ``arcsinh(S)`` over ``[0, arcsinh(_CAP)]`` and the
        expectation at each point (interpolate linearly in ``u``).
    """
    u = np.linspace(0.0, float(np.arcsinh(_CAP)), _CLEAN_GRID)
    if noise > 0:
        x0, w0 = np.polynomial.hermite_e.hermegauss(24)
        mult = np.exp(noise * x0 - noise**2 / 2)
    else:
        mult, w0 = np.ones(1), np.ones(1)
    xl, wl = np.polynomial.legendre.leggauss(32)
    a, b = -0.3, 8.0
    z1 = (xl + 1) * (b - a) / 2 + a
    pdf = np.exp(-0.5 * z1 * z1) / math.sqrt(2 * math.pi)
    m1 = np.concatenate([[0.0], z1 + 0.3])
    w1 = np.concatenate([[0.5 * math.erfc(0.3 / math.sqrt(2))], wl * (b - a) / 2 * pdf])
    raw = np.sinh(u)[:, None, None] * mult[None, :, None] + bg * m1[None, None, :]
    w = w0[:, None] * w1[None, :]
    f = (np.arcsinh(raw) * w[None]).sum((1, 2)) / w.sum()
    return u, f


def _bin_segments(
    layout: SynthLayout, bio: _Biology, species: str, chrom: str
) -> tuple[np.ndarray, np.ndarray]:
    """Merged coordinate of every bin's midpoint and the state segment holding it (int64
    [n_bins] each): the position whose latent structure drives the bin's signal."""
    size = layout.chrom_sizes[species][chrom]
    bs = layout.bin_size
    lo = np.arange(-(-size // bs), dtype=np.int64) * bs
    centre = (lo + np.minimum(lo + bs, size)) // 2
    m = layout.to_merged(species, chrom, centre)
    return m, np.searchsorted(bio.seg_start, m, side="right") - 1


def _chrom_states(layout: SynthLayout, bio: _Biology, species: str, chrom: str) -> np.ndarray:
    """int8 [n_bins]: the chromatin state (index into :data:`STATES`) of every bin of one
    chromosome, after that species' turnover: the state at the bin's midpoint, the one its
    signal was generated from."""
    return bio.state[species][_bin_segments(layout, bio, species, chrom)[1]].astype(np.int8)


def _chrom_truth(
    seed: int,
    p: SynthParams,
    layout: SynthLayout,
    bio: _Biology,
    design: _Design,
    species: str,
    chrom: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The truth of every (biosample, assay) pair on one chromosome, and its noiseless signal.

    Returns
    -------
    truth
        ``truth_dtype`` [B, A, n_bins]: arcsinh of the raw per-bin signal (one draw of the
        noise), rounded to ``truth_dtype``.
    clean
        ``truth_dtype`` [B, A, n_bins]: the noiseless signal on the same scale,
        ``E[truth | latent structure]`` — what the best possible predictor would output, given
        everything but the noise (:func:`_clean_curve`). ``mean((truth − clean)²)`` over a
        track's bins is its noise floor: no imputation can have a lower expected MSE.
    """
    size = layout.chrom_sizes[species][chrom]
    bs = p.bin_size
    n = -(-size // bs)
    m, seg = _bin_segments(layout, bio, species, chrom)
    st = bio.state[species][seg]
    strength = bio.strength[seg]
    half = bio.seg_len[seg] / 2.0
    sigma = np.clip(half / 2.0, 80.0, 500.0)
    d = (m - (bio.seg_start[seg] + half)) / sigma
    narrow = np.exp(-0.5 * d * d).astype(np.float32)
    A = design.bio_activity[species][:, seg]  # [B, n]
    B = A.shape[0]
    prog = design.program[species]

    def mask(s: int) -> np.ndarray:
        return ((st == s) * strength).astype(np.float32)

    cache: dict[str, np.ndarray] = {}

    def feature(name: str) -> np.ndarray:
        if name in cache:
            return cache[name]
        if name == "prom_act_narrow":
            v = mask(PROM) * A * narrow
        elif name == "prom_act_flank":
            v = mask(PROM) * A * (1 - narrow)
        elif name == "prom_act":
            v = mask(PROM) * A
        elif name == "prom_biv":
            v = mask(PROM) * bio.bivalent[seg] * (1 - A)
        elif name == "prom_biv_narrow":
            v = feature("prom_biv") * narrow
        elif name == "enh_act_narrow":
            v = mask(ENH) * A * narrow
        elif name == "enh_act":
            v = mask(ENH) * A
        elif name == "enh_inact":
            v = mask(ENH) * (1 - A)
        elif name == "tx_act":
            v = mask(TX) * A
        elif name == "pc_rep":
            v = mask(PC) * (1 - A)
        elif name == "het":
            v = mask(HET)
        elif name == "quies":
            v = mask(QUIES)
        elif name == "ins_narrow":
            v = mask(INS) * narrow
        else:
            raise AssertionError(f"unknown feature {name}")
        cache[name] = v
        return v

    def site_profile(spec: AssaySpec) -> np.ndarray:
        s, sites = spec.sites, bio.sites[spec.name]
        keep = sites.present[species]
        pos, sseg, aff = sites.pos[keep], sites.seg[keep], sites.affinity[keep]
        expr = np.array(
            [
                1.0
                if (s.expressed is None or name in s.expressed) and name not in s.silent
                else s.off_expression
                for name in p.programs
            ],
            dtype=np.float32,
        )
        occ = aff[None, :] * expr[prog][:, None]  # [B, S]
        if s.requires_activity:
            occ = occ * design.bio_activity[species][:, sseg]
        # pad with far-away empty sites so every bin has a left and a right neighbour
        far = np.int64(1) << 60
        pos = np.concatenate([[-far], pos, [far]])
        occ = np.concatenate(
            [np.zeros((B, 1), np.float32), occ, np.zeros((B, 1), np.float32)], axis=1
        )
        j = np.searchsorted(pos, m, side="right")
        out = np.zeros((B, n), dtype=np.float32)
        for nb in (j - 1, j):
            dd = ((m - pos[nb]) / s.width_bp).astype(np.float64)
            k = np.exp(-0.5 * np.minimum(dd * dd, 700.0)).astype(np.float32)
            out += occ[:, nb] * k
        return out

    rng = _rng(seed, "modulation", species, chrom)
    locus = _smooth_noise(rng, 1, n, 160, 0.25)
    mod = np.exp(locus + _smooth_noise(rng, B, n, 400, 0.1))  # [B, n]
    cap = np.float32(_CAP)
    width = max(1, round(_NOISE_BP / bs))
    specs = p.assay_specs()
    dtype = np.dtype(p.truth_dtype)
    truth = np.empty((B, len(specs), n), dtype=dtype)
    clean = np.empty((B, len(specs), n), dtype=dtype)
    for a, spec in enumerate(specs):  # a loop over assays, vectorised over biosamples x bins
        lam = np.zeros((B, n), dtype=np.float32)
        for name, amp in spec.terms:
            v = site_profile(spec) if name == "sites" else feature(name)
            lam += np.float32(amp) * v
        r = _rng(seed, "experiment", species, spec.name)
        gain = np.exp(0.25 * r.standard_normal(B)).astype(np.float32)[:, None]
        bg_level = p.background * spec.background * np.exp(0.2 * r.standard_normal(B))
        bg_level = bg_level.astype(np.float32)[:, None]
        r = _rng(seed, "noise", species, chrom, spec.name)
        # noise is correlated over ~a fragment length, as in read-based tracks
        z = r.standard_normal((2, B, n), dtype=np.float32)
        if width > 1:
            z = uniform_filter1d(z, width, axis=2, mode="nearest")
            z *= np.float32(np.sqrt(width))
        # in place: raw = cap * tanh(lam * mod * gain / cap) * lognormal + background
        lam *= mod
        lam *= gain / cap
        np.tanh(lam, out=lam)
        lam *= cap
        u = _asinh(lam.copy())  # arcsinh of the noiseless signal S
        for b in range(B):
            grid, f = _clean_curve(float(p.noise), float(bg_level[b, 0]))
            clean[b, a, :] = np.interp(u[b], grid, f)
        del u
        if p.noise > 0:
            mult = z[0]
            mult *= np.float32(p.noise)
            mult -= np.float32(p.noise**2 / 2)
            lam *= np.exp(mult, out=mult)
        bg = z[1]
        bg += np.float32(0.3)
        np.maximum(bg, 0, out=bg)
        bg *= bg_level
        lam += bg
        truth[:, a, :] = _asinh(lam)
    return truth, clean


def _asinh(x: np.ndarray) -> np.ndarray:
    """arcsinh of float32 ``x >= 0`` as ``log1p(x + x^2 / (1 + sqrt(1 + x^2)))``: accurate to a
    few float32 ulps and several times faster than ``numpy.arcsinh``. The stored truth is defined
    by its rounded value, so the bigWigs stay exact either way."""
    sq = x * x
    d = np.sqrt(sq + np.float32(1))
    d += np.float32(1)
    sq /= d
    sq += x
    return np.log1p(sq, out=sq)


# ---------------------------------------------------------------------------------- writing
@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text)


def _write_npy(path: Path, arr: np.ndarray) -> None:
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` with fixed timestamps (byte-identical for equal arrays)."""
    with _atomic(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())


def _chain_text(layout: SynthLayout) -> tuple[str, dict[str, int]]:
    """The UCSC chain file (human target, mouse query) and counts describing it."""
    b = layout.blocks()
    hs, ms = layout.chrom_sizes["human"], layout.chrom_sizes["mouse"]
    bounds = np.flatnonzero(np.diff(b["chain"])) + 1
    chains = []
    for idx in np.split(np.arange(len(b["chain"])), bounds):  # a loop over chains
        size = b["size"][idx]
        t = b["human_start"][idx]
        strand = int(b["strand"][idx[0]])
        qsize = ms[str(b["mouse_chrom"][idx[0]])]
        q = b["mouse_start"][idx] if strand > 0 else qsize - (b["mouse_start"][idx] + size)
        dt = t[1:] - (t[:-1] + size[:-1])
        dq = q[1:] - (q[:-1] + size[:-1])
        assert (dt >= 0).all() and (dq >= 0).all() and ((dt > 0) | (dq > 0)).all()
        score = int(100 * size.sum() - 30 * (len(size) - 1))
        header = (
            score,
            str(b["human_chrom"][idx[0]]),
            hs[str(b["human_chrom"][idx[0]])],
            int(t[0]),
            int(t[-1] + size[-1]),
            str(b["mouse_chrom"][idx[0]]),
            qsize,
            "+" if strand > 0 else "-",
            int(q[0]),
            int(q[-1] + size[-1]),
        )
        lines = [f"{s}\t{x}\t{y}" for s, x, y in zip(size[:-1], dt, dq)] + [f"{size[-1]}"]
        chains.append((header, lines))
    chains.sort(key=lambda c: (-c[0][0], c[0][1], c[0][3]))
    out = []
    for i, ((score, tn, tsz, t0, t1, qn, qsz, qst, q0, q1), lines) in enumerate(chains, 1):
        out.append(f"chain {score} {tn} {tsz} + {t0} {t1} {qn} {qsz} {qst} {q0} {q1} {i}")
        out.extend(lines)
        out.append("")
    counts = {
        "chains": len(chains),
        "blocks": int(len(b["size"])),
        "short_blocks": int((b["size"] < layout.bin_size).sum()),
        "minus_strand_chains": int(sum(c[0][7] == "-" for c in chains)),
        "aligned_bp": int(b["size"].sum()),
    }
    return "\n".join(out) + "\n", counts


def _truth_alignment(layout: SynthLayout) -> dict[str, np.ndarray]:
    """METHODS.md §2 applied to the generator's own blocks (never re-parsed from the file)."""
    return _align_bins(layout.blocks(), layout.bin_size, layout.chroms("mouse"))


def _align_bins(
    blocks: Mapping[str, np.ndarray], bin_size: int, mouse_chroms: Sequence[str]
) -> dict[str, np.ndarray]:
    """Bin alignment of ungapped blocks, per mouse chromosome (METHODS.md §2).

    Blocks shorter than ``bin_size`` are dropped; starts and ends (forward strand) are
    integer-divided by ``bin_size`` per species; bins are paired from the block start and the
    extra bin of the longer side is dropped.

    Parameters
    ----------
    blocks
        As :meth:`SynthLayout.blocks`: ``human_chrom``, ``mouse_chrom`` (str [N]),
        ``human_start``, ``mouse_start``, ``size`` (int64 [N], forward coordinates, bases).
    bin_size
        Bin width in bases.
    mouse_chroms
        Mouse chromosomes to report (each gets arrays, possibly empty).

    Returns
    -------
    dict
        ``chroms`` (str [C]) and, per mouse chromosome, ``{chrom}.mouse_bin`` (int64),
        ``{chrom}.human_chrom`` (str) and ``{chrom}.human_bin`` (int64), sorted by mouse bin,
        then human chromosome name, then human bin.
    """
    bs = int(bin_size)
    keep = blocks["size"] >= bs
    hs, ms = blocks["human_start"][keep], blocks["mouse_start"][keep]
    size = blocks["size"][keep]
    h0, h1 = hs // bs, (hs + size) // bs
    m0, m1 = ms // bs, (ms + size) // bs
    cnt = np.minimum(h1 - h0, m1 - m0)
    mouse_bin = _ranges(m0, cnt)
    human_bin = _ranges(h0, cnt)
    human_chrom = np.repeat(np.asarray(blocks["human_chrom"])[keep], cnt)
    mouse_chrom = np.repeat(np.asarray(blocks["mouse_chrom"])[keep], cnt)
    hnames, hcode = np.unique(human_chrom, return_inverse=True)
    width = max([len(h) for h in hnames] + [1])
    out: dict[str, np.ndarray] = {"chroms": np.array(list(mouse_chroms))}
    for chrom in mouse_chroms:
        sel = np.flatnonzero(mouse_chrom == chrom)
        order = sel[np.lexsort((human_bin[sel], hcode[sel], mouse_bin[sel]))]
        out[f"{chrom}.mouse_bin"] = mouse_bin[order].astype(np.int64)
        out[f"{chrom}.human_chrom"] = human_chrom[order].astype(f"<U{width}")
        out[f"{chrom}.human_bin"] = human_bin[order].astype(np.int64)
    return out


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote.

    Attributes
    ----------
    out
        The output directory.
    manifest, chain, truth_dir, truth_alignment, info
        Paths of ``manifest.tsv``, the chain file, ``truth/``, ``truth_alignment.npz`` and
        ``synth.json``.
    chrom_sizes
        assembly -> {chrom: length in bases}.
    experiments
        species -> number of experiments written (bigWigs).
    counts
        The ``counts`` section of ``synth.json``.
    layout
        The generator's ground truth of how the genomes align (:meth:`SynthLayout.lift`).
    """

    out: Path
    manifest: Path
    chain: Path
    truth_dir: Path
    truth_alignment: Path
    info: Path
    chrom_sizes: dict[str, dict[str, int]]
    experiments: dict[str, int]
    counts: dict
    layout: SynthLayout = field(repr=False)

    def describe(self) -> str:
        """A few human-readable lines summarising the compendium."""
        lines = []
        for sp in SPECIES:
            asm = ASSEMBLIES[sp]
            sizes = self.chrom_sizes[asm]
            lines.append(
                f"{sp} {asm}: {len(sizes)} chroms, {sum(sizes.values()):,} bp, "
                f"{self.counts['bins'][sp]:,} bins, {self.experiments[sp]} experiments"
            )
        c = self.counts
        lines.append(
            f"chain {self.chain.name}: {c['chains']} chains, {c['blocks']} blocks "
            f"({c['short_blocks']} short, {c['minus_strand_chains']} chains on '-'), "
            f"{c['aligned_mouse_bins']:,} aligned mouse bins"
        )
        lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


_OUTPUTS = (
    "genomes",
    "tracks",
    "chains",
    "truth",
    "manifest.tsv",
    "truth_alignment.npz",
    "synth.json",
)


def build_synteny(data_dir: str | Path, store_root: str | Path, name: str = "hs2mm"):
    """Map the human tracks of the compendium generated in ``data_dir`` onto mouse bins of the
    store at ``store_root`` through the compendium's chain file: synteny ``name``, resumable
    (:func:`epiray.synteny.build`). Returns the store."""
    from epiray.synteny import SyntenyConfig, build

    return build(
        SyntenyConfig(
            store=str(store_root),
            chain=str(Path(data_dir) / CHAIN_PATH),
            human_assembly=ASSEMBLIES["human"],
            mouse_assembly=ASSEMBLIES["mouse"],
            name=name,
        ),
        resume=True,
    )


def generate(
    out: str | Path,
    seed: int = 0,
    params: SynthParams | None = None,
    overwrite: bool = False,
) -> SynthResult:
    """Write a synthetic human + mouse compendium with known ground truth into ``out``.

    Parameters
    ----------
    out
        Output directory; created if missing. It must be empty unless ``overwrite``.
    seed
        Non-negative integer; the same seed gives byte-identical manifests and truth arrays.
    params
        Sizes and rates (default :class:`SynthParams`; :meth:`SynthParams.tiny` for tests).
    overwrite
        Replace the files a previous run wrote into ``out`` (other files are left alone).

    Returns
    -------
    SynthResult

    Raises
    ------
    InputDataError
        ``out`` is a file, or a non-empty directory and ``overwrite`` is false.
    ConfigError
        Inconsistent ``params`` or a negative ``seed``.
    """
    from epiray import __version__
    from epiray.bigwig import write_bigwig

    out = Path(out)
    params = params or SynthParams()
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(
            f"synthetic seed: invalid; expected a non-negative integer, got {seed!r}."
        )
    seed = int(seed)
    params.check()
    if out.exists() and not out.is_dir():
        raise InputDataError(
            f"synthetic output {out}: not a directory; expected a directory path, got a file. "
            "Choose another --out."
        )
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputDataError(
                f"synthetic output {out}: directory is not empty; expected an empty or new "
                "directory. Pass overwrite=True (--overwrite) to replace it, or choose another."
            )
        for name in _OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    layout = _build_layout(seed, params)
    bio = _build_biology(seed, params, layout)
    design = _build_design(seed, params, bio)
    assays = params.all_assays()
    specs = params.assay_specs()
    bs = params.bin_size

    for sub in ("genomes", "chains", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for sp in SPECIES:
        asm = ASSEMBLIES[sp]
        text = "".join(f"{c}\t{n}\n" for c, n in layout.chrom_sizes[sp].items())
        _write_text(out / "genomes" / f"{asm}.chrom.sizes", text)

    chain_text, counts = _chain_text(layout)
    chain_path = out / CHAIN_PATH
    with _atomic(chain_path) as tmp, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(chain_text.encode())
    alignment = _truth_alignment(layout)
    _write_npz(out / "truth_alignment.npz", alignment)

    # truth first (one chromosome at a time), then bigWigs read back from the stored truth
    truth_index: dict = {
        "format": FORMAT,
        "bin_size": bs,
        "transform": "arcsinh",
        "dtype": params.truth_dtype,
        "axes": ["biosample", "assay", "bin"],
        "species": {},
    }
    rows = []
    n_bins = {}
    for sp in SPECIES:
        asm = ASSEMBLIES[sp]
        (out / "truth" / asm).mkdir(exist_ok=True)
        chroms = {}
        for chrom in layout.chroms(sp):
            t, clean = _chrom_truth(seed, params, layout, bio, design, sp, chrom)
            _write_npy(out / "truth" / asm / f"{chrom}.npy", t)
            _write_npy(out / "truth" / asm / f"{chrom}.clean.npy", clean)
            _write_npy(
                out / "truth" / asm / f"{chrom}.states.npy",
                _chrom_states(layout, bio, sp, chrom),
            )
            diff = t.astype(np.float32) - clean.astype(np.float32)
            chroms[chrom] = {
                "path": f"{asm}/{chrom}.npy",
                "clean_path": f"{asm}/{chrom}.clean.npy",
                "n_bins": int(t.shape[2]),
                # [B][A] mean squared noise: the MSE of the noiseless signal
                "noise_floor": np.mean(diff.astype(np.float64) ** 2, axis=2).tolist(),
            }
            del diff, clean
            logger.debug("truth %s %s: %s", asm, chrom, t.shape)
        n_bins[sp] = sum(c["n_bins"] for c in chroms.values())
        obs = design.observed[sp]
        experiments = {}
        for b, a in zip(*np.nonzero(obs)):
            bios = design.biosamples[sp][b]
            exp = f"{bios}.{assays[a]}"
            experiments[exp] = [bios, assays[a]]
            rel = f"tracks/{asm}/{exp}.bw"
            rows.append((exp, sp, asm, bios, assays[a], specs[a].category, rel))
        truth_index["species"][sp] = {
            "assembly": asm,
            "biosamples": design.biosamples[sp],
            "programs": [params.programs[i] for i in design.program[sp]],
            "assays": list(assays),
            "categories": [s.category for s in specs],
            "observed": obs.tolist(),
            "experiments": experiments,
            "chroms": chroms,
        }
        (out / "tracks" / asm).mkdir(parents=True, exist_ok=True)
        arrays = {c: read_truth(out, sp, c, truth_index=truth_index) for c in chroms}
        sizes = layout.chrom_sizes[sp]
        for exp, (bios, assay) in experiments.items():  # a loop over experiments
            b, a = design.biosamples[sp].index(bios), assays.index(assay)
            tracks = {c: np.sinh(arr[b, a].astype(np.float32)) for c, arr in arrays.items()}
            write_bigwig(out / "tracks" / asm / f"{exp}.bw", sizes, tracks, bs)
        del arrays
    _write_text(out / "truth" / "truth.json", json.dumps(truth_index, indent=1) + "\n")
    manifest = "\t".join(MANIFEST_COLUMNS) + "\n"
    manifest += "".join("\t".join(r) + "\n" for r in rows)
    _write_text(out / "manifest.tsv", manifest)

    counts.update(
        {
            "bins": n_bins,
            "experiments": {sp: int(design.observed[sp].sum()) for sp in SPECIES},
            "fragments": layout.n_fragments,
            "duplicated_fragments": int(
                (
                    np.bincount(
                        layout.pieces["human"].ident[layout.pieces["human"].kind == 0],
                        minlength=layout.n_fragments,
                    )
                    > 1
                ).sum()
            ),
            "aligned_mouse_bins": int(
                sum(len(np.unique(alignment[f"{c}.mouse_bin"])) for c in layout.chroms("mouse"))
            ),
            "alignment_rows": int(
                sum(len(alignment[f"{c}.mouse_bin"]) for c in layout.chroms("mouse"))
            ),
        }
    )
    info = {
        "format": FORMAT,
        "epiray_version": __version__,
        "seed": seed,
        "params": params.model_dump(mode="json"),
        "assemblies": {
            ASSEMBLIES[sp]: {"species": sp, "chroms": layout.chrom_sizes[sp]} for sp in SPECIES
        },
        "chain": CHAIN_PATH,
        "states": list(STATES),
        "programs": list(params.programs),
        "biosample_programs": {
            sp: dict(zip(design.biosamples[sp], truth_index["species"][sp]["programs"]))
            for sp in SPECIES
        },
        "assays": {a: s.category for a, s in zip(assays, specs)},
        "human_only_assays": list(params.human_only_assays),
        "counts": counts,
    }
    info_path = out / "synth.json"
    _write_text(info_path, json.dumps(info, indent=1) + "\n")
    return SynthResult(
        out=out,
        manifest=out / "manifest.tsv",
        chain=chain_path,
        truth_dir=out / "truth",
        truth_alignment=out / "truth_alignment.npz",
        info=info_path,
        chrom_sizes={ASSEMBLIES[sp]: dict(layout.chrom_sizes[sp]) for sp in SPECIES},
        experiments=counts["experiments"],
        counts=counts,
        layout=layout,
    )


# ---------------------------------------------------------------------------------- reading
def read_truth_index(out: str | Path) -> dict:
    """``truth/truth.json`` of a compendium: biosamples, assays, observed pairs, chromosomes.

    Raises
    ------
    InputDataError
        When the file is missing.
    """
    path = Path(out) / "truth" / "truth.json"
    if not path.is_file():
        raise InputDataError(
            f"synthetic truth {path}: file not found; expected a directory written by "
            "epiray.synthetic.generate. Run `epiray synth --out DIR` first."
        )
    return json.loads(path.read_text())


def _truth_entry(index: dict, where: str, species: str, chrom: str) -> dict:
    """``truth.json``'s entry of ``species``, checked to hold ``chrom``."""
    if species not in index["species"]:
        raise InputDataError(
            f"{where}: unknown species; expected one of {list(index['species'])}, got {species!r}."
        )
    entry = index["species"][species]
    if chrom not in entry["chroms"]:
        raise InputDataError(
            f"{where}: chromosome {chrom!r} not in {entry['assembly']}; expected one of "
            f"{list(entry['chroms'])}."
        )
    return entry


def read_truth(
    out: str | Path,
    species: str,
    chrom: str,
    biosample: str | None = None,
    assay: str | None = None,
    *,
    mmap: bool = True,
    truth_index: dict | None = None,
    clean: bool = False,
) -> np.ndarray:
    """Ground truth on the arcsinh scale for one chromosome of one species.

    Parameters
    ----------
    out
        Compendium directory.
    species
        ``"human"`` or ``"mouse"``.
    chrom
        Chromosome of that species' assembly.
    biosample, assay
        When both are given, only that track.
    mmap
        Memory-map the array instead of reading it.
    truth_index
        An already-read :func:`read_truth_index` (saves re-reading it).
    clean
        Read the noiseless signal instead (``E[truth | latent structure]``, the prediction
        that reaches the noise floor) of the one noisy draw the tracks hold.

    Returns
    -------
    numpy.ndarray
        ``truth_dtype`` [biosamples, assays, n_bins] (axes as in ``truth.json``), or [n_bins]
        for one track; bins of 25 bp (``bin_size``), 0-based from the chromosome start.

    Raises
    ------
    InputDataError
        Unknown species, chromosome, biosample or assay.
    """
    index = truth_index or read_truth_index(out)
    where = f"synthetic truth {out}"
    entry = _truth_entry(index, where, species, chrom)
    rel = entry["chroms"][chrom].get("clean_path" if clean else "path")
    if rel is None:
        raise InputDataError(
            f"{where}: no noiseless signal for {chrom!r}; expected a compendium written by "
            "this epiray version. Regenerate it with `epiray synth --overwrite`."
        )
    arr = np.load(Path(out) / "truth" / rel, mmap_mode="r" if mmap else None)
    if biosample is None and assay is None:
        return arr
    for name, value, options in (
        ("biosample", biosample, entry["biosamples"]),
        ("assay", assay, entry["assays"]),
    ):
        if value not in options:
            raise InputDataError(
                f"{where}: {name} {value!r} not in {species}; expected one of {options}."
            )
    return arr[entry["biosamples"].index(biosample), entry["assays"].index(assay)]


def noise_floor(
    out: str | Path,
    species: str,
    chrom: str,
    biosample: str,
    assay: str,
    *,
    truth_index: dict | None = None,
) -> float:
    """The noise floor of one track on one chromosome: ``mean((truth − clean)²)`` over its
    bins, the lowest expected MSE any imputation of it can reach (arcsinh scale).

    Raises
    ------
    InputDataError
        Unknown species, chromosome, biosample or assay, or a compendium without the floor.
    """
    index = truth_index or read_truth_index(out)
    read_truth(out, species, chrom, biosample, assay, truth_index=index)  # checks the names
    entry = index["species"][species]
    floor = entry["chroms"][chrom].get("noise_floor")
    if floor is None:
        raise InputDataError(
            f"synthetic truth {out}: no noise floor for {chrom!r}; expected a compendium "
            "written by this epiray version. Regenerate it with `epiray synth --overwrite`."
        )
    return float(floor[entry["biosamples"].index(biosample)][entry["assays"].index(assay)])


def read_states(
    out: str | Path,
    species: str,
    chrom: str,
    *,
    truth_index: dict | None = None,
) -> np.ndarray:
    """The hidden chromatin state of every bin of one chromosome of one species.

    A bin's state is the state of the latent segment holding its midpoint in that species
    (after turnover), the one its tracks were generated from; it does not depend on the
    biosample (activity does). Names: ``synth.json`` ``states`` (:data:`STATES`).

    Returns
    -------
    numpy.ndarray
        int8 [n_bins], indices into :data:`STATES`; bins of ``bin_size`` bases as in
        :func:`read_truth`.

    Raises
    ------
    InputDataError
        Unknown species or chromosome, or a compendium written before the states were.
    """
    index = truth_index or read_truth_index(out)
    where = f"synthetic truth {out}"
    entry = _truth_entry(index, where, species, chrom)
    path = Path(out) / "truth" / entry["assembly"] / f"{chrom}.states.npy"
    if not path.is_file():
        raise InputDataError(
            f"{where}: no chromatin states for {chrom!r} ({path} not found); expected a "
            "compendium written by this epiray version. Regenerate it with "
            "`epiray synth --overwrite`."
        )
    return np.load(path)


def read_truth_alignment(out: str | Path, chrom: str) -> dict[str, np.ndarray]:
    """The true bin alignment of one mouse chromosome (METHODS.md §2).

    Returns
    -------
    dict
        ``mouse_bin`` int64 [n], ``human_chrom`` str [n], ``human_bin`` int64 [n], sorted by
        mouse bin (then human chromosome, human bin); a mouse bin may repeat.

    Raises
    ------
    InputDataError
        Missing file or unknown chromosome.
    """
    path = Path(out) / "truth_alignment.npz"
    if not path.is_file():
        raise InputDataError(
            f"synthetic truth alignment {path}: file not found. Run `epiray synth` first."
        )
    with np.load(path) as z:
        chroms = list(z["chroms"])
        if chrom not in chroms:
            raise InputDataError(
                f"synthetic truth alignment {path}: chromosome {chrom!r} not found; expected one "
                f"of {chroms}."
            )
        return {k: z[f"{chrom}.{k}"] for k in ("mouse_bin", "human_chrom", "human_bin")}
