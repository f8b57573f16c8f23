"""UCSC chain files -> ungapped blocks -> 25 bp bin alignments and point liftOver.

A chain file (UCSC ``.over.chain``, optionally gzip-compressed) is a list of chains; each is a
header line ``chain score tName tSize tStrand tStart tEnd qName qSize qStrand qStart qEnd [id]``
followed by ``size dt dq`` lines and a last ``size`` line. ``size`` bases align without gaps (an
*ungapped block*); ``dt`` / ``dq`` are the gaps to the next block on the target / query. The
target strand is always ``+``; query coordinates on a ``-`` strand count from the end of the query
chromosome. Lines starting with ``#`` (``##matrix=...``, ``##gapPenalties=...``) are comments.

Coordinate conventions (everywhere in this module): 0-based, half-open, in bases unless named
``*_bin``. *Strand coordinates* of a ``-`` query interval ``[s, e)`` become *forward* coordinates
``[size - e, size - s)``. Bin ``i`` covers forward bases ``[i * bin_size, (i + 1) * bin_size)``.

Parsing is vectorised: the decompressed text is tokenised with numpy in chunks of
``CHUNK_BYTES`` (cut at line ends), numbers are parsed by Horner's rule applied to all tokens of
one length at once (a loop over digit positions, never over blocks or chains), and block
coordinates are cumulative sums within chains. Binning and liftOver are array operations too.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from epiray.errors import ConfigError, InputDataError

MinusStrand = Literal["paper", "mirrored"]
Orientation = Literal["target_human", "target_mouse"]

#: Bytes of decompressed text tokenised at once (bounds the parser's scratch memory).
CHUNK_BYTES = 1 << 24
#: Longest number accepted (int64 holds every 18-digit decimal).
_MAX_DIGITS = 18
# Header tokens: 0 'chain', 1 score, 2 tName, 3 tSize, 4 tStrand, 5 tStart, 6 tEnd, 7 qName,
# 8 qSize, 9 qStrand, 10 qStart, 11 qEnd, 12 id (optional, as in UCSC's chainRead).
_HEADER_INTS = (3, 5, 6, 8, 10, 11, 12)
_HEADER_FIELD = {
    1: "score",
    3: "tSize",
    5: "tStart",
    6: "tEnd",
    8: "qSize",
    10: "qStart",
    11: "qEnd",
    12: "id",
}


# ------------------------------------------------------------------------------------ the data
@dataclass(frozen=True, eq=False)
class Chains:
    """The chains of one file as columnar arrays: one row per chain, one row per block.

    Chromosomes are integer codes into ``t_names`` / ``q_names``. Every array is a numpy array
    indexed by chain (length ``n_chains``, names without ``block_``) or by block (length
    ``n_blocks``, names starting with ``block_``); blocks are in file order, so the blocks of
    chain ``c`` are ``block_first[c] : block_first[c] + block_count[c]``.

    Attributes
    ----------
    source
        The file name, used in error messages.
    t_names, q_names
        Target / query chromosome names; ``t_chrom`` / ``q_chrom`` index them.
    t_sizes, q_sizes
        int64 [len(t_names)] / [len(q_names)]: chromosome lengths in bases (from the headers).
    chain_id
        int64 [C]: the header's ``id`` (0 when the header has no id, as in UCSC's reader).
    score
        float64 [C]: the header's score.
    t_chrom, q_chrom
        int32 [C]: chromosome codes.
    t_start, t_end
        int64 [C]: target span (forward; the target strand is always ``+``).
    q_strand
        int8 [C]: ``+1`` or ``-1``.
    q_start, q_end
        int64 [C]: query span **on the query strand's own coordinates**, as in the header.
    header_line
        int64 [C]: 1-based line number of each chain's header in the file.
    block_chain
        int64 [B]: row of each block's chain in the per-chain arrays.
    block_t_start
        int64 [B]: target start of each block (forward).
    block_q_start
        int64 [B]: query start on the query strand's own coordinates (see
        :attr:`block_q_start_forward` for forward coordinates).
    block_size
        int64 [B]: block length in bases (the same on both species: blocks are ungapped).
    """

    source: str
    t_names: tuple[str, ...]
    q_names: tuple[str, ...]
    t_sizes: np.ndarray
    q_sizes: np.ndarray
    chain_id: np.ndarray
    score: np.ndarray
    t_chrom: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    q_chrom: np.ndarray
    q_strand: np.ndarray
    q_start: np.ndarray
    q_end: np.ndarray
    header_line: np.ndarray
    block_chain: np.ndarray
    block_t_start: np.ndarray
    block_q_start: np.ndarray
    block_size: np.ndarray

    @property
    def n_chains(self) -> int:
        """Number of chains."""
        return len(self.chain_id)

    @property
    def n_blocks(self) -> int:
        """Number of ungapped blocks."""
        return len(self.block_size)

    @cached_property
    def block_count(self) -> np.ndarray:
        """int64 [C]: number of blocks of each chain."""
        return np.bincount(self.block_chain, minlength=self.n_chains).astype(np.int64)

    @cached_property
    def block_first(self) -> np.ndarray:
        """int64 [C]: index of each chain's first block."""
        return np.cumsum(self.block_count) - self.block_count

    @cached_property
    def block_t_chrom(self) -> np.ndarray:
        """int32 [B]: target chromosome code of each block."""
        return self.t_chrom[self.block_chain]

    @cached_property
    def block_q_chrom(self) -> np.ndarray:
        """int32 [B]: query chromosome code of each block."""
        return self.q_chrom[self.block_chain]

    @cached_property
    def block_q_strand(self) -> np.ndarray:
        """int8 [B]: query strand (``+1`` / ``-1``) of each block."""
        return self.q_strand[self.block_chain]

    @cached_property
    def block_q_start_forward(self) -> np.ndarray:
        """int64 [B]: query start of each block in forward coordinates.

        For a ``-`` strand block at strand coordinates ``[s, s + size)`` on a chromosome of
        length ``L`` this is ``L - s - size``.
        """
        size = self.q_sizes[self.block_q_chrom]
        rev = size - self.block_q_start - self.block_size
        return np.where(self.block_q_strand < 0, rev, self.block_q_start)

    def blocks(self) -> pd.DataFrame:
        """The blocks as a DataFrame (forward coordinates on both species).

        Returns
        -------
        pandas.DataFrame
            One row per block, file order. Columns ``chain_id`` (int64), ``t_chrom`` and
            ``q_chrom`` (categorical names), ``t_start``, ``t_end``, ``q_start``, ``q_end``
            (int64 forward bases), ``q_strand`` (``"+"``/``"-"``), ``size`` (int64).
        """
        t_chrom = pd.Categorical.from_codes(self.block_t_chrom, categories=list(self.t_names))
        q_chrom = pd.Categorical.from_codes(self.block_q_chrom, categories=list(self.q_names))
        q0 = self.block_q_start_forward
        return pd.DataFrame(
            {
                "chain_id": self.chain_id[self.block_chain],
                "t_chrom": t_chrom,
                "t_start": self.block_t_start,
                "t_end": self.block_t_start + self.block_size,
                "q_chrom": q_chrom,
                "q_start": q0,
                "q_end": q0 + self.block_size,
                "q_strand": np.where(self.block_q_strand < 0, "-", "+"),
                "size": self.block_size,
            }
        )

    def t_sizes_dict(self) -> dict[str, int]:
        """Target chromosome -> length, as stated by the chain headers."""
        return {n: int(s) for n, s in zip(self.t_names, self.t_sizes)}

    def q_sizes_dict(self) -> dict[str, int]:
        """Query chromosome -> length, as stated by the chain headers."""
        return {n: int(s) for n, s in zip(self.q_names, self.q_sizes)}

    @cached_property
    def _point_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Elementary-segment index of the target: (event keys, hit counts, block ids, offsets).

        Target coordinates are linearised as ``offset[t_chrom] + pos``. Each block adds an event
        ``+1`` at its start and ``-1`` at its end; the running count after the last event at or
        before a position is the number of blocks covering it, and the running sum of
        ``block + 1`` (added at starts, removed at ends) is the covering block's index plus one
        when exactly one block covers it.
        """
        offsets = np.concatenate(([0], np.cumsum(self.t_sizes)[:-1])).astype(np.int64)
        keep = self.block_size > 0
        ids = np.flatnonzero(keep).astype(np.int64)
        start = offsets[self.block_t_chrom[keep]] + self.block_t_start[keep]
        key = np.concatenate((start, start + self.block_size[keep]))
        count = np.concatenate((np.ones(len(ids), np.int64), -np.ones(len(ids), np.int64)))
        idsum = np.concatenate((ids + 1, -(ids + 1)))
        order = np.argsort(key, kind="stable")
        return key[order], np.cumsum(count[order]), np.cumsum(idsum[order]), offsets


@dataclass(frozen=True, eq=False)
class BinAlignment:
    """Bin pairs of one mouse chromosome: row ``i`` pairs ``mouse_bin[i]`` with human bin
    ``human_bin[i]`` on chromosome ``human_names[human_chrom[i]]``.

    Attributes
    ----------
    mouse_chrom
        The mouse chromosome.
    mouse_bin
        int64 [A]: mouse bins, ascending; the pairs of a mouse bin aligned more than once keep
        the chain-file order of their blocks.
    human_chrom
        int32 [A]: codes into ``human_names``.
    human_bin
        int64 [A]: human bins.
    human_names
        Human chromosome names (the vocabulary of the whole chain file).
    """

    mouse_chrom: str
    mouse_bin: np.ndarray
    human_chrom: np.ndarray
    human_bin: np.ndarray
    human_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.mouse_bin)

    @property
    def human_chrom_names(self) -> np.ndarray:
        """object [A]: the human chromosome name of each row."""
        return np.asarray(self.human_names, dtype=object)[self.human_chrom]

    def to_frame(self) -> pd.DataFrame:
        """Columns ``mouse_bin`` (int64), ``human_chrom`` (categorical), ``human_bin`` (int64)."""
        return pd.DataFrame(
            {
                "mouse_bin": self.mouse_bin,
                "human_chrom": pd.Categorical.from_codes(
                    self.human_chrom, categories=list(self.human_names)
                ),
                "human_bin": self.human_bin,
            }
        )


# ---------------------------------------------------------------------------------- reading
def read_chain(
    path: str | Path,
    target_sizes: Mapping[str, int] | None = None,
    query_sizes: Mapping[str, int] | None = None,
    *,
    target_assembly: str = "target",
    query_assembly: str = "query",
) -> Chains:
    """Read a UCSC chain file (plain or gzip) into columnar blocks, validating it strictly.

    Parameters
    ----------
    path
        The chain file; gzip is detected from its magic bytes, not its name.
    target_sizes, query_sizes
        Optional chromosome -> length (bases) of the target / query assembly; when given, every
        chromosome the file names must be listed with the length its headers state (see
        :func:`check_chrom_sizes`).
    target_assembly, query_assembly
        Assembly names for messages, e.g. ``"hg38"`` and ``"mm10"``.

    Returns
    -------
    Chains
        The chains and their blocks.

    Raises
    ------
    InputDataError
        Missing, unreadable, truncated or malformed file (the message names the file and line):
        an unknown line, a header without 12-13 fields, a non-numeric field, a ``-`` target
        strand, a span outside its chromosome, a chromosome given two lengths, a chain whose
        block sizes plus gaps do not sum to ``tEnd - tStart`` and ``qEnd - qStart``, a chain
        without its final ``size`` line; or chromosome names/lengths contradicting
        ``target_sizes`` / ``query_sizes``.
    """
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise InputDataError(
            f"chain {src}: file not found. Give the path of a UCSC chain file (.chain or "
            ".chain.gz)."
        )
    headers: list[dict[str, np.ndarray]] = []
    datas: list[dict[str, np.ndarray]] = []
    for buf, first_line in _text_chunks(path):
        h, d = _parse_chunk(buf, first_line, src)
        headers.append(h)
        datas.append(d)
    chains = _assemble(src, headers, datas)
    if target_sizes is not None or query_sizes is not None:
        check_chrom_sizes(
            chains,
            target_sizes,
            query_sizes,
            target_assembly=target_assembly,
            query_assembly=query_assembly,
        )
    return chains


def _text_chunks(path: Path, chunk: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (uint8 text ending with a newline, 1-based number of its first line)."""
    src = str(path)
    chunk = chunk or CHUNK_BYTES
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        f: io.BufferedIOBase = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw
        carry = b""
        line = 1
        while True:
            try:
                data = f.read(chunk)
            except (EOFError, OSError, zlib.error) as exc:
                raise InputDataError(
                    f"chain {src}: the gzip stream is damaged or truncated ({exc}); expected a "
                    "complete gzip file. Download the file again."
                ) from None
            if not data:
                break
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            carry = data[cut:]
            arr = np.frombuffer(data[:cut], dtype=np.uint8)
            yield arr, line
            line += int(np.count_nonzero(arr == 10))
        if carry:
            yield np.frombuffer(carry + b"\n", dtype=np.uint8), line


def _parse_numbers(
    a: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Decimal values of tokens ``a[starts[i] : starts[i] + lengths[i]]``.

    Returns int64 values and a bool mask of tokens that are not plain non-negative integers of
    at most 18 digits (their value is meaningless). Tokens are grouped by length, then each
    group is parsed by Horner's rule, one vectorised step per digit: the work is proportional to
    the number of digit bytes, with no loop per token.
    """
    n = len(starts)
    value = np.zeros(n, dtype=np.int64)
    bad = lengths > _MAX_DIGITS
    if n == 0:
        return value, bad
    short = np.minimum(lengths, _MAX_DIGITS + 1).astype(np.uint8)
    present = np.flatnonzero(np.bincount(short, minlength=_MAX_DIGITS + 2)[: _MAX_DIGITS + 1])
    for width in present[present > 0]:
        idx = np.flatnonzero(short == width)
        s = starts[idx]
        v = np.zeros(len(idx), dtype=np.int64)
        b = np.zeros(len(idx), dtype=bool)
        for k in range(width):
            d = a[s + k] - np.uint8(48)  # wraps above 9 for any non-digit byte
            b |= d > 9
            v *= 10
            v += d
        value[idx] = v
        bad[idx] |= b
    return value, bad


def _token_bytes(a: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Tokens as a fixed-width bytes array (``S{max length}``), gathered without a loop."""
    if len(starts) == 0:
        return np.zeros(0, dtype="S1")
    width = max(int(lengths.max()), 1)
    k = np.arange(width)
    idx = starts[:, None] + k[None, :]
    live = k[None, :] < lengths[:, None]
    out = np.where(live, a[np.where(live, idx, 0)], 0).astype(np.uint8)
    return np.ascontiguousarray(out).view(f"S{width}").ravel()


def _line_error(src: str, line: int, what: str) -> InputDataError:
    return InputDataError(f"chain {src} line {line}: {what}")


def _word(a: np.ndarray, start: int, length: int) -> str:
    return bytes(a[start : start + length]).decode(errors="replace")


def _parse_chunk(
    a: np.ndarray, first_line: int, src: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Tokenise one chunk; return header records and data-line records (line numbers global).

    ``a`` is uint8 text ending with a newline. Tokens are maximal runs of bytes above 32;
    tab, CR, LF and space separate them, any other control byte is refused.
    """
    ctrl = a[a < 32]
    odd = (ctrl != 9) & (ctrl != 10) & (ctrl != 13)
    if odd.any():
        at = int(np.flatnonzero((a < 32) & (a != 9) & (a != 10) & (a != 13))[0])
        raise _line_error(
            src,
            first_line + int(np.count_nonzero(a[:at] == 10)),
            f"control byte {int(a[at])} in the text; expected a text chain file. The file is "
            "binary or corrupted.",
        )
    nl = np.flatnonzero(a == 10)
    n_lines = len(nl)
    sep = a <= 32
    t_start = np.flatnonzero(sep[:-1] > sep[1:]) + 1  # separator then token byte
    if not sep[0]:
        t_start = np.concatenate(([0], t_start))
    t_len = np.flatnonzero(sep[:-1] < sep[1:]) + 1 - t_start  # the text ends with a newline
    before = np.searchsorted(t_start, nl)  # tokens starting before each newline
    ntok = np.diff(before, prepend=0)
    ftok = before - ntok
    has = ntok > 0
    first_byte = np.zeros(n_lines, dtype=np.uint8)
    first_byte[has] = a[t_start[ftok[has]]]
    is_comment = has & (first_byte == ord("#"))
    is_header = has & (first_byte == ord("c"))
    is_data = has & (first_byte >= ord("0")) & (first_byte <= ord("9"))
    other = has & ~(is_comment | is_header | is_data)
    if other.any():
        i = int(np.flatnonzero(other)[0])
        text = bytes(a[(nl[i - 1] + 1 if i else 0) : nl[i]]).decode(errors="replace")[:60]
        raise _line_error(
            src,
            first_line + i,
            f"unexpected line {text!r}; expected a 'chain ...' header, a 'size dt dq' block "
            "line or a '#' comment. Is this a chain file?",
        )
    value, bad = _parse_numbers(a, t_start, t_len)

    # ---- data lines: 1 or 3 numbers
    d_lines = np.flatnonzero(is_data)
    d_ntok = ntok[d_lines]
    bad_count = (d_ntok != 1) & (d_ntok != 3)
    if bad_count.any():
        i = int(d_lines[np.flatnonzero(bad_count)[0]])
        raise _line_error(
            src,
            first_line + i,
            f"block line with {ntok[i]} fields; expected 3 ('size dt dq') or 1 (the chain's "
            "last 'size'). The file is malformed.",
        )
    d_vals = np.zeros((len(d_lines), 3), dtype=np.int64)
    dtok = ftok[d_lines]
    for j in range(3):
        sel = d_ntok > j
        tok = dtok[sel] + j
        if bad[tok].any():
            k = int(np.flatnonzero(bad[tok])[0])
            i = int(d_lines[np.flatnonzero(sel)[k]])
            raise _line_error(
                src,
                first_line + i,
                f"block field {j + 1} is {_word(a, t_start[tok[k]], t_len[tok[k]])!r}; expected "
                "a non-negative integer. The file is malformed.",
            )
        d_vals[sel, j] = value[tok]

    # ---- header lines: 'chain' + 11 or 12 fields
    h_lines = np.flatnonzero(is_header)
    h_ntok = ntok[h_lines]
    bad_count = (h_ntok != 12) & (h_ntok != 13)
    if bad_count.any():
        i = int(h_lines[np.flatnonzero(bad_count)[0]])
        raise _line_error(
            src,
            first_line + i,
            f"chain header with {ntok[i]} fields; expected 13 ('chain score tName tSize tStrand "
            "tStart tEnd qName qSize qStrand qStart qEnd id'). The file is truncated or "
            "malformed.",
        )
    htok = ftok[h_lines]
    kw = _token_bytes(a, t_start[htok], t_len[htok])
    if (kw != b"chain").any():
        k = int(np.flatnonzero(kw != b"chain")[0])
        raise _line_error(
            src,
            first_line + int(h_lines[k]),
            f"line starts with {kw[k].decode(errors='replace')!r}; expected 'chain' or a number. "
            "The file is malformed.",
        )
    hdr: dict[str, np.ndarray] = {"line": first_line + h_lines.astype(np.int64)}
    for j in _HEADER_INTS:
        sel = h_ntok > j
        tok = htok[sel] + j
        if bad[tok].any():
            k = int(np.flatnonzero(sel)[np.flatnonzero(bad[tok])[0]])
            t = htok[k] + j
            raise _line_error(
                src,
                first_line + int(h_lines[k]),
                f"header field {_HEADER_FIELD[j]} is {_word(a, t_start[t], t_len[t])!r}; "
                "expected a non-negative integer. The file is malformed.",
            )
        col = np.zeros(len(h_lines), dtype=np.int64)
        col[sel] = value[tok]
        hdr[_HEADER_FIELD[j]] = col
    # Scores are doubles in UCSC's reader; integers (the norm) parse vectorised, others by float.
    score = value[htok + 1].astype(np.float64)
    for k in np.flatnonzero(bad[htok + 1]):
        word = _word(a, t_start[htok[k] + 1], t_len[htok[k] + 1])
        try:
            score[k] = float(word)
        except ValueError:
            raise _line_error(
                src,
                first_line + int(h_lines[k]),
                f"header field score is {word!r}; expected a number. The file is malformed.",
            ) from None
    hdr["score"] = score
    for j, name in ((4, "tStrand"), (9, "qStrand")):
        st = _token_bytes(a, t_start[htok + j], t_len[htok + j])
        ok = (st == b"+") | (st == b"-")
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            raise _line_error(
                src,
                first_line + int(h_lines[k]),
                f"header field {name} is {st[k].decode(errors='replace')!r}; expected '+' or "
                "'-'. The file is malformed.",
            )
        hdr[name] = np.where(st == b"-", -1, 1).astype(np.int8)
    hdr["tName"] = _token_bytes(a, t_start[htok + 2], t_len[htok + 2])
    hdr["qName"] = _token_bytes(a, t_start[htok + 7], t_len[htok + 7])
    data = {
        "line": first_line + d_lines.astype(np.int64),
        "ntok": d_ntok.astype(np.int8),
        "vals": d_vals,
    }
    return hdr, data


def _assemble(
    src: str, headers: list[dict[str, np.ndarray]], datas: list[dict[str, np.ndarray]]
) -> Chains:
    """Join chunk records into chains and blocks; validate chain structure and spans."""
    h = {k: np.concatenate([x[k] for x in headers]) for k in headers[0]} if headers else {}
    d = {k: np.concatenate([x[k] for x in datas]) for k in datas[0]} if datas else {}
    if not h or len(h["line"]) == 0:
        raise InputDataError(
            f"chain {src}: no 'chain' header line; expected at least one chain. The file is "
            "empty or not a chain file."
        )
    h_line, d_line = h["line"], d["line"]
    n_chains = len(h_line)
    chain_of = np.searchsorted(h_line, d_line) - 1
    if len(chain_of) and chain_of[0] < 0:
        raise _line_error(
            src,
            int(d_line[0]),
            "block line before any 'chain' header; expected the file to start with a header. "
            "The file is malformed.",
        )
    count = np.bincount(chain_of, minlength=n_chains)
    if (count == 0).any():
        c = int(np.flatnonzero(count == 0)[0])
        raise _line_error(
            src,
            int(h_line[c]),
            "chain has no block lines; expected 'size dt dq' lines and a final 'size' line after "
            "the header. The file is truncated or malformed.",
        )
    last = np.zeros(len(d_line), dtype=bool)
    last[np.cumsum(count) - 1] = True
    ntok = d["ntok"]
    wrong_last = last & (ntok != 1)
    if wrong_last.any():
        i = int(np.flatnonzero(wrong_last)[0])
        raise _line_error(
            src,
            int(d_line[i]),
            "chain ends with a 'size dt dq' line; expected a last line holding only 'size'. "
            "The file is truncated.",
        )
    wrong_mid = ~last & (ntok != 3)
    if wrong_mid.any():
        i = int(np.flatnonzero(wrong_mid)[0])
        raise _line_error(
            src,
            int(d_line[i]),
            "a chain's final 'size' line is followed by more block lines; expected a 'chain' "
            "header. The file is malformed.",
        )
    vals = d["vals"]
    size, dt, dq = vals[:, 0], vals[:, 1], vals[:, 2]
    first = np.cumsum(count) - count

    # ---- spans
    t_start, t_end, q_start, q_end = h["tStart"], h["tEnd"], h["qStart"], h["qEnd"]
    t_size, q_size = h["tSize"], h["qSize"]
    for lo, hi, sz, which in (
        (t_start, t_end, t_size, "tStart <= tEnd <= tSize"),
        (q_start, q_end, q_size, "qStart <= qEnd <= qSize"),
    ):
        bad = (lo > hi) | (hi > sz)
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            raise _line_error(
                src,
                int(h_line[c]),
                f"chain span outside its chromosome; expected {which}, got {int(lo[c])}, "
                f"{int(hi[c])}, {int(sz[c])}. The file is malformed.",
            )
    if (h["tStrand"] < 0).any():
        c = int(np.flatnonzero(h["tStrand"] < 0)[0])
        raise _line_error(
            src,
            int(h_line[c]),
            "target strand is '-'; expected '+' (UCSC chains always align the target's forward "
            "strand). Swap the chain with `chainSwap` or fix the file.",
        )
    t_step, q_step = size + dt, size + dq
    t_sum = np.add.reduceat(t_step, first)
    q_sum = np.add.reduceat(q_step, first)
    for got, lo, hi, name in (
        (t_sum, t_start, t_end, "tEnd - tStart"),
        (q_sum, q_start, q_end, "qEnd - qStart"),
    ):
        bad = got != hi - lo
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            raise _line_error(
                src,
                int(h_line[c]),
                f"block sizes plus gaps of chain id {int(h['id'][c])} sum to {int(got[c])}; "
                f"expected {name} = {int(hi[c] - lo[c])} ({int(np.count_nonzero(bad))} chain(s) "
                "disagree). The file is truncated or corrupted.",
            )

    # ---- chromosome vocabularies and per-file length consistency
    t_names, t_chrom, t_sizes = _vocab(src, h["tName"], t_size, h_line, "target")
    q_names, q_chrom, q_sizes = _vocab(src, h["qName"], q_size, h_line, "query")

    block_chain = np.repeat(np.arange(n_chains, dtype=np.int64), count)
    t_off = np.cumsum(t_step) - t_step
    q_off = np.cumsum(q_step) - q_step
    base_t = t_off[first]
    base_q = q_off[first]
    return Chains(
        source=src,
        t_names=t_names,
        q_names=q_names,
        t_sizes=t_sizes,
        q_sizes=q_sizes,
        chain_id=h["id"],
        score=h["score"],
        t_chrom=t_chrom,
        t_start=t_start,
        t_end=t_end,
        q_chrom=q_chrom,
        q_strand=h["qStrand"],
        q_start=q_start,
        q_end=q_end,
        header_line=h_line,
        block_chain=block_chain,
        block_t_start=t_start[block_chain] + t_off - base_t[block_chain],
        block_q_start=q_start[block_chain] + q_off - base_q[block_chain],
        block_size=size,
    )


def _vocab(
    src: str, names: np.ndarray, sizes: np.ndarray, h_line: np.ndarray, side: str
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Codes of chromosome names; refuses a chromosome given two different lengths."""
    uniq, codes = np.unique(names, return_inverse=True)
    codes = codes.astype(np.int32).ravel()
    lo = np.full(len(uniq), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.zeros(len(uniq), dtype=np.int64)
    np.minimum.at(lo, codes, sizes)
    np.maximum.at(hi, codes, sizes)
    if (lo != hi).any():
        k = int(np.flatnonzero(lo != hi)[0])
        rows = np.flatnonzero(codes == k)
        other = rows[sizes[rows] != sizes[rows[0]]][0]
        raise _line_error(
            src,
            int(h_line[other]),
            f"{side} chromosome {uniq[k].decode()!r} has length {int(sizes[other])}; expected "
            f"{int(sizes[rows[0]])} as at line {int(h_line[rows[0]])}. The file mixes assemblies.",
        )
    return tuple(x.decode() for x in uniq), codes, lo


# ------------------------------------------------------------------------------ validation
def check_chrom_sizes(
    chains: Chains,
    target_sizes: Mapping[str, int] | None,
    query_sizes: Mapping[str, int] | None,
    *,
    target_assembly: str = "target",
    query_assembly: str = "query",
    unknown: Literal["error", "ignore"] = "error",
) -> None:
    """Check the chromosome names and lengths a chain file states against assemblies.

    Parameters
    ----------
    chains
        From :func:`read_chain`.
    target_sizes, query_sizes
        Chromosome -> length (bases) of the assembly the caller says is the target / query;
        ``None`` skips that side.
    target_assembly, query_assembly
        Assembly names for messages.
    unknown
        ``"error"``: every chromosome of the file must be listed. ``"ignore"``: chromosomes not
        listed are allowed (e.g. a store holding only some chromosomes), but at least one must
        be, and every listed one must have the stated length.

    Raises
    ------
    InputDataError
        A chromosome is missing or has another length. When the file fits the assemblies the
        other way round, the message says the orientation is swapped.
    """
    problems: list[str] = []
    for names, sizes, ref, asm, side in (
        (chains.t_names, chains.t_sizes, target_sizes, target_assembly, "target"),
        (chains.q_names, chains.q_sizes, query_sizes, query_assembly, "query"),
    ):
        if ref is not None:
            problems += _size_problems(names, sizes, ref, asm, side, unknown)
    if not problems:
        return
    swapped = (
        target_sizes is not None
        and query_sizes is not None
        and not _size_problems(chains.t_names, chains.t_sizes, query_sizes, "", "", unknown)
        and not _size_problems(chains.q_names, chains.q_sizes, target_sizes, "", "", unknown)
    )
    hint = (
        f"The file fits the other way round (target {query_assembly}, query "
        f"{target_assembly}): swap the orientation."
        if swapped
        else f"Use the chain file for target {target_assembly} and query {query_assembly}, or "
        "the matching chromosome sizes."
    )
    raise InputDataError(
        f"chain {chains.source}: chromosomes do not match the stated assemblies; "
        + "; ".join(problems[:5])
        + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        + f". {hint}"
    )


def _size_problems(
    names: Sequence[str],
    sizes: np.ndarray,
    ref: Mapping[str, int],
    asm: str,
    side: str,
    unknown: str,
) -> list[str]:
    problems = []
    known = 0
    for name, size in zip(names, sizes):
        if name not in ref:
            if unknown == "error":
                problems.append(
                    f"{side} chromosome {name!r} is not in {asm}; expected one of {asm}'s "
                    f"{len(ref)} chromosomes"
                )
            continue
        known += 1
        if int(ref[name]) != int(size):
            problems.append(
                f"{side} chromosome {name!r} has length {int(size)} in the file; expected "
                f"{int(ref[name])} ({asm})"
            )
    if unknown == "ignore" and known == 0 and len(names):
        problems.append(
            f"no {side} chromosome of the file ({list(names)[:3]}...) is in {asm}; expected "
            f"some of {list(ref)[:3]}..."
        )
    return problems


# ------------------------------------------------------------------------------------ binning
def bin_blocks(
    chains: Chains,
    orientation: Orientation,
    bin_size: int = 25,
    *,
    human_sizes: Mapping[str, int] | None = None,
    mouse_sizes: Mapping[str, int] | None = None,
    human_assembly: str = "human",
    mouse_assembly: str = "mouse",
    minus_strand: MinusStrand = "paper",
) -> dict[str, BinAlignment]:
    """Turn ungapped blocks into pairs of aligned bins, per mouse chromosome (METHODS §2).

    For each block of at least ``bin_size`` bases, with forward intervals ``[h0, h1)`` on the
    human and ``[m0, m1)`` on the mouse chromosome (``-`` strand intervals converted with
    ``start' = size - end``, ``end' = size - start``), the bins of each species are
    ``[h0 // bin_size, h1 // bin_size)`` and ``[m0 // bin_size, m1 // bin_size)``. Bins are
    paired as follows (pairs where either bin falls outside its species' range are dropped):

    * ``+`` strand, the paper's rule: from the block start, human bins ascending with mouse
      bins ascending, ``(h0 // bin_size + j, m0 // bin_size + j)``; where the counts differ the
      extra bin at the end is dropped (mm10 120-215 ~ hg38 72-167 gives mouse [4, 8) ~ human
      [2, 6)).
    * ``-`` strand, ``minus_strand="paper"`` (the default; METHODS §2 and the paper taken
      literally): exactly as on ``+`` once the interval is in forward coordinates.
    * ``-`` strand, ``minus_strand="mirrored"``: human base ``h0 + k`` aligns to mouse base
      ``m1 - 1 - k``, so human bins ascending pair with mouse bins **descending**. "From the
      start" has no single meaning then (the block starts at ``h0`` on the human but ends at
      ``m0`` on the mouse), so each human bin ``b`` is paired with the mouse bin holding the
      partner of its centre base ``b * bin_size + (bin_size - 1) // 2``: mouse bin ``K - b``
      with ``K = (h0 + m1 - 1 - (bin_size - 1) // 2) // bin_size``. That bin holds the majority
      of the bin's aligned bases; the rule is the same seen from either species, so a block
      gives the same pairs in ``hg38ToMm10`` and ``mm10ToHg38`` files. Up to two pairs fewer
      than the smaller count remain (a bin whose majority partner is a partial bin is dropped).

    Fraction of aligned bases (blocks >= 25 bp) that fall in a pair of paired bins, measured
    on ``hg38ToHg19`` with hg19 as the "mouse" (chr1 / chr21 / chrX): ``+`` (paper rule) 67 /
    69 / 70%; ``-`` mirrored 71 / 75 / 69%, versus 64 / 42 / 57% anchoring at the human start,
    62 / 71 / 61% at the mouse start, and 18 / 49 / 24% with the paper's rule (pairing ``-``
    bins in the same direction as on ``+`` puts aligned bases in paired bins only by
    accident). The paper's rule is the default because epiray reproduces the published
    method; ``mirrored`` is the better mapping for new work. For
    bin-aligned blocks every rule pairs every aligned base correctly.

    Parameters
    ----------
    chains
        From :func:`read_chain`.
    orientation
        ``"target_human"`` for ``hg38ToMm10``-style files (target human, query mouse; the
        paper's), ``"target_mouse"`` for ``mm10ToHg38``-style files.
    bin_size
        Bin size in bases (25).
    human_sizes, mouse_sizes
        Optional chromosome -> length of the human / mouse assembly; when given, the file's
        chromosomes are checked against them for the stated orientation (every chromosome of
        the file must be listed with the same length).
    human_assembly, mouse_assembly
        Assembly names for messages.
    minus_strand
        ``"paper"`` (reproduces the published mapping) or ``"mirrored"`` (keeps aligned bases
        of inverted blocks together; see the figures above).

    Returns
    -------
    dict of str to BinAlignment
        Mouse chromosome -> its bin pairs sorted by mouse bin (a mouse bin aligned more than
        once keeps its pairs in chain-file order). Chromosomes without pairs are absent.
        Holds every pair of the file at once; :func:`iter_bin_blocks` yields one chromosome
        at a time.

    Raises
    ------
    InputDataError
        The chain's chromosomes contradict ``human_sizes`` / ``mouse_sizes`` for
        ``orientation`` (the message says when the other orientation fits).
    epiray.errors.ConfigError
        Unknown ``orientation`` or a bin size below 1.
    """
    return {
        a.mouse_chrom: a
        for a in iter_bin_blocks(
            chains,
            orientation,
            bin_size,
            human_sizes=human_sizes,
            mouse_sizes=mouse_sizes,
            human_assembly=human_assembly,
            mouse_assembly=mouse_assembly,
            minus_strand=minus_strand,
        )
    }


def iter_bin_blocks(
    chains: Chains,
    orientation: Orientation,
    bin_size: int = 25,
    *,
    human_sizes: Mapping[str, int] | None = None,
    mouse_sizes: Mapping[str, int] | None = None,
    human_assembly: str = "human",
    mouse_assembly: str = "mouse",
    mouse_chroms: Collection[str] | None = None,
    minus_strand: MinusStrand = "paper",
) -> Iterator[BinAlignment]:
    """:func:`bin_blocks` one mouse chromosome at a time (memory: one chromosome's pairs).

    Parameters are those of :func:`bin_blocks`, plus ``mouse_chroms``: only these mouse
    chromosomes (``None``: all). Chromosomes are yielded in the order of ``mouse_chroms`` or,
    when it is ``None``, of the file's sorted mouse chromosome names; those without pairs are
    skipped. Validation happens before the first chromosome is yielded.
    """
    t_is_human = _orientation(orientation)
    if bin_size < 1:
        raise ConfigError(f"bin_blocks: bin_size {bin_size}; expected a positive integer.")
    if human_sizes is not None or mouse_sizes is not None:
        check_chrom_sizes(
            chains,
            human_sizes if t_is_human else mouse_sizes,
            mouse_sizes if t_is_human else human_sizes,
            target_assembly=human_assembly if t_is_human else mouse_assembly,
            query_assembly=mouse_assembly if t_is_human else human_assembly,
        )
    if minus_strand not in ("paper", "mirrored"):
        raise ConfigError(
            f"bin_blocks: minus_strand {minus_strand!r}; expected 'paper' or 'mirrored'."
        )
    return _iter_bins(chains, t_is_human, bin_size, mouse_chroms, minus_strand == "mirrored")


def _iter_bins(
    chains: Chains,
    t_is_human: bool,
    bin_size: int,
    mouse_chroms: Collection[str] | None,
    mirrored: bool,
) -> Iterator[BinAlignment]:
    mouse_names = chains.q_names if t_is_human else chains.t_names
    human_names = chains.t_names if t_is_human else chains.q_names
    mcode = chains.block_q_chrom if t_is_human else chains.block_t_chrom
    keep = np.flatnonzero(chains.block_size >= bin_size)
    order = keep[np.argsort(mcode[keep], kind="stable")]  # file order within a chromosome
    bounds = np.searchsorted(mcode[order], np.arange(len(mouse_names) + 1))
    lookup = {name: i for i, name in enumerate(mouse_names)}
    wanted = sorted(lookup) if mouse_chroms is None else list(mouse_chroms)
    for name in wanted:
        code = lookup.get(name)
        if code is None or bounds[code] == bounds[code + 1]:
            continue
        pairs = _chrom_pairs(
            chains, order[bounds[code] : bounds[code + 1]], t_is_human, bin_size, mirrored
        )
        if len(pairs[0]):
            yield BinAlignment(name, *pairs, human_names)


def _chrom_pairs(
    chains: Chains, blocks: np.ndarray, t_is_human: bool, bin_size: int, mirrored: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mouse_bin int64, human_chrom int32, human_bin int64) of ``blocks`` (one mouse
    chromosome, file order), sorted by mouse bin with ties in file order.

    Each block's pairs form a run of consecutive mouse bins (human bins ascending on ``+``,
    descending on ``-``), so blocks are sorted by their first mouse bin and the runs written
    with two cumulative sums; only when runs of different blocks overlap on the mouse is a
    stable pair-level sort needed.
    """
    size = chains.block_size[blocks]
    t0 = chains.block_t_start[blocks]
    q0 = chains.block_q_start_forward[blocks]
    # the paper's rule pairs - strand bins like + strand ones, after the forward conversion
    minus = (chains.block_q_strand[blocks] < 0) & mirrored
    h0, m0 = (t0, q0) if t_is_human else (q0, t0)
    h1, m1 = h0 + size, m0 + size
    hb0, hb1 = h0 // bin_size, h1 // bin_size
    mb0, mb1 = m0 // bin_size, m1 // bin_size
    # + strand: human hb0 + j ~ mouse mb0 + j. - strand: human b ~ mouse anchor - b (the bin of
    # the partner of b's centre base), for the human bins [lo, hi) whose partner is in range.
    anchor = (h0 + m1 - 1 - (bin_size - 1) // 2) // bin_size
    lo = np.where(minus, np.maximum(hb0, anchor - mb1 + 1), hb0)
    hi = np.where(minus, np.minimum(hb1, anchor - mb0 + 1), np.minimum(hb1, hb0 + mb1 - mb0))
    n = hi - lo
    # Runs in mouse-ascending order: first mouse bin, its human bin, human step.
    m_first = np.where(minus, anchor - (hi - 1), mb0)
    h_first = np.where(minus, hi - 1, lo)
    h_step = np.where(minus, -1, 1)
    hcode = (chains.block_t_chrom if t_is_human else chains.block_q_chrom)[blocks]
    live = np.flatnonzero(n > 0)  # file order
    by_mouse = live[np.argsort(m_first[live], kind="stable")]
    m_last = m_first[by_mouse] + n[by_mouse] - 1
    overlap = len(live) > 1 and bool(
        (m_first[by_mouse[1:]] <= np.maximum.accumulate(m_last[:-1])).any()
    )
    # Without overlaps, runs sorted by first mouse bin are already sorted pairs; with them,
    # runs in file order are sorted stably so that a mouse bin's pairs keep file order.
    sel = live if overlap else by_mouse
    n, m_first, h_first, h_step, hcode = (x[sel] for x in (n, m_first, h_first, h_step, hcode))
    total = int(n.sum())
    mouse_bin = _runs(m_first, np.ones(len(n), np.int64), n, total)
    human_bin = _runs(h_first, h_step, n, total)
    human_chrom = np.repeat(hcode.astype(np.int32), n)
    if overlap:
        srt = np.argsort(mouse_bin, kind="stable")
        return mouse_bin[srt], human_chrom[srt], human_bin[srt]
    return mouse_bin, human_chrom, human_bin


def _runs(first: np.ndarray, step: np.ndarray, n: np.ndarray, total: int) -> np.ndarray:
    """int64 [total]: the runs ``first[k] + step[k] * j`` for ``j < n[k]`` (all ``n > 0``),
    concatenated, written by cumulative sums of per-element increments (no per-run loop)."""
    out = np.zeros(total, dtype=np.int64)
    if total == 0:
        return out
    starts = np.cumsum(n) - n
    out[starts] = np.diff(step, prepend=0)
    np.cumsum(out, out=out)  # out[i] = step of i's run
    prev_last = first[:-1] + step[:-1] * (n[:-1] - 1)
    out[starts] = np.concatenate((first[:1], first[1:] - prev_last))
    np.cumsum(out, out=out)
    return out


def _orientation(orientation: str) -> bool:
    """True when the target is human."""
    if orientation not in ("target_human", "target_mouse"):
        raise ConfigError(
            f"chain orientation {orientation!r} is unknown; expected 'target_human' (e.g. "
            "hg38ToMm10) or 'target_mouse' (e.g. mm10ToHg38)."
        )
    return orientation == "target_human"


# ------------------------------------------------------------------------------------ liftOver
def liftover_points(
    chains: Chains, chrom: str | Sequence[str] | np.ndarray, pos: int | Sequence[int] | np.ndarray
) -> pd.DataFrame:
    """Map single target bases to the query, as UCSC ``liftOver`` does for 1 bp BED regions.

    A base maps when exactly one ungapped block (of any chain) covers it: to
    ``q_start + (pos - t_start)`` on a ``+`` query strand, or to the forward base
    ``q_size - 1 - (q_start + pos - t_start)`` on a ``-`` strand. A base in a gap or outside every
    chain is unmapped (liftOver's "Deleted in new"); a base covered by blocks of two or more
    chains is unmapped too (liftOver's "Duplicated in new"; liftOver reports all of them only
    with ``-multiple``). Vectorised: one ``searchsorted`` over the elementary segments of all
    blocks, built once per :class:`Chains`.

    Parameters
    ----------
    chains
        From :func:`read_chain`.
    chrom
        Target chromosome name(s); a single name applies to every position.
    pos
        int [N]: 0-based target positions (bases).

    Returns
    -------
    pandas.DataFrame
        N rows in input order: ``chrom`` (query chromosome; missing when unmapped),
        ``pos`` (int64 forward query position, -1 when unmapped), ``strand`` (``"+"``, ``"-"``
        relative to the target, ``""`` when unmapped), ``n_hits`` (int64: blocks covering the
        base; ``1`` means mapped), ``chain_id`` (int64, -1 when unmapped).
    """
    pos = np.atleast_1d(np.asarray(pos, dtype=np.int64))
    n = len(pos)
    if isinstance(chrom, str):
        chrom_arr = np.full(n, chrom, dtype=object)
    else:
        chrom_arr = np.asarray(chrom, dtype=object)
    if len(chrom_arr) != n:
        raise InputDataError(
            f"liftover_points: {len(chrom_arr)} chromosomes for {n} positions; expected one "
            "chromosome or one per position."
        )
    keys, counts, idsums, offsets = chains._point_index
    code = pd.Index(chains.t_names).get_indexer(chrom_arr).astype(np.int64)  # -1: unknown
    known = code >= 0
    size = np.where(known, chains.t_sizes[np.maximum(code, 0)], 0)
    valid = known & (pos >= 0) & (pos < size)
    lin = np.where(valid, offsets[np.maximum(code, 0)] + pos, -1)
    seg = np.searchsorted(keys, lin, side="right") - 1
    inside = valid & (seg >= 0)
    n_hits = np.where(inside, counts[np.maximum(seg, 0)], 0)
    mapped = n_hits == 1
    block = np.where(mapped, idsums[np.maximum(seg, 0)] - 1, 0)
    strand_pos = chains.block_q_start[block] + (pos - chains.block_t_start[block])
    minus = chains.block_q_strand[block] < 0
    qsize = chains.q_sizes[chains.block_q_chrom[block]]
    qpos = np.where(minus, qsize - 1 - strand_pos, strand_pos)
    names = np.asarray(chains.q_names + (None,), dtype=object)
    qcode = np.where(mapped, chains.block_q_chrom[block], len(chains.q_names))
    return pd.DataFrame(
        {
            "chrom": names[qcode],
            "pos": np.where(mapped, qpos, -1),
            "strand": np.where(mapped, np.where(minus, "-", "+"), ""),
            "n_hits": n_hits.astype(np.int64),
            "chain_id": np.where(mapped, chains.chain_id[chains.block_chain[block]], -1),
        }
    )
