"""Imputation throughput (issue: imputed tracks for people).

Generates and ingests the default synthetic compendium (``SynthParams()``: mouse 1.5 Mb in 3
chromosomes, 12 biosamples per species, 144 experiments), then imputes every unobserved
(biosample, assay) pair of the mouse assembly, zero-shot assays included, and prints:

1. the pipeline alone, with a predictor that costs next to nothing: spill and bigWig
   write throughput in bins/s of one process (= per CPU core), arcsinh and signal scale, and
   the bytes per bin of the bigWigs;
2. the same through Ray tasks (a local runtime), bins/s per physical core;
3. the time to impute every unobserved pair with a real-sized small predictor: an Avocado per
   chromosome with the paper's factor sizes (32 biosample, 256 assay, 25/40/45 genome factors)
   and a narrower network (``--nodes``, 2 layers; 2,048 in the paper), untrained (random
   weights cost the same as trained ones), through Ray tasks;
4. the paper's network (2 × 2,048) on one pair of one chromosome in one process with one torch
   thread, extrapolated to every unobserved pair on this machine's cores.

Usage: .venv/bin/python benchmarks/bench_impute.py [--work DIR] [--nodes 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np

from epiray import synthetic
from epiray.impute import ImputeConfig, ModelPredictor, impute, unobserved_pairs
from epiray.ingest import IngestConfig, ingest
from epiray.store import Store

ASSEMBLY = "mmSyn1"


_POOL = np.arcsinh(np.random.default_rng(0).gamma(0.6, 2.0, 1 << 20)).astype(np.float32)


def pooled(chrom, pairs, lo, hi):
    """A predictor that costs next to nothing but gives signal-like values (so the bigWigs
    compress like real ones): slices of a fixed pool of arcsinh(gamma) draws."""
    out = np.empty((len(pairs), hi - lo), dtype=np.float32)
    for i in range(len(pairs)):
        start = (lo * 7919 + i * 104729) % (len(_POOL) - (hi - lo))
        out[i] = _POOL[start : start + hi - lo]
    return out


def pooled_for(chrom):
    return pooled


class AvocadoFor:
    """``predictor_for``: an untrained paper-sized Avocado (narrower network) per chromosome,
    built inside the task as a loaded checkpoint would be."""

    def __init__(self, store: str, nodes: int, seed: int = 0) -> None:
        self.store, self.nodes, self.seed = store, nodes, seed

    def __call__(self, chrom: str) -> ModelPredictor:
        import torch

        from epiray.models import Vocabulary, chrom_data_from_numpy
        from epiray.models.avocado import Avocado, AvocadoParams

        torch.manual_seed(self.seed)
        store = Store.open(self.store)
        n = store.n_bins(ASSEMBLY, chrom)
        vocab = Vocabulary.from_records(
            store.experiments(), chrom=chrom, n_bins=n, assembly=ASSEMBLY
        )
        params = AvocadoParams(n_nodes=self.nodes, predict_batch_size=8192)
        model = Avocado(params, vocab, 0, n).eval()
        data = chrom_data_from_numpy(np.zeros((0, n), np.float32), [], [], chrom=chrom)
        return ModelPredictor([(model, data)])


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def prepare(work: Path, seed: int) -> Store:
    data, store = work / "data", work / "store"
    if (store / "store.json").is_file():
        return Store.open(store)
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    synthetic.generate(data, seed=seed, params=synthetic.SynthParams())
    cfg = IngestConfig(
        manifest=str(data / "manifest.tsv"),
        store=str(store),
        chroms="all",
        assemblies={
            a: {"chrom_sizes": str(data / "genomes" / f"{a}.chrom.sizes")}
            for a in ("hsSyn1", "mmSyn1")
        },
    )
    s = ingest(cfg)
    print(f"compendium generated and ingested in {time.perf_counter() - t:.1f} s")
    return s


def run(store: Store, out: Path, predictor_for, **kw):
    shutil.rmtree(out, ignore_errors=True)
    cfg = ImputeConfig(
        store=str(store.root),
        output_dir=str(out),
        model=kw.pop("model", "bench"),
        assembly=ASSEMBLY,
        zero_shot_assays=True,
        **kw,
    )
    res = impute(cfg, predictor_for)
    size = sum(p.stat().st_size for p in res.written)
    return res, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("benchmarks/_work/impute"))
    ap.add_argument("--nodes", type=int, default=256, help="Avocado hidden width")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    cores = physical_cores()
    ray.init(
        num_cpus=max(4, 2 * cores),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    store = prepare(args.work, args.seed)
    pairs = unobserved_pairs(store, ASSEMBLY, zero_shot_assays=True)
    chroms = store.chrom_sizes(ASSEMBLY)
    bins = sum(store.n_bins(ASSEMBLY, c) for c in chroms)
    n_zs = sum(p.zero_shot for p in pairs)
    print(
        f"{ASSEMBLY}: {len(chroms)} chroms, {bins:,} bins; {len(pairs)} unobserved pairs "
        f"({n_zs} zero-shot); {len(pairs) * bins:,} bins to write; {cores} physical cores, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    print("\n1. pipeline alone (pooled-values predictor), one process")
    for scale in ("arcsinh", "signal"):
        res, size = run(
            store, args.work / f"out_{scale}", pooled_for, executor="local", scale=scale
        )
        print(
            f"  {scale:8s} spills {res.bins_written / res.predict_s / 1e6:6.2f} M bins/s, "
            f"bigWig write {res.bins_written / res.write_s / 1e6:6.2f} M bins/s per core, "
            f"end to end {res.bins_written / res.total_s / 1e6:6.2f} M bins/s "
            f"({res.total_s:.1f} s); {size / 1e6:.1f} MB, {size / res.bins_written:.2f} B/bin"
        )

    print("\n2. pipeline alone (pooled-values predictor), Ray tasks")
    res, size = run(store, args.work / "out_ray", pooled_for, executor="ray")
    print(
        f"  {res.total_s:.1f} s wall ({res.predict_s:.1f} predict, {res.write_s:.1f} write): "
        f"{res.bins_written / res.total_s / 1e6:.2f} M bins/s, "
        f"{res.bins_written / res.total_s / cores / 1e6:.2f} M bins/s per core"
    )

    print(f"\n3. every unobserved pair with Avocado (factors 32/256/25+40+45, 2 x {args.nodes})")
    res, size = run(
        store,
        args.work / "out_avocado",
        AvocadoFor(str(store.root), args.nodes, args.seed),
        executor="ray",
        model=f"avocado-{args.nodes}-untrained",
    )
    print(
        f"  {len(res.written)} bigWigs in {res.total_s:.1f} s wall ({res.predict_s:.1f} s "
        f"predict, {res.write_s:.1f} s write); {res.bins_written / res.total_s / 1e3:.0f} k "
        f"bins/s, {res.bins_written / res.total_s / cores / 1e3:.0f} k bins/s per core; "
        f"{size / 1e6:.1f} MB"
    )

    import torch

    torch.set_num_threads(1)
    chrom = next(iter(chroms))
    pred = AvocadoFor(str(store.root), 2048, args.seed)(chrom)
    n = store.n_bins(ASSEMBLY, chrom)
    t = time.perf_counter()
    pred.predict_chrom(chrom, [(pairs[0].biosample, pairs[0].assay)], 0, n)
    dt = time.perf_counter() - t
    rate = n / dt
    print(
        f"\n4. paper network (2 x 2048), one thread: {rate / 1e3:.1f} k bins/s per core; every "
        f"unobserved pair would take {len(pairs) * bins / rate / cores / 60:.1f} min on "
        f"{cores} cores"
    )


if __name__ == "__main__":
    main()
