"""Genome annotations as per-chromosome boolean bin masks (promoters, genes, enhancers, blacklist).

Coordinates are 0-based half-open bases (``start``, ``end``) and bins of ``bin_size`` bases
(default 25): bin ``i`` covers bases ``[i * bin_size, (i + 1) * bin_size)`` and a chromosome of
``L`` bases has ``ceil(L / bin_size)`` bins. An interval *covers* every bin it overlaps by at
least one base: bins ``[start // bin_size, ceil(end / bin_size))``; an empty interval
(``start == end``) covers none. Masks are built with difference arrays (``numpy.bincount`` of
interval starts and ends, then a cumulative sum), one pass per chromosome, no loop per interval.

The ENCODE Imputation Challenge files (``shared/data/annotations/hg38``) and how they are read:

* **Gene bodies** -- ``gencode.v29.genes.gtf.bed.gz``, BED6 ``chrom start end gene_id . strand``
  made by copying the GTF's columns 4 and 5 unchanged: ``start`` is the GTF's **1-based** first
  base and ``end`` its 1-based inclusive last base, so the 0-based half-open interval is
  ``[start - 1, end)`` (``one_based_start=True``, the default of the gene readers; pass
  ``False`` for an ordinary 0-based BED6). The gene mask covers every bin the gene overlaps.
* **Promoters** -- the 80 bins (2 kb) upstream of each TSS, strand-aware, the TSS bin itself
  excluded: for a ``+`` gene the TSS is its first base ``s`` and the promoter is bins
  ``[s//25 - 80, s//25)``; for a ``-`` gene the TSS is its last base ``e - 1`` and the promoter
  is bins ``[(e-1)//25 + 1, (e-1)//25 + 81)``. Windows are clipped at the chromosome ends.
* **Enhancers** -- ``F5.hg38.enhancers.bed.gz``, FANTOM5 BED12. By default the whole
  ``chromStart``-``chromEnd`` span (``blocks=False``), as the challenge's scoring script does:
  the two BED12 blocks of a FANTOM5 enhancer are the flanking bidirectional-transcription
  peaks and the gap between them is the enhancer core, so blocks alone would drop the core.
  ``blocks=True`` covers only the blocks.
* **Blacklist** -- ``hg38.blacklist.bed.gz``, BED3: bins overlapping a blacklisted region;
  :func:`epiray.metrics.score_track` removes them from every metric (mask key ``"blacklist"``).

Differences from the challenge's own script, all deliberate: it bins the 1-based start
without converting it (``start // 25``) and takes ``end // 25 + 1`` as the exclusive end bin,
so it can shift a TSS by one bin and add one bin past genes, enhancers and blacklisted regions
ending on a bin boundary; and it sums squared errors per gene, counting bins shared by
overlapping genes several times, where a mask counts each bin once.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from epiray.errors import ConfigError, InputDataError, collect
from epiray.genome import read_chrom_sizes

__all__ = [
    "BIN_SIZE",
    "CHALLENGE_FILES",
    "PROMOTER_BINS",
    "blacklist_masks",
    "challenge_region_masks",
    "enhancer_masks",
    "gene_masks",
    "interval_mask",
    "promoter_masks",
    "read_bed",
    "read_genes",
    "region_masks",
]

BIN_SIZE = 25
PROMOTER_BINS = 80

#: File names of the ENCODE Imputation Challenge hg38 annotations, by mask key.
CHALLENGE_FILES: dict[str, str] = {
    "gene": "gencode.v29.genes.gtf.bed.gz",
    "enh": "F5.hg38.enhancers.bed.gz",
    "blacklist": "hg38.blacklist.bed.gz",
}

_BED_COLUMNS = (
    "chrom",
    "start",
    "end",
    "name",
    "score",
    "strand",
    "thickStart",
    "thickEnd",
    "itemRgb",
    "blockCount",
    "blockSizes",
    "blockStarts",
)

ChromSizes = Mapping[str, int] | str | os.PathLike


# --------------------------------------------------------------------------------------------
# reading


def _chrom_sizes(chrom_sizes: ChromSizes) -> dict[str, int]:
    """A chrom -> length (bases) dict from a mapping or a UCSC ``.chrom.sizes`` file."""
    if isinstance(chrom_sizes, Mapping):
        return {str(c): int(n) for c, n in chrom_sizes.items()}
    return read_chrom_sizes(chrom_sizes)


def _check_bin_size(bin_size: int) -> None:
    if int(bin_size) != bin_size or bin_size < 1:
        raise ConfigError(f"annotations: bin_size is {bin_size!r}; expected a positive integer.")


def read_bed(path: str | os.PathLike, min_columns: int = 3) -> pd.DataFrame:
    """Read a BED file (plain or gzip), validating coordinates.

    Parameters
    ----------
    path
        BED3 to BED12; ``#``, ``track`` and ``browser`` lines are skipped.
    min_columns
        Fewest columns the file must have (3 for BED3, 6 for strand, 12 for blocks).

    Returns
    -------
    pandas.DataFrame
        Columns named by the BED standard (``chrom, start, end, name, score, strand,
        thickStart, thickEnd, itemRgb, blockCount, blockSizes, blockStarts``) for as many
        columns as the file has; ``start``/``end`` int64 exactly as written (no conversion).

    Raises
    ------
    InputDataError
        Missing file, too few columns, non-integer or negative coordinates, ``end < start``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"BED {path}: file not found; expected a BED file. Check the path.")
    with path.open("rb") as fh:
        opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
    header = 0  # leading track/browser/comment lines
    with opener(path, "rt") as fh:
        for line in fh:
            if line.strip() and not line.startswith(("#", "track", "browser")):
                break
            header += 1
    text_cols = {i: str for i in (0, 3, 5, 8, 10, 11)}  # coordinates are parsed as integers
    try:
        df = pd.read_csv(
            path,
            sep="\t",
            header=None,
            skiprows=header,
            comment="#",
            dtype=text_cols,
            keep_default_na=False,
            compression="gzip" if opener is gzip.open else None,
        )
    except pd.errors.EmptyDataError:
        df = pd.DataFrame(columns=range(max(min_columns, 3)), dtype=str)
    except pd.errors.ParserError as exc:
        raise InputDataError(
            f"BED {path}: rows differ in their number of columns ({exc}); expected one BED "
            "format throughout. Fix the file."
        ) from None
    if df.shape[1] < min_columns:
        raise InputDataError(
            f"BED {path}: {df.shape[1]} column(s); expected at least {min_columns}. "
            "Pass the right annotation file."
        )
    df = df.iloc[:, : len(_BED_COLUMNS)]
    df.columns = list(_BED_COLUMNS[: df.shape[1]])
    problems = []
    valid = np.ones(len(df), dtype=bool)
    for col in ("start", "end"):
        if df[col].dtype.kind in "iu":
            bad = (df[col] < 0).to_numpy()
            for i in np.flatnonzero(bad)[:5]:
                problems.append(f"record {i + 1}: {col} is {df[col].iloc[i]}; expected >= 0")
            valid &= ~bad
            df[col] = df[col].astype(np.int64)
            continue
        num = pd.to_numeric(df[col].astype(str), errors="coerce")
        bad = (num.isna() | (num < 0) | (num != np.floor(num))).to_numpy()
        for i in np.flatnonzero(bad)[:5]:
            problems.append(
                f"record {i + 1}: {col} is {df[col].iloc[i]!r}; expected an integer >= 0"
            )
        valid &= ~bad
        df[col] = num.fillna(0).astype(np.int64)
    inverted = np.flatnonzero(valid & (df["end"] < df["start"]).to_numpy())
    for i in inverted[:5]:
        problems.append(
            f"record {i + 1}: end {df['end'].iloc[i]} < start {df['start'].iloc[i]}; "
            "expected start <= end"
        )
    collect(problems, f"BED {path}")
    return df.reset_index(drop=True)


def read_genes(path: str | os.PathLike, one_based_start: bool = True) -> pd.DataFrame:
    """Read a gene BED6 into 0-based half-open gene bodies.

    Parameters
    ----------
    path
        BED6 ``chrom start end name score strand``.
    one_based_start
        True (default) for the challenge's ``gencode.v29.genes.gtf.bed.gz`` whose start column
        is the GTF's 1-based start (converted by subtracting 1); False for a standard BED6.

    Returns
    -------
    pandas.DataFrame
        ``chrom, start, end, name, strand``; ``start``/``end`` 0-based half-open bases.

    Raises
    ------
    InputDataError
        Strand not ``+``/``-``, a 1-based start of 0, an empty gene.
    """
    bed = read_bed(path, min_columns=6)
    genes = bed[["chrom", "start", "end", "name", "strand"]].copy()
    problems = []
    bad_strand = np.flatnonzero(~genes["strand"].isin(["+", "-"]).to_numpy())
    for i in bad_strand[:5]:
        problems.append(
            f"record {i + 1} ({genes['name'].iloc[i]}): strand is {genes['strand'].iloc[i]!r}; "
            "expected '+' or '-' (promoters need the strand)"
        )
    if one_based_start:
        zero = np.flatnonzero((genes["start"] == 0).to_numpy())
        for i in zero[:5]:
            problems.append(
                f"record {i + 1} ({genes['name'].iloc[i]}): start is 0; expected a 1-based start "
                ">= 1. Pass one_based_start=False for a 0-based BED"
            )
        genes["start"] -= 1
    empty = np.flatnonzero((genes["end"] <= genes["start"]).to_numpy())
    for i in empty[:5]:
        problems.append(
            f"record {i + 1} ({genes['name'].iloc[i]}): gene is empty after conversion "
            f"([{genes['start'].iloc[i]}, {genes['end'].iloc[i]})); expected start < end"
        )
    collect(problems, f"genes {path}")
    return genes


# --------------------------------------------------------------------------------------------
# intervals -> masks


def interval_mask(
    starts: np.ndarray, ends: np.ndarray, n_bins: int, bin_size: int = BIN_SIZE
) -> np.ndarray:
    """Bins overlapped by any of a set of intervals of one chromosome.

    Parameters
    ----------
    starts, ends
        ``[m]`` int, 0-based half-open bases. Intervals past the chromosome end are clipped.
    n_bins
        Bins of the chromosome, ``ceil(length / bin_size)``.
    bin_size
        Bases per bin.

    Returns
    -------
    numpy.ndarray
        ``[n_bins]`` bool.
    """
    _check_bin_size(bin_size)
    b0, b1 = _interval_bins(
        np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64), bin_size
    )
    return _bins_mask(b0, b1, n_bins)


def _bins_mask(b0: np.ndarray, b1: np.ndarray, n_bins: int) -> np.ndarray:
    """Union of bin ranges ``[b0, b1)`` (clipped to ``[0, n_bins]``) as a bool mask."""
    b0 = np.clip(b0, 0, n_bins)
    b1 = np.clip(b1, 0, n_bins)
    keep = b1 > b0
    # int32 difference array (depth <= number of intervals); 10x faster than bincount's int64
    depth = np.zeros(n_bins + 1, dtype=np.int32)
    np.add.at(depth, b0[keep], 1)
    np.add.at(depth, b1[keep], -1)
    return np.cumsum(depth[:n_bins], dtype=np.int32) > 0


def _select_chroms(sizes: dict[str, int], chroms: Iterable[str] | None, where: str) -> list[str]:
    if chroms is None:
        return list(sizes)
    chroms = [chroms] if isinstance(chroms, str) else list(chroms)
    missing = [c for c in chroms if c not in sizes]
    if missing:
        raise InputDataError(
            f"{where}: chromosome(s) {missing[:5]} not in the chrom sizes; expected names such "
            f"as {list(sizes)[:3]}. Check the assembly and the chromosome names."
        )
    return chroms


def _masks_from_bins(
    chrom: pd.Series,
    b0: np.ndarray,
    b1: np.ndarray,
    ends: np.ndarray,
    sizes: dict[str, int],
    chroms: list[str],
    bin_size: int,
    where: str,
) -> dict[str, np.ndarray]:
    """Per-chromosome masks of bin ranges; checks chromosome names and lengths first."""
    codes, names = pd.factorize(chrom)
    unknown = [c for c in names if c not in sizes]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} chromosome(s) not in the chrom sizes, e.g. {unknown[:5]}; expected "
            f"names such as {list(sizes)[:3]}. Use the annotation of the same assembly and "
            "naming (pass the assembly's full chrom sizes and choose chromosomes with chroms=)"
        )
    length = np.array([sizes.get(c, np.iinfo(np.int64).max) for c in names], dtype=np.int64)
    past = np.flatnonzero(ends > length[codes]) if len(codes) else np.array([], dtype=int)
    for i in past[:5]:
        problems.append(
            f"record {i + 1}: interval ends at {ends[i]} past the end of {names[codes[i]]} "
            f"({length[codes[i]]} bases); expected end <= chromosome length. Check the assembly"
        )
    collect(problems, where)
    index = {c: i for i, c in enumerate(names)}
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    out = {}
    for c in chroms:
        n_bins = -(-sizes[c] // bin_size)
        if c in index:
            rows = order[bounds[index[c]] : bounds[index[c] + 1]]
            out[c] = _bins_mask(b0[rows], b1[rows], n_bins)
        else:
            out[c] = np.zeros(n_bins, dtype=bool)
    return out


def _interval_bins(starts: np.ndarray, ends: np.ndarray, bin_size: int):
    b0 = starts // bin_size
    b1 = np.where(ends > starts, -(-ends // bin_size), b0)
    return b0, b1


def _gene_masks(genes, sizes, chroms, bin_size, where):
    s = genes["start"].to_numpy()
    e = genes["end"].to_numpy()
    b0, b1 = _interval_bins(s, e, bin_size)
    return _masks_from_bins(genes["chrom"], b0, b1, e, sizes, chroms, bin_size, where)


def _promoter_masks(genes, sizes, chroms, bin_size, upstream_bins, where):
    s = genes["start"].to_numpy()
    e = genes["end"].to_numpy()
    plus = (genes["strand"] == "+").to_numpy()
    tss_bin = np.where(plus, s, e - 1) // bin_size
    b0 = np.where(plus, tss_bin - upstream_bins, tss_bin + 1)
    b1 = np.where(plus, tss_bin, tss_bin + 1 + upstream_bins)
    return _masks_from_bins(genes["chrom"], b0, b1, e, sizes, chroms, bin_size, where)


def _block_intervals(bed: pd.DataFrame, path: Path) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Expand BED12 rows into their blocks: (chrom per block, block starts, block ends)."""

    def ints(col: str) -> pd.Series:
        return bed[col].str.rstrip(",").str.split(",")

    sizes, offsets = ints("blockSizes"), ints("blockStarts")
    count = pd.to_numeric(bed["blockCount"], errors="coerce")
    n_sizes, n_offsets = sizes.str.len(), offsets.str.len()
    bad = np.flatnonzero(((count != n_sizes) | (count != n_offsets)).to_numpy())
    problems = [
        f"record {i + 1}: blockCount {bed['blockCount'].iloc[i]!r} does not match blockSizes "
        f"{bed['blockSizes'].iloc[i]!r} / blockStarts {bed['blockStarts'].iloc[i]!r}; expected "
        "as many comma-separated values as blockCount"
        for i in bad[:5]
    ]
    collect(problems, f"BED {path}")
    reps = n_sizes.to_numpy()
    try:
        size = np.array(sizes.explode().to_numpy(), dtype=np.int64)
        offset = np.array(offsets.explode().to_numpy(), dtype=np.int64)
    except ValueError as exc:
        raise InputDataError(
            f"BED {path}: blockSizes/blockStarts hold a non-integer ({exc}); expected "
            "comma-separated integers. Fix the file or pass blocks=False."
        ) from None
    start = np.repeat(bed["start"].to_numpy(), reps) + offset
    chrom = pd.Series(np.repeat(bed["chrom"].to_numpy(), reps))
    return chrom, start, start + size


def gene_masks(
    path: str | os.PathLike,
    chrom_sizes: ChromSizes,
    *,
    chroms: Iterable[str] | None = None,
    bin_size: int = BIN_SIZE,
    one_based_start: bool = True,
) -> dict[str, np.ndarray]:
    """Gene-body bins per chromosome.

    Parameters
    ----------
    path
        Gene BED6 (see :func:`read_genes`).
    chrom_sizes
        ``{chrom: length in bases}`` of the assembly, or a ``.chrom.sizes`` file.
    chroms
        Chromosomes to return (default: every chromosome of ``chrom_sizes``).
    bin_size
        Bases per bin.
    one_based_start
        See :func:`read_genes`.

    Returns
    -------
    dict
        ``{chrom: bool [ceil(length / bin_size)]}``.

    Raises
    ------
    InputDataError
        Malformed file, a chromosome absent from ``chrom_sizes``, a gene past its end.
    """
    _check_bin_size(bin_size)
    sizes = _chrom_sizes(chrom_sizes)
    chroms = _select_chroms(sizes, chroms, f"genes {path}")
    return _gene_masks(read_genes(path, one_based_start), sizes, chroms, bin_size, f"genes {path}")


def promoter_masks(
    path: str | os.PathLike,
    chrom_sizes: ChromSizes,
    *,
    chroms: Iterable[str] | None = None,
    bin_size: int = BIN_SIZE,
    upstream_bins: int = PROMOTER_BINS,
    one_based_start: bool = True,
) -> dict[str, np.ndarray]:
    """Promoter bins per chromosome: ``upstream_bins`` bins upstream of each TSS, TSS excluded.

    Parameters
    ----------
    path
        Gene BED6 with strands (see :func:`read_genes`).
    chrom_sizes, chroms, bin_size, one_based_start
        As :func:`gene_masks`.
    upstream_bins
        Promoter length in bins (80 bins of 25 bp = 2 kb, the challenge's MSEProm).

    Returns
    -------
    dict
        ``{chrom: bool [ceil(length / bin_size)]}``.
    """
    _check_bin_size(bin_size)
    sizes = _chrom_sizes(chrom_sizes)
    where = f"promoters {path}"
    chroms = _select_chroms(sizes, chroms, where)
    genes = read_genes(path, one_based_start)
    return _promoter_masks(genes, sizes, chroms, bin_size, upstream_bins, where)


def enhancer_masks(
    path: str | os.PathLike,
    chrom_sizes: ChromSizes,
    *,
    chroms: Iterable[str] | None = None,
    bin_size: int = BIN_SIZE,
    blocks: bool = False,
) -> dict[str, np.ndarray]:
    """Enhancer bins per chromosome.

    Parameters
    ----------
    path
        BED (BED12 when ``blocks``), 0-based.
    chrom_sizes, chroms, bin_size
        As :func:`gene_masks`.
    blocks
        False (default): the whole ``chromStart``-``chromEnd`` span of each enhancer (the
        challenge's choice). True: only the BED12 blocks.

    Returns
    -------
    dict
        ``{chrom: bool [ceil(length / bin_size)]}``.
    """
    _check_bin_size(bin_size)
    sizes = _chrom_sizes(chrom_sizes)
    where = f"enhancers {path}"
    chroms = _select_chroms(sizes, chroms, where)
    path = Path(path)
    bed = read_bed(path, min_columns=12 if blocks else 3)
    if blocks:
        chrom, s, e = _block_intervals(bed, path)
    else:
        chrom, s, e = bed["chrom"], bed["start"].to_numpy(), bed["end"].to_numpy()
    b0, b1 = _interval_bins(s, e, bin_size)
    return _masks_from_bins(chrom, b0, b1, e, sizes, chroms, bin_size, where)


def blacklist_masks(
    path: str | os.PathLike,
    chrom_sizes: ChromSizes,
    *,
    chroms: Iterable[str] | None = None,
    bin_size: int = BIN_SIZE,
) -> dict[str, np.ndarray]:
    """Blacklisted bins per chromosome (an exclusion mask).

    Parameters
    ----------
    path
        BED3 or wider, 0-based.
    chrom_sizes, chroms, bin_size
        As :func:`gene_masks`.

    Returns
    -------
    dict
        ``{chrom: bool [ceil(length / bin_size)]}``; True = exclude.
    """
    _check_bin_size(bin_size)
    sizes = _chrom_sizes(chrom_sizes)
    where = f"blacklist {path}"
    chroms = _select_chroms(sizes, chroms, where)
    bed = read_bed(path)
    s, e = bed["start"].to_numpy(), bed["end"].to_numpy()
    b0, b1 = _interval_bins(s, e, bin_size)
    return _masks_from_bins(bed["chrom"], b0, b1, e, sizes, chroms, bin_size, where)


def region_masks(
    chrom_sizes: ChromSizes,
    *,
    genes: str | os.PathLike | None = None,
    enhancers: str | os.PathLike | None = None,
    blacklist: str | os.PathLike | None = None,
    chroms: Iterable[str] | None = None,
    bin_size: int = BIN_SIZE,
    upstream_bins: int = PROMOTER_BINS,
    one_based_start: bool = True,
    enhancer_blocks: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """All region masks per chromosome, shaped for :func:`epiray.metrics.score_track`.

    Parameters
    ----------
    chrom_sizes
        ``{chrom: length}`` or a ``.chrom.sizes`` file.
    genes
        Gene BED6 -> keys ``"prom"`` and ``"gene"``.
    enhancers
        Enhancer BED -> key ``"enh"``.
    blacklist
        Blacklist BED -> key ``"blacklist"``.
    chroms
        Chromosomes to build (default every chromosome of ``chrom_sizes``: about 125 MB of
        masks per key for hg38, so pass the chromosomes you score).
    bin_size, upstream_bins, one_based_start, enhancer_blocks
        As the single-mask functions.

    Returns
    -------
    dict
        ``{chrom: {key: bool [n_bins]}}`` with the keys of the files given.
    """
    _check_bin_size(bin_size)
    sizes = _chrom_sizes(chrom_sizes)
    chroms = _select_chroms(sizes, chroms, "region masks")
    by_key: dict[str, dict[str, np.ndarray]] = {}
    if genes is not None:
        table = read_genes(genes, one_based_start)
        by_key["prom"] = _promoter_masks(
            table, sizes, chroms, bin_size, upstream_bins, f"promoters {genes}"
        )
        by_key["gene"] = _gene_masks(table, sizes, chroms, bin_size, f"genes {genes}")
    if enhancers is not None:
        by_key["enh"] = enhancer_masks(
            enhancers, sizes, chroms=chroms, bin_size=bin_size, blocks=enhancer_blocks
        )
    if blacklist is not None:
        by_key["blacklist"] = blacklist_masks(blacklist, sizes, chroms=chroms, bin_size=bin_size)
    return {c: {key: masks[c] for key, masks in by_key.items()} for c in chroms}


def challenge_region_masks(
    directory: str | os.PathLike,
    chrom_sizes: ChromSizes,
    *,
    chroms: Iterable[str] | None = None,
    bin_size: int = BIN_SIZE,
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`region_masks` from a directory holding the challenge files (:data:`CHALLENGE_FILES`).

    Parameters
    ----------
    directory
        e.g. ``shared/data/annotations/hg38``.
    chrom_sizes, chroms, bin_size
        As :func:`region_masks`.

    Returns
    -------
    dict
        ``{chrom: {"prom", "gene", "enh", "blacklist": bool [n_bins]}}``.

    Raises
    ------
    InputDataError
        When a file is missing from ``directory``.
    """
    directory = Path(directory)
    paths = {key: directory / name for key, name in CHALLENGE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    collect(
        [f"{p}: file not found; expected the challenge annotation file" for p in missing],
        f"annotations {directory}",
    )
    return region_masks(
        chrom_sizes,
        genes=paths["gene"],
        enhancers=paths["enh"],
        blacklist=paths["blacklist"],
        chroms=chroms,
        bin_size=bin_size,
    )
