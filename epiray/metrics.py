"""Metrics of an imputed track against its truth, on 25 bp bins (pure numpy).

Every function takes the truth ``y`` and the imputation ``yhat`` on the arcsinh scale, as numpy
arrays or torch tensors (any device; they are copied to host memory), of shape ``[n]`` (one
track of ``n`` bins) or ``[k, n]`` (``k`` tracks scored independently, same bins). ``float16``
inputs are promoted to ``float32`` before any arithmetic; ``float32`` and ``float64`` are kept;
differences and sums are computed in ``float64``. A ``[n]`` input gives a ``float``, a
``[k, n]`` input a ``float64`` array ``[k]``. Non-finite values are an error. All work is
vectorised over bins (a Python loop runs over the ``k`` tracks, never over bins).

Definitions (``d = y - yhat``; sums over the bins of one track)

==================  =========================================================================
``mse``             ``mean(d**2)``.
``pearson``         Pearson correlation of ``y`` and ``yhat``.
``spearman``        Pearson correlation of the average ranks (ties get the mean of the ranks
                    they span, as ``scipy.stats.rankdata(method="average")``).
``mse1obs``         MSE over the top ``m = ceil(top_fraction * n)`` bins by ``y`` (default
                    ``top_fraction = 0.01``). Exactly ``m`` bins are taken: bins are ordered by
                    value, descending, and ties by bin index, ascending (the earlier bin wins).
                    The ENCODE Imputation Challenge script instead takes every bin ``>=`` the
                    ``int(0.01 n)``-th largest value, which on a sparse track with many tied
                    values can be far more than 1% of the bins; ours is always ``m`` bins.
``mse1imp``         The same, the top ``m`` bins by ``yhat``.
``mse_prom``,       Pooled MSE over the bins of a boolean mask (``sum(d**2 * mask) /
``mse_gene``,       sum(mask)``), masks keyed ``"prom"``, ``"gene"``, ``"enh"``. A bin counts once
``mse_enh``         even when several genes cover it (the challenge script sums per gene, so it
                    counts overlapping genes' bins repeatedly); see :mod:`epiray.annotations`.
``mse_var``         ``sum(w * d**2) / sum(w)`` with ``w`` the per-bin variance of the same assay
                    across cell types (``var_weights``; :func:`assay_variance` computes it with
                    ``ddof=0`` like the challenge's ``numpy.std(...)**2``). This is the
                    challenge's ``msevar``: the squared error weighted by the variance normalised
                    to sum to 1. Which cell types enter the variance is the caller's choice (the
                    challenge used every truth track of the assay, the target included).
``auroc``           Area under the ROC curve of ``yhat`` as a score for *peak bins* (below);
                    ties in ``yhat`` count one half, exactly as ``sklearn.metrics.roc_auc_score``.
``auprc``           Average precision of ``yhat`` for peak bins, with the step-wise definition
                    of ``sklearn.metrics.average_precision_score`` (one threshold per distinct
                    value of ``yhat``; no interpolation).
``peak_precision``  ``|P & Q| / |Q|`` and ``|P & Q| / |P|`` where ``P`` are the peak bins of
``peak_recall``     ``y`` and ``Q`` those of ``yhat`` under the same rule (below).
==================  =========================================================================

Peak rule. By default (``peak_threshold=None``) the peak bins of a track are the bins strictly
above the track's own ``peak_quantile`` quantile (default 0.99, numpy's default linear
interpolation: ``y > numpy.quantile(y, 0.99)``), as eDICE defines peaks; ``yhat`` is binarised by
the same rule on its own values (``yhat > numpy.quantile(yhat, 0.99)``), so the two sets have
about the same size. With an absolute ``peak_threshold`` (e.g. ``numpy.arcsinh(2)`` for a
DNase track's "read-depth normalised signal above 2" of the cross-species Avocado paper), peaks
are ``y > peak_threshold`` and ``yhat > peak_threshold`` -- the *same threshold value*, as that
paper binarises the imputed signal.

Undefined values are ``NaN``, never an exception and never a warning:

* ``pearson``/``spearman`` when ``y`` or ``yhat`` is constant (all bins equal) or ``n < 2``;
* ``auroc`` when the truth has no peak bin or no non-peak bin; ``auprc`` when it has no peak
  bin (with every bin a peak it is 1.0, like scikit-learn);
* ``peak_precision`` when ``yhat`` has no peak bin; ``peak_recall`` when ``y`` has none;
* ``mse_prom``/``mse_gene``/``mse_enh`` when the mask is not given or selects no bin;
  ``mse_var`` when no weights are given or they sum to 0;
* everything when the track has no bin (after exclusion).

A constant track therefore scores ``pearson = spearman = NaN`` (a correlation with a constant is
undefined; reporting 0 would bias averages over experiments) and, under the quantile rule, has no
peak bin (nothing is strictly above its quantile): ``auroc = auprc = peak_recall = NaN``. Average
such values with ``numpy.nanmean`` and report how many were undefined.

:func:`score_track` computes the whole set for one chromosome (or any bin range) at once;
:class:`TrackScorer` accumulates chromosome by chromosome and gives genome-wide values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import numpy as np

from epiray.errors import ConfigError, InputDataError

__all__ = [
    "METRIC_NAMES",
    "REGION_KEYS",
    "EXCLUDE_KEY",
    "TrackScorer",
    "assay_variance",
    "auprc",
    "auroc",
    "average_ranks",
    "mse",
    "mse1imp",
    "mse1obs",
    "mse_region",
    "mse_var",
    "peak_labels",
    "peak_precision_recall",
    "pearson",
    "score_track",
    "spearman",
    "top_mask",
]

#: Keys of the dict returned by :func:`score_track` and :meth:`TrackScorer.result`, in order.
METRIC_NAMES: tuple[str, ...] = (
    "mse",
    "pearson",
    "spearman",
    "mse1obs",
    "mse1imp",
    "mse_prom",
    "mse_gene",
    "mse_enh",
    "mse_var",
    "auroc",
    "auprc",
    "peak_precision",
    "peak_recall",
)

#: Region mask key -> metric name.
REGION_KEYS: dict[str, str] = {"prom": "mse_prom", "gene": "mse_gene", "enh": "mse_enh"}

#: Mask key whose bins are removed from every metric (the challenge scores without blacklisted
#: bins).
EXCLUDE_KEY = "blacklist"

TOP_FRACTION = 0.01
PEAK_QUANTILE = 0.99

_CHUNK = 1 << 20  # bins per chunk of the moment statistics

_RANK_METRICS = (
    "spearman",
    "mse1obs",
    "mse1imp",
    "auroc",
    "auprc",
    "peak_precision",
    "peak_recall",
)


# --------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any, where: str) -> np.ndarray:
    """Return ``x`` as a numpy array (torch tensors are detached and copied to host)."""
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise InputDataError(
            f"{where}: values have dtype {a.dtype}; expected a real numeric array "
            "(float16/float32/float64). Convert the track to floats."
        )
    return a


def _work_dtype(a: np.ndarray) -> np.ndarray:
    """Promote float16 to float32 and integers/bools to float64; keep float32/float64."""
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if a.dtype.kind in "iub":
        return a.astype(np.float64)
    return a


def _as_tracks(y: Any, yhat: Any, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate a pair of tracks; return them as 2-D working arrays and whether batched."""
    ya = _to_numpy(y, f"{where}: y")
    ha = _to_numpy(yhat, f"{where}: yhat")
    if ya.shape != ha.shape:
        raise InputDataError(
            f"{where}: y and yhat differ in shape; expected equal shapes [n] or [k, n], got "
            f"{ya.shape} and {ha.shape}. Score the same bins of the same tracks."
        )
    if ya.ndim not in (1, 2):
        raise InputDataError(
            f"{where}: tracks have {ya.ndim} dimensions; expected [n] or [k, n], got shape "
            f"{ya.shape}. Reshape to one row per track."
        )
    batched = ya.ndim == 2
    ya = _work_dtype(np.atleast_2d(ya))
    ha = _work_dtype(np.atleast_2d(ha))
    if ya.dtype != ha.dtype:
        dt = np.promote_types(ya.dtype, ha.dtype)
        ya, ha = ya.astype(dt, copy=False), ha.astype(dt, copy=False)
    for name, a in (("y", ya), ("yhat", ha)):
        finite = np.isfinite(a)
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            at = f"track {row}, bin {col}" if batched else f"bin {col}"
            raise InputDataError(
                f"{where}: {name} has {int((~finite).sum())} non-finite value(s), first at {at} "
                f"({a[row, col]}); expected finite values. Fill or mask missing bins before "
                "scoring."
            )
    return ya, ha, batched


def _as_mask(m: Any, shape: tuple[int, int], where: str, *, shared_only: bool = False):
    """Validate a boolean mask of shape [n] (shared by all rows) or [k, n]; return 2-D."""
    a = _to_numpy(m, where)
    if a.dtype != np.bool_:
        raise InputDataError(
            f"{where}: mask has dtype {a.dtype}; expected bool (one flag per bin). "
            "Convert with `mask.astype(bool)`."
        )
    k, n = shape
    ok = a.shape == (n,) or (not shared_only and a.shape == (k, n))
    if not ok:
        expected = f"({n},)" if shared_only else f"({n},) or ({k}, {n})"
        raise InputDataError(
            f"{where}: mask has shape {a.shape}; expected {expected}, one flag per bin of the "
            "track. Pass the mask of the same chromosome and bin_size."
        )
    return a.reshape(1, n) if a.ndim == 1 else a


def _as_weights(w: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    a = _to_numpy(w, where)
    k, n = shape
    if a.shape not in ((n,), (k, n)):
        raise InputDataError(
            f"{where}: var_weights has shape {a.shape}; expected ({n},) or ({k}, {n}), one "
            "weight per bin. Pass the per-bin variance of the same chromosome."
        )
    a = _work_dtype(a).reshape(-1, n)
    bad = ~np.isfinite(a) | (a < 0)
    if bad.any():
        col = int(np.argwhere(bad)[0][1])
        raise InputDataError(
            f"{where}: var_weights has {int(bad.sum())} negative or non-finite value(s), first "
            f"at bin {col}; expected finite weights >= 0. Recompute with assay_variance()."
        )
    return a


def _check_options(top_fraction: float, peak_quantile: float, peak_threshold: float | None):
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(
            f"metrics: top_fraction is {top_fraction}; expected 0 < top_fraction <= 1 "
            "(0.01 = top 1% of bins)."
        )
    if not 0.0 <= peak_quantile < 1.0:
        raise ConfigError(
            f"metrics: peak_quantile is {peak_quantile}; expected 0 <= peak_quantile < 1 "
            "(0.99 = bins above the 99th percentile are peaks)."
        )
    if peak_threshold is not None and not math.isfinite(peak_threshold):
        raise ConfigError(
            f"metrics: peak_threshold is {peak_threshold}; expected a finite value on the "
            "track's scale or None for the quantile rule."
        )


def _out(a: np.ndarray, batched: bool) -> float | np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a if batched else float(a[0])


# --------------------------------------------------------------------------------------------
# moment statistics: exact, mergeable (used by score_track and TrackScorer)


@dataclass
class _Moments:
    """Sufficient statistics of k tracks, mergeable across chromosomes (Chan et al.)."""

    n: np.ndarray  # [k] bins
    mean_y: np.ndarray
    mean_h: np.ndarray
    m2_y: np.ndarray  # sum of squared deviations
    m2_h: np.ndarray
    c_yh: np.ndarray  # sum of co-deviations
    sse: np.ndarray
    min_y: np.ndarray
    max_y: np.ndarray
    min_h: np.ndarray
    max_h: np.ndarray
    region_sse: dict[str, np.ndarray] = field(default_factory=dict)
    region_n: dict[str, np.ndarray] = field(default_factory=dict)
    wsse: np.ndarray | None = None
    wsum: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        Y: np.ndarray,
        H: np.ndarray,
        regions: Mapping[str, np.ndarray],
        weights: np.ndarray | None,
    ) -> _Moments:
        k, n = Y.shape
        if n > _CHUNK:  # bound the float64 temporaries: chunks merged exactly (Chan et al.)
            mom = None
            for lo in range(0, n, _CHUNK):
                sl = slice(lo, lo + _CHUNK)
                part = cls.of(
                    Y[:, sl],
                    H[:, sl],
                    {key: m[:, sl] for key, m in regions.items()},
                    None if weights is None else weights[:, sl],
                )
                mom = part if mom is None else mom.merge(part)
            return mom
        f8 = np.float64
        d2 = np.subtract(Y, H, dtype=np.float64)
        np.multiply(d2, d2, out=d2)
        if n == 0:
            zero = np.zeros(k)
            inf = np.full(k, np.inf)
            mom = cls(zero, zero, zero, zero, zero, zero, zero, inf, -inf, inf, -inf)
        else:
            mean_y = Y.mean(axis=1, dtype=f8)
            mean_h = H.mean(axis=1, dtype=f8)
            yc = Y - mean_y[:, None]
            hc = H - mean_h[:, None]
            mom = cls(
                n=np.full(k, float(n)),
                mean_y=mean_y,
                mean_h=mean_h,
                m2_y=np.einsum("ij,ij->i", yc, yc),
                m2_h=np.einsum("ij,ij->i", hc, hc),
                c_yh=np.einsum("ij,ij->i", yc, hc),
                sse=d2.sum(axis=1, dtype=f8),
                min_y=Y.min(axis=1).astype(f8),
                max_y=Y.max(axis=1).astype(f8),
                min_h=H.min(axis=1).astype(f8),
                max_h=H.max(axis=1).astype(f8),
            )
        for key, m in regions.items():
            mom.region_sse[key] = np.where(m, d2, 0).sum(axis=1, dtype=f8)
            mom.region_n[key] = np.broadcast_to(m.sum(axis=1, dtype=f8), (k,)).copy()
        if weights is not None:
            mom.wsse = (d2 * weights).sum(axis=1, dtype=f8)
            mom.wsum = np.broadcast_to(weights.sum(axis=1, dtype=f8), (k,)).copy()
        return mom

    def merge(self, o: _Moments) -> _Moments:
        n = self.n + o.n
        safe = np.where(n > 0, n, 1.0)
        dy = o.mean_y - self.mean_y
        dh = o.mean_h - self.mean_h
        f = self.n * o.n / safe
        out = _Moments(
            n=n,
            mean_y=self.mean_y + dy * o.n / safe,
            mean_h=self.mean_h + dh * o.n / safe,
            m2_y=self.m2_y + o.m2_y + dy * dy * f,
            m2_h=self.m2_h + o.m2_h + dh * dh * f,
            c_yh=self.c_yh + o.c_yh + dy * dh * f,
            sse=self.sse + o.sse,
            min_y=np.minimum(self.min_y, o.min_y),
            max_y=np.maximum(self.max_y, o.max_y),
            min_h=np.minimum(self.min_h, o.min_h),
            max_h=np.maximum(self.max_h, o.max_h),
        )
        for key in self.region_sse:
            out.region_sse[key] = self.region_sse[key] + o.region_sse[key]
            out.region_n[key] = self.region_n[key] + o.region_n[key]
        if self.wsse is not None and o.wsse is not None:
            out.wsse = self.wsse + o.wsse
            out.wsum = self.wsum + o.wsum
        return out

    def finish(self) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            res = {"mse": np.where(self.n > 0, self.sse / self.n, np.nan)}
            constant = (self.min_y == self.max_y) | (self.min_h == self.max_h) | (self.n < 2)
            r = self.c_yh / np.sqrt(self.m2_y * self.m2_h)
            res["pearson"] = np.where(constant, np.nan, np.clip(r, -1.0, 1.0))
            k = self.n.shape[0]
            for key, name in REGION_KEYS.items():
                if key in self.region_sse:
                    cnt = self.region_n[key]
                    res[name] = np.where(cnt > 0, self.region_sse[key] / cnt, np.nan)
                else:
                    res[name] = np.full(k, np.nan)
            if self.wsse is not None:
                res["mse_var"] = np.where(self.wsum > 0, self.wsse / self.wsum, np.nan)
            else:
                res["mse_var"] = np.full(k, np.nan)
        return res


# --------------------------------------------------------------------------------------------
# rank-based metrics (need the whole track sorted)


def _sort_row(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable ascending sort of one track: (order int64 [n], sorted values [n]).

    float32 tracks are sorted as packed uint64 keys ``(order-preserving bits of the value) << 32
    | bin index`` with ``numpy.sort`` (SIMD-accelerated on x86), 3-5x faster than a stable
    argsort; ties come out by bin index, as a stable sort's would.
    """
    n = x.shape[0]
    if x.dtype == np.float32 and n < 2**32:
        u = np.ascontiguousarray(x).view(np.uint32)
        sign = np.uint32(0x80000000)
        key = np.where(u >= sign, ~u, u | sign).astype(np.uint64)
        key <<= np.uint64(32)
        key |= np.arange(n, dtype=np.uint64)
        key.sort()
        order = (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
        hi = (key >> np.uint64(32)).astype(np.uint32)
        values = np.where(hi >= sign, hi ^ sign, ~hi).view(np.float32)
        return order, values
    order = np.argsort(x, kind="stable")
    return order, x[order]


def _ranks_row(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based, float64) in bin order, from a sort of the track."""
    n = values.shape[0]
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(values[1:], values[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    counts = np.diff(starts, append=n)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) * 0.5, counts)
    return ranks


def _top_count(n: int, fraction: float) -> int:
    # Fraction(repr(.)) reads 0.01 as exactly 1/100, so 0.01 * 300 is 3, not 3.0000000000000004
    return min(n, math.ceil(Fraction(repr(float(fraction))) * n))


def _top_row(order: np.ndarray, values: np.ndarray, fraction: float) -> np.ndarray:
    """Bin indices of the top ceil(fraction n) bins: value descending, ties by lower index."""
    n = values.shape[0]
    m = _top_count(n, fraction)
    v = values[n - m]  # the m-th largest value
    a = int(np.searchsorted(values, v, "left"))
    b = int(np.searchsorted(values, v, "right"))
    need = m - (n - b)  # bins equal to v still to take; the stable sort lists them by index
    return np.concatenate([order[a : a + need], order[b:]])


def _threshold(values: np.ndarray, quantile: float, threshold: float | None):
    if threshold is not None:
        return np.float64(threshold)  # compare in float64: the threshold as given
    return np.quantile(values, quantile)  # same multiset as the track: same quantile


def _labels(X: np.ndarray, quantile: float, threshold: float | None) -> np.ndarray:
    if threshold is not None:
        return X > np.float64(threshold)
    if X.shape[1] == 0:
        return np.zeros(X.shape, dtype=bool)
    return X > np.quantile(X, quantile, axis=1, keepdims=True)


def _spearman_row(oy: np.ndarray, sy: np.ndarray, oh: np.ndarray, sh: np.ndarray) -> float:
    """Pearson of average ranks (their mean is (n + 1) / 2, ties or not); NaN if constant."""
    if sy[0] == sy[-1] or sh[0] == sh[-1]:
        return math.nan
    mid = (sy.shape[0] + 1) * 0.5
    ry = _ranks_row(oy, sy)
    ry -= mid
    rh = _ranks_row(oh, sh)
    rh -= mid
    rho = float(np.dot(ry, rh)) / math.sqrt(float(np.dot(ry, ry)) * float(np.dot(rh, rh)))
    return min(1.0, max(-1.0, rho))


def _rank_metrics_row(
    y: np.ndarray,
    h: np.ndarray,
    top_fraction: float,
    peak_quantile: float,
    peak_threshold: float | None,
) -> dict[str, float]:
    n = y.shape[0]
    res: dict[str, float] = {}
    oy, sy = _sort_row(y)
    oh, sh = _sort_row(h)

    res["spearman"] = _spearman_row(oy, sy, oh, sh)

    # top 1% by truth / by imputation
    for name, order, values in (("mse1obs", oy, sy), ("mse1imp", oh, sh)):
        top = _top_row(order, values, top_fraction)
        d = np.subtract(y[top], h[top], dtype=np.float64)
        res[name] = float(np.dot(d, d) / top.shape[0])

    # peaks of the truth, yhat as their score; only the positives' values are needed
    pos = y > _threshold(sy, peak_quantile, peak_threshold)
    score = h[pos]
    n_pos = score.shape[0]
    if n_pos == 0:
        res["auroc"] = res["auprc"] = math.nan
    else:
        # a positive whose value fills sorted positions [a, e) has the average rank (a+e+1)/2
        a = np.searchsorted(sh, score, "left")
        e = np.searchsorted(sh, score, "right")
        rank_sum = float(np.sum(a + e + 1, dtype=np.float64)) * 0.5
        n_neg = n - n_pos
        res["auroc"] = (
            (rank_sum - n_pos * (n_pos + 1) * 0.5) / (n_pos * n_neg) if n_neg else math.nan
        )
        # average precision: a positive is counted at the threshold yhat >= its value, where
        # precision = (positives >= value) / (bins >= value) = (n_pos - below) / (n - a)
        below = np.searchsorted(np.sort(score), score, "left")
        res["auprc"] = float(np.mean((n_pos - below) / (n - a)))
    pred = h > _threshold(sh, peak_quantile, peak_threshold)
    n_pred = int(np.count_nonzero(pred))
    hit = int(np.count_nonzero(pred & pos))
    res["peak_precision"] = hit / n_pred if n_pred else math.nan
    res["peak_recall"] = hit / n_pos if n_pos else math.nan
    return res


def _rank_metrics(
    Y: np.ndarray,
    H: np.ndarray,
    *,
    top_fraction: float,
    peak_quantile: float,
    peak_threshold: float | None,
) -> dict[str, np.ndarray]:
    k, n = Y.shape
    if n == 0:
        return {name: np.full(k, np.nan) for name in _RANK_METRICS}
    rows = [
        _rank_metrics_row(Y[i], H[i], top_fraction, peak_quantile, peak_threshold)
        for i in range(k)  # one track at a time; everything within a track is vectorised
    ]
    return {name: np.array([r[name] for r in rows], dtype=np.float64) for name in _RANK_METRICS}


# --------------------------------------------------------------------------------------------
# public single metrics


def mse(y: Any, yhat: Any) -> float | np.ndarray:
    """Mean squared error.

    Parameters
    ----------
    y, yhat
        Truth and imputation, ``[n]`` or ``[k, n]``, float (arcsinh scale).

    Returns
    -------
    float or numpy.ndarray
        ``mean((y - yhat)**2)``; ``[k]`` float64 for batched input; NaN when ``n == 0``.
    """
    Y, H, b = _as_tracks(y, yhat, "mse")
    return _out(_Moments.of(Y, H, {}, None).finish()["mse"], b)


def pearson(y: Any, yhat: Any) -> float | np.ndarray:
    """Pearson correlation; NaN when either track is constant or has fewer than 2 bins.

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.

    Returns
    -------
    float or numpy.ndarray
        In ``[-1, 1]``; ``[k]`` for batched input.
    """
    Y, H, b = _as_tracks(y, yhat, "pearson")
    return _out(_Moments.of(Y, H, {}, None).finish()["pearson"], b)


def average_ranks(x: Any) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given the mean of the ranks they span.

    Parameters
    ----------
    x
        ``[n]`` or ``[k, n]`` float.

    Returns
    -------
    numpy.ndarray
        float64, same shape as ``x``; equal to ``scipy.stats.rankdata(x, axis=-1)``.
    """
    X, _, b = _as_tracks(x, x, "average_ranks")
    r = np.empty(X.shape, dtype=np.float64)
    for i in range(X.shape[0]):
        if X.shape[1]:
            r[i] = _ranks_row(*_sort_row(X[i]))
    return r if b else r[0]


def spearman(y: Any, yhat: Any) -> float | np.ndarray:
    """Spearman correlation (Pearson of average ranks); NaN when either track is constant.

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.

    Returns
    -------
    float or numpy.ndarray
        Equal to ``scipy.stats.spearmanr(y, yhat).statistic`` where that is defined.
    """
    Y, H, b = _as_tracks(y, yhat, "spearman")
    out = np.full(Y.shape[0], np.nan)
    for i in range(Y.shape[0] if Y.shape[1] else 0):
        out[i] = _spearman_row(*_sort_row(Y[i]), *_sort_row(H[i]))
    return _out(out, b)


def top_mask(x: Any, fraction: float = TOP_FRACTION) -> np.ndarray:
    """The top ``ceil(fraction * n)`` bins of a track by value.

    Parameters
    ----------
    x
        ``[n]`` or ``[k, n]`` float.
    fraction
        In ``(0, 1]``. ``fraction * n`` is evaluated exactly in decimal (``0.01 * 300`` is 3).

    Returns
    -------
    numpy.ndarray
        bool, same shape as ``x``, exactly ``ceil(fraction * n)`` True per row: bins ordered by
        value descending, ties by bin index ascending (the earlier bin is taken first).
    """
    _check_options(fraction, PEAK_QUANTILE, None)
    X, _, b = _as_tracks(x, x, "top_mask")
    sel = np.zeros(X.shape, dtype=bool)
    for i in range(X.shape[0]):
        if X.shape[1]:
            sel[i, _top_row(*_sort_row(X[i]), fraction)] = True
    return sel if b else sel[0]


def _top_mse(y: Any, yhat: Any, fraction: float, by: str) -> float | np.ndarray:
    _check_options(fraction, PEAK_QUANTILE, None)
    Y, H, b = _as_tracks(y, yhat, f"mse1{by}")
    if Y.shape[1] == 0:
        return _out(np.full(Y.shape[0], np.nan), b)
    X = Y if by == "obs" else H
    out = np.empty(X.shape[0])
    for i in range(X.shape[0]):
        top = _top_row(*_sort_row(X[i]), fraction)
        out[i] = np.mean(np.square(np.subtract(Y[i, top], H[i, top], dtype=np.float64)))
    return _out(out, b)


def mse1obs(y: Any, yhat: Any, fraction: float = TOP_FRACTION) -> float | np.ndarray:
    """MSE over the top ``ceil(fraction * n)`` bins of the truth (see :func:`top_mask`).

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.
    fraction
        Share of bins, default 0.01.

    Returns
    -------
    float or numpy.ndarray
        NaN when ``n == 0``.
    """
    return _top_mse(y, yhat, fraction, "obs")


def mse1imp(y: Any, yhat: Any, fraction: float = TOP_FRACTION) -> float | np.ndarray:
    """MSE over the top ``ceil(fraction * n)`` bins of the imputation (see :func:`top_mask`).

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.
    fraction
        Share of bins, default 0.01.

    Returns
    -------
    float or numpy.ndarray
        NaN when ``n == 0``.
    """
    return _top_mse(y, yhat, fraction, "imp")


def mse_region(y: Any, yhat: Any, mask: Any) -> float | np.ndarray:
    """Pooled MSE over the bins of a region mask (promoters, gene bodies, enhancers, ...).

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.
    mask
        bool ``[n]`` (shared) or ``[k, n]``; see :mod:`epiray.annotations`.

    Returns
    -------
    float or numpy.ndarray
        ``sum((y - yhat)**2 * mask) / sum(mask)``; NaN when the mask selects no bin.
    """
    Y, H, b = _as_tracks(y, yhat, "mse_region")
    m = _as_mask(mask, Y.shape, "mse_region: mask")
    return _out(_Moments.of(Y, H, {"prom": m}, None).finish()["mse_prom"], b)


def mse_var(y: Any, yhat: Any, var_weights: Any) -> float | np.ndarray:
    """Squared error weighted by the per-bin variance of the assay across cell types.

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.
    var_weights
        ``[n]`` or ``[k, n]`` float, ``>= 0``: e.g. :func:`assay_variance` of the assay's
        truth tracks.

    Returns
    -------
    float or numpy.ndarray
        ``sum(w * (y - yhat)**2) / sum(w)``; NaN when ``sum(w) == 0``.
    """
    Y, H, b = _as_tracks(y, yhat, "mse_var")
    w = _as_weights(var_weights, Y.shape, "mse_var")
    return _out(_Moments.of(Y, H, {}, w).finish()["mse_var"], b)


def assay_variance(tracks: Any) -> np.ndarray:
    """Per-bin variance across the tracks of one assay (population variance, ``ddof=0``).

    Parameters
    ----------
    tracks
        ``[c, n]`` float: one row per cell type (arcsinh scale), e.g. every truth track of the
        assay.

    Returns
    -------
    numpy.ndarray
        ``[n]`` float64, the weights of :func:`mse_var`.

    Raises
    ------
    InputDataError
        When ``tracks`` is not 2-D or holds no track.
    """
    a = _work_dtype(_to_numpy(tracks, "assay_variance"))
    if a.ndim != 2 or a.shape[0] == 0:
        raise InputDataError(
            f"assay_variance: tracks have shape {a.shape}; expected [c, n] with c >= 1 cell "
            "types. Stack one row per cell type."
        )
    return a.var(axis=0, dtype=np.float64)


def peak_labels(
    y: Any, peak_quantile: float = PEAK_QUANTILE, peak_threshold: float | None = None
) -> np.ndarray:
    """Peak bins of a track: above its ``peak_quantile`` quantile, or above ``peak_threshold``.

    Parameters
    ----------
    y
        ``[n]`` or ``[k, n]`` float.
    peak_quantile
        Used when ``peak_threshold`` is None: ``y > numpy.quantile(y, peak_quantile)`` per row.
    peak_threshold
        Absolute threshold on the track's scale (arcsinh for arcsinh tracks).

    Returns
    -------
    numpy.ndarray
        bool, same shape as ``y``.
    """
    _check_options(TOP_FRACTION, peak_quantile, peak_threshold)
    Y, _, b = _as_tracks(y, y, "peak_labels")
    lab = _labels(Y, peak_quantile, peak_threshold)
    return lab if b else lab[0]


def _peak_metric(y, yhat, q, t, name, where):
    _check_options(TOP_FRACTION, q, t)
    Y, H, b = _as_tracks(y, yhat, where)
    r = _rank_metrics(Y, H, top_fraction=TOP_FRACTION, peak_quantile=q, peak_threshold=t)
    return tuple(_out(r[k], b) for k in name)


def auroc(
    y: Any, yhat: Any, peak_quantile: float = PEAK_QUANTILE, peak_threshold: float | None = None
) -> float | np.ndarray:
    """AUROC of ``yhat`` for the peak bins of ``y`` (see :func:`peak_labels`).

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.
    peak_quantile, peak_threshold
        The peak rule.

    Returns
    -------
    float or numpy.ndarray
        Equal to ``sklearn.metrics.roc_auc_score(peak_labels(y), yhat)``; NaN when the truth
        has no peak bin or only peak bins.
    """
    return _peak_metric(y, yhat, peak_quantile, peak_threshold, ("auroc",), "auroc")[0]


def auprc(
    y: Any, yhat: Any, peak_quantile: float = PEAK_QUANTILE, peak_threshold: float | None = None
) -> float | np.ndarray:
    """Average precision of ``yhat`` for the peak bins of ``y`` (see :func:`peak_labels`).

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.
    peak_quantile, peak_threshold
        The peak rule.

    Returns
    -------
    float or numpy.ndarray
        Equal to ``sklearn.metrics.average_precision_score(peak_labels(y), yhat)``; NaN when
        the truth has no peak bin.
    """
    return _peak_metric(y, yhat, peak_quantile, peak_threshold, ("auprc",), "auprc")[0]


def peak_precision_recall(
    y: Any, yhat: Any, peak_quantile: float = PEAK_QUANTILE, peak_threshold: float | None = None
) -> tuple[float | np.ndarray, float | np.ndarray]:
    """Precision and recall of the peak bins of ``yhat`` against those of ``y``.

    Both tracks are binarised by the same rule (their own quantile, or the same absolute
    threshold); see the module docstring.

    Parameters
    ----------
    y, yhat
        ``[n]`` or ``[k, n]`` float.
    peak_quantile, peak_threshold
        The peak rule.

    Returns
    -------
    tuple
        ``(precision, recall)``; precision NaN when ``yhat`` has no peak bin, recall NaN when
        ``y`` has none.
    """
    return _peak_metric(
        y,
        yhat,
        peak_quantile,
        peak_threshold,
        ("peak_precision", "peak_recall"),
        "peak_precision_recall",
    )


# --------------------------------------------------------------------------------------------
# the full set


def _split_masks(
    masks: Mapping[str, Any] | None, shape: tuple[int, int], where: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if masks is None:
        return {}, None
    unknown = sorted(set(masks) - set(REGION_KEYS) - {EXCLUDE_KEY})
    if unknown:
        raise ConfigError(
            f"{where}: unknown mask key(s) {unknown}; expected keys among "
            f"{sorted(REGION_KEYS) + [EXCLUDE_KEY]}. Rename the masks (e.g. from "
            "epiray.annotations.region_masks)."
        )
    regions = {
        key: _as_mask(masks[key], shape, f"{where}: masks[{key!r}]")
        for key in REGION_KEYS
        if masks.get(key) is not None
    }
    exclude = None
    if masks.get(EXCLUDE_KEY) is not None:
        exclude = _as_mask(
            masks[EXCLUDE_KEY], shape, f"{where}: masks[{EXCLUDE_KEY!r}]", shared_only=True
        )[0]
    return regions, exclude


def _prepare(y, yhat, masks, var_weights, where):
    Y, H, b = _as_tracks(y, yhat, where)
    regions, exclude = _split_masks(masks, Y.shape, where)
    w = None if var_weights is None else _as_weights(var_weights, Y.shape, where)
    if exclude is not None and exclude.any():
        keep = ~exclude
        Y, H = Y[:, keep], H[:, keep]
        regions = {key: m[:, keep] for key, m in regions.items()}
        if w is not None:
            w = w[:, keep]
    return Y, H, regions, w, b


def score_track(
    y: Any,
    yhat: Any,
    *,
    masks: Mapping[str, Any] | None = None,
    var_weights: Any = None,
    top_fraction: float = TOP_FRACTION,
    peak_quantile: float = PEAK_QUANTILE,
    peak_threshold: float | None = None,
) -> dict[str, Any]:
    """Every metric of :data:`METRIC_NAMES` for one track (or ``k`` tracks) at once.

    Parameters
    ----------
    y, yhat
        Truth and imputation on the same bins, ``[n]`` or ``[k, n]``, float16/32/64 or torch
        tensors, arcsinh scale.
    masks
        Optional bool masks ``[n]`` (or ``[k, n]``) keyed ``"prom"``, ``"gene"``, ``"enh"``
        (region MSEs) and ``"blacklist"`` (``[n]``; those bins are removed from *every* metric
        first). ``epiray.annotations.region_masks(...)[chrom]`` has this shape.
    var_weights
        Optional ``[n]`` or ``[k, n]`` per-bin weights for ``mse_var``
        (:func:`assay_variance`).
    top_fraction
        Share of bins of ``mse1obs``/``mse1imp``.
    peak_quantile, peak_threshold
        The peak rule of ``auroc``, ``auprc``, ``peak_precision``, ``peak_recall``.

    Returns
    -------
    dict
        ``{name: value}`` for every name of :data:`METRIC_NAMES`, in that order: ``float`` for
        ``[n]`` input, float64 ``[k]`` arrays for ``[k, n]``. Undefined or not computed (no
        mask, no weights) is NaN.

    Raises
    ------
    InputDataError
        Shapes differ, values are non-finite, a mask is not bool or has the wrong length,
        weights are negative.
    ConfigError
        An unknown mask key or an option out of range.
    """
    _check_options(top_fraction, peak_quantile, peak_threshold)
    Y, H, regions, w, b = _prepare(y, yhat, masks, var_weights, "score_track")
    res = _Moments.of(Y, H, regions, w).finish()
    res.update(
        _rank_metrics(
            Y,
            H,
            top_fraction=top_fraction,
            peak_quantile=peak_quantile,
            peak_threshold=peak_threshold,
        )
    )
    return {name: _out(res[name], b) for name in METRIC_NAMES}


class TrackScorer:
    """Genome-wide metrics of a track, accumulated chromosome by chromosome.

    ``mse``, ``pearson``, the region MSEs and ``mse_var`` come from mergeable sufficient
    statistics (counts, means, centred second moments combined with the pairwise update of
    Chan et al.; sums in float64) and equal :func:`score_track` on the concatenated chromosomes
    up to float64 rounding, whatever ``keep`` is.

    The rank metrics (``spearman``, ``mse1obs``, ``mse1imp``, ``auroc``, ``auprc``,
    ``peak_precision``, ``peak_recall``) need global ranks and quantiles, so the scorer keeps a
    copy of each chromosome's values (after exclusion), according to ``keep``:

    * ``"exact"`` (default): copies in the input dtype (float16 stays float16). ``result()``
      equals :func:`score_track` on the concatenation exactly (same bins, same order, same
      code). Memory: 2 x itemsize per bin while accumulating and about 80 bytes per bin at
      the peak of ``result()`` (two sorts and two rank arrays; measured with tracemalloc on
      2.5 M float32 bins); a whole human genome (1.24e8 bins) needs about 10 GB then.
      :func:`score_track` peaks at the same 80 bytes per bin.
    * ``"float16"``: float16 copies (half the memory of float32 inputs). Rank metrics are then
      computed on the float16-rounded values -- an approximation (ties become more frequent);
      the tests bound the difference to exact on a realistic track (< 0.01 for correlations
      and AUCs).
    * ``"none"``: no copies; the rank metrics are NaN.

    Parameters
    ----------
    keep
        See above.
    top_fraction, peak_quantile, peak_threshold
        As :func:`score_track` (the quantile is the genome-wide quantile).

    Examples
    --------
    >>> scorer = TrackScorer()
    >>> for chrom in chroms:                                   # doctest: +SKIP
    ...     scorer.add(y[chrom], yhat[chrom], masks=masks[chrom], chrom=chrom)
    >>> scorer.result()["mse"]                                 # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        keep: Literal["exact", "float16", "none"] = "exact",
        top_fraction: float = TOP_FRACTION,
        peak_quantile: float = PEAK_QUANTILE,
        peak_threshold: float | None = None,
    ) -> None:
        if keep not in ("exact", "float16", "none"):
            raise ConfigError(
                f"TrackScorer: keep is {keep!r}; expected 'exact', 'float16' or 'none'."
            )
        _check_options(top_fraction, peak_quantile, peak_threshold)
        self.keep = keep
        self.top_fraction = top_fraction
        self.peak_quantile = peak_quantile
        self.peak_threshold = peak_threshold
        self._moments: _Moments | None = None
        self._batched: bool | None = None
        self._signature: tuple[frozenset[str], bool] | None = None
        self._y: list[np.ndarray] = []
        self._h: list[np.ndarray] = []
        self.chroms: list[str] = []

    @property
    def n_bins(self) -> int:
        """Bins accumulated so far (after exclusion)."""
        return 0 if self._moments is None else int(self._moments.n[0])

    def add(
        self,
        y: Any,
        yhat: Any,
        *,
        masks: Mapping[str, Any] | None = None,
        var_weights: Any = None,
        chrom: str | None = None,
    ) -> None:
        """Accumulate one chromosome (or any bin range not added before).

        Parameters
        ----------
        y, yhat
            ``[n]`` or ``[k, n]`` as :func:`score_track`; every call has the same ``k``.
        masks, var_weights
            As :func:`score_track`. Every call must give the same region keys and either
            always or never ``var_weights`` (a region MSE over only some chromosomes would be
            silently partial).
        chrom
            Name used in error messages and recorded in :attr:`chroms`.

        Raises
        ------
        InputDataError
            As :func:`score_track`, or a call inconsistent with the earlier ones.
        """
        where = f"TrackScorer.add(chrom={chrom!r})" if chrom else "TrackScorer.add"
        Y, H, regions, w, b = _prepare(y, yhat, masks, var_weights, where)
        sig = (frozenset(regions), w is not None)
        if self._moments is not None:
            problems = []
            if b != self._batched or Y.shape[0] != self._moments.n.shape[0]:
                problems.append(f"{Y.shape[0]} track(s) (batched={b})")
            if sig != self._signature:
                problems.append(f"region masks {sorted(sig[0])}, var_weights given: {sig[1]}")
            if problems:
                before = (
                    f"{self._moments.n.shape[0]} track(s) (batched={self._batched}), region "
                    f"masks {sorted(self._signature[0])}, var_weights given: "
                    f"{self._signature[1]}"
                )
                raise InputDataError(
                    f"{where}: inconsistent with the chromosomes added before "
                    f"({', '.join(self.chroms) or 'unnamed'}); expected {before}, got "
                    f"{'; '.join(problems)}. Give every chromosome the same tracks, masks and "
                    "weights."
                )
        mom = _Moments.of(Y, H, regions, w)
        self._moments = mom if self._moments is None else self._moments.merge(mom)
        self._batched, self._signature = b, sig
        if self.keep != "none":
            ya, ha = _to_numpy(y, where), _to_numpy(yhat, where)
            if masks is not None and masks.get(EXCLUDE_KEY) is not None:
                keep = ~_to_numpy(masks[EXCLUDE_KEY], where).astype(bool)
                ya, ha = ya[..., keep], ha[..., keep]
            dt = np.float16 if self.keep == "float16" else None
            self._y.append(np.array(np.atleast_2d(ya), dtype=dt, copy=True))
            self._h.append(np.array(np.atleast_2d(ha), dtype=dt, copy=True))
        if chrom is not None:
            self.chroms.append(chrom)

    def merge(self, other: TrackScorer) -> TrackScorer:
        """Combine with a scorer of other chromosomes (e.g. from another Ray worker).

        Parameters
        ----------
        other
            A scorer built with the same options, masks and weights.

        Returns
        -------
        TrackScorer
            A new scorer; bins of ``self`` come before those of ``other``.
        """
        opts = ("keep", "top_fraction", "peak_quantile", "peak_threshold")
        if any(getattr(self, o) != getattr(other, o) for o in opts):
            raise ConfigError(
                "TrackScorer.merge: options differ; expected equal "
                f"{opts}, got {[getattr(self, o) for o in opts]} and "
                f"{[getattr(other, o) for o in opts]}. Build both scorers alike."
            )
        out = TrackScorer(
            keep=self.keep,
            top_fraction=self.top_fraction,
            peak_quantile=self.peak_quantile,
            peak_threshold=self.peak_threshold,
        )
        for src in (self, other):
            if src._moments is None:
                continue
            if out._moments is not None and (
                src._signature != out._signature or src._batched != out._batched
            ):
                raise InputDataError(
                    f"TrackScorer.merge: scorers of {self.chroms} and {other.chroms} differ; "
                    f"expected the same tracks, masks and weights, got {out._signature} and "
                    f"{src._signature}. Give every chromosome the same masks and weights."
                )
            out._moments = (
                src._moments if out._moments is None else out._moments.merge(src._moments)
            )
            out._batched, out._signature = src._batched, src._signature
            out._y += src._y
            out._h += src._h
            out.chroms += src.chroms
        return out

    def result(self) -> dict[str, Any]:
        """Genome-wide metrics over everything added.

        Returns
        -------
        dict
            As :func:`score_track`: every name of :data:`METRIC_NAMES`; rank metrics NaN with
            ``keep="none"``; every metric NaN when nothing was added.
        """
        if self._moments is None:
            return {name: float("nan") for name in METRIC_NAMES}
        res = self._moments.finish()
        k = self._moments.n.shape[0]
        if self.keep == "none":
            res.update({name: np.full(k, np.nan) for name in _RANK_METRICS})
        else:
            Y = _work_dtype(np.concatenate(self._y, axis=1))
            H = _work_dtype(np.concatenate(self._h, axis=1))
            if Y.dtype != H.dtype:
                dt = np.promote_types(Y.dtype, H.dtype)
                Y, H = Y.astype(dt, copy=False), H.astype(dt, copy=False)
            res.update(
                _rank_metrics(
                    Y,
                    H,
                    top_fraction=self.top_fraction,
                    peak_quantile=self.peak_quantile,
                    peak_threshold=self.peak_threshold,
                )
            )
        return {name: _out(res[name], bool(self._batched)) for name in METRIC_NAMES}
