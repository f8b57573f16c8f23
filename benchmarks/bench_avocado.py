"""Avocado on CPU: real-data imputation check and training throughput.

Subcommands (each prints its figures; the last line of stdout is one JSON object):

``loo``
    The Roadmap pilot (``shared/data/roadmap-pilot``: 25 tracks, 5 cell types × 5 histone
    marks, 1,126,469 bins, already arcsinh). For each track of ``--assay`` (default H3K4me3):
    train on the other 24, impute it, report MSE and Pearson beside average activity (mean of
    the other 4 cell types' tracks of the assay). Nothing ever looks at the test track.
    Default (``--config cosine --protocol fixed``): ``biosample_shrinkage`` is chosen per test
    track among ``--select-shrinkage`` weights on the same cell type's other four assays: for
    each, a model trained on the first 100,000 bins of the 23 tracks left without it and the
    test track, scored on it; the weight with the lowest mean score wins (``--select-rule
    nested``: the other four cell types' tracks of the assay on 200,000 bins, session 5;
    ``next``: only the next cell type's, session 4). Then a model per seed (``--seeds``,
    default 0 and 1) trains on all 24 tracks for 30 epochs with a cosine learning-rate decay,
    and the seeds' last-epoch imputations are averaged. The retrain's batches are the config's
    scaled by bins / ``--select-bins``, so it takes as many optimiser steps per epoch as the
    models that chose its weight (``--retrain-batch config``: the config's batches, sessions 4
    and 5). ``--pred-dir`` keeps each seed's imputation, so processes can split the seeds and a
    last run with all of them only reads. ``--config pilot --protocol holdout`` is the earlier
    protocol (23 tracks, early stopping on the validation track, best epoch imputes);
    ``--protocol refit`` retrains on all 24 tracks for the epochs the holdout stage found best.
``select``
    The selection table of a rule for ``--assay`` (``--rule same-cell``: 20 pairs of a
    held-out track of the assay and another assay of its cell type; ``nested``: 10 pairs of
    the assay's tracks; × the shrinkage grid, a model each), in shards for parallel processes;
    ``loo --selection`` reads it. ``--reuse`` skips pairs another table already scored (a
    same-cell pair of H3K4me3 and H3K27me3 serves both assays' selections).
``throughput``
    Training samples/s at the paper's hyperparameters (2 × 2,048, factors 32/256/25+40+45,
    batch 40,000), pilot data, through ``epiray.loop.fit``. Wall-clock and per-CPU-second
    figures (the second moves less when the machine is shared).
``malloc``
    ``throughput --thread`` (training in a thread, as a Ray Train worker runs it) in child
    processes with glibc's default malloc and with ``scaling.cpu_malloc: reuse``'s
    ``GLIBC_TUNABLES``, alternating: what reusing freed activations gains.
``scale``
    Step time at mouse chr1 size (7.8 M bins) vs pilot size (1.13 M bins): genome-factor
    updates are sparse, so the step must not grow with the chromosome.
``sparse``
    Row-wise Adam (``RowAdam``) vs ``torch.optim.SparseAdam`` on pilot-size genome tables.
``bf16``
    One training step in float32 vs CPU bf16 autocast.
``memory``
    Memory of one cross-species worker on a mouse-chr1-sized slab: ``memory_estimate`` beside
    the process's measured RSS (after loading, after the first step, peak over the steps); then
    the estimate per worker for the whole compendium's chr1 by number of workers.
``profile``
    ``torch.profiler`` over training steps at paper sizes on the pilot: the matrix multiplies'
    share of the CPU time and their GFLOP/s, and the top operators.
``checkpoint``
    Size, write and read time of a worker's checkpoint at mouse chr1 size (paper sizes, after
    training steps: genome factors with both Adam moments, then with the best epoch's copy),
    beside an epoch's time here and at the GPU target of 10 M examples/s.

    .venv/bin/python benchmarks/bench_avocado.py loo
    .venv/bin/python benchmarks/bench_avocado.py select --shard 0/2 --out same0.json  # and 1/2
    .venv/bin/python benchmarks/bench_avocado.py loo --selection same0.json same1.json \
        --seeds 0 --pred-dir preds  # and --seeds 1, then both: only reads
    .venv/bin/python benchmarks/bench_avocado.py loo --cells E065 --epochs 4 --select-shrinkage 0
    .venv/bin/python benchmarks/bench_avocado.py loo --config pilot --protocol holdout --seeds 0
    .venv/bin/python benchmarks/bench_avocado.py throughput --steps 3
    .venv/bin/python benchmarks/bench_avocado.py scale
    .venv/bin/python benchmarks/bench_avocado.py memory
    .venv/bin/python benchmarks/bench_avocado.py checkpoint
    .venv/bin/python benchmarks/bench_avocado.py profile
    .venv/bin/python benchmarks/bench_avocado.py malloc
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from epiray.loop import LoopParams, RowAdam, fit, host_copy
from epiray.models import ChromData, Vocabulary, chrom_data_from_numpy
from epiray.models.avocado import Avocado, AvocadoParams
from epiray.models.baselines import AverageActivity
from epiray.store import atomic_write_bytes, atomic_write_text

DATA = Path(__file__).resolve().parents[2] / "shared/data/roadmap-pilot"
CELLS = ["E003", "E017", "E065", "E116", "E117"]
ASSAYS = ["H3K4me3", "H3K27me3", "H3K36me3", "H3K9me3", "H3K4me1"]
PILOT_BINS = 1_126_469
CHR1_BINS = 7_800_000  # mouse chr1 (195 Mb) at 25 bp
ORIGINAL = {"E003": 0.208, "E017": 0.333, "E065": 0.134, "E116": 0.095, "E117": 0.294}

#: The pilot configuration, chosen on the validation tracks only (never a test track): the
#: paper's factors, a narrower network (256 units: 2,048 costs 30x more per example on CPU;
#: 64 generalised worse), batches of 10,000 (4x the updates per pass over the bins), Adam
#: with learning rate 3e-3 for dense and genome parameters (a genome row is updated once per
#: epoch, so 1e-3 needs far more epochs), up to 20 epochs with early stopping (patience 4).
PILOT_MODEL = {"n_nodes": 256}
PILOT_LOOP = {"batch_size": 10_000, "lr": 3e-3, "sparse_lr": 3e-3, "epochs": 20, "patience": 4}
#: The pilot network with a cosine learning-rate decay over a fixed 30 epochs, the last epoch's
#: model kept (no early-stopping track: every track but the test one trains), and
#: ``biosample_shrinkage`` chosen per held-out track (``--select-shrinkage``).
COSINE_MODEL = PILOT_MODEL
COSINE_LOOP = {
    **PILOT_LOOP,
    "epochs": 30,
    "lr_schedule": "cosine",
    "patience": None,
    "restore_best": False,
}
SHRINKAGE_GRID = [0.0, 0.1, 1.0, 10.0]
#: Validation rules for the shrinkage weight (``_val_tracks``).
SELECT_RULES = ["same-cell", "nested", "next"]
#: Bins of a rule's selection models unless ``--select-bins`` says otherwise.
SELECT_BINS = {"same-cell": 100_000, "nested": 200_000, "next": 200_000}
CONFIGS = {"pilot": (PILOT_MODEL, PILOT_LOOP), "cosine": (COSINE_MODEL, COSINE_LOOP)}


def _load(n_bins: int | None = None) -> dict[tuple[str, str], np.ndarray]:
    """The 25 pilot tracks (their first ``n_bins`` bins when given)."""
    if not DATA.is_dir():
        sys.exit(f"bench_avocado: {DATA} not found; expected the shared roadmap-pilot data.")
    return {
        (c, a): np.load(DATA / f"{c}.{a}.pilot.arcsinh.npz")["arr_0"][:n_bins]
        for c in CELLS
        for a in ASSAYS
    }


def _vocab(n_bins: int = PILOT_BINS) -> Vocabulary:
    recs = [(f"{c}.{a}", c, a, "human") for c in CELLS for a in ASSAYS]
    return Vocabulary.from_records(recs, chrom="pilot", n_bins=n_bins)


def _data(tracks, vocab, train, val=()) -> ChromData:
    bi, ai = vocab.biosample_index, vocab.assay_index
    kw = {}
    if val:
        kw = {
            "val_values": np.stack([tracks[k] for k in val]),
            "val_biosample": [bi(c) for c, _ in val],
            "val_assay": [ai(a) for _, a in val],
        }
    return chrom_data_from_numpy(
        np.stack([tracks[k] for k in train]),
        [bi(c) for c, _ in train],
        [ai(a) for _, a in train],
        chrom="pilot",
        **kw,
    )


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1])


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# loo
# ---------------------------------------------------------------------------------------------


def cmd_loo(args: argparse.Namespace) -> dict:
    tracks = _load(args.bins)
    vocab = _vocab(len(next(iter(tracks.values()))))
    base_model, base_loop = CONFIGS[args.config]
    model_kw = {**base_model, **json.loads(args.model)}
    loop_kw = {**base_loop, **json.loads(args.loop)}
    if args.epochs:
        loop_kw["epochs"] = args.epochs
    rows = []
    base_kw = model_kw
    grid = args.select_shrinkage
    if grid is None:
        grid = SHRINKAGE_GRID if args.config == "cosine" else []
    table: dict = {}
    for path in args.selection or []:
        sel = json.loads(Path(path).read_text())
        if args.select_bins not in (None, sel["select_bins"]):
            sys.exit(
                f"bench_avocado loo: {path} was computed on {sel['select_bins']:,} bins, not "
                f"--select-bins {args.select_bins:,}; pass tables of one size and its value."
            )
        args.select_bins = sel["select_bins"]
        table.update(sel["table"])
    if args.select_bins is None:
        args.select_bins = SELECT_BINS[args.select_rule]
    assay = args.assay
    for cell in args.cells:
        test = (cell, assay)
        train = [k for k in tracks if k != test]
        val_cell = CELLS[(CELLS.index(cell) + 1) % len(CELLS)]
        val = (val_cell, assay)
        t0, c0 = time.perf_counter(), time.process_time()
        selection, model_kw = None, base_kw
        if len(grid) == 1:
            model_kw = {**base_kw, "biosample_shrinkage": grid[0]}
        elif grid:
            vals = _val_tracks(test, args.select_rule)
            missing = [
                (test, v) for v in vals if any(_pair_key(test, v, g) not in table for g in grid)
            ]
            table.update(
                _pair_scores(args, tracks, grid, base_kw, loop_kw, missing, args.seeds[0])
            )
            # the test track's own scores in the table are never used for its choice
            selection = {
                g: round(float(np.mean([table[_pair_key(test, v, g)][_name(v)] for v in vals])), 5)
                for g in grid
            }
            lam = min(selection, key=selection.get)
            model_kw = {**base_kw, "biosample_shrinkage": lam}
            print(
                f"  {cell}: biosample_shrinkage {lam} chosen on the mean validation MSE of "
                + ", ".join(_name(v) for v in vals)
                + ": "
                + ", ".join(f"{g}: {m:.4f}" for g, m in selection.items()),
                flush=True,
            )
        retrain_kw = loop_kw
        if args.protocol == "fixed":  # all 24 tracks for the loop's epochs, no validation
            data1 = _data(tracks, vocab, train)
            if args.retrain_batch == "matched":
                # as many steps per epoch as the selection models took on their subset
                n = len(next(iter(tracks.values())))
                batch = round(loop_kw["batch_size"] * n / min(n, args.select_bins))
                retrain_kw = {**loop_kw, "batch_size": batch}
        else:  # stage 1: 23 training tracks, the next cell type's for early stopping
            data1 = _data(tracks, vocab, [k for k in train if k != val], [val])
        # the 24 training tracks (the fixed protocol trains on exactly these)
        data = data1 if args.protocol == "fixed" else _data(tracks, vocab, train)
        bi, ai = vocab.biosample_index(cell), vocab.assay_index(assay)

        def progress(state, m, cell=cell):
            val_mse = "-" if m["val_mse"] is None else f"{m['val_mse']:.4f}"
            print(
                f"  {cell} epoch {m['epoch']}: train {m['train_mse']:.4f} val {val_mse}"
                f" ({m['examples_per_s']:,.0f} samples/s)",
                flush=True,
            )

        def train_one(
            seed, data1=data1, data=data, bi=bi, ai=ai, model_kw=model_kw, kw=retrain_kw
        ):
            torch.manual_seed(seed)
            model = Avocado.build(AvocadoParams(**model_kw), vocab, data1)
            st = fit(model, data1, LoopParams(**kw, seed=seed), callback=progress)
            best = st.best_epoch if st.best_epoch else st.epoch
            fitted = data1
            if args.protocol == "refit":
                # stage 2: all 24 tracks, as many epochs as stage 1 found best, no validation
                torch.manual_seed(seed)
                model = Avocado.build(AvocadoParams(**model_kw), vocab, data)
                fit(model, data, LoopParams(**{**loop_kw, "epochs": best}, seed=seed))
                fitted = data
            return model, st, best, fitted, model.predict(fitted, bi, ai).numpy()

        # one retrain per seed (their predictions averaged); with --pred-dir each seed's
        # prediction is kept under a name that hashes every setting, and reused
        setting = json.dumps(
            [args.protocol, len(tracks[test]), model_kw, retrain_kw, loop_kw], sort_keys=True
        )
        tag = hashlib.sha1(setting.encode()).hexdigest()[:12]
        preds, seed_mse, st, best, model = [], {}, None, None, None
        truth = tracks[test]
        for seed in args.seeds:
            cache = (
                Path(args.pred_dir) / f"{cell}.{assay}.{tag}.seed{seed}.npy"
                if args.pred_dir
                else None
            )
            if cache is not None and cache.is_file():
                p = np.load(cache, allow_pickle=False)
            else:
                model, st, best, fitted, p = train_one(seed)
                if cache is not None:
                    buf = io.BytesIO()
                    np.save(buf, p, allow_pickle=False)
                    atomic_write_bytes(cache, buf.getvalue())
            preds.append(p)
            seed_mse[seed] = round(float(np.mean((p - truth) ** 2)), 5)
            print(f"  {cell} seed {seed}: MSE {seed_mse[seed]:.4f}", flush=True)
        pred = np.mean(preds, axis=0)
        aa = AverageActivity.fit(data, vocab).predict(data, bi, ai).numpy()
        if args.diagnose and model is not None:
            diag = _diagnose(model, fitted, vocab, test, truth)
        row = {
            "track": _name(test),
            "mse": float(np.mean((pred - truth) ** 2)),
            "pearson": _pearson(pred, truth),
            "aa_mse": float(np.mean((aa - truth) ** 2)),
            "aa_pearson": _pearson(aa, truth),
            "original_mse": ORIGINAL[cell] if assay == "H3K4me3" else None,
            "val_track": None if args.protocol == "fixed" else _name(val),
            "best_epoch": best,
            "batch_size": retrain_kw["batch_size"],
            "seeds": seed_mse,
            "val_curve": None
            if st is None
            else [round(h["val_mse"], 4) for h in st.history if h["val_mse"] is not None],
            "val_last": None if st is None else st.history[-1]["val_mse"],
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
        }
        if selection is not None:
            row["selection_val_mse"] = selection
            row["selection_val_tracks"] = [_name(v) for v in vals]
            row["selection_rule"] = args.select_rule
            row["biosample_shrinkage"] = model_kw["biosample_shrinkage"]
        if args.diagnose and model is not None:
            row["diagnosis"] = diag
            print(
                f"  {cell} diagnosis: the model's own average over the other cell types' factors "
                f"MSE {diag['model_aa_mse']:.4f} (Pearson {diag['model_aa_pearson']:.3f}); the "
                "test track imputed with another cell type's factor: "
                + ", ".join(f"{c} {v:.4f}" for c, v in diag["other_factor_mse"].items()),
                flush=True,
            )
        rows.append(row)
        orig = "" if row["original_mse"] is None else f", original {row['original_mse']:.3f}"
        epoch = "" if best is None else f"  best epoch {best}"  # None: every seed read back
        print(
            f"{row['track']}: MSE {row['mse']:.4f} (AA {row['aa_mse']:.4f}{orig})  "
            f"Pearson {row['pearson']:.3f} (AA {row['aa_pearson']:.3f}){epoch}  "
            f"{row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} CPU-s",
            flush=True,
        )
    mean = {
        k: float(np.mean([r[k] for r in rows])) for k in ("mse", "pearson", "aa_mse", "aa_pearson")
    }
    wins = sum(r["mse"] < r["aa_mse"] for r in rows)
    print(
        f"mean: MSE {mean['mse']:.4f} (AA {mean['aa_mse']:.4f})  Pearson {mean['pearson']:.3f} "
        f"(AA {mean['aa_pearson']:.3f});  beats AA on {wins}/{len(rows)} tracks"
    )
    return {
        "bench": "avocado_loo",
        "assay": assay,
        "protocol": args.protocol,
        "model": base_kw,
        "loop": loop_kw,
        "rows": rows,
        "mean": mean,
        "wins": wins,
        "loadavg": _loadavg(),
    }


Track = tuple[str, str]


def _name(track: Track) -> str:
    return f"{track[0]}.{track[1]}"


def _val_tracks(test: Track, rule: str) -> list[Track]:
    """Validation tracks for the held-out ``(cell, assay)``, each scored by a model trained
    without it and the test track. ``next``: the next cell type's track of the assay (session
    4); ``nested``: every other cell type's (nested leave-one-out over the assay);
    ``same-cell``: the held-out cell type's other four assays (does this biosample's own
    factor carry to an assay it has not seen?)."""
    cell, assay = test
    if rule == "next":
        return [(CELLS[(CELLS.index(cell) + 1) % len(CELLS)], assay)]
    if rule == "nested":
        return [(c, assay) for c in CELLS if c != cell]
    return [(cell, a) for a in ASSAYS if a != assay]


def _pairs(rule: str, assay: str) -> list[tuple[Track, Track]]:
    """Every (test, validation) pair a rule needs over the assay's five held-out tracks, once."""
    seen, out = set(), []
    for cell in CELLS:
        for v in _val_tracks((cell, assay), rule):
            key = frozenset([(cell, assay), v])
            if key not in seen:
                seen.add(key)
                out.append(((cell, assay), v))
    return out


def _pair_key(u: Track, v: Track, lam: float) -> str:
    a, b = sorted((_name(u), _name(v)))
    return f"{a}|{b}|{float(lam)}"


def _pair_scores(args, all_tracks, grid, model_kw, loop_kw, pairs, seed) -> dict:
    """The selection table: for each pair of tracks and each shrinkage weight, a model trained
    on the other 23 tracks' first ``--select-bins`` bins for the loop's epochs (last epoch
    kept) and its MSE on each of the two: ``{"E003.H3K4me3|E017.H3K4me3|10.0": {"E003.H3K4me3":
    mse, ...}}``. Neither track of a pair is seen in training, so the pair's score on one is a
    validation score when the other is the test track."""
    tracks = {k: v[: args.select_bins] for k, v in all_tracks.items()}
    vocab = _vocab(len(next(iter(tracks.values()))))
    loop = LoopParams(**{**loop_kw, "patience": None, "restore_best": False}, seed=seed)
    out = {}
    for u, v in pairs:
        data = _data(tracks, vocab, [k for k in tracks if k not in (u, v)], [u, v])
        for lam in grid:
            torch.manual_seed(seed)
            arch = AvocadoParams(**{**model_kw, "biosample_shrinkage": lam})
            model = Avocado.build(arch, vocab, data)
            st = fit(model, data, loop)
            mu, mv = st.history[-1]["val_mse_tracks"]
            out[_pair_key(u, v, lam)] = {
                _name(u): round(float(mu), 5),
                _name(v): round(float(mv), 5),
            }
            print(
                f"  selection {_name(u)} + {_name(v)} held out, shrinkage {lam}: "
                f"val MSE {mu:.4f} / {mv:.4f}",
                flush=True,
            )
    return out


def _diagnose(model: Avocado, data: ChromData, vocab: Vocabulary, test: Track, truth) -> dict:
    """Where the held-out track's error comes from (``loo --diagnose``).

    The model imputes the test assay with each *other* cell type's biosample factor: the mean
    of those four predictions is the model's own average activity (how much of the assay its
    genome factors and network carry), and each one scored against the held-out track shows
    which cell type's factor would have served it.
    """
    cell, assay = test
    ai = vocab.assay_index(assay)
    others = [c for c in CELLS if c != cell]
    preds = {c: model.predict(data, vocab.biosample_index(c), ai).numpy() for c in others}
    mean = np.mean([preds[c] for c in others], axis=0)
    return {
        "model_aa_mse": float(np.mean((mean - truth) ** 2)),
        "model_aa_pearson": _pearson(mean, truth),
        "other_factor_mse": {
            c: round(float(np.mean((p - truth) ** 2)), 4) for c, p in preds.items()
        },
    }


def _differs(table: dict, out: dict, keys: tuple[str, ...]) -> bool:
    """Whether a selection table was computed with other settings than ``out`` (on ``keys``)."""
    return any(table.get(k) != out[k] for k in keys)


def cmd_select(args: argparse.Namespace) -> dict:
    """The selection table for ``loo --selection``, computed in shards (``--shard i/n`` takes
    every n-th pair from the i-th) so that several processes share the models. With ``--out``
    the table is rewritten (atomically) after every pair, and pairs already in it are skipped,
    so a killed shard resumes and ``loo`` can read the rows finished so far."""
    i, n = (int(x) for x in args.shard.split("/"))
    if args.select_bins is None:
        args.select_bins = SELECT_BINS[args.rule]
    base_model, base_loop = CONFIGS[args.config]
    loop_kw = dict(base_loop)
    if args.epochs:
        loop_kw["epochs"] = args.epochs
    t0, c0 = time.perf_counter(), time.process_time()
    out = {
        "bench": "avocado_select",
        "shard": args.shard,
        "assay": args.assay,
        "rule": args.rule,
        "select_bins": args.select_bins,
        "grid": args.grid,
        "loop": loop_kw,
        "table": {},
    }
    if args.out and Path(args.out).is_file():
        prev = json.loads(Path(args.out).read_text())
        if _differs(prev, out, ("rule", "select_bins", "grid", "loop")):
            sys.exit(f"bench_avocado select: {args.out} holds another selection; remove it.")
        out["table"] = prev["table"]
    reused: dict = {}
    for path in args.reuse or []:
        other = json.loads(Path(path).read_text())
        if _differs(other, out, ("rule", "select_bins", "loop")):
            sys.exit(
                f"bench_avocado select: --reuse {path} was computed with another rule, "
                "selection bins or loop; its models are not this table's."
            )
        reused.update(other["table"])
    # pairs another table scored for every weight are left to it (loo reads both tables)
    todo = [
        (u, v)
        for u, v in _pairs(args.rule, args.assay)
        if not all(_pair_key(u, v, g) in reused for g in args.grid)
    ]
    tracks = _load()
    for u, v in todo[i::n]:
        if all(_pair_key(u, v, g) in out["table"] for g in args.grid):
            continue
        out["table"].update(
            _pair_scores(args, tracks, args.grid, base_model, loop_kw, [(u, v)], args.seed)
        )
        out |= {
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "loadavg": _loadavg(),
        }
        if args.out:
            atomic_write_text(Path(args.out), json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------------------------
# throughput
# ---------------------------------------------------------------------------------------------


def _synthetic(n_bins: int, n_tracks: int = 24) -> tuple[Vocabulary, ChromData]:
    """Random float16 tracks (values do not matter for speed), 5 biosamples × 5 assays."""
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(n_tracks, n_bins, generator=gen).to(torch.float16)
    recs = [(f"e{i}", f"b{i % 5}", f"a{i // 5}", "x") for i in range(n_tracks)]
    vocab = Vocabulary.from_records(recs, chrom="c", n_bins=n_bins)
    idx = torch.arange(n_tracks)
    return vocab, ChromData("c", 0, n_bins, n_bins, values, idx % 5, idx // 5)


def _timed_fit(model, data, steps, batch_size, timed=contextlib.nullcontext, **loop):
    """Warm-up epoch of one step, then ``steps`` steps timed (wall and process CPU) inside the
    context ``timed()`` (a profiler, say). Returns the figures and the loop state after."""
    params = LoopParams(
        epochs=1, batch_size=batch_size, max_batches_per_epoch=1, patience=None, **loop
    )
    state = fit(model, data, params)
    params = params.model_copy(update={"epochs": 2, "max_batches_per_epoch": steps})
    with timed():
        t0, c0 = time.perf_counter(), time.process_time()
        state = fit(model, data, params, start_state=state)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    figures = {
        "steps": steps,
        "batch_size": batch_size,
        "step_wall_s": wall / steps,
        "step_cpu_s": cpu / steps,
        "samples_per_s": steps * batch_size / wall,
        "samples_per_cpu_s": steps * batch_size / cpu,
    }
    return figures, state


def _pilot_model() -> tuple[Avocado, ChromData]:
    """The paper-size Avocado on all 25 pilot tracks (seeded)."""
    tracks = _load()
    vocab = _vocab()
    data = _data(tracks, vocab, list(tracks))
    torch.manual_seed(0)
    return Avocado.build(AvocadoParams(), vocab, data), data


def cmd_throughput(args: argparse.Namespace) -> dict:
    model, data = _pilot_model()
    if args.thread:  # as a Ray Train worker runs its training function
        import threading

        out: list = []
        t = threading.Thread(
            target=lambda: out.append(_timed_fit(model, data, args.steps, args.batch_size))
        )
        t.start()
        t.join()
        ((r, _),) = out
    else:
        r, _ = _timed_fit(model, data, args.steps, args.batch_size)
    print(
        f"paper sizes, batch {args.batch_size}, pilot ({PILOT_BINS:,} bins), "
        f"{torch.get_num_threads()} threads: {r['samples_per_s']:,.0f} samples/s wall "
        f"({r['step_wall_s']:.2f} s/step), {r['samples_per_cpu_s']:,.0f} samples per CPU-s; "
        f"load {_loadavg()}"
    )
    return {
        "bench": "avocado_throughput",
        **r,
        "threads": torch.get_num_threads(),
        "in_thread": args.thread,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "loadavg": _loadavg(),
    }


def cmd_malloc(args: argparse.Namespace) -> dict:
    """``throughput --thread`` in child processes with glibc's default malloc and with
    ``scaling.cpu_malloc: reuse``'s tunables, alternating, ``--repeats`` times each."""
    import subprocess

    from epiray.runtime import malloc_environ

    runs: dict[str, list[float]] = {"system": [], "reuse": []}
    for _ in range(args.repeats):
        for mode in runs:
            env = malloc_environ(mode, os.environ)
            cmd = [sys.executable, __file__, "throughput", "--thread"]
            cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode].append(r["samples_per_s"])
            print(f"{mode}: {r['samples_per_s']:,.0f} samples/s", flush=True)
    mean = {k: float(np.mean(v)) for k, v in runs.items()}
    ratio = mean["reuse"] / mean["system"]
    print(
        f"paper sizes, batch {args.batch_size:,}, in a thread: system malloc "
        f"{mean['system']:,.0f}, reuse {mean['reuse']:,.0f} samples/s (mean of "
        f"{args.repeats}) -> {ratio:.2f}x; load {_loadavg()}"
    )
    return {"bench": "avocado_malloc", "runs": runs, "mean": mean, "ratio": ratio}


def cmd_scale(args: argparse.Namespace) -> dict:
    out = {}
    for n in (PILOT_BINS, CHR1_BINS):
        vocab, data = _synthetic(n)
        torch.manual_seed(0)
        model = Avocado.build(AvocadoParams(n_nodes=args.n_nodes), vocab, data)
        r, _ = _timed_fit(model, data, args.steps, args.batch_size)
        out[str(n)] = r
        print(
            f"{n:>9,} bins, n_nodes {args.n_nodes}: {r['step_cpu_s']:.3f} CPU-s/step, "
            f"{r['step_wall_s']:.3f} s/step wall",
            flush=True,
        )
        del model, data
    ratio = out[str(CHR1_BINS)]["step_cpu_s"] / out[str(PILOT_BINS)]["step_cpu_s"]
    print(f"chr1 / pilot step time (CPU-s): {ratio:.3f}")
    return {
        "bench": "avocado_scale",
        "n_nodes": args.n_nodes,
        "runs": out,
        "ratio_cpu": ratio,
        "loadavg": _loadavg(),
    }


def cmd_sparse(args: argparse.Namespace) -> dict:
    """Optimiser step time on the three genome tables of the pilot, batch of random bins.

    ``raw``: gradients straight from ``nn.Embedding(sparse=True)`` (duplicate rows, unsorted);
    ``dedupe``: Avocado's training path (bins sorted, each table read once per distinct row,
    so the gradient's rows are sorted and unique and RowAdam skips the coalescing sort).
    """
    out = {}
    scales = ((1, 25), (10, 40), (200, 45))
    for style in ("raw", "dedupe"):
        for name, cls in (("row_adam", RowAdam), ("sparse_adam", torch.optim.SparseAdam)):
            gen = torch.Generator().manual_seed(0)
            tabs = [torch.nn.Embedding(-(-PILOT_BINS // k), d, sparse=True) for k, d in scales]
            opt = cls([t.weight for t in tabs])
            cpu = 0.0
            for step in range(args.steps + 1):
                bins = torch.randperm(PILOT_BINS, generator=gen)[: args.batch_size]
                if style == "dedupe":
                    bins = bins.sort().values
                loss = 0.0
                for t, (k, _) in zip(tabs, scales):
                    if style == "raw":
                        loss = loss + t(bins // k).sum()
                    else:
                        rows, inv = torch.unique_consecutive(bins // k, return_inverse=True)
                        loss = loss + t(rows).index_select(0, inv).sum()
                loss.backward()
                c0 = time.process_time()
                opt.step()
                if step:
                    cpu += time.process_time() - c0
                opt.zero_grad()
            out[f"{name}_{style}"] = cpu / args.steps
            print(
                f"{name:>11} {style:>6} gradients: {1e3 * cpu / args.steps:.1f} CPU-ms per step "
                f"(3 genome tables, batch {args.batch_size})",
                flush=True,
            )
    return {"bench": "avocado_sparse_optimizer", "cpu_s_per_step": out, "loadavg": _loadavg()}


def cmd_bf16(args: argparse.Namespace) -> dict:
    vocab, data = _synthetic(PILOT_BINS)
    out = {}
    for mode in ("off", "bf16"):
        torch.manual_seed(0)
        model = Avocado.build(AvocadoParams(n_nodes=args.n_nodes), vocab, data)
        r, _ = _timed_fit(model, data, args.steps, args.batch_size, autocast=mode)
        out[mode] = r
        print(
            f"autocast {mode}: {r['step_cpu_s']:.3f} CPU-s/step "
            f"({r['samples_per_cpu_s']:,.0f} samples per CPU-s)",
            flush=True,
        )
    return {"bench": "avocado_bf16", "n_nodes": args.n_nodes, "runs": out, "loadavg": _loadavg()}


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def _proc_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _compendium_vocab(n_bins: int) -> Vocabulary:
    """The cross-species compendium's axes: 1,145 mouse + 6,870 human tracks over ~1,500
    biosamples and ~800 assays (SCALE.md)."""
    recs = [
        (f"{sp}{i}", f"b{i % 1_500}", f"a{i % 800}", sp)
        for sp, n in (("mm", 1_145), ("hs", 6_870))
        for i in range(n)
    ]
    return Vocabulary.from_records(recs, chrom="chr1", n_bins=n_bins)


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def cmd_memory(args: argparse.Namespace) -> dict:
    """Estimated vs measured memory of one cross-species worker on a chr1-sized slab, then the
    estimate for the whole compendium's mouse chr1 by number of workers."""
    from epiray.models import SlabSize

    params = AvocadoParams(variant="cross_species")
    n, e, h, a = CHR1_BINS, args.mouse_tracks, args.human_tracks, args.aligned
    vocab = _compendium_vocab(n)
    torch.manual_seed(0)
    base = _proc_bytes("VmRSS")
    values = torch.empty(e, n, dtype=torch.float16)
    aux_values = torch.empty(h, a, dtype=torch.float16)
    for t in (values, aux_values):
        for row in t:
            row.copy_(torch.rand(t.shape[1]))
    aux_bin = torch.randint(n, (a,)).sort().values
    data = ChromData(
        "chr1",
        0,
        n,
        n,
        values,
        torch.arange(e) % 1_500,
        torch.arange(e) % 800,
        aux_values=aux_values,
        aux_bin=aux_bin,
        aux_biosample=torch.arange(h) % 1_500,
        aux_assay=torch.arange(h) % 800,
    )
    size = SlabSize.of(data)
    est = Avocado.memory_estimate(params, vocab, size, args.batch_size)
    loaded = _proc_bytes("VmRSS") - base
    model = Avocado.build(params, vocab, data)
    loop = LoopParams(epochs=1, batch_size=args.batch_size, max_batches_per_epoch=1)
    state = fit(model, data, loop)  # allocates the optimiser state
    persistent = _proc_bytes("VmRSS") - base
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    fit(
        model,
        data,
        loop.model_copy(update={"epochs": 2, "max_batches_per_epoch": args.steps}),
        start_state=state,
    )
    peak = _proc_bytes("VmHWM") - base
    want_persistent = est["total"] - est["working"]
    print(
        f"cross_species worker, {n:,} bins, {e} mouse + {h} human tracks on {a:,} alignment "
        f"rows, paper sizes, batch {args.batch_size:,}, {len(vocab.biosamples)} biosamples / "
        f"{len(vocab.assays)} assays:\n"
        f"  data     estimated {_gib(est['data'])} GiB, measured {_gib(loaded)} GiB\n"
        f"  + model and optimiser state: estimated {_gib(want_persistent)} GiB, measured "
        f"{_gib(persistent)} GiB (RSS after the first step)\n"
        f"  peak during {args.steps} steps: estimated {_gib(est['total'])} GiB, measured "
        f"{_gib(peak)} GiB (VmHWM)",
        flush=True,
    )
    table = []
    full = _compendium_vocab(n)
    for workers in (1, 2, 4, 8, 16):
        bins = -(-n // workers)
        sz = SlabSize(
            0, bins, 1_145, aux_tracks=6_870, aux_rows=-(-3_100_000 // workers), value_bytes=2
        )
        m = Avocado.memory_estimate(params, full, sz, 40_000)
        table.append({"workers": workers, **{k: round(v / 2**30, 2) for k, v in m.items()}})
    print("mouse chr1, all 1,145 mouse + 6,870 human tracks (float16), per worker, GiB:")
    for row in table:
        print("  " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return {
        "bench": "avocado_memory",
        "estimate": est,
        "measured": {"data": loaded, "persistent": persistent, "peak": peak},
        "compendium_chr1_gib": table,
        "loadavg": _loadavg(),
    }


def cmd_profile(args: argparse.Namespace) -> dict:
    """Where a training step's CPU time goes at paper sizes on the pilot (``torch.profiler``):
    the matrix multiplies' share and GFLOP/s against everything else."""
    from torch.profiler import ProfilerActivity, profile

    model, data = _pilot_model()
    prof = profile(activities=[ProfilerActivity.CPU])
    r, _ = _timed_fit(model, data, args.steps, args.batch_size, timed=lambda: prof)
    wall = r["step_wall_s"] * args.steps
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    mm = sum(e.self_cpu_time_total for e in ops if e.key in ("aten::mm", "aten::addmm")) / 1e6
    p = model.params
    width = sum(p.n_genome_factors)
    # forward + backward multiply-adds per example: first layer (genome part), hidden, output
    macs = width * p.n_nodes + (p.n_layers - 1) * p.n_nodes**2 + p.n_nodes
    flop = 6 * macs * args.batch_size * args.steps
    print(
        f"{args.steps} steps, batch {args.batch_size:,}, {torch.get_num_threads()} threads: "
        f"{wall:.1f} s wall, {total:.1f} s in operators (the profiler's self time on the "
        f"calling thread); matrix multiplies {mm:.1f} s ({100 * mm / total:.0f} %, "
        f"{flop / mm / 1e9:.0f} GFLOP/s with all threads)"
    )
    for e in ops[: args.top]:
        print(
            f"  {e.key:<48} {e.self_cpu_time_total / 1e6:7.3f} s "
            f"{100 * e.self_cpu_time_total / 1e6 / total:5.1f} %  x{e.count}"
        )
    return {
        "bench": "avocado_profile",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "op_cpu_s": total,
        "matmul_cpu_s": mm,
        "matmul_share": mm / total,
        "matmul_gflop_per_s": flop / mm / 1e9,
        "top": [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
            for e in ops[: args.top]
        ],
        "loadavg": _loadavg(),
    }


def cmd_checkpoint(args: argparse.Namespace) -> dict:
    """What a per-epoch checkpoint costs at mouse chr1 size: ``save_checkpoint`` and
    ``load_checkpoint`` of a paper-size model after training steps (genome factors with both
    Adam moments), with and without the best epoch's host copy, beside this machine's epoch
    time and an epoch at the GPU target of 10 M examples/s."""
    import shutil
    import tempfile

    from epiray.loop import load_checkpoint, save_checkpoint

    vocab, data = _synthetic(args.bins)
    torch.manual_seed(0)
    model = Avocado.build(AvocadoParams(), vocab, data)
    r, state = _timed_fit(model, data, args.steps, args.batch_size)
    epoch_s = args.bins / r["samples_per_s"]
    gpu_epoch_s = args.bins / 10e6
    rows = []
    d = Path(tempfile.mkdtemp(prefix="epiray-ckpt-", dir=args.dir))
    try:
        for best in (False, True):
            if best:  # as fit keeps it with early stopping: a host copy of every parameter
                state.best_state = host_copy(model)
            path = d / f"rank0{'_best' if best else ''}.pt"
            t0 = time.perf_counter()
            save_checkpoint(path, model, state)
            save_s = time.perf_counter() - t0
            size = path.stat().st_size
            t0 = time.perf_counter()
            load_checkpoint(path, data)
            load_s = time.perf_counter() - t0
            path.unlink()
            rows.append(
                {
                    "best_copy": best,
                    "bytes": size,
                    "bytes_per_bin": size / args.bins,
                    "save_s": save_s,
                    "save_gb_per_s": size / save_s / 1e9,
                    "load_s": load_s,
                    "save_over_cpu_epoch": save_s / epoch_s,
                    "save_over_gpu_target_epoch": save_s / gpu_epoch_s,
                }
            )
            print(
                f"{args.bins:,} bins, paper sizes, {'with' if best else 'without'} the best "
                f"epoch's copy: {size / 1e9:.2f} GB ({size / args.bins:.0f} B per bin), "
                f"save {save_s:.1f} s ({size / save_s / 1e9:.2f} GB/s, fsynced), load "
                f"{load_s:.1f} s; an epoch here {epoch_s:,.0f} s "
                f"({r['samples_per_s']:,.0f} examples/s), at 10 M examples/s {gpu_epoch_s:.2f} s "
                f"-> save / epoch {save_s / epoch_s:.4f} here, {save_s / gpu_epoch_s:.1f} there",
                flush=True,
            )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {
        "bench": "avocado_checkpoint",
        "bins": args.bins,
        "train": r,
        "epoch_s": epoch_s,
        "gpu_target_epoch_s": gpu_epoch_s,
        "checkpoints": rows,
        "loadavg": _loadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("loo", help="leave-one-out imputation of an assay on the Roadmap pilot")
    p.add_argument("--assay", choices=ASSAYS, default="H3K4me3", help="the held-out assay")
    p.add_argument("--cells", nargs="+", default=CELLS, choices=CELLS)
    p.add_argument("--config", choices=sorted(CONFIGS), default="cosine")
    p.add_argument("--protocol", choices=["fixed", "refit", "holdout"], default="fixed")
    p.add_argument("--bins", type=int, default=None, help="only the first BINS bins")
    p.add_argument(
        "--select-shrinkage",
        nargs="+",
        type=float,
        default=None,
        help="per held-out track, choose biosample_shrinkage among these by the validation "
        "track's MSE on the first --select-bins bins, then train with it (one value: use it; "
        f"default {SHRINKAGE_GRID} with --config cosine)",
    )
    p.add_argument(
        "--select-bins",
        type=int,
        default=None,
        help="bins of the selection models (default: the --selection tables', else the "
        f"rule's: {SELECT_BINS})",
    )
    p.add_argument(
        "--select-rule",
        choices=SELECT_RULES,
        default="same-cell",
        help="validation tracks for the choice, their MSEs averaged: the held-out cell type's "
        "other four assays (same-cell), every other cell type's track of the assay (nested, "
        "session 5), or only the next cell type's (next, session 4)",
    )
    p.add_argument(
        "--selection",
        nargs="+",
        default=None,
        help="selection tables written by the select subcommand (pairs missing from them "
        "are trained here)",
    )
    p.add_argument(
        "--retrain-batch",
        choices=["matched", "config"],
        default="matched",
        help="--protocol fixed: batches of the 24-track retrain scaled by bins / --select-bins, "
        "so it takes as many optimiser steps per epoch as the selection models did (matched), "
        "or the config's batch size (config; sessions 4 and 5)",
    )
    p.add_argument("--model", default="{}", help="JSON overrides of AvocadoParams")
    p.add_argument("--loop", default="{}", help="JSON overrides of LoopParams")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1],
        help="one model per seed, their imputations averaged (selection models use the first)",
    )
    p.add_argument(
        "--pred-dir",
        default=None,
        help="keep each seed's imputation here and reuse it (processes can share the seeds)",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="also impute with the other cell types' factors (the model's own average activity)",
    )
    p = sub.add_parser("select", help="the shrinkage selection table for loo, in shards")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th pair from the i-th")
    p.add_argument("--assay", choices=ASSAYS, default="H3K4me3", help="the held-out assay")
    p.add_argument("--rule", choices=SELECT_RULES, default="same-cell")
    p.add_argument("--grid", nargs="+", type=float, default=SHRINKAGE_GRID)
    p.add_argument("--select-bins", type=int, default=None, help=f"default {SELECT_BINS}")
    p.add_argument("--config", choices=sorted(CONFIGS), default="cosine")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table here (atomically)")
    p.add_argument(
        "--reuse",
        nargs="+",
        default=None,
        help="selection tables (same rule, bins and loop) whose pairs are not trained again",
    )
    p = sub.add_parser("throughput", help="samples/s at paper sizes on the pilot")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=40_000)
    p.add_argument("--thread", action="store_true", help="train in a thread (as Ray Train)")
    p = sub.add_parser("malloc", help="throughput with glibc's default malloc vs cpu_malloc")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=40_000)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("scale", help="step time at chr1 size vs pilot size")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=40_000)
    p.add_argument("--n-nodes", type=int, default=2048)
    p = sub.add_parser("sparse", help="RowAdam vs SparseAdam")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=40_000)
    p = sub.add_parser("bf16", help="float32 vs bf16 autocast on CPU")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2_000)
    p.add_argument("--n-nodes", type=int, default=2048)
    p = sub.add_parser("memory", help="estimated vs measured memory of a chr1-sized worker")
    p.add_argument("--mouse-tracks", type=int, default=100)
    p.add_argument("--human-tracks", type=int, default=200)
    p.add_argument("--aligned", type=int, default=3_100_000, help="alignment rows (~40%%)")
    p.add_argument("--batch-size", type=int, default=40_000)
    p.add_argument("--steps", type=int, default=2)
    p = sub.add_parser("profile", help="where a step's CPU time goes (torch.profiler)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=40_000)
    p.add_argument("--top", type=int, default=12)
    p = sub.add_parser("checkpoint", help="checkpoint size and write time at chr1 size")
    p.add_argument("--bins", type=int, default=CHR1_BINS)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=40_000)
    p.add_argument("--dir", help="where to write (default: the temp directory)")
    args = ap.parse_args()
    fn = {
        "loo": cmd_loo,
        "select": cmd_select,
        "throughput": cmd_throughput,
        "scale": cmd_scale,
        "sparse": cmd_sparse,
        "bf16": cmd_bf16,
        "memory": cmd_memory,
        "checkpoint": cmd_checkpoint,
        "profile": cmd_profile,
        "malloc": cmd_malloc,
    }
    print(json.dumps(fn[args.cmd](args)))


if __name__ == "__main__":
    main()
