"""Assemblies, chromosome sizes and 25 bp bins.

Coordinates are 0-based half-open (``start``, ``end``) in bases; bin ``i`` of a chromosome covers
bases ``[i * bin_size, min((i + 1) * bin_size, length))``. The number of bins of a chromosome is
``ceil(length / bin_size)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from epiray.errors import InputDataError

DEFAULT_BIN_SIZE = 25

_AUTOSOME = re.compile(r"^(chr)?(\d+)$")
_SEX = re.compile(r"^(chr)?([XYW Z])$".replace(" ", ""))


def n_bins(length: int, bin_size: int = DEFAULT_BIN_SIZE) -> int:
    """Number of bins covering ``length`` bases: ``ceil(length / bin_size)``."""
    return -(-int(length) // int(bin_size))


def read_chrom_sizes(path: str | Path) -> dict[str, int]:
    """Read a UCSC ``.chrom.sizes`` file (``chrom<TAB>length`` per line).

    Parameters
    ----------
    path
        The file. Blank lines and ``#`` comments are skipped.

    Returns
    -------
    dict
        Chromosome name -> length in bases, in file order.

    Raises
    ------
    InputDataError
        When the file is missing, a line is malformed, a length is not a positive integer, or a
        chromosome is listed twice; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(
            f"chrom sizes {path}: file not found. Give the path of a UCSC .chrom.sizes file "
            "(chrom<TAB>length per line)."
        )
    sizes: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) <= 0:
            raise InputDataError(
                f"chrom sizes {path}:{lineno}: malformed line {line!r}; expected "
                "'chrom<TAB>positive length'. Fix the file."
            )
        if parts[0] in sizes:
            raise InputDataError(
                f"chrom sizes {path}:{lineno}: chromosome {parts[0]!r} listed twice. Fix the file."
            )
        sizes[parts[0]] = int(parts[1])
    if not sizes:
        raise InputDataError(f"chrom sizes {path}: no chromosomes listed. Fix the file.")
    return sizes


def _chrom_sort_key(chrom: str) -> tuple[int, int, str]:
    m = _AUTOSOME.match(chrom)
    if m:
        return (0, int(m.group(2)), chrom)
    m = _SEX.match(chrom)
    if m:
        return (1, ord(m.group(2)), chrom)
    return (2, 0, chrom)


def is_primary(chrom: str) -> bool:
    """True for autosomes and sex chromosomes (``chr1``, ``1``, ``chrX``, ``Y``...)."""
    return bool(_AUTOSOME.match(chrom) or _SEX.match(chrom))


@dataclass(frozen=True)
class Assembly:
    """A genome assembly: its name, species and chromosome sizes.

    Attributes
    ----------
    name
        e.g. ``"mm10"``.
    species
        e.g. ``"mouse"``.
    chrom_sizes
        Chromosome -> length in bases.
    """

    name: str
    species: str
    chrom_sizes: Mapping[str, int] = field(default_factory=dict)

    def n_bins(self, chrom: str, bin_size: int = DEFAULT_BIN_SIZE) -> int:
        """Number of bins of ``chrom``; raises :class:`InputDataError` for an unknown chrom."""
        return n_bins(self.length(chrom), bin_size)

    def length(self, chrom: str) -> int:
        """Length of ``chrom`` in bases."""
        try:
            return int(self.chrom_sizes[chrom])
        except KeyError:
            raise InputDataError(
                f"assembly {self.name}: chromosome {chrom!r} not found; expected one of "
                f"{_preview(self.chrom_sizes)}. Check the chromosome list in the config."
            ) from None

    def select(self, chroms: str | Sequence[str] | None = None) -> list[str]:
        """Choose chromosomes.

        Parameters
        ----------
        chroms
            ``None`` or ``"all"``: every chromosome; ``"primary"``: autosomes and sex
            chromosomes; ``"autosomes+X"``: autosomes and X; or an explicit list (validated).

        Returns
        -------
        list of str
            Chromosomes in natural order (``chr1, chr2, ..., chr10, ..., chrX``).
        """
        names = list(self.chrom_sizes)
        if chroms is None or chroms == "all":
            chosen = names
        elif chroms == "primary":
            chosen = [c for c in names if is_primary(c)]
        elif chroms == "autosomes+X":
            chosen = [c for c in names if _AUTOSOME.match(c) or c in ("chrX", "X")]
        elif isinstance(chroms, str):
            raise InputDataError(
                f"assembly {self.name}: unknown chromosome selection {chroms!r}; expected "
                "'all', 'primary', 'autosomes+X' or a list of chromosomes."
            )
        else:
            missing = [c for c in chroms if c not in self.chrom_sizes]
            if missing:
                raise InputDataError(
                    f"assembly {self.name}: chromosome(s) {missing} not found; expected some of "
                    f"{_preview(self.chrom_sizes)}. Fix the chromosome list."
                )
            return list(dict.fromkeys(chroms))
        return sorted(chosen, key=_chrom_sort_key)


def _preview(names: Iterable[str], k: int = 6) -> str:
    names = list(names)
    head = ", ".join(repr(n) for n in names[:k])
    return f"[{head}{', ...' if len(names) > k else ''}] ({len(names)} in all)"


def ucsc_to_ensembl(chrom: str) -> str:
    """``chr1`` -> ``1``, ``chrM`` -> ``MT``; names without ``chr`` are returned unchanged."""
    if chrom == "chrM":
        return "MT"
    return chrom[3:] if chrom.startswith("chr") else chrom
