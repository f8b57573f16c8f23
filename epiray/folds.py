"""Folds of an experiment table: which experiments train, which are held out and scored.

The experiment table is a pandas DataFrame with one row per experiment and the columns
``experiment, species, assembly, biosample, assay, category`` (optional ``fold``), as in the
manifest. Every builder returns a :class:`Folds`: an ordered set of :class:`Fold`, each of which
*partitions all experiments of the table* into four roles:

``train``     used for training (and for the average-activity baseline of that fold);
``validate``  held out, used for model selection (only the PREDICTD split has them);
``evaluate``  held out and scored;
``unscored``  held out (not trained on) but not scored, e.g. experiments of assays with too few
              experiments for the average-activity baseline (cross-species Avocado paper §2.5).

Builders (all deterministic: the same table and ``seed`` give the same folds, whatever the row
order of the table):

* :func:`experiment_folds` -- k-fold CV of the target species' experiments (default k = 3);
  every assay with >= k experiments appears in the held-out set of every fold, assays with
  fewer are assigned to folds (so held out once) but ``unscored``; other species always train.
* :func:`zero_shot_folds` -- the assays of one category (``protein_binding``) that the target
  species has are split into k partitions; fold i holds out every target-species experiment of
  partition i's assays and evaluates exactly those (other species' experiments of the same
  assays still train: that is the zero-shot setting). :func:`zero_shot_category_fold` holds
  out the whole category at once.
* :func:`predictd_folds` -- the Roadmap PREDICTD split (track names ``E###-Assay``).
* :func:`leave_one_out_folds` -- one fold per target-species experiment.
* :func:`manifest_folds` -- explicit folds from the table's ``fold`` column.

Training on every track, nothing held out for testing (to impute the pairs never measured),
needs no builder: it is ``folds.scheme: all`` (also spelled ``none``) of ``epiray train``, one
fold named ``all``.

Inside the training experiments, :func:`heldout_blocks` picks validation *cells*: random
genomic blocks of every training track, never trained on, used for early stopping and model
selection (the default of ``epiray train``), so no experiment is withheld whole.

:meth:`Folds.to_json` / :meth:`Folds.from_json` and :meth:`Folds.to_frame` /
:meth:`Folds.from_frame` save the folds with a run and load them back.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from epiray.errors import ConfigError, EpirayWarning, InputDataError, collect
from epiray.manifest import REQUIRED

__all__ = [
    "FOLDS_FORMAT",
    "ROLES",
    "TABLE_COLUMNS",
    "Fold",
    "Folds",
    "experiment_folds",
    "heldout_blocks",
    "heldout_fraction",
    "leave_one_out_folds",
    "manifest_folds",
    "predictd_folds",
    "zero_shot_category_fold",
    "zero_shot_folds",
]

FOLDS_FORMAT = "epiray.folds/1"
ROLES: tuple[str, ...] = ("train", "validate", "evaluate", "unscored")
#: the manifest's required columns but the file path
TABLE_COLUMNS: tuple[str, ...] = tuple(c for c in REQUIRED if c != "path")


@dataclass(frozen=True)
class Fold:
    """One fold: every experiment of the table in exactly one role.

    Attributes
    ----------
    name
        e.g. ``"fold0"``; used in run names (``model.chrom.fold0``).
    train, validate, evaluate, unscored
        Sorted experiment ids of each role (see the module docstring).
    """

    name: str
    train: tuple[str, ...]
    evaluate: tuple[str, ...]
    validate: tuple[str, ...] = ()
    unscored: tuple[str, ...] = ()

    @property
    def held_out(self) -> tuple[str, ...]:
        """Every experiment not trained on (validate + evaluate + unscored), sorted."""
        return tuple(sorted(self.validate + self.evaluate + self.unscored))

    def role(self, experiment: str) -> str:
        """The role of ``experiment`` in this fold.

        Raises
        ------
        KeyError
            When the experiment is not in the fold.
        """
        for r in ROLES:
            if experiment in getattr(self, r):
                return r
        raise KeyError(f"fold {self.name}: experiment {experiment!r} not in this fold")


@dataclass(frozen=True)
class Folds:
    """An ordered set of folds over one experiment table.

    Attributes
    ----------
    kind
        Builder that made them: ``experiment_cv``, ``zero_shot``, ``zero_shot_category``,
        ``predictd``, ``leave_one_out``, ``manifest`` (or anything a user chose).
    folds
        The folds.
    params
        JSON-serialisable record of how they were built (k, seed, target species, partitions).
    """

    kind: str
    folds: tuple[Fold, ...]
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        names = [f.name for f in self.folds]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"fold name(s) {dup} repeated; expected unique names")
        universe = None
        for f in self.folds:
            roles = {r: set(getattr(f, r)) for r in ROLES}
            for i, a in enumerate(ROLES):
                for b in ROLES[i + 1 :]:
                    both = sorted(roles[a] & roles[b])
                    if both:
                        problems.append(
                            f"fold {f.name}: experiment(s) {both[:5]} both {a} and {b}; "
                            "expected one role per experiment"
                        )
            everything = set().union(*roles.values())
            if universe is None:
                universe = everything
            elif everything != universe:
                diff = sorted(everything ^ universe)
                problems.append(
                    f"fold {f.name}: covers a different set of experiments than fold "
                    f"{self.folds[0].name} (e.g. {diff[:5]}); expected every fold to assign a "
                    "role to every experiment of the table"
                )
        collect(problems, f"folds ({self.kind})", InputDataError)

    # -- access

    def __len__(self) -> int:
        return len(self.folds)

    def __iter__(self) -> Iterator[Fold]:
        return iter(self.folds)

    def __getitem__(self, key: int | str) -> Fold:
        if isinstance(key, str):
            for f in self.folds:
                if f.name == key:
                    return f
            raise KeyError(f"folds ({self.kind}): no fold named {key!r}; have {self.names}")
        return self.folds[key]

    @property
    def names(self) -> list[str]:
        """Fold names in order."""
        return [f.name for f in self.folds]

    @property
    def experiments(self) -> tuple[str, ...]:
        """Every experiment the folds cover, sorted."""
        if not self.folds:
            return ()
        f = self.folds[0]
        return tuple(sorted(f.train + f.validate + f.evaluate + f.unscored))

    def check(self, table: pd.DataFrame) -> None:
        """Check that the folds cover exactly the experiments of ``table``.

        Raises
        ------
        InputDataError
            Naming experiments of the table the folds lack, and experiments of the folds the
            table lacks (e.g. folds loaded from another manifest).
        """
        ids = set(_check_table(table, f"folds ({self.kind})")["experiment"])
        mine = set(self.experiments)
        problems = []
        if ids - mine:
            problems.append(
                f"{len(ids - mine)} experiment(s) of the table not in the folds, e.g. "
                f"{sorted(ids - mine)[:5]}; expected the folds of this table. Rebuild the folds"
            )
        if mine - ids:
            problems.append(
                f"{len(mine - ids)} experiment(s) of the folds not in the table, e.g. "
                f"{sorted(mine - ids)[:5]}; expected the table the folds were built from"
            )
        collect(problems, f"folds ({self.kind})")

    def fold_column(self) -> pd.Series:
        """The fold in which each experiment is held out, as a manifest ``fold`` column.

        Returns
        -------
        pandas.Series
            Indexed by experiment (sorted): the fold name where the experiment is held out,
            ``None`` where it always trains. Loading it with :func:`manifest_folds` gives back
            the held-out sets (as ``evaluate``).

        Raises
        ------
        ConfigError
            When an experiment is held out in more than one fold (e.g. zero-shot or
            leave-one-out folds over overlapping sets); such folds have no single column.
        """
        out: dict[str, str | None] = dict.fromkeys(self.experiments)
        for f in self.folds:
            for e in f.held_out:
                if out[e] is not None:
                    raise ConfigError(
                        f"folds ({self.kind}): experiment {e!r} is held out in folds "
                        f"{out[e]!r} and {f.name!r}; expected at most one. Save these folds "
                        "with to_json() instead."
                    )
                out[e] = f.name
        return pd.Series(out, name="fold", dtype=object).rename_axis("experiment")

    # -- saving

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (fold, experiment).

        Returns
        -------
        pandas.DataFrame
            Columns ``fold`` (str), ``experiment`` (str), ``role`` (one of :data:`ROLES`),
            folds in order, experiments sorted within each role.
        """
        rows = [(f.name, e, r) for f in self.folds for r in ROLES for e in getattr(f, r)]
        return pd.DataFrame(rows, columns=["fold", "experiment", "role"])

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, kind: str = "custom", params: Mapping[str, Any] | None = None
    ) -> Folds:
        """Inverse of :meth:`to_frame` (fold order is first appearance).

        Raises
        ------
        InputDataError
            Missing columns or an unknown role.
        """
        missing = {"fold", "experiment", "role"} - set(frame.columns)
        if missing:
            raise InputDataError(
                f"folds frame: missing column(s) {sorted(missing)}; expected fold, experiment, "
                "role. Pass a frame made by Folds.to_frame()."
            )
        bad = sorted(set(frame["role"]) - set(ROLES))
        if bad:
            raise InputDataError(
                f"folds frame: unknown role(s) {bad}; expected one of {list(ROLES)}."
            )
        folds = []
        for name in pd.unique(frame["fold"]):
            sub = frame[frame["fold"] == name]
            parts = {
                r: tuple(sorted(map(str, sub.loc[sub["role"] == r, "experiment"]))) for r in ROLES
            }
            folds.append(Fold(name=str(name), **parts))
        return cls(kind=kind, folds=tuple(folds), params=dict(params or {}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``format``, ``kind``, ``params``, ``folds`` (every role listed)."""
        return {
            "format": FOLDS_FORMAT,
            "kind": self.kind,
            "params": dict(self.params),
            "folds": [{"name": f.name, **{r: list(getattr(f, r)) for r in ROLES}} for f in self],
        }

    def to_json(self, path: str | os.PathLike | None = None, *, overwrite: bool = False) -> str:
        """Serialise to JSON; write it atomically to ``path`` when given.

        Parameters
        ----------
        path
            Where to write; None only returns the text.
        overwrite
            Replace an existing file (otherwise an existing file is an error).

        Returns
        -------
        str
            The JSON text.

        Raises
        ------
        InputDataError
            When ``path`` exists and ``overwrite`` is False.
        """
        text = json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"
        if path is not None:
            path = Path(path)
            if path.exists() and not overwrite:
                raise InputDataError(
                    f"folds {path}: file exists; expected a new path. Pass overwrite=True to "
                    "replace it."
                )
            tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
            tmp.write_text(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Folds:
        """Load folds from a JSON file path or JSON text (as written by :meth:`to_json`).

        Raises
        ------
        InputDataError
            Unreadable JSON, another format, or folds that break the invariants.
        """
        where = "folds JSON"
        text = str(source)
        if not text.lstrip().startswith("{"):
            path = Path(source)
            where = f"folds {path}"
            if not path.is_file():
                raise InputDataError(f"{where}: file not found; expected a folds JSON file.")
            text = path.read_text()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputDataError(
                f"{where}: not valid JSON ({exc}). Pass a to_json() file."
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != FOLDS_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise InputDataError(
                f"{where}: format is {got!r}; expected {FOLDS_FORMAT!r}. Pass a file written by "
                "Folds.to_json()."
            )
        try:
            folds = tuple(
                Fold(
                    name=str(f["name"]),
                    **{r: tuple(sorted(map(str, f.get(r, ())))) for r in ROLES},
                )
                for f in doc["folds"]
            )
        except (KeyError, TypeError) as exc:
            raise InputDataError(
                f"{where}: malformed folds entry ({exc!r}); expected a list of objects with "
                f"name and {list(ROLES)}."
            ) from None
        return cls(kind=str(doc.get("kind", "custom")), folds=folds, params=doc.get("params", {}))


# --------------------------------------------------------------------------------------------
# table validation


def _check_table(table: pd.DataFrame, where: str) -> pd.DataFrame:
    """Validate the experiment table; return a copy sorted by experiment with str columns."""
    if not isinstance(table, pd.DataFrame):
        raise InputDataError(
            f"{where}: experiment table is a {type(table).__name__}; expected a pandas "
            "DataFrame with columns " + ", ".join(TABLE_COLUMNS) + "."
        )
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise InputDataError(
            f"{where}: experiment table lacks column(s) {missing}; expected "
            f"{list(TABLE_COLUMNS)}, got {list(table.columns)}. Load it with the manifest reader."
        )
    df = table.reset_index(drop=True)
    problems = []
    for col in TABLE_COLUMNS:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        for i in np.flatnonzero(empty.to_numpy())[:5]:
            exp = df["experiment"].iloc[i] if col != "experiment" else f"row {i}"
            problems.append(f"experiment {exp}: {col} is empty; expected a value")
    ids = df["experiment"].astype(str)
    dup = ids[ids.duplicated(keep=False)]
    for e in sorted(set(dup))[:5]:
        rows = list(np.flatnonzero((ids == e).to_numpy()))
        problems.append(f"experiment {e}: appears in rows {rows}; expected unique experiment ids")
    collect(problems, f"{where}: experiment table")
    df = df.copy()
    for col in TABLE_COLUMNS:
        df[col] = df[col].astype(str)
    return df.sort_values("experiment", kind="stable").reset_index(drop=True)


def _target(df: pd.DataFrame, target_species: str | None, where: str) -> str:
    species = sorted(set(df["species"]))
    if target_species is None:
        if len(species) == 1:
            return species[0]
        raise ConfigError(
            f"{where}: the table has {len(species)} species {species}; expected "
            "target_species= naming the one whose experiments are held out."
        )
    if target_species not in species:
        raise InputDataError(
            f"{where}: target species {target_species!r} has no experiment in the table; "
            f"expected one of {species}. Check the species column."
        )
    return target_species


def _check_k(k: int, where: str) -> None:
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"{where}: k is {k!r}; expected an integer >= 2.")


def _make_fold(name: str, all_ids: Sequence[str], **roles: Sequence[str]) -> Fold:
    held = set().union(*map(set, roles.values())) if roles else set()
    train = tuple(e for e in all_ids if e not in held)
    return Fold(name=name, train=train, **{r: tuple(sorted(v)) for r, v in roles.items()})


# --------------------------------------------------------------------------------------------
# builders


def experiment_folds(
    table: pd.DataFrame,
    k: int = 3,
    *,
    target_species: str | None = None,
    seed: int = 0,
    min_scored: int | None = None,
) -> Folds:
    """k-fold cross-validation over the target species' experiments.

    Each assay's experiments (sorted, then shuffled with ``seed``) are dealt round-robin over
    the folds, starting with the folds that hold the fewest experiments so far, assays taken
    from the most to the least frequent. So an assay with ``>= k`` experiments is held out in
    every fold (each fold gets ``floor`` or ``ceil`` of ``count / k`` of them), and the folds
    differ in size by at most a few experiments.

    Parameters
    ----------
    table
        Experiment table (``experiment, species, assembly, biosample, assay, category``).
    k
        Number of folds (>= 2).
    target_species
        Species whose experiments are split; required when the table has several species.
        Experiments of other species are ``train`` in every fold.
    seed
        Seed of the shuffle.
    min_scored
        Assays with fewer target-species experiments than this are held out in their fold but
        ``unscored`` (default ``k``: the average-activity baseline of a fold needs training
        experiments of the assay, and an assay in every fold needs ``k``).

    Returns
    -------
    Folds
        ``kind="experiment_cv"``, folds ``fold0 .. fold{k-1}``; ``params`` records k, seed,
        target_species, min_scored and the unscored assays.

    Raises
    ------
    InputDataError
        A malformed table, or fewer target-species experiments than ``k``.
    ConfigError
        ``k < 2`` or no ``target_species`` for a multi-species table.
    """
    where = "experiment folds"
    _check_k(k, where)
    df = _check_table(table, where)
    target = _target(df, target_species, where)
    min_scored = k if min_scored is None else int(min_scored)
    tgt = df[df["species"] == target]
    if len(tgt) < k:
        raise InputDataError(
            f"{where}: species {target!r} has {len(tgt)} experiment(s); expected at least "
            f"k={k}. Lower k or add experiments."
        )
    rng = np.random.default_rng(seed)
    groups = {a: list(g["experiment"]) for a, g in tgt.groupby("assay", sort=True)}
    assays = sorted(groups, key=lambda a: (-len(groups[a]), a))
    held: list[list[str]] = [[] for _ in range(k)]
    unscored: list[list[str]] = [[] for _ in range(k)]
    sizes = np.zeros(k, dtype=np.int64)
    low = sorted(a for a in assays if len(groups[a]) < min_scored)
    for a in assays:
        exps = [groups[a][i] for i in rng.permutation(len(groups[a]))]
        order = np.lexsort((np.arange(k), sizes))  # smallest folds first, then by index
        for j, e in enumerate(exps):
            f = int(order[j % k])
            (unscored if a in low else held)[f].append(e)
            sizes[f] += 1
    all_ids = list(df["experiment"])
    folds = tuple(
        _make_fold(f"fold{i}", all_ids, evaluate=held[i], unscored=unscored[i]) for i in range(k)
    )
    params = {
        "k": int(k),
        "seed": int(seed),
        "target_species": target,
        "min_scored": min_scored,
        "unscored_assays": low,
    }
    return Folds(kind="experiment_cv", folds=folds, params=params)


def _category_assays(
    df: pd.DataFrame, target: str, category: str, where: str
) -> dict[str, list[str]]:
    """Target-species experiments of each assay of ``category``; checks assay categories."""
    cats = df.groupby("assay")["category"].agg(lambda s: sorted(set(s)))
    mixed = cats[cats.map(len) > 1]
    problems = [
        f"assay {a}: categories {c}; expected one category per assay across species"
        for a, c in mixed.items()
    ]
    collect(problems, f"{where}: experiment table")
    sub = df[(df["species"] == target) & (df["category"] == category)]
    if sub.empty:
        present = sorted(set(df.loc[df["species"] == target, "category"]))
        raise InputDataError(
            f"{where}: species {target!r} has no experiment of category {category!r}; "
            f"expected one of its categories {present}. Check category="
        )
    return {a: list(g["experiment"]) for a, g in sub.groupby("assay", sort=True)}


def zero_shot_folds(
    table: pd.DataFrame,
    k: int = 3,
    *,
    category: str = "protein_binding",
    target_species: str | None = None,
    seed: int = 0,
    min_scored: int = 1,
) -> Folds:
    """Zero-shot folds: hold out every target-species experiment of a partition of assays.

    The assays of ``category`` that the target species has are dealt, from the most to the
    least experiments (assays with equal counts in an order shuffled with ``seed``), each to
    the partition with the fewest experiments so far (ties: fewest assays, then lowest index),
    so the folds evaluate similar numbers of experiments. Fold i holds out every
    target-species experiment of partition i's assays and evaluates exactly those; everything
    else trains, including other species' experiments of the same assays.

    Parameters
    ----------
    table
        Experiment table.
    k
        Number of assay partitions (>= 2).
    category
        Category whose assays are partitioned.
    target_species
        As :func:`experiment_folds`.
    seed
        Seed of the shuffle.
    min_scored
        Held-out experiments of assays with fewer target-species experiments than this are
        ``unscored`` (default 1: all are evaluated; the cross-species paper evaluated only
        assays with >= 3, for its average-activity baseline).

    Returns
    -------
    Folds
        ``kind="zero_shot"``, folds ``fold0 ..``; ``params["partitions"]`` maps fold name to
        its assays.

    Raises
    ------
    InputDataError
        Fewer than ``k`` assays of the category in the target species (naming them), an assay
        with different categories in different rows.
    """
    where = f"zero-shot folds ({category})"
    _check_k(k, where)
    df = _check_table(table, where)
    target = _target(df, target_species, where)
    groups = _category_assays(df, target, category, where)
    if len(groups) < k:
        raise InputDataError(
            f"{where}: species {target!r} has {len(groups)} assay(s) of category {category!r} "
            f"({sorted(groups)}); expected at least k={k}. Lower k or use "
            "zero_shot_category_fold()."
        )
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    shuffled = [names[i] for i in rng.permutation(len(names))]
    # largest assays first (balances the folds); the seed orders assays of equal size
    ordered = sorted(shuffled, key=lambda a: -len(groups[a]))
    parts: list[list[str]] = [[] for _ in range(k)]
    n_exp = np.zeros(k, dtype=np.int64)
    n_ass = np.zeros(k, dtype=np.int64)
    for a in ordered:
        f = int(np.lexsort((np.arange(k), n_ass, n_exp))[0])
        parts[f].append(a)
        n_exp[f] += len(groups[a])
        n_ass[f] += 1
    all_ids = list(df["experiment"])
    folds = []
    for i, assays in enumerate(parts):
        ev = [e for a in assays if len(groups[a]) >= min_scored for e in groups[a]]
        un = [e for a in assays if len(groups[a]) < min_scored for e in groups[a]]
        folds.append(_make_fold(f"fold{i}", all_ids, evaluate=ev, unscored=un))
    params = {
        "k": int(k),
        "seed": int(seed),
        "category": category,
        "target_species": target,
        "min_scored": int(min_scored),
        "partitions": {f"fold{i}": sorted(p) for i, p in enumerate(parts)},
    }
    return Folds(kind="zero_shot", folds=tuple(folds), params=params)


def zero_shot_category_fold(
    table: pd.DataFrame,
    *,
    category: str = "protein_binding",
    target_species: str | None = None,
    min_scored: int = 1,
) -> Folds:
    """One fold holding out every target-species experiment of a category at once.

    Parameters
    ----------
    table, category, target_species, min_scored
        As :func:`zero_shot_folds`.

    Returns
    -------
    Folds
        ``kind="zero_shot_category"`` with one fold named ``"all"``.
    """
    where = f"zero-shot category fold ({category})"
    df = _check_table(table, where)
    target = _target(df, target_species, where)
    groups = _category_assays(df, target, category, where)
    ev = [e for g in groups.values() if len(g) >= min_scored for e in g]
    un = [e for g in groups.values() if len(g) < min_scored for e in g]
    fold = _make_fold("all", list(df["experiment"]), evaluate=ev, unscored=un)
    params = {
        "category": category,
        "target_species": target,
        "min_scored": int(min_scored),
        "assays": sorted(groups),
    }
    return Folds(kind="zero_shot_category", folds=(fold,), params=params)


def predictd_folds(
    table: pd.DataFrame,
    splits: str | os.PathLike | Mapping[str, Sequence[str]],
    *,
    missing: Literal["error", "skip"] = "error",
) -> Folds:
    """The Roadmap PREDICTD split (train / validate / test) as one fold.

    Track names ``E###-Assay`` (e.g. ``E003-H3K4me3``) are matched to the experiment whose
    ``biosample`` is ``E###`` and ``assay`` is ``Assay`` (exact strings).

    Parameters
    ----------
    table
        Experiment table of Roadmap experiments.
    splits
        ``predictd_splits.json`` or its content ``{"train": [...], "val": [...], "test":
        [...]}``.
    missing
        Tracks of the split absent from the table: ``"error"`` (default) or ``"skip"`` (warned
        with :class:`~epiray.errors.EpirayWarning` and counted in ``params``).

    Returns
    -------
    Folds
        ``kind="predictd"``, one fold ``"predictd"``: ``train`` = train, ``validate`` = val,
        ``evaluate`` = test.

    Raises
    ------
    InputDataError
        Malformed split, a track in two parts, a table experiment not in the split, two
        experiments with the same biosample and assay, missing tracks with ``missing="error"``.
    """
    where = "PREDICTD folds"
    if missing not in ("error", "skip"):
        raise ConfigError(f"{where}: missing is {missing!r}; expected 'error' or 'skip'.")
    if isinstance(splits, Mapping):
        doc, src = splits, "splits"
    else:
        src = str(splits)
        try:
            doc = json.loads(Path(splits).read_text())
        except FileNotFoundError:
            raise InputDataError(
                f"{where}: {src} not found; expected predictd_splits.json."
            ) from None
        except json.JSONDecodeError as exc:
            raise InputDataError(f"{where}: {src} is not valid JSON ({exc}).") from None
    parts = {"train": "train", "val": "validate", "test": "evaluate"}
    problems = []
    if not isinstance(doc, Mapping) or set(doc) != set(parts):
        got = sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__
        raise InputDataError(
            f"{where}: {src} has keys {got}; expected exactly ['test', 'train', 'val']."
        )
    seen: dict[str, str] = {}
    for part in parts:
        for t in doc[part]:
            b, sep, a = str(t).partition("-")
            if not sep or not b or not a:
                problems.append(f"track {t!r} in {part}: expected a name 'E###-Assay'")
            if t in seen:
                problems.append(f"track {t!r}: in both {seen[t]} and {part}; expected one part")
            seen[t] = part
    collect(problems, f"{where}: {src}")
    df = _check_table(table, where)
    key = df["biosample"] + "-" + df["assay"]
    dup = key[key.duplicated(keep=False)]
    problems = [
        f"track {t}: experiments {sorted(df.loc[key == t, 'experiment'])} share biosample and "
        "assay; expected one experiment per track"
        for t in sorted(set(dup))[:5]
    ]
    extra = df.loc[~key.isin(seen), "experiment"]
    if len(extra):
        problems.append(
            f"{len(extra)} experiment(s) not in the split, e.g. "
            + ", ".join(
                f"{e} ({k})" for e, k in zip(extra[:5], key[~key.isin(seen)][:5], strict=True)
            )
            + "; expected biosample-assay names of the split (e.g. E003-H3K4me3). Check the "
            "biosample/assay spelling or drop them from the table"
        )
    absent = sorted(set(seen) - set(key))
    if absent and missing == "error":
        problems.append(
            f"{len(absent)} track(s) of the split not in the table, e.g. {absent[:5]}; "
            "expected every track. Pass missing='skip' to score a partial compendium"
        )
    collect(problems, where)
    if absent:
        warnings.warn(
            f"{where}: {len(absent)} track(s) of the split are not in the table and were "
            f"skipped, e.g. {absent[:5]}",
            EpirayWarning,
            stacklevel=2,
        )
    exp_of = dict(zip(key, df["experiment"], strict=True))
    roles: dict[str, list[str]] = {r: [] for r in parts.values()}
    for t, part in seen.items():
        if t in exp_of:
            roles[parts[part]].append(exp_of[t])
    fold = Fold(name="predictd", **{r: tuple(sorted(v)) for r, v in roles.items()})
    params = {
        "splits": src,
        "counts": {r: len(v) for r, v in roles.items()},
        "skipped_tracks": len(absent),
    }
    return Folds(kind="predictd", folds=(fold,), params=params)


def leave_one_out_folds(
    table: pd.DataFrame,
    *,
    target_species: str | None = None,
    experiments: Sequence[str] | None = None,
) -> Folds:
    """One fold per experiment: hold it out, train on everything else.

    Parameters
    ----------
    table
        Experiment table.
    target_species
        As :func:`experiment_folds`; its experiments get a fold each.
    experiments
        Only these experiments (default every target-species experiment).

    Returns
    -------
    Folds
        ``kind="leave_one_out"``; each fold is named after its held-out experiment.

    Raises
    ------
    InputDataError
        An experiment not in the table or not of the target species.
    """
    where = "leave-one-out folds"
    df = _check_table(table, where)
    target = _target(df, target_species, where)
    tgt = list(df.loc[df["species"] == target, "experiment"])
    if experiments is None:
        chosen = tgt
    else:
        chosen = sorted(set(map(str, experiments)))
        bad = sorted(set(chosen) - set(tgt))
        if bad:
            raise InputDataError(
                f"{where}: experiment(s) {bad[:5]} not in the table as species {target!r}; "
                f"expected experiments of the target species. Check the ids."
            )
    all_ids = list(df["experiment"])
    folds = tuple(_make_fold(e, all_ids, evaluate=[e]) for e in chosen)
    return Folds(kind="leave_one_out", folds=folds, params={"target_species": target})


def _fold_name(v: Any) -> str | None:
    """``fold`` column value -> fold name; None for 'always train'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"fold{int(v)}"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return f"fold{int(v)}"
    s = str(v).strip()
    if s in ("", "train", "nan", "None"):
        return None
    if s.lstrip("-").isdigit():
        return f"fold{int(s)}"
    return s


def _numbered(name: str) -> bool:
    return name.startswith("fold") and name[4:].lstrip("-").isdigit()


_NO_FOLDS_FIX = (
    "To train on every track with nothing held out for testing, set folds.scheme: all (also "
    "spelled none); for cross-validation, folds.scheme: experiment (or zero_shot, loo); for "
    "your own folds, fill the manifest's fold column (0, 1, ... per held-out experiment, "
    "empty to always train) and ingest it again."
)


def manifest_folds(table: pd.DataFrame) -> Folds:
    """Explicit folds from the table's ``fold`` column.

    An experiment whose ``fold`` is ``f`` is held out and evaluated in fold ``f`` and trains in
    every other fold; an empty ``fold`` (or ``train``) means it always trains. Integer values
    name the folds ``fold0``, ``fold1``, ...; other strings are used as given.

    Parameters
    ----------
    table
        Experiment table with a ``fold`` column.

    Returns
    -------
    Folds
        ``kind="manifest"``, folds in order (integer folds numerically, then names).

    Raises
    ------
    InputDataError
        No ``fold`` column, or no experiment in any fold.
    """
    where = "manifest folds"
    df = _check_table(table, where)
    if "fold" not in df.columns:
        raise InputDataError(
            f"{where}: the manifest has no 'fold' column; expected one naming each held-out "
            f"experiment's fold. {_NO_FOLDS_FIX}"
        )
    names = [_fold_name(v) for v in df["fold"]]
    used = sorted(
        {n for n in names if n is not None},
        key=lambda n: (0, int(n[4:]), n) if _numbered(n) else (1, 0, n),
    )
    if not used:
        raise InputDataError(
            f"{where}: every 'fold' value of the manifest is empty; expected at least one "
            f"experiment in a fold. {_NO_FOLDS_FIX}"
        )
    all_ids = list(df["experiment"])
    folds = tuple(
        _make_fold(f, all_ids, evaluate=[e for e, n in zip(all_ids, names, strict=True) if n == f])
        for f in used
    )
    return Folds(kind="manifest", folds=folds, params={"folds": used})


# ------------------------------------------------------------------------- validation cells
def heldout_fraction(n_tracks: int, n_bins: int, fraction: float, max_cells: int) -> float:
    """Share of every training track's blocks held out for validation on one chromosome:
    ``fraction``, lowered so that about ``max_cells`` cells are held out in all (a validation
    pass then stays cheap next to an epoch on a whole compendium).

    Parameters
    ----------
    n_tracks, n_bins
        Training tracks and bins of the chromosome (all workers together).
    fraction
        The share wanted, in ``[0, 1)``.
    max_cells
        Upper bound on held-out cells.
    """
    cells = max(1, n_tracks * n_bins)
    return min(fraction, max_cells / cells)


def heldout_blocks(
    experiments: Sequence[str],
    chrom: str,
    n_bins: int,
    lo: int,
    hi: int,
    fraction: float,
    block_bins: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """The validation blocks of training tracks on the bins ``[lo, hi)`` of a chromosome.

    Each block of ``block_bins`` bins (global: block ``j`` is bins ``[j·block_bins,
    (j+1)·block_bins)``) of each experiment is held out with probability ``fraction``, drawn
    from a generator keyed by (``seed``, experiment, chromosome) — so the draw of a track does
    not depend on the other tracks, on their order or on how the chromosome is sharded, and
    different tracks hold out different places (every bin keeps its other tracks).

    Parameters
    ----------
    experiments
        Training experiment ids, in the order of the slab's tracks.
    chrom, n_bins
        The chromosome and its bins.
    lo, hi
        The worker's bins.
    fraction
        Probability that a block is held out (:func:`heldout_fraction`).
    block_bins
        Bins per block (200 = 5 kbp, Avocado's coarsest scale).
    seed
        Seed of the draw.

    Returns
    -------
    numpy.ndarray
        bool ``[len(experiments), (hi - 1) // block_bins - lo // block_bins + 1]``: True where
        the block is held out (the ``heldout`` mask of :class:`~epiray.models.ChromData`).

    Raises
    ------
    ConfigError
        ``fraction`` outside ``[0, 0.5]`` or ``block_bins`` < 1.
    """
    if not 0.0 <= fraction <= 0.5 or block_bins < 1:
        raise ConfigError(
            f"validation blocks of {chrom}: fraction {fraction} and block_bins {block_bins}; "
            "expected 0 <= fraction <= 0.5 and block_bins >= 1. Fix the validation section."
        )
    k = block_bins
    b0, b1 = lo // k, (hi - 1) // k + 1
    n_blocks = -(-n_bins // k)
    out = np.zeros((len(experiments), b1 - b0), dtype=bool)
    key_chrom = zlib.crc32(chrom.encode())
    for i, e in enumerate(experiments):
        rng = np.random.default_rng([seed, zlib.crc32(str(e).encode()), key_chrom])
        out[i] = rng.random(n_blocks)[b0:b1] < fraction
    return out
