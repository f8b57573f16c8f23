"""The ``epiray`` command. Errors become one clear message on stderr and exit status 2, also
when raised inside a Ray worker; the traceback goes to a log file (``--debug`` prints it).

Each command is a pair of functions: ``_add_<name>(parser)`` declares its options and
``_run_<name>(args)`` calls one library function. The table :data:`COMMANDS` lists them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

from epiray.errors import EpirayError, unwrap
from epiray.runtime import ray_initialised_here, shutdown_ray

log = logging.getLogger("epiray")


# ------------------------------------------------------------------------------------ synth
def _add_synth(p: argparse.ArgumentParser) -> None:
    from epiray.synthetic import PRESETS

    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--preset", choices=list(PRESETS), default="default", help="size preset (default: default)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")


def _run_synth(args) -> None:
    from epiray import synthetic

    params = synthetic.SynthParams.preset(args.preset)
    res = synthetic.generate(args.out, seed=args.seed, params=params, overwrite=args.overwrite)
    print(f"synthetic compendium written to {args.out}")
    print(res.describe())


# ------------------------------------------------------------------------------------ ingest
def _add_ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="ingest YAML (see configs/ingest.yaml)")
    p.add_argument("--manifest", type=Path, help="manifest TSV (quick form, without --config)")
    p.add_argument("--store", type=Path, help="store directory (quick form)")
    p.add_argument("--chroms", nargs="+", help="chromosomes (quick form; default: primary)")
    p.add_argument(
        "--chrom-sizes",
        nargs="+",
        default=[],
        metavar="ASSEMBLY=PATH",
        help="chrom sizes per assembly (default: <manifest dir>/genomes/<assembly>.chrom.sizes)",
    )
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    _add_reuse(p, "store")


def _add_reuse(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"delete an existing {what} first")
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"reuse an existing {what}: finished parts are skipped, new ones added, "
        "changed sources redone",
    )


def _run_ingest(args) -> None:
    from epiray.config import dump_config, load_config
    from epiray.ingest import IngestConfig, ingest, quick_config

    if args.config:
        if args.manifest or args.store:
            raise EpirayError("ingest: give either --config or --manifest/--store, not both.")
        cfg = load_config(IngestConfig, args.config)
    else:
        if not (args.manifest and args.store):
            raise EpirayError("ingest: give --config F, or --manifest M and --store S.")
        sizes = {}
        for kv in args.chrom_sizes:
            if "=" not in kv:
                raise EpirayError(f"ingest: --chrom-sizes {kv!r}; expected ASSEMBLY=PATH.")
            k, v = kv.split("=", 1)
            sizes[k] = v
        cfg = quick_config(str(args.manifest), str(args.store), args.chroms, args.dtype, sizes)
    store = ingest(cfg, overwrite=args.overwrite, resume=args.resume)
    dump_config(cfg, store.root / "ingest.resolved.yaml")
    print(store.describe())


# ------------------------------------------------------------------------------------ info
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="store directory or imputation output folder")
    p.add_argument("--experiments", action="store_true", help="list every experiment")


def _run_info(args) -> None:
    from epiray.store import SUMMARY, Store

    if not (args.path / SUMMARY).is_file() and any(args.path.glob("*.json")):
        from epiray.impute import describe_outputs

        print(describe_outputs(args.path))
        return
    print(Store.open(args.path).describe(experiments=args.experiments))


# ------------------------------------------------------------------------------------ quickstart
def _add_quickstart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="quickstart YAML (default: embedded defaults)")
    p.add_argument("--out", type=Path, help="output folder (default: ./quickstart)")
    p.add_argument("--preset", choices=["tiny", "default"], help="compendium size")


def _run_quickstart(args) -> None:
    from epiray.config import load_config
    from epiray.quickstart import QuickstartConfig, run

    cfg = load_config(QuickstartConfig, args.config) if args.config else QuickstartConfig()
    update = {"out": str(args.out) if args.out else None, "preset": args.preset}
    run(cfg.model_copy(update={k: v for k, v in update.items() if v}), say=print)


# ------------------------------------------------------------------------------------ synteny
def _add_synteny(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="synteny YAML (see configs/synteny.yaml)")
    p.add_argument("--store", type=Path, help="store directory (quick form)")
    p.add_argument("--chain", type=Path, help="UCSC chain file, plain or gzip (quick form)")
    p.add_argument("--human-assembly", help="assembly of the aligned species (e.g. hg38)")
    p.add_argument("--mouse-assembly", help="assembly of the modelled species (e.g. mm10)")
    p.add_argument(
        "--orientation",
        choices=["target_human", "target_mouse"],
        default="target_human",
        help="target_human for hg38ToMm10-style files (the paper's), target_mouse "
        "for mm10ToHg38-style files",
    )
    p.add_argument(
        "--minus-strand",
        choices=["paper", "mirrored"],
        default="paper",
        help="bin pairing of '-' strand blocks (default: the paper's rule)",
    )
    p.add_argument("--name", help="synteny name (default: the chain file's name)")
    _add_reuse(p, "synteny")


def _run_synteny(args) -> None:
    from epiray.config import load_config
    from epiray.synteny import SyntenyConfig, build

    if args.config:
        cfg = load_config(SyntenyConfig, args.config)
    else:
        need = {
            "--store": args.store,
            "--chain": args.chain,
            "--human-assembly": args.human_assembly,
            "--mouse-assembly": args.mouse_assembly,
        }
        missing = [k for k, v in need.items() if not v]
        if missing:
            raise EpirayError(f"synteny: give --config F, or {' '.join(missing)}.")
        cfg = SyntenyConfig(
            store=str(args.store.resolve()),
            chain=str(args.chain.resolve()),
            human_assembly=args.human_assembly,
            mouse_assembly=args.mouse_assembly,
            orientation=args.orientation,
            minus_strand=args.minus_strand,
            name=args.name,
        )
    store = build(cfg, overwrite=args.overwrite, resume=args.resume)
    print(store.describe())


# ------------------------------------------------------------------------------------ train
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, required=True, help="train YAML (see configs/train_avocado.yaml)"
    )
    p.add_argument("--fold", help="override folds.fold (an index or 'all')")
    p.add_argument("--chroms", nargs="+", help="override chroms")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print every run's workers and their estimated memory, then exit without training",
    )


def _run_train(args) -> None:
    from epiray.config import load_config
    from epiray.evaluate import comparison_table, format_table
    from epiray.train import TrainConfig, train

    cfg = load_config(TrainConfig, args.config)
    upd = {}
    if args.fold is not None:
        upd["folds"] = cfg.folds.model_copy(
            update={"fold": "all" if args.fold == "all" else int(args.fold)}
        )
    if args.chroms:
        upd["chroms"] = args.chroms
    cfg = cfg.model_copy(update=upd)
    if args.plan:
        from epiray.train import memory_plan

        print(memory_plan(cfg).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        return
    results = train(cfg)
    scores = [r.scores for r in results if len(r.scores)]
    for r in results:
        print(f"{r.spec.label} {r.spec.chrom} {r.spec.fold}: checkpoint {r.checkpoint}")
    if scores:
        import pandas as pd

        print(format_table(comparison_table(pd.concat(scores, ignore_index=True)), "text"))


# ------------------------------------------------------------------------------------ extend
def _add_extend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, required=True, help="extend YAML (see configs/extend_avocado.yaml)"
    )
    p.add_argument("--chroms", nargs="+", help="override chroms")
    p.add_argument(
        "--plan", action="store_true", help="check everything, print the runs, train nothing"
    )


def _run_extend(args) -> None:
    from epiray.extend import extend, load_extend_config, plan_extension

    cfg = load_extend_config(args.config)
    if args.chroms:
        cfg = cfg.model_copy(update={"chroms": args.chroms})
    plan = plan_extension(cfg)
    print(plan.describe())
    if args.plan:
        return
    for r in extend(cfg, plan):
        print(f"{r.spec.label} {r.spec.chrom} {r.spec.fold}: checkpoint {r.checkpoint}")


# ------------------------------------------------------------------------------------ impute
def _add_impute(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, required=True, help="impute YAML (see configs/impute.yaml)"
    )
    p.add_argument("--no-hub", action="store_true", help="do not write the track hub")
    _add_reuse(p, "output folder")


def _run_impute(args) -> None:
    import functools

    from epiray.config import dump_config, load_config
    from epiray.impute import ImputeConfig, describe_outputs, impute
    from epiray.trackhub import write_trackhub
    from epiray.train import load_predictor

    cfg = load_config(ImputeConfig, args.config)
    upd = {k: True for k in ("overwrite", "resume") if getattr(args, k)}
    cfg = cfg.model_copy(update=upd)
    res = impute(cfg, functools.partial(load_predictor, cfg.model, autocast=cfg.autocast))
    dump_config(cfg, Path(cfg.output_dir) / "impute.resolved.yaml")
    if not args.no_hub:
        hub = write_trackhub(cfg.output_dir, overwrite=True)
        print(f"track hub: {hub}")
    print(f"{len(res.written)} bigWigs written, {len(res.skipped)} kept from an earlier run")
    print(describe_outputs(cfg.output_dir))


# ------------------------------------------------------------------------------------ evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, required=True, help="evaluate YAML (see configs/evaluate.yaml)"
    )


def _run_evaluate(args) -> None:
    from epiray.config import dump_config, load_config
    from epiray.evaluate import format_table
    from epiray.score import EvaluateConfig, evaluate_runs

    cfg = load_config(EvaluateConfig, args.config)
    res = evaluate_runs(cfg)
    dump_config(cfg, Path(cfg.out) / "evaluate.resolved.yaml")
    print(format_table(res["comparison"], "text"))
    print(f"tables in {cfg.out}; MLflow run {res['run_id']} ({res['tracking_uri']})")


# ------------------------------------------------------------------------------------ report
def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_or_experiment", help="an MLflow run id or experiment name")
    p.add_argument(
        "--tracking-uri",
        default="sqlite:///mlflow.db",
        help="MLflow tracking URI (default: sqlite:///mlflow.db)",
    )
    p.add_argument("--format", choices=["text", "markdown", "csv"], default="text")
    p.add_argument("--metric", default="mse", help="metric of the tables (default: mse)")


def _run_report(args) -> None:
    from epiray.evaluate import load_scores, render_report

    scores = load_scores(args.tracking_uri, args.run_or_experiment)
    print(render_report(scores, args.format, metric=args.metric))


# ------------------------------------------------------------------------------------ sweep
def _add_sweep(p: argparse.ArgumentParser) -> None:
    from epiray.sweep import add_cli_args

    add_cli_args(p)


def _run_sweep(args) -> None:
    from epiray.sweep import cli_run

    cli_run(args)


# ------------------------------------------------------------------------------------ individuals
def _add_individuals(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="individuals YAML (see configs/individuals.yaml)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete earlier results in the output folder (default: keep them and resume)",
    )
    g = p.add_argument_group("synthetic compendium (instead of --config)")
    g.add_argument("--write-synthetic", type=Path, metavar="DIR", help="write one and exit")
    g.add_argument("--donors", type=int, default=4)
    g.add_argument("--tissues", type=int, default=8)
    g.add_argument("--assays", type=int, default=4)
    g.add_argument("--bins", type=int, default=20_000)
    g.add_argument("--seed", type=int, default=0)


def _run_individuals(args) -> None:
    from epiray.config import load_config
    from epiray.evaluate import format_table
    from epiray.individuals import (
        IndividualsConfig,
        run_individuals,
        write_individuals_compendium,
    )

    if args.write_synthetic:
        if args.config:
            raise EpirayError("individuals: give either --config or --write-synthetic, not both.")
        manifest = write_individuals_compendium(
            args.write_synthetic,
            args.donors,
            args.tissues,
            args.assays,
            args.bins,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        print(f"synthetic individuals compendium: {manifest}")
        print(f"next: epiray ingest --manifest {manifest} --store STORE")
        return
    if not args.config:
        raise EpirayError("individuals: give --config F (or --write-synthetic DIR).")
    cfg = load_config(IndividualsConfig, args.config)
    res = run_individuals(cfg, overwrite=args.overwrite)
    print(format_table(res.summary, "text"))
    print(
        f"{len(res.computed)} tracks computed, {len(res.reused)} kept from an earlier run; "
        f"tables in {res.out}" + (f"; MLflow run {res.mlflow_run_id}" if res.mlflow_run_id else "")
    )


# ------------------------------------------------------------------------------------ export
def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        required=True,
        help="trained run: a pattern with {chrom} (e.g. runs/avocado_mouse_only.{chrom}.fold0), "
        "one run folder, or one checkpoint folder",
    )
    p.add_argument("--out", required=True, type=Path, help="destination folder")
    p.add_argument("--chroms", nargs="+", help="chromosomes (default: every run found)")
    p.add_argument(
        "--formats",
        help="comma-separated subset of parquet,bigwig,tsv,weights (default: all; the genome "
        "formats only for models with genome factors)",
    )
    p.add_argument(
        "--store", type=Path, help="store for chromosome lengths (default: the run's own)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _run_export(args) -> None:
    from epiray.export import export

    res = export(
        args.run,
        args.out,
        chroms=args.chroms,
        formats=args.formats,
        overwrite=args.overwrite,
        store=args.store,
    )
    print(res.describe())


# ------------------------------------------------------------------------------------ main
COMMANDS = {
    "quickstart": (
        "run the whole story on a generated human+mouse compendium",
        _add_quickstart,
        _run_quickstart,
    ),
    "synth": (
        "generate the synthetic human+mouse compendium (bigWigs, manifest, chain)",
        _add_synth,
        _run_synth,
    ),
    "ingest": (
        "bin tracks (bigWig, .npy/.npz) into the Parquet store with Ray Data",
        _add_ingest,
        _run_ingest,
    ),
    "synteny": (
        "map human tracks onto mouse bins through a liftOver chain file",
        _add_synteny,
        _run_synteny,
    ),
    "sweep": (
        "Ray Tune sweeps over folds, chromosomes, variants and hyperparameters",
        _add_sweep,
        _run_sweep,
    ),
    "evaluate": (
        "score trained runs on their held-out experiments; tables, plots, MLflow",
        _add_evaluate,
        _run_evaluate,
    ),
    "report": (
        "print the comparison tables of an MLflow run or experiment",
        _add_report,
        _run_report,
    ),
    "impute": ("impute tracks genome-wide into bigWigs and a track hub", _add_impute, _run_impute),
    "info": ("summarise a store or an imputation output folder", _add_info, _run_info),
    "export": (
        "export a trained run's factors, embeddings and weights (Parquet, bigWig, TSV, .npz)",
        _add_export,
        _run_export,
    ),
    "train": ("train a model per chromosome and fold with Ray Train", _add_train, _run_train),
    "extend": (
        "fit new biosamples, assays or chromosomes onto trained runs, the rest frozen",
        _add_extend,
        _run_extend,
    ),
    "individuals": (
        "the eDICE personalised protocol: leave one track of a donor out, impute it",
        _add_individuals,
        _run_individuals,
    ),
}


#: Turns on ``--debug`` without the flag (any value but empty or 0).
DEBUG_ENV = "EPIRAY_DEBUG"


def error_log_path() -> Path:
    """Where the traceback of the last error goes: ``last-error.log`` in epiray's cache folder
    (``~/.cache/epiray``; ``EPIRAY_CACHE_DIR`` overrides it)."""
    base = os.environ.get("EPIRAY_CACHE_DIR") or Path.home() / ".cache" / "epiray"
    return Path(base) / "last-error.log"


def _write_error_log(text: str) -> Path | None:
    path = error_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path


def report_error(
    exc: BaseException, command: str, *, debug: bool = False, argv: list[str] | None = None
) -> int:
    """Tell the user about ``exc`` on stderr; returns the exit status.

    The error is first unwrapped from Ray's wrappers (:func:`epiray.errors.unwrap`): an
    :class:`EpirayError`, wherever it was raised, is printed as its one message (status 2);
    anything else as its type and first line (status 1). The full traceback is written to
    :func:`error_log_path`, whose path follows on one line, and printed before the message
    with ``debug``.
    """
    err = unwrap(exc)
    user = isinstance(err, EpirayError)
    if user:
        msg = f"epiray {command}: error: {err}"
    else:
        first = next((ln for ln in str(err).strip().splitlines() if ln.strip()), "")
        msg = f"epiray {command}: unexpected error: {type(err).__name__}" + (
            f": {first}" if first else ""
        )
    tb = "".join(traceback.format_exception(exc))
    args = " ".join(sys.argv[1:] if argv is None else argv)
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    text = f"{when}  epiray {args}\ncwd {os.getcwd()}\n\n{tb}\n{msg}\n"
    path = _write_error_log(re.sub(r"\x1b\[[0-9;]*m", "", text))  # no colours of Ray's
    if debug:
        print(tb, file=sys.stderr, end="")
    print(msg, file=sys.stderr)
    if not debug and path is not None:
        print(f"epiray {command}: traceback in {path} (or run with --debug)", file=sys.stderr)
    return 2 if user else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(
        prog="epiray", description="Genome-scale imputation of epigenomic compendia on Ray."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    debug_help = (
        f"on an error, print the full traceback too (or set {DEBUG_ENV}=1); without it, "
        f"it goes to {error_log_path()}"
    )
    p.add_argument("--debug", action="store_true", help=debug_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add(sp)
        # also after the command; SUPPRESS keeps a --debug given before it
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``epiray`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("epiray").setLevel(logging.INFO)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    had_ray = ray_initialised_here()
    try:
        COMMANDS[args.command][2](args)
    except Exception as e:  # errors of Ray workers arrive wrapped: report_error unwraps them
        if not had_ray:  # the Ray this command started; what its workers still print comes
            try:  # before the message, not after it
                shutdown_ray()
            except Exception:  # noqa: BLE001 - the error being reported matters more
                pass
        return report_error(e, args.command, debug=debug, argv=argv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
