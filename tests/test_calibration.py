"""The blend with average activity fitted on whole validation experiments
(:mod:`epiray.calibration`, ``validation.calibrate``)."""

import numpy as np
import pytest
import torch

from epiray.calibration import (
    AverageActivityReader,
    Calibration,
    average_activity,
    blend,
    calibration_sums,
    fit_weight,
)
from epiray.errors import EpirayError
from epiray.models import chrom_data_from_numpy


class _Fixed:
    """A model whose prediction of (biosample, assay) is a fixed track."""

    def __init__(self, preds: dict[tuple[int, int], np.ndarray], lo: int = 0):
        self.preds, self.lo = preds, lo

    def eval(self):
        return self

    def predict(self, data, b, a):
        p = self.preds[b, a][data.lo - self.lo : data.hi - self.lo]
        return torch.from_numpy(p.astype(np.float32))


def _compendium(w_true: float, n: int = 4000, noise: float = 0.05, seed: int = 0):
    """Two training tracks of assay 0 (biosamples 0, 1), one of assay 1 (biosample 0); the
    validation tracks (biosample 2, assays 0 and 1) are ``AA + w_true · (model − AA)`` plus
    noise; a third validation track of assay 2 has no training track (zero-shot)."""
    rng = np.random.default_rng(seed)
    train = rng.gamma(2.0, 0.5, size=(3, n))
    aa = {0: train[:2].mean(0), 1: train[2]}
    preds = {(2, a): aa[a] + rng.normal(0, 1, n) for a in (0, 1)}
    preds[2, 2] = rng.normal(0, 1, n)
    val = np.stack(
        [aa[a] + w_true * (preds[2, a] - aa[a]) + rng.normal(0, noise, n) for a in (0, 1)]
        + [rng.normal(0, 1, n)]
    )

    def data(lo=0, hi=n):
        return chrom_data_from_numpy(
            train[:, lo:hi],
            [0, 1, 0],
            [0, 0, 1],
            lo=lo,
            hi=hi,
            n_bins=n,
            device="cpu",
            val_values=val[:, lo:hi],
            val_biosample=[2, 2, 2],
            val_assay=[0, 1, 2],
        )

    return data, _Fixed(preds), train, val, preds, aa


@pytest.mark.parametrize("w_true", [0.0, 0.3, 0.8, 1.0])
def test_fit_weight_recovers_the_blend(w_true):
    data, model, _, val, preds, aa = _compendium(w_true)
    cal = fit_weight(calibration_sums(model, data()))
    assert cal.weight == pytest.approx(w_true, abs=0.02)
    assert cal.tracks == 2  # the zero-shot track (no training track of assay 2) is skipped
    # the reported MSEs are those of the two tracks, computed directly
    y = val[:2]
    p = np.stack([preds[2, 0], preds[2, 1]])
    a = np.stack([aa[0], aa[1]])
    assert cal.mse_model == pytest.approx(np.mean((y - p) ** 2), rel=1e-6)
    assert cal.mse_average_activity == pytest.approx(np.mean((y - a) ** 2), rel=1e-6)
    b = cal.weight * p + (1 - cal.weight) * a
    assert cal.mse_blend == pytest.approx(np.mean((y - b) ** 2), rel=1e-6)
    assert cal.mse_blend <= min(cal.mse_model, cal.mse_average_activity) + 1e-9


def test_weight_is_clipped_to_the_unit_interval():
    # truth on the other side of AA from the model: least squares says < 0, clipped to 0
    data, model, *_ = _compendium(-0.7)
    assert fit_weight(calibration_sums(model, data())).weight == 0.0
    # the truth further from AA than the model: > 1, clipped to 1 (the model alone)
    data, model, *_ = _compendium(1.6)
    assert fit_weight(calibration_sums(model, data())).weight == 1.0


def test_sums_add_over_workers_bins():
    """Data-parallel workers each sum their own bins; the all-reduced sums fit the same
    weight as one worker holding the chromosome."""
    data, model, *_ = _compendium(0.4, n=3000)
    whole = calibration_sums(model, data())
    halves = calibration_sums(model, data(0, 1200)) + calibration_sums(model, data(1200, 3000))
    assert torch.allclose(whole[:5], halves[:5], rtol=1e-9)
    assert halves[5] == 2 * whole[5]  # every worker counts every track (train divides)
    assert fit_weight(halves).weight == pytest.approx(fit_weight(whole).weight, abs=1e-9)


def test_nothing_to_fit_without_validation_tracks_with_average_activity():
    n = 100
    data = chrom_data_from_numpy(np.ones((1, n)), [0], [0], device="cpu")
    assert fit_weight(calibration_sums(_Fixed({}), data)) is None  # no validation tracks
    zero_shot = chrom_data_from_numpy(
        np.ones((1, n)),
        [0],
        [0],
        device="cpu",
        val_values=np.zeros((1, n)),
        val_biosample=[1],
        val_assay=[1],
    )
    model = _Fixed({(1, 1): np.zeros(n)})
    assert fit_weight(calibration_sums(model, zero_shot)) is None


def test_average_activity_and_blend():
    data, _, train, val, *_ = _compendium(0.5, n=50)
    d = data()
    np.testing.assert_allclose(average_activity(d, 0, validation=False), train[:2].mean(0))
    # with validation tracks: every observed track of the assay
    np.testing.assert_allclose(
        average_activity(d, 0), np.stack([train[0], train[1], val[0]]).mean(0), rtol=1e-6
    )
    assert average_activity(d, 7) is None
    p, a = np.full(3, 2.0), np.zeros(3)
    np.testing.assert_allclose(blend(p, a, 0.25), 0.5)
    assert blend(p, None, 0.25) is p and blend(p, a, 1.0) is p


def test_calibration_round_trips_through_meta():
    cal = Calibration(0.4, 5, 0.2, 0.3, 0.15, {"H3K4me3": ["mm.a", "mm.b"]})
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert Calibration.from_dict(None) is None


class _Store:
    def __init__(self, tracks):
        self.tracks, self.reads = tracks, 0

    def read(self, assembly, chrom, exps):
        self.reads += 1
        return np.stack([self.tracks[e] for e in exps])


def test_average_activity_reader_reads_once_per_assay():
    store = _Store({"a": np.array([1.0, 2.0]), "b": np.array([3.0, 6.0])})
    reader = AverageActivityReader(store, "mm10", "chr1", {"K4": ["a", "b"], "K27": []})
    np.testing.assert_allclose(reader("K4"), [2.0, 4.0])
    reader("K4")
    assert store.reads == 2  # two tracks, read once
    assert reader("K27") is None and reader("K9") is None


def test_model_predictor_blends_by_the_calibration():
    from epiray.impute import ModelPredictor
    from epiray.models import Vocabulary

    n = 400
    vocab = Vocabulary(
        biosamples=("B0", "B1"), assays=("K4", "K27"), experiments={}, chrom="chr", n_bins=n
    )

    class M(torch.nn.Module):
        name = "fixed"

        def __init__(self):
            super().__init__()
            self.vocab = vocab

        def predict(self, data, b, a):
            return torch.full((data.hi - data.lo,), 2.0)

    shards = [
        (M(), chrom_data_from_numpy(np.zeros((1, 200)), [0], [0], lo=lo, hi=lo + 200, n_bins=n))
        for lo in (0, 200)
    ]
    aa = {"K4": np.ones(n, np.float32), "K27": None}
    cal = Calibration(0.25, 1, 0.0, 0.0, 0.0, {})
    pred = ModelPredictor(shards, calibration=cal, average_activity=aa.get)
    out = pred.predict_chrom("chr", [("B1", "K4"), ("B1", "K27")], 0, n)
    np.testing.assert_allclose(out[0], 0.25 * 2.0 + 0.75 * 1.0)
    np.testing.assert_allclose(out[1], 2.0)  # no AA of the assay: the model alone
    assert out.dtype == np.float32
    with pytest.raises(EpirayError, match="calibration without average_activity"):
        ModelPredictor(shards, calibration=cal)
