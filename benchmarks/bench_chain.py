"""Chain parsing, bin alignment and synteny materialisation throughput.

1. ``hg38ToHg19.over.chain.gz`` (185,795 blocks): parse (:func:`epiray.chain.read_chain`),
   bin every mouse chromosome (:func:`epiray.chain.iter_bin_blocks`; hg19 plays the mouse) and
   write the alignment tables as Parquet: seconds, blocks/s and bin pairs/s.
2. The reference: ``pyliftover`` (an independent per-point liftOver) on a sample of the same
   bins (the centre base of each paired human bin), points/s, and the ratio to epiray's
   pairs/s; :func:`epiray.chain.liftover_points` on the same points, and agreement of the
   two liftOvers and of the bin pairs with the base-level answers.
   A generated chain shaped like a human-mouse one (1 M short blocks): parse + bin blocks/s.
3. Materialisation (:func:`epiray.synteny.materialise`) on a synthetic compendium: values/s of
   the Ray Data pipeline, and in-process per-task throughput with peak memory (tracemalloc)
   of one gather and one assemble task.

    .venv/bin/python benchmarks/bench_chain.py [--repeats 3] [--sample 100000]
                                               [--preset default] [--skip-materialise]

Wall-clock and CPU (process) seconds are both printed: on a shared machine CPU time is the
per-core figure.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from epiray.chain import iter_bin_blocks, liftover_points, read_chain  # noqa: E402
from epiray.synteny import ALIGNMENT_PARQUET  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CHAIN = DATA / "chains" / "hg38ToHg19.over.chain.gz"
WORK = ROOT / "benchmarks" / "_work"


def timed(fn):
    """(result, wall seconds, cpu seconds)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def best(fn, repeats: int):
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)


def write_table(path: Path, al) -> None:
    table = pa.table(
        {
            "mouse_bin": pa.array(al.mouse_bin, pa.int64()),
            "human_chrom": pa.DictionaryArray.from_arrays(
                pa.array(al.human_chrom, pa.int32()), pa.array(list(al.human_names))
            ),
            "human_bin": pa.array(al.human_bin, pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=1 << 20, **ALIGNMENT_PARQUET)


def bench_chain(repeats: int, sample: int) -> dict:
    print(f"== {CHAIN.name}")
    chains, pw, pc = best(lambda: read_chain(CHAIN), repeats)
    B = chains.n_blocks
    print(
        f"parse:            {pw:7.3f} s wall {pc:7.3f} s cpu   {B / pw / 1e6:6.2f} / "
        f"{B / pc / 1e6:6.2f} M blocks/s (wall / cpu), {chains.n_chains} chains, {B} blocks"
    )

    def bin_all():
        n = 0
        for al in iter_bin_blocks(chains, "target_human"):
            n += len(al)
        return n

    pairs, bw, bc = best(bin_all, repeats)
    print(
        f"bin:              {bw:7.3f} s wall {bc:7.3f} s cpu   {pairs / bw / 1e6:6.1f} / "
        f"{pairs / bc / 1e6:6.1f} M pairs/s, {pairs:,} bin pairs"
    )
    out = Path(tempfile.mkdtemp(dir=WORK if WORK.is_dir() else None))
    try:

        def bin_write():
            n = 0
            for al in iter_bin_blocks(chains, "target_human"):
                write_table(out / f"chrom={al.mouse_chrom}.parquet", al)
                n += len(al)
            return n

        _, ww, wc = timed(bin_write)
        size = sum(p.stat().st_size for p in out.iterdir())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tw, tc = pw + ww, pc + wc
    print(
        f"parse+bin+write:  {tw:7.3f} s wall {tc:7.3f} s cpu   {B / tw / 1e6:6.2f} / "
        f"{B / tc / 1e6:6.2f} M blocks/s, {pairs / tw / 1e6:.1f} / {pairs / tc / 1e6:.1f} M "
        f"pairs/s, {size / 2**20:.0f} MiB Parquet"
    )
    print(
        f"parse+bin:        {pw + bw:7.3f} s wall {pc + bc:7.3f} s cpu   "
        f"{B / (pw + bw) / 1e6:6.2f} / {B / (pc + bc) / 1e6:6.2f} M blocks/s"
    )

    # ---- the same bins through pyliftover (independent per-point liftOver)
    from pyliftover import LiftOver

    rng = np.random.default_rng(0)
    als = list(iter_bin_blocks(chains, "target_human", mouse_chroms=["chr1", "chr7", "chr21"]))
    rows = [(a, i) for a in als for i in rng.choice(len(a), sample // len(als), replace=False)]
    mouse_chrom = np.array([a.mouse_chrom for a, _ in rows])
    mouse_bin = np.array([a.mouse_bin[i] for a, i in rows])
    human_chrom = np.array([a.human_names[a.human_chrom[i]] for a, i in rows])
    human_pos = np.array([a.human_bin[i] for a, i in rows]) * 25 + 12  # centre base of the bin
    lo, lw, lc = timed(lambda: LiftOver(str(CHAIN)))
    print(f"pyliftover load:  {lw:7.3f} s wall {lc:7.3f} s cpu")

    def py_lift():
        return [lo.convert_coordinate(c, int(p)) for c, p in zip(human_chrom, human_pos)]

    ref, rw, rc = timed(py_lift)
    n = len(human_pos)
    print(
        f"pyliftover:       {rw:7.3f} s wall {rc:7.3f} s cpu   {n / rw / 1e3:6.1f} / "
        f"{n / rc / 1e3:6.1f} k points/s ({n} bin centres)"
    )
    ours, ow, oc = best(lambda: liftover_points(chains, human_chrom, human_pos), repeats)
    print(
        f"liftover_points:  {ow:7.3f} s wall {oc:7.3f} s cpu   {n / ow / 1e6:6.2f} / "
        f"{n / oc / 1e6:6.2f} M points/s"
    )
    agree = same_bin = mapped = 0
    for k, r in enumerate(ref):
        unique = len(r) == 1
        ok = (ours["n_hits"].iat[k] == 1) == unique and (
            not unique or (r[0][0] == ours["chrom"].iat[k] and r[0][1] == ours["pos"].iat[k])
        )
        agree += ok
        if unique:
            mapped += 1
            same_bin += r[0][0] == mouse_chrom[k] and r[0][1] // 25 == mouse_bin[k]
    print(
        f"agreement: liftover_points == pyliftover on {agree / n:.4%} of points; the paired "
        f"mouse bin holds pyliftover's answer for {same_bin / max(mapped, 1):.2%} of mapped "
        "bin centres"
    )
    pairs_rate = pairs / (pc + bc)
    print(
        f"ratio: epiray parse+bin {pairs_rate / 1e6:.1f} M pairs/s (cpu) vs pyliftover "
        f"{n / rc / 1e3:.1f} k points/s: x{pairs_rate / (n / rc):,.0f}; liftover_points vs "
        f"pyliftover: x{(n / oc) / (n / rc):,.0f}"
    )
    return {
        "parse_s": pw,
        "parse_cpu_s": pc,
        "bin_s": bw,
        "bin_cpu_s": bc,
        "write_s": ww,
        "pairs": pairs,
        "blocks": B,
        "pyliftover_points_per_s": n / rc,
        "liftover_points_per_s": n / oc,
        "agreement": agree / n,
        "pair_holds_answer": same_bin / max(mapped, 1),
    }


def bench_cross_species_like(n_blocks: int, repeats: int) -> dict:
    """Parse + bin a generated chain shaped like a human-mouse one: short blocks (median ~100
    bp, 6% under 25 bp), 100 blocks per chain, a quarter of the chains on '-'."""
    print(f"== generated cross-species-like chain, {n_blocks:,} blocks")
    rng = np.random.default_rng(0)
    per, size = 100, 150_000_000
    n_chains = n_blocks // per
    lines = []
    for c in range(n_chains):  # a loop over chains, to write the file
        sz = np.maximum(rng.lognormal(np.log(100), 0.8, per).astype(np.int64), 5)
        dt, dq = rng.integers(1, 400, per - 1), rng.integers(1, 400, per - 1)
        span_t, span_q = int(sz.sum() + dt.sum()), int(sz.sum() + dq.sum())
        t0, q0 = int(rng.integers(0, size - span_t)), int(rng.integers(0, size - span_q))
        strand = "-" if c % 4 == 0 else "+"
        lines.append(
            f"chain {10**6 - c} chr{c % 20 + 1} {size} + {t0} {t0 + span_t} "
            f"chr{c % 19 + 1} {size} {strand} {q0} {q0 + span_q} {c + 1}"
        )
        lines.extend(f"{a}\t{b}\t{d}" for a, b, d in zip(sz[:-1], dt, dq))
        lines.extend((str(sz[-1]), ""))
    out = Path(tempfile.mkdtemp(dir=WORK if WORK.is_dir() else None))
    try:
        path = out / "xs.chain"
        path.write_text("\n".join(lines))
        del lines
        chains, pw, pc = best(lambda: read_chain(path), repeats)

        def bin_all():
            return sum(len(a) for a in iter_bin_blocks(chains, "target_human"))

        pairs, bw, bc = best(bin_all, repeats)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    B = chains.n_blocks
    print(
        f"parse:            {pw:7.3f} s wall {pc:7.3f} s cpu   {B / pc / 1e6:6.2f} M blocks/s "
        "(cpu)"
    )
    print(
        f"bin:              {bw:7.3f} s wall {bc:7.3f} s cpu   {pairs / bc / 1e6:6.1f} M pairs/s "
        f"(cpu), {pairs:,} pairs ({pairs / B:.1f} per block)"
    )
    print(
        f"parse+bin:        {pw + bw:7.3f} s wall {pc + bc:7.3f} s cpu   "
        f"{B / (pc + bc) / 1e6:6.2f} M blocks/s (cpu)"
    )
    return {
        "blocks": B,
        "pairs": pairs,
        "parse_cpu_s": pc,
        "bin_cpu_s": bc,
        "blocks_per_cpu_s": B / (pc + bc),
    }


def bench_materialise(preset: str) -> dict:
    import ray

    from epiray import synthetic
    from epiray.ingest import AssemblySpec, IngestConfig, ingest
    from epiray.store import Store
    from epiray.synteny import _assemble, _gather, _plan, materialise, synteny_dir, write_alignment

    print(f"== materialise, synthetic preset {preset!r}")
    out = Path(tempfile.mkdtemp(dir=WORK if WORK.is_dir() else None))
    try:
        params = synthetic.SynthParams.preset(preset)
        res, gw, _ = timed(lambda: synthetic.generate(out / "c", seed=0, params=params))
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        cfg = IngestConfig(
            manifest=str(res.manifest),
            store=str(out / "store"),
            chroms="all",
            dtype="float16",
            assemblies={
                a: AssemblySpec(chrom_sizes=str(out / "c" / "genomes" / f"{a}.chrom.sizes"))
                for a in res.chrom_sizes
            },
        )
        store, iw, _ = timed(lambda: ingest(cfg))
        info, aw, ac = timed(
            lambda: write_alignment(
                store, res.chain, human_assembly="hsSyn1", mouse_assembly="mmSyn1"
            )
        )
        name = "hsSyn1ToMmSyn1"
        n_exp = len(store.experiments(assembly="hsSyn1"))
        print(
            f"compendium: generate {gw:.1f} s, ingest {iw:.1f} s; alignment {aw:.2f} s wall "
            f"({ac:.2f} s cpu): {info['n_alignments']:,} rows, {info['fraction_aligned']:.1%} "
            f"of mouse bins aligned, {info['multi_aligned_bins']:,} aligned twice or more; "
            f"{n_exp} human experiments"
        )
        stats, mw, mc = timed(lambda: materialise(store, name))
        v = stats["values"]
        print(
            f"materialise (Ray Data, 4 logical CPUs on this machine): {mw:.2f} s wall, "
            f"{v:,} values, {v / mw / 1e6:.2f} M values/s; "
            f"{stats['gather_tasks']} gather + {stats['assemble_tasks']} assemble tasks; "
            f"driver max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
            "MiB"
        )
        # in-process: one task of each kind, timed, peak memory by tracemalloc
        store = Store.open(store.root)
        e = store.experiments(assembly="hsSyn1")["experiment"].iloc[0]
        for c in info["mouse_chroms"]:
            store.synteny_part_path(name, c, e).unlink()
        shutil.rmtree(synteny_dir(store, name) / "staging", ignore_errors=True)
        gather, assemble, _ = _plan(store, name, store.summary["synteny"][name], [e])
        biggest = max(store.n_bins("hsSyn1", h) for h in store.chrom_sizes("hsSyn1"))
        for kind, items, fn in (("gather", gather, _gather), ("assemble", assemble, _assemble)):
            tracemalloc.start()
            _, w, c = timed(lambda items=items, fn=fn: [fn(r) for r in items])
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            n_vals = (
                sum(int(r["n_rows"]) for r in items)
                if kind == "assemble"
                else sum(
                    store.summary["synteny"][name]["rows_per_human_chrom"].get(r["chrom"], 0)
                    for r in items
                )
            )
            print(
                f"  {kind:8s} {len(items)} tasks in-process: {w:.3f} s wall {c:.3f} s cpu, "
                f"{n_vals / c / 1e6:.1f} M values/s (cpu), peak {peak / 2**20:.2f} MiB "
                f"(largest human chrom {biggest:,} bins)"
            )
        return {"values": v, "materialise_s": mw, "values_per_s": v / mw}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)


def bench_tasks_at_scale(n_bins: int, n_rows: int) -> dict:
    """One gather and one assemble task at genome scale, in-process: a human chromosome of
    ``n_bins`` float16 bins (hg38 chr1: 9.96 M) with ``n_rows`` aligned rows split over two
    mouse chromosomes; values/s and tracemalloc peak."""
    from epiray.store import DEFAULT_BLOCK_BINS, write_part
    from epiray.synteny import _assemble, _gather

    print(f"== one task of each kind at scale: human chrom {n_bins:,} bins, {n_rows:,} rows")
    out = Path(tempfile.mkdtemp(dir=WORK if WORK.is_dir() else None))
    try:
        rng = np.random.default_rng(0)
        values = rng.random(n_bins).astype(np.float16)
        part = out / "human.parquet"
        write_part(part, values, dtype="float16", block_bins=DEFAULT_BLOCK_BINS, meta={})
        # runs of consecutive human bins, as blocks produce; rows grouped by mouse chromosome
        starts = np.sort(rng.integers(0, n_bins - 400, n_rows // 100))
        human_bin = (starts[:, None] + np.arange(100)).ravel()[:n_rows]
        half = n_rows // 2
        rows = np.concatenate((rng.permutation(half), rng.permutation(n_rows - half)))
        index = out / "index.npy"
        np.save(index, np.stack((rows, human_bin), axis=1))
        staged = out / "staged.npy"
        common = {
            "synteny": "bench",
            "experiment": "E",
            "dtype": "float16",
            "block_bins": DEFAULT_BLOCK_BINS,
            "human_assembly": "h",
            "alignment_key": "k",
            "checksum": "c",
        }
        g = {
            **common,
            "chrom": "chr1",
            "n_bins": n_bins,
            "source": str(part),
            "index": str(index),
            "staged": str(staged),
        }
        tracemalloc.start()
        r, gw, gc = timed(lambda: _gather(g))
        gpeak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert not r["problem"], r
        np.testing.assert_array_equal(np.load(staged), values[human_bin])
        a = {
            **common,
            "chrom": "m1",
            "n_rows": half,
            "part": str(out / "m1.parquet"),
            "slices": json.dumps([[str(index), str(staged), 0, half]]),
        }
        tracemalloc.start()
        r, aw, ac = timed(lambda: _assemble(a))
        apeak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert not r["problem"], r
        print(
            f"gather:   {gw:.3f} s wall {gc:.3f} s cpu, {n_rows / gc / 1e6:6.1f} M values/s "
            f"(cpu), peak {gpeak / 2**20:.0f} MiB (human chrom {n_bins * 2 / 2**20:.0f} MiB "
            f"float16 + index {n_rows * 16 / 2**20:.0f} MiB)"
        )
        print(
            f"assemble: {aw:.3f} s wall {ac:.3f} s cpu, {half / ac / 1e6:6.1f} M values/s "
            f"(cpu), peak {apeak / 2**20:.0f} MiB (part of {half:,} rows)"
        )
        return {
            "gather_values_per_cpu_s": n_rows / gc,
            "gather_peak_mib": gpeak / 2**20,
            "assemble_values_per_cpu_s": half / ac,
            "assemble_peak_mib": apeak / 2**20,
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample", type=int, default=100_000)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--skip-materialise", action="store_true")
    ap.add_argument("--skip-chain", action="store_true")
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, numpy {np.__version__}"
    )
    results = {}
    if not args.skip_chain:
        results["chain"] = bench_chain(args.repeats, args.sample)
        results["cross_species_like"] = bench_cross_species_like(1_000_000, args.repeats)
    if not args.skip_materialise:
        results["tasks_at_scale"] = bench_tasks_at_scale(9_960_000, 4_000_000)
        results["materialise"] = bench_materialise(args.preset)
    print(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
