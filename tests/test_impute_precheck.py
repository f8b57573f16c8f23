"""Imputation checks every requested pair against the model's vocabulary before anything runs.

Tiny Avocado models are trained in-process and saved as ``epiray train`` run directories
(``{label}.{chrom}.{fold}/epoch0001_final/{meta.json, rank0.pt}``), then imputed through
``epiray.train.load_predictor`` exactly as ``epiray impute`` does.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from epiray.errors import ConfigError, EpirayError
from epiray.impute import (
    PARTS,
    UNIMPUTABLE,
    ImputeConfig,
    describe_outputs,
    impute,
    model_scopes,
    read_outputs,
    read_unimputable,
)
from epiray.store import Store
from tests.test_impute import make_store, read_bigwig

ASM = "mmToy1"
MOUSE_ONLY = {"mm.B1.H3K4me3", "mm.B2.H3K4me3", "mm.B2.CTCF", "mm.B3.DNase"}
CROSS = MOUSE_ONLY | {"hs.B1.GATA1", "hs.B1.CTCF"}


def write_run(store: Store, run: Path, chrom: str, vocab_exps: set[str], train: set[str]) -> None:
    """An ``epiray train``-shaped finished run of a tiny Avocado trained on ``train``."""
    import torch

    from epiray.loop import LoopParams, fit, save_checkpoint
    from epiray.models import Vocabulary, chrom_data_from_numpy
    from epiray.models.avocado import Avocado, AvocadoParams

    torch.manual_seed(0)
    exps = store.experiments()
    n = store.n_bins(ASM, chrom)
    vocab = Vocabulary.from_records(
        exps[exps["experiment"].isin(vocab_exps)], chrom=chrom, n_bins=n, assembly=ASM
    )
    target = sorted(e for e in train if e.startswith("mm."))
    keys = [vocab.experiment_index(e) for e in target]
    data = chrom_data_from_numpy(
        store.read(ASM, chrom, target),
        [k.biosample for k in keys],
        [k.assay for k in keys],
        chrom=chrom,
        device="cpu",
    )
    params = AvocadoParams(
        n_biosample_factors=4, n_assay_factors=4, n_genome_factors=(3, 2, 2), n_nodes=16
    )
    model = Avocado.build(params, vocab, data)
    state = fit(model, data, LoopParams(epochs=1, batch_size=64, patience=None))
    final = run / "epoch0001_final"
    save_checkpoint(final / "rank0.pt", model, state)
    meta = {
        "model": "avocado",
        "label": run.name.split(".")[0],
        "params": model.params.model_dump(mode="json"),
        "vocab": vocab.to_dict(),
        "store": str(store.root),
        "store_hash": store.store_hash,
        "assembly": ASM,
        "chrom": chrom,
        "fold": run.name.rsplit(".", 1)[1],
        "n_bins": n,
        "shards": [[0, n]],
        "train": target,
        "validate": [],
        "evaluate": sorted(MOUSE_ONLY - set(target)),
        "aux_name": None,
        # the other species' experiments a cross-species run trains on (here only recorded)
        "aux": sorted(e for e in train if not e.startswith("mm.")),
        "value_dtype": "float32",
        "final": True,
    }
    (final / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store and three trained models (chr1, chr2): mouse-only, cross-species, and
    mouse-only on a fold holding out every CTCF experiment."""
    root = tmp_path_factory.mktemp("precheck")
    store = make_store(root / "store")
    runs = root / "runs"
    for chrom in ("chr1", "chr2"):
        write_run(store, runs / f"mouse.{chrom}.all", chrom, MOUSE_ONLY, MOUSE_ONLY)
        write_run(store, runs / f"cross.{chrom}.all", chrom, CROSS, CROSS)
        write_run(
            store, runs / f"zs.{chrom}.fold0", chrom, MOUSE_ONLY, MOUSE_ONLY - {"mm.B2.CTCF"}
        )
    return store, {
        k: str(runs / f"{k}.{{chrom}}.{f}")
        for k, f in (("mouse", "all"), ("cross", "all"), ("zs", "fold0"))
    }


def config(store: Store, out: Path, model: str, **kw) -> ImputeConfig:
    base = dict(
        store=str(store.root),
        output_dir=str(out),
        model=model,
        assembly=ASM,
        chroms=["chr1", "chr2"],
        executor="local",
    )
    return ImputeConfig(**{**base, **kw})


def run(cfg: ImputeConfig):
    from epiray.train import load_predictor

    return impute(cfg, functools.partial(load_predictor, cfg.model))


def pairs(*names: tuple[str, str]) -> list[dict[str, str]]:
    return [{"biosample": b, "assay": a} for b, a in names]


# ------------------------------------------------------------------------- explicit requests
def test_unseen_assay_fails_before_anything_runs_and_the_fix_needs_no_resume(world, tmp_path):
    store, models = world
    out = tmp_path / "out"
    asked = pairs(("mm.B1", "GATA1"), ("mm.B3", "GATA1"), ("mm.B1", "CTCF"))
    with pytest.raises(ConfigError) as e:
        run(config(store, out, models["mouse"], pairs=asked))
    msg = str(e.value)
    assert f"2 of 3 requested pairs cannot be imputed by model {models['mouse']}" in msg
    assert "avocado mouse_only; 3 biosamples, 3 assays" in msg
    assert "assay GATA1: assay never seen by this model (only another species measured it)" in msg
    assert "2 pairs (mm.B1, GATA1), (mm.B3, GATA1)" in msg
    assert "(mm.B1, CTCF)" not in msg
    assert "train a cross-species model (e.g. configs/train_avocado_cross_species.yaml)" in msg
    assert "or leave them out of pairs." in msg and "Nothing was written" in msg
    assert "Vocabulary.extend" not in msg  # the zero-shot cause needs no Python API
    assert not out.exists()
    # the request without them runs at once, without resume
    res = run(config(store, out, models["mouse"], pairs=pairs(("mm.B1", "CTCF"))))
    assert [p.name for p in res.written] == ["mm.B1.CTCF.arcsinh.bw"]
    assert res.unimputable == [] and not (out / UNIMPUTABLE).exists()
    # the cross-species model imputes the assay only human measured
    res = run(config(store, out, models["cross"], pairs=asked[:2]))
    assert len(res.written) == 2
    chroms, iv = read_bigwig(out / "mm.B1.GATA1.arcsinh.bw")
    assert len(iv["chr1"]) == store.n_bins(ASM, "chr1") and iv["chr3"] == []
    text = describe_outputs(out)
    assert "not imputable" not in text and "unfinished" not in text


def test_unobserved_leaves_out_what_the_model_cannot_impute_and_info_says_so(
    world, tmp_path, caplog
):
    store, models = world
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="epiray.impute"):
        res = run(config(store, out, models["mouse"], zero_shot_assays=True))
    left = {(e["biosample"], e["assay"]) for e in res.unimputable}
    assert left == {("mm.B1", "GATA1"), ("mm.B2", "GATA1"), ("mm.B3", "GATA1")}
    assert len(res.written) == 5 and {(p.biosample, p.assay) for p in res.pairs} & left == set()
    notice = [r.getMessage() for r in caplog.records if "leaving out" in r.getMessage()]
    assert len(notice) == 1 and "\n" not in notice[0]
    assert "leaving out 3 of 8 unobserved pairs" in notice[0]
    assert "assay GATA1 (3 pairs)" in notice[0] and "cross-species" in notice[0]
    assert "or set zero_shot_assays: false not to ask for them" in notice[0]
    assert {e["experiment"] for e in read_unimputable(out)} == {
        "mm.B1.GATA1",
        "mm.B2.GATA1",
        "mm.B3.GATA1",
    }
    assert not (out / PARTS / "mm.B1.GATA1").exists()
    text = describe_outputs(out)
    assert f"not imputable by model {models['mouse']}: 3 requested pairs, never predicted" in text
    assert "assay GATA1: assay never seen by this model" in text
    assert "configs/train_avocado_cross_species.yaml" in text
    assert "unfinished" not in text
    # unfinished work (a chromosome without a model) is told apart
    with pytest.raises(EpirayError, match="no final checkpoint"):
        run(
            config(
                store,
                out,
                models["mouse"],
                pairs=pairs(("mm.B1", "DNase")),
                scale="signal",
                chroms=["chr1", "chr2", "chr3"],
            )
        )
    text = describe_outputs(out)
    assert "unfinished: 1 experiments with 2 chromosome spills" in text
    assert "not imputable by model" in text and "3 requested pairs" in text
    # the same request again is not refused (no resume): the unimputable pairs never started
    res = run(config(store, out, models["mouse"], zero_shot_assays=True, resume=True))
    assert len(res.skipped) == 5 and len(res.unimputable) == 3
    # a model that imputes one of them removes it from the record, keeps the others
    run(config(store, out, models["cross"], pairs=pairs(("mm.B2", "GATA1"))))
    assert {e["experiment"] for e in read_unimputable(out)} == {"mm.B1.GATA1", "mm.B3.GATA1"}
    assert "2 requested pairs" in describe_outputs(out)


def test_nothing_left_is_an_error(world, tmp_path):
    store, models = world
    out = tmp_path / "out"
    asm_pairs = pairs(("mm.B1", "GATA1"))
    with pytest.raises(ConfigError, match=r"1 of 1 requested pairs cannot be imputed"):
        run(config(store, out, models["mouse"], pairs=asm_pairs))
    assert not out.exists()


def test_unfitted_names_are_warned_not_refused(world, tmp_path, caplog):
    """A name in the vocabulary whose every experiment the fold held out is imputed (as the
    zero-shot evaluation scores it), with a warning that its factors were never fitted."""
    store, models = world
    with caplog.at_level(logging.WARNING, logger="epiray.impute"):
        res = run(config(store, tmp_path / "out", models["zs"], pairs=pairs(("mm.B1", "CTCF"))))
    assert len(res.written) == 1
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "assay CTCF of model" in msg and "never fitted" in msg


# ------------------------------------------------------------------------- other models
class VocabularyModels:
    """A ``predictor_for`` that can tell its vocabulary per chromosome and must never be
    asked to predict (the check comes first)."""

    def __init__(self, vocab: dict[str, dict]) -> None:
        self.vocab = vocab

    def vocabulary(self, chrom: str):
        return self.vocab.get(chrom)

    def __call__(self, chrom: str):
        raise AssertionError(f"asked to predict {chrom}")


def test_predictor_vocabulary_per_chrom_and_unseen_biosample(world, tmp_path):
    store, _ = world
    full = {"biosamples": ["mm.B1", "mm.B2", "mm.B3"], "assays": ["CTCF", "DNase", "H3K4me3"]}
    no_b3 = {**full, "biosamples": ["mm.B1", "mm.B2"]}
    no_dnase = {**full, "assays": ["CTCF", "H3K4me3"]}
    out = tmp_path / "out"
    cfg = config(
        store,
        out,
        "models/v1",
        pairs=pairs(("mm.B3", "CTCF"), ("mm.B1", "DNase")),
        overwrite=True,
    )
    with pytest.raises(ConfigError) as e:
        impute(cfg, VocabularyModels({"chr1": no_b3, "chr2": no_dnase}))
    msg = str(e.value)
    assert "biosample mm.B3: biosample never seen by this model (models of chr1 only)" in msg
    assert "assay DNase: assay never seen by this model (models of chr2 only)" in msg
    assert "biosamples the model was trained without (mm.B3)" in msg
    assert "assays the model was trained without (DNase" in msg and "by transfer" in msg
    assert not out.exists()
    other = {**full, "assembly": "hsToy1"}
    with pytest.raises(ConfigError, match="trained for assembly"):
        impute(cfg, VocabularyModels({"chr1": other}))
    # an unreadable model is not checked here: loading it reports (existing behaviour)
    assert model_scopes(cfg, ["chr1"], lambda chrom: None) == {}


# ------------------------------------------------------------------------- earlier versions
def test_info_on_a_folder_left_by_an_earlier_version(world, tmp_path):
    """Before the check, a failed run left ``.parts/{experiment}/key.json`` of pairs the model
    never saw; info computes from the model that they cannot be finished, and a rerun of the
    request is not refused."""
    store, models = world
    out = tmp_path / "out"
    key = {
        "format": "epiray-impute/1",
        "assembly": ASM,
        "bin_size": 25,
        "model": models["mouse"],
        "store_hash": store.store_hash,
    }
    for exp in ("mm.B1.GATA1", "mm.B3.DNase.x", "mm.B1.DNase"):
        d = out / PARTS / exp
        d.mkdir(parents=True)
        (d / "key.json").write_text(json.dumps({**key, "experiment": exp}))
    np.save(out / PARTS / "mm.B1.DNase" / "chr1.npy", np.zeros(301, np.float32))
    text = describe_outputs(out)
    assert "requested pairs (left in .parts/ by an earlier run)" in text
    assert "assay GATA1: assay never seen by this model: 1 pairs (mm.B1, GATA1)" in text
    assert "assay DNase.x" in text and "(mm.B3, DNase.x)" in text  # the split it knows best
    assert "unfinished: 1 experiments with 1 chromosome spills" in text
    # the unobserved request again: the unimputable pairs are left out, not in the way
    res = run(config(store, out, models["mouse"], zero_shot_assays=True, resume=True))
    assert len(res.written) == 5
    text = describe_outputs(out)
    assert "unfinished:" not in text
    assert ".parts/ still holds folders of 1 of them" in text
    assert len(read_outputs(out)) == 5


# ------------------------------------------------------------------------- command line
def test_epiray_impute_and_info_commands(world, tmp_path, capsys):
    import yaml

    from epiray.cli import main

    store, models = world
    out = tmp_path / "out"
    base = {
        "store": str(store.root),
        "output_dir": str(out),
        "model": models["mouse"],
        "assembly": ASM,
        "chroms": ["chr1", "chr2"],
        "executor": "local",
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base, "pairs": pairs(("mm.B2", "GATA1"))}))
    assert main(["impute", "--config", str(bad), "--no-hub"]) == 2
    err = capsys.readouterr().err
    assert "(mm.B2, GATA1)" in err and "cross-species model" in err and "Traceback" not in err
    assert not out.exists()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**base, "zero_shot_assays": True}))
    assert main(["impute", "--config", str(good), "--no-hub"]) == 0
    assert "5 bigWigs written" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not imputable by model" in text and "unfinished:" not in text


# ------------------------------------------------------------------------------- ensembles
def _values(path: Path) -> dict[str, np.ndarray]:
    import pyBigWig

    bw = pyBigWig.open(str(path))
    try:
        return {c: bw.values(c, 0, n, numpy=True) for c, n in bw.chroms().items()}
    finally:
        bw.close()


def test_an_ensemble_imputes_the_mean_of_its_members_where_every_member_can(
    world, tmp_path, capsys
):
    import yaml

    from epiray.cli import main

    store, models = world
    members = [models["mouse"], models["zs"]]
    singles = {}
    for k in ("mouse", "zs"):
        res = run(config(store, tmp_path / k, models[k]))
        singles[k] = {p.name: _values(p) for p in res.written}
    out = tmp_path / "ens"
    cfg = {
        "store": str(store.root),
        "output_dir": str(out),
        "model": members,
        "assembly": ASM,
        "chroms": ["chr1", "chr2"],
        "executor": "local",
        "zero_shot_assays": True,
    }
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["impute", "--config", str(path)]) == 0
    assert "5 bigWigs written" in capsys.readouterr().out
    written = read_outputs(out)
    assert len(written) == 5 and set(singles["mouse"]) == {Path(m["path"]).name for m in written}
    for meta in written:
        name = Path(meta["path"]).name
        got = _values(Path(meta["path"]))
        for chrom, v in got.items():
            want = (singles["mouse"][name][chrom] + singles["zs"][name][chrom]) / 2
            np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6)
        # the members differ, so the mean is neither of them
        assert not np.allclose(got["chr1"], singles["mouse"][name]["chr1"])
        assert meta["model"] == f"mean of 2 models ({members[0]}, {members[1]})"
    # the hub names the ensemble, and `epiray info` the unimputable pairs of the mouse member
    assert (out / "hub.txt").is_file()
    assert main(["info", str(out)]) == 0
    assert "not imputable by model mean of 2 models" in capsys.readouterr().out
    # the assay only the cross-species member knows is not imputed by the ensemble
    with pytest.raises(ConfigError, match=r"\(mm.B2, GATA1\)"):
        run(
            config(
                store,
                tmp_path / "x",
                [models["cross"], models["mouse"]],
                pairs=pairs(("mm.B2", "GATA1")),
            )
        )
    res = run(
        config(store, tmp_path / "y", [models["cross"], models["mouse"]], zero_shot_assays=True)
    )
    assert {e["assay"] for e in res.unimputable} == {"GATA1"} and len(res.written) == 5


def test_ensemble_config_members():
    base = dict(store="s", output_dir="o", assembly=ASM)
    assert ImputeConfig(**base, model=["a.{chrom}.all"]).model == "a.{chrom}.all"
    cfg = ImputeConfig(**base, model=["a.{chrom}.all", "b.{chrom}.all"])
    assert cfg.model_label == "mean of 2 models (a.{chrom}.all, b.{chrom}.all)"
    with pytest.raises(ValueError, match="listed more than once"):
        ImputeConfig(**base, model=["a.{chrom}.all", "a.{chrom}.all"])
    with pytest.raises(ValueError, match="empty list"):
        ImputeConfig(**base, model=[])


def test_ensemble_predictor_refuses_a_member_of_another_shape():
    from epiray.impute import EnsemblePredictor

    def ok(chrom, pairs, lo, hi):
        return np.ones((len(pairs), hi - lo), dtype=np.float32)

    def short(chrom, pairs, lo, hi):
        return np.ones((len(pairs), hi - lo - 1), dtype=np.float32)

    ens = EnsemblePredictor([ok, lambda *a: 3 * ok(*a)], names=["a", "b"])
    np.testing.assert_array_equal(ens.predict_chrom("chr1", [("b", "x")], 0, 4), 2.0)
    with pytest.raises(EpirayError, match=r"ensemble member b returned shape \(1, 3\)"):
        EnsemblePredictor([ok, short], names=["a", "b"]).predict_chrom("chr1", [("b", "x")], 0, 4)
    with pytest.raises(EpirayError, match="no members"):
        EnsemblePredictor([])
