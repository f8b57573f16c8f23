"""The eDICE personalised ("individuals") protocol on a synthetic compendium: per-strategy table.

Run from the repository root::

    .venv/bin/python benchmarks/bench_individuals.py              # 4 donors x 8 tissues x 4 assays
    .venv/bin/python benchmarks/bench_individuals.py --tracks 32  # every track of every donor

Writes the compendium (:func:`epiray.individuals.write_individuals_compendium`, default
design: tissue identity the larger effect, personal signal shared across a donor's tissues, a
weaker donor × tissue signal, a donor batch gain, log-normal noise) into
``benchmarks/_work/individuals``, ingests it with ``epiray.ingest`` (Ray Data), and runs
:func:`epiray.individuals.run_individuals` with every strategy: leave one track of a donor
out; AVG (same donor, other tissues), TrackAVG (same tissue-assay, other donors), eDICE trained
on the other donors without / with fine-tuning on the target donor's remaining tracks, and
eDICE trained on the target donor only. ``--tracks`` held-out tracks per donor are drawn with
the seed (the from-scratch ``edice_target`` model is trained once per held-out track, which
dominates the cost). The eDICE model is CPU-sized (``--dim``; the paper: 256 / 2,048) and
trained for fixed epochs; the printed header states every setting.

One Ray task per target donor (``--executor ray``), each with one torch thread: the machine's
two cores are shared, and two threads per process spin against each other.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from epiray.evaluate import format_table  # noqa: E402
from epiray.individuals import (  # noqa: E402
    IndividualsConfig,
    run_individuals,
    write_individuals_compendium,
)
from epiray.ingest import IngestConfig, ingest  # noqa: E402
from epiray.loop import LoopParams  # noqa: E402
from epiray.models.edice import EDiceParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--donors", type=int, default=4)
    ap.add_argument("--tissues", type=int, default=8)
    ap.add_argument("--assays", type=int, default=4)
    ap.add_argument("--bins", type=int, default=5000)
    ap.add_argument("--tracks", type=int, default=8, help="held-out tracks per donor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--mlp-hidden", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20, help="epochs of the from-scratch models")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4096, help="target cells per step")
    ap.add_argument("--executor", choices=["ray", "local"], default="ray")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "individuals")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    t0 = time.perf_counter()
    manifest = write_individuals_compendium(
        args.work / "data",
        args.donors,
        args.tissues,
        args.assays,
        args.bins,
        seed=args.seed,
        overwrite=True,
    )
    store = ingest(
        IngestConfig(manifest=str(manifest), store=str(args.work / "store"), chroms="all"),
        overwrite=True,
    )
    t_data = time.perf_counter() - t0

    def loop(epochs: int, lr: float) -> LoopParams:
        return LoopParams(epochs=epochs, lr=lr, batch_size=args.batch_size, patience=None)

    cfg = IndividualsConfig(
        store=str(store.root),
        out=str(args.work / "runs"),
        assembly="idSyn1",
        chrom="chr1",
        max_tracks_per_donor=args.tracks,
        model=EDiceParams(
            dim=args.dim,
            heads=4,
            ffn_hidden=args.dim,
            mlp_hidden=args.mlp_hidden,
            attention_dropout=0.0,
            mlp_dropout=0.0,
            n_targets=0.25,
        ),
        train_other=loop(args.epochs, args.lr),
        train_target=loop(args.epochs, args.lr),
        finetune=loop(args.finetune_epochs, args.finetune_lr),
        seed=args.seed,
        executor=args.executor,
        tracking={"enabled": False},
    )
    t1 = time.perf_counter()
    res = run_individuals(cfg, overwrite=True)
    t_run = time.perf_counter() - t1

    c = args.tissues * args.assays
    print(
        f"bench_individuals: {args.donors} donors x {args.tissues} tissues x {args.assays} "
        f"assays ({c} tracks per donor), {args.bins:,} bins of 25 bp, seed {args.seed}; "
        f"{min(args.tracks, c)} held-out tracks per donor, {res.table['experiment'].nunique()} "
        "in all"
    )
    print(
        f"eDICE dim {args.dim}, attention FFN {args.dim}, MLP 2 x {args.mlp_hidden}, 25% of "
        f"tracks masked per bin; other donors and target-only: {args.epochs} epochs at "
        f"{args.lr:g}; fine-tune: {args.finetune_epochs} epochs at {args.finetune_lr:g} "
        f"(signal embedders + MLP; global embeddings and attention frozen); batch "
        f"{args.batch_size} target cells; 1 torch thread; executor {args.executor}"
    )
    print(
        f"compendium + ingest {t_data:.0f} s; protocol {t_run:.0f} s "
        f"(torch {torch.__version__}, {os.cpu_count()} cores, shared machine)\n"
    )
    summary = res.summary.copy()
    seconds = res.table.groupby("model")["seconds"].sum()
    summary["seconds"] = seconds.reindex(summary.index)
    cols = ["n_tracks", "mse", "pearson", "spearman", "auprc", "auprc_individual", "seconds"]
    train_other = sum(h["seconds"] for hs in res.other_history.values() for h in hs)
    print(
        "mean over held-out tracks (seconds: compute per strategy summed over tracks; the "
        f"once-per-donor training on the other donors took {train_other:.0f} s in all):"
    )
    print(format_table(summary[cols], "text"))
    ref = "edice_other_tl"
    wins = summary.drop(index=ref)[
        ["n_paired", f"{ref}_better_mse", f"{ref}_better_pearson", f"{ref}_better_auprc"]
    ]
    print(f"tracks where {ref} beats each strategy (of n_paired):")
    print(format_table(wins.astype(int), "text"))
    per_assay = res.table.pivot_table(index="assay", columns="model", values="mse")
    print("mean MSE per assay:")
    print(format_table(per_assay[[s for s in summary.index if s in per_assay]], "text"))


if __name__ == "__main__":
    main()
