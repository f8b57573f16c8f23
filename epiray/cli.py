"""The ``epiray`` command. Errors become one clear message on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from epiray.errors import EpirayError

log = logging.getLogger("epiray")

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str):
    """Register ``epiray NAME``: decorates ``run(args)``; its ``add`` attribute adds options."""

    def deco(fn):
        COMMANDS[name] = (help, getattr(fn, "add", lambda p: None), fn)
        return fn

    return deco


def _args(**options):
    def deco(fn):
        def add(p: argparse.ArgumentParser) -> None:
            for flags, kw in options["spec"]:
                p.add_argument(*flags, **kw)

        fn.add = add
        return fn

    return deco


# ------------------------------------------------------------------------------------ synth
@command("synth", "generate the synthetic human+mouse compendium (bigWigs, manifest, chain)")
@_args(
    spec=[
        (("--out",), {"required": True, "type": Path, "help": "output directory"}),
        (("--seed",), {"type": int, "default": 0, "help": "random seed (default 0)"}),
        (
            ("--preset",),
            {
                "choices": ["default", "tiny"],
                "default": "default",
                "help": "size preset (default: default)",
            },
        ),
        (("--overwrite",), {"action": "store_true", "help": "replace an existing directory"}),
    ]
)
def _synth(args) -> None:
    from epiray import synthetic

    params = synthetic.SynthParams.preset(args.preset)
    res = synthetic.generate(args.out, seed=args.seed, params=params, overwrite=args.overwrite)
    print(f"synthetic compendium written to {args.out}")
    print(res.describe() if hasattr(res, "describe") else res)


# ------------------------------------------------------------------------------------ ingest
@command("ingest", "bin tracks (bigWig, .npy/.npz) into the Parquet store with Ray Data")
@_args(
    spec=[
        (("--config",), {"type": Path, "help": "ingest YAML (see configs/ingest.yaml)"}),
        (("--manifest",), {"type": Path, "help": "manifest TSV (quick form, without --config)"}),
        (("--store",), {"type": Path, "help": "store directory (quick form)"}),
        (("--chroms",), {"nargs": "+", "help": "chromosomes (quick form; default: primary)"}),
        (
            ("--chrom-sizes",),
            {
                "nargs": "+",
                "default": [],
                "metavar": "ASSEMBLY=PATH",
                "help": "chrom sizes per assembly (default: "
                "<manifest dir>/genomes/<assembly>.chrom.sizes)",
            },
        ),
        (("--dtype",), {"choices": ["float32", "float16"], "default": "float32"}),
        (
            ("--overwrite",),
            {"action": "store_true", "help": "delete an existing store and rebuild"},
        ),
        (
            ("--resume",),
            {
                "action": "store_true",
                "help": "reuse an existing store: skip finished parts, add new "
                "experiments, re-ingest changed sources",
            },
        ),
    ]
)
def _ingest(args) -> None:
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
@command("info", "summarise a store (or an output folder)")
@_args(
    spec=[
        (("path",), {"type": Path, "help": "store directory"}),
        (("--experiments",), {"action": "store_true", "help": "list every experiment"}),
    ]
)
def _info(args) -> None:
    from epiray.store import Store

    print(Store.open(args.path).describe(experiments=args.experiments))


# ------------------------------------------------------------------------------------ quickstart
@command("quickstart", "run the whole story on a generated human+mouse compendium")
@_args(
    spec=[
        (("--config",), {"type": Path, "help": "quickstart YAML (default: embedded defaults)"}),
        (("--out",), {"type": Path, "help": "output folder (default: ./quickstart)"}),
        (("--preset",), {"choices": ["default", "tiny"], "help": "compendium size"}),
    ]
)
def _quickstart(args) -> None:
    from epiray.config import load_config
    from epiray.quickstart import QuickstartConfig, run

    cfg = load_config(QuickstartConfig, args.config) if args.config else QuickstartConfig()
    update = {k: v for k, v in (("out", args.out and str(args.out)), ("preset", args.preset)) if v}
    run(cfg.model_copy(update=update), say=print)


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(
        prog="epiray",
        description="Genome-scale imputation of epigenomic compendia on Ray.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_, description=help_))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``epiray`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("epiray").setLevel(logging.INFO)
    try:
        COMMANDS[args.command][2](args)
    except EpirayError as e:
        print(f"epiray {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
