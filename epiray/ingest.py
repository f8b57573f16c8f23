"""Ingest: manifest of tracks -> the Parquet store, by a Ray Data pipeline.

The work is split per (experiment, chromosome); each task reads one chromosome of one track
(bigWig or pre-binned array), bins it (mean per 25 bp bin, uncovered bases = 0), applies the
arcsinh transform unless the experiment is declared already transformed, and writes one part
atomically. Everything that can be checked without reading values is checked on the driver
first, and every problem is reported at once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from epiray import bigwig
from epiray.config import Section
from epiray.errors import EpirayWarning, InputDataError, StoreError, collect
from epiray.genome import Assembly, n_bins, read_chrom_sizes, ucsc_to_ensembl
from epiray.manifest import manifest_hash, read_manifest, write_manifest
from epiray.store import (
    DEFAULT_BLOCK_BINS,
    MANIFEST,
    RECORD_FIELDS,
    Store,
    file_checksum,
    read_part_meta,
    validate_experiment_id,
    write_part,
)

log = logging.getLogger(__name__)

ChromSelection = Literal["all", "primary", "autosomes+X"] | list[str]


class AssemblySpec(Section):
    """How to read one assembly's tracks."""

    species: str | None = None
    chrom_sizes: str | dict[str, int] | None = None
    chroms: ChromSelection | None = None
    chrom_names: Literal["ucsc", "ensembl"] = "ucsc"


class Policies(Section):
    """What to do with values that are not valid signal. Every non-error policy is warned and
    counted in the store summary."""

    negative: Literal["error", "clip", "keep"] = "error"
    nonfinite: Literal["error", "zero"] = "error"
    missing_chroms: Literal["error", "zeros"] = "error"


class IngestConfig(Section):
    """The ``ingest`` job: manifest -> store."""

    manifest: str
    store: str
    assemblies: dict[str, AssemblySpec] = {}
    chroms: ChromSelection = "primary"
    bin_size: int = 25
    dtype: Literal["float16", "float32"] = "float32"
    block_bins: int = DEFAULT_BLOCK_BINS
    policies: Policies = Policies()
    num_cpus: int | None = None


@dataclass(frozen=True)
class _Item:
    experiment: str
    assembly: str
    chrom: str
    file_chrom: str
    length: int
    path: str
    transform: str
    checksum: str
    part: str


# ------------------------------------------------------------------------------------- reading
def read_track(
    path: str,
    chrom: str,
    length: int,
    bin_size: int,
    *,
    file_chrom: str | None = None,
    experiment: str | None = None,
    n_chroms: int = 1,
) -> np.ndarray:
    """Binned values (before transform) of one chromosome of a bigWig or pre-binned array.

    Pre-binned files: ``.npy`` holds one array (only for a single-chromosome selection);
    ``.npz`` holds one array per chromosome named by the chromosome, or a single array
    (``arr_0``) when the assembly has one chromosome.

    Returns
    -------
    numpy.ndarray
        float64 [ceil(length / bin_size)].
    """
    where = f"experiment {experiment} ({path}) chrom {chrom}"
    expected = n_bins(length, bin_size)
    if path.endswith((".npy", ".npz")):
        try:
            obj = np.load(path, mmap_mode="r" if path.endswith(".npy") else None)
        except (ValueError, OSError, EOFError) as e:
            raise InputDataError(f"{where}: cannot read the array file ({e}).") from None
        if isinstance(obj, np.lib.npyio.NpzFile):
            with obj:
                keys = list(obj.keys())
                key = (file_chrom or chrom) if (file_chrom or chrom) in keys else None
                if key is None and len(keys) == 1 and n_chroms == 1:
                    key = keys[0]
                if key is None:
                    raise InputDataError(
                        f"{where}: no array named {chrom!r} in the .npz (it has {keys}); "
                        "expected one array per chromosome named by chromosome."
                    )
                arr = np.asarray(obj[key])
        else:
            if n_chroms != 1:
                raise InputDataError(
                    f"{where}: a .npy holds one chromosome but {n_chroms} are selected; use "
                    "an .npz with one array per chromosome."
                )
            arr = np.asarray(obj)
        if arr.ndim != 1 or len(arr) != expected:
            raise InputDataError(
                f"{where}: pre-binned array has the wrong length; expected {expected} bins "
                f"(ceil({length} / {bin_size})), got shape {arr.shape}. Check the assembly's "
                "chromosome size and the bin size."
            )
        return arr.astype(np.float64)
    return bigwig.read_binned(
        path, chrom, length, bin_size, file_chrom=file_chrom, experiment=experiment
    )


def _process(
    item: _Item,
    bin_size: int,
    dtype: str,
    block_bins: int,
    policies: Policies,
    n_chroms: int,
    zeros: bool,
) -> dict[str, Any]:
    """One task: read, check, transform, write one part. Returns stats or a problem."""
    where = f"experiment {item.experiment} ({item.path}) chrom {item.chrom}"
    try:
        if zeros:
            x = np.zeros(n_bins(item.length, bin_size))
        else:
            x = read_track(
                item.path,
                item.chrom,
                item.length,
                bin_size,
                file_chrom=item.file_chrom,
                experiment=item.experiment,
                n_chroms=n_chroms,
            )
        counts = {"n_nonfinite": 0, "n_negative": 0}
        bad = ~np.isfinite(x)
        if bad.any():
            counts["n_nonfinite"] = int(bad.sum())
            if policies.nonfinite == "error":
                first = int(np.argmax(bad))
                raise InputDataError(
                    f"{where}: {counts['n_nonfinite']} NaN/inf values (first at bin {first}, "
                    f"start {first * bin_size}); expected finite signal. Fix the file or set "
                    "policies.nonfinite: zero."
                )
            x[bad] = 0.0
        neg = x < 0
        if neg.any():
            counts["n_negative"] = int(neg.sum())
            if policies.negative == "error":
                first = int(np.argmax(neg))
                raise InputDataError(
                    f"{where}: {counts['n_negative']} negative values (first at bin {first}, "
                    f"value {x[first]:.4g}); expected signal >= 0. Set policies.negative: clip "
                    "(to 0) or keep (for signed signal)."
                )
            if policies.negative == "clip":
                x[neg] = 0.0
        if item.transform == "arcsinh":
            x = np.arcsinh(x)
        stored = x.astype(dtype)
        back = stored.astype(np.float64)
        err = np.abs(back - x)
        stats = {
            "n": len(x),
            "sum": float(back.sum()),
            "sumsq": float(np.dot(back, back)),
            "min": float(back.min()) if len(x) else 0.0,
            "max": float(back.max()) if len(x) else 0.0,
            "n_nonzero": int(np.count_nonzero(back)),
            "cast_max_abs_err": float(err.max()) if len(x) else 0.0,
            "cast_rmse": float(np.sqrt(np.mean(err * err))) if len(x) else 0.0,
            "filled_zeros": bool(zeros),
            **counts,
        }
        meta = {
            "experiment": item.experiment,
            "assembly": item.assembly,
            "chrom": item.chrom,
            "source": item.path,
            "checksum": item.checksum,
            "transform": item.transform,
            "stats": stats,
        }
        write_part(Path(item.part), stored, dtype=dtype, block_bins=block_bins, meta=meta)
        return {
            "experiment": item.experiment,
            "chrom": item.chrom,
            "stats": stats,
            "problem": None,
        }
    except InputDataError as e:
        return {
            "experiment": item.experiment,
            "chrom": item.chrom,
            "stats": None,
            "problem": str(e),
        }


# ------------------------------------------------------------------------------------- planning
def resolve_assemblies(
    cfg: IngestConfig, manifest: pd.DataFrame, manifest_path: Path, problems: list[str]
) -> dict[str, tuple[Assembly, list[str]]]:
    """Assembly and chromosome selection of every assembly named in the manifest."""
    out: dict[str, tuple[Assembly, list[str]]] = {}
    for name, species in manifest.groupby("assembly")["species"].first().items():
        spec = cfg.assemblies.get(name, AssemblySpec())
        if spec.species is not None and spec.species != species:
            problems.append(
                f"assembly {name}: the config says species {spec.species!r} but the manifest "
                f"says {species!r}; make them agree"
            )
            continue
        sizes = spec.chrom_sizes
        if sizes is None:
            guess = manifest_path.parent / "genomes" / f"{name}.chrom.sizes"
            if not guess.is_file():
                problems.append(
                    f"assembly {name}: no chromosome sizes; expected assemblies.{name}."
                    f"chrom_sizes in the config (a .chrom.sizes path or a mapping) or {guess}"
                )
                continue
            sizes = str(guess)
        try:
            sizes = read_chrom_sizes(sizes) if isinstance(sizes, str) else dict(sizes)
            asm = Assembly(name, species, sizes)
            selection = spec.chroms if spec.chroms is not None else cfg.chroms
            chroms = asm.select(selection)
            if not chroms and selection == "primary":
                chroms = asm.select("all")
        except InputDataError as e:
            problems.append(str(e))
            continue
        out[name] = (asm, chroms)
    return out


def _checksums(paths: Sequence[str], cached: dict[str, dict[str, Any]]) -> dict[str, str]:
    """sha256 of each file, reusing the store's record when size and mtime are unchanged."""

    def one(p: str) -> tuple[str, str]:
        st = os.stat(p)
        c = cached.get(p)
        if c and c.get("size") == st.st_size and c.get("mtime_ns") == st.st_mtime_ns:
            return p, c["checksum"]
        return p, file_checksum(p)

    with ThreadPoolExecutor(4) as ex:
        return dict(ex.map(one, paths))


def plan(
    cfg: IngestConfig, *, overwrite: bool = False, resume: bool = False
) -> tuple[Store, pd.DataFrame, list[_Item], list[_Item], dict]:
    """Validate everything that can be checked on the driver and list the parts to write.

    Returns
    -------
    (store, manifest, todo, zero_filled, assemblies)
    """
    manifest_path = Path(cfg.manifest)
    df = read_manifest(manifest_path)
    problems: list[str] = [p for p in map(validate_experiment_id, df["experiment"]) if p]
    assemblies = resolve_assemblies(cfg, df, manifest_path, problems)
    collect(problems, f"ingest {manifest_path}")

    store_root = Path(cfg.store)
    if (store_root / "store.json").is_file() and resume and not overwrite:
        store = Store.open(store_root)
        mismatch = {
            k: (store.summary[k], v)
            for k, v in (
                ("bin_size", cfg.bin_size),
                ("dtype", cfg.dtype),
                ("block_bins", cfg.block_bins),
            )
            if store.summary[k] != v
        }
        if mismatch:
            raise StoreError(
                f"store {store_root}: settings differ from the config {mismatch} "
                "(store, config); use --overwrite to rebuild or match the config to the store."
            )
    else:
        store = Store.create(
            store_root,
            bin_size=cfg.bin_size,
            dtype=cfg.dtype,
            block_bins=cfg.block_bins,
            overwrite=overwrite,
        )

    # header checks of every file, all problems at once
    zero_filled: list[_Item] = []
    items: list[_Item] = []
    cached = {v.get("path"): v for v in store.summary["experiments"].values()}
    sums = _checksums(list(df["path"]), cached)
    for row in df.itertuples(index=False):
        asm, chroms = assemblies[row.assembly]
        style = cfg.assemblies.get(row.assembly, AssemblySpec()).chrom_names
        header: dict[str, int] | None = None
        if row.path.endswith((".bw", ".bigwig", ".bigWig")):
            try:
                header = bigwig.bigwig_chroms(row.path, experiment=row.experiment)
            except InputDataError as e:
                problems.append(str(e))
                continue
        for chrom in chroms:
            fc = ucsc_to_ensembl(chrom) if style == "ensembl" else chrom
            item = _Item(
                row.experiment,
                row.assembly,
                chrom,
                fc,
                asm.length(chrom),
                row.path,
                row.transform,
                sums[row.path],
                str(store.part_path(row.assembly, chrom, row.experiment)),
            )
            if header is not None:
                where = f"experiment {row.experiment} ({row.path}) chrom {chrom}"
                if fc not in header:
                    if cfg.policies.missing_chroms == "zeros":
                        zero_filled.append(item)
                        continue
                    hint = (
                        f" The file names chromosomes like {next(iter(header))!r}: set "
                        f"assemblies.{row.assembly}.chrom_names: "
                        f"{'ensembl' if not next(iter(header)).startswith('chr') else 'ucsc'}."
                        if any(k.startswith("chr") != fc.startswith("chr") for k in header)
                        else " Remove it from the chromosome selection, or set "
                        "policies.missing_chroms: zeros to fill it with zeros explicitly."
                    )
                    problems.append(f"{where}: chromosome {fc!r} not found in the file.{hint}")
                    continue
                if header[fc] != asm.length(chrom):
                    problems.append(
                        f"{where}: chromosome length disagrees with assembly {row.assembly}; "
                        f"expected {asm.length(chrom)}, got {header[fc]} in the file header. "
                        "The file was made for another assembly: fix the manifest's assembly "
                        "column."
                    )
                    continue
            items.append(item)
    collect(problems, f"ingest {manifest_path}")
    for asm, chroms in assemblies.values():
        store.add_assembly(asm, chroms)

    todo = []
    for item in items + zero_filled:
        meta = read_part_meta(Path(item.part))
        if (
            meta is None
            or meta.get("checksum") != item.checksum
            or meta.get("dtype") != store.dtype
            or meta.get("block_bins") != store.block_bins
            or meta.get("transform") != item.transform
        ):
            todo.append(item)
    return store, df, todo, zero_filled, assemblies


def ingest(cfg: IngestConfig, *, overwrite: bool = False, resume: bool = False) -> Store:
    """Run the ingest job.

    Parameters
    ----------
    cfg
        The ingest configuration.
    overwrite
        Delete an existing store and rebuild it.
    resume
        Reuse an existing store: finished parts whose source checksum is unchanged are skipped,
        new experiments are added, changed sources are re-ingested.

    Returns
    -------
    Store
        The store, with its summary saved.

    Raises
    ------
    StoreError
        The store exists and neither ``overwrite`` nor ``resume`` is given. A store that never
        finished a part (a first ingest stopped by a bad input found while planning) does not
        count: after fixing the manifest, the same command runs again as it was.
    InputDataError
        Listing every bad input found (all other parts are still written, so a re-run with
        ``resume`` after fixing the inputs does only the rest).
    """
    store, df, todo, zero_filled, assemblies = plan(cfg, overwrite=overwrite, resume=resume)
    zero_set = {(i.experiment, i.chrom) for i in zero_filled}
    n_chroms = {name: len(chroms) for name, (_, chroms) in assemblies.items()}
    log.info(
        "ingest: %d parts to write, %d already done",
        len(todo),
        len(df) and sum(len(assemblies[a][1]) for a in df["assembly"]) - len(todo),
    )
    results: list[dict[str, Any]] = []
    if todo:
        import ray

        from epiray.runtime import ensure_ray

        ensure_ray(cfg.num_cpus)
        bin_size, dtype, bb, pol = cfg.bin_size, cfg.dtype, cfg.block_bins, cfg.policies

        def task(batch: dict[str, Any]) -> dict[str, Any]:
            # one task writes a group of parts: stats travel in each part's metadata, only
            # problems come back
            out = {"experiment": [], "chrom": [], "problem": []}
            for group in batch["items"]:
                for row in group:
                    item = _Item(**row)
                    r = _process(
                        item,
                        bin_size,
                        dtype,
                        bb,
                        pol,
                        n_chroms[item.assembly],
                        (item.experiment, item.chrom) in zero_set,
                    )
                    out["experiment"].append(r["experiment"])
                    out["chrom"].append(r["chrom"])
                    out["problem"].append(r["problem"] or "")
            return out

        groups = group_items(todo, ray.cluster_resources().get("CPU", 1))
        ds = ray.data.from_items([{"items": g} for g in groups], override_num_blocks=len(groups))
        for r in ds.map_batches(task, batch_size=1, num_cpus=1).iter_rows():
            results.append(r)

    problems = [r["problem"] for r in results if r["problem"]]
    _update_summary(store, df, assemblies)
    filled = len(zero_filled)
    if filled:
        warnings.warn(
            f"ingest: {filled} (experiment, chromosome) parts were missing from their files and "
            "were filled with zeros (policies.missing_chroms: zeros).",
            EpirayWarning,
            stacklevel=2,
        )
    counts = _policy_counts(store, df)
    for key, n in counts.items():
        if n:
            warnings.warn(
                f"ingest: {n} values changed by policy ({key}).", EpirayWarning, stacklevel=2
            )
    collect(problems, f"ingest {cfg.manifest}")
    return store


def group_items(
    items: Sequence[_Item], cpus: float, max_bins: int = 4_000_000
) -> list[list[dict[str, Any]]]:
    """Group parts into tasks: large parts alone, small ones together, so Ray's per-task
    overhead stays small next to the work while every CPU still gets several tasks."""
    total = sum(n_bins(i.length, 25) for i in items)
    target = max(1, min(max_bins, total // max(1, int(4 * cpus))))
    groups: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    size = 0
    for item in sorted(items, key=lambda i: (i.experiment, i.chrom)):
        cur.append(asdict(item))
        size += n_bins(item.length, 25)
        if size >= target:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


def _update_summary(store: Store, df: pd.DataFrame, assemblies) -> None:
    """Record the manifest's experiments and every finished part's statistics."""
    exps = store.summary["experiments"]
    for row in df.itertuples(index=False):
        _, chroms = assemblies[row.assembly]
        st = os.stat(row.path)
        rec = {k: (None if (v := getattr(row, k)) is None or v != v else v) for k in RECORD_FIELDS}
        done: dict[str, Any] = {}
        checksum = None
        for chrom in chroms:
            meta = read_part_meta(store.part_path(row.assembly, chrom, row.experiment))
            if meta is not None:
                done[chrom] = meta["stats"]
                checksum = meta["checksum"]
        if len(done) < len(chroms):
            done = {}  # incomplete experiments are not listed (parts stay for resume)
        if done:
            exps[row.experiment] = {
                **rec,
                "checksum": checksum,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "chroms": done,
            }
        else:
            exps.pop(row.experiment, None)
    merged = store.experiments()
    store.summary["manifest_hash"] = manifest_hash(merged)
    store.save_summary()
    write_manifest(merged, store.root / MANIFEST)


def _policy_counts(store: Store, df: pd.DataFrame) -> dict[str, int]:
    counts = {"n_nonfinite": 0, "n_negative": 0}
    for e in df["experiment"]:
        for st in store.summary["experiments"].get(e, {}).get("chroms", {}).values():
            for k in counts:
                counts[k] += int(st.get(k, 0))
    return counts


def quick_config(
    manifest: str,
    store: str,
    chroms: Sequence[str] | None = None,
    dtype: str = "float32",
    chrom_sizes: dict[str, str] | None = None,
) -> IngestConfig:
    """The config of ``epiray ingest --manifest M --store S [--chroms ...]``."""
    asm = {
        k: AssemblySpec(chrom_sizes=str(Path(v).resolve())) for k, v in (chrom_sizes or {}).items()
    }
    return IngestConfig(
        manifest=str(Path(manifest).resolve()),
        store=str(Path(store).resolve()),
        chroms=list(chroms) if chroms else "primary",
        dtype=dtype,
        assemblies=asm,
    )
