"""Leave-one-out over the 25 Roadmap pilot tracks: average activity, Avocado and eDICE.

The real-data check of issues 4, 5 and 6 in one resumable script. For every track of
``shared/data/roadmap-pilot`` (5 cell types × 5 histone marks, 1,126,469 bins, arcsinh):
train on the other 24, impute it, and score it with every metric of ``epiray.metrics`` the
data supports (the pilot regions are coordinate-free, so the promoter/gene/enhancer MSEs are
undefined; MSEVar weights are the per-bin variance of the assay over the 5 cell types).

Models
    ``average_activity``  mean of the same assay over the other 4 cell types.
    ``avocado``           ``bench_avocado.PILOT_MODEL`` / ``PILOT_LOOP`` (paper factors, 2 × 256
                          network, Adam 3e-3, batches of 10,000); early stopping on one more
                          held-out track of the same assay (the next cell type's), never on the
                          test track; the best epoch imputes.
    ``edice``             ``bench_edice``'s pilot configuration (dim 32, MLP 2 × 128, 20 % of
                          each bin's tracks as targets, 1,000 steps × 256 bins, Adam 2e-3
                          decaying to 0).

Every finished (model, track) is kept under ``--work`` (prediction as float16 ``.npy`` and the
scores as JSON) and skipped on a re-run, so the ~6 CPU-hours of Avocado can be spread over
several runs. ``--report`` only scores and reports what is there. The summary (per assay and
overall, paired wins against average activity) is printed and logged to MLflow (experiment
``pilot-loo``; a local SQLite store under ``--work`` unless ``--tracking-uri``).

    .venv/bin/python benchmarks/bench_pilot_loo.py --models average_activity
    .venv/bin/python benchmarks/bench_pilot_loo.py --models avocado --assays H3K4me3
    .venv/bin/python benchmarks/bench_pilot_loo.py --report

``--data synth:SEED`` runs the same protocol on a generated stand-in of the pilot's shape
(:data:`DEV_PILOT`: 5 biosamples of 5 different programs × the pilot's 5 histone marks, one
6 Mb chromosome, every track observed), ``synth-noisy:SEED`` on a harder one whose average
activity scores like the pilot's (:data:`DEV_PILOT_NOISY`): the dev data on which settings for
compendia this small are chosen without looking at the pilot (issue 17). ``--config`` trains the
``avocado_shipped_*`` models from another config (a dev candidate) instead of the shipped one;
with a config that calibrates beside validation cells, ``--final-from DIR`` reads the final
model's imputations from a run of the uncalibrated config in ``DIR`` (the same model, seed for
seed) and trains only the calibration models.

    .venv/bin/python benchmarks/bench_pilot_loo.py --data synth:201 \\
        --work benchmarks/_work/pilot_dev/shipped --models average_activity avocado_shipped_bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_avocado as ba  # noqa: E402
import bench_edice as be  # noqa: E402

from epiray.metrics import METRIC_NAMES, assay_variance, score_track  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work" / "pilot_loo"
MODELS = ("average_activity", "avocado", "edice", "avocado_shipped_fp32", "avocado_shipped_bf16")
#: ``avocado_shipped_*``: ``configs/train_avocado.yaml`` as shipped (its model and its train and
#: validation sections: 5 % of every training track's bins as validation cells), trained in
#: float32 (``autocast: off``) or bf16 autocast, the same seeds (issues 17 and 20)
SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "train_avocado.yaml"
CELLS, ASSAYS = ba.CELLS, ba.ASSAYS
#: ``epiray synth`` parameters of the pilot's dev stand-in (``--data synth:SEED``).
DEV_PILOT = dict(
    mouse_genome_bp=6_000_000,
    mouse_chroms=1,
    human_genome_bp=7_000_000,
    human_chroms=1,
    mouse_biosamples=5,
    human_biosamples=2,
    programs=("liver", "brain", "blood", "esc", "fibroblast"),
    assays=tuple(ASSAYS),
    human_only_assays=(),
    mouse_rare_assays=(),
    mouse_experiments=25,
    human_experiments=10,
    min_human_per_assay=1,
    noise=0.4,
)
#: A harder stand-in (``--data synth-noisy:SEED``): cell types far less alike and noisier
#: tracks, set so that average activity's own statistics resemble the pilot's (mean Pearson
#: 0.52 vs the pilot's 0.47, MSE 0.77 of the tracks' variance vs 0.81) — model-free figures,
#: matched over four settings of (biosample_flip, noise); no model was trained on the pilot
#: for it. The default stand-in's are 0.80 and 0.39: there Avocado beats AA easily.
DEV_PILOT_NOISY = {**DEV_PILOT, "biosample_flip": 0.45, "noise": 1.2}
DEV_DATA = {"synth": DEV_PILOT, "synth-noisy": DEV_PILOT_NOISY}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def _axes(tracks) -> tuple[list[str], list[str]]:
    """The cell types and assays of ``tracks``, in order of first appearance."""
    return list(dict.fromkeys(c for c, _ in tracks)), list(dict.fromkeys(a for _, a in tracks))


def _vocab(tracks):
    from epiray.models import Vocabulary

    n = len(next(iter(tracks.values())))
    recs = [(f"{c}.{a}", c, a, "human") for c, a in tracks]
    return Vocabulary.from_records(recs, chrom="pilot", n_bins=n)


def load_synth(seed: int, work: Path, kind: str = "synth") -> dict[tuple[str, str], np.ndarray]:
    """The 25 tracks of the pilot's generated stand-in ``kind`` (:data:`DEV_DATA`; generated
    under ``work`` once)."""
    from epiray import synthetic

    out = work / f"{kind}-{seed}"
    if not (out / "truth" / "truth.json").is_file():
        synthetic.generate(out, seed, synthetic.SynthParams(**DEV_DATA[kind]), overwrite=True)
    index = synthetic.read_truth_index(out)
    entry = index["species"]["mouse"]
    (chrom,) = entry["chroms"]
    arr = synthetic.read_truth(out, "mouse", chrom, truth_index=index, mmap=False)
    return {
        (b, a): arr[i, entry["assays"].index(a)].astype(np.float32)
        for i, b in enumerate(entry["biosamples"])
        for a in ASSAYS
    }


def impute_average_activity(tracks, held) -> tuple[np.ndarray, dict]:
    from epiray.models.baselines import AverageActivity

    cell, assay = held
    vocab = _vocab(tracks)
    data = ba._data(tracks, vocab, [k for k in tracks if k != held])
    aa = AverageActivity.fit(data, vocab)
    return aa.predict(data, vocab.biosample_index(cell), vocab.assay_index(assay)).numpy(), {}


def impute_avocado(tracks, held, seed: int) -> tuple[np.ndarray, dict]:
    from epiray.loop import LoopParams, fit
    from epiray.models.avocado import Avocado, AvocadoParams

    cell, assay = held
    vocab = _vocab(tracks)
    cells = _axes(tracks)[0]
    val = (cells[(cells.index(cell) + 1) % len(cells)], assay)
    train = [k for k in tracks if k not in (held, val)]
    data = ba._data(tracks, vocab, train, [val])
    torch.manual_seed(seed)
    model = Avocado.build(AvocadoParams(**ba.PILOT_MODEL), vocab, data)
    st = fit(model, data, LoopParams(**ba.PILOT_LOOP, seed=seed))
    pred = model.predict(data, vocab.biosample_index(cell), vocab.assay_index(assay)).numpy()
    info = {
        "val_track": f"{val[0]}.{val[1]}",
        "best_epoch": st.best_epoch,
        "val_curve": [round(h["val_mse"], 4) for h in st.history],
    }
    return pred, info


def _calibration(model, data) -> dict | None:
    """The blend with AA that the run's validation tracks fit (:mod:`epiray.calibration`,
    as ``epiray train`` fits it), as a dict; None without validation tracks."""
    from epiray.calibration import calibration_sums, fit_weight

    cal = fit_weight(calibration_sums(model, data))
    return cal.to_dict() if cal is not None else None


def _fit_shipped(tracks, vocab, fit_on, val, cfg, seed: int, autocast: str):
    """One model of ``cfg`` on ``fit_on`` (``val``: whole validation tracks), validated on
    cells of ``fit_on`` under ``validation.scheme: cells``, as ``epiray train`` does."""
    from epiray.folds import heldout_blocks, heldout_fraction
    from epiray.loop import fit
    from epiray.models.avocado import Avocado, AvocadoParams

    v = cfg.validation
    data = ba._data(tracks, vocab, fit_on, val)
    n = data.n_bins
    if v.scheme == "cells":
        frac = heldout_fraction(len(fit_on), n, v.fraction, v.max_cells)
        ids = [f"{c}.{a}" for c, a in fit_on]
        data.heldout = torch.from_numpy(
            heldout_blocks(ids, "pilot", n, 0, n, frac, v.block_bins, seed)
        )
        data.heldout_block = v.block_bins
    params = cfg.train.model_copy(update={"seed": seed, "autocast": autocast})
    torch.manual_seed(seed)
    model = Avocado.build(AvocadoParams(**cfg.model.params), vocab, data)
    st = fit(model, data, params)
    return model, data, st, params


def impute_avocado_shipped(
    tracks, held, seed: int, autocast: str, config: Path = SHIPPED, final_from: Path | None = None
) -> tuple[np.ndarray, dict]:
    """Train on the other 24 tracks at the shipped config (or ``config``) and impute
    ``held``: its model, train section and validation as ``epiray train`` does them (cells;
    or whole experiments, ``per_assay`` per assay; with ``refit``, a fresh model on all 24
    for the epochs chosen, replaying the selection run's learning rates; with ``calibrate``,
    the blend with AA fitted on the withheld experiments — beside validation cells by a
    calibration model trained without them, the final model then training on all 24).

    ``final_from``: a work folder of the same model name run at the config without
    ``calibrate``; beside validation cells, the final model's imputation is read from it
    instead of trained again (that model is the same, seed for seed: ``tests/test_train.py``
    checks it for ``epiray train``)."""
    from epiray.calibration import blend
    from epiray.config import load_config
    from epiray.loop import fit
    from epiray.models.avocado import Avocado, AvocadoParams
    from epiray.train import TrainConfig, _pick_validation

    cfg = load_config(TrainConfig, config)
    cell, assay = held
    vocab = _vocab(tracks)
    train = [k for k in tracks if k != held]
    v = cfg.validation
    fit_on, val = train, []
    if v.scheme == "experiments" or v.calibrate:
        names = {f"{c}.{a}": (c, a) for c, a in train}
        table = pd.DataFrame({"experiment": list(names), "assay": [a for _, a in train]})
        kept, picked = _pick_validation(table, list(names), v, v.seed + seed)
        fit_on, val = [names[e] for e in kept], [names[e] for e in picked]
    model, data, st, params = _fit_shipped(tracks, vocab, fit_on, val, cfg, seed, autocast)
    info = {
        "config": str(config),
        "autocast": autocast,
        "validation": v.scheme,
        "val_tracks": [f"{c}.{a}" for c, a in val],
        "precision": st.regime.get("precision") if st.regime else None,
        "batch_size": st.regime.get("batch_size") if st.regime else None,
        "best_epoch": st.best_epoch,
        "epochs": st.epoch,
        "val_curve": [round(h["val_mse"], 4) for h in st.history if h["val_mse"] is not None],
    }
    cal = _calibration(model, data) if val else None
    if cal is not None:
        # the least-squares weight on the whole validation tracks; applied to the imputation
        # only when the config calibrates (validation.calibrate)
        info["aa_weight"] = cal["weight"]
        info["calibration"] = {k: v for k, v in cal.items() if k != "average_activity"}
    pred = None
    if v.calibrate and v.scheme == "cells":
        # the final model: every track, validation cells, as the uncalibrated config
        info["calibration_model"] = {k: info.pop(k) for k in ("best_epoch", "epochs", "val_curve")}
        name = f"{cell}.{assay}"
        if final_from is not None:
            label = {"off": "fp32", "bf16": "bf16"}[autocast]
            got = final_from / f"avocado_shipped_{label}" / f"{name}.npy"
            if not got.is_file():
                raise SystemExit(f"--final-from {final_from}: no {got}; run it there first.")
            pred = np.load(got).astype(np.float32)
            old = json.loads(got.with_suffix(".json").read_text())
            info.update(final_from=str(got), best_epoch=old.get("best_epoch"))
        else:
            model, data, st, params = _fit_shipped(tracks, vocab, train, [], cfg, seed, autocast)
            info.update(best_epoch=st.best_epoch, epochs=st.epoch)
    elif v.refit and v.scheme != "none":
        start = st.refit(params.lr)
        data = ba._data(tracks, vocab, train)
        torch.manual_seed(seed)
        model = Avocado.build(AvocadoParams(**cfg.model.params), vocab, data)
        again = params.model_copy(
            update={"epochs": start.selected_epochs, "patience": None, "restore_best": False}
        )
        fit(model, data, again, start_state=start)
        info["refit_epochs"] = start.selected_epochs
    if pred is None:
        data.heldout = None
        pred = model.predict(data, vocab.biosample_index(cell), vocab.assay_index(assay)).numpy()
    if v.calibrate and cal is not None:
        # AA of every observed track of the assay (the other four cell types), as train's
        aa = np.mean([tracks[k] for k in train if k[1] == assay], 0)
        pred = np.asarray(blend(pred, aa, cal["weight"]), dtype=np.float32)
        info["blended"] = True
    return pred, info


def impute_edice(tracks, held, seed: int) -> tuple[np.ndarray, dict]:
    args = argparse.Namespace(
        dim=32, ffn_hidden=64, mlp_hidden=128, n_targets=0.2, lr=2e-3, steps=1000, batch_bins=256
    )
    preds, _, _ = be.fit_and_impute(tracks, [held], args, seed=seed)
    return preds[held], {}


def run_one(
    model: str,
    tracks,
    held,
    work: Path,
    seed: int,
    config: Path = SHIPPED,
    final_from: Path | None = None,
) -> bool:
    """Impute and score ``held`` with ``model`` unless done; True when it ran."""
    name = f"{held[0]}.{held[1]}"
    out = work / model
    out.mkdir(parents=True, exist_ok=True)
    if (out / f"{name}.json").is_file():
        return False
    t0, c0 = time.perf_counter(), time.process_time()
    if model == "average_activity":
        pred, info = impute_average_activity(tracks, held)
    elif model == "avocado":
        pred, info = impute_avocado(tracks, held, seed)
    elif model.startswith("avocado_shipped_"):
        autocast = {"fp32": "off", "bf16": "bf16"}[model.rsplit("_", 1)[1]]
        pred, info = impute_avocado_shipped(tracks, held, seed, autocast, config, final_from)
    else:
        pred, info = impute_edice(tracks, held, seed)
    info.update(
        wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time() - c0, 1)
    )
    _atomic_write(out / f"{name}.npy", lambda p: np.save(open(p, "wb"), pred.astype(np.float16)))
    _atomic_write(out / f"{name}.json", lambda p: p.write_text(json.dumps(info)))
    print(f"  {model} {name}: trained and imputed in {info['cpu_s']:.0f} CPU-s", flush=True)
    return True


def score_all(tracks, work: Path) -> tuple[pd.DataFrame, float]:
    """Every finished (model, track) scored with the full metric set; also bins/s per core."""
    cells, assays = _axes(tracks)
    weights = {a: assay_variance(np.stack([tracks[c, a] for c in cells])) for a in assays}
    rows, cpu, n_bins = [], 0.0, 0
    for model in MODELS:
        for cell in cells:
            for assay in assays:
                name = f"{cell}.{assay}"
                if not (work / model / f"{name}.json").is_file():
                    continue
                pred = np.load(work / model / f"{name}.npy")
                info = json.loads((work / model / f"{name}.json").read_text())
                c0 = time.process_time()
                s = score_track(tracks[cell, assay], pred, var_weights=weights[assay])
                cpu += time.process_time() - c0
                n_bins += pred.size
                rows.append(
                    {
                        "model": model,
                        "experiment": name,
                        "biosample": cell,
                        "assay": assay,
                        "category": "histone_modification",
                        "fold": "loo",
                        "chrom": "pilot",
                        **s,
                        "train_cpu_s": info.get("cpu_s"),
                        "best_epoch": info.get("best_epoch"),
                    }
                )
    return pd.DataFrame(rows), (n_bins / cpu if cpu else float("nan"))


def summarise(scores: pd.DataFrame) -> dict[str, pd.DataFrame]:
    metrics = [m for m in METRIC_NAMES if scores[m].notna().any()]
    models = [m for m in MODELS if (scores.model == m).any()]
    # only tracks every model has: the columns compare like with like
    done = scores.groupby("experiment").model.nunique()
    paired = scores[scores.experiment.isin(done[done == len(models)].index)]
    overall = paired.groupby("model", sort=False)[metrics].mean().reindex(models)
    overall.insert(0, "tracks", paired.groupby("model").size().reindex(models))
    per_assay = (
        paired.pivot_table(index="assay", columns="model", values="mse", aggfunc="mean")
        .reindex(index=ASSAYS, columns=models)
        .dropna(how="all")
    )
    out = {"overall": overall, "per_assay_mse": per_assay}
    if "average_activity" in models:
        aa = paired[paired.model == "average_activity"].set_index("experiment")
        wins = {}
        for m in models:
            if m == "average_activity":
                continue
            x = paired[paired.model == m].set_index("experiment")
            wins[m] = {
                "tracks": len(x),
                "lower_mse": int((x.mse < aa.mse.reindex(x.index)).sum()),
                "higher_pearson": int((x.pearson > aa.pearson.reindex(x.index)).sum()),
                "higher_auprc": int((x.auprc > aa.auprc.reindex(x.index)).sum()),
                "mse_change_pct": round(
                    100 * (x.mse.mean() / aa.mse.reindex(x.index).mean() - 1), 2
                ),
            }
        out["vs_average_activity"] = pd.DataFrame(wins).T
    per_track = paired.pivot_table(
        index="experiment", columns="model", values=["mse", "pearson"]
    ).round(4)
    out["per_track"] = per_track
    return out


def _blend_weight(blend: str, own: Path) -> float | None:
    """The weight ``blend`` names for the run whose info is ``own``: its ``aa_weight``
    (``own``), the same track's in another work folder, or a number; None when not recorded
    or when the saved imputation is blended already."""
    if own.is_file() and json.loads(own.read_text()).get("blended"):
        return None  # already blended by its calibration (validation.calibrate)
    if blend == "own" or Path(blend).is_dir():
        src = own if blend == "own" else Path(blend) / own.parent.name / own.name
        return json.loads(src.read_text()).get("aa_weight") if src.is_file() else None
    return float(blend)


def blend_table(
    tracks, work: Path, blends: list[str], cells: list[str], assays: list[str]
) -> pd.DataFrame:
    """MSE of ``w · model + (1 − w) · AA`` for every finished ``avocado_shipped_*`` track of
    ``cells`` × ``assays``, AA being the other cell types' mean of the assay (information for
    dev choices; nothing is saved). Each blend: ``own`` (the run's ``aa_weight``, fitted on its
    whole validation tracks), a fixed weight (``0.5``), or a work folder whose runs'
    ``aa_weight`` is used."""
    every = _axes(tracks)[0]
    rows = []
    for model in [m for m in MODELS if m.startswith("avocado_shipped_")]:
        for cell in cells:
            for assay in assays:
                name = f"{cell}.{assay}"
                if not (work / model / f"{name}.json").is_file():
                    continue
                y = tracks[cell, assay]
                pred = np.load(work / model / f"{name}.npy").astype(np.float32)
                aa = np.mean([tracks[c, assay] for c in every if c != cell], 0)
                row = {"model": model, "track": name, "model_mse": float(np.mean((pred - y) ** 2))}
                row["aa_mse"] = float(np.mean((aa - y) ** 2))
                for blend in blends:
                    w = _blend_weight(blend, work / model / f"{name}.json")
                    row[f"blend {blend}"] = (
                        np.nan if w is None else float(np.mean((w * pred + (1 - w) * aa - y) ** 2))
                    )
                rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    cols = [c for c in df.columns if c not in ("model", "track")]
    out = df.groupby("model")[cols].mean()
    out.insert(0, "tracks", df.groupby("model").size())
    for c in cols:
        if c != "aa_mse":
            wins = (df[c] < df["aa_mse"]).groupby(df["model"]).sum()
            out[f"{c} wins"] = wins.astype(int)
    return out


def log_mlflow(
    scores: pd.DataFrame, tables: dict, speed: float, uri: str | None, work: Path, data: str
):
    from epiray.tracking import TrackingConfig, start_run

    cfg = TrackingConfig(experiment="pilot-loo", tracking_uri=uri or f"sqlite:///{work}/mlflow.db")
    with start_run(cfg, name="pilot_loo", base_dir=work, resume=True) as run:
        run.log_params(
            {
                "data": data,
                "avocado.model": json.dumps(ba.PILOT_MODEL),
                "avocado.loop": json.dumps(ba.PILOT_LOOP),
                "edice": "dim 32, mlp 2x128, n_targets 0.2, 1000 steps x 256 bins",
            }
        )
        run.log_scores(scores)
        for model, row in tables["overall"].iterrows():
            run.log_metrics({k: v for k, v in row.items() if pd.notna(v)}, prefix=f"{model}/")
        run.log_metrics({"scoring_bins_per_s_per_core": speed})
        for name, df in tables.items():
            flat = df.copy()
            if isinstance(flat.columns, pd.MultiIndex):
                flat.columns = [".".join(map(str, c)) for c in flat.columns]
            run.log_table(flat.reset_index(), f"tables/{name}")
        return run.tracking_uri, run.run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--assays", nargs="+", default=ASSAYS, choices=ASSAYS)
    ap.add_argument("--cells", nargs="+", default=None, help="default: every cell type")
    ap.add_argument(
        "--data",
        default="pilot",
        help="pilot (the Roadmap pilot, test data), or synth:SEED / synth-noisy:SEED (its "
        "generated dev stand-ins, DEV_DATA)",
    )
    ap.add_argument(
        "--blend",
        nargs="+",
        default=None,
        help="also report blends of the avocado_shipped models with average activity: own "
        "(the run's aa_weight), a fixed weight, or a work folder whose aa_weight to use",
    )
    ap.add_argument(
        "--config", type=Path, default=SHIPPED, help="config of the avocado_shipped_* models"
    )
    ap.add_argument(
        "--final-from",
        type=Path,
        default=None,
        help="with a config that calibrates beside validation cells: read the final model's "
        "imputations from this work folder of the uncalibrated config (the same model, seed "
        "for seed) instead of training it again",
    )
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only score and report")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-mlflow", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.data == "pilot":
        tracks = {k: v.astype(np.float32) for k, v in ba._load().items()}
    elif args.data.split(":", 1)[0] in DEV_DATA and ":" in args.data:
        if not args.report and ("edice" in args.models or "avocado" in args.models):
            sys.exit("bench_pilot_loo: on synth data, only average_activity and avocado_shipped_*")
        args.work.mkdir(parents=True, exist_ok=True)
        kind, seed = args.data.split(":", 1)
        tracks = load_synth(int(seed), args.work.parent, kind)
    else:
        sys.exit(
            f"bench_pilot_loo: --data {args.data!r}; expected pilot, synth:SEED or "
            "synth-noisy:SEED"
        )
    cells = args.cells or _axes(tracks)[0]
    if unknown := set(cells) - set(_axes(tracks)[0]):
        sys.exit(f"bench_pilot_loo: unknown cell types {sorted(unknown)}; have {_axes(tracks)[0]}")
    if not args.report:
        for assay in args.assays:  # assay-major: the H3K4me3 cases (issue 4) come first
            for cell in cells:
                for model in args.models:
                    run_one(
                        model,
                        tracks,
                        (cell, assay),
                        args.work,
                        args.seed,
                        args.config,
                        args.final_from,
                    )
    scores, speed = score_all(tracks, args.work)
    if scores.empty:
        sys.exit("bench_pilot_loo: nothing finished yet")
    tables = summarise(scores)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    for name, df in tables.items():
        print(f"\n## {name}")
        print(df.round(4).to_string())
    print(f"\nscoring, every metric: {speed / 1e6:.2f} M bins/s per core")
    if args.blend:
        print("\n## blend with average activity (w · model + (1 − w) · AA; information)")
        table = blend_table(tracks, args.work, args.blend, cells, args.assays)
        print(table.round(4).to_string())
    if not args.no_mlflow:
        data = (
            "roadmap-pilot (25 tracks, 1,126,469 bins)"
            if args.data == "pilot"
            else f"{args.data} ({len(tracks)} generated tracks, DEV_DATA)"
        )
        uri, run_id = log_mlflow(scores, tables, speed, args.tracking_uri, args.work, data)
        print(f"MLflow: run {run_id} in {uri} (experiment pilot-loo)")


if __name__ == "__main__":
    main()
