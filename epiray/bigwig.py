"""bigWig <-> binned arrays. The only module that touches pyBigWig.

Binning follows the ENCODE Imputation Challenge convention: the value of bin ``i`` is the mean
signal over its bases ``[i * bin_size, min((i + 1) * bin_size, length))`` where bases without
data count as 0. The last bin of a chromosome is averaged over its actual (possibly shorter)
length.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyBigWig

from epiray.errors import InputDataError
from epiray.genome import n_bins


def open_bigwig(path: str | Path, *, experiment: str | None = None):
    """Open a bigWig for reading, turning pyBigWig's failures into one clear error.

    Raises
    ------
    InputDataError
        Missing file, or a file pyBigWig cannot open or that is not a bigWig (e.g. truncated).
    """
    where = _where(path, experiment)
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{where}: file not found. Fix the path in the manifest.")
    problem = _structure_problem(path)
    if problem:
        raise InputDataError(
            f"{where}: {problem}; the file is corrupt or truncated. Re-download or regenerate it."
        )
    try:
        bw = pyBigWig.open(str(path))
    except (RuntimeError, OSError) as e:
        raise InputDataError(
            f"{where}: cannot open as bigWig ({e}); the file is corrupt or truncated. "
            "Re-download or regenerate it."
        ) from None
    if bw is None or not bw.isBigWig():
        raise InputDataError(
            f"{where}: not a bigWig file (bigBed or another format?). Convert it to bigWig."
        )
    return bw


BIGWIG_MAGIC = 0x888FFC26


def _structure_problem(path: Path) -> str | None:
    """Cheap structural check: bigWig files start and end with the magic signature and every
    section offset in the header lies inside the file. pyBigWig reads a truncated file whose
    data section survived without complaint, so this catches what it misses."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64:
            return f"only {size} bytes, shorter than a bigWig header"
        magic, _, n_zoom, *offsets = struct.unpack("<IHHQQQHHQQ", head[:52])
        if magic != BIGWIG_MAGIC:
            return f"no bigWig signature (got 0x{magic:08x}, expected 0x{BIGWIG_MAGIC:08x})"
        zoom = f.read(24 * n_zoom)
        if len(zoom) < 24 * n_zoom:
            return "header ends inside the zoom level table"
        offs = [offsets[0], offsets[1], offsets[2], offsets[6]]
        for i in range(n_zoom):
            offs += struct.unpack("<QQ", zoom[24 * i + 8 : 24 * i + 24])
        if max(offs) >= size:
            return f"a section offset ({max(offs)}) lies beyond the end of the file ({size} B)"
        f.seek(size - 4)
        if struct.unpack("<I", f.read(4))[0] != BIGWIG_MAGIC:
            return "the file does not end with the bigWig signature"
    return None


def bigwig_chroms(path: str | Path, *, experiment: str | None = None) -> dict[str, int]:
    """Chromosome sizes declared in a bigWig header."""
    bw = open_bigwig(path, experiment=experiment)
    try:
        return dict(bw.chroms())
    finally:
        bw.close()


def bin_intervals(
    starts: np.ndarray,
    ends: np.ndarray,
    values: np.ndarray,
    length: int,
    bin_size: int,
) -> np.ndarray:
    """Mean signal per bin from non-overlapping, sorted intervals (bedGraph-like).

    Parameters
    ----------
    starts, ends
        int64 [n], 0-based half-open interval bounds in bases, sorted, non-overlapping.
    values
        float [n], the signal of each interval.
    length
        Chromosome length in bases.
    bin_size
        Bin width in bases.

    Returns
    -------
    numpy.ndarray
        float64 [ceil(length / bin_size)]: the mean over each bin's bases, uncovered bases = 0.
    """
    nb = n_bins(length, bin_size)
    edges = np.minimum(np.arange(nb + 1, dtype=np.int64) * bin_size, length)
    if len(starts) == 0:
        return np.zeros(nb, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    # F(x) = integral of the signal over [0, x): full intervals before x plus the part of the
    # interval that straddles x.
    cum = np.concatenate([[0.0], np.cumsum(values * (ends - starts))])
    j = np.searchsorted(ends, edges, side="right")  # intervals entirely left of x
    partial = np.zeros(len(edges))
    inside = j < len(starts)
    jj = j[inside]
    over = edges[inside] - starts[jj]
    partial[inside] = np.where(over > 0, values[jj] * over, 0.0)
    integral = cum[j] + partial
    widths = np.diff(edges)
    return np.diff(integral) / widths


def read_binned(
    path: str | Path,
    chrom: str,
    length: int,
    bin_size: int,
    *,
    file_chrom: str | None = None,
    experiment: str | None = None,
    bw=None,
) -> np.ndarray:
    """Read one chromosome of a bigWig as per-bin means (no transform applied).

    Parameters
    ----------
    path
        bigWig file.
    chrom
        Chromosome name in the assembly (used in messages).
    length
        Expected chromosome length in bases (from the declared assembly).
    bin_size
        Bin width in bases.
    file_chrom
        The name the file uses for ``chrom`` when it differs (``"1"`` for ``"chr1"``).
    experiment
        Experiment id, for messages.
    bw
        An already open pyBigWig handle (closed by the caller).

    Returns
    -------
    numpy.ndarray
        float64 [ceil(length / bin_size)], may contain NaN/inf if the file does (the caller's
        policy decides).

    Raises
    ------
    InputDataError
        The chromosome is missing from the file, or its length in the file disagrees with the
        declared assembly.
    """
    fc = file_chrom or chrom
    own = bw is None
    if own:
        bw = open_bigwig(path, experiment=experiment)
    try:
        chroms = bw.chroms()
        where = _where(path, experiment, chrom)
        if fc not in chroms:
            names = list(chroms)
            hint = ""
            if names and (names[0].startswith("chr") != fc.startswith("chr")):
                hint = (
                    " The file uses a different naming style ('chr1' vs '1'): set "
                    "chrom_names: ensembl (or ucsc) for this experiment, or rename the file's "
                    "chromosomes."
                )
            hint = hint or (
                " Remove the chromosome from the selection or set policies.missing_chroms: "
                "zeros to fill it explicitly."
            )
            more = " ..." if len(names) > 6 else ""
            raise InputDataError(
                f"{where}: chromosome {fc!r} not found in the file; the file has "
                f"{names[:6]}{more}.{hint}"
            )
        if int(chroms[fc]) != int(length):
            raise InputDataError(
                f"{where}: chromosome length disagrees with the declared assembly; expected "
                f"{length}, got {chroms[fc]} in the file header. The file was probably made "
                "for another assembly: fix the manifest's assembly column."
            )
        hdr = bw.header()
        summary = (hdr.get("minVal", 0), hdr.get("maxVal", 0), hdr.get("sumData", 0))
        if np.isfinite(np.asarray(summary, dtype=np.float64)).all():
            # the file holds no NaN/inf (its whole-file summary would not be finite): bin
            # per-base values in bounded chunks at C speed, bases without data read as NaN -> 0
            try:
                return _bin_values(bw, fc, length, bin_size)
            except RuntimeError as e:
                raise InputDataError(
                    f"{where}: cannot read values ({e}); the file is corrupt or truncated. "
                    "Re-download or regenerate it."
                ) from None
        try:
            iv = bw.intervals(fc)
        except RuntimeError as e:
            raise InputDataError(
                f"{where}: cannot read intervals ({e}); the file is corrupt or truncated. "
                "Re-download or regenerate it."
            ) from None
        if not iv:
            return np.zeros(n_bins(length, bin_size))
        arr = np.asarray(iv, dtype=np.float64)
        starts = arr[:, 0].astype(np.int64)
        ends = arr[:, 1].astype(np.int64)
        return bin_intervals(starts, ends, arr[:, 2], length, bin_size)
    finally:
        if own:
            bw.close()


VALUE_CHUNK_BINS = 1 << 19


def _bin_values(bw, chrom: str, length: int, bin_size: int) -> np.ndarray:
    """Mean per bin from ``bw.values`` read ``VALUE_CHUNK_BINS`` bins at a time."""
    nb = n_bins(length, bin_size)
    out = np.empty(nb, dtype=np.float64)
    step = VALUE_CHUNK_BINS * bin_size
    for start in range(0, length, step):
        end = min(start + step, length)
        v = bw.values(chrom, start, end, numpy=True)
        np.copyto(v, 0.0, where=np.isnan(v))
        full = (end - start) // bin_size
        b0 = start // bin_size
        out[b0 : b0 + full] = v[: full * bin_size].reshape(full, bin_size).sum(1, np.float64)
        if full * bin_size < end - start:
            out[b0 + full] = v[full * bin_size :].sum(dtype=np.float64)
    out /= bin_size
    tail = length - (nb - 1) * bin_size
    out[-1] *= bin_size / tail
    return out


def write_bigwig(
    path: str | Path,
    chrom_sizes: Mapping[str, int],
    tracks: Mapping[str, np.ndarray],
    bin_size: int,
) -> Path:
    """Write per-bin values as a bigWig, one entry per bin (span ``bin_size``), atomically.

    Parameters
    ----------
    path
        Output file. Written to a temporary name in the same directory, then renamed.
    chrom_sizes
        Chromosome -> length in bases, the header (in this order).
    tracks
        Chromosome -> float array [ceil(length / bin_size)] of bin values. Chromosomes absent
        here are declared in the header but have no data. The last bin is clipped to the
        chromosome end.
    bin_size
        Bin width in bases.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    header = [(c, int(n)) for c, n in chrom_sizes.items()]
    for chrom, vals in tracks.items():
        if chrom not in chrom_sizes:
            raise InputDataError(f"bigWig {path}: chromosome {chrom!r} not in chrom_sizes.")
        expected = n_bins(chrom_sizes[chrom], bin_size)
        if len(vals) != expected:
            raise InputDataError(
                f"bigWig {path}, chrom {chrom}: wrong number of bins; expected {expected}, "
                f"got {len(vals)}."
            )
    bw = pyBigWig.open(str(tmp), "w")
    try:
        bw.addHeader(header, maxZooms=10)
        for chrom, _ in header:
            if chrom not in tracks:
                continue
            vals = np.ascontiguousarray(tracks[chrom], dtype=np.float64)
            length = int(chrom_sizes[chrom])
            full = length // bin_size
            if full:
                bw.addEntries(chrom, 0, values=vals[:full], span=bin_size, step=bin_size)
            if full < len(vals):
                bw.addEntries(
                    [chrom], [full * bin_size], ends=[length], values=[float(vals[full])]
                )
    except BaseException:
        bw.close()
        tmp.unlink(missing_ok=True)
        raise
    bw.close()
    os.replace(tmp, path)
    return path


def _where(path, experiment=None, chrom=None) -> str:
    parts = []
    if experiment:
        parts.append(f"experiment {experiment}")
    parts.append(f"({path})" if experiment else str(path))
    s = " ".join(parts)
    if chrom:
        s += f" chrom {chrom}"
    return s
