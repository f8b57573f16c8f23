"""eDICE benchmarks: Roadmap-pilot imputation vs average activity; speed and memory.

Three parts, each printing its figures (run from the repository root)::

    .venv/bin/python benchmarks/bench_edice.py loo      # (a) 25 held-out tracks, ~14 CPU-min
    .venv/bin/python benchmarks/bench_edice.py speed    # (b) paper sizes: params, bins/s
    .venv/bin/python benchmarks/bench_edice.py memory   # (b) peak memory vs number of tracks
    .venv/bin/python benchmarks/bench_edice.py          # all three

(a) ``../shared/data/roadmap-pilot``: 5 biosamples × 5 assays, 1,126,469 bins each (arcsinh).
``--protocol loo`` (default) trains **one model per held-out track** on the other 24 tracks —
the held-out track is never seen in training nor given as support — and imputes it over every
bin. ``--protocol latin`` trains 5 models, fold ``k`` holding out track (biosample ``i``, assay
``(i + k) mod 5``) for every ``i``: each model trains on 20 tracks and imputes 5, none of which it
saw, in one pass (``predict_many``). In both protocols every assay loses exactly one biosample
per model, so the baseline is the same: average activity = mean of the held-out assay over the
other 4 biosamples.
One random masked model cannot serve all 25 cases: every track would be in its training set.

Training draws batches with :meth:`EDice.batches` and stops after ``--steps`` batches, i.e. on a
random subsample of ``steps × batch_size`` bins of one epoch (CPU budget); the model is smaller
than the paper's (``--dim 32 --mlp-hidden 128``; paper: 256 and 2,048), stated in the output.

(b) Paper sizes on the Roadmap layout (127 biosamples × 24 assays, the 811 PREDICTD train+val
tracks of ``../shared/data/roadmap/``; random values — speed does not depend on them).
Training bins/s (forward + backward + Adam, 120 targets per bin) and prediction bins/s (one
target track). Memory: peak resident memory of a training step in a fresh process, for
growing numbers of tracks.

The machine is shared; every part runs one torch thread (``--threads``) because two threads
on two busy cores spin against each other (a 10-20× slowdown measured on this machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from epiray.models import Vocabulary, chrom_data_from_numpy  # noqa: E402
from epiray.models.edice import EDice, EDiceParams  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PILOT = DATA / "roadmap-pilot"
BIOSAMPLES = ("E003", "E017", "E065", "E116", "E117")
ASSAYS = ("H3K4me3", "H3K27me3", "H3K36me3", "H3K9me3", "H3K4me1")


# --------------------------------------------------------------------------------------------
# (a) Roadmap pilot
# --------------------------------------------------------------------------------------------


def load_pilot() -> dict[tuple[str, str], np.ndarray]:
    """The 25 pilot tracks, ``{(biosample, assay): float32 [1126469]}``."""
    if not PILOT.is_dir():
        sys.exit(f"bench_edice: {PILOT} not found; the Roadmap pilot data is needed for 'loo'")
    return {
        (b, a): np.load(PILOT / f"{b}.{a}.pilot.arcsinh.npz")["arr_0"].astype(np.float32).ravel()
        for b in BIOSAMPLES
        for a in ASSAYS
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    return float((x @ y) / np.sqrt((x @ x) * (y @ y)))


def fit_and_impute(
    tracks: dict[tuple[str, str], np.ndarray],
    held: list[tuple[str, str]],
    args: argparse.Namespace,
    seed: int,
) -> tuple[dict[tuple[str, str], np.ndarray], float, float]:
    """Train on every track but ``held``; impute ``held``.

    Returns the predictions and the CPU seconds of training and of prediction.
    """
    vocab = Vocabulary.from_records(
        [(f"{b}.{a}", b, a, "human") for b, a in tracks],
        chrom="pilot",
        n_bins=len(next(iter(tracks.values()))),
    )
    train = [k for k in tracks if k not in held]
    data = chrom_data_from_numpy(
        np.stack([tracks[k] for k in train]),
        [vocab.biosample_index(b) for b, _ in train],
        [vocab.assay_index(a) for _, a in train],
        chrom="pilot",
        device="cpu",
    )
    torch.manual_seed(seed)
    model = EDice.build(params_from(args), vocab, data)
    opt = torch.optim.Adam(model.dense_parameters(), lr=args.lr)
    # Linear decay to 0 over the run: a short run at a high rate ends noisy otherwise.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / args.steps))
    gen = torch.Generator().manual_seed(seed)
    c0 = time.process_time()
    model.train()
    step = 0
    while step < args.steps:
        for batch in model.batches(data, gen, args.batch_bins * model.targets_per_bin(data)):
            loss = model.loss(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == args.steps:
                break
    c1 = time.process_time()
    pairs = [(vocab.biosample_index(b), vocab.assay_index(a)) for b, a in held]
    out = model.predict_many(data, pairs).numpy()
    preds = {k: out[i] for i, k in enumerate(held)}
    return preds, c1 - c0, time.process_time() - c1


def params_from(args: argparse.Namespace) -> EDiceParams:
    return EDiceParams(
        dim=args.dim,
        ffn_hidden=args.ffn_hidden,
        mlp_hidden=args.mlp_hidden,
        n_targets=int(args.n_targets) if args.n_targets >= 1 else args.n_targets,
    )


def run_loo(args: argparse.Namespace) -> None:
    tracks = load_pilot()
    if args.protocol == "loo":
        folds = [[k] for k in tracks]
    else:
        folds = [[(BIOSAMPLES[i], ASSAYS[(i + k) % 5]) for i in range(5)] for k in range(5)]
    if args.limit:
        folds = folds[: args.limit]
    p = params_from(args)
    n_params = EDice(
        p,
        Vocabulary.from_records(
            [(f"{b}.{a}", b, a, "human") for b, a in tracks], chrom="pilot", n_bins=1
        ),
    ).n_parameters()
    print(
        f"# eDICE on the Roadmap pilot, protocol={args.protocol}: {len(folds)} model(s); "
        f"dim={p.dim} ffn={p.ffn_hidden} mlp=2x{p.mlp_hidden} ({n_params:,} params), "
        f"n_targets={p.n_targets}, Adam lr={args.lr} decaying linearly to 0, "
        f"{args.steps} steps x {args.batch_bins} bins "
        f"(= {args.steps * args.batch_bins:,} training bins of 1,126,469), "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"{'track':<18}{'MSE':>8}{'MSE_AA':>8}{'r':>8}{'r_AA':>8}"
        f"{'train_cpu_s':>12}{'pred_cpu_s':>11}"
    )
    rows = []
    t_all, c_all = time.perf_counter(), time.process_time()
    for k, held in enumerate(folds):
        preds, t_train, t_pred = fit_and_impute(tracks, held, args, seed=args.seed + k)
        for b, a in held:
            y = tracks[b, a]
            avg = np.mean([tracks[o, a] for o in BIOSAMPLES if o != b], axis=0)
            row = {
                "track": f"{b}.{a}",
                "mse": float(np.mean((preds[b, a] - y) ** 2)),
                "mse_aa": float(np.mean((avg - y) ** 2)),
                "r": pearson(preds[b, a], y),
                "r_aa": pearson(avg, y),
            }
            rows.append(row)
            print(
                f"{row['track']:<18}{row['mse']:8.4f}{row['mse_aa']:8.4f}{row['r']:8.3f}"
                f"{row['r_aa']:8.3f}{t_train / len(held):12.1f}{t_pred / len(held):11.1f}",
                flush=True,
            )
    mse = np.array([r["mse"] for r in rows])
    mse_aa = np.array([r["mse_aa"] for r in rows])
    r = np.array([r["r"] for r in rows])
    r_aa = np.array([r["r_aa"] for r in rows])
    print(
        f"mean over {len(rows)} tracks: MSE eDICE {mse.mean():.4f} vs average activity "
        f"{mse_aa.mean():.4f} ({100 * (1 - mse.mean() / mse_aa.mean()):.1f}% lower); "
        f"eDICE lower MSE on {(mse < mse_aa).sum()}/{len(rows)} tracks; "
        f"Pearson {r.mean():.3f} vs {r_aa.mean():.3f} (higher on {(r > r_aa).sum()}/{len(rows)}); "
        f"CPU {time.process_time() - c_all:.0f} s, wall {time.perf_counter() - t_all:.0f} s"
    )


# --------------------------------------------------------------------------------------------
# (b) speed and memory at paper sizes
# --------------------------------------------------------------------------------------------


def roadmap_layout(n_tracks: int | None = None) -> tuple[list[int], list[int], int, int]:
    """(biosample, assay) indices of the PREDICTD train+val tracks, or a synthetic layout.

    With ``n_tracks``: 24 assays, ``ceil(n_tracks / 6.4)`` biosamples (Roadmap's density of
    ~27% of the grid), tracks drawn without replacement.
    """
    if n_tracks is None and (DATA / "roadmap").is_dir():
        splits = json.loads((DATA / "roadmap/predictd_splits.json").read_text())
        ids = json.loads((DATA / "roadmap/idmap.json").read_text())
        names = splits["train"] + splits["val"]
        cell, assay = ids["cell2id"], ids["assay2id"]
        pairs = [n.split("-", 1) for n in names]
        return (
            [cell[c] for c, _ in pairs],
            [assay[a] for _, a in pairs],
            len(cell),
            len(assay),
        )
    n_tracks = n_tracks or 811
    n_assays = 24
    n_bio = max(1, int(np.ceil(n_tracks / 6.4)))
    rng = np.random.default_rng(0)
    flat = rng.choice(n_bio * n_assays, size=n_tracks, replace=False)
    return list(flat // n_assays), list(flat % n_assays), n_bio, n_assays


def paper_model(bio, assay, n_bio, n_assay, n_bins, **kw):
    vocab = Vocabulary.from_records(
        [(f"x{b}.{a}", f"b{b:04d}", f"a{a:03d}", "human") for b, a in zip(bio, assay)]
        + [(f"pad.b{b}", f"b{b:04d}", "a000", "human") for b in range(n_bio)]
        + [(f"pad.a{a}", "b0000", f"a{a:03d}", "human") for a in range(n_assay)],
        chrom="chr21",
        n_bins=n_bins,
    )
    rng = np.random.default_rng(0)
    values = np.abs(rng.normal(size=(len(bio), n_bins))).astype(np.float32)
    data = chrom_data_from_numpy(values, bio, assay, chrom="chr21", device="cpu")
    model = EDice.build(EDiceParams(**kw), vocab, data)
    return model, data


def run_speed(args: argparse.Namespace) -> None:
    bio, assay, n_bio, n_assay = roadmap_layout()
    model, data = paper_model(bio, assay, n_bio, n_assay, 4096)
    print(
        f"# eDICE paper sizes (dim 256, 4 heads, FFN 128, MLP 2x2048, 120 targets/bin) on the "
        f"Roadmap layout: {n_bio} biosamples x {n_assay} assays, {len(bio)} training tracks; "
        f"threads={torch.get_num_threads()}"
    )
    print(f"parameters: {model.n_parameters():,}")
    opt = torch.optim.Adam(model.dense_parameters(), lr=EDice.default_lr)
    gen = torch.Generator().manual_seed(0)
    batches = model.batches(data, gen, args.speed_batch * model.targets_per_bin(data))
    times, cpu = [], []
    for i in range(args.speed_steps + 1):
        batch = next(batches)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # first step warms up
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step, step_cpu = float(np.median(times)), float(np.median(cpu))
    print(
        f"training: batch {args.speed_batch} bins, median step {step:.2f} s wall / "
        f"{step_cpu:.2f} s CPU over {len(times)} steps -> {args.speed_batch / step:.1f} bins/s "
        f"wall, {args.speed_batch / step_cpu:.1f} bins/s per CPU-second "
        f"({args.speed_batch * 120 / step_cpu:.0f} target cells per CPU-second)"
    )
    model.eval()
    n = 2048
    sub = chrom_data_from_numpy(
        data.values[:, :n].numpy(), bio, assay, chrom="chr21", device="cpu"
    )
    model.predict(sub, 0, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    model.predict(sub, 0, 0)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"prediction: one track, {n} bins in {dt:.2f} s wall / {dc:.2f} s CPU -> "
        f"{n / dt:.0f} bins/s wall, {n / dc:.0f} bins per CPU-second"
    )


def _memory_child(n_tracks: int, batch: int, steps: int) -> None:
    bio, assay, n_bio, n_assay = roadmap_layout(n_tracks)
    model, data = paper_model(bio, assay, n_bio, n_assay, 4 * batch)
    opt = torch.optim.Adam(model.dense_parameters(), lr=EDice.default_lr)
    gen = torch.Generator().manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    examples = batch * model.targets_per_bin(data)
    for _, b in zip(range(steps), model.batches(data, gen, examples)):
        loss = model.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "tracks": n_tracks,
                "biosamples": n_bio,
                "assays": n_assay,
                "params": model.n_parameters(),
                "base_mb": base / 1024,
                "peak_mb": peak / 1024,
            }
        )
    )


def run_memory(args: argparse.Namespace) -> None:
    print(
        f"# eDICE training-step memory at paper sizes, batch {args.speed_batch} bins, "
        f"120 targets/bin (fewer when tracks < 121): peak RSS of a fresh process minus its "
        "RSS after building data and model (= activations + gradients + Adam state)"
    )
    print(
        f"{'tracks':>7}{'biosamples':>11}{'params':>11}{'step_MB':>9}{'MB/bin':>8}"
        f"{'slab_B/bin':>11}"
    )
    for t in args.memory_tracks:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "_memory_child",
                str(t),
                str(args.speed_batch),
                "2",
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        step = r["peak_mb"] - r["base_mb"]
        print(
            f"{t:7d}{r['biosamples']:11d}{r['params']:11,d}{step:9.0f}"
            f"{step / args.speed_batch:8.2f}{4 * t:11d}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("part", nargs="*", default=["loo", "speed", "memory"])
    ap.add_argument("--protocol", choices=("loo", "latin"), default="loo")
    ap.add_argument("--limit", type=int, default=0, help="only the first N folds (quick look)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--ffn-hidden", type=int, default=64)
    ap.add_argument("--mlp-hidden", type=int, default=128)
    ap.add_argument("--n-targets", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-bins", type=int, default=256, help="bins per training batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-batch", type=int, default=32, help="bins per batch (b)")
    ap.add_argument("--speed-steps", type=int, default=5)
    ap.add_argument("--memory-tracks", type=int, nargs="+", default=[25, 200, 811, 2000])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part and args.part[0] == "_memory_child":
        _memory_child(*(int(x) for x in args.part[1:4]))
        return
    for part in args.part:
        {"loo": run_loo, "speed": run_speed, "memory": run_memory}[part](args)


if __name__ == "__main__":
    main()
