"""epiray.evaluate: the papers' tables on a hand-made scores frame vs hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from epiray import evaluate
from epiray.errors import InputDataError

EXPERIMENTS = [
    # experiment, biosample, assay, category
    ("E1", "MEL", "H3K27ac", "histone_modification"),
    ("E2", "CH12", "H3K27ac", "histone_modification"),
    ("E3", "MEL", "CTCF", "protein_binding"),
    ("E4", "CH12", "MYC", "protein_binding"),
    ("E5", "MEL", "RNA", "transcription"),
    ("E6", "CH12", "DNase", "accessibility"),
]
MSE = {
    "average_activity": [0.10, 0.12, 0.09, 0.08, 0.004, 0.05],
    "mouse_only": [0.09, 0.10, 0.07, 0.06, 0.003, 0.055],
    "synteny": [0.07, 0.09, 0.07, 0.05, 0.0018, 0.046],
}


def make_scores() -> pd.DataFrame:
    rows = []
    for model, values in MSE.items():
        for (exp, bio, assay, cat), mse in zip(EXPERIMENTS, values):
            fold = int(exp[1:]) % 3
            rows.append(
                {
                    "model": model,
                    "experiment": exp,
                    "biosample": bio,
                    "assay": assay,
                    "category": cat,
                    "fold": fold,
                    "chrom": "chr19",
                    "mse": mse,
                    "pearson": 1.0 - mse,
                }
            )
    return pd.DataFrame(rows)


def test_comparison_table_means_overall_and_per_category():
    table = evaluate.comparison_table(make_scores())
    assert list(table.index) == ["average_activity", "mouse_only", "synteny"]
    assert list(table.columns) == [
        "n",
        "overall",
        "histone_modification",
        "protein_binding",
        "transcription",
        "accessibility",
    ]
    aa = table.loc["average_activity"]
    assert aa["n"] == 6
    assert aa["overall"] == pytest.approx((0.10 + 0.12 + 0.09 + 0.08 + 0.004 + 0.05) / 6)
    assert aa["histone_modification"] == pytest.approx((0.10 + 0.12) / 2)
    assert aa["protein_binding"] == pytest.approx((0.09 + 0.08) / 2)
    assert aa["transcription"] == pytest.approx(0.004)
    syn = table.loc["synteny"]
    assert syn["overall"] == pytest.approx((0.07 + 0.09 + 0.07 + 0.05 + 0.0018 + 0.046) / 6)
    assert syn["accessibility"] == pytest.approx(0.046)
    # Higher-is-better metrics average the same way; model order can be chosen.
    pear = evaluate.comparison_table(make_scores(), "pearson", models=["synteny", "mouse_only"])
    assert list(pear.index) == ["synteny", "mouse_only"]
    assert pear.loc["mouse_only", "transcription"] == pytest.approx(0.997)


def test_comparison_is_paired_over_shared_experiments():
    scores = make_scores()
    scores = scores[~((scores["model"] == "synteny") & (scores["experiment"] == "E1"))]
    table = evaluate.comparison_table(scores)
    assert (table["n"] == 5).all()
    assert table.loc["average_activity", "histone_modification"] == pytest.approx(0.12)
    unpaired = evaluate.comparison_table(scores, paired=False)
    assert unpaired.loc["average_activity", "n"] == 6 and unpaired.loc["synteny", "n"] == 5
    assert unpaired.loc["average_activity", "histone_modification"] == pytest.approx(0.11)


def test_per_chromosome_rows_pool_by_bins():
    rows = [
        {"model": "m", "experiment": "E1", "category": "other", "chrom": "chr3", "n_bins": 300,
         "mse": 0.1},
        {"model": "m", "experiment": "E1", "category": "other", "chrom": "chr19", "n_bins": 100,
         "mse": 0.5},
        {"model": "m", "experiment": "E2", "category": "other", "chrom": "chr3", "n_bins": 300,
         "mse": 0.2},
    ]  # fmt: skip
    per = evaluate.per_experiment(pd.DataFrame(rows)).set_index("experiment")
    assert per.loc["E1", "mse"] == pytest.approx((0.1 * 300 + 0.5 * 100) / 400)
    assert per.loc["E1", "chrom"] == "chr19,chr3" and per.loc["E1", "n_bins"] == 400
    assert per.loc["E2", "mse"] == pytest.approx(0.2)
    unweighted = pd.DataFrame(rows).drop(columns="n_bins")
    per = evaluate.per_experiment(unweighted).set_index("experiment")
    assert per.loc["E1", "mse"] == pytest.approx(0.3)
    with pytest.raises(InputDataError, match="experiment 'E1', chrom 'chr3' is scored more"):
        evaluate.per_experiment(pd.DataFrame([rows[0], rows[0]]))


def test_paired_tests_match_scipy():
    scores = make_scores()
    tests = evaluate.paired_tests(scores, reference="mouse_only")
    assert set(tests["model_b"]) == {"average_activity", "synteny"}
    row = tests[(tests["model_b"] == "synteny") & (tests["category"] == "overall")].iloc[0]
    want = stats.ttest_rel(MSE["mouse_only"], MSE["synteny"])
    assert row["n"] == 6
    assert row["t"] == pytest.approx(want.statistic)
    assert row["p"] == pytest.approx(want.pvalue)
    assert row["significant"] == (want.pvalue <= 0.01)
    assert row["better"] == "synteny"
    assert row["diff"] == pytest.approx(np.mean(MSE["synteny"]) - np.mean(MSE["mouse_only"]))
    histone = tests[
        (tests["model_b"] == "synteny") & (tests["category"] == "histone_modification")
    ]
    want = stats.ttest_rel([0.09, 0.10], [0.07, 0.09])
    assert histone["p"].iloc[0] == pytest.approx(want.pvalue)
    # One experiment in a category: no test.
    single = tests[(tests["category"] == "transcription")]
    assert single["p"].isna().all() and not single["significant"].any()
    # All pairs by default: 3 pairs x (overall + 4 categories).
    assert len(evaluate.paired_tests(scores)) == 15
    # Higher is better for correlations.
    pear = evaluate.paired_tests(scores, "pearson", models=["mouse_only", "synteny"])
    assert pear.loc[pear["category"] == "overall", "better"].iloc[0] == "synteny"
    # alpha decides the flag.
    loose = evaluate.paired_tests(scores, models=["average_activity", "synteny"], alpha=0.5)
    p = loose.loc[loose["category"] == "overall", "p"].iloc[0]
    assert loose.loc[loose["category"] == "overall", "significant"].iloc[0] == (p <= 0.5)


def test_significance_marks_follow_table1():
    """Best model marked when significantly better than the reference; a model not
    significantly different from the best (and itself better than the reference) too."""
    rng = np.random.default_rng(0)
    ref = 0.1 + 0.02 * rng.random(20)
    a = ref - 0.02 + 0.001 * rng.standard_normal(20)
    b = a + 0.001 * rng.standard_normal(20)
    c = ref + 0.0005 * rng.standard_normal(20)  # no better than the reference
    rows = [
        {"model": m, "experiment": f"E{i}", "category": "transcription", "mse": v}
        for m, vals in {"ref": ref, "a": a, "b": b, "c": c}.items()
        for i, v in enumerate(vals)
    ]
    scores = pd.DataFrame(rows)
    assert stats.ttest_rel(a, b).pvalue > 0.01 and stats.ttest_rel(ref, a).pvalue <= 0.01
    table = evaluate.comparison_table(scores)
    marks = evaluate.significance_marks(table, scores, reference="ref")
    assert marks.loc["a", "overall"] and marks.loc["b", "overall"]
    assert not marks.loc["ref", "overall"] and not marks.loc["c", "overall"]
    assert not marks["n"].any()
    # Nothing is marked when the best is no better than the reference.
    only = scores[scores["model"].isin(["ref", "c"])]
    t2 = evaluate.comparison_table(only)
    assert not evaluate.significance_marks(t2, only, reference="ref").to_numpy().any()


def test_assay_improvement_over_average_activity():
    table = evaluate.assay_improvement(make_scores(), "synteny")
    by = table.set_index("assay")
    expect = {
        "H3K27ac": (0.11, 0.08),
        "CTCF": (0.09, 0.07),
        "MYC": (0.08, 0.05),
        "RNA": (0.004, 0.0018),
        "DNase": (0.05, 0.046),
    }
    for assay, (base, model) in expect.items():
        assert by.loc[assay, "baseline"] == pytest.approx(base)
        assert by.loc[assay, "model"] == pytest.approx(model)
        assert by.loc[assay, "improvement"] == pytest.approx(base - model)
        assert by.loc[assay, "pct_improvement"] == pytest.approx(100 * (base - model) / base)
    assert by.loc["H3K27ac", "n"] == 2 and by.loc["RNA", "category"] == "transcription"
    assert list(table["assay"]) == ["RNA", "MYC", "H3K27ac", "CTCF", "DNase"]  # best first

    summary = evaluate.improvement_summary(table)
    pcts = [100 * (b - m) / b for b, m in expect.values()]
    assert summary == {
        "n_assays": 5,
        "n_improved": 5,
        "n_ge_50": 1,
        "n_ge_20": 4,
        "mean_pct": pytest.approx(np.mean(pcts)),
        "mean_improvement": pytest.approx(np.mean([b - m for b, m in expect.values()])),
    }
    # mouse_only is worse than the baseline on DNase: 4 of 5 improve.
    mouse = evaluate.improvement_summary(evaluate.assay_improvement(make_scores(), "mouse_only"))
    assert mouse["n_improved"] == 4
    # Restricted to a category (the zero-shot protein report).
    pb = evaluate.assay_improvement(make_scores(), "synteny", category="protein_binding")
    assert sorted(pb["assay"]) == ["CTCF", "MYC"]


def test_dnase_consistency_by_hand():
    dnase = np.array([0.0, 3.0, 5.0, 1.0, 2.5, 0.5])  # peaks (> 2): bins 1, 2, 4
    protein = np.array([0.1, 2.5, 1.0, 3.0, 4.0, 0.2])  # called (> 2): bins 1, 3, 4
    res = evaluate.dnase_consistency(protein, dnase, signal="raw")
    # AUROC: pairs (peak, non-peak) where the peak scores higher: 2 + 2 + 3 of 9.
    assert res["auroc"] == pytest.approx(7 / 9)
    assert res["recall"] == pytest.approx(2 / 3) and res["precision"] == pytest.approx(2 / 3)
    assert res["n_peaks"] == 3 and res["n_called"] == 3
    # The store holds arcsinh values: the threshold moves to arcsinh(2), results do not change.
    same = evaluate.dnase_consistency(np.arcsinh(protein), np.arcsinh(dnase))
    assert same == pytest.approx(res)
    # Ties count one half, as scikit-learn.
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    d = rng.gamma(1.0, 1.5, 500)
    p = np.round(rng.gamma(1.0, 1.5, 500) + 0.5 * d, 1)
    got = evaluate.dnase_consistency(p, d, signal="raw")["auroc"]
    assert got == pytest.approx(roc_auc_score(d > 2, p))
    # Undefined cases are NaN, not errors.
    empty = evaluate.dnase_consistency(np.zeros(4), np.zeros(4), signal="raw")
    assert np.isnan(empty["auroc"]) and np.isnan(empty["recall"]) and np.isnan(empty["precision"])
    with pytest.raises(InputDataError, match="differ in length; expected equal bins, got 3 and 4"):
        evaluate.dnase_consistency(np.zeros(3), np.zeros(4))
    with pytest.raises(InputDataError, match="unknown signal scale"):
        evaluate.dnase_consistency(np.zeros(3), np.zeros(3), signal="log")


def test_dnase_consistency_table_feeds_paired_tests():
    meta = pd.DataFrame(EXPERIMENTS, columns=["experiment", "biosample", "assay", "category"])
    dnase = {"MEL": np.array([0.0, 3.0, 5.0, 1.0, 2.5, 0.5])}  # no DNase in CH12
    predictions = {
        "synteny": {"E3": np.array([0.1, 2.5, 1.0, 3.0, 4.0, 0.2]), "E4": np.ones(6)},
        "average_activity": {"E3": np.array([3.0, 3.0, 3.0, 3.0, 3.0, 3.0])},
    }
    table = evaluate.dnase_consistency_table(predictions, meta, dnase, signal="raw")
    assert list(table["experiment"]) == ["E3", "E3"]  # E4's biosample has no DNase
    syn = table[table["model"] == "synteny"].iloc[0]
    assert syn["auroc"] == pytest.approx(7 / 9) and syn["precision"] == pytest.approx(2 / 3)
    aa = table[table["model"] == "average_activity"].iloc[0]
    assert aa["recall"] == 1.0 and aa["precision"] == pytest.approx(0.5) and aa["auroc"] == 0.5
    tests = evaluate.paired_tests(table, "precision", by_category=False)
    assert tests.iloc[0]["n"] == 1


def test_format_table_text_markdown_csv():
    df = pd.DataFrame(
        {"overall": [0.0824, 0.00217], "n": [10, 10]}, index=pd.Index(["a", "bb"], name="model")
    )
    assert evaluate.format_table(df, "text") == (
        "model  overall   n\n-----  -------  --\na       0.0824  10\nbb     0.00217  10\n"
    )
    marks = pd.DataFrame(False, index=df.index, columns=df.columns)
    marks.loc["bb", "overall"] = True
    assert evaluate.format_table(df, "markdown", marks=marks) == (
        "| model | overall | n |\n|---|---:|---:|\n"
        "| a | 0.0824 | 10 |\n| bb | **0.00217** | 10 |\n"
    )
    assert "0.00217*" in evaluate.format_table(df, "text", marks=marks)
    assert evaluate.format_table(df, "csv", marks=marks) == (
        "model,overall,n\na,0.0824,10\nbb,0.00217,10\n"
    )
    assert evaluate.format_table(df, "csv", index=False).startswith("overall,n\n")
    with pytest.raises(InputDataError, match="unknown format.*got 'html'"):
        evaluate.format_table(df, "html")


def test_render_report_and_input_errors():
    report = evaluate.render_report(make_scores(), "markdown")
    assert "### Mean mse per model over 6 shared experiments" in report
    assert "### Paired t-tests on mse" in report
    assert "synteny: % mse improvement over average_activity per assay (5 of 5 improve" in report
    text = evaluate.render_report(make_scores(), "text")
    assert text.splitlines()[2].startswith("model")
    bare = evaluate.comparison_table(make_scores().drop(columns="category"))
    assert list(bare.columns) == ["n", "overall"]
    with pytest.raises(InputDataError, match=r"lacks column\(s\) \['mse'\]"):
        evaluate.comparison_table(make_scores().drop(columns="mse"))
    with pytest.raises(InputDataError, match=r"model\(s\) \['avocado'\] not found"):
        evaluate.comparison_table(make_scores(), models=["avocado"])
