"""The Parquet tile store of binned tracks.

Layout (see ``docs/DESIGN.md``)::

    STORE/store.json
    STORE/manifest.tsv
    STORE/tracks/assembly=A/chrom=C/experiment=E/part.parquet
    STORE/synteny/NAME/alignment/chrom=C.parquet
    STORE/synteny/NAME/tracks/chrom=C/experiment=E/part.parquet

A *part* holds one experiment on one chromosome: rows are blocks of ``block_bins`` contiguous
bins (the last one shorter), columns ``start_bin`` (int64) and ``values`` (large_binary: the raw
little-endian bytes of the block's values in the store dtype). Row groups hold
``ROW_GROUP_BLOCKS`` blocks, so a bin range reads only its row groups, and reading a subset of
experiments never touches the others' files. The Parquet key-value metadata ``epiray`` holds
the part's provenance and statistics, so the summary can be rebuilt from the parts alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from epiray import __version__
from epiray.errors import InputDataError, StoreError
from epiray.genome import Assembly, n_bins

FORMAT_VERSION = 1
DEFAULT_BLOCK_BINS = 16_384
ROW_GROUP_BLOCKS = 64
SUMMARY = "store.json"
MANIFEST = "manifest.tsv"
DTYPES = ("float16", "float32")
META_KEY = b"epiray"

Dtype = Literal["float16", "float32"]
#: manifest fields recorded per experiment in ``store.json`` (with ``checksum`` and ``chroms``)
RECORD_FIELDS = (
    "species",
    "assembly",
    "biosample",
    "assay",
    "category",
    "donor",
    "fold",
    "transform",
    "path",
)


# --------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write that becomes ``path`` only when the block completes: written to
    a temporary file next to it, fsynced, then renamed over it (removed if the block fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def file_checksum(path: str | Path, chunk: int = 1 << 22) -> str:
    """``"sha256:<hex>"`` of a file's bytes, streamed in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return f"sha256:{h.hexdigest()}"


def _is_temporary(path: Path) -> bool:
    """A hidden temporary file of :func:`atomic_open` / :func:`write_part` (a write that never
    completed)."""
    return path.name.startswith(".") and ".tmp-" in path.name


def has_no_finished_part(root: str | Path) -> bool:
    """Whether ``root`` is a store that never finished anything, safe to replace.

    True when ``root`` holds a ``store.json`` that lists no experiment and no synteny, and
    nothing else but ``manifest.tsv``, hidden temporary files and ``tracks/`` / ``synteny/``
    folders without a finished file: what a first ingest stopped before its first part (a
    corrupt or mismatched input found while planning, an interrupted run) leaves. Anything
    else (a part, a file epiray did not write, an unreadable ``store.json``) makes it False.
    """
    root = Path(root)
    try:
        summary = json.loads((root / SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("experiments") or summary.get("synteny"):
        return False
    for entry in root.iterdir():
        if entry.name in (SUMMARY, MANIFEST) and entry.is_file() and not entry.is_symlink():
            continue
        if _is_temporary(entry) and entry.is_file():
            continue
        if entry.name in ("tracks", "synteny") and entry.is_dir() and not entry.is_symlink():
            for p in entry.rglob("*"):
                if p.is_symlink() or (not p.is_dir() and not _is_temporary(p)):
                    return False
            continue
        return False
    return True


# --------------------------------------------------------------------------------------- parts
def write_part(
    path: Path,
    values: np.ndarray,
    *,
    dtype: Dtype,
    block_bins: int,
    meta: dict[str, Any],
) -> None:
    """Write one part (one experiment on one chromosome) atomically.

    Parameters
    ----------
    path
        Destination ``.../part.parquet``; written as a hidden temporary file, then renamed, so a
        crash never leaves a partial part visible.
    values
        float [n] values of every bin of the chromosome (or alignment row) in order.
    dtype
        Store dtype; values are cast to it.
    block_bins
        Bins per block (row).
    meta
        JSON-serialisable provenance and statistics, saved in the Parquet metadata.
    """
    vals = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    n = len(vals)
    starts = np.arange(0, max(n, 1), block_bins, dtype=np.int64) if n else np.zeros(0, np.int64)
    itemsize = vals.dtype.itemsize
    offsets = np.minimum(np.append(starts, n), n).astype(np.int64) * itemsize
    data = pa.py_buffer(vals.view(np.uint8))
    blocks = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(starts), [None, pa.py_buffer(offsets), data]
    )
    meta = {**meta, "n_bins": n, "dtype": dtype, "block_bins": block_bins}
    schema = pa.schema(
        [("start_bin", pa.int64()), ("values", pa.large_binary())],
        metadata={META_KEY: json.dumps(meta).encode()},
    )
    table = pa.Table.from_arrays([pa.array(starts), blocks], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(
            table,
            tmp,
            row_group_size=ROW_GROUP_BLOCKS,
            compression="none",
            use_dictionary=False,
            write_statistics=["start_bin"],
            data_page_size=1 << 20,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_part_meta(path: Path) -> dict[str, Any] | None:
    """The ``epiray`` metadata of a part, or ``None`` if the part does not exist."""
    if not path.is_file():
        return None
    md = pq.read_schema(path).metadata or {}
    if META_KEY not in md:
        raise StoreError(f"part {path}: no epiray metadata; not a store part. Re-ingest it.")
    return json.loads(md[META_KEY])


def read_part(
    path: Path, start: int, end: int, *, dtype: str, block_bins: int, out: np.ndarray
) -> None:
    """Read bins ``[start, end)`` of one part into ``out`` (float array [end - start]).

    Only the row groups covering the range are read. Values are converted to ``out.dtype``.
    """
    rg_bins = block_bins * ROW_GROUP_BLOCKS
    first, last = start // rg_bins, (end - 1) // rg_bins
    try:
        f = pq.ParquetFile(path, memory_map=True)
        n_rg = f.metadata.num_row_groups
        if last >= n_rg:
            raise StoreError(
                f"part {path}: holds fewer bins than expected; expected bins [{start}, {end}), "
                f"the part has {n_rg} row groups of {rg_bins} bins. The part is damaged: delete "
                "it and re-ingest with --resume."
            )
        if first == 0 and last == n_rg - 1:
            col = f.read(columns=["values"], use_threads=False).column(0)
        else:
            col = f.read_row_groups(
                list(range(first, last + 1)), columns=["values"], use_threads=False
            ).column(0)
    except (pa.ArrowException, OSError) as e:
        raise StoreError(
            f"part {path}: cannot be read ({e}). The part is damaged: delete it and re-ingest "
            "with --resume."
        ) from None
    src_dtype = np.dtype(dtype).newbyteorder("<")
    lo = start - first * rg_bins  # bins to skip in what was read
    pos = 0  # bins consumed of what was read
    o = 0  # bins written
    want = end - start
    for chunk in col.chunks:
        if len(chunk) == 0:
            continue
        offs = np.frombuffer(chunk.buffers()[1], np.int64, len(chunk) + 1, chunk.offset * 8)
        nbytes = int(offs[-1] - offs[0])
        arr = np.frombuffer(
            chunk.buffers()[2], src_dtype, nbytes // src_dtype.itemsize, int(offs[0])
        )
        a = max(lo - pos, 0)
        b = min(len(arr), lo + want - pos)
        if b > a:
            out[o : o + b - a] = arr[a:b]
            o += b - a
        pos += len(arr)
        if o >= want:
            break
    if o != want:
        raise StoreError(
            f"part {path}: holds fewer bins than expected; expected bins [{start}, {end}), got "
            f"{o} of them. The part is damaged: re-ingest with --resume after deleting it."
        )


# --------------------------------------------------------------------------------------- store
class Store:
    """A handle on a store directory.

    Use :meth:`create` for a new store and :meth:`open` for an existing one. The summary
    (``store.json``) is loaded once; :meth:`save_summary` writes it atomically.
    """

    def __init__(self, root: Path, summary: dict[str, Any]):
        self.root = Path(root)
        self.summary = summary

    # ---- life cycle
    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        bin_size: int = 25,
        dtype: Dtype = "float32",
        block_bins: int = DEFAULT_BLOCK_BINS,
        overwrite: bool = False,
    ) -> Store:
        """Create an empty store at ``root``.

        A store that never finished a part (:func:`has_no_finished_part`, e.g. what a first
        ingest stopped by a corrupt input leaves) is not an existing store: it is replaced
        without ``overwrite``.

        Raises
        ------
        StoreError
            ``root`` exists, is not empty and is not such an unfinished store, and
            ``overwrite`` is false.
        """
        root = Path(root)
        if dtype not in DTYPES:
            raise StoreError(f"store {root}: unknown dtype {dtype!r}; expected one of {DTYPES}.")
        if root.exists() and any(root.iterdir()):
            if not overwrite and not has_no_finished_part(root):
                if not (root / SUMMARY).is_file():
                    raise StoreError(
                        f"store {root}: the folder exists, is not empty and is not an epiray "
                        f"store (no {SUMMARY}). Choose a new or empty folder for the store, or "
                        "pass --overwrite to delete its contents and build the store there."
                    )
                raise StoreError(
                    f"store {root}: already exists. Pass --overwrite to rebuild it from scratch "
                    "or --resume to reuse it (finished parts are kept, new experiments added)."
                )
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        summary = {
            "format_version": FORMAT_VERSION,
            "epiray_version": __version__,
            "bin_size": int(bin_size),
            "dtype": dtype,
            "block_bins": int(block_bins),
            "assemblies": {},
            "experiments": {},
            "manifest_hash": None,
            "synteny": {},
        }
        store = cls(root, summary)
        store.save_summary()
        return store

    @classmethod
    def open(cls, root: str | Path) -> Store:
        """Open an existing store.

        Raises
        ------
        StoreError
            No ``store.json`` under ``root``, or a format this version cannot read.
        """
        root = Path(root)
        p = root / SUMMARY
        if not p.is_file():
            raise StoreError(
                f"store {root}: not an epiray store (no {SUMMARY}). Create it with "
                "`epiray ingest`."
            )
        summary = json.loads(p.read_text())
        if summary.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"store {root}: format version {summary.get('format_version')}; expected "
                f"{FORMAT_VERSION}. Re-ingest with this version of epiray."
            )
        return cls(root, summary)

    def save_summary(self) -> None:
        """Write ``store.json`` atomically."""
        self.summary["epiray_version"] = __version__
        atomic_write_text(self.root / SUMMARY, json.dumps(self.summary, indent=1, sort_keys=True))

    # ---- properties
    @property
    def bin_size(self) -> int:
        return int(self.summary["bin_size"])

    @property
    def dtype(self) -> Dtype:
        return self.summary["dtype"]

    @property
    def block_bins(self) -> int:
        return int(self.summary["block_bins"])

    @property
    def store_hash(self) -> str:
        """Hash of the store's content: bin size, dtype, assemblies, experiments and sources."""
        s = self.summary
        canon = {
            "bin_size": s["bin_size"],
            "dtype": s["dtype"],
            "assemblies": s["assemblies"],
            "experiments": {
                e: {k: v.get(k) for k in ("assembly", "biosample", "assay", "checksum")}
                for e, v in s["experiments"].items()
            },
        }
        return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:16]

    # ---- assemblies
    def assembly(self, name: str) -> Assembly:
        """The :class:`~epiray.genome.Assembly` ``name`` as recorded in the store."""
        try:
            a = self.summary["assemblies"][name]
        except KeyError:
            raise StoreError(
                f"store {self.root}: assembly {name!r} not in the store; it has "
                f"{sorted(self.summary['assemblies'])}. Ingest experiments of that assembly."
            ) from None
        return Assembly(name, a["species"], a["chrom_sizes"])

    def add_assembly(self, assembly: Assembly, chroms: Sequence[str]) -> None:
        """Record ``assembly`` (sizes of ``chroms``); refuses a conflicting redefinition."""
        assemblies = self.summary["assemblies"]
        new = {c: int(assembly.chrom_sizes[c]) for c in chroms}
        if assembly.name in assemblies:
            old = assemblies[assembly.name]
            clash = {
                c: (old["chrom_sizes"][c], n)
                for c, n in new.items()
                if c in old["chrom_sizes"] and old["chrom_sizes"][c] != n
            }
            if old["species"] != assembly.species or clash:
                raise StoreError(
                    f"store {self.root}: assembly {assembly.name!r} conflicts with the store's "
                    f"record (species {old['species']!r} vs {assembly.species!r}; chromosome "
                    f"length clashes {clash}). Use another store or fix the chrom sizes."
                )
            old["chrom_sizes"].update(new)
        else:
            assemblies[assembly.name] = {"species": assembly.species, "chrom_sizes": new}

    def chrom_sizes(self, assembly: str) -> dict[str, int]:
        """Chromosome -> length in bases of the chromosomes stored for ``assembly``."""
        return dict(self.assembly(assembly).chrom_sizes)

    def n_bins(self, assembly: str, chrom: str) -> int:
        """Number of bins of ``chrom`` in ``assembly``."""
        return n_bins(self.assembly(assembly).length(chrom), self.bin_size)

    # ---- experiments
    def experiments(self, assembly: str | None = None, species: str | None = None) -> pd.DataFrame:
        """One row per stored experiment (columns of the manifest plus ``checksum``, ``mean``,
        ``sd``, ``chroms``), optionally filtered by assembly or species."""
        rows = []
        for e, v in self.summary["experiments"].items():
            chroms = v.get("chroms", {})
            n = sum(c["n"] for c in chroms.values())
            s = sum(c["sum"] for c in chroms.values())
            ss = sum(c["sumsq"] for c in chroms.values())
            mean = s / n if n else float("nan")
            sd = float(np.sqrt(max(ss / n - mean * mean, 0.0))) if n else float("nan")
            rows.append(
                {
                    "experiment": e,
                    **{k: v.get(k) for k in (*RECORD_FIELDS, "checksum")},
                    "n_chroms": len(chroms),
                    "n_bins": n,
                    "mean": mean,
                    "sd": sd,
                }
            )
        df = pd.DataFrame(
            rows,
            columns=[
                "experiment",
                "species",
                "assembly",
                "biosample",
                "assay",
                "category",
                "donor",
                "fold",
                "transform",
                "path",
                "checksum",
                "n_chroms",
                "n_bins",
                "mean",
                "sd",
            ],
        )
        if assembly is not None:
            df = df[df["assembly"] == assembly]
        if species is not None:
            df = df[df["species"] == species]
        return df.sort_values("experiment").reset_index(drop=True)

    def part_path(self, assembly: str, chrom: str, experiment: str) -> Path:
        """Path of the part of ``experiment`` on ``chrom``."""
        return (
            self.root
            / "tracks"
            / f"assembly={assembly}"
            / f"chrom={chrom}"
            / f"experiment={experiment}"
            / "part.parquet"
        )

    def synteny_part_path(self, name: str, chrom: str, experiment: str) -> Path:
        """Path of the part of human ``experiment`` on mouse ``chrom`` for synteny ``name``."""
        return (
            self.root
            / "synteny"
            / name
            / "tracks"
            / f"chrom={chrom}"
            / f"experiment={experiment}"
            / "part.parquet"
        )

    # ---- reading
    def read(
        self,
        assembly: str,
        chrom: str,
        experiments: Sequence[str],
        start: int = 0,
        end: int | None = None,
        *,
        dtype: np.dtype | type | str = np.float32,
        out: np.ndarray | None = None,
        threads: int = 4,
    ) -> np.ndarray:
        """Dense values of ``experiments`` over bins ``[start, end)`` of ``chrom``.

        Parameters
        ----------
        assembly, chrom
            Where to read.
        experiments
            Experiment ids, in the row order wanted.
        start, end
            Bin range (0-based half-open); ``end=None`` means the chromosome end.
        dtype
            dtype of the result (float32 default; ``"float16"`` keeps the store's bytes).
        out
            Optional preallocated [len(experiments), end - start] array to fill.
        threads
            Parts read concurrently (pyarrow releases the GIL).

        Returns
        -------
        numpy.ndarray
            [len(experiments), end - start], C-contiguous, on the arcsinh scale.

        Raises
        ------
        StoreError
            An experiment or its part for ``chrom`` is not in the store, or a bad range.
        """
        paths = [self._checked_part(assembly, chrom, e) for e in experiments]
        nb = self.n_bins(assembly, chrom)
        end = nb if end is None else int(end)
        return self._read_parts(paths, start, end, nb, dtype, out, threads, f"{assembly} {chrom}")

    def read_torch(self, *args, device=None, **kwargs):
        """:meth:`read` as a ``torch.Tensor`` sharing the numpy buffer (no extra copy on CPU);
        moved to ``device`` when given."""
        import torch

        t = torch.from_numpy(self.read(*args, **kwargs))
        return t.to(device) if device is not None else t

    def _checked_part(self, assembly: str, chrom: str, experiment: str) -> Path:
        info = self.summary["experiments"].get(experiment)
        if info is None:
            raise StoreError(
                f"store {self.root}: experiment {experiment!r} not in the store. Ingest it or "
                "remove it from the request."
            )
        if info["assembly"] != assembly:
            raise StoreError(
                f"store {self.root}: experiment {experiment!r} is on assembly "
                f"{info['assembly']!r}, not {assembly!r}."
            )
        if chrom not in info.get("chroms", {}):
            raise StoreError(
                f"store {self.root}: experiment {experiment!r} has no data for chrom {chrom!r} "
                f"(stored: {sorted(info.get('chroms', {}))}). Ingest that chromosome."
            )
        return self.part_path(assembly, chrom, experiment)

    def _read_parts(self, paths, start, end, nb, dtype, out, threads, where) -> np.ndarray:
        if not 0 <= start < end <= nb:
            raise StoreError(
                f"store {self.root} {where}: bad bin range [{start}, {end}); expected "
                f"0 <= start < end <= {nb}."
            )
        shape = (len(paths), end - start)
        if out is None:
            out = np.empty(shape, dtype=np.dtype(dtype))
        elif out.shape != shape:
            raise StoreError(f"store {self.root}: out has shape {out.shape}; expected {shape}.")

        def one(i: int) -> None:
            read_part(
                paths[i], start, end, dtype=self.dtype, block_bins=self.block_bins, out=out[i]
            )

        if threads > 1 and len(paths) > 1:
            with ThreadPoolExecutor(min(threads, len(paths))) as ex:
                list(ex.map(one, range(len(paths))))
        else:
            for i in range(len(paths)):
                one(i)
        return out

    # ---- synteny (human tracks on mouse coordinates)
    def alignment_path(self, name: str, chrom: str) -> Path:
        """Path of the alignment table of mouse ``chrom`` for synteny ``name``."""
        return self.root / "synteny" / name / "alignment" / f"chrom={chrom}.parquet"

    def read_alignment(self, name: str, chrom: str) -> pd.DataFrame:
        """The alignment table of mouse ``chrom``: columns ``mouse_bin`` (int64),
        ``human_chrom`` (str), ``human_bin`` (int64), sorted by ``mouse_bin``; row ``i`` is the
        bin axis of :meth:`read_aligned`."""
        p = self.alignment_path(name, chrom)
        if name not in self.summary.get("synteny", {}) or not p.is_file():
            raise StoreError(
                f"store {self.root}: no synteny {name!r} for chrom {chrom!r}. Run "
                "`epiray synteny` first."
            )
        return pq.read_table(p).to_pandas()

    def read_aligned(
        self,
        name: str,
        chrom: str,
        experiments: Sequence[str],
        start: int = 0,
        end: int | None = None,
        *,
        dtype: np.dtype | type | str = np.float32,
        out: np.ndarray | None = None,
        threads: int = 4,
    ) -> np.ndarray:
        """Human experiments' values at the alignment rows ``[start, end)`` of mouse ``chrom``.

        Returns
        -------
        numpy.ndarray
            [len(experiments), end - start]; column ``j`` is alignment row ``start + j``.
        """
        info = self.summary.get("synteny", {}).get(name)
        if info is None or chrom not in info.get("chroms", {}):
            raise StoreError(
                f"store {self.root}: no synteny {name!r} for chrom {chrom!r}. Run "
                "`epiray synteny` first."
            )
        rows = int(info["chroms"][chrom]["n_alignments"])
        end = rows if end is None else int(end)
        paths = []
        for e in experiments:
            p = self.synteny_part_path(name, chrom, e)
            if not p.is_file():
                raise StoreError(
                    f"store {self.root}: human experiment {e!r} not materialised on chrom "
                    f"{chrom!r} for synteny {name!r}. Re-run `epiray synteny --resume`."
                )
            paths.append(p)
        if rows == 0:
            return np.zeros((len(paths), 0), dtype=np.dtype(dtype))
        return self._read_parts(
            paths, start, end, rows, dtype, out, threads, f"synteny {name} {chrom}"
        )

    def copy(self, dest: str | Path, *, without: Sequence[str] = ()) -> Store:
        """A copy of this store at ``dest`` without the experiments ``without`` (their parts,
        synteny parts included, and their entries): e.g. the store a parent model is trained
        on before ``epiray extend`` adds what was left out. Written beside ``dest`` and
        renamed into place, so an interrupted copy leaves no store behind.

        Raises
        ------
        StoreError
            When ``dest`` exists or ``without`` names an experiment the store does not hold.
        """
        dest = Path(dest)
        if dest.exists():
            raise StoreError(
                f"store {self.root}: cannot copy to {dest}, which exists; choose a new folder "
                "or remove it first"
            )
        drop = set(without)
        unknown = sorted(drop - set(self.summary["experiments"]))
        if unknown:
            raise StoreError(
                f"store {self.root}: no experiment(s) {', '.join(unknown)} to leave out of the "
                "copy; name experiments of `epiray info` (the store's experiment table)"
            )
        skip = {f"experiment={e}" for e in drop}
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(
                self.root, tmp, ignore=lambda _d, names: [n for n in names if n in skip]
            )
            summary = json.loads((tmp / SUMMARY).read_text())
            for e in drop:
                del summary["experiments"][e]
                for syn in summary.get("synteny", {}).values():
                    syn.get("experiments", {}).pop(e, None)
            atomic_write_text(tmp / SUMMARY, json.dumps(summary, indent=1, sort_keys=True))
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return Store.open(dest)

    def describe(self, experiments: bool = False) -> str:
        """A readable summary of a store: assemblies, experiments per species/category, synteny."""
        import pandas as pd

        s = self.summary
        lines = [
            f"store {self.root}",
            f"  bin_size {s['bin_size']} bp, dtype {s['dtype']}, block {s['block_bins']} bins, "
            f"store hash {self.store_hash}, manifest hash {s['manifest_hash']}, "
            f"epiray {s['epiray_version']}",
        ]
        exps = self.experiments()
        for name, a in s["assemblies"].items():
            sizes = a["chrom_sizes"]
            nb = sum(self.n_bins(name, c) for c in sizes)
            n_e = int((exps["assembly"] == name).sum())
            lines.append(
                f"  assembly {name} ({a['species']}): {len(sizes)} chroms, {nb:,} bins, "
                f"{n_e} experiments"
            )
        if len(exps):
            tab = pd.crosstab(exps["assay"], exps["species"])
            lines.append("  experiments per assay and species:")
            lines += ["    " + x for x in tab.to_string().splitlines()]
            cat = exps.groupby(["species", "category"]).size().rename("n").reset_index()
            lines.append(
                "  per category: "
                + ", ".join(f"{r.species}/{r.category} {r.n}" for r in cat.itertuples())
            )
            err = [
                st.get("cast_max_abs_err", 0.0)
                for v in s["experiments"].values()
                for st in v["chroms"].values()
            ]
            lines.append(
                f"  max |error| added by the {s['dtype']} cast: {max(err):.3g} (arcsinh scale)"
            )
        for name, syn in s.get("synteny", {}).items():
            lines.append(
                f"  synteny {name}: "
                + ", ".join(f"{k} {v}" for k, v in syn.items() if not isinstance(v, dict))
            )
            for chrom, c in syn.get("chroms", {}).items():
                lines.append(
                    f"    {chrom}: "
                    + ", ".join(
                        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in c.items()
                        if not isinstance(v, dict)
                    )
                )
        if experiments and len(exps):
            cols = [
                "experiment",
                "species",
                "assembly",
                "biosample",
                "assay",
                "category",
                "n_chroms",
                "mean",
                "sd",
            ]
            lines.append(exps[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        return "\n".join(lines)

    # ---- Ray Data view
    def dataset(
        self,
        assembly: str,
        chroms: Sequence[str] | None = None,
        experiments: Sequence[str] | None = None,
    ):
        """A Ray Dataset over the blocks of ``assembly``.

        Rows: ``assembly``, ``chrom``, ``experiment`` (from the hive-partitioned paths),
        ``start_bin`` (int64) and ``values`` (bytes; decode with :func:`decode_block` and the
        store dtype). Only the selected parts are read.
        """
        import ray.data
        from ray.data.datasource.partitioning import Partitioning

        exps = self.experiments(assembly=assembly)
        if experiments is not None:
            exps = exps[exps["experiment"].isin(list(experiments))]
        paths = []
        for e in exps["experiment"]:
            cs = self.summary["experiments"][e]["chroms"]
            for c in chroms if chroms is not None else sorted(cs):
                if c in cs:
                    paths.append(str(self.part_path(assembly, c, e)))
        if not paths:
            raise StoreError(f"store {self.root}: nothing stored for {assembly} {chroms}.")
        part = Partitioning(
            "hive",
            base_dir=str(self.root / "tracks"),
            field_names=None,
        )
        return ray.data.read_parquet(paths, partitioning=part)


def decode_block(values: bytes, dtype: str) -> np.ndarray:
    """The values of one block (a ``values`` cell) as a float array."""
    return np.frombuffer(values, dtype=np.dtype(dtype).newbyteorder("<"))


def validate_experiment_id(experiment: str) -> str | None:
    """A problem description when ``experiment`` cannot name store paths, else ``None``."""
    ok = experiment and all(c.isalnum() or c in "._-+" for c in experiment)
    if not ok or experiment.startswith("."):
        return (
            f"experiment id {experiment!r} has characters that cannot name files; use letters, "
            "digits and . _ - + only"
        )
    return None


__all__ = [
    "Store",
    "InputDataError",
    "atomic_write_bytes",
    "atomic_write_text",
    "decode_block",
    "file_checksum",
    "read_part_meta",
    "write_part",
]
