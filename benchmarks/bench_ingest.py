"""Ingest and read throughput of the store (issue: foundation).

Generates a 200-experiment synthetic compendium, then in one process:
1. the baseline: a plain single-process loop (pyBigWig ``values()`` + numpy binning + arcsinh +
   ``np.save`` per experiment and chromosome);
2. ``epiray ingest`` (Ray Data, local runtime) into float32 and float16 stores;
and prints bins/s, MB/s (bigWig bytes read) and the ratio to the baseline, with peak memory
(largest single process, sampled) for a 50- and a 200-experiment ingest. Then reads each
chromosome's dense [experiments x bins] array from the float32 store and compares with
``np.load`` of the same bytes written by the baseline.

Usage: .venv/bin/python benchmarks/bench_ingest.py [--work DIR] [--experiments 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyBigWig

from epiray import synthetic
from epiray.ingest import IngestConfig, ingest
from epiray.manifest import read_manifest
from epiray.store import Store


class PeakRSS:
    """Samples the RSS of this process and all its descendants (Ray workers included)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_one, self.peak_sum = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me, *me.children(recursive=True)]
            rss = []
            for p in procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            # workers only: the driver holds Ray's client state, not ingest data
            workers = rss[1:] or [0]
            self.peak_one = max(self.peak_one, max(workers))
            self.peak_sum = max(self.peak_sum, sum(rss))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def baseline(manifest, sizes_by_asm, out: Path, bin_size: int = 25) -> tuple[float, int]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n = 0
    for row in manifest.itertuples():
        bw = pyBigWig.open(row.path)
        for chrom, length in sizes_by_asm[row.assembly].items():
            v = bw.values(chrom, 0, length, numpy=True)
            np.nan_to_num(v, copy=False)
            nb = -(-length // bin_size)
            pad = np.zeros(nb * bin_size, dtype=np.float64)
            pad[:length] = v
            w = np.full(nb, float(bin_size))
            w[-1] = length - (nb - 1) * bin_size
            x = np.arcsinh(pad.reshape(nb, bin_size).sum(1) / w).astype(np.float32)
            np.save(out / f"{row.experiment}.{chrom}.npy", x)
            n += nb
        bw.close()
    return time.perf_counter() - t0, n


def run_ingest(manifest_path: Path, store: Path, dtype: str, num_cpus: int) -> float:
    cfg = IngestConfig(
        manifest=str(manifest_path), store=str(store), chroms="all", dtype=dtype, num_cpus=num_cpus
    )
    t0 = time.perf_counter()
    ingest(cfg, overwrite=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("benchmarks/_work/ingest"))
    ap.add_argument("--experiments", type=int, default=200)
    ap.add_argument("--num-cpus", type=int, default=4)
    args = ap.parse_args()
    work = args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    n_h = args.experiments * 3 // 5
    params = synthetic.SynthParams(
        human_genome_bp=24_000_000,
        mouse_genome_bp=20_000_000,
        human_chroms=4,
        mouse_chroms=4,
        human_experiments=n_h,
        mouse_experiments=args.experiments - n_h,
        human_biosamples=16,
        mouse_biosamples=16,
    )
    t0 = time.perf_counter()
    res = synthetic.generate(work / "data", seed=1, params=params)
    print(
        f"generated {sum(res.experiments.values())} experiments in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    manifest = read_manifest(res.manifest)
    mb = sum(Path(p).stat().st_size for p in manifest["path"]) / 1e6

    import ray

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    # warm the page cache and Ray's worker pool so neither side pays for it
    run_ingest(res.manifest, work / "warm", "float32", args.num_cpus)
    shutil.rmtree(work / "warm")

    tb, nbins = baseline(manifest, res.chrom_sizes, work / "npy")
    with PeakRSS() as mem200:
        t32 = run_ingest(res.manifest, work / "store32", "float32", args.num_cpus)
    t16 = run_ingest(res.manifest, work / "store16", "float16", args.num_cpus)

    # memory must not grow with the number of experiments: a quarter of them
    small = manifest.iloc[: len(manifest) // 4]
    m50 = work / "data" / "manifest50.tsv"
    small.drop(columns=["row"]).to_csv(m50, sep="\t", index=False)
    with PeakRSS() as mem50:
        run_ingest(m50, work / "store50", "float32", args.num_cpus)

    # reading: dense [experiments x bins] per chromosome vs np.load of the same bytes
    store = Store.open(work / "store32")
    tr = tn = 0.0
    nbytes = 0
    for asm, sizes in res.chrom_sizes.items():
        exps = list(store.experiments(assembly=asm)["experiment"])
        for chrom in sizes:
            nb = store.n_bins(asm, chrom)
            best_r = best_n = 1e9
            for _ in range(3):
                t0 = time.perf_counter()
                a = store.read(asm, chrom, exps)
                best_r = min(best_r, time.perf_counter() - t0)
                t0 = time.perf_counter()
                b = np.empty((len(exps), nb), np.float32)
                for i, e in enumerate(exps):
                    b[i] = np.load(work / "npy" / f"{e}.{chrom}.npy")
                best_n = min(best_n, time.perf_counter() - t0)
            assert np.array_equal(a, b)
            tr += best_r
            tn += best_n
            nbytes += a.nbytes

    out = {
        "experiments": len(manifest),
        "bins": nbins,
        "bigwig_MB": round(mb, 1),
        "baseline_s": round(tb, 2),
        "ingest_f32_s": round(t32, 2),
        "ingest_f16_s": round(t16, 2),
        "baseline_bins_per_s": round(nbins / tb),
        "ingest_f32_bins_per_s": round(nbins / t32),
        "ingest_f16_bins_per_s": round(nbins / t16),
        "baseline_MB_per_s": round(mb / tb, 1),
        "ingest_f32_MB_per_s": round(mb / t32, 1),
        "speedup_f32": round(tb / t32, 2),
        "speedup_f16": round(tb / t16, 2),
        "peak_worker_rss_MB_200": round(mem200.peak_one / 1e6),
        "peak_worker_rss_MB_quarter": round(mem50.peak_one / 1e6),
        "read_GB_per_s": round(nbytes / tr / 1e9, 2),
        "np_load_GB_per_s": round(nbytes / tn / 1e9, 2),
        "read_vs_np_load": round(tn / tr, 2),
        "store32_MB": round(
            sum(p.stat().st_size for p in (work / "store32").rglob("*.parquet")) / 1e6, 1
        ),
        "store16_MB": round(
            sum(p.stat().st_size for p in (work / "store16").rglob("*.parquet")) / 1e6, 1
        ),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
