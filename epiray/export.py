"""Export trained runs into files that need no epiray to read: ``epiray export``.

A trained run (one model per chromosome, see :mod:`epiray.train`) becomes a folder of plain
formats:

- **genome factors** (Avocado) of every scale, full chromosome, stitched from the workers'
  shards: one Parquet file per (chromosome, scale) with coordinates (``chrom``, ``start``,
  ``end``, ``f0`` … ``f{K-1}``, float32), and one bigWig per (scale, factor) holding that factor
  on every exported chromosome at the scale's resolution;
- **biosample and assay factors** (Avocado) or **global embeddings** (eDICE) as TSV, one row
  per vocabulary entry with its name and species;
- **network weights** as ``.npz`` (numpy's zip of ``.npy`` arrays) keyed by the PyTorch
  parameter names;
- ``export.json`` (machine-readable: every file, shape, scale, the model parameters) and a
  ``README.md`` that says how to read each file with pyarrow / pyBigWig / numpy.

Layout of ``<out>``::

    README.md, export.json
    genome/<chrom>.scale<S>bp.parquet          S = bins per row x bin size: 25, 250, 5000
    genome/bigwig/scale<S>bp/factor<k>.bw      factor k of that scale, every exported chrom
    models/<chrom>/model.json                  the run: model, params, vocabulary, shards
    models/<chrom>/biosample_factors.tsv       Avocado (eDICE: biosample_embeddings.tsv)
    models/<chrom>/assay_factors.tsv           Avocado (eDICE: assay_embeddings.tsv)
    models/<chrom>/weights.npz                 every tensor but the genome factors

Coordinates are 0-based, half-open, in bases. Row ``r`` of a scale with ``k`` bins per row
covers bins ``[r*k, (r+1)*k)`` of the chromosome, i.e. bases ``[r*k*bin, (r+1)*k*bin)``; the
last row ends at the chromosome's end (and, for a run trained on part of a chromosome, rows are
clipped to the bins it was trained on). Each chromosome is its own model: factor ``k`` of chr1
and factor ``k`` of chr2 are unrelated.

The export is written into a hidden sibling folder and renamed into place at the end, so a
failure leaves nothing behind; an existing destination is replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from epiray import __version__
from epiray.errors import ConfigError, EpirayError, StoreError

__all__ = ["EXPORT_FORMAT", "FORMATS", "ExportResult", "RunSource", "export", "resolve_runs"]

log = logging.getLogger(__name__)

#: Version of the folder layout written here (``export.json`` ``format``).
EXPORT_FORMAT = "epiray-export/1"
#: What ``formats`` can name.
FORMATS = ("parquet", "bigwig", "tsv", "weights")
GENOME_FORMATS = ("parquet", "bigwig")
META = "meta.json"  # as epiray.train writes it into every checkpoint directory
#: Rows per Parquet row group (and per write).
ROW_GROUP = 1 << 20


# --------------------------------------------------------------------------- the runs
@dataclass
class RunSource:
    """One chromosome's trained run: where it is and what its checkpoint says."""

    chrom: str
    run_dir: Path
    checkpoint: Path
    meta: dict[str, Any]

    @property
    def shards(self) -> list[tuple[int, int]]:
        return [(int(lo), int(hi)) for lo, hi in self.meta["shards"]]


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _discover(pattern: str) -> dict[str, Path]:
    """Chromosome -> run folder of every folder matching a ``{chrom}`` pattern."""
    import glob

    pre, post = pattern.rstrip("/").split("{chrom}", 1)
    if "{chrom}" in post:
        raise ConfigError(
            f"export --run {pattern!r}: more than one {{chrom}} placeholder; expected one, "
            "e.g. runs/avocado_mouse_only.{chrom}.fold0."
        )
    rx = re.compile(re.escape(pre) + r"([^/]+)" + re.escape(post) + "$")
    found = {}
    for p in glob.glob(glob.escape(pre) + "*" + glob.escape(post)):
        m = rx.match(p)
        if m and Path(p).is_dir():
            found[m.group(1)] = Path(p)
    return found


def _checkpoint_of(run_dir: Path, chrom: str | None) -> tuple[Path | None, str | None]:
    """The final checkpoint of a run folder (or the folder itself when it is a checkpoint), or
    why there is none."""
    where = f"run {run_dir}" + (f" (chromosome {chrom})" if chrom else "")
    if not run_dir.is_dir():
        return None, (
            f"{where}: run folder does not exist; expected a run of `epiray train` "
            "(named {label}.{chrom}.{fold} under the train config's out). Train that "
            "chromosome first, or fix --run / --chroms."
        )
    if (run_dir / META).is_file():  # a checkpoint directory given directly
        return run_dir, None
    finals = sorted(run_dir.glob("epoch*_final"))
    if finals:
        ckpt = finals[-1]
        if not (ckpt / META).is_file():
            return None, (
                f"{where}: checkpoint {ckpt.name} has no {META}; expected a complete checkpoint "
                "of `epiray train`. Train the run again (or restore the checkpoint)."
            )
        return ckpt, None
    partial = sorted(p.name for p in run_dir.glob("epoch*") if p.is_dir())
    if partial:
        return None, (
            f"{where}: no final checkpoint (latest: {partial[-1]}); its training did not "
            "finish. Resume it by running `epiray train` again with the same config, then export."
        )
    return None, (
        f"{where}: no checkpoint; expected an epoch*_final folder written by `epiray train`. "
        "The run must finish training (or be resumed with the same config) before it can be "
        "exported."
    )


def resolve_runs(run: str | Path, chroms: Sequence[str] | None = None) -> list[RunSource]:
    """The runs to export, every problem reported in one error before anything is written.

    Parameters
    ----------
    run
        A run folder pattern with a ``{chrom}`` placeholder (as ``epiray impute``'s ``model``,
        e.g. ``out/avocado_mouse_only.{chrom}.fold0``), one run folder, or one checkpoint folder
        (``.../epoch0010_final``).
    chroms
        Chromosomes to export (default: every run matching the pattern; the run's own for a
        single folder).

    Raises
    ------
    EpirayError
        A run folder is missing, has no final checkpoint, or holds another chromosome.
    """
    run = str(run)
    problems: list[str] = []
    sources: list[RunSource] = []
    if "{chrom}" in run:
        if chroms:
            dirs = {c: Path(run.replace("{chrom}", c)) for c in chroms}
        else:
            dirs = _discover(run)
            if not dirs:
                raise EpirayError(
                    f"export --run {run}: no run folder matches the pattern; expected folders "
                    f"such as {run.replace('{chrom}', 'chr1')} written by `epiray train`. Fix "
                    "the pattern (runs are named {label}.{chrom}.{fold} under the config's out)."
                )
        items = sorted(dirs.items(), key=lambda kv: _natural_key(kv[0]))
    else:
        items = [(None, Path(run))]
    for chrom, run_dir in items:
        ckpt, problem = _checkpoint_of(run_dir, chrom)
        if problem:
            problems.append(problem)
            continue
        try:
            meta = json.loads((ckpt / META).read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"checkpoint {ckpt}: cannot read {META} ({exc}); train it again.")
            continue
        got = meta.get("chrom")
        if chrom is not None and got != chrom:
            problems.append(
                f"run {run_dir}: holds chromosome {got!r}, not {chrom!r}; expected the pattern "
                "to name each chromosome's own run. Fix --run."
            )
            continue
        if chrom is None and chroms and list(chroms) != [got]:
            other = sorted(set(chroms) - {got})
            problems.append(
                f"run {run_dir}: chromosome(s) {other} not in the run; it holds {got!r} only "
                "(a model per chromosome). Pass --chroms "
                f"{got}, or a pattern with {{chrom}} (e.g. "
                f"{str(run_dir).replace(f'.{got}.', '.{chrom}.')}) for several chromosomes."
            )
            continue
        missing = [
            f"rank{r}.pt"
            for r in range(len(meta.get("shards", [])))
            if not (ckpt / f"rank{r}.pt").is_file()
        ]
        if not meta.get("shards") or missing:
            problems.append(
                f"checkpoint {ckpt} (chromosome {got}): incomplete, missing "
                f"{missing or ['its shard list']}; expected one rank file per worker shard. "
                "Resume or retrain the run."
            )
            continue
        sources.append(RunSource(got, run_dir, ckpt, meta))
    if len(problems) == 1:
        raise EpirayError(f"export: {problems[0]}")
    if problems:
        lines = [f"export --run {run}: {len(problems)} problems"]
        lines += [f"  - {p}" for p in problems]
        raise EpirayError("\n".join(lines))
    seen: dict[str, Path] = {}
    for s in sources:
        if s.chrom in seen:
            raise EpirayError(
                f"export: runs {seen[s.chrom]} and {s.run_dir} both hold chromosome {s.chrom}; "
                "expected one run per chromosome. Fix --run or --chroms."
            )
        seen[s.chrom] = s.run_dir
    kinds = {(s.meta.get("model"), s.meta.get("assembly")) for s in sources}
    if len(kinds) > 1:
        raise EpirayError(
            f"export: the runs mix models/assemblies {sorted(map(str, kinds))}; expected one "
            "model on one assembly per export. Export them separately."
        )
    return sources


# --------------------------------------------------------------------------- what a model holds
@dataclass(frozen=True)
class Scale:
    """One genome-factor scale of an Avocado model."""

    index: int  # position in the state dict's genome.{index}
    bins_per_row: int
    n_factors: int
    bin_size: int

    @property
    def bp(self) -> int:
        return self.bins_per_row * self.bin_size

    @property
    def name(self) -> str:
        return f"scale{self.bp}bp"


def _params(meta: dict[str, Any]):
    from epiray.models import get_model

    klass = get_model(meta["model"])
    return klass.Params.model_validate(meta.get("params") or {})


def _scales(model: str, params: Any, bin_size: int) -> list[Scale]:
    """Genome scales of a model: Avocado's scales with factors; none for other models."""
    if model != "avocado":
        return []
    active = [(k, d) for k, d in zip(params.scale_bins, params.n_genome_factors) if int(d) > 0]
    return [Scale(j, int(k), int(d), int(bin_size)) for j, (k, d) in enumerate(active)]


def _entity_tables(model: str, state: dict[str, Any]) -> tuple[str, np.ndarray, np.ndarray] | None:
    """``(kind, biosample rows, assay rows)`` in vocabulary order, or None."""
    if model == "avocado":

        def chunks(prefix: str) -> np.ndarray:
            keys = sorted(
                (k for k in state if k.startswith(prefix + ".")),
                key=lambda k: int(k.rsplit(".", 1)[1]),
            )
            return np.concatenate([_np(state[k]) for k in keys])

        return "factors", chunks("biosample_factors"), chunks("assay_factors")
    if model == "edice":

        def emb(axis: str) -> np.ndarray:
            base = f"net.{axis}_embedder."
            parts = [_np(state[base + "global_embedding"])]
            if base + "new_embedding" in state:
                parts.append(_np(state[base + "new_embedding"]))
            return np.concatenate(parts)

        return "embeddings", emb("biosample"), emb("assay")
    return None


def _np(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _is_shard_local(name: str) -> bool:
    """Worker-local tensors: genome factors (exported as Parquet/bigWig) and concat's
    other-species tables."""
    return name.startswith(("genome.", "aux_genome.", "aux_group_"))


# --------------------------------------------------------------------------- writing
@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    out: Path
    model: str
    label: str
    chroms: list[str]
    formats: list[str]
    files: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.files:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        lines = [
            f"exported {self.label} ({self.model}), chromosomes {', '.join(self.chroms)} "
            f"to {self.out}: {len(self.files)} files",
            *(f"  {k}: {n}" for k, n in kinds.items()),
            *(f"  note: {n}" for n in self.notes),
            f"  how to read them: {self.out / 'README.md'}",
        ]
        return "\n".join(lines)


def _parse_formats(formats: Iterable[str] | str | None) -> list[str]:
    if formats is None:
        return list(FORMATS)
    if isinstance(formats, str):
        formats = formats.split(",")
    got = [f.strip().lower() for f in formats if f.strip()]
    bad = sorted(set(got) - set(FORMATS))
    if bad or not got:
        raise ConfigError(
            f"export --formats: unknown format(s) {bad or ['(none)']}; expected a comma-separated "
            f"subset of {','.join(FORMATS)}."
        )
    return [f for f in FORMATS if f in got]


def _load_shard(path: Path, model: str) -> dict[str, Any]:
    """The state dict of one rank file (memory-mapped: only the tensors read are loaded)."""

    from epiray.loop import read_checkpoint

    payload = read_checkpoint(path, fix="Resume or retrain the run.", mmap=True)
    if payload.get("model") != model:
        raise EpirayError(
            f"checkpoint {path}: model {payload.get('model')!r}; expected {model!r} as its "
            f"{META} says. The checkpoint folder is inconsistent: retrain the run."
        )
    return payload


def _stitch(
    src: RunSource, shards: list[dict[str, Any]], scale: Scale
) -> tuple[np.ndarray, int, int]:
    """Rows of one scale over the bins the run covers: ``(factors [R, K], first row, lo bin)``.

    A worker ``[lo, hi)`` holds rows ``lo//k .. (hi-1)//k``; a row straddling two workers
    (possible only when ``k`` does not divide the 200-bin shard alignment) is taken from the
    worker that owns its first bin.
    """
    from epiray.models.avocado import _scale_rows

    k = scale.bins_per_row
    bounds = src.shards
    lo0, hi_end = bounds[0][0], bounds[-1][1]
    first = lo0 // k
    out = np.empty((_scale_rows(lo0, hi_end, k), scale.n_factors), np.float32)
    for (lo, hi), payload in zip(bounds, shards):
        key = f"genome.{scale.index}.weight"
        tab = payload["state_dict"].get(key)
        want = (_scale_rows(lo, hi, k), scale.n_factors)
        if tab is None or tuple(tab.shape) != want:
            got = None if tab is None else tuple(tab.shape)
            raise EpirayError(
                f"checkpoint {src.checkpoint} (chromosome {src.chrom}) bins [{lo}, {hi}): "
                f"{key} has shape {got}; expected {want} ({scale.name}). The checkpoint does "
                "not match its meta.json: retrain the run."
            )
        skip = 1 if (lo % k and lo != lo0) else 0
        g = lo // k + skip - first
        out[g : g + want[0] - skip] = _np(tab)[skip:]
    return out, first, lo0


def _row_coords(
    first: int, n: int, k: int, lo0: int, hi_end: int, bin_size: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(first, first + n, dtype=np.int64)
    start = np.maximum(rows * k, lo0) * bin_size
    end = np.minimum(np.minimum((rows + 1) * k, hi_end) * bin_size, length)
    return start, end


def _write_parquet(
    path: Path,
    chrom: str,
    start: np.ndarray,
    end: np.ndarray,
    values: np.ndarray,
    metadata: dict[str, Any],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    k = values.shape[1]
    schema = pa.schema(
        [("chrom", pa.string()), ("start", pa.int64()), ("end", pa.int64())]
        + [(f"f{j}", pa.float32()) for j in range(k)],
        metadata={"epiray.export": json.dumps(metadata)},
    )
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for s in range(0, max(len(start), 1), ROW_GROUP):
            e = min(s + ROW_GROUP, len(start))
            cols = [pa.repeat(chrom, e - s), pa.array(start[s:e]), pa.array(end[s:e])]
            cols += [pa.array(np.ascontiguousarray(values[s:e, j])) for j in range(k)]
            w.write_table(pa.Table.from_arrays(cols, schema=schema))


def _add_bigwig_entries(
    bw: Any, chrom: str, start: np.ndarray, end: np.ndarray, vals: np.ndarray, span: int
) -> None:
    """Rows as bigWig entries: fixed-step for the full-width rows, explicit for clipped ones."""
    n = len(vals)
    if n == 0:
        return
    vals = np.ascontiguousarray(vals, dtype=np.float64)
    full = (end - start) == span  # rows are consecutive: only the first and last may be clipped
    a, b = 0, n
    if not full[0]:
        bw.addEntries([chrom], [int(start[0])], ends=[int(end[0])], values=[float(vals[0])])
        a = 1
    if n > a and not full[n - 1]:
        b = n - 1
    if b > a:
        bw.addEntries(chrom, int(start[a]), values=vals[a:b], span=span, step=span)
    if b < n and b >= a:
        bw.addEntries([chrom], [int(start[b])], ends=[int(end[b])], values=[float(vals[b])])


def _safe_dest(out: Path, sources: list[RunSource], overwrite: bool) -> None:
    out_r = out.resolve()
    for s in sources:
        for p in (s.run_dir.resolve(), s.checkpoint.resolve()):
            if out_r == p or out_r in p.parents or p in out_r.parents:
                raise ConfigError(
                    f"export --out {out}: overlaps the run folder {s.run_dir}; expected a "
                    "separate destination. Choose another --out."
                )
    if out.exists() and not overwrite:
        raise ConfigError(
            f"export --out {out}: already exists; expected a new folder. Pass --overwrite to "
            "replace it, or choose another --out."
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export --out {out}: exists and is not a folder; choose another --out.")


def _species_of(vocab, axis: str) -> list[str]:
    n = len(vocab.biosamples if axis == "biosample" else vocab.assays)
    sp: list[set[str]] = [set() for _ in range(n)]
    for key in vocab.experiments.values():
        sp[key.biosample if axis == "biosample" else key.assay].add(key.species)
    return [",".join(sorted(s)) for s in sp]


def _write_tsv(path: Path, names: Sequence[str], species: list[str], rows: np.ndarray) -> None:
    lines = ["\t".join(["index", "name", "species"] + [f"f{j}" for j in range(rows.shape[1])])]
    for i, (name, s) in enumerate(zip(names, species)):
        vals = "\t".join(f"{float(v):.9g}" for v in rows[i])
        lines.append(f"{i}\t{name}\t{s}\t{vals}")
    path.write_text("\n".join(lines) + "\n")


def export(
    run: str | Path,
    out: str | Path,
    *,
    chroms: Sequence[str] | None = None,
    formats: Iterable[str] | str | None = None,
    overwrite: bool = False,
    store: str | Path | None = None,
) -> ExportResult:
    """Export trained runs (see the module docstring for the layout).

    Parameters
    ----------
    run
        Run folder pattern with ``{chrom}``, a run folder or a checkpoint folder
        (:func:`resolve_runs`).
    out
        Destination folder (must not exist unless ``overwrite``).
    chroms
        Chromosomes to export (default: every matching run).
    formats
        Any of ``parquet``, ``bigwig`` (genome factors, Avocado), ``tsv`` (biosample/assay
        factors or embeddings), ``weights`` (``.npz``); default all. Genome formats are skipped
        for models without genome factors (eDICE) unless named explicitly, which is an error.
    overwrite
        Replace an existing ``out`` (only once the new export is complete).
    store
        Store to read chromosome lengths and the bin size from (default: the run's own).

    Returns
    -------
    ExportResult

    Raises
    ------
    EpirayError
        Missing runs or checkpoints, a chromosome not in the run, a destination that exists;
        nothing is written then, and a failure while writing removes what was written.
    """
    explicit = formats is not None
    fmts = _parse_formats(formats)
    out = Path(out)
    sources = resolve_runs(run, chroms)
    meta0 = sources[0].meta
    model = meta0["model"]
    label = meta0.get("label") or model
    assembly = meta0.get("assembly")
    params = {s.chrom: _params(s.meta) for s in sources}
    notes: list[str] = []

    # genome factors: only models that have them; one scale layout across chromosomes
    genome_fmts = [f for f in fmts if f in GENOME_FORMATS]
    has_genome = model == "avocado"
    if genome_fmts and not has_genome:
        if explicit:
            raise ConfigError(
                f"export --formats {','.join(genome_fmts)}: model {model!r} has no genome "
                "factors (only Avocado does; eDICE imputes from the observed tracks at each "
                "bin). Export --formats tsv,weights."
            )
        notes.append(f"{model} has no genome factors: no Parquet/bigWig genome files")
        fmts = [f for f in fmts if f not in GENOME_FORMATS]
        genome_fmts = []
    if model not in ("avocado", "edice") and "tsv" in fmts:
        if explicit:
            raise ConfigError(
                f"export --formats tsv: model {model!r} has no biosample/assay factors or "
                "embeddings to export. Export --formats weights."
            )
        notes.append(f"{model} has no biosample/assay factors: no TSV files")
        fmts = [f for f in fmts if f != "tsv"]
    if has_genome:
        layouts = {(tuple(p.scale_bins), tuple(p.n_genome_factors)) for p in params.values()}
        if len(layouts) > 1:
            raise EpirayError(
                f"export: the runs' genome scales differ {sorted(layouts)}; expected one "
                "scale_bins / n_genome_factors for every chromosome (bigWigs hold a factor on "
                "every chromosome). Export them separately."
            )
    sizes: dict[str, int] = {}
    bin_size = None
    if genome_fmts:
        from epiray.store import Store

        root = store or meta0.get("store")
        try:
            st = Store.open(root)
            sizes_all = st.chrom_sizes(assembly)
        except StoreError as exc:
            raise StoreError(
                f"export: {exc} The genome export reads chromosome lengths and the bin size "
                "from the store the run was trained on; pass --store, or export --formats "
                "tsv,weights."
            ) from None
        bin_size = st.bin_size
        problems = []
        for s in sources:
            if s.chrom not in sizes_all:
                problems.append(f"chromosome {s.chrom} of run {s.run_dir} not in store {root}")
            elif st.n_bins(assembly, s.chrom) != int(s.meta["n_bins"]):
                problems.append(
                    f"run {s.run_dir}: chromosome {s.chrom} has {s.meta['n_bins']} bins; the "
                    f"store {root} has {st.n_bins(assembly, s.chrom)}"
                )
        if problems:
            raise StoreError(
                "export: the store does not match the runs: " + "; ".join(problems) + ". Pass "
                "--store with the store they were trained on."
            )
        order = {c: i for i, c in enumerate(sizes_all)}
        sources.sort(key=lambda s: order[s.chrom])
        sizes = {s.chrom: int(sizes_all[s.chrom]) for s in sources}
    scales = _scales(model, params[sources[0].chrom], bin_size) if genome_fmts else []
    _safe_dest(out, sources, overwrite)

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    result = ExportResult(out, model, label, [s.chrom for s in sources], fmts, notes=notes)
    created = next((a for a in reversed(out.parents) if not a.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    writers: dict[tuple[str, int], Any] = {}
    try:
        if "bigwig" in fmts:
            import pyBigWig

            header = list(sizes.items())
            for sc in scales:
                d = tmp / "genome" / "bigwig" / sc.name
                d.mkdir(parents=True)
                for j in range(sc.n_factors):
                    bw = pyBigWig.open(str(d / f"factor{j}.bw"), "w")
                    writers[(sc.name, j)] = bw
                    bw.addHeader(header, maxZooms=10)
        for src in sources:
            log.info("export: %s from %s", src.chrom, src.checkpoint)
            _export_chrom(src, tmp, fmts, scales, sizes, params[src.chrom], writers, result)
        for bw in writers.values():
            bw.close()
        writers.clear()
        for sc in scales if "bigwig" in fmts else []:
            for j in range(sc.n_factors):
                result.files.append(
                    {
                        "path": f"genome/bigwig/{sc.name}/factor{j}.bw",
                        "kind": "genome_bigwig",
                        "scale": sc.name,
                        "factor": j,
                        "chroms": list(sizes),
                    }
                )
        _write_docs(tmp, result, sources, scales, sizes, bin_size, params, assembly)
        _publish(tmp, out, overwrite)
    except BaseException:
        for bw in writers.values():
            try:
                bw.close()
            except Exception:  # pragma: no cover - best effort on the way out
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:  # parent folders made for this export, if still empty
            for d in [out.parent, *out.parent.parents]:
                try:
                    d.rmdir()
                except OSError:
                    break
                if d == created:
                    break
        raise
    return result


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished export into place (replacing ``out`` only now, if allowed)."""
    if out.exists():
        if not overwrite:  # appeared while we were writing
            raise ConfigError(
                f"export --out {out}: appeared while exporting; pass --overwrite or choose "
                "another --out."
            )
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _export_chrom(
    src: RunSource,
    tmp: Path,
    fmts: list[str],
    scales: list[Scale],
    sizes: dict[str, int],
    params: Any,
    writers: dict[tuple[str, int], Any],
    result: ExportResult,
) -> None:
    from epiray.models import Vocabulary

    model = src.meta["model"]
    shards = [_load_shard(src.checkpoint / f"rank{r}.pt", model) for r in range(len(src.shards))]
    for (lo, hi), payload in zip(src.shards, shards):
        slab = payload.get("slab") or {}
        if slab.get("lo") is not None and (slab["lo"], slab["hi"]) != (lo, hi):
            raise EpirayError(
                f"checkpoint {src.checkpoint} (chromosome {src.chrom}): a rank file covers bins "
                f"[{slab['lo']}, {slab['hi']}); expected [{lo}, {hi}) as {META} says. Retrain "
                "the run."
            )
    vocab = Vocabulary.from_dict(shards[0].get("vocab") or src.meta["vocab"])
    state0 = shards[0]["state_dict"]
    mdir = tmp / "models" / src.chrom
    mdir.mkdir(parents=True)
    rel = f"models/{src.chrom}"

    # the run itself
    info = {
        "model": model,
        "label": src.meta.get("label"),
        "params": params.model_dump(mode="json"),
        "chrom": src.chrom,
        "assembly": src.meta.get("assembly"),
        "n_bins": src.meta.get("n_bins"),
        "fold": src.meta.get("fold"),
        "epoch": src.meta.get("epoch"),
        "best_epoch": src.meta.get("best_epoch"),
        "final": src.meta.get("final"),
        "shards": src.meta.get("shards"),
        "train": src.meta.get("train"),
        "validate": src.meta.get("validate"),
        "evaluate": src.meta.get("evaluate"),
        "aux_name": src.meta.get("aux_name"),
        "source_run": str(src.run_dir),
        "source_checkpoint": str(src.checkpoint),
        "vocab": {
            "biosamples": list(vocab.biosamples),
            "assays": list(vocab.assays),
            "experiments": {
                e: {
                    "biosample": vocab.biosamples[k.biosample],
                    "assay": vocab.assays[k.assay],
                    "species": k.species,
                }
                for e, k in vocab.experiments.items()
            },
        },
    }
    (mdir / "model.json").write_text(json.dumps(info, indent=1))
    result.files.append({"path": f"{rel}/model.json", "kind": "model_json", "chrom": src.chrom})

    if "tsv" in fmts:
        kind, bio, assay = _entity_tables(model, state0)
        for axis, rows, names in (
            ("biosample", bio, vocab.biosamples),
            ("assay", assay, vocab.assays),
        ):
            if rows.shape[0] != len(names):
                raise EpirayError(
                    f"checkpoint {src.checkpoint} (chromosome {src.chrom}): {rows.shape[0]} "
                    f"{axis} rows; expected {len(names)} (the vocabulary). Retrain the run."
                )
            name = f"{axis}_{kind}.tsv"
            _write_tsv(mdir / name, names, _species_of(vocab, axis), rows)
            result.files.append(
                {
                    "path": f"{rel}/{name}",
                    "kind": f"{axis}_{kind}",
                    "chrom": src.chrom,
                    "shape": list(rows.shape),
                }
            )

    if "weights" in fmts:
        arrays = {k: _np(v) for k, v in state0.items() if not _is_shard_local(k)}
        local = {
            f"shard{r}/{k}": _np(v)
            for r, p in enumerate(shards)
            for k, v in p["state_dict"].items()
            if _is_shard_local(k) and not k.startswith("genome.")
        }
        np.savez(mdir / "weights.npz", **arrays, **local)
        result.files.append(
            {
                "path": f"{rel}/weights.npz",
                "kind": "weights",
                "chrom": src.chrom,
                "arrays": {k: list(v.shape) for k, v in {**arrays, **local}.items()},
            }
        )

    if scales and ("parquet" in fmts or "bigwig" in fmts):
        length = sizes[src.chrom]
        lo0, hi_end = src.shards[0][0], src.shards[-1][1]
        bs = scales[0].bin_size
        for sc in scales:
            vals, first, _ = _stitch(src, shards, sc)
            start, end = _row_coords(first, len(vals), sc.bins_per_row, lo0, hi_end, bs, length)
            if "parquet" in fmts:
                (tmp / "genome").mkdir(exist_ok=True)
                name = f"genome/{src.chrom}.{sc.name}.parquet"
                meta = {
                    "chrom": src.chrom,
                    "scale": sc.name,
                    "bins_per_row": sc.bins_per_row,
                    "bin_size": bs,
                    "bp_per_row": sc.bp,
                    "first_row": first,
                    "model": model,
                    "label": src.meta.get("label"),
                    "checkpoint": str(src.checkpoint),
                }
                _write_parquet(tmp / name, src.chrom, start, end, vals, meta)
                result.files.append(
                    {
                        "path": name,
                        "kind": "genome_parquet",
                        "chrom": src.chrom,
                        "scale": sc.name,
                        "shape": list(vals.shape),
                        "first_row": first,
                    }
                )
            if "bigwig" in fmts:
                for j in range(sc.n_factors):
                    _add_bigwig_entries(
                        writers[(sc.name, j)], src.chrom, start, end, vals[:, j], sc.bp
                    )
    del shards


# --------------------------------------------------------------------------- documentation
def _write_docs(
    tmp: Path,
    result: ExportResult,
    sources: list[RunSource],
    scales: list[Scale],
    sizes: dict[str, int],
    bin_size: int | None,
    params: dict[str, Any],
    assembly: str | None,
) -> None:
    model = result.model
    p0 = params[sources[0].chrom]
    doc = {
        "format": EXPORT_FORMAT,
        "epiray_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "label": result.label,
        "variant": getattr(p0, "variant", None),
        "params": {s.chrom: params[s.chrom].model_dump(mode="json") for s in sources},
        "assembly": assembly,
        "bin_size": bin_size,
        "chrom_sizes": sizes or None,
        "formats": result.formats,
        "chroms": {
            s.chrom: {
                "run": str(s.run_dir),
                "checkpoint": str(s.checkpoint),
                "fold": s.meta.get("fold"),
                "epoch": s.meta.get("epoch"),
                "final": s.meta.get("final"),
                "n_bins": s.meta.get("n_bins"),
                "shards": s.meta.get("shards"),
            }
            for s in sources
        },
        "genome_scales": [
            {
                "name": sc.name,
                "bins_per_row": sc.bins_per_row,
                "bp_per_row": sc.bp,
                "n_factors": sc.n_factors,
                "state_dict_key": f"genome.{sc.index}.weight",
            }
            for sc in scales
        ],
        "coordinates": "0-based half-open bases; row r of a scale with k bins per row covers "
        "bins [r*k, (r+1)*k), clipped to the chromosome end and to the bins the run covers",
        "values": "float32 latent factors (unitless); the model's output is on the arcsinh "
        "scale of the signal",
        "notes": result.notes,
        "files": result.files,
    }
    (tmp / "export.json").write_text(json.dumps(doc, indent=1))
    (tmp / "README.md").write_text(_readme(result, sources, scales, bin_size, p0))


def _readme(
    result: ExportResult, sources: list[RunSource], scales: list[Scale], bin_size, p0
) -> str:
    model, chroms = result.model, result.chroms
    c0 = chroms[0]
    kind = "factors" if model == "avocado" else "embeddings"
    L = [
        "# epiray export",
        "",
        f"Model `{result.label}` ({model}"
        + (f", variant `{p0.variant}`" if hasattr(p0, "variant") else "")
        + f"), chromosomes {', '.join(chroms)}; exported by epiray {__version__}. "
        "Everything here reads back without epiray: Parquet and TSV with pyarrow, bigWig with "
        "pyBigWig, `.npz` with numpy. `export.json` lists every file with its shape, the "
        "genome scales and each run's parameters and source checkpoint.",
        "",
        "Each chromosome is its own model (trained separately): factor *k* of one chromosome "
        "and factor *k* of another are unrelated, and so are their biosample/assay "
        f"{kind} and networks.",
        "",
        "## Files",
        "",
        "| path | what |",
        "|---|---|",
    ]
    if "parquet" in result.formats and scales:
        L.append(
            "| `genome/<chrom>.scale<S>bp.parquet` | genome factors of one scale: columns "
            "`chrom`, `start`, `end` (int64, bases) and `f0`…`f{K-1}` (float32), one row per "
            "row of the scale |"
        )
    if "bigwig" in result.formats and scales:
        L.append(
            "| `genome/bigwig/scale<S>bp/factor<k>.bw` | factor *k* of that scale on every "
            "exported chromosome, one value per row of the scale (span *S* bp) |"
        )
    L.append("| `models/<chrom>/model.json` | the run: parameters, vocabulary, shards, source |")
    if "tsv" in result.formats:
        L.append(
            f"| `models/<chrom>/biosample_{kind}.tsv`, `assay_{kind}.tsv` | one row per "
            "vocabulary entry: `index`, `name`, `species` (comma-separated species of its "
            f"experiments), `f0`… ({kind}) |"
        )
    if "weights" in result.formats:
        L.append(
            "| `models/<chrom>/weights.npz` | every tensor of the model but the genome "
            "factors, keyed by its PyTorch name (`np.load`) |"
        )
    if scales:
        L += [
            "",
            "## Genome factors",
            "",
            "| scale | bins per row | bp per row | factors |",
            "|---|---|---|---|",
            *(f"| `{s.name}` | {s.bins_per_row} | {s.bp} | {s.n_factors} |" for s in scales),
            "",
            f"Coordinates are 0-based, half-open, in bases (bin size {bin_size} bp). Row *r* of "
            "a scale with *k* bins per row covers bins `[r*k, (r+1)*k)`, i.e. bases "
            f"`[r*k*{bin_size}, (r+1)*k*{bin_size})`; the last row ends at the chromosome end. "
            "A position's factors at every scale are the rows whose `[start, end)` contain it. "
            "Values are unitless float32 latent coordinates; the bigWigs hold the same float32 "
            "values as the Parquet files.",
        ]
    elif model == "edice":
        L += [
            "",
            "eDICE has no genome factors (it imputes from the observed tracks at each bin), "
            "so there are no genome files.",
        ]
    L += ["", "## Reading", "", "```python", "import numpy as np"]
    if scales and "parquet" in result.formats:
        s = scales[-1].name
        L += [
            "import pyarrow.parquet as pq",
            f't = pq.read_table("genome/{c0}.{s}.parquet")          # or .to_pandas()',
            'start, f0 = t["start"].to_numpy(), t["f0"].to_numpy()',
        ]
    if scales and "bigwig" in result.formats:
        s = scales[0].name
        L += [
            "import pyBigWig",
            f'bw = pyBigWig.open("genome/bigwig/{s}/factor0.bw")',
            f'v = bw.values("{c0}", 0, 1000)                            # per base',
            f'iv = bw.intervals("{c0}")                                 # (start, end, value)',
        ]
    if "tsv" in result.formats:
        L += [
            "import pyarrow.csv as pc",
            f'b = pc.read_csv("models/{c0}/biosample_{kind}.tsv",',
            '                parse_options=pc.ParseOptions(delimiter="\\t"))',
            'names = b["name"].to_pylist()',
            'B = np.stack([b[f"f{j}"].to_numpy() for j in range(b.num_columns - 3)], 1)',
        ]
    if "weights" in result.formats:
        L += [
            f'w = np.load("models/{c0}/weights.npz")',
            "print(w.files)                                        # tensor names",
        ]
    L += ["```"]
    if model == "avocado" and "weights" in result.formats:
        n_layers = p0.n_layers
        L += [
            "",
            "## The network (Avocado)",
            "",
            "The value of track (biosample *b*, assay *a*) at 25 bp bin *i* (arcsinh scale) is",
            "",
            "```",
            "x = concat(B[b], A[a], G_s[i // k_s] for each scale s, finest first)",
            *(
                f"h = relu(w['hidden.{j}.weight'] @ {'x' if j == 0 else 'h'} + "
                f"w['hidden.{j}.bias'])"
                for j in range(n_layers)
            ),
            "y = w['out.weight'] @ h + w['out.bias']",
            "```",
            "",
            "with `B` / `A` the biosample / assay factors (the TSVs, or "
            "`biosample_factors.<c>` / `assay_factors.<c>` in `weights.npz` concatenated over "
            "`c`, in vocabulary order) and `G_s` a scale's factors (the Parquet rows; row "
            "`i // k_s` of a chromosome is its Parquet row `i // k_s - first_row`, "
            "`first_row` being 0 for a run over the whole chromosome).",
        ]
        if p0.variant != "mouse_only":
            L += [
                "",
                f"Variant `{p0.variant}`: the biosample and assay axes are the union of both "
                "species' (the TSVs' `species` column says whose experiments each row has); "
                "genome factors are the target species' bins only.",
            ]
        if p0.variant == "concat":
            L[-1] += (
                " `weights.npz` also holds each worker's other-species position factors "
                "(`shard<r>/aux_genome.<s>.weight`, with the coarse rows of each position in "
                "`shard<r>/aux_group_250` and `shard<r>/aux_group_5k`)."
            )
    elif model == "edice" and "weights" in result.formats:
        L += [
            "",
            "## The network (eDICE)",
            "",
            "`net.biosample_embedder.*` / `net.assay_embedder.*`: signal embedder "
            "(`signal.weight` [dim, other axis], `signal.bias`) and global embeddings "
            "(`global_embedding`, then `new_embedding` rows added by transfer; the TSVs hold "
            "both, in vocabulary order); `net.biosample_attention.*` / `net.assay_attention.*`: "
            "one self-attention block each (`query`, `key`, `value`, `out`, `ffn`); `net.mlp.*`: "
            "the output MLP on [biosample ; assay] contextual embeddings. The method is "
            "described in the eDICE paper and `epiray/models/edice.py`.",
        ]
    if result.notes:
        L += ["", "## Notes", "", *(f"- {n}" for n in result.notes)]
    return "\n".join(L) + "\n"
