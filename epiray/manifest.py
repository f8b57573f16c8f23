"""The experiment table: one row per track (an assay in a biosample of one species).

A manifest is a TSV with a header. Required columns: ``experiment, species, assembly,
biosample, assay, category, path``; optional: ``transform`` (``arcsinh``, the default, or
``none`` for input that is already arcsinh-transformed), ``donor``, ``fold``. Relative paths
resolve against the manifest's directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from epiray.errors import collect

REQUIRED = ("experiment", "species", "assembly", "biosample", "assay", "category", "path")
OPTIONAL = ("transform", "donor", "fold")
CATEGORIES = (
    "histone_modification",
    "protein_binding",
    "transcription",
    "accessibility",
    "other",
)
TRANSFORMS = ("arcsinh", "none")
TRACK_SUFFIXES = (".bw", ".bigwig", ".bigWig", ".npy", ".npz")


def read_manifest(path: str | Path, *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest, reporting every problem at once.

    Parameters
    ----------
    path
        The TSV file.
    check_files
        Also check that every ``path`` exists and has a known suffix.

    Returns
    -------
    pandas.DataFrame
        One row per experiment with the columns of :data:`REQUIRED` and :data:`OPTIONAL`
        (``transform`` filled with ``"arcsinh"``, ``donor``/``fold`` with ``None`` when absent),
        ``path`` made absolute, index reset, and ``row`` = the 1-based line number in the file
        (header is line 1).

    Raises
    ------
    InputDataError
        Listing every problem with its line number: missing columns, empty cells, duplicate
        experiments, missing files, unknown category or transform, an assembly declared for two
        species, a biosample id used by two species.
    """
    path = Path(path)
    if not path.is_file():
        collect([f"manifest {path}: file not found"], f"manifest {path}")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment=None)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        collect([f"cannot parse as TSV ({e})"], f"manifest {path}")
    df.columns = [c.strip() for c in df.columns]
    problems: list[str] = []
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        problems.append(
            f"missing column(s) {missing}; expected a header with {list(REQUIRED)} "
            f"(optional {list(OPTIONAL)})"
        )
    unknown = [c for c in df.columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        problems.append(
            f"unknown column(s) {unknown}; allowed are {list(REQUIRED + OPTIONAL)}. "
            "Remove or rename them"
        )
    collect(problems, f"manifest {path}")
    df = df.map(lambda v: v.strip() if isinstance(v, str) else v)
    df.insert(0, "row", range(2, len(df) + 2))
    if "transform" not in df.columns:
        df["transform"] = "arcsinh"
    df["transform"] = df["transform"].replace("", "arcsinh")
    for col in ("donor", "fold"):
        if col not in df.columns:
            df[col] = None
        else:
            df[col] = df[col].replace("", None)
    if len(df) == 0:
        problems.append("no experiments listed")

    for col in REQUIRED:
        for r in df.loc[df[col] == "", "row"]:
            problems.append(f"line {r}: empty {col}")
    dup = df[df["experiment"].duplicated(keep=False) & (df["experiment"] != "")]
    for exp, rows in dup.groupby("experiment")["row"]:
        problems.append(
            f"experiment {exp!r} listed more than once (lines {list(rows)}); experiment ids "
            "must be unique"
        )
    for r, c, e in df.loc[
        ~df["category"].isin(CATEGORIES) & (df["category"] != ""),
        ["row", "category", "experiment"],
    ].itertuples(index=False):
        problems.append(
            f"line {r} (experiment {e}): unknown category {c!r}; expected one of "
            f"{list(CATEGORIES)}"
        )
    for r, t, e in df.loc[
        ~df["transform"].isin(TRANSFORMS), ["row", "transform", "experiment"]
    ].itertuples(index=False):
        problems.append(
            f"line {r} (experiment {e}): unknown transform {t!r}; expected one of "
            f"{list(TRANSFORMS)}"
        )
    for key, other in (("assembly", "species"), ("biosample", "species")):
        sub = df[(df[key] != "") & (df[other] != "")]
        n = sub.groupby(key)[other].nunique()
        for name in n[n > 1].index:
            rows = sub.loc[sub[key] == name, ["row", other]].drop_duplicates(other)
            listing = ", ".join(f"{s} (line {r})" for r, s in rows.itertuples(index=False))
            problems.append(
                f"{key} {name!r} is used by more than one species: {listing}; a {key} belongs "
                "to one species. Rename one of them"
            )
    base = path.parent
    df["path"] = [
        str((base / p).resolve()) if p and not Path(p).is_absolute() else p for p in df["path"]
    ]
    if check_files:
        for r, e, p in df[["row", "experiment", "path"]].itertuples(index=False):
            if not p:
                continue
            if not Path(p).is_file():
                problems.append(f"line {r} (experiment {e}): file not found: {p}")
            elif not p.endswith(TRACK_SUFFIXES):
                problems.append(
                    f"line {r} (experiment {e}): unknown track format {Path(p).suffix!r} ({p}); "
                    f"expected one of {list(TRACK_SUFFIXES)}"
                )
    collect(problems, f"manifest {path}")
    return df.reset_index(drop=True)


def manifest_hash(df: pd.DataFrame) -> str:
    """A stable hash of the experiment table's content (order-independent).

    Paths are excluded so that moving a compendium does not change the hash; sources are
    tracked separately by checksum.
    """
    cols = [c for c in REQUIRED + OPTIONAL if c in df.columns and c != "path"]
    canon = df[cols].astype(str).sort_values("experiment").to_csv(sep="\t", index=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Write the manifest columns of ``df`` as a TSV (atomically)."""
    from epiray.store import atomic_write_text

    cols = [c for c in REQUIRED + OPTIONAL if c in df.columns]
    atomic_write_text(Path(path), df[cols].fillna("").to_csv(sep="\t", index=False))
