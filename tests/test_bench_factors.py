"""The pure functions of ``benchmarks/bench_factors_downstream.py`` (folds, features, the
classifier and its scores)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_factors_downstream.py"


@pytest.fixture(scope="module")
def B():
    spec = importlib.util.spec_from_file_location("bench_factors_downstream", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_folds(B):
    n = 2_345
    f = B.block_folds(n, k=5, block=200, seed=1)
    assert f.shape == (n,) and set(np.unique(f)) == set(range(5))
    blocks = f[: n // 200 * 200].reshape(-1, 200)
    assert (blocks == blocks[:, :1]).all()  # a block lies in one fold
    assert (f[n // 200 * 200 :] == f[-1]).all()
    per_fold = np.bincount(f[::200], minlength=5)  # blocks per fold
    assert per_fold.max() - per_fold.min() <= 1
    assert np.array_equal(f, B.block_folds(n, k=5, block=200, seed=1))
    assert not np.array_equal(f, B.block_folds(n, k=5, block=200, seed=2))


def test_row_means_and_multiscale(B):
    rng = np.random.default_rng(0)
    x = rng.random((3, 23)).astype(np.float32)
    m = B.row_means(x, 10)
    for i in range(23):
        r = i // 10
        np.testing.assert_allclose(m[:, i], x[:, r * 10 : min(r * 10 + 10, 23)].mean(1), rtol=1e-6)
    t1 = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    t10 = 100 + np.arange(3 * 3, dtype=np.float32).reshape(3, 3)
    feats = B.multiscale([t1, t10], [1, 10], 23)
    assert feats.shape == (23, 5)
    assert np.array_equal(feats[17], np.concatenate([t1[17], t10[1]]))
    assert np.array_equal(feats[22, 2:], t10[2])


def test_logistic_learns_and_is_scale_free(B):
    rng = np.random.default_rng(0)
    n, classes = 3_000, 3
    y = rng.integers(0, classes, n)
    centres = np.array([[0, 0, 0], [3, 0, 0], [0, 3, 0]], dtype=np.float32)
    x = centres[y] + rng.standard_normal((n, 3)).astype(np.float32)
    x = np.concatenate([x, rng.standard_normal((n, 2)).astype(np.float32)], axis=1)  # noise
    folds = B.block_folds(n, k=5, block=100)
    p = B.cross_val_proba(x, y, folds, classes)
    assert p.shape == (n, classes)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    acc = np.mean(p.argmax(1) == y)
    assert acc > 0.8  # the Bayes rate here is about 0.85
    scaled = x * np.array([1000, 1e-3, 1, 50, 1], dtype=np.float32)
    p2 = B.cross_val_proba(scaled, y, folds, classes)
    assert np.mean(p2.argmax(1) == p.argmax(1)) > 0.99  # standardised on the training folds
    # a constant feature does not break standardisation
    p3 = B.cross_val_proba(np.c_[x, np.ones(n, np.float32)], y, folds, classes)
    assert np.isfinite(p3).all()


def test_majority_and_f1(B):
    y = np.array([0, 0, 0, 1, 1, 2, 0, 0, 1, 0])
    folds = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert (B.majority_pred(y, folds, 4) == 0).all()
    pred = np.array([0, 1, 0, 1, 0, 2, 0, 0, 0, 0])
    f1 = B.f1_per_class(y, pred, 4)
    # class 0: tp 5, fp 2, fn 1; class 1: tp 1, fp 1, fn 2; class 2: tp 1; class 3: absent
    np.testing.assert_allclose(f1[:3], [10 / 13, 2 / 5, 1.0])
    assert np.isnan(f1[3])
    s = B.classification_scores(y, pred, 4)
    assert s["accuracy"] == pytest.approx(0.7)
    assert s["macro_f1"] == pytest.approx((10 / 13 + 2 / 5 + 1) / 3)
    assert s["f1"][3] is None
    metrics = pytest.importorskip("sklearn.metrics")
    assert s["macro_f1"] == pytest.approx(metrics.f1_score(y, pred, average="macro"))


def test_ranking_scores(B):
    y = np.array([1, 0, 1, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert B.average_precision(y, score) == pytest.approx((1 + 2 / 3) / 2)
    assert B.auroc(y, score) == pytest.approx(7 / 8)
    r = B.ranking_scores(y, score)
    assert r["f1_top"] == pytest.approx(0.5)  # top 2 called: one of them right
    rng = np.random.default_rng(0)
    yy = (rng.random(5_000) < 0.05).astype(np.int64)
    ss = yy + rng.standard_normal(5_000)
    metrics = pytest.importorskip("sklearn.metrics")
    assert B.average_precision(yy, ss) == pytest.approx(metrics.average_precision_score(yy, ss))
    assert B.auroc(yy, ss) == pytest.approx(metrics.roc_auc_score(yy, ss))


def test_top_labels(B):
    v = np.arange(1_000, dtype=np.float32)[::-1].copy()
    y = B.top_labels(v, 0.01)
    assert y.sum() == 10 and y[:10].all()
    assert B.top_labels(np.zeros(150), 0.01).sum() == 2  # ceil, ties by position
