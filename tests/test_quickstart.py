"""The quickstart end to end at a reduced size, its outputs checked, and its re-run reusing
what is there."""

import json

import mlflow
import numpy as np
import pandas as pd
import pyBigWig
import pytest

from epiray.quickstart import QuickstartConfig, run
from epiray.store import Store

pytestmark = pytest.mark.ray


def test_quickstart_tiny(tmp_path, ray_local):
    cfg = QuickstartConfig(
        out=str(tmp_path / "qs"), preset="tiny", epochs=2, n_nodes=16, batch_size=2048
    )
    lines: list[str] = []
    res = run(cfg, say=lines.append)
    text = "\n".join(lines)
    # the comparison table was printed, with the three models and the baseline
    assert "held-out MSE" in text and "mlflow ui --backend-store-uri" in text
    models = {"avocado_mouse_only", "avocado_cross_species", "edice_cross_species"}
    table = res["table"]
    assert models | {"average_activity"} == set(table.index)
    assert np.isfinite(table.loc[sorted(models), "overall"]).all()
    scores = pd.read_csv(tmp_path / "qs" / "scores.csv")
    assert set(scores["model"]) == models | {"average_activity"}
    assert scores["category"].eq("protein_binding").all()  # the zero-shot assays
    assert np.isfinite(scores["mse"]).all()

    # MLflow: a parent run and one child per model, finished
    mlc = mlflow.MlflowClient(res["tracking_uri"])
    exp = mlc.get_experiment_by_name("epiray-quickstart")
    runs = mlc.search_runs([exp.experiment_id])
    names = {r.info.run_name: r for r in runs}
    assert "quickstart" in names
    assert "avocado_cross_species.chr1.fold0" in names
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = names["quickstart"].info.run_id
    assert names["avocado_cross_species.chr1.fold0"].data.tags["mlflow.parentRunId"] == parent
    # every model run logged its model; eDICE's carries the tracks it imputes from
    from epiray.tracking import find_logged_model

    for m in models:
        run_ = names[f"{m}.chr1.fold0"]
        assert find_logged_model(mlc, run_.info.run_id).name == "model"
        context = "tracks" if m.startswith("edice") else "bin_range"
        assert run_.data.tags["epiray.model_context"] == context, m

    # bigWigs: readable, header = the assembly, values = the model's predictions
    store = Store.open(res["store"])
    sizes = store.chrom_sizes("mmSyn1")
    out = tmp_path / "qs" / "imputed"
    bws = sorted(out.glob("*.bw"))
    assert bws and (out / "hub.txt").is_file()
    side = json.loads(bws[0].with_suffix(".json").read_text())
    bw = pyBigWig.open(str(bws[0]))
    assert bw.chroms() == sizes
    vals = np.array([v for _, _, v in bw.intervals("chr1")])
    assert len(vals) == store.n_bins("mmSyn1", "chr1")
    from epiray.train import final_checkpoint, load_shards

    shards = load_shards(
        final_checkpoint(tmp_path / "qs" / "runs" / "avocado_cross_species.chr1.fold0")
    )
    model, data = shards[0]
    b = model.vocab.biosample_index(side["biosample"])
    a = model.vocab.assay_index(side["assay"])
    pred = model.predict(data, b, a).float().cpu().numpy()
    # Avocado calibrates against average activity (configs: validation.calibrate): the
    # imputation is w · model + (1 − w) · AA where the run observed the assay
    ckpt = final_checkpoint(tmp_path / "qs" / "runs" / "avocado_cross_species.chr1.fold0")
    cal = json.loads((ckpt / "meta.json").read_text()).get("calibration")
    same = (cal or {}).get("average_activity", {}).get(side["assay"])
    if same:
        aa = store.read("mmSyn1", "chr1", same).mean(0)
        pred = cal["weight"] * pred + (1 - cal["weight"]) * aa
    np.testing.assert_allclose(vals, pred, rtol=1e-5, atol=1e-5)

    # re-running reuses everything: no bigWig rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in bws}
    lines.clear()
    run(cfg, say=lines.append)
    assert "reusing the synthetic compendium" in "\n".join(lines)
    assert {p: p.stat().st_mtime_ns for p in bws} == mtimes

    # the evaluate job re-scores the trained runs: same held-out MSEs as training reported
    from epiray.score import EvaluateConfig, evaluate_runs
    from epiray.tracking import TrackingConfig

    runs = tmp_path / "qs" / "runs"
    ecfg = EvaluateConfig(
        store=res["store"],
        out=str(tmp_path / "eval"),
        chroms=["chr1"],
        folds=["fold0"],
        runs={m: str(runs / f"{m}.{{chrom}}.{{fold}}") for m in sorted(models)},
        tracking=TrackingConfig(experiment="t-eval"),
    )
    tables = evaluate_runs(ecfg)
    ev = tables["scores"].set_index(["model", "experiment"])["mse"].sort_index()
    tr = scores.set_index(["model", "experiment"])["mse"].sort_index()
    np.testing.assert_allclose(ev.loc[tr.index], tr, rtol=1e-4)
    for name in ("comparison", "paired", "improvement", "report"):
        assert (tmp_path / "eval" / f"{name}.{'md' if name == 'report' else 'csv'}").is_file()
    arts = [
        a.path
        for a in mlflow.MlflowClient(tables["tracking_uri"]).list_artifacts(
            tables["run_id"], "plots"
        )
    ]
    assert any(a.endswith(".png") for a in arts)
