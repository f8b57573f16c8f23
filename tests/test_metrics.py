"""Metrics against independent computations (scipy, scikit-learn, plain numpy)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, rankdata, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from epiray import metrics as M
from epiray.errors import ConfigError, InputDataError


def _track(n: int, seed: int, decimals: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """A sparse, peaky arcsinh-like truth and a noisy imputation; rounding makes ties."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.3, 1.0, n) * (rng.random(n) < 0.6)
    y = np.arcsinh(base * 5)
    yhat = np.clip(y * 0.7 + rng.normal(0, 0.3, n), 0, None)
    if decimals is not None:
        y, yhat = np.round(y, decimals), np.round(yhat, decimals)
    return y.astype(np.float32), yhat.astype(np.float32)


def _top_ref(x: np.ndarray, fraction: float) -> np.ndarray:
    """Top ceil(fraction n) bins: value descending, then bin index ascending (plain numpy)."""
    n = x.shape[0]
    m = math.ceil(round(fraction * n, 9))
    order = np.lexsort((np.arange(n), -x.astype(np.float64)))
    sel = np.zeros(n, dtype=bool)
    sel[order[:m]] = True
    return sel


@pytest.fixture(scope="module")
def pair():
    return _track(20_000, 0)


def test_mse_and_pearson_match_numpy_and_scipy(pair):
    y, h = pair
    d = y.astype(np.float64) - h
    assert M.mse(y, h) == pytest.approx(np.mean(d**2), rel=1e-12)
    assert M.pearson(y, h) == pytest.approx(pearsonr(y.astype(float), h).statistic, rel=1e-10)


def test_spearman_and_ranks_match_scipy_with_ties(pair):
    y, h = pair
    assert len(np.unique(y)) < len(y) // 10  # heavily tied
    np.testing.assert_array_equal(M.average_ranks(y), rankdata(y))
    assert M.spearman(y, h) == pytest.approx(spearmanr(y, h).statistic, rel=1e-10)
    # negatives, signed zeros, subnormals: the packed float32 sort keeps IEEE order
    x = np.array([-0.0, 0.0, -1.5, 2.0, -0.0, -3e-38, 1e-45, -1e-45, 3e38, -3e38, 2.0])
    for dt in (np.float32, np.float64):
        np.testing.assert_array_equal(M.average_ranks(x.astype(dt)), rankdata(x.astype(dt)))


def test_auroc_auprc_match_sklearn_with_ties(pair):
    y, h = pair
    lab = y > np.quantile(y, 0.99)
    assert 0 < lab.sum() < len(y)
    np.testing.assert_array_equal(M.peak_labels(y), lab)
    assert M.auroc(y, h) == pytest.approx(roc_auc_score(lab, h), rel=1e-12)
    assert M.auprc(y, h) == pytest.approx(average_precision_score(lab, h), rel=1e-12)
    # an absolute threshold: arcsinh(2), the cross-species paper's DNase peak rule
    t = float(np.arcsinh(2.0))
    lab_t = y.astype(np.float64) > t
    assert M.auroc(y, h, peak_threshold=t) == pytest.approx(roc_auc_score(lab_t, h), rel=1e-12)
    assert M.auprc(y, h, peak_threshold=t) == pytest.approx(
        average_precision_score(lab_t, h), rel=1e-12
    )


def test_auprc_small_hand_case():
    # yhat desc: 0.9(P) 0.8(N) 0.8(P) 0.1(N); thresholds 0.9 -> P=1,R=1/2; 0.8 -> P=2/3,R=1
    y = np.array([1.0, 0.0, 1.0, 0.0])
    h = np.array([0.9, 0.8, 0.8, 0.1])
    assert M.auprc(y, h, peak_threshold=0.5) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # pairs (P, N): (0.9, 0.8) win, (0.9, 0.1) win, (0.8, 0.8) tie, (0.8, 0.1) win
    assert M.auroc(y, h, peak_threshold=0.5) == pytest.approx(3.5 / 4)


def test_peak_precision_recall_same_rule(pair):
    y, h = pair
    p = y > np.quantile(y, 0.99)
    q = h > np.quantile(h, 0.99)
    prec, rec = M.peak_precision_recall(y, h)
    assert prec == pytest.approx((p & q).sum() / q.sum())
    assert rec == pytest.approx((p & q).sum() / p.sum())
    t = 1.0
    p, q = y > t, h > t
    prec, rec = M.peak_precision_recall(y, h, peak_threshold=t)
    assert prec == pytest.approx((p & q).sum() / q.sum())
    assert rec == pytest.approx((p & q).sum() / p.sum())


def test_top_one_percent_size_and_tie_rule(pair):
    y, h = pair
    d2 = (y.astype(np.float64) - h) ** 2
    for x, fn in ((y, M.mse1obs), (h, M.mse1imp)):
        ref = _top_ref(x, 0.01)
        assert ref.sum() == math.ceil(0.01 * len(x))
        np.testing.assert_array_equal(M.top_mask(x), ref)
        assert fn(y, h) == pytest.approx(d2[ref].mean(), rel=1e-12)
    # n = 300: 0.01 * 300 is 3 bins, not ceil(3.0000000000000004) = 4
    assert M.top_mask(np.arange(300.0)).sum() == 3
    # ties at the cut: the earlier bins win
    x = np.array([5.0, 1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(np.flatnonzero(M.top_mask(x, 0.3)), [0, 2, 3])
    np.testing.assert_array_equal(np.flatnonzero(M.top_mask(x, 0.01)), [0])


def test_region_and_variance_weighted_mse(pair):
    y, h = pair
    rng = np.random.default_rng(1)
    d2 = (y.astype(np.float64) - h) ** 2
    mask = rng.random(len(y)) < 0.1
    assert M.mse_region(y, h, mask) == pytest.approx(d2[mask].mean(), rel=1e-12)
    others = np.stack([_track(len(y), s)[0] for s in range(2, 7)] + [y])
    var = M.assay_variance(others)
    np.testing.assert_allclose(var, np.std(others.astype(np.float64), axis=0) ** 2, rtol=1e-10)
    # the challenge's msevar: squared error . variance / variance.sum()
    assert M.mse_var(y, h, var) == pytest.approx(d2.dot(var) / var.sum(), rel=1e-10)


def test_score_track_full_set_and_batched(pair):
    y, h = pair
    rng = np.random.default_rng(2)
    n = len(y)
    masks = {k: rng.random(n) < 0.2 for k in ("prom", "gene", "enh")}
    w = rng.random(n)
    res = M.score_track(y, h, masks=masks, var_weights=w)
    assert list(res) == list(M.METRIC_NAMES)
    assert all(isinstance(v, float) and np.isfinite(v) for v in res.values())
    d2 = (y.astype(np.float64) - h) ** 2
    for key, name in M.REGION_KEYS.items():
        assert res[name] == pytest.approx(d2[masks[key]].mean(), rel=1e-12)
    assert res["spearman"] == pytest.approx(spearmanr(y, h).statistic, rel=1e-10)
    # batched: k tracks scored independently, shared masks
    y2, h2 = _track(n, 9)
    Y, H = np.stack([y, y2]), np.stack([h, h2])
    batch = M.score_track(Y, H, masks=masks, var_weights=w)
    second = M.score_track(y2, h2, masks=masks, var_weights=w)
    for name in M.METRIC_NAMES:
        assert batch[name].shape == (2,)
        assert batch[name][0] == pytest.approx(res[name], rel=1e-12)
        assert batch[name][1] == pytest.approx(second[name], rel=1e-12)


def test_float16_and_torch_inputs_match_float32(pair):
    torch = pytest.importorskip("torch")
    y, h = pair
    y16, h16 = y.astype(np.float16), h.astype(np.float16)
    ref = M.score_track(y16.astype(np.float32), h16.astype(np.float32))
    got = M.score_track(y16, h16)
    assert got == pytest.approx(ref, rel=1e-12, nan_ok=True)
    got_t = M.score_track(torch.from_numpy(y), torch.from_numpy(h))
    assert got_t == pytest.approx(M.score_track(y, h), rel=1e-12, nan_ok=True)
    got_bf = M.mse(torch.from_numpy(y).bfloat16(), torch.from_numpy(h).bfloat16())
    assert np.isfinite(got_bf)


def test_blacklist_removes_bins_from_every_metric(pair):
    y, h = pair
    rng = np.random.default_rng(3)
    bl = rng.random(len(y)) < 0.05
    prom = rng.random(len(y)) < 0.3
    got = M.score_track(y, h, masks={"prom": prom, "blacklist": bl})
    ref = M.score_track(y[~bl], h[~bl], masks={"prom": prom[~bl]})
    assert got == pytest.approx(ref, rel=1e-12, nan_ok=True)


def test_constant_tracks_and_undefined_values_are_nan_without_warnings():
    n = 1000
    rng = np.random.default_rng(4)
    const = np.full(n, 0.5, dtype=np.float32)
    vary = rng.random(n).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = M.score_track(const, vary)
        assert r["mse"] == pytest.approx(np.mean((0.5 - vary.astype(np.float64)) ** 2))
        assert math.isnan(r["pearson"]) and math.isnan(r["spearman"])
        # nothing is strictly above the quantile of a constant truth: no peak
        for name in ("auroc", "auprc", "peak_recall"):
            assert math.isnan(r[name]), name
        assert r["peak_precision"] == 0.0  # yhat has peaks, none of them true
        # no mask, no weights: NaN
        for name in ("mse_prom", "mse_gene", "mse_enh", "mse_var"):
            assert math.isnan(r[name])
        r = M.score_track(vary, const)
        assert math.isnan(r["pearson"]) and math.isnan(r["spearman"])
        assert r["auroc"] == 0.5  # every score tied
        assert math.isnan(r["peak_precision"]) and r["peak_recall"] == 0.0
        # an empty mask, zero weights
        r = M.score_track(
            vary, vary, masks={"prom": np.zeros(n, dtype=bool)}, var_weights=np.zeros(n)
        )
        assert math.isnan(r["mse_prom"]) and math.isnan(r["mse_var"]) and r["mse"] == 0.0
        # all bins peaks (absolute threshold below everything): AUROC undefined, AP 1
        r = M.score_track(vary, vary, peak_threshold=-1.0)
        assert math.isnan(r["auroc"]) and r["auprc"] == 1.0
        # empty track
        r = M.score_track(np.zeros(0), np.zeros(0))
        assert all(math.isnan(v) for v in r.values())
        # one bin
        r = M.score_track(np.ones(1), np.zeros(1))
        assert r["mse"] == 1.0 and math.isnan(r["pearson"]) and r["mse1obs"] == 1.0


def test_bad_inputs_raise_named_errors():
    y = np.zeros(10, dtype=np.float32)
    with pytest.raises(InputDataError, match=r"score_track: y and yhat differ in shape"):
        M.score_track(y, np.zeros(9))
    bad = y.copy()
    bad[3] = np.nan
    with pytest.raises(InputDataError, match=r"yhat has 1 non-finite value\(s\), first at bin 3"):
        M.score_track(y, bad)
    with pytest.raises(InputDataError, match=r"masks\['prom'\]: mask has dtype float64"):
        M.score_track(y, y, masks={"prom": np.zeros(10)})
    with pytest.raises(InputDataError, match=r"masks\['gene'\]: mask has shape \(9,\)"):
        M.score_track(y, y, masks={"gene": np.zeros(9, dtype=bool)})
    with pytest.raises(ConfigError, match=r"unknown mask key\(s\) \['promoter'\]"):
        M.score_track(y, y, masks={"promoter": np.zeros(10, dtype=bool)})
    with pytest.raises(InputDataError, match=r"var_weights has 1 negative"):
        M.score_track(y, y, var_weights=-np.ones(10) * np.eye(10)[0])
    with pytest.raises(ConfigError, match=r"peak_quantile is 1.5"):
        M.score_track(y, y, peak_quantile=1.5)
    with pytest.raises(InputDataError, match=r"dtype <U1"):
        M.mse(np.array(["a"]), np.array(["b"]))
    with pytest.raises(InputDataError, match=r"expected \[n\] or \[k, n\]"):
        M.mse(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------------------------
# streaming


def _chroms(seed: int = 5):
    sizes = {"chr1": 30_000, "chr2": 12_345, "chr3": 7_001}
    rng = np.random.default_rng(seed)
    out = {}
    for i, (c, n) in enumerate(sizes.items()):
        y, h = _track(n, seed + i, decimals=2)
        masks = {
            "prom": rng.random(n) < 0.05,
            "gene": rng.random(n) < 0.4,
            "enh": rng.random(n) < 0.02,
            "blacklist": rng.random(n) < 0.01,
        }
        out[c] = (y, h, masks, rng.random(n))
    return out


def _concat(chroms):
    y = np.concatenate([v[0] for v in chroms.values()])
    h = np.concatenate([v[1] for v in chroms.values()])
    masks = {k: np.concatenate([v[2][k] for v in chroms.values()]) for k in chroms["chr1"][2]}
    w = np.concatenate([v[3] for v in chroms.values()])
    return y, h, masks, w


def test_track_scorer_equals_one_shot_on_concatenation():
    chroms = _chroms()
    ref = M.score_track(
        *_concat(chroms)[:2], masks=_concat(chroms)[2], var_weights=_concat(chroms)[3]
    )
    scorer = M.TrackScorer()
    for c, (y, h, masks, w) in chroms.items():
        scorer.add(y, h, masks=masks, var_weights=w, chrom=c)
    got = scorer.result()
    assert scorer.chroms == list(chroms)
    assert scorer.n_bins == int((~_concat(chroms)[2]["blacklist"]).sum())
    for name in M.METRIC_NAMES:
        assert got[name] == pytest.approx(ref[name], rel=1e-12, abs=1e-15), name
    # merge of two scorers (e.g. two Ray workers) is the same
    a, b = M.TrackScorer(), M.TrackScorer()
    for i, (c, (y, h, masks, w)) in enumerate(chroms.items()):
        (a if i == 0 else b).add(y, h, masks=masks, var_weights=w, chrom=c)
    merged = a.merge(b).result()
    assert merged == pytest.approx(got, rel=1e-12)


def test_track_scorer_float16_and_none_modes():
    chroms = _chroms(11)
    y, h, masks, w = _concat(chroms)
    ref = M.score_track(y, h, masks=masks, var_weights=w)
    s16, s0 = M.TrackScorer(keep="float16"), M.TrackScorer(keep="none")
    for y_, h_, m_, w_ in chroms.values():
        s16.add(y_, h_, masks=m_, var_weights=w_)
        s0.add(y_, h_, masks=m_, var_weights=w_)
    r16, r0 = s16.result(), s0.result()
    moments = ("mse", "pearson", "mse_prom", "mse_gene", "mse_enh", "mse_var")
    for name in moments:  # sufficient statistics are exact whatever is kept
        assert r16[name] == pytest.approx(ref[name], rel=1e-12)
        assert r0[name] == pytest.approx(ref[name], rel=1e-12)
    for name in ("spearman", "auroc", "auprc"):
        assert abs(r16[name] - ref[name]) < 0.01, name
    for name in ("mse1obs", "mse1imp"):
        assert r16[name] == pytest.approx(ref[name], rel=0.05), name
    for name in set(M.METRIC_NAMES) - set(moments):
        assert math.isnan(r0[name])


def test_track_scorer_batched_and_errors():
    chroms = _chroms(21)
    scorer = M.TrackScorer()
    ys, hs = [], []
    for c, (y, h, _, _) in chroms.items():
        y2, h2 = _track(len(y), 99)
        Y, H = np.stack([y, y2]), np.stack([h, h2])
        scorer.add(Y, H, chrom=c)
        ys.append(Y)
        hs.append(H)
    got = scorer.result()
    ref = M.score_track(np.concatenate(ys, axis=1), np.concatenate(hs, axis=1))
    for name in M.METRIC_NAMES:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12)
    y, h, masks, w = chroms["chr1"]
    s = M.TrackScorer()
    s.add(y, h, masks={"prom": masks["prom"]}, chrom="chr1")
    with pytest.raises(InputDataError, match=r"chrom='chr2'.*inconsistent.*chr1"):
        s.add(y, h, chrom="chr2")
    with pytest.raises(ConfigError, match=r"keep is 'all'"):
        M.TrackScorer(keep="all")
    assert all(math.isnan(v) for v in M.TrackScorer().result().values())


# ---------------------------------------------------------------------------------------------
# real Roadmap tracks (shared/data/roadmap-pilot): the average-activity baseline


PILOT = Path(__file__).resolve().parents[2] / "shared/data/roadmap-pilot"
CELLS = ("E003", "E017", "E065", "E116", "E117")


def _pilot(cell: str, assay: str) -> np.ndarray:
    path = PILOT / f"{cell}.{assay}.pilot.arcsinh.npz"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    with np.load(path) as npz:
        return npz["arr_0"]


@pytest.mark.parametrize(
    ("cell", "assay", "mse", "r"),
    [("E065", "H3K4me3", 0.158, 0.615), ("E017", "H3K4me3", 0.129, 0.849)],
)
def test_average_activity_on_real_tracks_matches_published_figures(cell, assay, mse, r):
    y = _pilot(cell, assay)
    others = np.stack([_pilot(c, assay) for c in CELLS if c != cell])
    aa = others.mean(axis=0)
    var = M.assay_variance(np.vstack([others, y[None]]))
    res = M.score_track(y, aa, var_weights=var)
    assert res["mse"] == pytest.approx(mse, abs=5e-4)
    d2 = (y.astype(np.float64) - aa) ** 2
    assert res["mse_var"] == pytest.approx(d2.dot(var) / var.sum(), rel=1e-10)
    assert res["pearson"] == pytest.approx(r, abs=5e-4)
    lab = y > np.quantile(y, 0.99)
    assert res["spearman"] == pytest.approx(spearmanr(y, aa).statistic, rel=1e-9)
    assert res["auroc"] == pytest.approx(roc_auc_score(lab, aa), rel=1e-12)
    assert res["auprc"] == pytest.approx(average_precision_score(lab, aa), rel=1e-12)
    # genome-wide from 4 pseudo-chromosomes, exact and float16-kept
    exact, half = M.TrackScorer(), M.TrackScorer(keep="float16")
    for part in np.array_split(np.arange(len(y)), 4):
        exact.add(y[part], aa[part])
        half.add(y[part], aa[part])
    plain = M.score_track(y, aa)
    assert exact.result() == pytest.approx(plain, rel=1e-12, nan_ok=True)
    approx = half.result()
    for name in ("spearman", "auroc", "auprc", "peak_precision", "peak_recall"):
        assert abs(approx[name] - plain[name]) < 0.01, name
