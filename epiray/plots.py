"""Figures like the papers': track views, per-experiment scatter, per-assay bars, factor maps.

Every function builds a :class:`matplotlib.figure.Figure` directly (no ``pyplot``, so no global
figure registry and no GUI backend: safe in Ray workers and threads) and returns it; render it
with :func:`figure_to_png` (PNG bytes, e.g. for MLflow) or :func:`save_png` (atomic file write).
Tracks are arcsinh-transformed 25 bp bins; genomic axes are in bases (0-based).
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from epiray.errors import InputDataError

logger = logging.getLogger(__name__)

#: Colours of the cross-species paper's figures: experimental signal blue, average activity
#: orange, then one colour per model.
SIGNAL_COLOR = "tab:blue"
AVERAGE_ACTIVITY_COLOR = "tab:orange"
MODEL_COLORS = ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
CATEGORY_COLORS = {
    "histone_modification": "tab:blue",
    "protein_binding": "tab:green",
    "transcription": "tab:red",
    "accessibility": "tab:orange",
    "other": "tab:gray",
}


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes with the Agg canvas.

    Parameters
    ----------
    fig
        The figure.
    dpi
        Resolution.

    Returns
    -------
    bytes
        A PNG file (starts with ``b"\\x89PNG\\r\\n\\x1a\\n"``).
    """
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a figure as PNG atomically (temporary name, then rename).

    Parameters
    ----------
    fig
        The figure.
    path
        Destination ``.png``; parent folders are created.
    dpi
        Resolution.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(figure_to_png(fig, dpi=dpi))
    os.replace(tmp, path)
    return path


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _track(values: np.ndarray, name: str, n: int | None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if n is not None and arr.size != n:
        raise InputDataError(
            f"plot_tracks: track {name!r} has the wrong length; expected {n} bins (the "
            f"experimental signal), got {arr.size}. Pass every track over the same bin range."
        )
    return arr


def peak_window(y: np.ndarray, width: int = 2000, lead: int = 800, step: int = 400) -> slice:
    """The ``width``-bin window of a track view: it starts ``lead`` bins before the strongest
    bin of ``y`` (rounded down to a multiple of ``step``), clipped to the track."""
    start = max(int(np.argmax(y)) // step * step - lead, 0)
    return slice(start, min(start + width, len(y)))


def plot_tracks(
    signal: np.ndarray,
    imputations: Mapping[str, np.ndarray],
    average_activity: np.ndarray | None = None,
    chrom: str | None = None,
    start: int = 0,
    bin_size: int = 25,
    title: str | None = None,
) -> Figure:
    """Experimental signal, average activity and each model's imputation over one locus.

    As the cross-species paper's Figures 1, 3A/B and 4A/B: one panel per track, stacked, on the
    same y scale; each panel's legend names the track and gives its MSE against the
    experimental signal over the displayed window.

    Parameters
    ----------
    signal
        Experimental signal, float ``[n]`` (arcsinh, 25 bp bins).
    imputations
        ``model name -> imputed signal [n]`` over the same bins.
    average_activity
        Average activity of the assay over the same bins (optional).
    chrom
        Chromosome name for the x label.
    start
        Bin index of the first bin; the x axis shows bases ``start * bin_size`` onwards.
    bin_size
        Bin width in bases.
    title
        Figure title, e.g. ``"H3K27ac in MEL"``.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InputDataError
        When a track's length differs from the signal's.
    """
    y = _track(signal, "signal", None)
    n = y.size
    tracks: list[tuple[str, np.ndarray, str]] = [("experimental", y, SIGNAL_COLOR)]
    if average_activity is not None:
        tracks.append(
            (
                "average activity",
                _track(average_activity, "average activity", n),
                AVERAGE_ACTIVITY_COLOR,
            )
        )
    for i, (name, values) in enumerate(imputations.items()):
        tracks.append((name, _track(values, name, n), MODEL_COLORS[i % len(MODEL_COLORS)]))

    x = (int(start) + np.arange(n)) * int(bin_size)
    fig = _new_figure(10.0, 1.3 * len(tracks) + 0.6)
    axes = fig.subplots(len(tracks), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, (name, values, color) in zip(axes, tracks):
        ax.fill_between(x, 0, values, step="post", color=color, alpha=0.8, linewidth=0)
        if name == "experimental":
            label = name
        else:
            label = f"{name}  MSE {float(np.mean((values - y) ** 2)):.4g}"
        ax.plot([], [], color=color, linewidth=6, label=label)
        ax.legend(loc="upper left", frameon=False, fontsize="small", handlelength=1.0)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_ylabel("arcsinh", fontsize="x-small")
    top = max(float(np.nanmax(v)) for _, v, _ in tracks) if n else 1.0
    axes[0].set_ylim(min(0.0, min(float(np.nanmin(v)) for _, v, _ in tracks)), top * 1.3 or 1.0)
    axes[-1].set_xlim(x[0] if n else 0, (x[-1] + bin_size) if n else bin_size)
    axes[-1].set_xlabel(f"{chrom or 'position'} (bp)")
    if title:
        fig.suptitle(title)
    return fig


def plot_metric_scatter(
    scores: pd.DataFrame,
    model_x: str,
    model_y: str,
    metric: str = "mse",
    log: bool = True,
) -> Figure:
    """Per-experiment ``metric`` of one model against another, with the diagonal and win counts.

    Parameters
    ----------
    scores
        Long scores frame (``model``, ``experiment``, ``metric``, optionally ``category`` for the
        colours); per-chromosome rows are combined as in :func:`epiray.evaluate.per_experiment`.
    model_x, model_y
        The two models; only experiments both scored are drawn.
    metric
        Metric column; for MSE-type metrics lower is better.
    log
        Log-scale axes (when every value is positive).

    Returns
    -------
    matplotlib.figure.Figure
        The title counts in how many experiments each model is better.
    """
    from epiray.evaluate import LOWER_IS_BETTER, _paired, _require, per_experiment

    _require(scores, ["model", "experiment", metric], "plot_metric_scatter")
    scores = per_experiment(scores)
    wide, category = _paired(scores, metric, [model_x, model_y])
    xs = wide[model_x].to_numpy(float)
    ys = wide[model_y].to_numpy(float)
    lower = metric in LOWER_IS_BETTER
    y_wins = int((ys < xs).sum() if lower else (ys > xs).sum())
    x_wins = int((xs < ys).sum() if lower else (xs > ys).sum())

    fig = _new_figure(5.5, 5.0)
    ax = fig.subplots()
    cats = category.fillna("other").to_numpy(str)
    for cat in dict.fromkeys(cats):
        sel = cats == cat
        ax.scatter(
            xs[sel],
            ys[sel],
            s=12,
            alpha=0.7,
            color=CATEGORY_COLORS.get(cat, "tab:gray"),
            label=f"{cat.replace('_', ' ')} ({int(sel.sum())})",
        )
    both = np.concatenate([xs, ys]) if len(xs) else np.array([1.0])
    use_log = log and bool(np.all(both > 0))
    lo, hi = float(both.min()), float(both.max())
    if use_log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        lo, hi = lo / 1.2, hi * 1.2
    else:
        pad = 0.05 * (hi - lo or 1.0)
        lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle="--")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"{model_x} {metric}")
    ax.set_ylabel(f"{model_y} {metric}")
    ax.set_title(
        f"{model_y} better in {y_wins}, {model_x} better in {x_wins} of {len(xs)} experiments",
        fontsize="medium",
    )
    ax.legend(fontsize="small", frameon=False)
    return fig


def plot_assay_improvement(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Per-assay % improvement over the average activity (cross-species Figure 4D).

    Parameters
    ----------
    table
        Output of :func:`epiray.evaluate.assay_improvement` (``assay``, ``pct_improvement``,
        ``improvement``).
    title
        Figure title; the counts of :func:`epiray.evaluate.improvement_summary` are appended.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from epiray.evaluate import _require, improvement_summary

    _require(table, ["assay", "pct_improvement", "improvement"], "plot_assay_improvement")
    table = table.sort_values("pct_improvement", ascending=False)
    pct = table["pct_improvement"].to_numpy(float)
    summary = improvement_summary(table)
    fig = _new_figure(max(4.0, 0.28 * len(pct) + 1.5), 4.0)
    ax = fig.subplots()
    colors = np.where(pct > 0, "tab:green", "tab:red")
    ax.bar(np.arange(len(pct)), pct, color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    for level in (20.0, 50.0):
        ax.axhline(level, color="gray", linewidth=0.5, linestyle=":")
    ax.set_xticks(np.arange(len(pct)), table["assay"].astype(str).tolist(), rotation=90)
    ax.set_ylabel("% MSE improvement over average activity")
    ax.spines[["top", "right"]].set_visible(False)
    counts = (
        f"{summary['n_improved']} of {summary['n_assays']} improve, "
        f"{summary['n_ge_50']} by >= 50%, {summary['n_ge_20']} by >= 20%, "
        f"mean {summary['mean_pct']:.1f}%"
    )
    ax.set_title(f"{title}\n{counts}" if title else counts, fontsize="medium")
    return fig


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components (numpy SVD).

    Parameters
    ----------
    x
        Float ``[n, d]``, e.g. learned biosample factors (``d = 32``) or assay factors
        (``d = 256``).

    Returns
    -------
    coords : numpy.ndarray
        Float ``[n, 2]``: the centred rows times the first two right singular vectors. Each
        component's sign is fixed so that its largest-magnitude loading is positive
        (deterministic, as scikit-learn's ``svd_flip``). Missing components (``n`` or ``d`` below
        2) are zeros.
    explained : numpy.ndarray
        Float ``[2]``: share of the total variance explained by each component.

    Raises
    ------
    InputDataError
        When ``x`` is not 2-D.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise InputDataError(
            f"pca_2d: factors must be a 2-D array [n, d]; expected 2 dimensions, got shape "
            f"{x.shape}. Pass one row per biosample or assay."
        )
    centred = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    flip = np.sign(vt[np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
    flip[flip == 0] = 1.0
    vt = vt[:k] * flip[:, None]
    coords = np.zeros((x.shape[0], 2))
    coords[:, :k] = centred @ vt.T
    total = float((s**2).sum())
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return coords, explained


def _embedding_panel(
    ax, factors: np.ndarray, labels: Sequence[str], groups: Sequence[str] | None, title: str
) -> None:
    labels = [str(v) for v in labels]
    if len(labels) != np.asarray(factors).shape[0]:
        raise InputDataError(
            f"plot_embedding: {title}: labels do not match the factor rows; expected "
            f"{np.asarray(factors).shape[0]} labels, got {len(labels)}. Pass one label per row."
        )
    coords, explained = pca_2d(factors)
    if groups is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=18, color="tab:blue")
    else:
        groups = [str(g) for g in groups]
        palette = list(MODEL_COLORS) + ["tab:blue", "tab:orange", "tab:gray", "tab:cyan"]
        for i, g in enumerate(dict.fromkeys(groups)):
            sel = np.array([h == g for h in groups])
            color = CATEGORY_COLORS.get(g, palette[i % len(palette)])
            ax.scatter(coords[sel, 0], coords[sel, 1], s=18, color=color, label=g)
        ax.legend(fontsize="x-small", frameon=False)
    for (px, py), label in zip(coords, labels):
        ax.annotate(label, (px, py), fontsize="x-small", xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}%)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}%)")
    ax.set_title(title, fontsize="medium")


def plot_embedding(
    factors: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[str] | None = None,
    title: str = "factors",
) -> Figure:
    """2-D PCA map of learned factors or embeddings, one labelled point per row.

    Parameters
    ----------
    factors
        Float ``[n, d]`` (e.g. ``model.biosample_factors.weight``).
    labels
        ``n`` names (biosamples or assays).
    groups
        Optional ``n`` group names for the colours (e.g. species, or the assays' categories).
    title
        Panel title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _new_figure(6.0, 5.0)
    _embedding_panel(fig.subplots(), factors, labels, groups, title)
    return fig


def plot_factors(
    biosample_factors: np.ndarray,
    biosamples: Sequence[str],
    assay_factors: np.ndarray,
    assays: Sequence[str],
    biosample_groups: Sequence[str] | None = None,
    assay_groups: Sequence[str] | None = None,
) -> Figure:
    """Biosample and assay factors side by side, each projected on its first two PCs.

    Parameters
    ----------
    biosample_factors
        Float ``[n_biosamples, d_b]``.
    biosamples
        Biosample names.
    assay_factors
        Float ``[n_assays, d_a]``.
    assays
        Assay names.
    biosample_groups, assay_groups
        Optional colour groups (e.g. species; activity category).

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig = _new_figure(12.0, 5.0)
    left, right = fig.subplots(1, 2)
    _embedding_panel(left, biosample_factors, biosamples, biosample_groups, "biosamples")
    _embedding_panel(right, assay_factors, assays, assay_groups, "assays")
    return fig
