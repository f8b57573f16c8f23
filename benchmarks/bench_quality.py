"""Imputation quality at the shipped defaults, on compendia nobody tuned for (issue 17).

One command trains every model of ``configs/`` — as shipped, only the paths, the assembly, the
chromosomes, the fold and the synteny name changed, as a new user would — on a suite of
generated human + mouse compendia of different shapes, and scores it against the truth the
generator knows:

``held``       held-out mouse experiments (about a quarter of those of every assay with at
               least three), scored against the average activity (AA) of the same assay's
               training experiments;
``zero_shot``  every mouse experiment of one protein-binding assay removed from training (its
               human experiments stay), scored against AA of the other held-out experiments of
               that assay (data no model sees: an oracle, as in the cross-species paper);
``unseen``     the assays never run in mouse (``human_only_assays``), imputed for every mouse
               biosample by the cross-species models, scored against the generator's truth and
               an oracle AA (the mean of the other mouse biosamples' truth).

Each compendium also gives its **noise floor**: the MSE of the noiseless signal (``epiray
synth`` writes it), which no model can beat. Per compendium and kind the summary reports mean
MSE, Pearson, wins against AA, and the share of AA's excess over the floor a model leaves,
``(model − floor) / (AA − floor)`` (0: perfect, 1: no better than AA).

The ``dev`` suite (the same shapes, other seeds) is where defaults are chosen (``--configs``
points at a candidate set); the ``test`` suite is measured once with the frozen ``configs/``.
Everything is resumable: compendia, stores and each (compendium, model) result are kept under
``--out`` and reused when the config is unchanged. Runs land in MLflow (a SQLite store under
``--out``), one experiment per compendium, with a parent run per model.

    .venv/bin/python benchmarks/bench_quality.py --suite test
    .venv/bin/python benchmarks/bench_quality.py --suite dev --configs /tmp/candidate \\
        --compendia issue_like --models avocado_cross_species
    .venv/bin/python benchmarks/bench_quality.py --suite test --report

``--final-from TAG --tag NEW`` measures configs that calibrate beside validation cells
(``validation.calibrate``) at the cost of their calibration models alone: the final model of
such a run is the same config's without ``calibrate``, seed for seed, so ``TAG``'s runs of it
are blended by the weights the calibration models fit (:func:`run_calibrated_from`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work" / "quality"
MOUSE, HUMAN, SYNTENY = "mmSyn1", "hsSyn1", "hs2mm"

#: label -> (config file in the configs directory, trains on human tracks through synteny)
MODELS: dict[str, tuple[str, bool]] = {
    "avocado_mouse_only": ("train_avocado.yaml", False),
    "avocado_cross_species": ("train_avocado_cross_species.yaml", True),
    "avocado_concat": ("train_avocado_concat.yaml", True),
    "edice": ("edice.yaml", False),
    "edice_cross_species": ("edice_cross_species.yaml", True),
}

#: Compendium shapes: ``epiray synth`` parameters (SynthParams) and what the shape tests.
SHAPES: dict[str, tuple[dict, str]] = {
    "issue_like": (
        dict(
            mouse_genome_bp=2_200_000,
            mouse_chroms=2,
            human_genome_bp=2_800_000,
            human_chroms=3,
            mouse_biosamples=6,
            human_biosamples=10,
            assays=(
                "H3K4me3",
                "H3K27ac",
                "H3K4me1",
                "H3K27me3",
                "H3K36me3",
                "H3K9me3",
                "DNase",
                "RNA",
                "CTCF",
                "POLR2A",
                "EP300",
                "CEBPB",
                "GATA1",
                "MEF2A",
            ),  # fmt: skip
            human_only_assays=("GATA1", "MEF2A", "CEBPB"),
            mouse_experiments=37,
            human_experiments=108,
        ),
        "the issue's held-out shape: 2.2 Mb mouse, 6 biosamples, 3 assays only in human",
    ),
    "tiny_dense": (
        dict(
            mouse_genome_bp=2_000_000,
            mouse_chroms=1,
            human_genome_bp=2_500_000,
            human_chroms=1,
            mouse_biosamples=4,
            human_biosamples=4,
            mouse_experiments=54,
            human_experiments=60,
            noise=0.2,
        ),
        "2 Mb, one chromosome, 4 biosamples per species, mouse nearly complete, low noise",
    ),
    "many_biosamples": (
        dict(
            mouse_genome_bp=4_000_000,
            mouse_chroms=2,
            human_genome_bp=5_000_000,
            human_chroms=2,
            mouse_biosamples=40,
            human_biosamples=40,
            mouse_experiments=160,
            human_experiments=320,
            noise=0.3,
        ),
        "4 Mb, 40 biosamples per species, mouse a quarter observed",
    ),
    "sparse_noisy": (
        dict(
            mouse_genome_bp=8_000_000,
            mouse_chroms=3,
            human_genome_bp=10_000_000,
            human_chroms=4,
            mouse_biosamples=16,
            human_biosamples=16,
            mouse_experiments=40,
            human_experiments=160,
            noise=0.6,
            min_mouse_per_assay=2,
        ),
        "8 Mb, 16 biosamples, sparse mouse (15 % observed), high noise",
    ),
    "large_genome": (
        dict(
            mouse_genome_bp=50_000_000,
            mouse_chroms=6,
            human_genome_bp=60_000_000,
            human_chroms=6,
            fragment_mean_bp=120_000,
            mouse_biosamples=5,
            human_biosamples=8,
            mouse_experiments=40,
            human_experiments=100,
            noise=0.4,
        ),
        "50 Mb mouse in 6 chromosomes, 5 mouse biosamples, half the mouse grid observed",
    ),
    "clean_medium": (
        dict(
            mouse_genome_bp=12_000_000,
            mouse_chroms=4,
            human_genome_bp=15_000_000,
            human_chroms=4,
            mouse_biosamples=12,
            human_biosamples=20,
            mouse_experiments=96,
            human_experiments=240,
            noise=0.1,
        ),
        "12 Mb, 12 mouse / 20 human biosamples, half the mouse grid, little noise",
    ),
    "few_aligned": (
        dict(
            mouse_genome_bp=6_000_000,
            mouse_chroms=2,
            human_genome_bp=8_000_000,
            human_chroms=3,
            aligned_fraction=0.3,
            mouse_biosamples=8,
            human_biosamples=12,
            mouse_experiments=48,
            human_experiments=150,
            noise=0.3,
        ),
        "6 Mb, a third as much aligned sequence as the default, 8 mouse biosamples",
    ),
}
SUITES: dict[str, dict[str, int]] = {
    "dev": {name: 101 + i for i, name in enumerate(SHAPES)},
    "test": {name: 1 + i for i, name in enumerate(SHAPES)},
}
#: Shapes of the dev suite run by default (the cheap ones; the large genome is test only).
DEV_DEFAULT = ("issue_like", "tiny_dense", "many_biosamples", "sparse_noisy", "few_aligned")


# ----------------------------------------------------------------------------- compendia
def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def assign_folds(table: pd.DataFrame, seed: int) -> tuple[dict[str, str], str]:
    """The evaluation roles of the mouse experiments: ``{experiment: kind}`` for those held
    out (``held`` or ``zero_shot``) and the zero-shot assay.

    The zero-shot assay is a protein-binding assay with at least two mouse experiments (so the
    held-out AA exists), drawn with ``seed``. Held out: a quarter (at least one) of the mouse
    experiments of every other assay with at least three, so at least two still train.
    """
    rng = np.random.default_rng(seed)
    mouse = table[table["species"] == "mouse"].sort_values("experiment")
    counts = mouse.groupby("assay").size()
    pb = sorted(
        a
        for a in counts.index
        if counts[a] >= 2
        and (mouse.loc[mouse["assay"] == a, "category"] == "protein_binding").all()
    )
    if not pb:
        raise SystemExit("bench_quality: no protein-binding assay with 2 mouse experiments")
    zs = pb[int(rng.integers(len(pb)))]
    roles = {e: "zero_shot" for e in mouse.loc[mouse["assay"] == zs, "experiment"]}
    for a, g in mouse.groupby("assay", sort=True):
        if a == zs or len(g) < 3:
            continue
        n = max(1, len(g) // 4)
        for e in rng.choice(g["experiment"].to_numpy(), n, replace=False):
            roles[str(e)] = "held"
    return roles, zs


def prepare(comp_dir: Path, name: str, seed: int, say) -> dict:
    """Generate, ingest and map one compendium (each step reused when done)."""
    from epiray import synthetic
    from epiray.ingest import IngestConfig, ingest
    from epiray.runtime import ensure_ray

    overrides, _ = SHAPES[name]
    params = synthetic.SynthParams(**overrides)
    data = comp_dir / "data"
    info_path = data / "synth.json"
    want = params.model_dump(mode="json")
    fresh = not (
        info_path.is_file()
        and json.loads(info_path.read_text()).get("params") == want
        and json.loads(info_path.read_text()).get("seed") == seed
    )
    if fresh:
        say(f"{name}: generating (seed {seed})")
        synthetic.generate(data, seed=seed, params=params, overwrite=True)
    manifest = pd.read_csv(data / "manifest.tsv", sep="\t")
    roles, zs = assign_folds(manifest, seed)
    manifest["fold"] = [0 if e in roles else "" for e in manifest["experiment"]]
    fold_manifest = data / "manifest.quality.tsv"
    text = manifest.to_csv(sep="\t", index=False)
    if fresh or not fold_manifest.is_file() or fold_manifest.read_text() != text:
        fold_manifest.write_text(text)
    ensure_ray(None)
    store = ingest(
        IngestConfig(manifest=str(fold_manifest), store=str(comp_dir / "store"), chroms="all"),
        resume=not fresh,
        overwrite=fresh,
    )
    synthetic.build_synteny(data, store.root, SYNTENY)
    synth = json.loads(info_path.read_text())
    return {
        "name": name,
        "seed": seed,
        "dir": str(comp_dir),
        "store": str(store.root),
        "roles": roles,
        "zero_shot_assay": zs,
        "human_only": synth["human_only_assays"],
        "chroms": list(synth["assemblies"][MOUSE]["chroms"]),
    }


# ----------------------------------------------------------------------------- training
def train_config(comp: dict, label: str, configs: Path, out: Path):
    """The shipped config of ``label`` with only the data-dependent keys changed."""
    from epiray.config import load_yaml, parse_config
    from epiray.train import TrainConfig

    file, cross = MODELS[label]
    path = configs / file
    raw = load_yaml(path)
    raw = copy.deepcopy(raw)
    raw.update(
        store=comp["store"],
        out=str(out / "runs"),
        assembly=MOUSE,
        chroms="all",
        variant_name=label,
        folds={"scheme": "manifest", "fold": 0},
    )
    if cross:
        raw["synteny"] = SYNTENY
        raw["aux_species"] = True
    tracking = dict(raw.get("tracking") or {})
    tracking.update(
        tracking_uri=f"sqlite:///{(out.parent / 'mlflow.db').resolve()}",
        experiment=f"quality-{Path(comp['dir']).parent.name}-{comp['name']}",
    )
    raw["tracking"] = tracking
    return parse_config(TrainConfig, raw, path, base=path.parent), raw


def _truth(comp: dict, chrom: str, clean: bool = False) -> tuple[np.ndarray, dict]:
    from epiray import synthetic

    data = Path(comp["dir"]) / "data"
    index = synthetic.read_truth_index(data)
    return synthetic.read_truth(data, "mouse", chrom, truth_index=index, clean=clean), index


def mean_predictor(outs: list[Path], label: str, chrom: str):
    """The mean of the predictions of several trained runs of one chromosome (a seed
    ensemble): ``epiray impute``'s :class:`epiray.impute.EnsemblePredictor`, loaded as
    ``model: [run, ...]`` loads it."""
    from epiray.train import load_predictor

    return load_predictor([str(o / "runs" / f"{label}.{{chrom}}.fold0") for o in outs], chrom)


def score_unseen(comp: dict, label: str, out: Path | list[Path]) -> list[dict]:
    """Score the imputations of the assays never run in mouse against the generator's truth
    (``out`` a list: the mean of those runs' imputations)."""
    from epiray.metrics import pearson

    outs = out if isinstance(out, list) else [out]
    rows = []
    for chrom in comp["chroms"]:
        truth, index = _truth(comp, chrom)
        clean, _ = _truth(comp, chrom, clean=True)
        bios, assays = index["species"]["mouse"]["biosamples"], index["species"]["mouse"]["assays"]
        pred = mean_predictor(outs, label, chrom)
        pairs = [(b, a) for a in comp["human_only"] for b in bios]
        values = pred.predict_chrom(chrom, pairs, 0, truth.shape[2])
        for (b, a), yhat in zip(pairs, values):
            bi, ai = bios.index(b), assays.index(a)
            y = truth[bi, ai].astype(np.float32)
            aa = np.mean([truth[j, ai] for j in range(len(bios)) if j != bi], 0)
            rows.append(
                _row(
                    "unseen",
                    f"{b}.{a}",
                    a,
                    chrom,
                    y,
                    yhat,
                    aa,
                    float(np.mean((y - clean[bi, ai].astype(np.float32)) ** 2)),
                    pearson,
                )
            )
    return rows


def _row(kind, exp, assay, chrom, y, yhat, aa, floor, pearson) -> dict:
    y, yhat, aa = (np.asarray(v, dtype=np.float32) for v in (y, yhat, aa))
    return {
        "kind": kind,
        "experiment": exp,
        "assay": assay,
        "chrom": chrom,
        "bins": int(y.shape[0]),
        "mse": float(np.mean((yhat - y) ** 2)),
        "pearson": float(pearson(y, yhat)),
        "aa_mse": float(np.mean((aa - y) ** 2)),
        "aa_pearson": float(pearson(y, aa)),
        "floor": floor,
    }


def score_heldout(comp: dict, results) -> list[dict]:
    """The held-out experiments of the train runs, with AA from the same runs and the floor."""
    rows = []
    floors: dict[str, dict] = {}
    for r in results:
        s = r.scores
        own, aa = s[s["model"] == r.spec.label], s[s["model"] == "average_activity"]
        aa = aa.set_index("experiment")
        if r.spec.chrom not in floors:
            _, index = _truth(comp, r.spec.chrom)
            floors[r.spec.chrom] = index
        index = floors[r.spec.chrom]
        m = index["species"]["mouse"]
        floor = m["chroms"][r.spec.chrom]["noise_floor"]
        n_bins = m["chroms"][r.spec.chrom]["n_bins"]
        for _, x in own.iterrows():
            e = x["experiment"]
            if e not in aa.index:
                continue
            b, a = x["biosample"], x["assay"]
            rows.append(
                {
                    "kind": comp["roles"][e],
                    "experiment": e,
                    "assay": a,
                    "chrom": r.spec.chrom,
                    "bins": n_bins,
                    "mse": float(x["mse"]),
                    "pearson": float(x["pearson"]),
                    "aa_mse": float(aa.loc[e, "mse"]),
                    "aa_pearson": float(aa.loc[e, "pearson"]),
                    "floor": float(floor[m["biosamples"].index(b)][m["assays"].index(a)]),
                }
            )
    return rows


def write_result(path: Path, res: dict) -> None:
    """One (compendium, model) result, written atomically (a killed run leaves none)."""
    from epiray.store import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(res, indent=1, default=str))


def run_model(comp: dict, label: str, configs: Path, out: Path, say) -> dict:
    """Train ``label`` on one compendium at its shipped config (or reuse the result)."""
    from epiray.train import train

    res_path = out / "result.json"
    cfg, raw = train_config(comp, label, configs, out)
    key = _hash({"config": raw, "comp": comp["name"], "seed": comp["seed"]})
    if res_path.is_file():
        old = json.loads(res_path.read_text())
        if old.get("key") == key:
            return old
    t0 = time.perf_counter()
    results = train(cfg)
    seconds = time.perf_counter() - t0
    rows = score_heldout(comp, results)
    if MODELS[label][1]:
        rows += score_unseen(comp, label, out)
    epochs = {r.spec.chrom: int(r.history["epoch"].max()) for r in results if len(r.history)}
    # the weight of the model against average activity (validation.calibrate), per run
    weights = {}
    for r in results:
        cal = json.loads((Path(r.checkpoint) / "meta.json").read_text()).get("calibration")
        if cal:
            weights[f"{r.spec.chrom}.{r.spec.fold}"] = round(float(cal["weight"]), 4)
    res = {
        "key": key,
        "compendium": comp["name"],
        "seed": comp["seed"],
        "model": label,
        "config": raw,
        "seconds": seconds,
        "epochs": epochs,
        "calibration_weights": weights,
        "rows": rows,
    }
    write_result(res_path, res)
    say(
        f"  {comp['name']} {label}: {seconds:.0f} s, epochs {epochs}"
        + (f", calibration weights {weights}" if weights else "")
    )
    return res


def _comparable(raw: dict) -> dict:
    """A config without what a calibrated run may change against its uncalibrated twin: the
    output folder, its MLflow store and validation's ``calibrate`` / ``per_assay`` (which
    beside validation cells only pick the calibration model's withheld experiments)."""
    raw = copy.deepcopy(raw)
    raw.pop("out", None)
    raw.pop("tracking", None)
    v = dict(raw.get("validation") or {})
    v.pop("calibrate", None)
    v.pop("per_assay", None)
    raw["validation"] = v
    return raw


def run_calibrated_from(
    comp: dict, label: str, configs: Path, out: Path, final_from: Path, say
) -> dict:
    """The calibrated config of ``label`` as ``epiray train`` runs it, without training its
    final models again: beside validation cells the final model is the uncalibrated config's,
    seed for seed (``tests/test_train.py::test_calibration_beside_validation_cells``), so only
    the calibration models are trained (``train(calibration_only=True)``) and ``final_from``'s
    runs of the uncalibrated config are blended by their weights, through the predictor
    ``epiray impute`` loads (:class:`epiray.impute.ModelPredictor`). Held-out rows are
    rescored (the final model alone first: it must reproduce ``final_from``'s figures);
    zero-shot and unseen rows are ``final_from``'s (no mouse track of those assays, so nothing
    to blend: checked)."""
    from epiray.calibration import AverageActivityReader, Calibration
    from epiray.impute import ModelPredictor
    from epiray.metrics import pearson
    from epiray.store import Store
    from epiray.train import final_checkpoint, load_shards, train

    res_path = out / "result.json"
    cfg, raw = train_config(comp, label, configs, out)
    v = cfg.validation
    if not (v.calibrate and v.scheme == "cells"):
        raise SystemExit(f"--final-from: {label}'s config does not calibrate beside cells")
    old = json.loads((final_from / "result.json").read_text())
    if _comparable(old["config"]) != _comparable(raw) or old["config"]["validation"].get(
        "calibrate"
    ):
        raise SystemExit(
            f"--final-from {final_from}: its config is not this one without calibrate; "
            "train the calibrated config in full instead (no --final-from)."
        )
    key = _hash({"config": raw, "comp": comp["name"], "seed": comp["seed"], "from": old["key"]})
    if res_path.is_file():
        got = json.loads(res_path.read_text())
        if got.get("key") == key:
            return got
    t0 = time.perf_counter()
    results = train(cfg, calibration_only=True)
    seconds = time.perf_counter() - t0
    store = Store.open(comp["store"])
    exps = store.experiments(MOUSE).set_index("experiment")
    rows, weights = [], {}
    for r in results:
        chrom = r.spec.chrom
        cal = Calibration.from_dict(
            json.loads((Path(r.checkpoint) / "meta.json").read_text())["calibration"]
        )
        weights[f"{chrom}.{r.spec.fold}"] = round(float(cal.weight), 4)
        ckpt = final_checkpoint(final_from / "runs" / f"{label}.{chrom}.fold0")
        final_train = json.loads((ckpt / "meta.json").read_text())["train"]
        kept = set(r.spec.train) | set(r.spec.withheld)
        if final_train != [e for e in r.spec.all_train if e in kept]:
            raise SystemExit(f"--final-from {ckpt}: trained on other tracks than this config's")
        shards = load_shards(ckpt, store=store, tracks=False)
        alone = ModelPredictor(shards)
        blended = ModelPredictor(
            shards,
            calibration=cal,
            average_activity=AverageActivityReader(store, MOUSE, chrom, cal.average_activity),
        )
        mine = [x for x in old["rows"] if x["chrom"] == chrom]
        for x in mine:
            if x["kind"] != "held":
                if x["assay"] in cal.average_activity:
                    raise SystemExit(f"{x['experiment']}: {x['kind']} assay has mouse tracks")
                rows.append(x)
                continue
            pair = [(exps.loc[x["experiment"], "biosample"], x["assay"])]
            y = store.read(MOUSE, chrom, [x["experiment"]])[0].astype(np.float32)
            p1 = alone.predict_chrom(chrom, pair, 0, y.shape[0])[0]
            check = float(np.mean((p1 - y) ** 2))
            if abs(check - x["mse"]) > 2e-3 * max(x["mse"], 1e-6):
                raise SystemExit(
                    f"--final-from: {x['experiment']} {chrom}: the final model rescored "
                    f"{check:.5f}, its run {x['mse']:.5f}"
                )
            pb = blended.predict_chrom(chrom, pair, 0, y.shape[0])[0]
            rows.append(
                {**x, "mse": float(np.mean((pb - y) ** 2)), "pearson": float(pearson(y, pb))}
            )
    rows += [x for x in old["rows"] if x["chrom"] not in {r.spec.chrom for r in results}]
    res = {
        "key": key,
        "compendium": comp["name"],
        "seed": comp["seed"],
        "model": label,
        "config": raw,
        "final_from": str(final_from),
        "seconds": old["seconds"] + seconds,
        "calibration_seconds": seconds,
        "epochs": old["epochs"],
        "calibration_epochs": {
            r.spec.chrom: int(r.history["epoch"].max()) for r in results if len(r.history)
        },
        "calibration_weights": weights,
        "rows": rows,
    }
    write_result(res_path, res)
    say(
        f"  {comp['name']} {label}: calibration models {seconds:.0f} s, epochs "
        f"{res['calibration_epochs']}, weights {weights}; final models from {final_from}"
    )
    return res


def score_ensemble(comp: dict, label: str, outs: list[Path], say) -> dict:
    """The seed ensemble of ``outs`` (runs of ``label`` on ``comp`` differing in seed only):
    every row of the first member's result, rescored with the mean of the members'
    imputations (held-out and zero-shot against the observed track, as the train runs score;
    unseen against the truth). The first member's own rows are rescored the same way first,
    as a check that this scoring is the train runs'."""
    from epiray.metrics import pearson
    from epiray.store import Store

    members = [json.loads((o / "result.json").read_text()) for o in outs]
    store = Store.open(comp["store"])
    exps = store.experiments(MOUSE).set_index("experiment")
    base = [r for r in members[0]["rows"] if r["kind"] != "unseen"]
    rows = []
    for chrom in comp["chroms"]:
        mine = [r for r in base if r["chrom"] == chrom]
        if not mine:
            continue
        pairs = [(exps.loc[r["experiment"], "biosample"], r["assay"]) for r in mine]
        y = store.read(MOUSE, chrom, [r["experiment"] for r in mine]).astype(np.float32)
        ens = mean_predictor(outs, label, chrom)  # each member loaded once
        single = ens.members[0].predict_chrom(chrom, pairs, 0, y.shape[1])
        mean = ens.predict_chrom(chrom, pairs, 0, y.shape[1])
        for r, yi, p1, pm in zip(mine, y, single, mean):
            check = float(np.mean((p1 - yi) ** 2))
            if abs(check - r["mse"]) > 1e-3 * max(r["mse"], 1e-6):
                say(f"  note: {r['experiment']} {chrom}: rescored {check:.5f}, run {r['mse']:.5f}")
            rows.append(
                {**r, "mse": float(np.mean((pm - yi) ** 2)), "pearson": float(pearson(yi, pm))}
            )
    if MODELS[label][1]:
        rows += score_unseen(comp, label, outs)
    return {
        "compendium": comp["name"],
        "seed": comp["seed"],
        "model": label,
        "members": [str(o) for o in outs],
        "seconds": sum(m["seconds"] for m in members),
        "epochs": [m["epochs"] for m in members],
        "rows": rows,
    }


# ----------------------------------------------------------------------------- summary
def summarise(results: list[dict]) -> pd.DataFrame:
    """One row per (compendium, model, kind): MSE, Pearson, wins and the floor share."""
    recs = []
    for res in results:
        df = pd.DataFrame(res["rows"])
        if df.empty:
            continue
        # one figure per experiment: chromosomes weighted by their bins
        w = df["bins"]
        for col in ("mse", "pearson", "aa_mse", "aa_pearson", "floor"):
            df[col + "_w"] = df[col] * w
        per = df.groupby(["kind", "experiment"]).agg(
            **{c: (c + "_w", "sum") for c in ("mse", "pearson", "aa_mse", "aa_pearson", "floor")},
            bins=("bins", "sum"),
        )
        for c in ("mse", "pearson", "aa_mse", "aa_pearson", "floor"):
            per[c] = per[c] / per["bins"]
        for kind, g in per.groupby(level="kind"):
            mse, aa, floor = g["mse"].mean(), g["aa_mse"].mean(), g["floor"].mean()
            recs.append(
                {
                    "compendium": res["compendium"],
                    "model": res["model"],
                    "kind": kind,
                    "n": len(g),
                    "mse": mse,
                    "aa_mse": aa,
                    "floor": floor,
                    "share": (mse - floor) / (aa - floor) if aa > floor else np.nan,
                    "wins": int((g["mse"] < g["aa_mse"]).sum()),
                    "pearson": g["pearson"].mean(),
                    "aa_pearson": g["aa_pearson"].mean(),
                    "seconds": res["seconds"],
                }
            )
    return pd.DataFrame(recs)


def report(summary: pd.DataFrame) -> str:
    """Markdown: one table per kind, rows compendium × model."""
    out = []
    for kind in ("held", "zero_shot", "unseen"):
        s = summary[summary["kind"] == kind]
        if s.empty:
            continue
        out.append(f"\n### {kind}\n")
        out.append(
            "| compendium | model | n | MSE | AA | floor | share | wins | Pearson | AA Pearson "
            "| s |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for _, r in s.sort_values(["compendium", "model"]).iterrows():
            out.append(
                f"| {r['compendium']} | {r['model']} | {r['n']} | {r['mse']:.4f} | "
                f"{r['aa_mse']:.4f} | {r['floor']:.4f} | {r['share']:.2f} | "
                f"{r['wins']}/{r['n']} | {r['pearson']:.3f} | {r['aa_pearson']:.3f} | "
                f"{r['seconds']:.0f} |"
            )
    return "\n".join(out)


def log_summary(summary: pd.DataFrame, out: Path, suite: str) -> None:
    """One MLflow run per suite with every figure as a metric and the table as an artifact."""
    from epiray.tracking import TrackingConfig, start_run

    cfg = TrackingConfig(
        tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}", experiment="quality-summary"
    )
    with start_run(cfg, name=f"quality-{suite}", base_dir=str(out), resume=True) as run:
        metrics = {}
        for _, r in summary.iterrows():
            key = f"{r['compendium']}/{r['model']}/{r['kind']}"
            for m in ("mse", "share", "pearson", "wins"):
                metrics[f"{key}/{m}"] = float(r[m])
        run.log_metrics(metrics)
        run.log_table(summary, "summary")
        run.log_text(report(summary), "summary.md")


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="test")
    ap.add_argument("--compendia", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--configs", type=Path, default=ROOT / "configs", help="config directory")
    ap.add_argument("--tag", default=None, help="results subfolder (default: the configs dir)")
    ap.add_argument("--out", type=Path, default=WORK)
    ap.add_argument("--report", action="store_true", help="summarise what is there, train none")
    ap.add_argument(
        "--ensemble",
        nargs="+",
        metavar="TAG",
        help="score the mean imputation of these result tags' runs (trained already, e.g. the "
        "same configs at several seeds) as tag ensemble-TAG1-TAG2..., train none",
    )
    ap.add_argument(
        "--final-from",
        metavar="TAG",
        help="configs that calibrate beside validation cells: train only the calibration "
        "models and blend this result tag's runs of the same configs without calibrate (the "
        "same final models, seed for seed) by their weights; results under --tag",
    )
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    def say(msg: str) -> None:
        print(msg, flush=True)

    names = args.compendia or (list(DEV_DEFAULT) if args.suite == "dev" else list(SHAPES))
    tag = args.tag or ("shipped" if args.configs == ROOT / "configs" else args.configs.name)
    if args.ensemble:
        tag = args.tag or "ensemble-" + "-".join(args.ensemble)
    if args.final_from and tag == args.final_from:
        raise SystemExit("--final-from: give another --tag for the calibrated results")
    suite_dir = args.out / args.suite
    results = []
    for name in names:
        comp_dir = suite_dir / "compendia" / name
        seed = SUITES[args.suite][name]
        if args.report:
            for label in args.models:
                p = suite_dir / tag / name / label / "result.json"
                if p.is_file():
                    results.append(json.loads(p.read_text()))
            continue
        comp = prepare(comp_dir, name, seed, say)
        for label in args.models:
            out = suite_dir / tag / name / label
            if args.ensemble:
                outs = [suite_dir / t / name / label for t in args.ensemble]
                if not all((o / "result.json").is_file() for o in outs):
                    say(f"{name} {label}: not every member trained ({', '.join(map(str, outs))})")
                    continue
                res = score_ensemble(comp, label, outs, say)
                write_result(out / "result.json", res)
                results.append(res)
                continue
            if args.final_from:
                src = suite_dir / args.final_from / name / label
                results.append(run_calibrated_from(comp, label, args.configs, out, src, say))
                continue
            results.append(run_model(comp, label, args.configs, out, say))
    summary = summarise(results)
    if summary.empty:
        say("no results")
        return
    text = report(summary)
    say(text)
    (suite_dir / tag).mkdir(parents=True, exist_ok=True)
    summary.to_csv(suite_dir / tag / "summary.csv", index=False)
    (suite_dir / tag / "summary.md").write_text(text + "\n")
    log_summary(summary, suite_dir / tag, args.suite)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
