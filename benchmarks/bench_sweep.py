"""Scheduling overhead of a sweep: N short trials in one Tune sweep versus N × one trial alone.

All in one process on one local Ray runtime:

1. ``run_one`` — one (chromosome, fold) training run through :func:`epiray.train.run_one`
   directly (no Tune): the floor.
2. ``sweep of 1`` — the same run as a one-trial sweep (:func:`epiray.sweep.run_sweep`): Tune's
   per-trial cost (trial actor, Tune bookkeeping, MLflow parent run, summary).
3. ``sweep of N`` — N trials of the same size (a grid over the learning rate, FIFO: every
   trial runs every epoch), as many at once as the cluster's CPUs hold.

Printed: the wall times and ``ratio = sweep of N / (N × sweep of 1)`` (< 1: running trials
concurrently pays; 1: no gain; > 1: overhead), and the same against ``N × run_one``.

On a 2-core machine the Ray runtime advertises more logical CPUs than cores, so concurrent
trials share cores; the figure is then mostly scheduling and start-up overhead. GPU
utilisation across concurrent trials is not measured (no GPU here).

    .venv/bin/python benchmarks/bench_sweep.py [--n 4] [--epochs 3] [--store PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="trials in the sweep (default 4)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=1, help="Train workers per trial")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    ap.add_argument("--store", type=Path, help="an existing store (default: a tiny one)")
    ap.add_argument("--assembly", default="mmSyn1")
    ap.add_argument("--chrom", default="chr1")
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    from epiray.runtime import ensure_ray

    ensure_ray(args.num_cpus)
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    store = args.store
    if store is None:
        from epiray import synthetic
        from epiray.ingest import IngestConfig, ingest

        res = synthetic.generate(work / "data", seed=3, params=synthetic.SynthParams.tiny())
        store = ingest(
            IngestConfig(manifest=str(res.manifest), store=str(work / "store"), chroms="all")
        ).root
        print(f"tiny store: {store}")

    from epiray.sweep import SweepConfig, run_sweep
    from epiray.train import TrainConfig, plan_runs, run_one

    train = {
        "store": str(store),
        "out": str(work / "plain"),
        "assembly": args.assembly,
        "chroms": [args.chrom],
        "model": {
            "name": "avocado",
            "params": {"n_nodes": 64, "n_layers": 1, "n_assay_factors": 16},
        },
        "folds": {"scheme": "experiment", "k": 3, "fold": 0},
        "validation": {"per_assay": 1, "min_train": 1},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "patience": None},
        "scaling": {
            "num_workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker,
            "use_gpu": False,
        },
        "tracking": {"experiment": "bench-sweep"},
    }

    # 1. run_one alone
    cfg = TrainConfig.model_validate(train)
    _, specs = plan_runs(cfg)
    t0 = time.perf_counter()
    run_one(specs[0], cfg)
    t_plain = time.perf_counter() - t0

    def sweep(name: str, lrs: list[float]) -> tuple[float, object]:
        scfg = SweepConfig(
            name=name,
            out=str(work / "sweeps"),
            train=train,
            grid={"train.lr": lrs},
            scheduler={"kind": "fifo"},
            verbose=0,
        )
        t = time.perf_counter()
        res = run_sweep(scfg)
        return time.perf_counter() - t, res

    # 2. a sweep of one trial, 3. a sweep of N
    t_one, _ = sweep("one", [1e-3])
    lrs = [1e-3 * (i + 1) for i in range(args.n)]
    t_n, res = sweep(f"n{args.n}", lrs)
    finished = int((res.trials["status"] == "finished").sum())

    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    per_trial = args.workers * args.cpus_per_worker
    conc = max(1, int(cpus // per_trial))
    print()
    print(f"machine: {os.cpu_count()} cores; Ray: {cpus:g} logical CPUs")
    print(
        f"trial: {args.workers} worker(s) x {args.cpus_per_worker:g} CPU, {args.epochs} epochs, "
        f"batch {args.batch_size}; up to {min(conc, args.n)} trials at once"
    )
    print(f"run_one alone (no Tune)       {t_plain:8.1f} s")
    print(f"sweep of 1 trial              {t_one:8.1f} s")
    print(f"sweep of {args.n} trials ({finished} finished) {t_n:8.1f} s")
    print(f"ratio sweep of {args.n} / ({args.n} x sweep of 1)   {t_n / (args.n * t_one):.2f}")
    print(f"ratio sweep of {args.n} / ({args.n} x run_one)      {t_n / (args.n * t_plain):.2f}")
    print(f"Tune overhead of one trial     {t_one - t_plain:8.1f} s")
    print("GPU utilisation across concurrent trials: not measured (no GPU on this machine)")


if __name__ == "__main__":
    main()
