"""The quickstart: the whole epiray story on a generated human + mouse compendium.

1. generate the synthetic compendium (bigWigs, manifest, chain file, ground truth);
2. ingest it into the Parquet store (Ray Data);
3. map the human tracks onto mouse bins through the chain (synteny);
4. train each model on one zero-shot fold (Ray Train; protein-binding assays of one partition
   removed from mouse), scored with the average activity baseline;
5. print the comparison table (also logged to MLflow);
6. impute every unobserved (biosample, assay) pair of mouse — including assays never run in
   mouse — with the cross-species model into bigWigs and a track hub.

Every step reuses what an earlier run left in the output folder, so re-running is cheap.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from epiray.config import Section

log = logging.getLogger(__name__)

MOUSE, HUMAN, SYNTENY = "mmSyn1", "hsSyn1", "hs2mm"

#: model label -> (registry name, params, trained with human tracks through synteny, the
#: shipped config it mirrors). The params and :data:`TRAIN` are those configs' (a test keeps
#: them equal), so the quickstart's table is what the shipped defaults give.
_AVOCADO = {
    "n_nodes": 256,
    "n_assay_factors": 64,
    "biosample_shrinkage": 0.0,
    "genome_dropout": 0.2,
}
_EDICE = {"dim": 32, "heads": 4, "ffn_hidden": 128, "mlp_hidden": 128, "n_targets": 8}
MODELS: dict[str, tuple[str, dict, bool, str]] = {
    "avocado_mouse_only": (
        "avocado",
        {"variant": "mouse_only", **_AVOCADO},
        False,
        "train_avocado.yaml",
    ),
    "avocado_cross_species": (
        "avocado",
        {"variant": "cross_species", **_AVOCADO},
        True,
        "train_avocado_cross_species.yaml",
    ),
    "avocado_concat": (
        "avocado",
        {"variant": "concat", **_AVOCADO},
        True,
        "train_avocado_concat.yaml",
    ),
    "edice": ("edice", dict(_EDICE), False, "edice.yaml"),
    "edice_cross_species": ("edice", dict(_EDICE), True, "edice_cross_species.yaml"),
}
#: the shipped configs' ``train`` sections, per model
TRAIN: dict[str, dict[str, Any]] = {
    "avocado": {
        "epochs": 300,
        "batch_size": "auto",
        "lr": 1e-3,
        "lr_schedule": "plateau",
        "patience": 12,
        "autocast": "auto",
    },
    "edice": {
        "epochs": 100,
        "batch_size": "auto",
        "lr": 1e-3,
        "lr_schedule": "plateau",
        "patience": 8,
        "autocast": "auto",
    },
}


#: the shipped configs' ``validation`` sections, per model (Avocado calibrates against average
#: activity: ``ValidationSection.calibrate``)
VALIDATION: dict[str, dict[str, Any]] = {
    "avocado": {"scheme": "cells", "per_assay": 1, "calibrate": True},
    "edice": {"scheme": "cells"},
}


class QuickstartConfig(Section):
    """Embedded defaults of the quickstart (``configs/quickstart.yaml`` holds the same)."""

    out: str = "quickstart"
    seed: int = 0
    preset: Literal["default", "tiny"] = "default"
    dtype: Literal["float16", "float32"] = "float16"
    chroms: list[str] = ["chr1"]
    fold: int = Field(0, ge=0, le=2)
    models: list[str] = ["avocado_mouse_only", "avocado_cross_species", "edice_cross_species"]
    #: None: the shipped configs' (:data:`TRAIN`); set for a shorter run (tests)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | Literal["auto"] = "auto"
    #: Avocado's hidden nodes; None: the shipped configs' 256
    n_nodes: int | None = Field(None, ge=1)
    #: eDICE params over the shipped configs' (CPU size: the paper's architecture with
    #: 32-wide embeddings, a 2 × 128 MLP and 8 targets per bin)
    edice: dict[str, Any] = {}
    num_workers: int = Field(1, ge=1)
    impute_with: str = "avocado_cross_species"
    num_cpus: int | None = None


def _train_config(cfg: QuickstartConfig, out: Path, label: str):
    from epiray.loop import LoopParams
    from epiray.tracking import TrackingConfig
    from epiray.train import (
        FoldSection,
        ModelSection,
        ScalingSection,
        TrainConfig,
        ValidationSection,
    )

    name, params, aux, _ = MODELS[label]
    if name == "avocado" and cfg.n_nodes is not None:
        params = {**params, "n_nodes": cfg.n_nodes}
    elif name == "edice":
        params = {**params, **cfg.edice}
    loop = {**TRAIN[name], "batch_size": cfg.batch_size, "seed": cfg.seed}
    if cfg.epochs is not None:
        loop["epochs"] = cfg.epochs
    return TrainConfig(
        store=str(out / "store"),
        out=str(out / "runs"),
        assembly=MOUSE,
        chroms=list(cfg.chroms),
        model=ModelSection(name=name, params=params),
        synteny=SYNTENY if aux else None,
        aux_species=aux,
        variant_name=label,
        folds=FoldSection(scheme="zero_shot", k=3, fold=cfg.fold, seed=cfg.seed),
        validation=ValidationSection(**VALIDATION[name], seed=cfg.seed),
        train=LoopParams(**loop),
        scaling=ScalingSection(num_workers=cfg.num_workers, use_gpu="auto"),
        tracking=TrackingConfig(experiment="epiray-quickstart"),
    )


def _epochs(history: pd.DataFrame) -> str:
    val = history["val_mse"] if "val_mse" in history else None
    if val is None or not val.notna().any():
        return f"{len(history)} epochs"
    return f"best validation epoch {int(history.loc[val.idxmin(), 'epoch'])} of {len(history)}"


def run(cfg: QuickstartConfig, say: Callable[[str], None] = log.info) -> dict:
    """Run the quickstart; ``say`` receives the progress lines (the CLI prints them).

    Returns
    -------
    dict
        ``out``, ``store``, ``scores`` (DataFrame), ``table`` (the comparison table),
        ``imputed`` (output folder), ``hub``, ``tracking_uri``.
    """
    from epiray import synthetic
    from epiray.evaluate import comparison_table, format_table
    from epiray.impute import ImputeConfig, impute
    from epiray.ingest import IngestConfig, ingest
    from epiray.runtime import ensure_ray
    from epiray.store import atomic_write_text
    from epiray.trackhub import write_trackhub
    from epiray.tracking import log_heldout_comparison, start_run
    from epiray.train import load_predictor, log_store_input, train

    unknown = [m for m in cfg.models + [cfg.impute_with] if m not in MODELS]
    if unknown:
        from epiray.errors import ConfigError

        raise ConfigError(
            f"quickstart: unknown models {unknown}; expected some of {sorted(MODELS)}."
        )
    out = Path(cfg.out).resolve()
    data = out / "data"
    params = synthetic.SynthParams.preset(cfg.preset)
    info = data / "synth.json"
    fresh = True
    if info.is_file():
        rec = json.loads(info.read_text())
        fresh = rec.get("seed") != cfg.seed or rec.get("params") != params.model_dump(mode="json")
    if fresh:
        say(f"[1/6] generating the synthetic compendium in {data}")
        res = synthetic.generate(data, seed=cfg.seed, params=params, overwrite=True)
        say(res.describe())
    else:
        say(f"[1/6] reusing the synthetic compendium in {data}")

    ensure_ray(cfg.num_cpus)
    say("[2/6] ingesting the tracks into the Parquet store (Ray Data)")
    icfg = IngestConfig(
        manifest=str(data / "manifest.tsv"),
        store=str(out / "store"),
        chroms="all",
        dtype=cfg.dtype,
        num_cpus=cfg.num_cpus,
    )
    store = ingest(icfg, resume=not fresh, overwrite=fresh)

    say("[3/6] mapping human tracks onto mouse bins through the chain file (synteny)")
    store = synthetic.build_synteny(data, store.root, SYNTENY)
    say(store.describe())

    labels = list(dict.fromkeys(cfg.models + [cfg.impute_with]))
    say(
        f"[4/6] training {', '.join(labels)} on {', '.join(cfg.chroms)}, zero-shot fold "
        f"{cfg.fold} (Ray Train)"
    )
    scores = []
    tracking_uri = None
    first = _train_config(cfg, out, labels[0])
    with start_run(
        first.tracking, name="quickstart", base_dir=first.out, resume=True, params=cfg
    ) as parent:
        for label in labels:
            tcfg = _train_config(cfg, out, label)
            for r in train(tcfg, parent=parent):
                say(
                    f"  {label} {r.spec.chrom} {r.spec.fold}: {len(r.spec.train)} mouse + "
                    f"{len(r.spec.aux)} human training tracks, {len(r.spec.evaluate)} held "
                    f"out; {_epochs(r.history)}"
                )
                scores.append(r.scores)
        all_scores = pd.concat(scores, ignore_index=True)
        # every model's run scores the same average-activity rows: keep one copy
        key = ["model", "experiment", "chrom", "fold"]
        all_scores = all_scores.drop_duplicates(key).reset_index(drop=True)
        table = comparison_table(all_scores)
        text = format_table(table, "text")
        parent.log_table(all_scores, "scores")
        parent.log_text(format_table(table, "markdown"), "comparison.md")
        # the comparison as metrics (heldout_mse/<model>/fold<k>), which the MLflow UI charts,
        # and the store as the parent's input dataset, as its children record it
        log_heldout_comparison(parent, all_scores, metric="mse")
        log_store_input(parent, store)
        tracking_uri = parent.tracking_uri
    atomic_write_text(out / "scores.csv", all_scores.to_csv(index=False))
    say("[5/6] held-out MSE (arcsinh scale; lower is better) on the zero-shot assays:")
    say(text)

    say(
        f"[6/6] imputing every unobserved mouse pair on {', '.join(cfg.chroms)} with "
        f"{cfg.impute_with} (bigWigs + track hub)"
    )
    model = str(out / "runs" / f"{cfg.impute_with}.{{chrom}}.fold{cfg.fold}")
    icfg = ImputeConfig(
        store=str(store.root),
        output_dir=str(out / "imputed"),
        model=model,
        assembly=MOUSE,
        pairs="unobserved",
        zero_shot_assays=True,
        chroms=list(cfg.chroms),
        scale="arcsinh",
        resume=True,
    )
    res = impute(icfg, functools.partial(load_predictor, model, autocast=icfg.autocast))
    hub = write_trackhub(out / "imputed", overwrite=True)
    say(f"  {len(res.written)} bigWigs written, {len(res.skipped)} kept from an earlier run")
    say("")
    say("Where to look:")
    say(f"  results table       {out / 'scores.csv'}")
    say(f"  MLflow runs         mlflow ui --backend-store-uri {tracking_uri}")
    say(f"  imputed bigWigs     {out / 'imputed'}  (epiray info {out / 'imputed'})")
    say(f"  track hub           {hub}")
    say(f"  the store           epiray info {store.root}")
    return {
        "out": str(out),
        "store": str(store.root),
        "scores": all_scores,
        "table": table,
        "imputed": str(out / "imputed"),
        "hub": str(hub),
        "tracking_uri": tracking_uri,
    }
