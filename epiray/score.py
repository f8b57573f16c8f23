"""The ``evaluate`` job: score trained runs on their held-out experiments.

For every (model, chromosome, fold) run it rebuilds the trained model from its final
checkpoint, imputes the run's held-out experiments, and scores them — with the full metric set
(region MSEs when annotation BED files are given, MSEVar weighted by the per-bin variance of the
assay across the store's biosamples) — beside the fold's average activity baseline. Then it
writes the papers' tables (overall and per category, paired t-tests, per-assay improvement over
average activity, DNase-peak consistency of protein-binding imputations), plots, and logs
everything to one MLflow run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from epiray.config import Section
from epiray.errors import ConfigError
from epiray.store import Store, atomic_write_text
from epiray.tracking import TrackingConfig

log = logging.getLogger(__name__)


class Annotations(Section):
    """BED files of the region metrics (ENCODE Imputation Challenge; see
    ``../shared/data/annotations/hg38/``). Coordinates must be the target assembly's."""

    genes: str | None = None
    enhancers: str | None = None
    blacklist: str | None = None


class EvaluateConfig(Section):
    """The ``evaluate`` job.

    ``runs`` maps a model label to its run directory pattern with ``{chrom}`` and ``{fold}``
    placeholders, e.g. ``runs/avocado_cross_species.{chrom}.{fold}`` (``epiray train`` names
    runs ``{label}.{chrom}.{fold}`` under its ``out``).
    """

    store: str
    out: str
    runs: dict[str, str]
    chroms: list[str]
    folds: list[str] = ["fold0"]
    annotations: Annotations = Annotations()
    var_weights: bool = True
    dnase_assay: str = "DNase"
    tracking: TrackingConfig = TrackingConfig(experiment="epiray-evaluate")


def evaluate_runs(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the ``evaluate`` job.

    Returns
    -------
    dict
        The tables it wrote to ``out`` (``scores``, ``comparison``, ``paired``,
        ``improvement``, ``dnase``: DataFrames) and the MLflow ``tracking_uri`` and ``run_id``.
    """
    from epiray import evaluate as ev
    from epiray import plots
    from epiray.metrics import score_track
    from epiray.tracking import start_run
    from epiray.train import average_activity_tracks, final_checkpoint, load_shards

    store = Store.open(cfg.store)
    exps = store.experiments().set_index("experiment")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    dnase_rows: list[pd.DataFrame] = []
    example = None
    for chrom in cfg.chroms:
        for fold in cfg.folds:
            preds: dict[str, dict[str, np.ndarray]] = {}
            meta = None
            for label, pattern in cfg.runs.items():
                if "{chrom}" not in pattern:
                    raise ConfigError(
                        f"evaluate config: runs.{label} {pattern!r}; expected a "
                        "{chrom} placeholder (and {fold} for several folds)."
                    )
                ckpt = final_checkpoint(pattern.format(chrom=chrom, fold=fold))
                m = json.loads((ckpt / "meta.json").read_text())
                if meta is not None and set(m["evaluate"]) != set(meta["evaluate"]):
                    raise ConfigError(
                        f"evaluate config: runs.{label} ({ckpt}) held out other experiments "
                        f"than the first run of {chrom} {fold}; expected the same fold for "
                        "every model. Compare runs of the same folds."
                    )
                meta = m
                preds[label] = _predict(load_shards(ckpt, store=store), m["evaluate"])
            assert meta is not None
            aa = average_activity_tracks(
                store,
                meta["assembly"],
                chrom,
                meta["train"] + meta["validate"],
                meta["evaluate"],
                meta["evaluate"],
            )
            preds["average_activity"] = {e: t for e, (t, _) in aa.items()}
            masks = _masks(cfg, store, meta["assembly"], chrom)
            for e in meta["evaluate"]:
                y = store.read(meta["assembly"], chrom, [e])[0]
                w = (
                    _var_weights(store, exps, meta["assembly"], chrom, e)
                    if cfg.var_weights
                    else None
                )
                for label, p in preds.items():
                    if e not in p:
                        continue
                    s = score_track(y, p[e], masks=masks, var_weights=w)
                    r = exps.loc[e]
                    rows.append(
                        {
                            "model": label,
                            "experiment": e,
                            "biosample": r["biosample"],
                            "assay": r["assay"],
                            "category": r["category"],
                            "species": r["species"],
                            "fold": fold,
                            "chrom": chrom,
                            "n_bins": len(y),
                            **{k: float(v) for k, v in s.items()},
                        }
                    )
                if example is None:
                    example = (chrom, e, y, {k: v[e] for k, v in preds.items() if e in v})
            dnase = _dnase_by_biosample(store, exps, meta["assembly"], chrom, cfg.dnase_assay)
            if dnase:
                dnase_rows.append(
                    ev.dnase_consistency_table(
                        preds,
                        exps.reset_index()[
                            exps.reset_index()["experiment"].isin(meta["evaluate"])
                        ],
                        dnase,
                    )
                )
    scores = pd.DataFrame(rows)
    tables = {"scores": scores, "comparison": ev.comparison_table(scores)}
    models = [m for m in cfg.runs if m in set(scores["model"])]
    tables["paired"] = (
        ev.paired_tests(scores, reference="average_activity")
        if "average_activity" in set(scores["model"])
        else pd.DataFrame()
    )
    tables["improvement"] = pd.concat(
        [ev.assay_improvement(scores, m).assign(model=m) for m in models], ignore_index=True
    )
    tables["dnase"] = pd.concat(dnase_rows, ignore_index=True) if dnase_rows else pd.DataFrame()
    for name, df in tables.items():
        atomic_write_text(out / f"{name}.csv", df.to_csv(index=name != "scores"))
    report = ev.render_report(scores, "markdown")
    atomic_write_text(out / "report.md", report)

    with start_run(cfg.tracking, name="evaluate", base_dir=out, params=cfg) as run:
        run.log_scores(scores)
        for name in ("comparison", "paired", "improvement", "dnase"):
            if len(tables[name]):
                run.log_table(tables[name], name)
        run.log_text(report, "report.md")
        overall = tables["comparison"]["overall"] if "overall" in tables["comparison"] else None
        if overall is not None:
            run.log_metrics({f"mse/{m}": float(v) for m, v in overall.items()})
        for m in models:
            if "average_activity" in set(scores["model"]):
                run.log_figure(
                    plots.plot_metric_scatter(scores, "average_activity", m),
                    f"plots/mse_{m}_vs_average_activity.png",
                )
                imp = tables["improvement"][tables["improvement"]["model"] == m]
                if len(imp):
                    run.log_figure(
                        plots.plot_assay_improvement(imp, title=m), f"plots/improvement_{m}.png"
                    )
        if example is not None:
            chrom, e, y, p = example
            window = plots.peak_window(y)
            aa = p.pop("average_activity", None)
            run.log_figure(
                plots.plot_tracks(
                    y[window],
                    {k: v[window] for k, v in p.items()},
                    None if aa is None else aa[window],
                    chrom=chrom,
                    start=window.start,
                    title=e,
                ),
                f"plots/tracks_{e}.png",
            )
        tables["tracking_uri"] = run.tracking_uri
        tables["run_id"] = run.run_id
    return tables


def _predict(shards, experiments) -> dict[str, np.ndarray]:
    out = {}
    with torch.no_grad():
        for e in experiments:
            parts = []
            for model, data in shards:
                k = model.vocab.experiment_index(e)
                parts.append(model.predict(data, k.biosample, k.assay).float().cpu().numpy())
            out[e] = np.concatenate(parts)
    return out


def _masks(cfg: EvaluateConfig, store: Store, assembly: str, chrom: str):
    a = cfg.annotations
    if not (a.genes or a.enhancers or a.blacklist):
        return None
    from epiray.annotations import region_masks

    sizes = {chrom: store.chrom_sizes(assembly)[chrom]}
    return region_masks(
        sizes,
        genes=a.genes,
        enhancers=a.enhancers,
        blacklist=a.blacklist,
        chroms=[chrom],
        bin_size=store.bin_size,
    )[chrom]


def _var_weights(store, exps, assembly, chrom, experiment):
    from epiray.metrics import assay_variance

    assay = exps.loc[experiment, "assay"]
    same = exps[(exps["assay"] == assay) & (exps["assembly"] == assembly)].index.tolist()
    if len(same) < 2:
        return None
    return assay_variance(store.read(assembly, chrom, same))


def _dnase_by_biosample(store, exps, assembly, chrom, assay):
    sub = exps[(exps["assay"] == assay) & (exps["assembly"] == assembly)]
    return {r.biosample: store.read(assembly, chrom, [e])[0] for e, r in sub.iterrows()}
