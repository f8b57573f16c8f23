"""What the genome factors are worth downstream (issue 19, item 3).

The Avocado paper's claim: the genome factors, learned to impute tracks, make better features
for other tasks than the observed tracks they were learned from. This benchmark puts the same
simple classifier on both feature sets of the same bins:

``(a) factors``   the bin's genome factors at all three scales, concatenated: its 25 bp row,
                  the 250 bp row and the 5 kb row holding it (25 + 40 + 45 at the shipped
                  defaults), read from ``epiray export``'s Parquet files;
``(b) tracks``    the observed tracks' values at the bin (arcsinh, from the store): every
                  training track of the chromosome;
``(a)+(b)``       both;
``(b) + context`` the tracks at the bin plus their means over the same 250 bp and 5 kb rows:
                  the wider view the factors' coarse scales have, taken from the tracks.

The classifier is multinomial logistic regression (torch, L-BFGS, a small L2 penalty), features
standardised on the training folds, cross-validated over contiguous genomic blocks of 200 bins
(5 kb, aligned to the 5 kb rows, so no factor row is shared by a training and a test bin),
assigned to 5 folds at random; chromosomes are separate models (factor *k* of chr1 and of chr2
are unrelated), so each is classified on its own and the out-of-fold predictions are pooled.

Two tasks:

``synthetic``  a generated compendium (``epiray synth --preset default``: mouse 1.5 Mb in 3
               chromosomes, 12 biosamples, 44 mouse tracks), ingested, Avocado ``mouse_only``
               trained on every mouse track with ``configs/train_avocado.yaml`` as shipped
               (only the paths, assembly and chromosomes changed), exported; the label of a
               bin is the hidden chromatin state the generator drew its tracks from
               (``truth/<asm>/<chrom>.states.npy``, 7 states). Accuracy, macro-F1 and per-state
               F1, beside the majority class.
``pilot``      the Roadmap pilot (25 tracks, coordinate-free; by default its first 300,000
               bins, ``--pilot-bins 1126469`` for all): one track (default E065 H3K4me3, the
               original Avocado demo's) is left out; Avocado is trained on the other 24 with
               the same shipped config (ingested as one 'chromosome'); the label
               is whether a bin is in the held-out track's top 1 %. (a) the factors vs (b) the
               24 tracks at the bin; AUPRC, AUROC and F1 at the top 1 % of scores (predicting as
               many positives as there are: precision = recall = F1), beside average activity
               (the mean of the other cell types' tracks of the assay) used as a score.

Everything is resumable under ``--work``: the compendium, stores, trained runs and exports are
reused when present (a run that did not finish resumes; runs trained with another config,
e.g. after ``configs/train_avocado.yaml`` changed, are removed and trained again), so a second
run with another ``--l2`` only classifies again. Results land in ``--work``
(``results.seed<S>.l2_<L>.json``, ``summary.seed<S>.l2_<L>.md``; tasks of earlier runs with
the same seed and L2 are kept beside the new ones) and in MLflow (``--work``/mlflow.db,
experiment ``factors-downstream``, one run per invocation).

    .venv/bin/python benchmarks/bench_factors_downstream.py
    .venv/bin/python benchmarks/bench_factors_downstream.py --skip-pilot
    .venv/bin/python benchmarks/bench_factors_downstream.py --skip-pilot --l2 0.01
    .venv/bin/python benchmarks/bench_factors_downstream.py --pilot-bins 1126469
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work" / "factors_downstream"
PILOT = ROOT.parent / "shared" / "data" / "roadmap-pilot"
PILOT_CELLS = ["E003", "E017", "E065", "E116", "E117"]
PILOT_ASSAYS = ["H3K4me3", "H3K27me3", "H3K36me3", "H3K9me3", "H3K4me1"]
PILOT_ASM, PILOT_CHROM = "roadmapPilot", "pilot"
MOUSE = "mmSyn1"
BLOCK_BINS = 200
N_FOLDS = 5
L2 = 1e-3
TOP = 0.01


# ----------------------------------------------------------------------------- pure functions
def block_folds(n: int, k: int = N_FOLDS, block: int = BLOCK_BINS, seed: int = 0) -> np.ndarray:
    """int64 [n]: the fold of every bin. Bins fall in blocks ``[j*block, (j+1)*block)``; the
    blocks are shuffled (``seed``) and dealt to the ``k`` folds in turn, so folds differ in size
    by at most one block."""
    n_blocks = -(-n // block)
    order = np.random.default_rng(seed).permutation(n_blocks)
    fold_of_block = np.empty(n_blocks, dtype=np.int64)
    fold_of_block[order] = np.arange(n_blocks) % k
    return fold_of_block[np.arange(n) // block]


def row_means(x: np.ndarray, k: int) -> np.ndarray:
    """``[E, n]`` -> ``[E, n]``: each bin's value replaced by the mean over its row of ``k``
    bins (rows ``[r*k, (r+1)*k)``, the last one clipped at ``n``), as a genome-factor row of
    ``k`` bins covers."""
    n = x.shape[1]
    starts = np.arange(0, n, k)
    sums = np.add.reduceat(x.astype(np.float64), starts, axis=1)
    counts = np.minimum(starts + k, n) - starts
    return (sums / counts).astype(np.float32)[:, np.arange(n) // k]


def multiscale(tables: list[np.ndarray], bins_per_row: list[int], n: int) -> np.ndarray:
    """``[n, sum K]``: bin ``i``'s rows ``i // k`` of every scale's factor table, side by side."""
    idx = np.arange(n)
    return np.concatenate([t[idx // k] for t, k in zip(tables, bins_per_row)], axis=1)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = L2, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression: mean cross-entropy + ``l2/2 · ||W||²`` on standardised
    features, minimised by L-BFGS. Returns ``(W [F, C], b [C], mean [F], sd [F])``."""
    import torch

    mean = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    xt = torch.from_numpy(((x - mean) / sd).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    prior = np.log(np.maximum(counts, 0.5) / counts.sum())
    b = torch.tensor(prior, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy(), mean, sd


def predict_proba(model, x: np.ndarray) -> np.ndarray:
    """``[n, C]`` class probabilities of :func:`fit_logistic`'s model."""
    w, b, mean, sd = model
    z = ((x - mean) / sd).astype(np.float32) @ w + b
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def cross_val_proba(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, n_classes: int, l2: float = L2
) -> np.ndarray:
    """Out-of-fold ``[n, C]`` probabilities: each fold predicted by a model fitted (and
    standardised) on the others."""
    out = np.zeros((len(y), n_classes), dtype=np.float32)
    for f in np.unique(folds):
        test = folds == f
        model = fit_logistic(x[~test], y[~test], n_classes, l2)
        out[test] = predict_proba(model, x[test])
    return out


def majority_pred(y: np.ndarray, folds: np.ndarray, n_classes: int) -> np.ndarray:
    """Out-of-fold predictions of the majority class of the training folds."""
    out = np.empty_like(y)
    for f in np.unique(folds):
        test = folds == f
        out[test] = np.argmax(np.bincount(y[~test], minlength=n_classes))
    return out


def f1_per_class(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """float [C]: F1 of every class (NaN for a class neither true nor predicted anywhere)."""
    f1 = np.full(n_classes, np.nan)
    for c in range(n_classes):
        tp = int(np.sum((pred == c) & (y == c)))
        fp = int(np.sum((pred == c) & (y != c)))
        fn = int(np.sum((pred != c) & (y == c)))
        if tp + fp + fn:
            f1[c] = 2 * tp / (2 * tp + fp + fn)
    return f1


def classification_scores(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro-F1 (over the classes present in ``y`` or ``pred``) and per-class F1."""
    f1 = f1_per_class(y, pred, n_classes)
    return {
        "accuracy": float(np.mean(pred == y)),
        "macro_f1": float(np.nanmean(f1)),
        "f1": [None if np.isnan(v) else float(v) for v in f1],
    }


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """AUPRC as average precision: the mean over positives of the precision at their rank
    (scores sorted descending, ties broken by position)."""
    order = np.argsort(-score, kind="stable")
    hit = y[order].astype(bool)
    if not hit.any():
        return float("nan")
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    return float(precision[hit].mean())


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties averaged)."""
    from scipy.stats import rankdata

    y = y.astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def top_labels(values: np.ndarray, fraction: float = TOP) -> np.ndarray:
    """int8 [n]: 1 for the ``ceil(fraction · n)`` highest bins (ties by position), else 0."""
    k = int(np.ceil(fraction * len(values)))
    y = np.zeros(len(values), dtype=np.int8)
    y[np.argsort(-values, kind="stable")[:k]] = 1
    return y


def ranking_scores(y: np.ndarray, score: np.ndarray) -> dict:
    """AUPRC, AUROC and F1 when the top ``sum(y)`` scores are called positive."""
    k = int(y.sum())
    called = np.zeros(len(y), dtype=bool)
    called[np.argsort(-score, kind="stable")[:k]] = True
    tp = int(np.sum(called & (y == 1)))
    return {
        "auprc": average_precision(y, score),
        "auroc": auroc(y, score),
        "f1_top": 2 * tp / (called.sum() + k) if k else float("nan"),
    }


# ----------------------------------------------------------------------------- pipeline helpers
def _say(msg: str) -> None:
    print(msg, flush=True)


def _load() -> list[float]:
    import os

    return [round(x, 1) for x in os.getloadavg()]


def _machine() -> str:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, load average {_load()}"


def _train_config(store: Path, out: Path, assembly: str, experiment: str, seed: int):
    """``configs/train_avocado.yaml`` as shipped, with only the data-dependent keys changed."""
    from epiray.config import load_yaml, parse_config
    from epiray.train import TrainConfig

    path = ROOT / "configs" / "train_avocado.yaml"
    raw = copy.deepcopy(load_yaml(path))
    raw.update(store=str(store), out=str(out / "runs"), assembly=assembly, chroms="all")
    raw["tracking"] = {
        **(raw.get("tracking") or {}),
        "tracking_uri": f"sqlite:///{(out / 'mlflow.db').resolve()}",
        "experiment": experiment,
    }
    if seed:
        raw.setdefault("train", {})["seed"] = seed
    return parse_config(TrainConfig, raw, path, base=path.parent), raw


def _train_and_export(store: Path, out: Path, assembly: str, experiment: str, seed: int) -> dict:
    """Train (or resume, or reuse) every chromosome and export the genome factors to Parquet.
    Returns what was done and how long it took (kept in ``out/train.json``)."""
    from epiray.export import export
    from epiray.train import plan_runs, train

    rec_path = out / "train.json"
    rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    cfg, raw = _train_config(store, out, assembly, experiment, seed)
    _, specs = plan_runs(cfg)
    done = all(sorted(Path(s.out_dir).glob("epoch*_final")) for s in specs)
    changed = rec.get("config") not in (None, raw)
    if changed and (out / "runs").exists():  # another config trained these: start afresh
        _say(f"  the training config changed: removing {out / 'runs'}")
        shutil.rmtree(out / "runs")
    if changed or not done or not rec:
        _say(f"  training Avocado on {len(specs)} chromosome(s) of {assembly} (shipped config)")
        t0 = time.perf_counter()
        results = train(cfg)
        rec = {
            "config": raw,
            "train_s": round(time.perf_counter() - t0, 1),
            "runs": {
                r.spec.chrom: {
                    "run": r.spec.out_dir,
                    "train_tracks": len(r.spec.train),
                    "epochs": int(r.history["epoch"].max()) if len(r.history) else 0,
                    "best_val_mse": float(r.history["val_mse"].min())
                    if "val_mse" in r.history and r.history["val_mse"].notna().any()
                    else None,
                }
                for r in results
            },
        }
        rec_path.write_text(json.dumps(rec, indent=1))
        if (out / "export").exists():
            shutil.rmtree(out / "export")
    else:
        _say(f"  reusing the trained runs under {out / 'runs'}")
    if not (out / "export" / "export.json").is_file():
        t0 = time.perf_counter()
        name = Path(specs[0].out_dir).name.replace(f".{specs[0].chrom}.", ".{chrom}.")
        export(str(Path(specs[0].out_dir).parent / name), out / "export", formats="parquet")
        rec["export_s"] = round(time.perf_counter() - t0, 1)
        rec_path.write_text(json.dumps(rec, indent=1))
    return rec


def _factors(export_dir: Path, chrom: str, n: int) -> tuple[np.ndarray, list[int]]:
    """``[n, sum K]`` multi-scale factor features of every bin of ``chrom``, and the scales'
    bins per row."""
    import pyarrow.parquet as pq

    info = json.loads((export_dir / "export.json").read_text())
    paths = [
        export_dir / f["path"]
        for f in info["files"]
        if f["kind"] == "genome_parquet" and f["chrom"] == chrom
    ]
    metas = [json.loads(pq.read_schema(p).metadata[b"epiray.export"]) for p in paths]
    tables, ks = [], []
    for path, meta in sorted(zip(paths, metas), key=lambda pm: pm[1]["bins_per_row"]):
        t = pq.read_table(path)
        cols = [c for c in t.column_names if c.startswith("f") and c[1:].isdigit()]
        vals = np.column_stack([t[c].to_numpy() for c in cols]).astype(np.float32)
        k = int(meta["bins_per_row"])
        rows = t["start"].to_numpy() // (k * int(meta["bin_size"]))
        full = np.zeros((-(-n // k), vals.shape[1]), np.float32)
        full[rows] = vals
        tables.append(full)
        ks.append(k)
    return multiscale(tables, ks, n), ks


def _classify_sets(
    sets: dict, y_parts: list, folds_parts: list, n_classes: int, l2: float
) -> dict:
    """Out-of-fold probabilities of every feature set, chromosome by chromosome, pooled."""
    out = {}
    for name, parts in sets.items():
        t0 = time.perf_counter()
        pooled = [
            cross_val_proba(x, y, f, n_classes, l2) for x, y, f in zip(parts, y_parts, folds_parts)
        ]
        out[name] = (np.concatenate(pooled), time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- synthetic
def run_synthetic(work: Path, seed: int, l2: float = L2) -> dict:
    """Hidden chromatin states of a generated compendium's mouse bins."""
    from epiray import synthetic
    from epiray.ingest import IngestConfig, ingest
    from epiray.runtime import ensure_ray
    from epiray.store import Store

    base = work / f"synthetic_seed{seed}"
    data = base / "data"
    params = synthetic.SynthParams.preset("default")
    info = data / "synth.json"
    t0 = time.perf_counter()
    fresh = not (
        info.is_file()
        and json.loads(info.read_text()).get("params") == params.model_dump(mode="json")
        and json.loads(info.read_text()).get("seed") == seed
        and (data / "truth" / MOUSE / "chr1.states.npy").is_file()
    )
    if fresh:
        _say(f"synthetic: generating the default compendium (seed {seed})")
        synthetic.generate(data, seed=seed, params=params, overwrite=True)
    ensure_ray(None)
    store = ingest(
        IngestConfig(manifest=str(data / "manifest.tsv"), store=str(base / "store"), chroms="all"),
        resume=not fresh,
        overwrite=fresh,
    )
    prep_s = time.perf_counter() - t0
    rec = _train_and_export(store.root, base, MOUSE, "factors-downstream-synthetic", seed)

    st = Store.open(store.root)
    exps = st.experiments(assembly=MOUSE)["experiment"].tolist()
    index = synthetic.read_truth_index(data)
    n_classes = len(synthetic.STATES)
    sets: dict[str, list] = {k: [] for k in ("factors", "tracks", "factors+tracks")}
    sets["tracks+context"] = []
    ys, folds = [], []
    chroms = list(st.chrom_sizes(MOUSE))
    for i, chrom in enumerate(chroms):
        n = st.n_bins(MOUSE, chrom)
        y = synthetic.read_states(data, "mouse", chrom, truth_index=index).astype(np.int64)
        fac, ks = _factors(base / "export", chrom, n)
        tr = st.read(MOUSE, chrom, exps)
        ctx = [row_means(tr, k) for k in ks[1:]]
        sets["factors"].append(fac)
        sets["tracks"].append(tr.T.copy())
        sets["factors+tracks"].append(np.concatenate([fac, tr.T], axis=1))
        sets["tracks+context"].append(np.concatenate([tr, *ctx], axis=0).T.copy())
        ys.append(y)
        folds.append(block_folds(n, seed=seed + i))
    t0 = time.perf_counter()
    probs = _classify_sets(sets, ys, folds, n_classes, l2)
    y_all = np.concatenate(ys)
    rows = {}
    maj = np.concatenate([majority_pred(y, f, n_classes) for y, f in zip(ys, folds)])
    rows["majority class"] = {**classification_scores(y_all, maj, n_classes), "features": 0}
    for name, (p, secs) in probs.items():
        rows[name] = {
            **classification_scores(y_all, p.argmax(1), n_classes),
            "features": int(sets[name][0].shape[1]),
            "seconds": round(secs, 1),
        }
    counts = np.bincount(y_all, minlength=n_classes)
    return {
        "task": "synthetic",
        "seed": seed,
        "bins": int(len(y_all)),
        "chroms": chroms,
        "tracks": len(exps),
        "states": list(synthetic.STATES),
        "class_share": (counts / counts.sum()).round(4).tolist(),
        "rows": rows,
        "prepare_s": round(prep_s, 1),
        "train": {k: v for k, v in rec.items() if k != "config"},
        "classify_s": round(time.perf_counter() - t0, 1),
    }


# ----------------------------------------------------------------------------- pilot
def run_pilot(
    work: Path, seed: int, n_bins: int | None, target: tuple[str, str], l2: float = L2
) -> dict:
    """Top 1 % bins of a held-out Roadmap pilot track."""
    from epiray.ingest import AssemblySpec, IngestConfig, ingest
    from epiray.runtime import ensure_ray
    from epiray.store import Store

    if not PILOT.is_dir():
        sys.exit(f"bench_factors_downstream: {PILOT} not found (the shared roadmap-pilot data).")
    full = int(np.load(PILOT / f"{target[0]}.{target[1]}.pilot.arcsinh.npz")["arr_0"].shape[0])
    n = min(n_bins or full, full)
    base = work / f"pilot_{target[0]}.{target[1]}_{n}bins_seed{seed}"
    tracks_dir = base / "tracks"
    t0 = time.perf_counter()
    train_keys = [(c, a) for c in PILOT_CELLS for a in PILOT_ASSAYS if (c, a) != target]
    manifest = base / "manifest.tsv"
    if not manifest.is_file():
        tracks_dir.mkdir(parents=True, exist_ok=True)
        lines = ["experiment\tspecies\tassembly\tbiosample\tassay\tcategory\tpath\ttransform"]
        for c, a in train_keys:
            arr = np.load(PILOT / f"{c}.{a}.pilot.arcsinh.npz")["arr_0"][:n].astype(np.float32)
            np.save(tracks_dir / f"{c}.{a}.npy", arr)
            lines.append(
                f"{c}.{a}\thuman\t{PILOT_ASM}\t{c}\t{a}\thistone_modification\t"
                f"tracks/{c}.{a}.npy\tnone"
            )
        manifest.write_text("\n".join(lines) + "\n")
    ensure_ray(None)
    store_dir = base / "store"
    store = ingest(
        IngestConfig(
            manifest=str(manifest),
            store=str(store_dir),
            chroms="all",
            assemblies={
                PILOT_ASM: AssemblySpec(species="human", chrom_sizes={PILOT_CHROM: n * 25})
            },
        ),
        resume=(store_dir / "store.json").is_file(),
    )
    prep_s = time.perf_counter() - t0
    rec = _train_and_export(store.root, base, PILOT_ASM, "factors-downstream-pilot", seed)

    st = Store.open(store.root)
    exps = [f"{c}.{a}" for c, a in train_keys]
    tr = st.read(PILOT_ASM, PILOT_CHROM, exps)
    truth = np.load(PILOT / f"{target[0]}.{target[1]}.pilot.arcsinh.npz")["arr_0"][:n]
    y = top_labels(truth).astype(np.int64)
    fac, ks = _factors(base / "export", PILOT_CHROM, n)
    ctx = [row_means(tr, k) for k in ks[1:]]
    sets = {
        "factors": [fac],
        "tracks": [tr.T.copy()],
        "factors+tracks": [np.concatenate([fac, tr.T], axis=1)],
        "tracks+context": [np.concatenate([tr, *ctx], axis=0).T.copy()],
    }
    del ctx
    folds = block_folds(n, seed=seed)
    t0 = time.perf_counter()
    probs = _classify_sets(sets, [y], [folds], 2, l2)
    same_assay = [exps.index(f"{c}.{target[1]}") for c in PILOT_CELLS if c != target[0]]
    aa = tr[same_assay].mean(0)
    rows = {
        "average activity (score)": {**ranking_scores(y, aa), "features": 0},
    }
    for name, (p, secs) in probs.items():
        rows[name] = {
            **ranking_scores(y, p[:, 1]),
            "features": int(sets[name][0].shape[1]),
            "seconds": round(secs, 1),
        }
    return {
        "task": "pilot",
        "seed": seed,
        "target": f"{target[0]}.{target[1]}",
        "bins": n,
        "of_bins": full,
        "positives": int(y.sum()),
        "tracks": len(exps),
        "rows": rows,
        "prepare_s": round(prep_s, 1),
        "train": {k: v for k, v in rec.items() if k != "config"},
        "classify_s": round(time.perf_counter() - t0, 1),
    }


# ----------------------------------------------------------------------------- report
def report(results: dict) -> str:
    """Markdown: the synthetic table, one table per pilot setting, the wall times."""
    out = []
    syn = results.get("synthetic")
    if syn:
        states = syn["states"]
        out.append(
            f"### Hidden chromatin states, synthetic compendium (seed {syn['seed']}): "
            f"{syn['bins']:,} mouse bins, {len(syn['chroms'])} chromosomes, "
            f"{syn['tracks']} tracks, L2 {syn['l2']:g}\n"
        )
        out.append(
            "Class shares: "
            + ", ".join(f"{s} {v:.1%}" for s, v in zip(states, syn["class_share"]))
            + "\n"
        )
        out.append(
            "| features | n | accuracy | macro-F1 | " + " | ".join(states) + " |\n"
            "|---|---|---|---|" + "---|" * len(states)
        )
        for name, r in syn["rows"].items():
            f1 = " | ".join("–" if v is None else f"{v:.3f}" for v in r["f1"])
            out.append(
                f"| {name} | {r['features']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {f1} |"
            )
    for pil in results.values():
        if pil["task"] != "pilot":
            continue
        out.append(
            f"\n### Roadmap pilot: top 1 % bins of held-out {pil['target']} "
            f"({pil['bins']:,} of {pil['of_bins']:,} bins, {pil['positives']:,} positives, "
            f"{pil['tracks']} training tracks), L2 {pil['l2']:g}\n"
        )
        out.append("| features | n | AUPRC | AUROC | F1 at top 1 % |\n|---|---|---|---|---|")
        for name, r in pil["rows"].items():
            out.append(
                f"| {name} | {r['features']} | {r['auprc']:.3f} | {r['auroc']:.3f} | "
                f"{r['f1_top']:.3f} |"
            )
    out.append("")
    for key, r in results.items():
        tr = r["train"]
        runs = ", ".join(f"{c}: {v['epochs']} epochs" for c, v in (tr.get("runs") or {}).items())
        out.append(
            f"{key}: prepare {r['prepare_s']:.0f} s, train {tr.get('train_s', 0):.0f} s "
            f"({runs}), export {tr.get('export_s', 0):.0f} s, classify {r['classify_s']:.0f} s"
            f" ({r.get('machine', '')})"
        )
    return "\n".join(out)


def log_results(results: dict, work: Path, tag: str) -> None:
    """One MLflow run with every figure as a metric and the tables as artifacts."""
    from epiray.tracking import TrackingConfig, start_run

    cfg = TrackingConfig(
        tracking_uri=f"sqlite:///{(work / 'mlflow.db').resolve()}", experiment="factors-downstream"
    )
    with start_run(cfg, name=f"factors-downstream-{tag}", base_dir=str(work)) as run:
        metrics = {}
        for task, res in results.items():
            for name, r in res["rows"].items():
                key = f"{task}/{name.replace(' ', '_').replace('(', '').replace(')', '')}"
                for m, v in r.items():
                    if isinstance(v, float) and np.isfinite(v):
                        metrics[f"{key}/{m}"] = v
                for state, v in zip(res.get("states", []), r.get("f1") or []):
                    if v is not None:
                        metrics[f"{key}/f1_{state}"] = v
        keep = ("seed", "l2", "bins", "tracks")
        run.log_params({task: {k: res[k] for k in keep} for task, res in results.items()})
        run.log_metrics(metrics)
        run.log_text(report(results), "summary.md")
        run.log_text(json.dumps(results, indent=1), "results.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--seed", type=int, default=0, help="compendium, training and fold seed")
    ap.add_argument("--skip-pilot", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument(
        "--pilot-bins", type=int, default=300_000, help="first bins of the pilot (all: 1126469)"
    )
    ap.add_argument("--pilot-target", default="E065.H3K4me3", help="held-out track cell.assay")
    ap.add_argument("--l2", type=float, default=L2, help="the classifier's L2 penalty")
    args = ap.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(2)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    t0 = time.perf_counter()
    if not args.skip_synthetic:
        results["synthetic"] = run_synthetic(work, args.seed, args.l2)
    if not args.skip_pilot:
        cell, assay = args.pilot_target.split(".", 1)
        res = run_pilot(work, args.seed, args.pilot_bins, (cell, assay), args.l2)
        results[f"pilot_{res['target']}_{res['bins']}bins"] = res
    if not results:
        _say("nothing to do")
        return
    for r in results.values():
        r.update(l2=args.l2, machine=_machine())
    tag = f"seed{args.seed}.l2_{args.l2:g}"
    path = work / f"results.{tag}.json"
    if path.is_file():  # the tasks of earlier runs with this seed and L2, updated
        results = {**json.loads(path.read_text()), **results}
    text = report(results)
    _say(text)
    _say(f"\ntotal {time.perf_counter() - t0:.0f} s wall, load average {_load()}")
    path.write_text(json.dumps(results, indent=1))
    (work / f"summary.{tag}.md").write_text(text + "\n")
    log_results(results, work, tag)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
