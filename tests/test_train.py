"""Ray Train end to end on a tiny synthetic store: sharded training, scoring, resume."""

import json

import numpy as np
import pytest
import torch

from epiray.errors import ConfigError, StoreError
from epiray.loader import shard_bounds
from epiray.loop import LoopParams, load_checkpoint
from epiray.tracking import TrackingConfig
from epiray.train import (
    FoldSection,
    ModelSection,
    ScalingSection,
    TrainConfig,
    memory_plan,
    plan_runs,
    train,
    wants_checkpoint,
)

pytestmark = pytest.mark.ray


def test_shard_bounds_cover_and_align():
    for n, w in [(1000, 1), (60_001, 2), (7_818_879, 8), (401, 3)]:
        b = [shard_bounds(n, w, r) for r in range(w)]
        assert b[0][0] == 0 and b[-1][1] == n
        assert all(b[i][1] == b[i + 1][0] for i in range(w - 1))
        assert all(lo % 200 == 0 for lo, _ in b)
    with pytest.raises(Exception, match="at most 2 workers"):
        shard_bounds(300, 3, 0)


def config(tmp_path, store, **kw):
    base = dict(
        store=str(store.root),
        out=str(tmp_path / "runs"),
        assembly="mmSyn1",
        chroms=["chr1"],
        model=ModelSection(
            name="avocado", params={"n_nodes": 32, "n_layers": 1, "n_assay_factors": 16}
        ),
        folds=FoldSection(scheme="experiment", k=3, fold=0),
        train=LoopParams(epochs=3, batch_size=2048, patience=None, checkpoint_every=1),
        scaling=ScalingSection(num_workers=2, use_gpu=False),
        tracking=TrackingConfig(tracking_uri="sqlite:///mlflow.db", experiment="t"),
    )
    base.update(kw)
    return TrainConfig(**base)


def test_plan_validates(tmp_path, tiny_store):
    _, store = tiny_store
    with pytest.raises(ConfigError, match=r"chroms \['chr9'\] not in assembly mmSyn1"):
        plan_runs(config(tmp_path, store, chroms=["chr9"]))
    with pytest.raises(ConfigError, match="synteny 'nope' is not in store"):
        plan_runs(config(tmp_path, store, synteny="nope", aux_species=True))
    with pytest.raises(ConfigError, match="folds.fold 5"):
        plan_runs(config(tmp_path, store, folds=FoldSection(fold=5)))
    _, specs = plan_runs(config(tmp_path, store))
    (s,) = specs
    assert not set(s.train) & set(s.evaluate) and s.evaluate
    assert all(e.startswith("mm.") for e in s.train + s.evaluate)


def test_two_workers_train_score_and_resume(tmp_path, tiny_store, caplog):
    import logging

    import yaml

    res, store = tiny_store
    cfg = config(tmp_path, store)
    caplog.set_level(logging.INFO, logger="epiray.train")
    (r,) = train(cfg)
    # the run's first line says what it trains on and holds out
    first = [m for m in caplog.messages if m.startswith("avocado_mouse_only chr1 fold0:")]
    assert first == [r.spec.summary]
    assert f"training on {len(r.spec.train)} mouse tracks" in first[0]
    ck = r.checkpoint
    run_dir = tmp_path / "runs" / "avocado_mouse_only.chr1.fold0"
    # a checkpoint every epoch, the last one only once (as the final); Ray keeps two
    assert sorted(p.name for p in run_dir.glob("epoch*")) == ["epoch0002", "epoch0003_final"]
    meta = json.loads(open(f"{ck}/meta.json").read())
    assert meta["final"] and meta["epoch"] == 3 and len(meta["shards"]) == 2
    n = store.n_bins("mmSyn1", "chr1")
    assert meta["shards"][0][0] == 0 and meta["shards"][-1][1] == n
    for rank in (0, 1):
        assert (tmp_path / "runs" / "avocado_mouse_only.chr1.fold0").is_dir()
        assert __import__("os").path.isfile(f"{ck}/rank{rank}.pt")
    # held-out predictions cover the chromosome and were scored beside average activity
    assert set(r.scores["model"]) == {"avocado_mouse_only", "average_activity"}
    own = r.scores[r.scores["model"] == "avocado_mouse_only"]
    assert set(own["experiment"]) == set(r.spec.evaluate)
    assert np.isfinite(own["mse"]).all()
    # the MLflow run exists with per-epoch metrics
    import mlflow

    mlc = mlflow.MlflowClient(r.spec.tracking_uri)
    run = mlc.get_run(r.mlflow_run_id)
    assert run.info.run_name == "avocado_mouse_only.chr1.fold0"
    assert len(mlc.get_metric_history(r.mlflow_run_id, "train/mse")) == 3
    # rank 0 tagged the run with its memory estimate, the one `epiray train --plan` prints
    plan = memory_plan(cfg)
    assert list(plan["worker"]) == [0, 1] and plan["bins"].sum() == n
    assert run.data.tags["epiray.memory_per_worker_gib"] == f"{plan['total_gib'][0]:.3f}"
    assert "memory per worker" in run.data.tags["epiray.memory_per_worker"]
    # CPU workers started with glibc told to reuse freed activations (scaling.cpu_malloc)
    from epiray.runtime import REUSE_MALLOC_TUNABLES

    assert run.data.tags["epiray.worker_glibc_tunables"] == REUSE_MALLOC_TUNABLES
    # the MLflow UI: a model-training experiment, the store as the run's input dataset
    exp = mlc.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (ds,) = run.inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest) == (store.root.name, store.store_hash)
    assert store.root.resolve().as_uri() in ds.dataset.source
    assert json.loads(ds.dataset.profile)["experiments"] == len(store.summary["experiments"])
    # the resolved config: one file per run, also the run's config.yaml
    resolved = tmp_path / "runs" / "avocado_mouse_only.chr1.fold0.resolved.yaml"
    assert not (tmp_path / "runs" / "train.resolved.yaml").exists()
    assert yaml.safe_load(resolved.read_text()) == cfg.model_dump(mode="json")
    assert "config.yaml" in {a.path for a in mlc.list_artifacts(r.mlflow_run_id)}

    # seeded: the same config trained again from scratch elsewhere reproduces the run
    (again,) = train(config(tmp_path / "again", store))
    assert again.history["train_mse"].tolist() == r.history["train_mse"].tolist()

    # resume: the same config with more epochs continues after epoch 3; with checkpoint_every
    # 2 only epoch 4's report carries a checkpoint before the final one
    more = cfg.train.model_copy(update={"epochs": 5, "checkpoint_every": 2})
    (r2,) = train(cfg.model_copy(update={"train": more}))
    meta2 = json.loads(open(f"{r2.checkpoint}/meta.json").read())
    assert meta2["epoch"] == 5
    assert yaml.safe_load(resolved.read_text())["train"]["epochs"] == 5  # its own config
    assert len(mlc.get_run(r2.mlflow_run_id).inputs.dataset_inputs) == 1
    assert sorted(p.name for p in run_dir.glob("epoch*")) == ["epoch0004", "epoch0005_final"]
    # every epoch is still reported (the new config's MLflow run logs the two it trained)
    steps = [m.step for m in mlc.get_metric_history(r2.mlflow_run_id, "train/mse")]
    assert sorted(steps) == [4, 5]
    assert list(r2.history["epoch"]) == [1, 2, 3, 4, 5]
    # nothing before the checkpoint was retrained: epochs 1-3 are the first run's, unchanged
    assert r2.history["train_mse"].tolist()[:3] == r.history["train_mse"].tolist()

    # a trained shard refuses a store that lacks its experiments
    from epiray.loader import load_chrom_data
    from epiray.models import Vocabulary

    vocab = Vocabulary.from_dict(meta2["vocab"])
    lo, hi = meta2["shards"][0]
    data = load_chrom_data(store, "mmSyn1", "chr1", lo, hi, vocab, meta2["train"])
    model, _ = load_checkpoint(f"{r2.checkpoint}/rank0.pt", data, store_summary=store.summary)
    assert isinstance(model, torch.nn.Module)
    bad = json.loads(json.dumps(store.summary))
    bad["experiments"].pop(meta2["train"][0])
    with pytest.raises(StoreError, match="not in the store"):
        load_checkpoint(f"{r2.checkpoint}/rank0.pt", data, store_summary=bad)


def test_worker_runtime_env():
    from epiray.runtime import REUSE_MALLOC_TUNABLES
    from epiray.train import worker_runtime_env

    reuse = {"env_vars": {"GLIBC_TUNABLES": REUSE_MALLOC_TUNABLES}}
    assert worker_runtime_env(ScalingSection(), use_gpu=False) == reuse
    assert worker_runtime_env(ScalingSection(), use_gpu=True) == {}
    assert worker_runtime_env(ScalingSection(cpu_malloc="system"), use_gpu=False) == {}


def test_checkpoint_every():
    """Which per-epoch reports carry a checkpoint (the final report always does)."""
    from types import SimpleNamespace

    def epochs_with_checkpoint(every, epochs=7, stopped_at=None):
        p = LoopParams(epochs=epochs, checkpoint_every=every)
        return [
            e
            for e in range(1, (stopped_at or epochs) + 1)
            if wants_checkpoint(SimpleNamespace(epoch=e, stopped=e == stopped_at), p)
        ]

    assert epochs_with_checkpoint(1) == [1, 2, 3, 4, 5, 6]
    assert epochs_with_checkpoint(3) == [3, 6]
    assert epochs_with_checkpoint(3, epochs=6) == [3]
    assert epochs_with_checkpoint(2, stopped_at=4) == [2]
    with pytest.raises(ValueError, match="checkpoint_every"):
        LoopParams(checkpoint_every=0)


def test_train_plan_prints_worker_memory_without_training(tmp_path, tiny_store, capsys):
    from epiray.cli import main
    from epiray.config import dump_config

    _, store = tiny_store
    cfg = config(tmp_path, store, value_dtype="float16")
    dump_config(cfg, tmp_path / "train.yaml")
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--plan"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()
    assert "total_gib" in header and "genome_adam_gib" in header and len(rows) == 2
    assert not (tmp_path / "runs").exists()  # nothing trained
    # float16 values: half the data bytes of the float32 plan
    half, full = memory_plan(cfg), memory_plan(config(tmp_path, store))
    assert (half["data_gib"] < full["data_gib"]).all()


def test_cell_validation_and_refit(tmp_path, tiny_store):
    """Default validation holds out cells, not experiments; with refit a fresh model is
    trained on every cell for the epochs validation chose, and the run says how it trained."""
    from epiray.train import ValidationSection

    _, store = tiny_store
    cfg = config(
        tmp_path,
        store,
        validation=ValidationSection(refit=True, fraction=0.2),
        train=LoopParams(epochs=3, patience=None, autocast="off"),
        scaling=ScalingSection(num_workers=1, use_gpu=False),
    )
    _, (spec,) = plan_runs(cfg)
    assert spec.validate == [] and spec.holdout["fraction"] == 0.2 and spec.refit
    (r,) = train(cfg)
    meta = json.loads(open(f"{r.checkpoint}/meta.json").read())
    chosen = meta["selected_epochs"]
    assert meta["phase"] == "refit" and 1 <= chosen <= 3
    assert len(meta["selection_history"]) == 3 and len(meta["history"]) == chosen
    assert r.checkpoint.endswith(f"epoch{3 + chosen:04d}_final")
    assert all(h["val_mse"] is not None for h in meta["selection_history"])
    # the refit replays the selection run's learning rate epoch by epoch
    sel_lr = [h["lr"] for h in meta["selection_history"][:chosen]]
    assert [h["lr"] for h in meta["history"]] == pytest.approx(sel_lr)
    assert meta["regime"]["batch_size"] >= 256
    import mlflow

    tags = mlflow.MlflowClient(r.spec.tracking_uri).get_run(r.mlflow_run_id).data.tags
    assert tags["epiray.refit_epochs"] == str(chosen)
    assert tags["epiray.regime.batch_size"] == str(meta["regime"]["batch_size"])
    # 3 epochs of a tiny slab are far too few steps, and the run says so
    assert "optimiser steps" in tags["epiray.undertrained"]
    # the earlier form of the section still means whole held-out experiments
    legacy = ValidationSection.model_validate({"per_assay": 1})
    assert legacy.scheme == "experiments"
    assert ValidationSection.model_validate({"per_assay": 0}).scheme == "none"


def test_calibrated_refit_on_validation_experiments(tmp_path, tiny_store):
    """validation.calibrate: the weight against average activity is fitted on the whole
    validation experiments across both workers, the refit trains on them too, and the run's
    held-out predictions and `epiray impute`'s predictor are both the blend."""
    import mlflow

    from epiray.impute import ModelPredictor, ModelScope
    from epiray.train import (
        ValidationSection,
        _read_predictions,
        final_checkpoint,
        load_predictor,
        load_shards,
    )

    _, store = tiny_store
    with pytest.raises(ValueError, match="calibrate needs whole validation experiments"):
        ValidationSection(scheme="none", calibrate=True)
    with pytest.raises(ValueError, match="per_assay 0"):
        ValidationSection(per_assay=0, calibrate=True)
    cfg = config(
        tmp_path,
        store,
        validation=ValidationSection(
            scheme="experiments", per_assay=1, min_train=1, refit=True, calibrate=True
        ),
        train=LoopParams(epochs=3, patience=None, autocast="off"),
    )
    _, (spec,) = plan_runs(cfg)
    assert spec.withheld and set(spec.withheld) <= set(spec.validate) and spec.calibrate
    assert "blended with average activity" in spec.summary
    assert "retrained on every track and bin" in spec.summary
    (r,) = train(cfg)
    meta = json.loads(open(f"{r.checkpoint}/meta.json").read())
    assert meta["phase"] == "refit"
    assert meta["train"] == spec.all_train  # the refit trained on them too
    cal = meta["calibration"]
    # three epochs on a tiny slab: AA earns a share, so the blend below is not the model
    assert 0.0 <= cal["weight"] < 1.0 and cal["tracks"] == len(spec.withheld)
    assert cal["mse_blend"] <= min(cal["mse_model"], cal["mse_average_activity"]) + 1e-9
    tags = mlflow.MlflowClient(r.spec.tracking_uri).get_run(r.mlflow_run_id).data.tags
    assert tags["epiray.calibration_weight"] == f"{cal['weight']:.4f}"
    # sidecars, the hub and `epiray info` say so
    scope = ModelScope.from_run_meta(meta, "chr1", "run")
    assert f"blended with average activity (model weight {cal['weight']:.2f})" in (
        scope.description
    )
    # the held-out predictions: w · model + (1 − w) · AA of the run's observed tracks
    exps = store.experiments().set_index("experiment")
    run_dir = final_checkpoint(r.checkpoint.rsplit("/", 1)[0])
    raw = ModelPredictor(load_shards(run_dir))
    calibrated = load_predictor(r.checkpoint.rsplit("/", 1)[0].replace("chr1", "{chrom}"), "chr1")
    n = store.n_bins("mmSyn1", "chr1")
    for e in spec.evaluate:
        b, a = exps.loc[e, "biosample"], exps.loc[e, "assay"]
        same = [t for t in spec.train + spec.validate if exps.loc[t, "assay"] == a]
        model = raw.predict_chrom("chr1", [(b, a)], 0, n)[0]
        want = model
        if same:
            aa = store.read("mmSyn1", "chr1", same).mean(0)
            want = cal["weight"] * model + (1 - cal["weight"]) * aa
        np.testing.assert_allclose(_read_predictions(r.spec, e), want, rtol=1e-5, atol=1e-5)
        # `epiray impute` blends the same way
        got = calibrated.predict_chrom("chr1", [(b, a)], 0, n)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_calibration_beside_validation_cells(tmp_path, tiny_store):
    """Under validation cells, calibrate trains a calibration model without whole withheld
    experiments to fit the weight; the final model then trains on every track as the
    uncalibrated config does (the same model, seed for seed), and is blended by it."""
    from epiray.impute import ModelPredictor
    from epiray.train import ValidationSection, _read_predictions, final_checkpoint, load_shards

    _, store = tiny_store
    kw = dict(
        train=LoopParams(epochs=2, patience=None, autocast="off"),
        scaling=ScalingSection(num_workers=1, use_gpu=False),
    )
    cal_cfg = config(
        tmp_path / "cal",
        store,
        validation=ValidationSection(
            scheme="cells", fraction=0.2, per_assay=1, min_train=1, calibrate=True
        ),
        **kw,
    )
    _, (spec,) = plan_runs(cal_cfg)
    assert spec.holdout and spec.withheld and spec.validate == spec.withheld
    assert not set(spec.withheld) & set(spec.train) and not spec.refit
    assert sorted(spec.all_train) == sorted(spec.train + spec.withheld)
    assert f"{len(spec.withheld)} held out for calibration" in spec.summary
    assert f"{len(spec.withheld)} held out for validation" not in spec.summary
    plain_cfg = config(
        tmp_path / "plain", store, validation=ValidationSection(scheme="cells", fraction=0.2), **kw
    )
    _, (plain_spec,) = plan_runs(plain_cfg)
    assert plain_spec.train == spec.all_train and plain_spec.holdout == spec.holdout
    (r,) = train(cal_cfg)
    (p,) = train(plain_cfg)
    meta = json.loads(open(f"{r.checkpoint}/meta.json").read())
    # the final model trained on every track; the calibration model's epochs come first
    assert meta["phase"] == "fit" and meta["train"] == spec.all_train
    assert meta["calibration"]["tracks"] == len(spec.withheld)
    assert meta["calibration_epochs"] == 2 and len(meta["calibration_history"]) == 2
    assert r.checkpoint.endswith("epoch0004_final")
    # both phases stop early on the cells (whole tracks are reported beside them)
    for h in (meta["history"][-1], meta["calibration_history"][-1]):
        assert h["val_mse"] == h["val_mse_cells"]
    # the final model is the uncalibrated config's, seed for seed; its imputations are blended
    raw = ModelPredictor(load_shards(final_checkpoint(r.checkpoint.rsplit("/", 1)[0])))
    w = meta["calibration"]["weight"]
    exps = store.experiments().set_index("experiment")
    n = store.n_bins("mmSyn1", "chr1")
    for e in spec.evaluate:
        b, a = exps.loc[e, "biosample"], exps.loc[e, "assay"]
        model = raw.predict_chrom("chr1", [(b, a)], 0, n)[0]
        np.testing.assert_allclose(model, _read_predictions(p.spec, e), rtol=1e-6, atol=1e-6)
        same = [t for t in spec.all_train if exps.loc[t, "assay"] == a]
        want = model
        if same:
            want = w * model + (1 - w) * store.read("mmSyn1", "chr1", same).mean(0)
        np.testing.assert_allclose(_read_predictions(r.spec, e), want, rtol=1e-5, atol=1e-5)
    # calibration_only trains the calibration model alone: the same weight, no imputations,
    # so the uncalibrated run plus that weight is the calibrated run
    only_cfg = cal_cfg.model_copy(update={"out": str(tmp_path / "only")})
    (c,) = train(only_cfg, calibration_only=True)
    only = json.loads(open(f"{c.checkpoint}/meta.json").read())
    assert c.checkpoint.endswith("epoch0002_final") and only["phase"] == "calibrate"
    assert only["calibration"] == meta["calibration"] and c.scores.empty
    assert not list((tmp_path / "only").rglob("predictions"))
    with pytest.raises(ConfigError, match="calibration_only needs validation.calibrate"):
        train(plain_cfg, calibration_only=True)


def _with_synteny(tmp_path, store, mappings):
    """A copy of the store's summary with synteny mappings added (enough to plan runs: the
    plan reads no track)."""
    from epiray.store import SUMMARY, Store

    root = tmp_path / ("store_" + "_".join(mappings))
    root.mkdir()
    summary = json.loads((store.root / SUMMARY).read_text())
    summary["synteny"] = mappings
    (root / SUMMARY).write_text(json.dumps(summary))
    return Store.open(root)


def test_plan_refuses_other_species_configs_that_cannot_work(tmp_path, tiny_store, capsys):
    """A cross-species model without synteny and aux_species, aux_species without synteny
    (eDICE too), a synteny the store lacks or one onto another assembly: refused when planned,
    naming the keys to set and the store's mappings, not in a Ray worker."""
    from epiray.cli import main
    from epiray.config import dump_config

    _, bare = tiny_store
    avocado = {"n_nodes": 32, "n_layers": 1, "n_assay_factors": 16}
    cross = ModelSection(name="avocado", params={**avocado, "variant": "cross_species"})
    edice = ModelSection(name="edice", params={"dim": 8, "heads": 2, "n_targets": 2})
    # the store has no mapping: the message says how to build one
    with pytest.raises(
        ConfigError,
        match=r"(?s)variant cross_species.*got synteny: null, "
        r"aux_species: false.*Set synteny: NAME and aux_species: true.*"
        r"no synteny mapping yet.*epiray synteny",
    ):
        plan_runs(config(tmp_path, bare, model=cross))

    store = _with_synteny(tmp_path, bare, {"hs2mm": {"mouse_assembly": "mmSyn1"}})
    with pytest.raises(
        ConfigError,
        match=r"(?s)Set synteny: hs2mm and aux_species: true.*"
        r"synteny mappings \['hs2mm'\] onto mmSyn1.*variant: mouse_only",
    ):
        plan_runs(config(tmp_path, store, model=cross))
    with pytest.raises(
        ConfigError,
        match=r"aux_species: false \(0 other-species tracks\)\. Set aux_species: true \(",
    ):
        plan_runs(config(tmp_path, store, model=cross, synteny="hs2mm"))
    with pytest.raises(
        ConfigError,
        match=r"aux_species: true \(0 other-species tracks\)\. "
        r"Set synteny: hs2mm \(",
    ):
        plan_runs(config(tmp_path, store, model=cross, aux_species=True))
    with pytest.raises(ConfigError, match=r"aux_species: true adds .* Set synteny: hs2mm"):
        plan_runs(config(tmp_path, store, model=edice, aux_species=True))
    with pytest.raises(ConfigError, match=r"synteny 'nope' is not in store.*\['hs2mm'\]"):
        plan_runs(config(tmp_path, store, model=edice, synteny="nope", aux_species=True))
    other = _with_synteny(tmp_path, bare, {"mm2hs": {"mouse_assembly": "hsSyn1"}})
    with pytest.raises(ConfigError, match=r"synteny 'mm2hs' maps onto assembly hsSyn1"):
        plan_runs(config(tmp_path, other, model=edice, synteny="mm2hs", aux_species=True))

    # `epiray train --plan` refuses it too: exit 2, one message
    cfg = config(tmp_path, store, model=cross)
    dump_config(cfg, tmp_path / "cross.yaml")
    assert main(["train", "--config", str(tmp_path / "cross.yaml"), "--plan"]) == 2
    err = capsys.readouterr().err
    assert "synteny: hs2mm and aux_species: true" in err and "Traceback" not in err

    # complete: planned with the human tracks, and the run's first line says so
    _, (spec,) = plan_runs(config(tmp_path, store, model=cross, synteny="hs2mm", aux_species=True))
    n_human = sum(v["species"] == "human" for v in store.summary["experiments"].values())
    assert len(spec.aux) == n_human > 0 and spec.aux_name == "hs2mm"
    assert (
        f"training on {len(spec.train) + n_human} tracks ({len(spec.train)} mouse + {n_human} "
        "human through synteny hs2mm)" in spec.summary
    )
    assert "5 % of the mouse tracks' bins held out for validation" in spec.summary


def test_fold_scheme_all_and_the_run_first_line(tmp_path, tiny_store):
    """`folds.scheme: all` (also `none`) trains on every track; each run's first line says
    what it trains on and what it holds out, as it actually does."""
    from epiray.errors import InputDataError
    from epiray.train import ValidationSection

    _, store = tiny_store
    n_mouse = sum(v["species"] == "mouse" for v in store.summary["experiments"].values())
    _, (spec,) = plan_runs(config(tmp_path, store, folds=FoldSection(scheme="all")))
    assert spec.fold == "all" and len(spec.train) == n_mouse and not spec.evaluate
    assert spec.summary == (
        f"avocado_mouse_only chr1: training on all {n_mouse} mouse tracks, 5 % of their bins "
        "held out for validation"
    )
    _, (same,) = plan_runs(config(tmp_path, store, folds=FoldSection(scheme="none")))
    assert same.train == spec.train and same.summary == spec.summary
    # held-out folds
    _, (cv,) = plan_runs(config(tmp_path, store))
    assert cv.summary.startswith(
        f"avocado_mouse_only chr1 fold0: training on {len(cv.train)} mouse tracks, "
        f"{len(cv.evaluate)} held out for testing"
    )
    # whole validation experiments, refit, no validation
    _, (ex,) = plan_runs(
        config(
            tmp_path,
            store,
            folds=FoldSection(scheme="all"),
            validation=ValidationSection(scheme="experiments", per_assay=1, min_train=1),
        )
    )
    assert ex.validate and f"{len(ex.validate)} held out for validation" in ex.summary
    assert "training on all" not in ex.summary
    _, (rf,) = plan_runs(config(tmp_path, store, validation=ValidationSection(refit=True)))
    assert rf.summary.endswith("then retrained on every bin for the epochs validation chose")
    _, (nv,) = plan_runs(config(tmp_path, store, validation=ValidationSection(scheme="none")))
    assert nv.summary.endswith("no validation: trains all 3 epochs")
    # the store's manifest has no folds: the manifest scheme says to use `all`
    with pytest.raises(InputDataError, match=r"fold.*empty.*folds\.scheme: all"):
        plan_runs(config(tmp_path, store, folds=FoldSection(scheme="manifest")))
