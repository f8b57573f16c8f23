"""Transfer against training from scratch: a biosample, then an assay, added to a trained
Avocado by ``epiray extend``, beside the same one included in training from the start.

On a generated compendium (``epiray synth``'s ``default`` preset, mouse tracks of one
chromosome), at ``configs/train_avocado.yaml``'s settings (``--epochs`` caps its 300 epochs;
early stopping usually ends runs sooner):

- **biosample**: the parent is trained without one mouse biosample (the best-assayed, so it has
  tracks to be fitted from); ``epiray extend`` fits its factors on its observed tracks, the
  rest frozen. The reference is one model trained on every track from scratch. Scored: the
  pairs of that biosample no store observes (its unobserved mouse assays), against the
  synthetic truth, which neither model saw.
- **assay**: the same with one mouse assay (one of those run in the most biosamples), scored on
  the biosamples it was not run in.

The parents' stores are copies of the full store without the held-out experiments (what a
store holds before ``epiray ingest --resume`` adds them); the extensions read the full store.
Every model is trained and extended through Ray Train (``epiray.train`` / ``epiray.extend``),
as the commands would; wall times are of those calls (Ray already started). Prints one table;
``--out``/``results.json`` holds it with the held-out pairs.

    .venv/bin/python benchmarks/bench_transfer.py
    .venv/bin/python benchmarks/bench_transfer.py --epochs 300 --preset large
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def score(pattern: str, chrom: str, pairs, data: Path, n_bins: int) -> dict[str, float]:
    """Mean over ``pairs`` of the MSE against the truth (arcsinh), and of the noise floor."""
    from epiray import synthetic
    from epiray.train import load_predictor

    index = synthetic.read_truth_index(data)
    predictor = load_predictor(pattern, chrom)
    pred = predictor.predict_chrom(chrom, pairs, 0, n_bins)
    mse, floor = [], []
    for (b, a), p in zip(pairs, pred):
        y = np.asarray(synthetic.read_truth(data, "mouse", chrom, b, a, truth_index=index))
        mse.append(float(np.mean((p.astype(np.float64) - y) ** 2)))
        floor.append(synthetic.noise_floor(data, "mouse", chrom, b, a, truth_index=index))
    return {"mse": float(np.mean(mse)), "floor": float(np.mean(floor))}


def average_activity(store, chrom: str, pairs, data: Path) -> float:
    """MSE of the mean observed track of each pair's assay (the store's reference)."""
    from epiray import synthetic

    index = synthetic.read_truth_index(data)
    exps = store.experiments("mmSyn1")
    out = []
    for b, a in pairs:
        mine = exps.loc[exps["assay"] == a, "experiment"].tolist()
        mean = store.read("mmSyn1", chrom, mine).astype(np.float64).mean(0)
        y = np.asarray(synthetic.read_truth(data, "mouse", chrom, b, a, truth_index=index))
        out.append(float(np.mean((mean - y) ** 2)))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/_work/transfer")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--chrom", default="chr1")
    ap.add_argument("--epochs", type=int, default=60, help="cap on epochs (the config: 300)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from epiray import synthetic
    from epiray.config import load_config
    from epiray.extend import ExtendConfig, extend, plan_extension
    from epiray.ingest import IngestConfig, ingest
    from epiray.manifest import read_manifest, write_manifest
    from epiray.runtime import ensure_ray
    from epiray.tracking import TrackingConfig
    from epiray.train import TrainConfig, train

    out = args.out.resolve()
    data = out / "data"
    ensure_ray(None)
    if not (data / "manifest.tsv").is_file():
        params = synthetic.SynthParams.preset(args.preset)
        synthetic.generate(data, seed=args.seed, params=params)
    manifest = read_manifest(data / "manifest.tsv")
    mouse = manifest[manifest["species"] == "mouse"]
    write_manifest(mouse, data / "manifest.mouse.tsv")
    full = ingest(
        IngestConfig(
            manifest=str(data / "manifest.mouse.tsv"),
            store=str(out / "store"),
            chroms=[args.chrom],
        ),
        resume=True,
    )
    exps = full.experiments("mmSyn1")
    observed = set(zip(exps["biosample"], exps["assay"]))
    assays, biosamples = sorted(set(exps["assay"])), sorted(set(exps["biosample"]))
    per_b = exps.groupby("biosample").size()
    new_b = sorted(per_b[per_b == per_b.max()].index)[0]
    per_a = exps.groupby("assay").size()
    new_a = sorted(per_a[per_a == per_a.max()].index)[0]
    n_bins = full.n_bins("mmSyn1", args.chrom)

    runs = out / "runs"
    if runs.exists():
        shutil.rmtree(runs)
    shipped = load_config(TrainConfig, ROOT / "configs/train_avocado.yaml")
    loop = shipped.train.model_copy(update={"epochs": min(args.epochs, shipped.train.epochs)})
    tracking = TrackingConfig(tracking_uri="sqlite:///mlflow.db", experiment="bench-transfer")

    def train_cfg(store, name: str) -> TrainConfig:
        return shipped.model_copy(
            update={
                "store": str(store.root),
                "out": str(runs / name),
                "chroms": [args.chrom],
                "train": loop,
                "tracking": tracking,
            }
        )

    rows, timings = [], {}

    def timed(key: str, fn, *fn_args):
        t0 = time.perf_counter()
        res = fn(*fn_args)
        timings[key] = time.perf_counter() - t0
        epochs = int(res[0].history["epoch"].max()) if len(res[0].history) else 0
        print(f"{key}: {timings[key]:.0f} s, {epochs} epochs", flush=True)
        return res, epochs

    _, ep_full = timed("scratch (every track)", train, train_cfg(full, "full"))
    scratch = str(runs / "full" / "avocado_mouse_only.{chrom}.all")
    scenarios = {
        "biosample": (
            new_b,
            set(exps.loc[exps["biosample"] == new_b, "experiment"]),
            [(new_b, a) for a in assays if (new_b, a) not in observed],
            {"biosamples": [new_b]},
        ),
        "assay": (
            new_a,
            set(exps.loc[exps["assay"] == new_a, "experiment"]),
            [(b, new_a) for b in biosamples if (b, new_a) not in observed],
            {"assays": [new_a]},
        ),
    }
    for scenario, (name, drop, pairs, add) in scenarios.items():
        dest = out / f"store_without_{scenario}"
        if dest.exists():
            shutil.rmtree(dest)
        pstore = full.copy(dest, without=sorted(drop))
        key = f"parent without {scenario} {name}"
        _, ep_parent = timed(key, train, train_cfg(pstore, scenario))
        parent = str(runs / scenario / "avocado_mouse_only.{chrom}.all")
        ecfg = ExtendConfig.model_validate(
            {"from": parent, "store": str(full.root), "train": loop.model_dump(), **add}
        )
        plan = plan_extension(ecfg)
        _, ep_ext = timed(f"extend with {scenario} {name}", extend, ecfg, plan)
        ext = str(runs / scenario / "avocado_mouse_only+ext.{chrom}.all")
        aa = average_activity(full, args.chrom, pairs, data)
        for model, pattern, key, epochs in (
            ("transfer (epiray extend)", ext, f"extend with {scenario} {name}", ep_ext),
            ("from scratch, included", scratch, "scratch (every track)", ep_full),
        ):
            s = score(pattern, args.chrom, pairs, data, n_bins)
            rows.append(
                {
                    "new": f"{scenario} {name}",
                    "model": model,
                    "pairs": len(pairs),
                    "mse": s["mse"],
                    "noise_floor": s["floor"],
                    "wall_s": timings[key],
                    "epochs": epochs,
                }
            )
        rows.append(
            {
                "new": f"{scenario} {name}",
                "model": "average activity (reference)",
                "pairs": len(pairs),
                "mse": aa,
                "noise_floor": rows[-1]["noise_floor"],
                "wall_s": float("nan"),
                "epochs": 0,
            }
        )
        rows[-3]["parent_wall_s"] = timings[f"parent without {scenario} {name}"]
        rows[-3]["parent_epochs"] = ep_parent
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    (out / "results.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "chrom": args.chrom,
                "bins": n_bins,
                "mouse_experiments": len(exps),
                "epochs_cap": loop.epochs,
                "rows": rows,
                "pairs": {k: v[2] for k, v in scenarios.items()},
            },
            indent=1,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
