"""`epiray extend`: transfer onto trained runs from the command line (issue 19).

One tiny Avocado parent is trained (module-wide) on a copy of the tiny store without one mouse
biosample, one mouse assay and one more track; the full store is the superset the new
experiments come from. Bad inputs are refused before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from epiray.config import parse_config
from epiray.errors import ConfigError
from epiray.extend import ExtendConfig, extend, load_extend_config, plan_extension
from epiray.loop import LoopParams
from epiray.tracking import TrackingConfig
from epiray.train import (
    FoldSection,
    ModelSection,
    ScalingSection,
    TrainConfig,
    final_checkpoint,
    train,
)

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"n_nodes": 32, "n_layers": 1, "n_assay_factors": 16, "n_biosample_factors": 8}
LOOP = dict(epochs=3, batch_size=1024, patience=None, checkpoint_every=1, min_steps=1)


@pytest.fixture(scope="module")
def parent(tiny_store, tmp_path_factory):
    """(full store, parent store, parent runs folder, what was left out of the parent)."""
    _, full = tiny_store
    exps = full.experiments("mmSyn1")
    counts = exps.groupby("biosample").size().sort_values()
    new_b = counts.index[-1]  # the best-assayed mouse biosample: several tracks to fit from
    rest = exps[exps["biosample"] != new_b]
    per_assay = rest.groupby("assay").size()
    new_a = per_assay[per_assay >= 2].index.sort_values()[0]
    rest = rest[rest["assay"] != new_a]
    # a track of a known biosample and a known assay, left out too (nothing new to fit)
    b_counts, a_counts = rest.groupby("biosample").size(), rest.groupby("assay").size()
    known_pair = next(
        r.experiment
        for r in rest.itertuples()
        if b_counts[r.biosample] > 1 and a_counts[r.assay] > 1
    )
    drop = set(exps["experiment"]) - set(rest["experiment"]) | {known_pair}
    root = tmp_path_factory.mktemp("extend")
    pstore = full.copy(root / "parent_store", without=sorted(drop))
    cfg = TrainConfig(
        store=str(pstore.root),
        out=str(root / "runs"),
        assembly="mmSyn1",
        chroms=["chr1"],
        model=ModelSection(name="avocado", params=PARAMS),
        folds=FoldSection(scheme="all"),
        train=LoopParams(**LOOP),
        scaling=ScalingSection(num_workers=2, use_gpu=False),
        tracking=TrackingConfig(tracking_uri="sqlite:///mlflow.db", experiment="t-extend"),
    )
    (result,) = train(cfg)
    return {
        "full": full,
        "store": pstore,
        "runs": root / "runs",
        "root": root,
        "new_biosample": new_b,
        "new_assay": new_a,
        "known_pair": known_pair,
        "dropped": sorted(drop),
        "result": result,
    }


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def ecfg(parent, **kw) -> ExtendConfig:
    base = {
        "from": str(parent["runs"] / "avocado_mouse_only.{chrom}.all"),
        "store": str(parent["full"].root),
        "train": {**LOOP, "batch_size": 256, "lr": 0.01},
    }
    return ExtendConfig.model_validate({**base, **kw})


# ------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_written(parent, tmp_path, small_bigwigs, capsys):
    from epiray.cli import main
    from epiray.ingest import IngestConfig, ingest

    runs = parent["runs"]
    before = files_under(runs)
    b = parent["new_biosample"]
    known_b = sorted(set(parent["store"].experiments("mmSyn1")["biosample"]))[0]
    known_a = sorted(set(parent["store"].experiments("mmSyn1")["assay"]))[0]
    human = parent["full"].experiments("hsSyn1")["experiment"].iloc[0]
    in_model = parent["store"].experiments("mmSyn1")["experiment"].iloc[0]

    # another store: same experiments, but chr1 of mmSyn1 has another length
    other = tmp_path / "other_assembly"
    shutil.copytree(parent["full"].root, other)
    s = json.loads((other / "store.json").read_text())
    s["assemblies"]["mmSyn1"]["chrom_sizes"]["chr1"] += 1000
    (other / "store.json").write_text(json.dumps(s))
    # a store without the parent's assembly at all
    manifest, sizes, _ = small_bigwigs
    toy = ingest(IngestConfig(manifest=str(manifest), store=str(tmp_path / "toy"), chroms="all"))
    # a store of another compendium: the parent's experiments are not in it
    foreign = parent["full"].copy(tmp_path / "foreign", without=[in_model])

    cases = [
        (dict(experiments=[human]), rf"{human}' is of assembly hsSyn1"),
        (dict(experiments=["nope.exp"]), r"'nope.exp' is not in store .*another store"),
        (dict(store=str(other)), r"chromosome sizes of mmSyn1 differ"),
        (dict(store=str(toy.root)), r"has no assembly 'mmSyn1'"),
        (dict(store=str(foreign.root), biosamples=[b]), rf"not in it \({in_model}"),
        (dict(biosamples=[known_b]), rf"biosample '{known_b}' is already in the model"),
        (dict(assays=[known_a]), rf"assay '{known_a}' is already in the model"),
        (dict(experiments=[in_model]), rf"'{in_model}' is already in the model"),
        (
            dict(experiments=[parent["known_pair"]]),
            r"are both already in the model, so it brings nothing to fit",
        ),
        (dict(store=str(parent["store"].root)), r"nothing new"),
        (dict(chroms=["chr9"]), r"chroms \['chr9'\] not in assembly"),
        (dict(biosamples=[b], finetune=["mlp"]), r"finetune \['mlp'\] for Avocado"),
        (
            {"from": str(tmp_path / "nothing.{chrom}.all"), "biosamples": [b]},
            "no parent run matches",
        ),
    ]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            plan_extension(ecfg(parent, **kw))
    # an unfinished parent run
    unfinished = tmp_path / "runs" / "avocado_mouse_only.chr1.all"
    (unfinished / "epoch0001").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no final checkpoint \(latest: epoch0001\)"):
        plan_extension(
            ecfg(parent, **{"from": str(tmp_path / "runs/avocado_mouse_only.{chrom}.all")})
        )
    # from the command line: exit 2, one message, still nothing written
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "from": str(runs / "avocado_mouse_only.{chrom}.all"),
                "store": str(parent["full"].root),
                "experiments": [human],
                "out": str(tmp_path / "never"),
            }
        )
    )
    assert main(["extend", "--config", str(path)]) == 2
    assert not (tmp_path / "never").exists()
    # --plan checks a good config and prints the runs, training nothing
    good = {**yaml.safe_load(path.read_text()), "biosamples": [b], "experiments": "auto"}
    path.write_text(yaml.safe_dump(good))
    assert main(["extend", "--config", str(path), "--plan"]) == 0
    text = capsys.readouterr().out
    assert f"new biosamples: {b}" in text and "avocado_mouse_only+ext chr1: extends" in text
    assert not (tmp_path / "never").exists()
    assert files_under(runs) == before


def test_shipped_config_and_job_entrypoint(monkeypatch, capsys):
    import runpy
    import sys

    cfg = load_extend_config(ROOT / "configs" / "extend_avocado.yaml")
    assert cfg.parent.endswith("quickstart/runs/avocado_mouse_only.{chrom}.all")
    assert "train" in cfg.model_fields_set and "tracking" not in cfg.model_fields_set
    path = ROOT / "jobs" / "extend.py"
    assert 'main(["extend", *sys.argv[1:]])' in path.read_text()
    assert "python jobs/extend.py --config configs/extend_avocado.yaml" in path.read_text()
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage: epiray extend" in capsys.readouterr().out


def test_config_from_yaml_resolves_relative_paths(tmp_path):
    path = tmp_path / "conf" / "x.yaml"
    path.parent.mkdir()
    path.write_text("from: ../runs/avocado.{chrom}.all\nstore: ../store\nbiosamples: [B]\n")
    cfg = load_extend_config(path)
    assert cfg.parent == str(tmp_path / "runs" / "avocado.{chrom}.all")
    assert cfg.store == str(tmp_path / "store")
    with pytest.raises(ConfigError, match="one {chrom} placeholder"):
        parse_config(ExtendConfig, {"from": "runs/avocado.chr1.all"})
    with pytest.raises(ConfigError, match="scheme experiments"):
        parse_config(
            ExtendConfig, {"from": "r.{chrom}.all", "validation": {"scheme": "experiments"}}
        )


# ------------------------------------------------------------------------------- Avocado
@pytest.fixture(scope="module")
def extended(parent):
    """The parent extended with the new biosample and assay on chr1, and to chr2."""
    b, a = parent["new_biosample"], parent["new_assay"]
    cfg = ecfg(parent, biosamples=[b], assays=[a], chroms=["chr1", "chr2"])
    plan = plan_extension(cfg)
    return cfg, plan, extend(cfg, plan)


def test_avocado_extension_fits_only_what_is_new_and_imputes(parent, extended, tmp_path):
    import mlflow

    from epiray.cli import main
    from epiray.impute import run_scope

    b, a = parent["new_biosample"], parent["new_assay"]
    cfg, plan, results = extended
    assert plan.new_biosamples == [b] and plan.new_assays == [a]
    assert [(r.spec.chrom, r.kind) for r in plan.runs] == [("chr1", "rows"), ("chr2", "chrom")]
    assert "extends avocado_mouse_only.chr1.all" in plan.runs[0].spec.summary
    assert "new chromosome" in plan.runs[1].spec.summary
    rows_run = plan.runs[0]
    assert set(rows_run.spec.train) == set(plan.new_experiments)  # only the new tracks
    assert rows_run.train_cfg.scaling.num_workers == 2  # the parent's shards
    assert [r.spec.chrom for r in results] == ["chr1", "chr2"]
    runs = parent["runs"]
    pattern = str(runs / "avocado_mouse_only+ext.{chrom}.all")
    ck = final_checkpoint(pattern.format(chrom="chr1"))
    meta = json.loads((ck / "meta.json").read_text())
    # the extended vocabulary: the parent's names first, the new ones appended
    pmeta = json.loads((Path(parent["result"].checkpoint) / "meta.json").read_text())
    assert (
        meta["vocab"]["biosamples"][: len(pmeta["vocab"]["biosamples"])]
        == (pmeta["vocab"]["biosamples"])
    )
    assert meta["vocab"]["biosamples"][-1] == b and meta["vocab"]["assays"][-1] == a
    assert set(meta["train"]) == set(pmeta["train"]) | set(plan.new_experiments)
    assert meta["fit"] == plan.new_experiments
    assert meta["extend"]["trainable"] == ["biosample_factors.1", "assay_factors.1"]
    assert meta["extend"]["parent_checkpoint"] == parent["result"].checkpoint
    # only the new rows moved: network, genome factors and old rows are the parent's
    for rank in (0, 1):
        old = torch.load(f"{parent['result'].checkpoint}/rank{rank}.pt", weights_only=False)
        new = torch.load(ck / f"rank{rank}.pt", weights_only=False)
        for k, v in old["state_dict"].items():
            assert torch.equal(v, new["state_dict"][k]), k
        # the optimiser state of the new rows is kept in the checkpoint
        for k in ("biosample_factors.1", "assay_factors.1"):
            st = new["loop"]["dense_opt"][k]
            assert st["exp_avg"].shape == new["state_dict"][k].shape
            assert st["exp_avg"].abs().sum() > 0
        assert "hidden.0.weight" in new["loop"]["dense_opt"]  # the parent's, carried
    # the new chromosome: genome factors fitted, the rest from the chr1 extension
    ck2 = final_checkpoint(pattern.format(chrom="chr2"))
    meta2 = json.loads((ck2 / "meta.json").read_text())
    assert meta2["extend"]["kind"] == "chrom"
    assert meta2["extend"]["source_checkpoint"] == str(ck)
    assert all(n.startswith("genome.") for n in meta2["extend"]["trainable"])
    src = torch.load(ck / "rank0.pt", weights_only=False)["state_dict"]
    dst = torch.load(ck2 / "rank0.pt", weights_only=False)["state_dict"]
    for k in ("hidden.0.weight", "biosample_factors.1", "assay_factors.0"):
        assert torch.equal(src[k], dst[k])
    # MLflow: a new run, child of the parent's, tagged with what it extends
    mlc = mlflow.MlflowClient(results[0].spec.tracking_uri)
    run = mlc.get_run(results[0].mlflow_run_id)
    assert run.info.run_name == "avocado_mouse_only+ext.chr1.foldall"
    assert run.data.tags["mlflow.parentRunId"] == parent["result"].mlflow_run_id
    assert run.data.tags["epiray.parent_run"] == parent["result"].mlflow_run_id
    assert run.data.tags["epiray.new_biosamples"] == b
    assert len(mlc.get_metric_history(run.info.run_id, "train/mse")) == 3
    assert (runs / "avocado_mouse_only+ext.chr1.all.resolved.yaml").is_file()
    # what impute sees: the new names are in the model's scope, fitted
    scope = run_scope(pattern, "chr1")
    assert b in scope.biosamples and b in scope.fitted_biosamples and a in scope.fitted_assays
    # planned again, both runs would resume from their final checkpoints
    again = plan_extension(cfg)
    assert [r.resumes.name for r in again.runs] == ["epoch0003_final"] * 2
    assert "resumes from epoch0003_final" in again.describe()
    # a later call for a new chromosome alone starts from the chr1 extension already made
    (later,) = plan_extension(cfg.model_copy(update={"chroms": ["chr2"]})).runs
    assert later.kind == "chrom"
    assert later.spec.extra["extend"]["source_run"] == str(
        runs / "avocado_mouse_only+ext.chr1.all"
    )
    # `epiray impute` of new pairs, on both chromosomes
    full = parent["full"]
    observed = set(
        zip(full.experiments("mmSyn1")["biosample"], full.experiments("mmSyn1")["assay"])
    )
    assays = sorted(set(full.experiments("mmSyn1")["assay"]))
    pairs = [{"biosample": b, "assay": x} for x in assays if (b, x) not in observed][:1]
    pairs += [
        {"biosample": y, "assay": a}
        for y in sorted(set(full.experiments("mmSyn1")["biosample"]))
        if (y, a) not in observed
    ][:1]
    assert len(pairs) == 2
    conf = tmp_path / "impute.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "store": str(full.root),
                "output_dir": str(tmp_path / "imputed"),
                "model": pattern,
                "assembly": "mmSyn1",
                "pairs": pairs,
                "chroms": ["chr1", "chr2"],
                "executor": "local",
            }
        )
    )
    assert main(["impute", "--config", str(conf), "--no-hub"]) == 0
    bws = sorted((tmp_path / "imputed").rglob("*.bw"))
    assert len(bws) == 2


def test_extension_learned_the_new_biosample(parent, extended):
    """On the new biosample's own tracks, the fitted rows beat the same model with its new
    rows freshly initialised (what the extension started from)."""
    from epiray.train import load_shards

    pattern = str(parent["runs"] / "avocado_mouse_only+ext.{chrom}.all")
    ck = final_checkpoint(pattern.format(chrom="chr1"))
    full, b = parent["full"], parent["new_biosample"]
    mine = full.experiments("mmSyn1")
    mine = mine[mine["biosample"] == b]

    def mse(shards) -> float:
        errs = []
        for model, data in shards:
            v = model.vocab
            for e, a in zip(mine["experiment"], mine["assay"]):
                y = full.read("mmSyn1", "chr1", [e], data.lo, data.hi)[0]
                pred = model.predict(data, v.biosample_index(b), v.assay_index(a)).numpy()
                errs.append(np.mean((pred - y) ** 2))
        return float(np.mean(errs))

    fitted = mse(load_shards(ck, device="cpu", tracks=False))
    shards = load_shards(ck, device="cpu", tracks=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for model, _ in shards:
            model.biosample_factors[1].uniform_(-0.05, 0.05)
            model.assay_factors[1].uniform_(-0.05, 0.05)
    assert fitted < mse(shards)


def test_extension_resumes_with_more_epochs(parent, extended):
    """As `epiray train`: the same extension with more epochs continues from its checkpoint,
    with the new rows' Adam moments, and still trains only them."""
    cfg, _, (first, _) = extended
    more = cfg.train.model_copy(update={"epochs": 5, "checkpoint_every": 2})
    (r2,) = extend(cfg.model_copy(update={"train": more, "chroms": ["chr1"]}))
    assert list(r2.history["epoch"]) == [1, 2, 3, 4, 5]
    assert r2.history["train_mse"].tolist()[:3] == first.history["train_mse"].tolist()
    new = torch.load(Path(r2.checkpoint) / "rank0.pt", weights_only=False)
    old = torch.load(Path(parent["result"].checkpoint) / "rank0.pt", weights_only=False)
    for k, v in old["state_dict"].items():
        assert torch.equal(v, new["state_dict"][k]), k
    meta = json.loads((Path(r2.checkpoint) / "meta.json").read_text())
    # Adam's step count of the new rows went on from epoch 3's (5 epochs' worth, not 2)
    steps = int(new["loop"]["dense_opt"]["biosample_factors.1"]["step"])
    assert steps >= 4 * meta["regime"]["steps_per_epoch"]
    assert meta["extend"]["trainable"] == ["biosample_factors.1", "assay_factors.1"]


# ------------------------------------------------------------------------------- eDICE
def test_edice_extension_fine_tunes_on_new_tracks(parent, tmp_path):
    pstore = parent["store"]
    cfg = TrainConfig(
        store=str(pstore.root),
        out=str(tmp_path / "runs"),
        assembly="mmSyn1",
        chroms=["chr1"],
        model=ModelSection(
            name="edice",
            params={"dim": 8, "heads": 2, "ffn_hidden": 16, "mlp_hidden": 16, "n_targets": 2},
        ),
        folds=FoldSection(scheme="all"),
        train=LoopParams(epochs=2, batch_size=512, patience=None, min_steps=1),
        scaling=ScalingSection(num_workers=1, use_gpu=False),
        tracking=TrackingConfig(enabled=False),
    )
    (res,) = train(cfg)
    b = parent["new_biosample"]
    ext = ExtendConfig.model_validate(
        {
            "from": str(tmp_path / "runs" / "edice.{chrom}.all"),
            "store": str(parent["full"].root),
            "biosamples": [b],
            "train": {"epochs": 2, "batch_size": 512, "patience": None, "min_steps": 1},
        }
    )
    plan = plan_extension(ext)
    (run,) = plan.runs
    # eDICE imputes from the observed tracks: it fits on all of them, the new ones included
    assert set(run.spec.train) == set(res.spec.train) | set(plan.new_experiments)
    (out,) = extend(ext, plan)
    meta = json.loads((Path(out.checkpoint) / "meta.json").read_text())
    trainable = meta["extend"]["trainable"]
    assert "net.biosample_embedder.new_embedding" in trainable
    assert any(".signal." in n for n in trainable) and any("mlp" in n for n in trainable)
    assert not any("attention" in n or "global_embedding" in n for n in trainable)
    old = torch.load(Path(res.checkpoint) / "rank0.pt", weights_only=False)["state_dict"]
    new = torch.load(Path(out.checkpoint) / "rank0.pt", weights_only=False)["state_dict"]
    att = [k for k in old if "attention" in k]
    assert att and all(torch.equal(old[k], new[k]) for k in att)
    assert new["net.biosample_embedder.new_embedding"].shape[0] == 1
