"""epiray.tracking: MLflow round trip on a temporary SQLite store.

One store per module (MLflow's import and schema creation are slow): a parent run with fold and
chromosome children is logged once and every test reads it back through a fresh client.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import BaseModel
from torch import nn

from epiray.config import Section, parse_config
from epiray.errors import ConfigError, EpirayError, InputDataError
from epiray.models import ChromData, ImputationModel, Vocabulary, chrom_data_from_numpy

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from epiray import tracking  # noqa: E402  (after the telemetry switch)
from epiray.tracking import TrackingConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# A small ImputationModel: genome factors x (biosample + assay) factors, plus the mean of the
# observed tracks when the context carries them (so tests see whether the context was stored).


class TinyParams(Section):
    dim: int = 3


class TinyModel(ImputationModel):
    Params = TinyParams

    def __init__(self, params: TinyParams, vocab: Vocabulary) -> None:
        super().__init__(params, vocab)
        self.genome = nn.Embedding(vocab.n_bins, params.dim)
        self.biosample_factors = nn.Embedding(len(vocab.biosamples), params.dim)
        self.assay_factors = nn.Embedding(len(vocab.assays), params.dim)

    def predict(self, data: ChromData, biosample: int, assay: int) -> torch.Tensor:
        idx = torch.arange(data.lo, data.hi, device=self.genome.weight.device)
        w = self.biosample_factors.weight[biosample] + self.assay_factors.weight[assay]
        out = (self.genome(idx) * w).sum(-1)
        if data.values.shape[0]:
            out = out + data.values.float().mean(0)
        return out


N_BINS = 40


def tiny_vocab() -> Vocabulary:
    records = [
        ("B1.H3K4me3", "B1", "H3K4me3", "mouse"),
        ("B2.H3K4me3", "B2", "H3K4me3", "mouse"),
        ("B1.CTCF", "B1", "CTCF", "mouse"),
    ]
    return Vocabulary.from_records(records, chrom="chr19", n_bins=N_BINS)


def tiny_model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(TinyParams(), tiny_vocab())


def tiny_data(lo: int = 0, hi: int = N_BINS) -> ChromData:
    rng = np.random.default_rng(1)
    return chrom_data_from_numpy(
        rng.random((2, hi - lo)).astype(np.float32),
        [0, 1],
        [1, 1],
        chrom="chr19",
        lo=lo,
        n_bins=N_BINS,
        device="cpu",
    )


class ModelCfg(BaseModel):
    name: str = "avocado"
    layers: list[int] = [2048, 2048]
    notes: str = "x" * 700  # longer than MLflow's classic 500-character param limit


class Job(Section):
    tracking: TrackingConfig = TrackingConfig()


class JobCfg(BaseModel):
    model: ModelCfg = ModelCfg()
    seed: int = 0
    lr: float = 1e-3
    extra: dict[str, int] = {f"k{i:03d}": i for i in range(150)}  # > 100 params: two batches
    missing: str | None = None


# ---------------------------------------------------------------------------------------------
# The shared store: one parent, two folds, one chromosome run per fold


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow")
    cfg = TrackingConfig(experiment="epiray-test", tags={"project": "unit"})
    uri = cfg.resolved_uri(base)
    job = JobCfg()
    model = tiny_model()
    runs = {}
    with tracking.start_run(cfg, model="avocado", params=job, base_dir=base) as parent:
        runs["parent"] = parent.run_id
        for fold in (0, 1):
            with parent.child(fold=fold) as fold_run:
                runs[f"fold{fold}"] = fold_run.run_id
                with fold_run.child(chrom="chr19", fold=fold, params=job) as run:
                    runs[f"chr19.fold{fold}"] = run.run_id
                    for epoch in range(3):
                        run.log_epoch(epoch, train={"loss": 1.0 / (epoch + 1)}, val={"mse": 0.5})
                    run.log_metrics(
                        {"mse": 0.25 + fold, "pearson": np.float32(0.5)}, prefix="test/"
                    )
                    run.log_config(job)
                    scores = pd.DataFrame(
                        {
                            "model": ["avocado", "average_activity"],
                            "experiment": [f"E{fold}", f"E{fold}"],
                            "biosample": ["B1", "B1"],
                            "assay": ["CTCF", "CTCF"],
                            "category": ["protein_binding"] * 2,
                            "fold": [fold, fold],
                            "chrom": ["chr19", "chr19"],
                            "mse": [0.1 + fold, 0.2 + fold],
                        }
                    )
                    run.log_scores(scores)
                    run.log_figure(_png_figure(), "plots/tracks.png")
                    if fold == 0:
                        runs["model_id"] = run.log_model(model, data=tiny_data(), step=2)
        # The parent re-logs its children's rows: load_scores must not double them.
        parent.log_scores(pd.concat([scores, scores]))
    return {"uri": uri, "base": base, "cfg": cfg, "runs": runs, "model": model}


def _png_figure():
    from epiray.plots import plot_tracks

    y = np.linspace(0, 1, 20)
    return plot_tracks(y, {"avocado": y * 0.9})


# ---------------------------------------------------------------------------------------------
# URIs and config


def test_relative_sqlite_uri_resolves_against_the_output_dir(tmp_path):
    cfg = TrackingConfig()
    assert cfg.tracking_uri == "sqlite:///mlflow.db"
    assert cfg.resolved_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.resolved_artifact_location(tmp_path) == (tmp_path / "mlartifacts").as_uri()
    absolute = f"sqlite:///{tmp_path}/x/m.db"
    assert tracking.resolve_tracking_uri(absolute, "/elsewhere") == absolute
    for uri in ("http://mlflow:5000", "https://mlflow.example.org", "postgresql://u@h/db"):
        assert tracking.resolve_tracking_uri(uri, tmp_path) == uri
        assert TrackingConfig(tracking_uri=uri).resolved_artifact_location(tmp_path) is None


def test_file_store_refused_unless_allowed(tmp_path, monkeypatch):
    for uri in ("./mlruns", "mlruns", f"file://{tmp_path}/mlruns", str(tmp_path / "mlruns")):
        with pytest.raises(ConfigError, match="file store.*sqlite:///mlflow.db"):
            tracking.resolve_tracking_uri(uri, tmp_path)
    with pytest.raises(ConfigError, match=r"tracking_uri.*file store"):
        parse_config(Job, {"tracking": {"tracking_uri": "./mlruns"}}, "job.yaml")
    # MLflow itself refuses the file store without the opt-in ...
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    with pytest.raises(MlflowException, match="maintenance mode"):
        MlflowClient(f"file://{tmp_path}/refused").search_experiments()
    # ... and the explicit opt-in works end to end.
    cfg = TrackingConfig(tracking_uri="./mlruns", allow_file_store=True, experiment="fs")
    assert cfg.resolved_uri(tmp_path) == (tmp_path / "mlruns").as_uri()
    with tracking.start_run(cfg, model="avocado", chrom="chr1", fold=0, base_dir=tmp_path) as r:
        r.log_metrics({"x": 1.0})
    run = tracking.client(cfg.resolved_uri(tmp_path)).get_run(r.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"x": 1.0}


def test_run_names():
    assert tracking.run_name("avocado", "chr19", 0) == "avocado.chr19.fold0"
    assert tracking.run_name("edice", "chr21", 2, trial=3) == "edice.chr21.fold2.trial3"
    assert (
        tracking.run_name("avocado", "chr3", 1, trial="a1b2_00004")
        == "avocado.chr3.fold1.a1b2_00004"
    )
    assert tracking.run_name("avocado", fold=1) == "avocado.fold1"
    assert tracking.run_name("avocado") == "avocado"


def test_flatten_params():
    flat = tracking.flatten_params(JobCfg())
    assert flat["model.name"] == "avocado"
    assert flat["model.layers"] == "[2048, 2048]"
    assert flat["seed"] == "0" and flat["lr"] == "0.001"
    assert flat["missing"] == "null"
    assert flat["extra.k149"] == "149"
    assert len(flat) == 3 + 3 + 150
    assert tracking.flatten_params({"a": {"b": {}}}, prefix="x.") == {"x.a.b": "{}"}


def test_rank_guard(tmp_path):
    assert tracking.is_logging_rank(None) and tracking.is_logging_rank(0)
    assert not tracking.is_logging_rank(1)
    cfg = TrackingConfig(experiment="ranks")
    with tracking.start_run(
        cfg, model="avocado", chrom="chr1", fold=0, rank=3, base_dir=tmp_path
    ) as run:
        assert not run.enabled and run.run_id is None
        run.log_params({"a": 1})
        run.log_epoch(0, train={"loss": 1.0})
        run.log_scores(pd.DataFrame({"model": ["m"], "experiment": ["e"]}))
        assert run.log_model(tiny_model()) is None
        assert not run.child(chrom="chr2").enabled
    assert not (tmp_path / "mlflow.db").exists()  # nothing was even opened
    off = TrackingConfig(enabled=False)
    assert not tracking.start_run(off, model="avocado", base_dir=tmp_path).enabled


# ---------------------------------------------------------------------------------------------
# The round trip


def test_runs_are_named_nested_and_finished(logged):
    mlc = tracking.client(logged["uri"])
    runs = logged["runs"]
    exp = mlc.get_experiment_by_name("epiray-test")
    assert exp.artifact_location == (logged["base"] / "mlartifacts").as_uri()
    expect = {
        "parent": ("avocado", None),
        "fold0": ("avocado.fold0", runs["parent"]),
        "fold1": ("avocado.fold1", runs["parent"]),
        "chr19.fold0": ("avocado.chr19.fold0", runs["fold0"]),
        "chr19.fold1": ("avocado.chr19.fold1", runs["fold1"]),
    }
    in_git = (ROOT / ".git").exists()
    for key, (name, parent) in expect.items():
        run = mlc.get_run(runs[key])
        assert run.info.run_name == name
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == exp.experiment_id
        assert run.data.tags.get("mlflow.parentRunId") == parent
        assert run.data.tags["epiray.model"] == "avocado"
        assert run.data.tags["project"] == "unit"
        if in_git:  # HEAD may move while tests run (commits in parallel): check it is a commit
            commit = run.data.tags["mlflow.source.git.commit"]
            kind = subprocess.run(
                ["git", "-C", str(ROOT), "cat-file", "-t", commit], capture_output=True, text=True
            )
            assert len(commit) == 40 and kind.stdout.strip() == "commit"
            assert run.data.tags["epiray.git.dirty"] in ("true", "false")
    leaf = mlc.get_run(runs["chr19.fold1"])
    assert leaf.data.tags["epiray.chrom"] == "chr19" and leaf.data.tags["epiray.fold"] == "1"


def test_params_are_flattened_truncated_and_batched(logged):
    run = tracking.client(logged["uri"]).get_run(logged["runs"]["chr19.fold0"])
    params = run.data.params
    assert len(params) == 156  # > 100: needed two batches
    assert params["model.name"] == "avocado"
    assert params["model.layers"] == "[2048, 2048]"
    assert params["extra.k042"] == "42"
    assert len(params["model.notes"]) == 500 and params["model.notes"].endswith("...")
    assert run.data.tags["epiray.truncated_params"] == "model.notes"


def test_epoch_metrics_have_steps(logged):
    mlc = tracking.client(logged["uri"])
    run_id = logged["runs"]["chr19.fold1"]
    history = mlc.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert [m.step for m in mlc.get_metric_history(run_id, "val/mse")] == [0, 1, 2]
    metrics = mlc.get_run(run_id).data.metrics
    assert metrics["test/mse"] == pytest.approx(1.25)
    assert metrics["test/pearson"] == pytest.approx(0.5)


def test_artifacts_present(logged, tmp_path):
    mlc = tracking.client(logged["uri"])
    run_id = logged["runs"]["chr19.fold0"]
    top = {f.path for f in mlc.list_artifacts(run_id)}
    assert {"config.yaml", "scores", "plots"} <= top
    assert {f.path for f in mlc.list_artifacts(run_id, "scores")} == {
        "scores/scores.parquet",
        "scores/scores.csv",
    }
    png = Path(mlc.download_artifacts(run_id, "plots/tracks.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    import yaml

    cfg = yaml.safe_load(
        Path(mlc.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    )
    assert cfg["model"]["notes"] == "x" * 700  # the artifact keeps what params cut
    table = pd.read_parquet(mlc.download_artifacts(run_id, "scores/scores.parquet", str(tmp_path)))
    assert list(table["mse"]) == [0.1, 0.2]


def test_logged_model_loads_with_pyfunc_and_pytorch(logged):
    import mlflow

    mlc = tracking.client(logged["uri"])
    run_id = logged["runs"]["chr19.fold0"]
    lm = mlc.get_logged_model(logged["runs"]["model_id"])
    assert lm.name == "model" and lm.source_run_id == run_id and str(lm.status) == "READY"

    original = logged["model"]
    data = tiny_data()
    vocab = original.vocab
    expected = {
        (b, a): original.predict(data, vocab.biosample_index(b), vocab.assay_index(a)).detach()
        for b, a in [("B1", "CTCF"), ("B2", "H3K4me3")]
    }

    pyfunc = tracking.load_model(logged["uri"], run_id, device="cpu")
    assert pyfunc.model_config == {"device": "cpu"}  # reaches load_context
    requests = pd.DataFrame(
        {"biosample": ["B1", "B2"], "assay": ["CTCF", "H3K4me3"], "start": [5, 0], "end": [15, 40]}
    )
    out = pyfunc.predict(requests)
    assert list(out.columns) == ["biosample", "assay", "chrom", "bin", "value"]
    first = out[out["biosample"] == "B1"]
    assert list(first["bin"]) == list(range(5, 15)) and set(first["chrom"]) == {"chr19"}
    np.testing.assert_allclose(first["value"], expected[("B1", "CTCF")][5:15], rtol=1e-6)
    second = out[out["biosample"] == "B2"]
    np.testing.assert_allclose(second["value"], expected[("B2", "H3K4me3")], rtol=1e-6)
    # Without start/end: the whole range the context covers.
    whole = pyfunc.predict(pd.DataFrame({"biosample": ["B1"], "assay": ["CTCF"]}))
    assert len(whole) == N_BINS

    module = tracking.load_model(logged["uri"], run_id, flavor="pytorch", device="cpu")
    assert type(module).__name__ == "TinyModel"
    for param, loaded in zip(original.parameters(), module.parameters()):
        torch.testing.assert_close(param.detach(), loaded.detach())

    # MLflow's own loaders, from the run URI and the model URI.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(logged["uri"])
    try:
        by_run = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", model_config={"device": "cpu"})
        np.testing.assert_allclose(
            by_run.predict(requests.iloc[:1])["value"], expected[("B1", "CTCF")][5:15], rtol=1e-6
        )
        by_id = mlflow.pytorch.load_model(f"models:/{lm.model_id}", map_location="cpu")
        torch.testing.assert_close(by_id.predict(data, 0, 0), original.predict(data, 0, 0))
    finally:
        mlflow.set_tracking_uri(previous)


def test_pyfunc_rejects_bad_requests(logged):
    pyfunc = tracking.load_model(logged["uri"], logged["runs"]["chr19.fold0"], device="cpu")
    with pytest.raises(EpirayError, match="unknown biosample 'B9'"):
        pyfunc.predict(pd.DataFrame({"biosample": ["B9"], "assay": ["CTCF"]}))
    with pytest.raises(InputDataError, match=r"bad bin window; expected 0 <= start < end <= 40"):
        pyfunc.predict(
            pd.DataFrame({"biosample": ["B1"], "assay": ["CTCF"], "start": [30], "end": [50]})
        )


def test_model_without_tracks_and_on_a_shard(tmp_path):
    """Default context: the vocabulary's whole chromosome, no tracks; a shard keeps its range."""
    model = tiny_model()
    empty = tracking.prediction_context(None, model=model)
    assert (empty.lo, empty.hi, empty.values.shape) == (0, N_BINS, (0, N_BINS))
    path = tracking.save_model(model, tmp_path / "whole")
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(str(path), model_config={"device": "cpu"})
    out = pyfunc.predict(pd.DataFrame({"biosample": ["B2"], "assay": ["CTCF"]}))
    np.testing.assert_allclose(out["value"], model.predict(empty, 1, 0).detach(), rtol=1e-6)

    shard = tracking.prediction_context(tiny_data(10, 30))
    path = tracking.save_model(model, tmp_path / "shard", shard)
    pyfunc = mlflow.pyfunc.load_model(str(path), model_config={"device": "cpu"})
    out = pyfunc.predict(pd.DataFrame({"biosample": ["B1"], "assay": ["H3K4me3"]}))
    assert list(out["bin"]) == list(range(10, 30))
    np.testing.assert_allclose(out["value"], model.predict(shard, 0, 1).detach(), rtol=1e-6)
    with pytest.raises(EpirayError, match="already exists"):
        tracking.save_model(model, tmp_path / "shard")


def test_load_scores_by_run_and_experiment(logged):
    uri, runs = logged["uri"], logged["runs"]
    everything = tracking.load_scores(uri, "epiray-test")
    assert len(everything) == 4  # 2 folds x 2 models; the parent's copies dropped
    assert sorted(everything["experiment"].unique()) == ["E0", "E1"]
    assert set(everything["run_name"]) == {"avocado.chr19.fold0", "avocado.chr19.fold1"}
    fold1 = tracking.load_scores(uri, runs["fold1"])
    assert set(fold1["experiment"]) == {"E1"} and len(fold1) == 2
    from epiray.evaluate import comparison_table, load_scores

    table = comparison_table(load_scores(uri, runs["parent"]))
    assert table.loc["avocado", "overall"] == pytest.approx((0.1 + 1.1) / 2)
    with pytest.raises(InputDataError, match="neither a run id nor an experiment.*epiray-test"):
        tracking.load_scores(uri, "no-such-experiment")
    with pytest.raises(InputDataError, match="neither a run id"):
        tracking.load_scores(uri, "0" * 32)
    cfg = TrackingConfig(experiment="no-scores")
    with tracking.start_run(cfg, model="avocado", base_dir=logged["base"]) as bare:
        pass
    with pytest.raises(InputDataError, match="no score table in 'no-scores'"):
        tracking.load_scores(uri, "no-scores")
    with pytest.raises(InputDataError, match="no score table"):
        tracking.load_scores(uri, bare.run_id)


def test_exceptions_end_runs_failed_or_killed(logged):
    cfg, base = logged["cfg"], logged["base"]
    mlc = tracking.client(logged["uri"])
    with pytest.raises(ValueError, match="diverged"):
        with tracking.start_run(cfg, model="avocado", chrom="chr1", fold=2, base_dir=base) as run:
            run.log_epoch(0, train={"loss": float("nan")})
            raise ValueError("loss diverged")
    failed = mlc.get_run(run.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["epiray.error"] == "ValueError: loss diverged"

    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run(cfg, model="avocado", chrom="chr2", fold=2, base_dir=base) as run:
            raise KeyboardInterrupt
    assert mlc.get_run(run.run_id).info.status == "KILLED"

    # A parent whose child fails: both end, neither stays RUNNING.
    with pytest.raises(RuntimeError):
        with tracking.start_run(cfg, model="edice", base_dir=base) as parent:
            with parent.child(chrom="chr21", fold=0) as child:
                raise RuntimeError("worker lost")
    assert mlc.get_run(child.run_id).info.status == "FAILED"
    assert mlc.get_run(parent.run_id).info.status == "FAILED"


def test_open_runs_are_killed_at_exit_and_resumable(logged):
    cfg, base = logged["cfg"], logged["base"]
    mlc = tracking.client(logged["uri"])
    run = tracking.start_run(cfg, model="avocado", chrom="chr5", fold=0, base_dir=base)
    run.log_params({"seed": 1})
    assert mlc.get_run(run.run_id).info.status == "RUNNING"
    tracking._end_open_runs()  # what the atexit hook does
    assert mlc.get_run(run.run_id).info.status == "KILLED"

    again = tracking.start_run(
        cfg, model="avocado", chrom="chr5", fold=0, base_dir=base, resume=True, params={"seed": 1}
    )
    assert again.run_id == run.run_id
    assert mlc.get_run(run.run_id).info.status == "RUNNING"
    with pytest.raises(EpirayError, match="param 'seed' was logged as '1'"):
        again.log_params({"seed": 2})
    again.end()
    assert mlc.get_run(run.run_id).info.status == "FINISHED"
    fresh = tracking.start_run(
        cfg, model="avocado", chrom="chr5", fold=0, base_dir=base, resume=True
    )
    assert fresh.run_id != run.run_id  # a finished run is never reopened
    fresh.end()


# ---------------------------------------------------------------------------------------------
# The real models behind the same wrapper


def test_avocado_round_trip(logged):
    """An Avocado shard logged to the store imputes identically through pyfunc and pytorch."""
    from epiray.models.avocado import Avocado, AvocadoParams

    torch.manual_seed(0)
    vocab = tiny_vocab()
    data = tiny_data(8, 32)  # a worker's slab [8, 32) of a 40-bin chromosome
    params = AvocadoParams(
        n_biosample_factors=4,
        n_assay_factors=4,
        n_genome_factors=(3, 2, 2),
        scale_bins=(1, 4, 16),
        n_nodes=8,
        predict_batch_size=7,
    )
    model = Avocado.build(params, vocab, data)
    expected = model.predict(data, vocab.biosample_index("B2"), vocab.assay_index("CTCF"))
    cfg, base = logged["cfg"], logged["base"]
    with tracking.start_run(cfg, model="avocado", chrom="chr19", fold=9, base_dir=base) as run:
        run.log_model(model)  # default context: the model's own slab, no tracks
    pyfunc = tracking.load_model(logged["uri"], run.run_id, device="cpu")
    out = pyfunc.predict(pd.DataFrame({"biosample": ["B2"], "assay": ["CTCF"], "start": [8]}))
    assert list(out["bin"]) == list(range(8, 32))
    np.testing.assert_allclose(out["value"], expected.numpy(), rtol=1e-6, atol=1e-7)
    module = tracking.load_model(logged["uri"], run.run_id, flavor="pytorch", device="cpu")
    assert isinstance(module, Avocado)
    torch.testing.assert_close(module.predict(data, 1, 0), expected)


def test_edice_needs_its_tracks_in_the_context(tmp_path):
    """eDICE imputes from observed tracks: the stored context carries them."""
    import mlflow

    from epiray.models.edice import EDice, EDiceParams

    torch.manual_seed(0)
    vocab = tiny_vocab()
    data = tiny_data()
    params = EDiceParams(dim=8, heads=2, ffn_hidden=8, mlp_hidden=8, n_targets=1)
    model = EDice.build(params, vocab, data)
    expected = model.predict(data, vocab.biosample_index("B2"), vocab.assay_index("CTCF"))
    path = tracking.save_model(model, tmp_path / "edice", data)
    pyfunc = mlflow.pyfunc.load_model(str(path), model_config={"device": "cpu"})
    out = pyfunc.predict(pd.DataFrame({"biosample": ["B2"], "assay": ["CTCF"]}))
    np.testing.assert_allclose(out["value"], expected.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# From Ray workers: only rank 0 logs, children hang under the driver's run


@pytest.mark.ray
def test_ray_workers_log_children_of_the_driver_run(logged, ray_local):
    import pickle

    cfg, base, uri = logged["cfg"], logged["base"], logged["uri"]

    @ray_local.remote
    def train(parent) -> list[str | None]:
        # A fresh process: no active run, no global tracking URI; everything comes by argument.
        ids = []
        for rank in (0, 1):  # what each worker of a 2-worker group does
            with parent.child(chrom="chr19", fold=0, trial=rank):
                pass
            with tracking.start_run(
                cfg, model="avocado", chrom="chr19", fold=0, rank=rank, parent=parent.run_id,
                base_dir=base,
            ) as run:  # fmt: skip
                run.log_epoch(0, train={"loss": 0.5})
            ids.append(run.run_id)
        return ids

    with tracking.start_run(cfg, name="sweep", model="avocado", base_dir=base) as parent:
        assert pickle.loads(pickle.dumps(parent)).run_id == parent.run_id
        ids = ray_local.get(train.remote(parent))
    assert ids[1] is None  # rank 1 logged nothing
    mlc = tracking.client(uri)
    run = mlc.get_run(ids[0])
    assert run.info.status == "FINISHED" and run.info.run_name == "avocado.chr19.fold0"
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert [m.step for m in mlc.get_metric_history(ids[0], "train/loss")] == [0]
    children = {r.info.run_name for r in tracking._descendants(mlc, run.info.experiment_id,
                                                               parent.run_id)}  # fmt: skip
    assert children == {"avocado.chr19.fold0", "avocado.chr19.fold0.trial0",
                        "avocado.chr19.fold0.trial1"}  # fmt: skip
    assert mlc.get_run(parent.run_id).info.status == "FINISHED"


@pytest.mark.gpu
def test_pyfunc_imputes_on_the_gpu(logged):
    run_id = logged["runs"]["chr19.fold0"]
    request = pd.DataFrame({"biosample": ["B2"], "assay": ["CTCF"], "start": [3], "end": [30]})
    cpu = tracking.load_model(logged["uri"], run_id, device="cpu").predict(request)
    gpu_model = tracking.load_model(logged["uri"], run_id, device="cuda")
    assert gpu_model.unwrap_python_model().data.values.device.type == "cuda"
    np.testing.assert_allclose(gpu_model.predict(request)["value"], cpu["value"], rtol=1e-5)


def test_start_run_error_paths(logged):
    cfg, base = logged["cfg"], logged["base"]
    with pytest.raises(ConfigError, match="no run name; expected model"):
        tracking.start_run(cfg, base_dir=base)
    mlc = tracking.client(logged["uri"])
    mlc.delete_experiment(mlc.create_experiment("gone"))
    gone = TrackingConfig(experiment="gone")
    with pytest.raises(ConfigError, match="experiment 'gone' is deleted.*restore"):
        tracking.start_run(gone, model="avocado", base_dir=base)
    with tracking.start_run(cfg, model="avocado", chrom="chrX", fold=0, base_dir=base) as run:
        with pytest.raises(InputDataError, match=r"score table lacks \['experiment'\]"):
            run.log_scores(pd.DataFrame({"model": ["avocado"], "mse": [0.1]}))
        with pytest.raises(ConfigError, match="no database file"):
            tracking.resolve_tracking_uri("sqlite://")


def test_tracking_uri_from_environment(monkeypatch, tmp_path):
    from epiray import tracking
    from epiray.tracking import TrackingConfig

    monkeypatch.setattr(tracking, "ENV_TRACKING_URI", "http://127.0.0.1:5999")
    assert TrackingConfig().resolved_uri(tmp_path) == "http://127.0.0.1:5999"
    explicit = TrackingConfig(tracking_uri="sqlite:///x.db")
    assert explicit.resolved_uri(tmp_path) == f"sqlite:///{tmp_path / 'x.db'}"
    # a later mlflow.set_tracking_uri (it rewrites the variable) changes nothing
    monkeypatch.setattr(tracking, "ENV_TRACKING_URI", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5998")
    assert TrackingConfig().resolved_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------------
# What the MLflow UI shows: experiment kind, input dataset, parent comparison metrics


def test_experiments_are_tagged_as_model_training(logged):
    """The MLflow 3 UI opens an experiment on its runs table, not the GenAI overview, when it
    is tagged as model development; an older experiment is tagged when next used, and a kind a
    user chose is kept."""
    cfg, base = logged["cfg"], logged["base"]
    mlc = tracking.client(logged["uri"])
    exp = mlc.get_experiment_by_name(cfg.experiment)
    assert exp.tags[tracking.TAG_EXPERIMENT_KIND] == "custom_model_development"
    # made before epiray set the kind
    old_id = mlc.create_experiment("made-by-hand")
    assert tracking.TAG_EXPERIMENT_KIND not in mlc.get_experiment(old_id).tags
    with tracking.start_run(TrackingConfig(experiment="made-by-hand"), name="x", base_dir=base):
        pass
    assert mlc.get_experiment(old_id).tags[tracking.TAG_EXPERIMENT_KIND] == (
        "custom_model_development"
    )
    # a kind set by the user stays
    mine = mlc.create_experiment("mine", tags={tracking.TAG_EXPERIMENT_KIND: "forecasting"})
    with tracking.start_run(TrackingConfig(experiment="mine"), name="x", base_dir=base):
        pass
    assert mlc.get_experiment(mine).tags[tracking.TAG_EXPERIMENT_KIND] == "forecasting"


def test_log_dataset_records_the_input_once(logged, tmp_path):
    cfg, base = logged["cfg"], logged["base"]
    store = tmp_path / "my_store"
    with tracking.start_run(cfg, model="avocado", chrom="chr2", fold=0, base_dir=base) as run:
        for _ in range(2):  # a resumed run logs it again: still one input
            run.log_dataset("my_store", "0123abcd", store, {"experiments": 3})
        run_id = run.run_id
    inputs = tracking.client(logged["uri"]).get_run(run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    (ds,) = inputs
    assert (ds.dataset.name, ds.dataset.digest) == ("my_store", "0123abcd")
    assert ds.dataset.source_type == "local"
    assert store.as_uri() in ds.dataset.source
    assert '"experiments": 3' in ds.dataset.profile
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    # disabled runs log nothing and do not fail
    tracking.TrackedRun(cfg, None, None, None, None).log_dataset("s", "d", store)


def test_log_heldout_comparison_charts_each_model_per_fold(logged):
    cfg, base = logged["cfg"], logged["base"]
    rows = []
    for fold, shift in (("fold0", 0.0), ("fold2", 0.1)):
        for model, mse in (("avocado", 0.2), ("average_activity", 0.3)):
            for e, d in (("E1", 0.0), ("E2", 0.02)):
                rows.append(
                    {"model": model, "experiment": f"{fold}.{e}", "fold": fold, "chrom": "chr1"}
                    | {"category": "protein_binding", "mse": mse + shift + d}
                )
    scores = pd.DataFrame(rows)
    with tracking.start_run(cfg, name="comparison", base_dir=base) as parent:
        logged_metrics = tracking.log_heldout_comparison(parent, scores, metric="mse")
        run_id = parent.run_id
    mlc = tracking.client(logged["uri"])
    metrics = mlc.get_run(run_id).data.metrics
    assert logged_metrics == {k: v for k, v in metrics.items() if k.count("/") == 2}
    assert metrics["heldout_mse/avocado/fold0"] == pytest.approx(0.21)
    assert metrics["heldout_mse/avocado/fold2"] == pytest.approx(0.31)
    assert metrics["heldout_mse/average_activity/fold0"] == pytest.approx(0.31)
    # one series per model across folds, the fold index as step
    hist = mlc.get_metric_history(run_id, "heldout_mse/avocado")
    assert sorted((m.step, round(m.value, 6)) for m in hist) == [(0, 0.21), (2, 0.31)]
    # nothing to log: no error
    assert tracking.log_heldout_comparison(parent, scores.iloc[:0]) == {}
