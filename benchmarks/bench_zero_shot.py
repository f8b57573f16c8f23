"""Zero-shot assays on the synthetic compendium: eDICE and Avocado, mouse-only and cross-species.

Issue 6's comparison (cross-species eDICE against mouse-only eDICE and cross-species Avocado),
with mouse-only Avocado and the average-activity reference beside them. The quickstart's
world (``epiray synth``'s default preset) and its training settings (``epiray.quickstart``:
the CPU-sized models, early stopping on one validation experiment per assay) on mouse
``chr1``, over the three zero-shot folds of the protein-binding assays: in fold ``k`` every
mouse experiment of one third of those assays is removed from training (their human
experiments stay) and exactly those are scored. Every model runs through ``epiray.train``
(Ray Train), as ``epiray train`` would.

Prints the Table-1-style comparison over all held-out experiments, the paired t-tests and the
per-fold means; the scores land in ``--out``/``scores.csv``. Runs that finished are reused.

    .venv/bin/python benchmarks/bench_zero_shot.py
    .venv/bin/python benchmarks/bench_zero_shot.py --folds 0 --models edice edice_cross_species
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from epiray.quickstart import MODELS, QuickstartConfig, _train_config

DEFAULT_MODELS = ["avocado_mouse_only", "avocado_cross_species", "edice", "edice_cross_species"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/_work/zero_shot"))
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from epiray import synthetic
    from epiray.evaluate import comparison_table, format_table, paired_tests
    from epiray.ingest import IngestConfig, ingest
    from epiray.runtime import ensure_ray
    from epiray.train import train

    out = args.out.resolve()
    data = out / "data"
    ensure_ray(None)
    if not (data / "manifest.tsv").is_file():
        synthetic.generate(data, seed=args.seed, params=synthetic.SynthParams.preset("default"))
    store_dir = out / "store"
    store = ingest(
        IngestConfig(manifest=str(data / "manifest.tsv"), store=str(store_dir), chroms="all"),
        resume=True,
    )
    synthetic.build_synteny(data, store.root, "hs2mm")
    scores, seconds = [], {}
    for fold in args.folds:
        cfg = QuickstartConfig(out=str(out), seed=args.seed, fold=fold, models=args.models)
        for label in args.models:
            t0 = time.perf_counter()
            for r in train(_train_config(cfg, out, label)):
                scores.append(r.scores)
            seconds[label, fold] = time.perf_counter() - t0
            print(f"fold {fold} {label}: {seconds[label, fold]:.0f} s", flush=True)
    all_scores = pd.concat(scores, ignore_index=True)
    all_scores = all_scores.drop_duplicates(["model", "experiment", "chrom", "fold"])
    all_scores.to_csv(out / "scores.csv", index=False)
    order = ["average_activity", *args.models]
    print("\nHeld-out MSE (arcsinh scale), zero-shot protein-binding assays, mouse chr1:")
    print(format_table(comparison_table(all_scores, models=order), "markdown"))
    print("\nPearson:")
    print(format_table(comparison_table(all_scores, metric="pearson", models=order), "markdown"))
    print("\nPaired t-tests (MSE):")
    tests = paired_tests(
        all_scores, models=order, reference="edice_cross_species", by_category=False
    )
    print(format_table(tests, "markdown"))
    per_fold = all_scores.pivot_table(index="fold", columns="model", values="mse", aggfunc="mean")
    print("\nMean MSE per fold:")
    print(format_table(per_fold.reindex(columns=order), "markdown", float_format=".4f"))


if __name__ == "__main__":
    main()
