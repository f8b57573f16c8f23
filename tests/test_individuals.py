"""epiray.individuals: baselines, the fine-tune, the protocol on a synthetic compendium, resume,
bad cohorts, Ray tasks and MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from epiray.errors import ConfigError, EpirayWarning, InputDataError
from epiray.individuals import (
    METRICS,
    IndividualsConfig,
    avg_baseline,
    finetune,
    run_individuals,
    score_imputation,
    summarize,
    track_avg_baseline,
    write_individuals_compendium,
)
from epiray.loop import LoopParams
from epiray.models import Vocabulary, chrom_data_from_numpy
from epiray.models.edice import EDice, EDiceParams

ROOT = Path(__file__).resolve().parents[1]
SMALL = EDiceParams(
    dim=32,
    heads=4,
    ffn_hidden=32,
    mlp_hidden=64,
    attention_dropout=0.0,
    mlp_dropout=0.0,
    n_targets=0.25,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread_seeded")


def config(store, out, **kw) -> IndividualsConfig:
    base = dict(
        store=str(store.root),
        out=str(out),
        assembly="idSyn1",
        chrom="chr1",
        model=SMALL,
        train_other=LoopParams(epochs=15, lr=5e-3, batch_size=1536, patience=None),
        train_target=LoopParams(epochs=2, lr=5e-3, batch_size=1536, patience=None),
        finetune=LoopParams(epochs=3, lr=1e-3, batch_size=1536, patience=None),
        executor="local",
        tracking={"enabled": False},
    )
    return IndividualsConfig.model_validate({**base, **kw})


# -- baselines -----------------------------------------------------------------------------


def test_baselines_match_numpy_on_a_full_grid():
    rng = np.random.default_rng(0)
    d, t, a, n = 3, 4, 2, 7
    y = rng.random((d, t, a, n)).astype(np.float32)
    values = y.reshape(d, t * a, n)
    bio = [i for i in range(t) for _ in range(a)]
    assay = [j for _ in range(t) for j in range(a)]
    for k in range(d):
        for i in range(t):
            for j in range(a):
                c = i * a + j
                avg, n_avg = avg_baseline(values, bio, assay, k, c)
                want = np.mean([y[k, o, j] for o in range(t) if o != i], axis=0)
                np.testing.assert_allclose(avg, want, rtol=1e-6)
                assert n_avg == t - 1
                tavg, n_t = track_avg_baseline(values, k, c)
                want = np.mean([y[o, i, j] for o in range(d) if o != k], axis=0)
                np.testing.assert_allclose(tavg, want, rtol=1e-6)
                assert n_t == d - 1


def test_avg_uses_only_tissues_that_have_the_assay():
    # pairs: (T0,A0) (T0,A1) (T1,A0) (T2,A1): A1 exists in T0 and T2 only, A0 in T0 and T1
    bio, assay = [0, 0, 1, 2], [0, 1, 0, 1]
    values = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    avg, n = avg_baseline(values, bio, assay, 1, 1)  # donor 1, (T0, A1) <- (T2, A1)
    np.testing.assert_array_equal(avg, values[1, 3])
    assert n == 1
    assert avg_baseline(values, [0, 1], [0, 1], 0, 0) == (None, 0)  # A0 in no other tissue
    assert track_avg_baseline(values[:1], 0, 0) == (None, 0)  # one donor: no other donors


def test_individual_auprc_masks_peaks_shared_with_other_donors():
    n = 1000
    y = np.zeros(n, np.float32)
    y[100:105] = 5.0  # shared with the other donor
    y[500:505] = 5.0  # individual-specific
    other = np.zeros((1, n), np.float32)
    other[0, 100:105] = 5.0
    good = np.zeros(n, np.float32)
    good[500:505] = 1.0  # finds the individual peak only
    bad = np.zeros(n, np.float32)
    bad[100:105] = 1.0  # finds only the shared one
    assert score_imputation(y, good, other)["auprc_individual"] == pytest.approx(1.0)
    assert score_imputation(y, bad, other)["auprc_individual"] < 0.1
    s = score_imputation(y, bad, other)
    assert s["auprc"] < 1.0 and s["mse"] == pytest.approx(float(np.mean((y - bad) ** 2)))
    assert np.isnan(score_imputation(y, good, other[:0])["auprc_individual"])


def test_summary_counts_where_the_reference_wins():
    rows = []
    for e, (tl, avg) in enumerate([(0.1, 0.2), (0.3, 0.2), (0.1, np.nan)]):
        for model, mse in (("edice_other_tl", tl), ("avg", avg)):
            row = dict.fromkeys(METRICS, 0.5)
            row.update(mse=mse, pearson=1 - mse, auprc_individual=np.nan)
            rows.append({"donor": "D1", "experiment": f"e{e}", "model": model, **row})
    s = summarize(pd.DataFrame(rows))
    assert list(s.index) == ["avg", "edice_other_tl"]  # STRATEGIES order
    assert s.loc["avg", "n_tracks"] == 3 and s.loc["avg", "n_paired"] == 2
    assert s.loc["avg", "mse"] == pytest.approx(0.2)  # NaN-aware mean
    assert s.loc["edice_other_tl", "mse"] == pytest.approx(0.5 / 3)
    assert s.loc["avg", "edice_other_tl_better_mse"] == 1  # the undefined track is not counted
    assert s.loc["avg", "edice_other_tl_better_pearson"] == 1
    assert s.loc["avg", "edice_other_tl_better_auprc"] == 0  # ties are not wins
    assert np.isnan(s.loc["edice_other_tl", "edice_other_tl_better_mse"])


def test_config_rejects_unknown_parts_and_freezing_everything():
    base = dict(store="s", out="o", assembly="a", chrom="c")
    with pytest.raises(ValueError, match="finetune_freeze"):
        IndividualsConfig(**base, finetune_freeze=["genome_factors"])
    with pytest.raises(ValueError, match="freezes everything"):
        IndividualsConfig(**base, finetune_freeze=["signal_embedders", "mlp"])
    with pytest.raises(ValueError, match="strategies"):
        IndividualsConfig(**base, strategies=["avg", "avg"])


# -- transfer learning ---------------------------------------------------------------------


def test_finetune_touches_only_signal_embedders_and_mlp():
    rng = np.random.default_rng(1)
    t, a, n = 3, 3, 300
    recs = [(f"T{i}.A{j}", f"T{i}", f"A{j}", "human") for i in range(t) for j in range(a)]
    vocab = Vocabulary.from_records(recs, chrom="chr1", n_bins=n)
    data = chrom_data_from_numpy(
        np.arcsinh(rng.gamma(1.0, 2.0, (t * a, n))),
        [i for i in range(t) for _ in range(a)],
        [j for _ in range(t) for j in range(a)],
        device="cpu",
    )
    model = EDice.build(SMALL, vocab, data)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = finetune(model, data, LoopParams(epochs=2, lr=1e-2, batch_size=300, patience=None))
    # the model itself is untouched (it is reused for every held-out track)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    frozen_prefixes = (
        "net.biosample_embedder.global_embedding",
        "net.assay_embedder.global_embedding",
        "net.biosample_embedder.new_embedding",
        "net.assay_embedder.new_embedding",
        "net.biosample_attention.",
        "net.assay_attention.",
    )
    trained_prefixes = ("net.biosample_embedder.signal.", "net.assay_embedder.signal.", "net.mlp.")
    after = tuned.state_dict()
    assert set(after) == set(before)
    for k, v in after.items():
        if k.startswith(frozen_prefixes):
            assert torch.equal(v, before[k]), f"{k} changed but should be frozen"
        else:
            assert k.startswith(trained_prefixes), k
            if v.numel():
                assert not torch.equal(v, before[k]), f"{k} did not change"
    trainable = {k for k, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith(trained_prefixes) for k in trainable)


# -- the protocol on a store ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory, ray_local):
    """3 donors × 3 tissues × 3 assays × 1,500 bins, ingested from .npy with a donor column;
    donor-specific signal as strong as tissue-specific signal."""
    from epiray.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("individuals")
    manifest = write_individuals_compendium(
        root / "data", 3, 3, 3, 1500, seed=1, donor_scale=1.0, batch_sd=0.1
    )
    return ingest(IngestConfig(manifest=str(manifest), store=str(root / "store"), chroms="all"))


@pytest.mark.ray
def test_edice_transfer_beats_both_baselines(cohort_store, tmp_path):
    cfg = config(
        cohort_store,
        tmp_path / "out",
        donors=["D1"],
        strategies=["avg", "track_avg", "edice_other_tl"],
    )
    res = run_individuals(cfg)
    t = res.table
    assert len(t) == 9 * 3 and set(t["donor"]) == {"D1"}
    assert (t["n_bins"] == 1500).all()
    mse = t.pivot(index="experiment", columns="model", values="mse")
    means = mse.mean()
    # both kinds of signal matter: each baseline misses one of them ...
    assert means["avg"] > 0.2 and means["track_avg"] > 0.2, means
    # ... and the fine-tuned eDICE recovers both from the donor's other tracks
    assert means["edice_other_tl"] < 0.5 * min(means["avg"], means["track_avg"]), means
    assert (mse["edice_other_tl"] < mse["avg"]).sum() >= 8, mse
    assert (mse["edice_other_tl"] < mse["track_avg"]).sum() >= 8, mse
    s = res.summary
    assert s.loc["avg", "edice_other_tl_better_mse"] >= 8
    assert s.loc["edice_other_tl", "pearson"] > s.loc["track_avg", "pearson"]
    for name in ("individuals", "summary"):
        assert (tmp_path / "out" / f"{name}.parquet").is_file()
        assert (tmp_path / "out" / f"{name}.csv").is_file()
    back = pd.read_parquet(tmp_path / "out" / "individuals.parquet")
    pd.testing.assert_frame_equal(back, t)


@pytest.mark.ray
def test_resume_skips_finished_tracks(cohort_store, tmp_path):
    out = tmp_path / "out"
    quick = dict(
        strategies=["avg", "track_avg", "edice_other"],
        train_other=LoopParams(epochs=1, lr=5e-3, batch_size=1536, patience=None),
        donors=["D2"],
    )
    first = run_individuals(config(cohort_store, out, assays=["A1"], **quick))
    assert sorted(first.computed) == [("D2", "D2.T1.A1"), ("D2", "D2.T2.A1"), ("D2", "D2.T3.A1")]
    assert first.reused == []
    files = sorted((out / "results").glob("donor=D2/*.json"))
    model_file = out / "models" / "donor=D2" / "edice_other.pt"
    stamps = {p: p.stat().st_mtime_ns for p in [*files, model_file]}

    again = run_individuals(config(cohort_store, out, **quick))
    assert sorted(again.reused) == sorted(first.computed)
    assert len(again.computed) == 6 and not set(again.computed) & set(first.computed)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # kept, model reused
    assert len(again.table) == 9 * 3
    old = first.table.set_index(["experiment", "model"])
    new = again.table.set_index(["experiment", "model"]).loc[old.index]
    pd.testing.assert_frame_equal(new, old)

    os.remove(files[0])
    third = run_individuals(config(cohort_store, out, **quick))
    assert third.computed == [("D2", files[0].stem)]
    pd.testing.assert_frame_equal(
        third.table.drop(columns="seconds"), again.table.drop(columns="seconds")
    )

    with pytest.raises(ConfigError, match="another config"):
        run_individuals(config(cohort_store, out, **{**quick, "seed": 1}))
    fresh = run_individuals(config(cohort_store, out, **{**quick, "seed": 1}), overwrite=True)
    assert len(fresh.computed) == 9 and not fresh.reused


@pytest.mark.ray
def test_bad_manifests_name_the_experiments(ray_local, tmp_path):
    from epiray.ingest import IngestConfig, ingest

    manifest = write_individuals_compendium(tmp_path / "data", 2, 2, 2, 200, seed=2)
    df = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    df.loc[df["experiment"] == "D1.T1.A1", "donor"] = ""
    df = df[df["experiment"] != "D2.T2.A2"]  # D1.T2.A2 becomes a pair of one donor only
    df.to_csv(manifest, sep="\t", index=False)
    ing = IngestConfig(manifest=str(manifest), store=str(tmp_path / "store"), chroms="all")
    store = ingest(ing)
    cfg = config(store, tmp_path / "out", strategies=["avg", "track_avg"])
    with pytest.raises(InputDataError) as err:
        run_individuals(cfg)
    msg = str(err.value)
    assert msg.count("\n  - ") == 1, msg  # one problem, one message
    assert "D1.T1.A1" in msg and "no donor" in msg and "D2.T1.A1" not in msg
    assert str(tmp_path / "data" / "tracks" / "D1" / "T1.A1.npy") in msg
    assert str(store.root / "manifest.tsv") in msg

    # fix the donor (re-ingest reuses every part): the incomplete pair is the next error
    df.loc[df["experiment"] == "D1.T1.A1", "donor"] = "D1"
    df.to_csv(manifest, sep="\t", index=False)
    store = ingest(ing, resume=True)
    with pytest.raises(
        InputDataError, match=r"D1\.T2\.A2: \(T2, A2\) not measured in donor\(s\) D2"
    ):
        run_individuals(cfg)
    with pytest.warns(EpirayWarning, match=r"excluded 1 experiment.*D1\.T2\.A2"):
        res = run_individuals(cfg.model_copy(update={"incomplete_tracks": "exclude"}))
    assert "T2.A2" not in " ".join(res.table["experiment"])
    assert len(res.table) == 2 * 3 * 2  # 2 donors x 3 complete pairs x 2 strategies
    assert pd.read_csv(tmp_path / "out" / "excluded.csv")["experiment"].tolist() == ["D1.T2.A2"]
    assert (res.summary["n_excluded_experiments"] == 1).all()


@pytest.mark.ray
def test_ray_tasks_match_local_and_log_to_mlflow(cohort_store, tmp_path):
    from epiray.tracking import SCORES_ARTIFACT, client

    quick = dict(
        strategies=["avg", "track_avg", "edice_other_tl"],
        train_other=LoopParams(epochs=2, lr=5e-3, batch_size=1536, patience=None),
        finetune=LoopParams(epochs=1, lr=1e-3, batch_size=1536, patience=None),
        donors=["D1", "D3"],
        assays=["A2"],
    )
    local = run_individuals(config(cohort_store, tmp_path / "local", **quick))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    remote = run_individuals(
        config(
            cohort_store,
            tmp_path / "ray",
            executor="ray",
            tracking={"tracking_uri": uri, "experiment": "test-individuals"},
            **quick,
        )
    )
    assert len(remote.computed) == 6
    key = ["donor", "experiment", "model"]
    a = local.table.drop(columns="seconds").sort_values(key).reset_index(drop=True)
    b = remote.table.drop(columns="seconds").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, rtol=1e-4)

    mlc = client(uri)
    run = mlc.get_run(remote.mlflow_run_id)
    assert run.info.run_name == "individuals.chr1" and run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["mse/avg"] == pytest.approx(remote.summary.loc["avg", "mse"])
    assert "mse/edice_other_tl" in m and "edice_other_tl_better_mse/track_avg" in m
    children = mlc.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == [
        "individuals.chr1.D1",
        "individuals.chr1.D3",
    ]
    for c in children:
        donor = c.data.tags["epiray.donor"]
        own = remote.table[remote.table["donor"] == donor]
        assert c.data.metrics["mse/avg"] == pytest.approx(own[own["model"] == "avg"]["mse"].mean())
        assert "train_other/mse" in c.data.metrics  # trained in this invocation
    assert run.data.params["strategies"]
    arts = {f.path for f in mlc.list_artifacts(run.info.run_id, "scores")}
    assert SCORES_ARTIFACT in arts


def test_shipped_config_and_cli(tmp_path, capsys):
    from epiray.cli import main
    from epiray.config import load_config

    cfg = load_config(IndividualsConfig, ROOT / "configs" / "individuals.yaml")
    assert cfg.strategies == ["avg", "track_avg", "edice_other", "edice_other_tl", "edice_target"]
    assert cfg.finetune_freeze == ["global_embeddings", "attention"]
    assert cfg.model.dim == 32 and Path(cfg.store).is_absolute()

    out = tmp_path / "syn"
    assert (
        main(["individuals", "--write-synthetic", str(out), "--donors", "2", "--bins", "50"]) == 0
    )
    df = pd.read_csv(out / "manifest.tsv", sep="\t")
    assert len(df) == 2 * 8 * 4 and set(df["donor"]) == {"D1", "D2"}
    assert np.load(out / "tracks" / "D2" / "T8.A4.npy").shape == (50,)
    assert (out / "genomes" / "idSyn1.chrom.sizes").read_text() == "chr1\t1250\n"
    capsys.readouterr()
    assert main(["individuals", "--write-synthetic", str(out)]) == 2  # never clobber
    assert "not empty" in capsys.readouterr().err
    assert main(["individuals"]) == 2
    assert "--config" in capsys.readouterr().err


def test_simulation_components():
    from epiray.individuals import simulate_individuals

    y = simulate_individuals(3, 4, 2, 500, seed=5)
    assert y.shape == (3, 4, 2, 500) and y.dtype == np.float32 and (y >= 0).all()
    np.testing.assert_array_equal(y, simulate_individuals(3, 4, 2, 500, seed=5))
    quiet = dict(seed=5, noise=0.0, batch_sd=0.0, donor_tissue_scale=0.0)
    same_donors = simulate_individuals(3, 4, 2, 500, donor_scale=0.0, **quiet)
    np.testing.assert_allclose(same_donors[0], same_donors[2], rtol=1e-6)
    assert not np.allclose(same_donors[0, 0], same_donors[0, 1])  # tissues differ
    same_tissues = simulate_individuals(3, 4, 2, 500, tissue_scale=0.0, **quiet)
    np.testing.assert_allclose(same_tissues[:, 0], same_tissues[:, 3], rtol=1e-6)
    assert not np.allclose(same_tissues[0, 0], same_tissues[1, 0])  # donors differ
