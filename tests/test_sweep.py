"""epiray.sweep: configs, cells, concurrency, the per-unit ASHA, the summary, a real Tune sweep."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from epiray.errors import ConfigError
from epiray.store import Store
from epiray.sweep import (
    Cell,
    SchedulerSection,
    SweepConfig,
    _live_placement_groups,
    add_cli_args,
    apply_overrides,
    best_table,
    cell_asha,
    cli_run,
    compare,
    concurrency_limit,
    load_sweep_config,
    plan_cells,
    run_sweep,
)
from epiray.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _train(**kw) -> dict:
    base = {"store": "/nonexistent/store", "out": "/nonexistent/out", "assembly": "mmSyn1"}
    return {**base, **kw}


# ------------------------------------------------------------------------------------ config
def test_search_domains_are_validated():
    ok = SweepConfig(
        name="s",
        out="/tmp/x",
        train=_train(),
        search={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.params.n_nodes": {"choice": [8]}},
    )
    assert ok.search["train.lr"].example() == 1e-4
    assert ok.search["model.params.n_nodes"].upper() == 8
    for bad, msg in [
        ({"uniform": [1, 2], "choice": [1]}, "exactly one"),
        ({"uniform": [2, 1]}, "low < high"),
        ({"loguniform": [0, 1]}, "low > 0"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            from epiray.config import parse_config

            parse_config(
                SweepConfig,
                {"name": "s", "out": "o", "train": _train(), "search": {"train.lr": bad}},
                "sweep.yaml",
            )
    with pytest.raises(ConfigError, match="both grid and search"):
        parse_config(
            SweepConfig,
            {
                "name": "s",
                "out": "o",
                "train": _train(),
                "grid": {"train.lr": [1e-3]},
                "search": {"train.lr": {"uniform": [0.1, 0.2]}},
            },
        )
    with pytest.raises(ConfigError, match=r"search keys \['folds.fold'\] choose the data"):
        parse_config(
            SweepConfig,
            {
                "name": "s",
                "out": "o",
                "train": _train(),
                "search": {"folds.fold": {"choice": [0, 1]}},
            },
        )
    with pytest.raises(ConfigError, match="grid.folds.fold: .*empty"):
        parse_config(
            SweepConfig, {"name": "s", "out": "o", "train": _train(), "grid": {"folds.fold": []}}
        )


def test_apply_overrides_sets_dotted_keys_and_names_bad_ones():
    base = TrainConfig.model_validate(_train())
    cfg = apply_overrides(
        base,
        {"model.params.n_nodes": 32, "train.lr": 0.01, "folds.fold": 2, "chroms": ["chr2"]},
    )
    assert cfg.model.params["n_nodes"] == 32 and cfg.train.lr == 0.01
    assert cfg.folds.fold == 2 and cfg.chroms == ["chr2"]
    assert base.train.lr == 1e-3  # the base is untouched (frozen config, copied)
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        apply_overrides(base, {"train.lrr": 1.0}, "sweep s")
    with pytest.raises(ConfigError, match="'assembly', which is a str"):
        apply_overrides(base, {"assembly.x": 1})
    with pytest.raises(ConfigError, match="model.params for 'avocado'"):
        apply_overrides(base, {"model.params.n_nodez": 3})


def test_load_sweep_config_resolves_the_train_file_and_paths(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "train.yaml").write_text(
        yaml.safe_dump({"store": "../data/store", "out": "runs", "assembly": "mmSyn1"})
    )
    (tmp_path / "sweep.yaml").write_text(
        yaml.safe_dump(
            {"name": "s1", "out": "sweeps", "train": "cfg/train.yaml", "grid": {"folds.fold": [0]}}
        )
    )
    cfg = load_sweep_config(tmp_path / "sweep.yaml")
    assert cfg.out == str(tmp_path / "sweeps")
    assert cfg.train.store == str(tmp_path / "data" / "store")  # against the train file
    assert cfg.train.out == str(sub / "runs")
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({"name": "s1", "out": "o", "train": "cfg/missing.yaml"})
    )
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_sweep_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text(
        yaml.safe_dump({"name": "bad name", "out": "o", "train": "cfg/train.yaml", "grdi": {}})
    )
    with pytest.raises(ConfigError, match=r"(?s)bad2.yaml.*name.*grdi: unknown key"):
        load_sweep_config(tmp_path / "bad2.yaml")


def _cell(cid="a", workers=2, cpw=1.0, gpu=False, unit=None) -> Cell:
    return Cell(
        id=cid,
        overrides={},
        label=unit or cid,
        chrom="chr1",
        scheme="experiment",
        fold="fold0",
        variant=None,
        grid={},
        epochs=3,
        workers=workers,
        cpus_per_worker=cpw,
        use_gpu=gpu,
    )


def test_concurrency_limit_from_trial_resources():
    cells = [_cell(workers=2, cpw=1.0), _cell("b", workers=1, cpw=1.0)]
    assert concurrency_limit(cells, {"CPU": 4.0}) == 2  # the largest trial: 2 CPUs
    assert concurrency_limit(cells, {"CPU": 7.0}) == 3
    assert concurrency_limit(cells, {"CPU": 1.0}) == 1  # too small: one at a time (warned)
    assert concurrency_limit(cells, {"CPU": 4.0}, cap=5) == 5
    gpu = [_cell(workers=2, cpw=4, gpu=True)]
    assert concurrency_limit(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2  # GPUs bind first
    auto = [_cell(workers=1, cpw=2, gpu="auto")]
    assert concurrency_limit(auto, {"CPU": 8.0, "GPU": 1.0}) == 1  # auto: uses the GPU
    assert concurrency_limit(auto, {"CPU": 8.0}) == 4  # no GPU on the cluster: CPUs only


def test_cell_asha_ranks_trials_only_within_their_unit():
    sched = cell_asha(
        {"a.lr1": "a", "a.lr2": "a", "b.lr1": "b"},
        metric="val_mse",
        mode="min",
        max_t=10,
        grace_period=1,
        reduction_factor=2,
    )

    def trial(tid, cell):
        return SimpleNamespace(trial_id=tid, config={"cell": cell})

    a1, a2, b1 = trial("t1", "a.lr1"), trial("t2", "a.lr2"), trial("t3", "b.lr1")
    for t in (a1, a2, b1):
        sched.on_trial_add(None, t)
    r = {"epoch": 1.0, "val_mse": 0.1}
    assert sched.on_trial_result(None, a1, r) == "CONTINUE"
    # worse than a1 at the same rung, same unit: stopped
    assert sched.on_trial_result(None, a2, {"epoch": 1.0, "val_mse": 0.5}) == "STOP"
    # worse than a1 too, but another unit (other fold/chrom/model): not compared, continues
    assert sched.on_trial_result(None, b1, {"epoch": 1.0, "val_mse": 0.9}) == "CONTINUE"
    # results without the time attribute or metric are no decision
    assert sched.on_trial_result(None, b1, {"final": 1.0}) == "CONTINUE"
    sched.on_trial_complete(None, a1, {"epoch": 3.0, "val_mse": 0.05})
    sched.on_trial_remove(None, a1)  # already complete: no error
    assert "2" in sched.debug_string()


def _scores(model, experiments, fold, value, chrom="chr1"):
    return [
        {
            "model": model,
            "experiment": e,
            "biosample": f"B{i}",
            "assay": "H3K4me3",
            "category": "histone_modification",
            "species": "mouse",
            "fold": fold,
            "chrom": chrom,
            "mse": value + 0.01 * i,
            "pearson": 0.5,
        }
        for i, e in enumerate(experiments)
    ]


def test_best_table_and_comparison_deduplicate_the_baseline():
    cfg = SweepConfig(name="s", out="/tmp/x", train=_train(), grid={"train.lr": [0.1, 0.01]})
    exps = ["e1", "e2", "e3"]
    rows = []
    for tid, model, val, status, mse in [
        ("t1", "small", 0.30, "finished", 0.40),
        ("t2", "small", 0.20, "finished", 0.35),  # best of "small" by validation
        ("t3", "wide", 0.25, "finished", 0.30),
        ("t4", "wide", 0.10, "stopped", None),  # stopped early: never selected
        ("t5", "wide", 0.05, "error", None),
    ]:
        scores = (
            _scores(model, exps, "fold0", mse) + _scores("average_activity", exps, "fold0", 0.5)
            if mse
            else []
        )
        rows.append(
            {
                "trial_id": tid,
                "model": model,
                "chrom": "chr1",
                "scheme": "experiment",
                "fold": "fold0",
                "status": status,
                "epochs": 3,
                "val_mse": val,
                "best_val_mse": val,
                "test_mse": mse,
                "test_pearson": 0.5,
                "train.lr": 0.1 if tid in ("t1", "t3") else 0.01,
                "scores_json": pd.DataFrame(scores).to_json(orient="records") if mse else None,
            }
        )
    trials = pd.DataFrame(rows)
    best = best_table(trials, cfg)
    assert list(best["trial_id"]) == ["t2", "t3"]
    assert list(best["n_trials"]) == [2, 1]
    assert list(best["best_in_fold"]) == [True, False]  # 0.20 < 0.25
    assert list(best["train.lr"]) == [0.01, 0.1]
    scores, tables = compare(trials, best, cfg)
    base = scores[scores["model"] == "average_activity"]
    assert len(base) == 3  # computed by both selected trials, kept once
    table = tables["experiment"]["mse"]
    assert list(table.index) == ["average_activity", "small", "wide"]
    assert list(table["n"]) == [3, 3, 3]
    assert table.loc["small", "overall"] == pytest.approx(0.36)
    assert table.loc["wide", "overall"] == pytest.approx(0.31)
    assert "pearson" in tables["experiment"]


# ------------------------------------------------------------------------------------ with Ray
@pytest.fixture(scope="module")
def sweep_train(tiny_store, tmp_path_factory):
    """Base train config on the tiny store: small Avocado, 3 epochs, validation tracks."""
    _, store = tiny_store
    out = tmp_path_factory.mktemp("sweep")
    return out, {
        "store": str(store.root),
        "out": str(out / "train"),
        "assembly": "mmSyn1",
        "chroms": ["chr1"],
        "model": {
            "name": "avocado",
            "params": {
                "variant": "mouse_only",
                "n_nodes": 16,
                "n_layers": 1,
                "n_assay_factors": 8,
                "n_biosample_factors": 8,
                "n_genome_factors": [8, 8, 8],
            },
        },
        "folds": {"scheme": "experiment", "k": 3, "fold": 0},
        "validation": {"per_assay": 1, "min_train": 1},
        "train": {"epochs": 3, "batch_size": 512, "patience": None, "checkpoint_every": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2, "use_gpu": False},
        "tracking": {"experiment": "sweep-test"},
    }


@pytest.mark.ray
def test_plan_cells_expands_chromosomes_folds_and_variants(sweep_train):
    out, train = sweep_train
    cfg = SweepConfig(
        name="plan",
        out=str(out / "plan"),
        train={**train, "chroms": "all", "folds": {"scheme": "experiment", "fold": "all"}},
        variants={"small": {"model.params.n_nodes": 8}, "wide": {}},
        grid={"folds.scheme": ["experiment", "zero_shot"]},
    )
    cells = plan_cells(cfg)
    assert len(cells) == 2 * 2 * 2 * 3  # variants x schemes x chroms x folds
    c = cells[0]
    assert c.id == "small.chr1.experiment.fold0" and c.unit == c.id
    assert c.overrides["chroms"] == ["chr1"] and c.overrides["folds.fold"] == 0
    assert c.overrides["variant_name"] == "small" and c.overrides["model.params.n_nodes"] == 8
    assert {(x.scheme, x.fold) for x in cells} >= {("zero_shot", "fold2"), ("experiment", "fold1")}
    assert {x.chrom for x in cells} == {"chr1", "chr2"}

    bad = cfg.model_copy(update={"grid": {"chroms": [["chr1"], ["chrX"]]}})
    with pytest.raises(ConfigError, match=r"(?s)chroms=\[\"chrX\"\].*chroms \['chrX'\] not in"):
        plan_cells(bad)
    noval = cfg.model_copy(
        update={"train": TrainConfig.model_validate({**train, "validation": {"per_assay": 0}})}
    )
    with pytest.raises(ConfigError, match="no validation experiments.*ranked by val_mse"):
        plan_cells(noval)
    # validation cells (the train default) rank trials too
    base = cfg.train.model_dump(mode="json")
    cells_val = cfg.model_copy(
        update={"train": TrainConfig.model_validate({**base, "validation": {"scheme": "cells"}})}
    )
    assert len(plan_cells(cells_val)) == len(cells)


def _mlflow_runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    mlc = MlflowClient(uri)
    exp = mlc.get_experiment_by_name(experiment)
    return mlc, mlc.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.ray
def test_sweep_asha_mlflow_comparison_and_restore(sweep_train):
    """Four trials, two model labels x two learning rates, two at a time: the good learning
    rates run first; the bad ones are stopped by ASHA at their first rung (compared only with
    their own label's trial); the comparison table keeps the average activity once; running the
    config again restores the finished experiment without training anything."""
    out, train = sweep_train
    cfg = SweepConfig(
        name="e2e",
        out=str(out / "e2e"),
        train=train,
        grid={"train.lr": [0.03, 1e-7], "variant_name": ["small", "wide"]},
        scheduler={"grace_period": 1, "reduction_factor": 2},
        verbose=0,
    )
    before = _live_placement_groups()
    res = run_sweep(cfg)
    # no trial (stopped ones included) still holds CPUs when the sweep returns
    assert _live_placement_groups() - before == set()
    t = res.trials.set_index(["model", "train.lr"])
    assert len(t) == 4
    assert t.loc[("small", 0.03), "status"] == "finished"
    assert t.loc[("wide", 0.03), "status"] == "finished"
    assert t.loc[("small", 1e-7), "status"] == "stopped"
    assert t.loc[("wide", 1e-7), "status"] == "stopped"
    # per-epoch results reached Tune from the Train run
    assert (t.loc[t["status"] == "finished", "epochs"] == 3).all()
    assert (t.loc[t["status"] == "stopped", "epochs"] < 3).all()
    assert list(res.best["model"]) == ["small", "wide"]

    table = res.comparison["experiment"]["mse"]
    assert list(table.index) == ["average_activity", "small", "wide"]
    assert table["n"].nunique() == 1 and table["n"].iloc[0] >= 1
    base = res.scores[res.scores["model"] == "average_activity"]
    assert not base.duplicated(["experiment", "chrom", "fold"]).any()

    uri = "sqlite:///" + str(out / "e2e" / "mlflow.db")
    mlc, runs = _mlflow_runs(uri, "sweep-test")
    parent = next(r for r in runs if r.info.run_name == "sweep.e2e")
    assert parent.info.run_id == res.mlflow_run_id and parent.info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(kids) == 4
    assert all(r.info.status != "RUNNING" for r in kids)
    by_trial = {r.data.tags["epiray.trial"]: r for r in kids}
    for tid, row in res.trials.set_index("trial_id").iterrows():
        run = by_trial[tid]
        assert run.info.run_name.endswith(f".chr1.fold0.{tid}")
        if row["status"] == "finished":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["test/mse"] == pytest.approx(row["test_mse"])
        else:
            assert run.info.status == "KILLED"
            assert run.data.tags["epiray.stopped_early"] == "true"
    assert parent.data.metrics["experiment/small/mse_overall"] == pytest.approx(
        table.loc["small", "overall"]
    )
    assert parent.data.metrics["trials/stopped"] == 2
    # the comparison per fold, for the UI's charts; a model-training experiment
    for model in ("small", "wide", "average_activity"):
        assert parent.data.metrics[f"heldout_mse/{model}/fold0"] == pytest.approx(
            table.loc[model, "overall"]
        )
    exp = mlc.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    store_hash = Store.open(train["store"]).store_hash
    assert [d.dataset.digest for d in parent.inputs.dataset_inputs] == [store_hash]
    # every trial's run kept its own resolved config and recorded the store as its input
    runs_dir = out / "e2e" / "e2e" / "runs"
    for tid, row in res.trials.set_index("trial_id").iterrows():
        resolved = yaml.safe_load(
            (runs_dir / f"{row['model']}.chr1.fold0.{tid}.resolved.yaml").read_text()
        )
        assert resolved["train"]["lr"] == row["train.lr"]
        (ds,) = by_trial[tid].inputs.dataset_inputs
        assert ds.dataset.digest == store_hash
    arts = {a.path for a in mlc.list_artifacts(parent.info.run_id, "tables")}
    assert {
        "tables/comparison_experiment_mse.csv",
        "tables/best.csv",
        "tables/trials.csv",
        "tables/summary.md",
    } <= arts
    assert (out / "e2e" / "e2e" / "summary.md").read_text().startswith("sweep e2e: 4 trials")
    text = res.format()
    assert "held-out mse, experiment folds:" in text and "average_activity" in text

    # again, through the CLI helper: Tune restores the finished experiment; nothing trains,
    # same parent run
    path = out / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    buf = io.StringIO()
    again = cli_run(parser.parse_args(["--config", str(path), "--max-concurrent", "1"]), buf)
    assert "held-out mse, experiment folds:" in buf.getvalue()
    assert again.restored and again.mlflow_run_id == res.mlflow_run_id
    assert set(again.trials["trial_id"]) == set(res.trials["trial_id"])
    pd.testing.assert_frame_equal(again.comparison["experiment"]["mse"], table)
    _, runs2 = _mlflow_runs(uri, "sweep-test")
    assert len(runs2) == len(runs)
    # a changed grid is refused rather than mixed into the old experiment
    changed = cfg.model_copy(update={"grid": {"train.lr": [0.03]}})
    with pytest.raises(ConfigError, match="cells of .* differ"):
        run_sweep(changed)
    rescheduled = cfg.model_copy(update={"scheduler": SchedulerSection(grace_period=2)})
    with pytest.raises(ConfigError, match=r"\['scheduler'\] changed since the sweep"):
        run_sweep(rescheduled)
    with pytest.raises(ConfigError, match="exists; expected a new sweep with resume: false"):
        run_sweep(cfg.model_copy(update={"resume": False}))


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_resumes(sweep_train, tmp_path):
    """A sweep killed while its first trials train is restored by running it again: the
    unfinished trials' Train runs resume from their checkpoints and every trial finishes."""
    out, train = sweep_train
    cfg = {
        "name": "interrupted",
        "out": str(tmp_path / "sw"),
        "train": {
            **train,
            "train": {"epochs": 6, "batch_size": 256, "patience": None, "checkpoint_every": 1},
        },
        "grid": {"folds.fold": [0, 1]},
        "scheduler": {"kind": "fifo"},
        "verbose": 0,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = (
        "import sys; from epiray.sweep import load_sweep_config, run_sweep; "
        "run_sweep(load_sweep_config(sys.argv[1]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], start_new_session=True)
    runs = tmp_path / "sw" / "interrupted" / "runs"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list(runs.glob("*/epoch0002")):
        assert proc.poll() is None, "the sweep ended before it was interrupted"
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray runtime
    proc.wait()
    state = json.loads((tmp_path / "sw" / "interrupted" / "epiray_sweep.json").read_text())
    res = run_sweep(load_sweep_config(path))
    assert res.restored and res.mlflow_run_id == state["mlflow_run_id"]
    assert (res.trials["status"] == "finished").all() and len(res.trials) == 2
    assert (res.trials["epochs"] == 6).all()
    _, runs_ = _mlflow_runs("sqlite:///" + str(tmp_path / "sw" / "mlflow.db"), "sweep-test")
    kids = [r for r in runs_ if r.data.tags.get("mlflow.parentRunId") == res.mlflow_run_id]
    assert sorted(r.info.status for r in kids) == ["FINISHED", "FINISHED"]


@pytest.mark.parametrize("job", ["ingest", "synteny", "train", "sweep", "evaluate", "impute"])
def test_job_entrypoints_forward_to_their_command(job, monkeypatch, capsys):
    """``python jobs/<job>.py ARGS`` is ``epiray <job> ARGS`` (here: ``--help``)."""
    import runpy

    from epiray.cli import COMMANDS

    path = ROOT / "jobs" / f"{job}.py"
    assert f'main(["{job}", *sys.argv[1:]])' in path.read_text()
    assert f"python jobs/{job}.py --config configs/" in path.read_text()
    if job not in COMMANDS:
        pytest.skip(f"`epiray {job}` is not a command of epiray.cli yet")
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_.value.code == 0
    assert f"usage: epiray {job}" in capsys.readouterr().out
