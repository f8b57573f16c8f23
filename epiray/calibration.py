"""Calibration against average activity: ``w · model + (1 − w) · AA``.

On a small compendium an unseen (biosample, assay) pair is an extrapolation that the model may
get wrong in level and spread, while the average activity of the assay (AA, METHODS §4: the
mean of the target species' observed tracks of that assay) is a strong, safe prediction
(``benchmarks/RESULTS.md``, "The pilot's dev stand-ins"). ``validation.calibrate`` fits the
weight ``w`` of the model on the whole validation experiments of a run — tracks the model
never trained on, as an imputation target is — by least squares against their AA from the
training tracks, clipped to ``[0, 1]``; imputations are then blended by it. Where the model is
far better than AA the fitted weight comes out near 1 and the blend changes little; an assay
with no observed target-species track (zero-shot) has no AA and keeps the model's imputation.

The sums are additive over bins, so data-parallel workers each add their own bins and all-reduce
(:func:`fit_weight`). Validation cells cannot fit the weight: they are bins of tracks the model
trains on, where it is always better than AA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: Length of :func:`calibration_sums`.
N_SUMS = 6


def average_activity(data: Any, assay: int, validation: bool = True) -> Tensor | None:
    """AA of vocabulary assay ``assay`` on ``data``'s bins: the mean of its target-species
    tracks of that assay (training tracks, and with ``validation`` the validation tracks), float32;
    None when it has none."""
    rows = [data.values[data.assay == assay]]
    if validation and data.val_values is not None:
        rows.append(data.val_values[data.val_assay == assay])
    n = sum(int(r.shape[0]) for r in rows)
    if n == 0:
        return None
    return sum(r.float().sum(0) for r in rows) / n


def calibration_sums(model: Any, data: Any) -> Tensor:
    """Least-squares sums of the blend over ``data``'s validation experiments on its bins.

    With ``d = model − AA`` and ``r = truth − AA`` (AA from the training tracks of the
    track's assay): ``[Σ d·r, Σ d·d, Σ (truth − model)², Σ r², bins, tracks]`` in float64.
    Tracks whose assay has no training track are skipped (no AA to blend with).
    """
    sums = torch.zeros(N_SUMS, dtype=torch.float64)
    if data.val_values is None:
        return sums
    model.eval()
    with torch.no_grad():
        for i in range(int(data.val_values.shape[0])):
            a = int(data.val_assay[i])
            aa = average_activity(data, a, validation=False)
            if aa is None:
                continue
            pred = model.predict(data, int(data.val_biosample[i]), a).float()
            y = data.val_values[i].float()
            d, r = (pred - aa).double(), (y - aa).double()
            sums += torch.stack(
                [
                    (d * r).sum(),
                    (d * d).sum(),
                    ((y - pred).double() ** 2).sum(),
                    (r * r).sum(),
                    torch.tensor(float(y.numel()), dtype=torch.float64),
                    torch.tensor(1.0, dtype=torch.float64),
                ]
            )
    return sums


@dataclass
class Calibration:
    """The fitted blend of one run (kept in its checkpoint meta as ``calibration``).

    Attributes
    ----------
    weight
        ``w`` in ``w · model + (1 − w) · AA``, in ``[0, 1]``.
    tracks
        Validation tracks it was fitted on.
    mse_model, mse_average_activity, mse_blend
        Their MSE (arcsinh scale, all their bins) of the model, of AA and of the blend.
    average_activity
        ``assay -> target-species experiments`` whose mean is the AA blended with at
        imputation (every observed track of the assay the run had: training and validation).
    """

    weight: float
    tracks: int
    mse_model: float
    mse_average_activity: float
    mse_blend: float
    average_activity: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "tracks": self.tracks,
            "mse_model": self.mse_model,
            "mse_average_activity": self.mse_average_activity,
            "mse_blend": self.mse_blend,
            "average_activity": self.average_activity,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Calibration | None:
        if not d:
            return None
        return cls(
            weight=float(d["weight"]),
            tracks=int(d["tracks"]),
            mse_model=float(d["mse_model"]),
            mse_average_activity=float(d["mse_average_activity"]),
            mse_blend=float(d["mse_blend"]),
            average_activity={k: list(v) for k, v in d.get("average_activity", {}).items()},
        )


def fit_weight(sums: Tensor | np.ndarray) -> Calibration | None:
    """The calibration the (all-reduced) :func:`calibration_sums` give; None without a
    validation track that has an AA (nothing to fit on: the model stays alone)."""
    s = [float(x) for x in np.asarray(sums, dtype=np.float64)]
    dr, dd, sse_model, rr, n, tracks = s
    if tracks < 1 or n < 1:
        return None
    w = float(np.clip(dr / dd, 0.0, 1.0)) if dd > 0 else 1.0
    # Σ (r − w d)² = rr − 2 w dr + w² dd: the blend's error from the same sums
    sse_blend = max(rr - 2 * w * dr + w * w * dd, 0.0)
    return Calibration(
        weight=w,
        tracks=int(round(tracks)),
        mse_model=sse_model / n,
        mse_average_activity=rr / n,
        mse_blend=sse_blend / n,
    )


def blend(pred: Tensor | np.ndarray, aa: Tensor | np.ndarray | None, weight: float):
    """``weight · pred + (1 − weight) · aa`` (``pred`` itself where there is no AA or the
    weight is 1)."""
    if aa is None or weight >= 1.0:
        return pred
    return weight * pred + (1.0 - weight) * aa


def mean_track(store: Any, assembly: str, chrom: str, experiments: list[str]) -> np.ndarray:
    """The mean of ``experiments`` over a whole chromosome, float32, read one track at a time
    (a float64 chromosome at most in memory)."""
    acc = None
    for e in experiments:
        t = store.read(assembly, chrom, [e])[0].astype(np.float64)
        acc = t if acc is None else acc + t
    return (acc / len(experiments)).astype(np.float32)


class AverageActivityReader:
    """AA of each assay over a whole chromosome, read from the store once per assay (for
    :class:`epiray.impute.ModelPredictor`).

    Parameters
    ----------
    store, assembly, chrom
        Where the tracks are.
    tracks
        ``assay -> experiments`` (:attr:`Calibration.average_activity`).
    """

    def __init__(self, store: Any, assembly: str, chrom: str, tracks: dict[str, list[str]]):
        self.store, self.assembly, self.chrom, self.tracks = store, assembly, chrom, tracks
        self._cache: dict[str, np.ndarray | None] = {}

    def __call__(self, assay: str) -> np.ndarray | None:
        if assay not in self._cache:
            exps = self.tracks.get(assay) or []
            self._cache[assay] = (
                mean_track(self.store, self.assembly, self.chrom, exps) if exps else None
            )
        return self._cache[assay]
