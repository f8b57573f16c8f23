"""Comparison tables, paired tests and per-assay reports over per-experiment scores.

The input everywhere is a long *scores* frame: one row per (model, experiment[, chrom]) with the
columns ``model, experiment, biosample, assay, category, fold, chrom`` and one column per metric
(``mse``, ``pearson``, ... as returned by :func:`epiray.metrics.score_track`). Metrics are
computed on arcsinh-transformed 25 bp bins (METHODS §1, §7). From it this module builds the
tables of the cross-species Avocado paper (§2.5, §3):

* :func:`comparison_table` — mean metric per model overall and per activity category (Table 1);
* :func:`paired_tests` — paired t-tests between models over the same experiments (p ≤ 0.01);
* :func:`assay_improvement` / :func:`improvement_summary` — per-assay % MSE improvement over the
  average activity baseline (Figure 4D: "29 of 31 proteins improve, mean 33.7%, ≥ 50% for 10");
* :func:`dnase_consistency` / :func:`dnase_consistency_table` — AUROC, recall and precision of
  protein-binding signal for DNase peaks in the same biosample (Figure 4F-H);
* :func:`format_table` — rendering for the terminal, Markdown and CSV;
* :func:`load_scores` — score tables logged to MLflow by :mod:`epiray.tracking`.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

from epiray.errors import InputDataError

logger = logging.getLogger(__name__)

#: Activity categories in the order of the papers' tables (METHODS §1).
CATEGORIES: tuple[str, ...] = (
    "histone_modification",
    "protein_binding",
    "transcription",
    "accessibility",
    "other",
)
#: Identifying (non-metric) columns of a scores frame.
ID_COLUMNS: tuple[str, ...] = (
    "model",
    "experiment",
    "biosample",
    "assay",
    "category",
    "fold",
    "chrom",
)
#: Metrics for which a lower value is better; every other metric is better when higher.
LOWER_IS_BETTER: frozenset[str] = frozenset(
    {"mse", "mse1obs", "mse1imp", "mse_prom", "mse_gene", "mse_enh", "mse_var"}
)
#: Name of the average activity baseline model (METHODS §4) in scores frames.
AVERAGE_ACTIVITY = "average_activity"
#: Significance level of the papers' paired t-tests.
ALPHA = 0.01
#: Read-depth normalised DNase signal above which a bin is a peak (cross-species paper §3.2).
DNASE_PEAK_THRESHOLD = 2.0


# ---------------------------------------------------------------------------------------------
# Validation and per-experiment aggregation
# ---------------------------------------------------------------------------------------------


def _require(scores: pd.DataFrame, columns: Iterable[str], where: str) -> None:
    if not isinstance(scores, pd.DataFrame):
        raise InputDataError(
            f"{where}: scores must be a pandas DataFrame; got {type(scores).__name__}. "
            "Build it with one row per (model, experiment) and one column per metric."
        )
    missing = [c for c in columns if c not in scores.columns]
    if missing:
        raise InputDataError(
            f"{where}: scores frame lacks column(s) {missing}; expected at least "
            f"{list(columns)}, got {list(scores.columns)}. Add them (see epiray.evaluate)."
        )


def _models_in_order(scores: pd.DataFrame, models: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(scores["model"].tolist()))
    if models is None:
        return present
    unknown = [m for m in models if m not in present]
    if unknown:
        raise InputDataError(
            f"scores: model(s) {unknown} not found; expected some of {present}, got "
            f"{list(models)}. Check the model names in the score table."
        )
    return list(models)


def metric_columns(scores: pd.DataFrame) -> list[str]:
    """The numeric metric columns of a scores frame (every numeric column not an id column).

    Parameters
    ----------
    scores
        Long scores frame.

    Returns
    -------
    list of str
        Column names in frame order; ``n_bins`` (a weight, not a metric) is excluded.
    """
    return [
        c
        for c in scores.columns
        if c not in ID_COLUMNS and c != "n_bins" and pd.api.types.is_numeric_dtype(scores[c])
    ]


def per_experiment(scores: pd.DataFrame) -> pd.DataFrame:
    """Combine per-chromosome rows into one row per (model, experiment).

    The papers score an experiment over all evaluated chromosomes (mouse chr3, chr11, chr19). When
    the frame has one row per (model, experiment, chrom), the metrics are averaged over the
    chromosomes — weighted by ``n_bins`` when that column exists, which makes the MSE-type metrics
    exactly the pooled values; correlations and AUROCs are bin-weighted means, an approximation.
    ``chrom`` becomes the sorted comma-joined list of chromosomes.

    Parameters
    ----------
    scores
        Long scores frame with at least ``model`` and ``experiment``.

    Returns
    -------
    pandas.DataFrame
        One row per (model, experiment), the id columns first, then the metrics.

    Raises
    ------
    InputDataError
        When a (model, experiment, chrom) appears twice (e.g. two folds or two trials of the same
        model) — averaging them silently would mix different models.
    """
    _require(scores, ["model", "experiment"], "per_experiment")
    metrics = metric_columns(scores)
    if "chrom" not in scores.columns:
        dup = scores.duplicated(["model", "experiment"], keep=False)
        if dup.any():
            first = scores.loc[dup, ["model", "experiment"]].iloc[0].tolist()
            raise InputDataError(
                f"scores: model {first[0]!r}, experiment {first[1]!r} is scored more than once "
                "and the frame has no 'chrom' column; expected one row per (model, experiment). "
                "Add the chrom column or keep one fold/trial per model."
            )
        return scores.reset_index(drop=True)
    dup = scores.duplicated(["model", "experiment", "chrom"], keep=False)
    if dup.any():
        first = scores.loc[dup, ["model", "experiment", "chrom"]].iloc[0].tolist()
        raise InputDataError(
            f"scores: model {first[0]!r}, experiment {first[1]!r}, chrom {first[2]!r} is scored "
            "more than once; expected one row per (model, experiment, chrom). Keep one "
            "fold/trial per model name (e.g. name sweep trials as distinct models)."
        )
    if not scores.duplicated(["model", "experiment"]).any():
        return scores.reset_index(drop=True)

    ids = [c for c in ID_COLUMNS if c in scores.columns and c not in ("model", "experiment")]
    rows = []
    for (model, experiment), group in scores.groupby(["model", "experiment"], sort=False):
        row: dict[str, object] = {"model": model, "experiment": experiment}
        for c in ids:
            if c == "chrom":
                row[c] = ",".join(sorted(map(str, group[c].unique())))
            else:
                values = list(dict.fromkeys(map(str, group[c].tolist())))
                row[c] = group[c].iloc[0] if len(values) == 1 else ",".join(values)
        weights = group["n_bins"].to_numpy(float) if "n_bins" in group.columns else None
        for m in metrics:
            v = group[m].to_numpy(float)
            ok = ~np.isnan(v)
            if not ok.any():
                row[m] = float("nan")
            elif weights is None:
                row[m] = float(v[ok].mean())
            else:
                row[m] = float(np.average(v[ok], weights=weights[ok]))
        if weights is not None:
            row["n_bins"] = int(weights.sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _paired(
    scores: pd.DataFrame, metric: str, models: Sequence[str]
) -> tuple[pd.DataFrame, pd.Series]:
    """Wide frame experiment x model of ``metric`` over experiments every model scored."""
    wide = scores.pivot(index="experiment", columns="model", values=metric)[list(models)]
    complete = wide.dropna()
    dropped = len(wide) - len(complete)
    if dropped:
        logger.warning(
            "%d experiment(s) lack a %s score for some of %s; comparing the %d they share",
            dropped,
            metric,
            list(models),
            len(complete),
        )
    category = (
        scores.drop_duplicates("experiment").set_index("experiment")["category"]
        if "category" in scores.columns
        else pd.Series("other", index=wide.index)
    )
    return complete, category.reindex(complete.index)


# ---------------------------------------------------------------------------------------------
# Table 1: mean per model, overall and per category
# ---------------------------------------------------------------------------------------------


def comparison_table(
    scores: pd.DataFrame,
    metric: str = "mse",
    models: Sequence[str] | None = None,
    paired: bool = True,
) -> pd.DataFrame:
    """Mean ``metric`` per model, overall and per activity category (cross-species Table 1).

    Parameters
    ----------
    scores
        Long scores frame (``model``, ``experiment``, ``metric`` and, for the per-category
        columns, ``category``; per-chromosome rows are combined by :func:`per_experiment`).
    metric
        Metric column to average over experiments, e.g. ``"mse"`` (arcsinh scale).
    models
        Rows in this order (default: order of first appearance).
    paired
        Average only over experiments every model scored (default), so the columns compare
        models on the same held-out experiments, as the papers do.

    Returns
    -------
    pandas.DataFrame
        Index ``model``; columns ``n`` (experiments averaged), ``overall``, then one column per
        category present, in :data:`CATEGORIES` order (none without a ``category`` column).
        Values are plain means over experiments.

    Raises
    ------
    InputDataError
        When a required column or model is missing.
    """
    _require(scores, ["model", "experiment", metric], "comparison_table")
    scores = per_experiment(scores)
    models = _models_in_order(scores, models)
    scores = scores[scores["model"].isin(models)]
    if paired:
        wide, category = _paired(scores, metric, models)
    else:
        wide = scores.pivot(index="experiment", columns="model", values=metric)[models]
        category = _paired(scores, metric, models[:1])[1].reindex(wide.index)
    cats = []
    if "category" in scores.columns:
        cats = [c for c in CATEGORIES if (category == c).any()]
        cats += sorted(set(category.dropna()) - set(CATEGORIES))
    table = pd.DataFrame(index=pd.Index(models, name="model"))
    table["n"] = [int(wide[m].notna().sum()) for m in models]
    table["overall"] = [float(wide[m].mean()) for m in models]
    for c in cats:
        table[c] = [float(wide.loc[category == c, m].mean()) for m in models]
    return table


def paired_tests(
    scores: pd.DataFrame,
    metric: str = "mse",
    models: Sequence[str] | None = None,
    reference: str | None = None,
    by_category: bool = True,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Paired t-tests (:func:`scipy.stats.ttest_rel`) between models over the same experiments.

    Parameters
    ----------
    scores
        Long scores frame.
    metric
        Metric compared per experiment.
    models
        Models to compare (default: all, in order of appearance).
    reference
        Compare every other model against this one only; by default every pair ``(a, b)`` with
        ``a`` before ``b`` in ``models``.
    by_category
        Also test within each activity category (rows with ``category`` set), besides overall.
    alpha
        Significance level; ``p <= alpha`` is flagged (the papers use 0.01).

    Returns
    -------
    pandas.DataFrame
        One row per (model_a, model_b, category) with ``n`` (paired experiments), ``mean_a``,
        ``mean_b``, ``diff`` (``mean_b - mean_a``), ``t``, ``p``, ``significant`` and ``better``
        (the model with the better mean, taking :data:`LOWER_IS_BETTER` into account; empty when
        the means are equal). ``category`` is ``"overall"`` for the test over all experiments.
        Tests with fewer than 2 pairs, or identical scores, give ``p = NaN`` and are never
        significant.
    """
    _require(scores, ["model", "experiment", metric], "paired_tests")
    scores = per_experiment(scores)
    models = _models_in_order(scores, models)
    if reference is not None:
        _models_in_order(scores, [reference])
        pairs = [(reference, m) for m in models if m != reference]
    else:
        pairs = [(a, b) for i, a in enumerate(models) for b in models[i + 1 :]]
    lower = metric in LOWER_IS_BETTER
    rows = []
    for a, b in pairs:
        wide, category = _paired(scores, metric, [a, b])
        groups: list[tuple[str, pd.Series]] = [("overall", pd.Series(True, index=wide.index))]
        if by_category and "category" in scores.columns:
            cats = [c for c in CATEGORIES if (category == c).any()]
            groups += [(c, category == c) for c in cats]
        for name, mask in groups:
            x = wide.loc[mask, a].to_numpy(float)
            y = wide.loc[mask, b].to_numpy(float)
            t, p = _ttest_rel(x, y)
            mean_a = float(x.mean()) if len(x) else float("nan")
            mean_b = float(y.mean()) if len(y) else float("nan")
            if mean_a == mean_b or math.isnan(mean_a - mean_b):
                better = ""
            else:
                better = (a if mean_a < mean_b else b) if lower else (a if mean_a > mean_b else b)
            rows.append(
                {
                    "model_a": a,
                    "model_b": b,
                    "category": name,
                    "n": len(x),
                    "mean_a": mean_a,
                    "mean_b": mean_b,
                    "diff": mean_b - mean_a,
                    "t": t,
                    "p": p,
                    "significant": bool(not math.isnan(p) and p <= alpha),
                    "better": better,
                }
            )
    return pd.DataFrame(rows)


def _ttest_rel(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if len(x) < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(x, y)
    return float(res.statistic), float(res.pvalue)


def significance_marks(
    table: pd.DataFrame,
    scores: pd.DataFrame,
    reference: str,
    metric: str = "mse",
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """Which cells of :func:`comparison_table` the papers would print in bold.

    Following Table 1 of the cross-species paper: in each column, the best model is marked when
    its improvement over ``reference`` (e.g. the mouse-only model) is significant
    (paired t-test ``p <= alpha``); models not significantly different from that best one
    (``p > alpha``) and also significantly better than ``reference`` are marked too.

    Parameters
    ----------
    table
        Output of :func:`comparison_table` for ``scores`` and ``metric``.
    scores
        The scores frame the table was built from.
    reference
        Model the improvements are tested against.
    metric
        The table's metric.
    alpha
        Significance level.

    Returns
    -------
    pandas.DataFrame
        Boolean frame shaped like ``table`` (``n`` column always ``False``).
    """
    models = list(table.index)
    tests = paired_tests(scores, metric, models=models, by_category=True, alpha=alpha)
    lower = metric in LOWER_IS_BETTER

    def sig_better(m: str, than: str, column: str) -> bool:
        hit = tests[
            (tests["category"] == column)
            & (
                ((tests["model_a"] == m) & (tests["model_b"] == than))
                | ((tests["model_a"] == than) & (tests["model_b"] == m))
            )
        ]
        return bool(len(hit)) and bool(hit["significant"].iloc[0]) and hit["better"].iloc[0] == m

    def sig_different(m: str, other: str, column: str) -> bool:
        hit = tests[
            (tests["category"] == column)
            & (
                ((tests["model_a"] == m) & (tests["model_b"] == other))
                | ((tests["model_a"] == other) & (tests["model_b"] == m))
            )
        ]
        return bool(len(hit)) and bool(hit["significant"].iloc[0])

    marks = pd.DataFrame(False, index=table.index, columns=table.columns)
    for column in table.columns:
        if column == "n":
            continue
        values = table[column].dropna()
        if values.empty:
            continue
        best = values.idxmin() if lower else values.idxmax()
        if best == reference or not sig_better(best, reference, column):
            continue
        for m in models:
            if m == reference:
                continue
            if m == best or (
                not sig_different(m, best, column) and sig_better(m, reference, column)
            ):
                marks.loc[m, column] = True
    return marks


# ---------------------------------------------------------------------------------------------
# Per-assay improvement over the average activity baseline
# ---------------------------------------------------------------------------------------------


def assay_improvement(
    scores: pd.DataFrame,
    model: str,
    baseline: str = AVERAGE_ACTIVITY,
    metric: str = "mse",
    category: str | None = None,
) -> pd.DataFrame:
    """Per-assay % improvement of ``model`` over ``baseline`` (cross-species Figure 4D).

    For each assay, the metric is averaged over the experiments both models scored, then
    ``improvement = baseline_mean - model_mean`` and
    ``pct_improvement = 100 * improvement / baseline_mean`` (for a higher-is-better metric the sign
    is flipped so that a positive value is always an improvement).

    Parameters
    ----------
    scores
        Long scores frame with ``assay``.
    model
        The model evaluated.
    baseline
        The reference model, by default the average activity.
    metric
        Metric column.
    category
        Only assays of this category (e.g. ``"protein_binding"`` for the zero-shot report).

    Returns
    -------
    pandas.DataFrame
        One row per assay, sorted by ``pct_improvement`` descending, with ``assay``, ``category``
        (when known), ``n`` (paired experiments), ``baseline``, ``model``, ``improvement``,
        ``pct_improvement``.
    """
    _require(scores, ["model", "experiment", "assay", metric], "assay_improvement")
    scores = per_experiment(scores)
    _models_in_order(scores, [model, baseline])
    if category is not None:
        _require(scores, ["category"], "assay_improvement")
        scores = scores[scores["category"] == category]
    wide, _ = _paired(scores, metric, [baseline, model])
    meta = scores.drop_duplicates("experiment").set_index("experiment")
    wide = wide.assign(assay=meta["assay"].reindex(wide.index))
    if "category" in meta.columns:
        wide = wide.assign(category=meta["category"].reindex(wide.index))
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    rows = []
    for assay, group in wide.groupby("assay", sort=True):
        base = float(group[baseline].mean())
        mod = float(group[model].mean())
        imp = sign * (base - mod)
        row = {"assay": assay}
        if "category" in group.columns:
            row["category"] = group["category"].iloc[0]
        row |= {
            "n": len(group),
            "baseline": base,
            "model": mod,
            "improvement": imp,
            "pct_improvement": 100.0 * imp / abs(base) if base != 0 else float("nan"),
        }
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    return out.sort_values("pct_improvement", ascending=False, ignore_index=True)


def improvement_summary(table: pd.DataFrame) -> dict[str, float]:
    """Counts the paper reports about a per-assay improvement table.

    Parameters
    ----------
    table
        Output of :func:`assay_improvement`.

    Returns
    -------
    dict
        ``n_assays``, ``n_improved`` (``pct_improvement > 0``), ``n_ge_50`` (≥ 50 %), ``n_ge_20``
        (≥ 20 %), ``mean_pct`` (mean of the per-assay percentages) and ``mean_improvement`` (mean
        absolute decrease). The paper: 31 assays, 29 improved, 10 ≥ 50 %, 22 ≥ 20 %, mean
        33.7 %, mean decrease 0.035.
    """
    pct = table["pct_improvement"].to_numpy(float) if len(table) else np.zeros(0)
    imp = table["improvement"].to_numpy(float) if len(table) else np.zeros(0)
    return {
        "n_assays": int(len(pct)),
        "n_improved": int((pct > 0).sum()),
        "n_ge_50": int((pct >= 50).sum()),
        "n_ge_20": int((pct >= 20).sum()),
        "mean_pct": float(pct.mean()) if len(pct) else float("nan"),
        "mean_improvement": float(imp.mean()) if len(imp) else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# Biological consistency: protein binding vs DNase peaks
# ---------------------------------------------------------------------------------------------


def _auroc(labels: np.ndarray, score: np.ndarray) -> float:
    """AUROC by the Mann-Whitney U statistic (ties count one half)."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def dnase_consistency(
    protein: np.ndarray,
    dnase: np.ndarray,
    threshold: float = DNASE_PEAK_THRESHOLD,
    signal: Literal["arcsinh", "raw"] = "arcsinh",
) -> dict[str, float]:
    """How well protein-binding signal falls in DNase peaks of the same biosample.

    A bin is a DNase peak when the read-depth normalised DNase signal exceeds ``threshold`` (2 in
    the paper); the protein signal is binarised at the same threshold. Returns the AUROC of the
    protein signal for the peaks, the recall (share of peak bins with protein signal above the
    threshold) and the precision (share of bins with protein signal above the threshold that are
    peaks).

    Parameters
    ----------
    protein
        Imputed (or observed) protein-binding signal, float ``[n_bins]``, 25 bp bins.
    dnase
        Observed DNase signal of the same biosample over the same bins, float ``[n_bins]``.
    threshold
        Peak threshold in raw (read-depth normalised) units.
    signal
        Scale of both arrays: ``"arcsinh"`` (the store's transformed values; the threshold is
        applied as ``arcsinh(threshold)``) or ``"raw"``.

    Returns
    -------
    dict
        ``auroc``, ``recall``, ``precision``, ``n_peaks`` and ``n_called`` (bins above the
        threshold in the DNase / protein signal). AUROC is NaN when all bins share one label;
        recall / precision are NaN when their denominator is zero.

    Raises
    ------
    InputDataError
        When the arrays differ in length or ``signal`` is unknown.
    """
    protein = np.asarray(protein, dtype=np.float64).ravel()
    dnase = np.asarray(dnase, dtype=np.float64).ravel()
    if protein.shape != dnase.shape:
        raise InputDataError(
            f"dnase_consistency: protein and DNase tracks differ in length; expected equal bins, "
            f"got {protein.size} and {dnase.size}. Read both over the same chrom and bin range."
        )
    if signal == "arcsinh":
        cut = float(np.arcsinh(threshold))
    elif signal == "raw":
        cut = float(threshold)
    else:
        raise InputDataError(
            f"dnase_consistency: unknown signal scale; expected 'arcsinh' or 'raw', got "
            f"{signal!r}. Pass the scale of the arrays."
        )
    peaks = dnase > cut
    called = protein > cut
    tp = int((peaks & called).sum())
    n_peaks = int(peaks.sum())
    n_called = int(called.sum())
    return {
        "auroc": _auroc(peaks, protein),
        "recall": tp / n_peaks if n_peaks else float("nan"),
        "precision": tp / n_called if n_called else float("nan"),
        "n_peaks": n_peaks,
        "n_called": n_called,
    }


def dnase_consistency_table(
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    experiments: pd.DataFrame,
    dnase: Mapping[str, np.ndarray],
    threshold: float = DNASE_PEAK_THRESHOLD,
    signal: Literal["arcsinh", "raw"] = "arcsinh",
) -> pd.DataFrame:
    """DNase-peak consistency of every model's protein-binding imputations (Figure 4F-H).

    Parameters
    ----------
    predictions
        ``model -> experiment -> signal [n_bins]``; e.g. imputations of each model and the
        average activity for the held-out protein-binding experiments.
    experiments
        Experiment table with ``experiment``, ``biosample``, ``assay`` and ``category``; rows of
        category ``protein_binding`` are evaluated.
    dnase
        ``biosample -> observed DNase signal [n_bins]`` over the same bins as the predictions.
        Experiments whose biosample has no DNase track are skipped (logged).
    threshold, signal
        As in :func:`dnase_consistency`.

    Returns
    -------
    pandas.DataFrame
        A scores-shaped frame (``model, experiment, biosample, assay, category`` and ``auroc,
        recall, precision, n_peaks, n_called``), so that :func:`paired_tests` compares models.
    """
    _require(
        experiments, ["experiment", "biosample", "assay", "category"], "dnase_consistency_table"
    )
    meta = experiments[experiments["category"] == "protein_binding"].drop_duplicates("experiment")
    rows = []
    skipped: list[str] = []
    for model, tracks in predictions.items():
        for rec in meta.itertuples(index=False):
            if rec.experiment not in tracks:
                continue
            if rec.biosample not in dnase:
                skipped.append(rec.experiment)
                continue
            res = dnase_consistency(
                tracks[rec.experiment], dnase[rec.biosample], threshold=threshold, signal=signal
            )
            rows.append(
                {
                    "model": model,
                    "experiment": rec.experiment,
                    "biosample": rec.biosample,
                    "assay": rec.assay,
                    "category": rec.category,
                    **res,
                }
            )
    if skipped:
        logger.info(
            "DNase consistency: %d experiment(s) skipped, no DNase track in their biosample: %s",
            len(set(skipped)),
            sorted(set(skipped)),
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _fmt_value(v: object, float_format: str) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else format(float(v), float_format)
    return str(v)


def format_table(
    df: pd.DataFrame,
    fmt: Literal["text", "markdown", "csv"] = "text",
    float_format: str = ".3g",
    marks: pd.DataFrame | None = None,
    index: bool = True,
) -> str:
    """Render a table for the terminal, Markdown or CSV.

    Parameters
    ----------
    df
        Any table, e.g. from :func:`comparison_table` or :func:`paired_tests`.
    fmt
        ``"text"`` (aligned columns), ``"markdown"`` (GitHub pipe table) or ``"csv"`` (full
        precision, no marks: for machines).
    float_format
        Format spec for floats in text and Markdown (default 3 significant digits, the papers'
        precision: 0.0824, 0.00217).
    marks
        Boolean frame shaped like ``df`` (e.g. :func:`significance_marks`); marked cells are
        printed bold in Markdown and with a trailing ``*`` in text.
    index
        Include the index as the first column.

    Returns
    -------
    str
        The rendered table, ending with a newline.

    Raises
    ------
    InputDataError
        When ``fmt`` is unknown.
    """
    if fmt == "csv":
        return df.to_csv(index=index, float_format=None, lineterminator="\n")
    if fmt not in ("text", "markdown"):
        raise InputDataError(
            f"format_table: unknown format; expected 'text', 'markdown' or 'csv', got {fmt!r}. "
            "Pick one of those."
        )
    header = ([str(df.index.name or "")] if index else []) + [str(c) for c in df.columns]
    body = []
    for label, (_, row) in zip(df.index, df.iterrows()):
        cells = [str(label)] if index else []
        for col in df.columns:
            text = _fmt_value(row[col], float_format)
            if marks is not None and col in marks.columns and label in marks.index:
                if bool(marks.loc[label, col]) and text:
                    text = f"**{text}**" if fmt == "markdown" else f"{text}*"
            cells.append(text)
        body.append(cells)
    if fmt == "markdown":
        numeric = [False] * (1 if index else 0) + [
            pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
            for c in df.columns
        ]
        lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |"]
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = [False] * (1 if index else 0) + [
        pd.api.types.is_numeric_dtype(df[c]) for c in df.columns
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]
    return "\n".join(out) + "\n"


def render_report(
    scores: pd.DataFrame,
    fmt: Literal["text", "markdown", "csv"] = "text",
    metric: str = "mse",
    reference: str | None = None,
    baseline: str = AVERAGE_ACTIVITY,
    alpha: float = ALPHA,
) -> str:
    """The full comparison report the CLI prints: Table 1, paired tests, per-assay improvement.

    Parameters
    ----------
    scores
        Long scores frame (e.g. from :func:`load_scores`).
    fmt
        Output format of every table (see :func:`format_table`).
    metric
        Metric of the comparison.
    reference
        Model the significance marks of Table 1 refer to (default: the first model that is not
        ``baseline``).
    baseline
        Average activity model name; when present, a per-assay improvement table is added for
        every other model.
    alpha
        Significance level.

    Returns
    -------
    str
        Sections separated by blank lines, each headed by a title line (``#`` comment lines in
        CSV).
    """
    table = comparison_table(scores, metric=metric)
    models = list(table.index)
    if reference is None:
        others = [m for m in models if m != baseline]
        reference = others[0] if others else models[0]
    marks = significance_marks(table, scores, reference, metric=metric, alpha=alpha)

    def title(text: str) -> str:
        if fmt == "markdown":
            return f"### {text}\n\n"
        if fmt == "csv":
            return f"# {text}\n"
        return f"{text}\n\n"

    parts = [
        title(
            f"Mean {metric} per model over {int(table['n'].max()) if len(table) else 0} "
            f"shared experiments (marked: best, significantly better than {reference}, "
            f"p <= {alpha:g})"
        )
        + format_table(table, fmt, marks=marks)
    ]
    if len(models) > 1:
        tests = paired_tests(scores, metric, models=models, by_category=True, alpha=alpha)
        parts.append(title(f"Paired t-tests on {metric}") + format_table(tests, fmt, index=False))
    if baseline in models and "assay" in scores.columns:
        for m in models:
            if m == baseline:
                continue
            imp = assay_improvement(scores, m, baseline=baseline, metric=metric)
            s = improvement_summary(imp)
            parts.append(
                title(
                    f"{m}: % {metric} improvement over {baseline} per assay "
                    f"({s['n_improved']} of {s['n_assays']} improve; >= 50%: {s['n_ge_50']}; "
                    f">= 20%: {s['n_ge_20']}; mean {s['mean_pct']:.1f}%)"
                )
                + format_table(imp, fmt, index=False)
            )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Score tables from MLflow
# ---------------------------------------------------------------------------------------------


def read_scores(data: bytes, name: str) -> pd.DataFrame:
    """Parse a score table artifact (Parquet or CSV bytes).

    Parameters
    ----------
    data
        File contents.
    name
        File name; ``.parquet`` is read with pyarrow, anything else as CSV.

    Returns
    -------
    pandas.DataFrame
    """
    if name.endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data))


def load_scores(tracking_uri: str, run_or_experiment: str) -> pd.DataFrame:
    """Fetch the per-experiment score tables logged to MLflow.

    Parameters
    ----------
    tracking_uri
        MLflow tracking URI (``sqlite:///mlflow.db``, ``http(s)://host``, ...).
    run_or_experiment
        A run id — its score table plus those of all its descendants (fold and chromosome child
        runs) — or an experiment name — the score tables of every run in it.

    Returns
    -------
    pandas.DataFrame
        The concatenated tables with exact duplicate rows removed (a parent may re-log its
        children's rows), plus ``run_id`` and ``run_name`` of the run that logged each row.

    Raises
    ------
    InputDataError
        When nothing matches ``run_or_experiment`` or no score table was logged.
    """
    from epiray import tracking

    return tracking.load_scores(tracking_uri, run_or_experiment)
