"""Transfer from the command line: extend trained runs with what is new (``epiray extend``).

A run of ``epiray train`` knows the biosamples and assays of its vocabulary. When a store gains
experiments — a biosample newly assayed, an assay run for the first time, another chromosome —
``epiray extend --config X.yaml`` fits only what is new, starting from the trained runs:

- **Avocado, new biosamples or assays** (a chromosome the parent was trained on): the vocabulary
  is extended (:meth:`~epiray.models.Vocabulary.extend`: old indices unchanged), new rows are
  added to the biosample/assay factors (:meth:`~epiray.models.avocado.Avocado.extend`), and
  only those rows are fitted, on the new experiments' tracks; the network, the genome factors
  and every old factor stay frozen (the original package's ``fit_celltypes``/``fit_assays``).
  Each worker owns the slab its parent worker owned, so the parent's genome factors are
  reused as they are.
- **Avocado, a new chromosome**: its genome factors are fitted on every track of the model's
  vocabulary with the network and the biosample/assay factors frozen
  (:meth:`~epiray.models.avocado.Avocado.transfer`), from the (extended) model of a chromosome
  it was trained on.
- **eDICE**: new global embedding rows (:meth:`~epiray.models.edice.EDice.extend`) and the
  paper's fine-tuning of the parts named by ``finetune`` (default: the signal embedders and the
  output MLP; global embeddings and attention frozen, as ``epiray individuals`` fine-tunes) on
  every observed track, the new ones included (eDICE imputes from them). On a new chromosome
  only ``finetune`` trains.

Each (chromosome, fold) is one Ray Train run of the same worker as ``epiray train``
(:func:`epiray.train.train_fn_per_worker`, told by ``RunSpec.extra["extend"]`` to start from the
parent): checkpoints every minute, resume of killed runs, validation cells and early stopping,
one MLflow run per chromosome. The run folder is ``{parent label}+{name}.{chrom}.{fold}``
beside the parent's (or under ``out``), so ``epiray impute`` and ``epiray export`` read it as
any other run; its ``meta.json`` holds the extended vocabulary, every track the model knows
(``train``), the tracks this run fitted (``fit``) and, under ``extend``, the parent, the new
names and the trainable parameters. Checkpoints keep the Adam moments of what trains (the new
rows) and the parent's moments of the frozen dense parameters (the parent's genome moments stay
in the parent's checkpoint). The MLflow run is a child of the parent run (``mlflow.parentRunId``
when both are in the same tracking store) and is tagged ``epiray.parent_run``,
``epiray.parent_checkpoint``, ``epiray.new_biosamples``, ``epiray.new_assays``.

Everything is checked before anything is written (:func:`plan_extension`): the parent runs
exist and finished; the store is the parent's or a superset of it (every experiment the parent
knows, same biosample/assay/species and source checksum, same assembly and chromosome sizes);
the new experiments are in that store, of the parent's assembly, and bring a biosample or an
assay the model does not know. Each problem is one :class:`~epiray.errors.ConfigError`
(``epiray`` exits with status 2) and nothing is written.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import field_validator, model_validator

from epiray.config import Section, _resolve_one, load_yaml, parse_config
from epiray.errors import ConfigError, EpirayError
from epiray.loop import LoopParams, TrainState, read_checkpoint
from epiray.models import ChromData, Vocabulary, get_model
from epiray.store import Store
from epiray.tracking import TrackingConfig
from epiray.train import (
    META,
    FoldSection,
    ModelSection,
    RunResult,
    RunSpec,
    ScalingSection,
    TrainConfig,
    ValidationSection,
    storage_path,
)

log = logging.getLogger(__name__)

__all__ = [
    "ExtendConfig",
    "ExtensionPlan",
    "PlannedRun",
    "extend",
    "load_extend_config",
    "plan_extension",
    "resume_extension",
    "start_extension",
]

#: eDICE parts fine-tuned beside the new embedding rows unless ``finetune`` says otherwise
#: (the paper's transfer learning; ``epiray individuals``' ``finetune_freeze`` leaves them).
EDICE_FINETUNE = ("signal_embedders", "mlp")
#: Sections taken from the parent's resolved config when the extend config leaves them out.
INHERITED = ("train", "validation", "scaling", "tracking", "value_dtype")


# ------------------------------------------------------------------------------------ config
class ExtendConfig(Section):
    """The ``extend`` job: fit what is new on top of trained runs.

    Attributes
    ----------
    parent
        The parent runs: a run folder pattern with ``{chrom}``, as ``epiray impute``'s
        ``model`` (e.g. ``runs/avocado_mouse_only.{chrom}.all``). Written ``from:`` in YAML.
    store
        The store holding the new experiments: the parent's store (after ``epiray ingest
        --resume`` added them) or a superset of it. Default: the parent's store.
    out
        Where the extended runs go (Ray Train storage). Default: the parent runs' folder.
    name
        Suffix of the extended model's label: runs are ``{parent label}+{name}.{chrom}.{fold}``.
    experiments
        The new experiments: ids of the store, or ``auto`` (the default): every experiment of
        the parent's assembly that the parent's vocabulary lacks — or, with ``biosamples`` /
        ``assays``, those of the named ones.
    biosamples, assays
        New biosamples / assays to add: every experiment of theirs in the store (of the
        parent's assembly). A name the model already knows is an error.
    chroms
        ``all`` (the parent's chromosomes) or a list; a chromosome the parent was not trained
        on is new: its genome factors are fitted (Avocado) from a chromosome it was.
    finetune
        eDICE parts trained beside the new embedding rows (default ``signal_embedders`` and
        ``mlp``; ``[]``: only the new rows). Avocado fits only what is new: leave it unset.
    train, validation, scaling, tracking, value_dtype
        As in ``epiray train``; when left out, the parent's (from its resolved config).
        ``validation.scheme`` is ``cells`` (blocks of the fitted tracks held out for early
        stopping) or ``none``. Avocado's runs on the parent's chromosomes always use the
        parent's number of workers (its genome factors are per worker slab).
    """

    parent: str
    store: str | None = None
    out: str | None = None
    name: str = "ext"
    experiments: list[str] | Literal["auto"] = "auto"
    biosamples: list[str] = []
    assays: list[str] = []
    chroms: list[str] | Literal["all"] = "all"
    finetune: list[str] | None = None
    train: LoopParams = LoopParams()
    validation: ValidationSection = ValidationSection()
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingConfig = TrackingConfig()
    value_dtype: Literal["float32", "float16"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_is_parent(cls, v: Any) -> Any:
        if isinstance(v, dict) and "from" in v:
            if "parent" in v:
                raise ValueError("give the parent runs once: `from` or `parent`, not both")
            v = {("parent" if k == "from" else k): x for k, x in v.items()}
        return v

    @field_validator("parent")
    @classmethod
    def _check_parent(cls, v: str) -> str:
        if v.count("{chrom}") != 1:
            raise ValueError(
                "expected a run folder pattern with one {chrom} placeholder, e.g. "
                "runs/avocado_mouse_only.{chrom}.all"
            )
        return v

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError("expected letters, digits, '_' or '-' (it names the runs)")
        return v

    @field_validator("validation")
    @classmethod
    def _check_validation(cls, v: ValidationSection) -> ValidationSection:
        if v.scheme == "experiments":
            raise ValueError(
                "scheme experiments would withhold whole new tracks, often all a new biosample "
                "has; expected cells or none"
            )
        return v


def load_extend_config(path: str | Path) -> ExtendConfig:
    """Load an extend YAML; relative paths (``from``, ``store``, ``out``) resolve against its
    folder."""
    path = Path(path).resolve()
    data = load_yaml(path)
    for key in ("from", "parent"):
        if isinstance(data.get(key), str):
            data[key] = _resolve_one(data[key], path.parent)
    return parse_config(ExtendConfig, data, path, base=path.parent)


# ------------------------------------------------------------------------------------ parents
@dataclass
class ParentRun:
    """A finished run of one chromosome the extension starts from."""

    chrom: str
    run_dir: Path
    checkpoint: Path
    meta: dict[str, Any]


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def find_parents(pattern: str) -> dict[str, ParentRun]:
    """Chromosome -> finished parent run of every run folder matching ``pattern``.

    Raises
    ------
    ConfigError
        No folder matches, or one has no final checkpoint (training unfinished) or an
        unreadable one (every such problem at once).
    """
    from epiray.export import _discover

    dirs = _discover(pattern)
    if not dirs:
        raise ConfigError(
            f"extend from {pattern}: no parent run matches; expected run folders such as "
            f"{pattern.replace('{chrom}', 'chr1')} written by `epiray train`. Train the parent "
            "first, or fix `from` (runs are named {label}.{chrom}.{fold} under the train "
            "config's out)."
        )
    problems, found = [], {}
    for chrom, run_dir in sorted(dirs.items(), key=lambda kv: _natural_key(kv[0])):
        finals = sorted(run_dir.glob("epoch*_final"))
        if not finals:
            partial = sorted(p.name for p in run_dir.glob("epoch*") if p.is_dir())
            problems.append(
                f"parent run {run_dir}: no final checkpoint"
                + (f" (latest: {partial[-1]})" if partial else "")
                + "; its training did not finish. Resume it with `epiray train` and the same "
                "config, then extend it"
            )
            continue
        ckpt = finals[-1]
        try:
            meta = json.loads((ckpt / META).read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"parent checkpoint {ckpt}: cannot read {META} ({exc})")
            continue
        missing = [
            f"rank{r}.pt"
            for r in range(len(meta.get("shards") or []))
            if not (ckpt / f"rank{r}.pt").is_file()
        ]
        if not meta.get("shards") or missing or meta.get("chrom") != chrom:
            problems.append(
                f"parent checkpoint {ckpt}: incomplete or of another chromosome (chrom "
                f"{meta.get('chrom')!r}, missing {missing or 'nothing'}); expected chromosome "
                f"{chrom!r} with one rank file per worker shard"
            )
            continue
        found[chrom] = ParentRun(chrom, run_dir, ckpt, meta)
    if problems:
        raise ConfigError(
            f"extend from {pattern}: {len(problems)} problem(s)\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    first = next(iter(found.values())).meta
    for p in found.values():
        for key in ("model", "label", "params", "assembly", "fold"):
            if p.meta.get(key) != first.get(key):
                raise ConfigError(
                    f"extend from {pattern}: the runs disagree on {key} ({p.run_dir} has "
                    f"{p.meta.get(key)!r}, another {first.get(key)!r}); expected the runs of "
                    "one model. Point `from` at one model's runs."
                )
    return found


def _resolved_parent_config(parent: ParentRun) -> dict[str, Any]:
    """The parent run's resolved train config (``<out>/<run>.resolved.yaml``), or {}."""
    path = parent.run_dir.parent / f"{parent.run_dir.name}.resolved.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def inherit_parent_settings(cfg: ExtendConfig, parent: ParentRun) -> ExtendConfig:
    """``cfg`` with the sections it leaves out (:data:`INHERITED`) taken from the parent's
    resolved config (the loop, validation, workers and MLflow experiment it trained with), and
    ``value_dtype`` from its checkpoint."""
    resolved = _resolved_parent_config(parent)
    upd: dict[str, Any] = {}
    kinds = {
        "train": LoopParams,
        "validation": ValidationSection,
        "scaling": ScalingSection,
        "tracking": TrackingConfig,
    }
    for key, kind in kinds.items():
        if key in cfg.model_fields_set or not isinstance(resolved.get(key), dict):
            continue
        value = resolved[key]
        if key == "validation" and value.get("scheme") == "experiments":
            value = {**value, "scheme": "cells"}
        upd[key] = kind.model_validate(value)
    if "value_dtype" not in cfg.model_fields_set or cfg.value_dtype is None:
        upd["value_dtype"] = cfg.value_dtype or parent.meta.get("value_dtype") or "float32"
    return cfg.model_copy(update=upd)


# ------------------------------------------------------------------------------------ plan
@dataclass
class PlannedRun:
    """One (chromosome, fold) run of an extension."""

    spec: RunSpec
    train_cfg: TrainConfig
    kind: Literal["rows", "chrom"]
    parent: ParentRun | None
    tags: dict[str, str]
    #: the latest checkpoint of this extension written by an earlier call, which the run
    #: resumes from (as `epiray train` does: more epochs continue it)
    resumes: Path | None = None


@dataclass
class ExtensionPlan:
    """What ``epiray extend`` will do; nothing is written until :func:`extend` runs it."""

    config: ExtendConfig
    store: Store
    parents: dict[str, ParentRun]
    label: str
    new_biosamples: list[str]
    new_assays: list[str]
    new_experiments: list[str]
    runs: list[PlannedRun] = field(default_factory=list)

    def describe(self) -> str:
        """Several lines: the parent, what is new, and every run with what it fits."""
        first = next(iter(self.parents.values()))
        lines = [
            f"extend {first.meta['label']} ({len(self.parents)} chromosome run(s) under "
            f"{first.run_dir.parent}) into {self.label}, store {self.store.root}:",
            f"  new biosamples: {', '.join(self.new_biosamples) or 'none'}",
            f"  new assays: {', '.join(self.new_assays) or 'none'}",
            f"  new experiments: {len(self.new_experiments)}",
        ]
        for r in self.runs:
            state = f" (resumes from {r.resumes.name})" if r.resumes else ""
            lines.append(f"  {r.spec.summary}{state}")
        return "\n".join(lines)


def _check_store(store: Store, parents: dict[str, ParentRun]) -> None:
    """Refuse a store that is neither the parents' nor a superset of it: another assembly or
    chromosome sizes, another bin size, parent experiments missing or changed."""
    first = next(iter(parents.values())).meta
    asm_name = first["assembly"]
    problems: list[str] = []
    old_sizes: dict[str, int] | None = None
    old_bin = None
    try:
        old = Store.open(first["store"])
        old_sizes = old.chrom_sizes(asm_name)
        old_bin = old.bin_size
    except EpirayError:
        pass  # the parent's store moved: its vocabulary and bins are still checked
    if asm_name not in store.summary.get("assemblies", {}):
        raise ConfigError(
            f"extend: store {store.root} has no assembly {asm_name!r}, the parent model's "
            f"(it has {sorted(store.summary.get('assemblies', {}))}); expected the parent's "
            f"store {first['store']} or a superset of it. Extend with a store of {asm_name}."
        )
    if old_bin is not None and old_bin != store.bin_size:
        problems.append(f"bin size {store.bin_size}; the parent's store has {old_bin}")
    sizes = store.chrom_sizes(asm_name)
    if old_sizes is not None:
        diff = {c: (n, sizes.get(c)) for c, n in old_sizes.items() if c in sizes and sizes[c] != n}
        if diff:
            shown = ", ".join(f"{c}: {a} vs {b}" for c, (a, b) in list(diff.items())[:5])
            problems.append(
                f"chromosome sizes of {asm_name} differ from the parent's store ({shown}): "
                "another assembly under the same name"
            )
    recorded = store.summary.get("experiments", {})
    missing: set[str] = set()
    for p in parents.values():
        vocab = Vocabulary.from_dict(p.meta["vocab"])
        if p.chrom not in sizes:
            problems.append(f"chromosome {p.chrom} of the parent is not in {asm_name} here")
        elif store.n_bins(asm_name, p.chrom) != vocab.n_bins:
            problems.append(
                f"{p.chrom} has {store.n_bins(asm_name, p.chrom)} bins here, "
                f"{vocab.n_bins} in the parent model: another assembly under the same name"
            )
        for e, key in vocab.experiments.items():
            rec = recorded.get(e)
            if rec is None:
                missing.add(e)
                continue
            want = (vocab.biosamples[key.biosample], vocab.assays[key.assay], key.species)
            got = (rec.get("biosample"), rec.get("assay"), rec.get("species"))
            if want != got:
                problems.append(f"experiment {e!r} is {got} here, {want} in the parent model")
            old_sum = vocab.checksums.get(e)
            if old_sum is not None and rec.get("checksum") not in (None, old_sum):
                problems.append(f"experiment {e!r}: its source file changed (checksum)")
    if missing:
        shown = sorted(missing)
        problems.append(
            f"{len(shown)} experiment(s) of the parent model are not in it "
            f"({', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''})"
        )
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ConfigError(
            f"extend: store {store.root} is not the parent model's store ({first['store']}) "
            f"nor a superset of it; {len(problems)} problem(s):\n"
            + "\n".join(f"  - {x}" for x in problems)
            + "\nExtend with the store the parent was trained on, after `epiray ingest "
            "--resume` added the new experiments to it (or a copy of it with them added)."
        )


def _new_experiments(
    cfg: ExtendConfig, store: Store, vocab: Vocabulary, assembly: str
) -> list[str]:
    """The experiments to add, every problem with them in one ConfigError."""
    exps = store.experiments().set_index("experiment")
    target = exps[exps["assembly"] == assembly]
    problems: list[str] = []
    known_b, known_a = set(vocab.biosamples), set(vocab.assays)
    chosen: list[str] = []
    for kind, names, known in (
        ("biosample", cfg.biosamples, known_b),
        ("assay", cfg.assays, known_a),
    ):
        for x in names:
            if x in known and kind == "biosample":
                n = sum(
                    1 for k in vocab.experiments.values() if vocab.biosamples[k.biosample] == x
                )
                problems.append(
                    f"biosample {x!r} is already in the model ({n} experiment(s) of it in its "
                    "vocabulary); expected a biosample it does not know. New tracks of a known "
                    "biosample need `epiray train` (retrain with them)"
                )
                continue
            if x in known:
                problems.append(
                    f"assay {x!r} is already in the model; expected an assay it does not know"
                )
                continue
            mine = target[target[kind] == x].index.tolist()
            if not mine:
                other = sorted(set(exps.loc[exps[kind] == x, "assembly"]))
                problems.append(
                    f"{kind} {x!r} has no experiment of {assembly} in store {store.root}"
                    + (f" (only of {other})" if other else "")
                )
            chosen += mine
    if cfg.experiments != "auto":
        chosen += list(cfg.experiments)
    elif not cfg.biosamples and not cfg.assays:
        chosen = [e for e in target.index if e not in vocab.experiments]
    chosen = list(dict.fromkeys(chosen))
    for e in chosen:
        if e not in exps.index:
            problems.append(
                f"experiment {e!r} is not in store {store.root} (an experiment of another "
                "store?); expected one of its experiments. Ingest it into this store first"
            )
            continue
        if e in vocab.experiments:
            problems.append(f"experiment {e!r} is already in the model; expected a new one")
            continue
        asm = exps.loc[e, "assembly"]
        if asm != assembly:
            problems.append(
                f"experiment {e!r} is of assembly {asm} ({exps.loc[e, 'species']}); the "
                f"parent model is of {assembly}: expected experiments of {assembly}"
            )
            continue
        b, a = exps.loc[e, "biosample"], exps.loc[e, "assay"]
        if b in known_b and a in known_a:
            problems.append(
                f"experiment {e!r}: its biosample {b!r} and assay {a!r} are both already in "
                "the model, so it brings nothing to fit; expected a new biosample or assay. "
                "Retrain (`epiray train`) to use new tracks of known names"
            )
    if problems:
        raise ConfigError(
            f"extend: the new experiments; {len(problems)} problem(s):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return sorted(chosen)


def _parent_mlflow_run(parent: ParentRun, tracking: TrackingConfig, out: str) -> str | None:
    """The MLflow run id of the parent run: from its checkpoint, else looked up by the
    ``epiray.checkpoint`` tag in the tracking store (runs trained before the id was kept)."""
    rid = parent.meta.get("mlflow_run_id")
    if rid or not tracking.enabled:
        return rid
    try:
        from epiray.tracking import client

        mlc = client(tracking.resolved_uri(out))
        ids = [e.experiment_id for e in mlc.search_experiments()]
        for path in {str(parent.checkpoint), str(parent.checkpoint.resolve())}:
            esc = path.replace("'", "\\'")
            runs = mlc.search_runs(ids, filter_string=f"tags.`epiray.checkpoint` = '{esc}'")
            if runs:
                return runs[0].info.run_id
    except Exception as e:  # noqa: BLE001 - a link is a courtesy, not a requirement
        log.debug("extend: no MLflow run found for %s: %s", parent.checkpoint, e)
    return None


def _summary(
    label: str,
    chrom: str,
    fold: str,
    kind: str,
    model: str,
    source: str,
    fit: list[str],
    new_b: list[str],
    new_a: list[str],
    finetune: list[str],
    holdout: dict | None,
) -> str:
    where = f"{label} {chrom}" + ("" if fold == "all" else f" {fold}")
    names = [
        f"{len(x)} new {kind_}{'s' if len(x) > 1 else ''} ({', '.join(x[:4])}"
        f"{' ...' if len(x) > 4 else ''})"
        for x, kind_ in ((new_b, "biosample"), (new_a, "assay"))
        if x
    ]
    tune = f" and fine-tuning {', '.join(finetune)}" if finetune else ""
    if kind == "rows":
        what = "factors" if model == "avocado" else "embeddings"
        text = (
            f"{where}: extends {source} with {' and '.join(names)}: fitting their {what}{tune} "
            f"on {len(fit)} tracks, everything else frozen"
        )
    elif model == "avocado":
        text = (
            f"{where}: new chromosome, from {source}: fitting its genome factors on {len(fit)} "
            "tracks, network and biosample/assay factors frozen"
        )
    else:
        text = f"{where}: new chromosome, from {source}: fine-tuning {', '.join(finetune)}"
        text += f" on {len(fit)} tracks"
    if holdout:
        text += f", {100 * holdout['fraction']:.3g} % of their bins held out for validation"
    return text


def plan_extension(cfg: ExtendConfig) -> ExtensionPlan:
    """Check everything and list the runs of an extension; nothing is written.

    Raises
    ------
    ConfigError
        The parent runs are missing or unfinished; the store is not the parent's nor a
        superset of it (another assembly, other chromosome sizes, parent experiments missing
        or changed); a new experiment is not in the store, of another assembly, or already in
        the model; a named biosample/assay is already in the model; nothing is new; a
        chromosome is not in the assembly; ``finetune`` does not fit the model.
    """
    parents = find_parents(cfg.parent)
    first = next(iter(parents.values()))
    cfg = inherit_parent_settings(cfg, first)
    meta0 = first.meta
    model_name, assembly, fold = meta0["model"], meta0["assembly"], str(meta0["fold"])
    klass = get_model(model_name)
    store = Store.open(cfg.store or meta0["store"])
    _check_store(store, parents)
    parent_chroms = list(parents)
    sizes = store.chrom_sizes(assembly)
    chroms = parent_chroms if cfg.chroms == "all" else list(cfg.chroms)
    bad = [c for c in chroms if c not in sizes]
    if bad:
        raise ConfigError(
            f"extend: chroms {bad} not in assembly {assembly} of store {store.root}; expected "
            f"some of {sorted(sizes, key=_natural_key)}."
        )
    if model_name == "avocado":
        if cfg.finetune:
            raise ConfigError(
                f"extend: finetune {cfg.finetune} for Avocado; expected none: Avocado fits only "
                "the new factor rows (or a new chromosome's genome factors), everything else "
                "frozen. Remove finetune."
            )
        finetune: list[str] = []
    else:
        finetune = list(EDICE_FINETUNE if cfg.finetune is None else cfg.finetune)
        bad = sorted(set(finetune) - (set(klass.freezable) - {"global_embeddings"}))
        if bad:
            raise ConfigError(
                f"extend: finetune {bad} for {model_name}; expected some of "
                f"{sorted(set(klass.freezable) - {'global_embeddings'})} (the new embedding "
                "rows always train, the old ones never)."
            )

    vocab0 = Vocabulary.from_dict(meta0["vocab"])
    new = _new_experiments(cfg, store, vocab0, assembly)
    new_chroms = [c for c in chroms if c not in parents]
    if not new and not new_chroms:
        raise ConfigError(
            f"extend: nothing new; every experiment of {assembly} in store {store.root} is "
            f"already in the model ({len(vocab0.experiments)} experiments) and chroms "
            f"{chroms} are all the parent's. Ingest the new experiments into the store first "
            "(`epiray ingest --resume`), name them, or name a new chromosome."
        )
    exps = store.experiments().set_index("experiment")
    records = [
        (e, exps.loc[e, "biosample"], exps.loc[e, "assay"], exps.loc[e, "species"]) for e in new
    ]
    checksums = {e: store.summary["experiments"][e].get("checksum") for e in new}
    checksums = {e: c for e, c in checksums.items() if c}
    new_b = sorted({b for _, b, _, _ in records} - set(vocab0.biosamples))
    new_a = sorted({a for _, _, a, _ in records} - set(vocab0.assays))
    label = f"{meta0['label']}+{cfg.name}"
    out = cfg.out or str(first.run_dir.parent)
    train_cfg_base = TrainConfig(
        store=str(store.root),
        out=out,
        assembly=assembly,
        chroms=chroms,
        model=ModelSection(name=model_name, params=meta0["params"]),
        synteny=meta0.get("aux_name") if meta0.get("aux") else None,
        aux_species=bool(meta0.get("aux")),
        folds=FoldSection(scheme="all"),
        validation=cfg.validation,
        train=cfg.train,
        scaling=cfg.scaling,
        tracking=cfg.tracking,
        value_dtype=cfg.value_dtype or "float32",
        predict_heldout=False,
        baseline=False,
        variant_name=label,
    )
    plan = ExtensionPlan(cfg, store, parents, label, new_b, new_a, new)
    storage = storage_path(train_cfg_base)
    source_chrom = next((c for c in chroms if c in parents), None)
    if new_chroms and new and source_chrom is None:  # extended by an earlier call?
        source_chrom = next(
            (c for c in parents if any((Path(storage) / f"{label}.{c}.{fold}").glob("*_final"))),
            None,
        )
    if new_chroms and new and source_chrom is None:
        raise ConfigError(
            f"extend: chroms {new_chroms} are new to the model, and so are "
            f"{', '.join(new_b + new_a)}; their factors are fitted on a chromosome the parent "
            f"was trained on first. Add one of {parent_chroms} to chroms."
        )
    if new_chroms and model_name != "avocado" and not finetune:
        raise ConfigError(
            f"extend: chroms {new_chroms} are new to {model_name}, which has no per-chromosome "
            "parameters; with finetune: [] nothing would train. Set finetune (e.g. "
            f"{list(EDICE_FINETUNE)}), or leave the new chromosomes out."
        )
    source_chrom = source_chrom or parent_chroms[0]
    for chrom in [c for c in chroms if c in parents] + new_chroms:
        kind: Literal["rows", "chrom"] = "rows" if chrom in parents else "chrom"
        if kind == "rows" and not new:
            continue
        parent = parents.get(chrom)
        base = parent or parents[source_chrom]
        nb = store.n_bins(assembly, chrom)
        pv = Vocabulary.from_dict(base.meta["vocab"])
        vocab = pv.extend(records, checksums=checksums) if records else pv
        vocab = replace(vocab.for_chrom(chrom, nb), store_hash=store.summary.get("manifest_hash"))
        known = [e for e in base.meta.get("train", []) if e not in new]
        model_train = known + new
        if kind == "rows":
            fit = list(new) if model_name == "avocado" else model_train
            aux_name = None if model_name == "avocado" else base.meta.get("aux_name")
            aux = [] if model_name == "avocado" else list(base.meta.get("aux") or [])
            source_run = str(base.run_dir)
            source_text = base.run_dir.name
            workers = len(base.meta["shards"]) if model_name == "avocado" else None
        else:
            fit = model_train
            aux_name = base.meta.get("aux_name")
            aux = list(base.meta.get("aux") or [])
            src_name = f"{label if new else meta0['label']}.{source_chrom}.{fold}"
            source_run = str(Path(storage) / src_name) if new else str(base.run_dir)
            source_text = src_name
            workers = None
        scaling = cfg.scaling
        if workers is not None and workers != scaling.num_workers:
            if "scaling" in cfg.model_fields_set and cfg.scaling.num_workers != workers:
                log.info(
                    "extend %s: %d workers, as the parent (Avocado's genome factors are per "
                    "worker slab), not scaling.num_workers %d",
                    chrom,
                    workers,
                    cfg.scaling.num_workers,
                )
            scaling = scaling.model_copy(update={"num_workers": workers})
        holdout = cfg.validation.cells_holdout(len(fit), nb)
        tcfg = train_cfg_base.model_copy(update={"chroms": [chrom], "scaling": scaling})
        name = f"{label}.{chrom}.{fold}"
        record = {
            "kind": kind,
            "parent_run": str(base.run_dir),
            "parent_checkpoint": str(base.checkpoint),
            "parent_label": meta0["label"],
            "new_biosamples": new_b,
            "new_assays": new_a,
            "new_experiments": new,
            "finetune": finetune,
        }
        spec = RunSpec(
            store=str(store.root),
            assembly=assembly,
            chrom=chrom,
            fold=fold,
            model=model_name,
            params=meta0["params"],
            vocab=vocab.to_dict(),
            train=fit,
            validate=[],
            evaluate=[],
            unscored=[],
            aux_name=aux_name,
            aux=aux,
            loop=cfg.train.model_dump(mode="json"),
            value_dtype=tcfg.value_dtype,
            out_dir=str(Path(storage) / name),
            store_hash=store.store_hash,
            label=label,
            holdout=holdout,
            refit=cfg.validation.refit and holdout is not None,
            threads=None if scaling.threads_per_worker == "auto" else scaling.threads_per_worker,
            extra={
                "extend": {
                    "kind": kind,
                    "source_run": source_run,
                    "finetune": finetune,
                    "meta": {
                        "train": model_train,
                        "validate": list(base.meta.get("validate") or []),
                        "aux": list(base.meta.get("aux") or []),
                        "aux_name": base.meta.get("aux_name"),
                        "fit": fit,
                    },
                    "record": record,
                }
            },
        )
        spec.summary = _summary(
            label,
            chrom,
            fold,
            kind,
            model_name,
            source_text,
            fit,
            new_b,
            new_a,
            finetune,
            holdout,
        )
        tags = {
            "epiray.parent_checkpoint": str(base.checkpoint),
            "epiray.extends": base.run_dir.name,
            "epiray.extension": kind,
            "epiray.new_biosamples": ",".join(new_b) or "-",
            "epiray.new_assays": ",".join(new_a) or "-",
        }
        run = PlannedRun(spec, tcfg, kind, parent, tags)
        run.resumes = _earlier_output(Path(spec.out_dir), record)
        plan.runs.append(run)
    if not plan.runs:
        raise ConfigError(
            f"extend: nothing to do for chroms {chroms}; expected new experiments or a new "
            "chromosome."
        )
    return plan


def _earlier_output(run_dir: Path, record: dict[str, Any]) -> Path | None:
    """The latest checkpoint of an extension run already written with the same parent and new
    experiments (the job is being re-run), or None when there is none.

    Raises
    ------
    ConfigError
        ``run_dir`` holds checkpoints of another model or another extension.
    """
    if not run_dir.is_dir():
        return None
    ckpts = sorted(p for p in run_dir.glob("epoch*") if (p / META).is_file())
    if not ckpts:
        return None
    try:
        meta = json.loads((ckpts[-1] / META).read_text())
    except (OSError, ValueError):
        return None
    got = meta.get("extend") or {}
    keys = ("parent_checkpoint", "new_experiments", "kind")
    if any(got.get(k) != record[k] for k in keys):
        raise ConfigError(
            f"extend: run folder {run_dir} already holds another model (parent "
            f"{got.get('parent_checkpoint', 'none')}, new experiments "
            f"{got.get('new_experiments', 'none')}); expected a new folder. Choose another "
            "`name`, another `out`, or delete that folder."
        )
    return ckpts[-1]


# ------------------------------------------------------------------------------------ driver
def extend(cfg: ExtendConfig, plan: ExtensionPlan | None = None) -> list[RunResult]:
    """Run the ``extend`` job: check everything (:func:`plan_extension`), then train every run
    with Ray Train, one after another. As with ``epiray train``, a run started again resumes
    from its latest checkpoint (a killed run finishes; more ``train.epochs`` continue it)."""
    from epiray.runtime import ensure_ray
    from epiray.train import run_one

    plan = plan or plan_extension(cfg)
    resolved = plan.config
    Path(plan.runs[0].train_cfg.out).mkdir(parents=True, exist_ok=True)
    ensure_ray()
    results = []
    for run in plan.runs:
        base = run.parent or next(iter(plan.parents.values()))
        parent_id = _parent_mlflow_run(base, run.train_cfg.tracking, run.train_cfg.out)
        tags = dict(run.tags)
        link = None
        if parent_id:
            tags["epiray.parent_run"] = parent_id
            link = parent_id if _in_tracking_store(parent_id, run.train_cfg) else None
        one = resolved.model_copy(update={"chroms": [run.spec.chrom]})
        results.append(run_one(run.spec, run.train_cfg, parent=link, tags=tags, config=one))
    return results


def _in_tracking_store(run_id: str, tcfg: TrainConfig) -> bool:
    if not tcfg.tracking.enabled:
        return False
    try:
        from epiray.tracking import client

        client(tcfg.tracking.resolved_uri(tcfg.out)).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - another tracking store: the tag still names it
        return False


# ------------------------------------------------------------------------------------ worker
def _load_source(path: Path, device: torch.device) -> tuple[Any, TrainState]:
    """A trained model and its loop state from a rank file, rebuilt on its own slab (its
    vocabulary and bins), whatever the data of the run that extends it."""
    payload = read_checkpoint(
        path, fix="Extend a parent trained by `epiray train` of this version (retrain it)."
    )
    cls = get_model(payload["model"])
    prm = cls.Params.model_validate(payload["params"])
    vocab = Vocabulary.from_dict(payload["vocab"])
    slab = payload.get("slab") or {}
    lo = int(slab.get("lo") or 0)
    hi = int(slab["hi"]) if slab.get("hi") is not None else vocab.n_bins
    stub = ChromData(
        chrom=vocab.chrom,
        lo=lo,
        hi=hi,
        n_bins=vocab.n_bins,
        values=torch.zeros(1, 1, device=device).expand(1, hi - lo),
        biosample=torch.zeros(1, dtype=torch.long, device=device),
        assay=torch.zeros(1, dtype=torch.long, device=device),
    )
    model = cls.from_state(prm, vocab, stub, payload["state_dict"])
    return model, TrainState.from_dict(payload["loop"])


def _carried_state(state: TrainState, model: Any, new: set[str]) -> TrainState:
    """The parent's Adam moments of the dense parameters the extended model still has, with
    the same shapes (frozen ones are carried into every checkpoint; ``new`` parameters start
    at zero); the genome (sparse) moments stay in the parent's checkpoint."""
    params = dict(model.named_parameters())

    def keep(name: str, st: dict[str, Any]) -> bool:
        p = params.get(name)
        if p is None or name in new:
            return False
        return all(
            not (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape)
            for v in st.values()
        )

    return TrainState(dense_opt={k: v for k, v in state.dense_opt.items() if keep(k, v)})


def start_extension(
    spec: RunSpec, data: ChromData, rank: int
) -> tuple[Any, TrainState, dict[str, Any]]:
    """The worker's starting model of an extension run (``spec.extra["extend"]``).

    Returns
    -------
    (model, start_state, meta)
        The model with only what is new trainable, the loop state to start from (the parent's
        dense Adam moments), and what the run's ``meta.json`` records beside the usual.
    """
    from epiray.train import final_checkpoint

    ext = spec.extra["extend"]
    vocab = Vocabulary.from_dict(spec.vocab)
    src = final_checkpoint(ext["source_run"])
    avocado_rows = ext["kind"] == "rows" and spec.model == "avocado"
    model, state = _load_source(src / f"rank{rank if avocado_rows else 0}.pt", data.device)
    before = dict(model.named_parameters())
    if avocado_rows:
        if (model.lo, model.hi) != (data.lo, data.hi):
            raise EpirayError(
                f"extend {spec.label} {spec.chrom}: worker {rank} owns bins [{data.lo}, "
                f"{data.hi}) but its parent worker owned [{model.lo}, {model.hi}); expected "
                "the parent's shards (as many workers as the parent)."
            )
        model.extend(vocab)
    elif ext["kind"] == "rows":
        model.extend(vocab)
    elif spec.model == "avocado":
        model = type(model).transfer(model, data, vocab)
    else:  # eDICE on another chromosome: the same names; only `finetune` trains
        model.extend(vocab)
        for p in model.parameters():
            p.requires_grad_(False)
    if ext["finetune"]:
        model.unfreeze(set(ext["finetune"]))
    model.to(data.device)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    new = {n for n, p in model.named_parameters() if before.get(n) is not p}
    start = _carried_state(state, model, new if ext["kind"] == "rows" else set())
    if rank == 0:
        log.info(
            "extend: %s from %s; training %s",
            spec.label,
            src,
            ", ".join(trainable),
        )
    record = {**ext["record"], "source_checkpoint": str(src), "trainable": trainable}
    return model, start, {**ext["meta"], "extend": record}


def resume_extension(spec: RunSpec, model: Any, meta_path: Path) -> dict[str, Any]:
    """Make a model resumed from an extension checkpoint train what it trained before (the
    parameters listed in its ``meta.json``); returns the meta it records."""
    meta = json.loads(Path(meta_path).read_text())
    record = meta.get("extend") or {}
    names = set(record.get("trainable") or [])
    if not names:
        raise EpirayError(
            f"extend {spec.label} {spec.chrom}: checkpoint {meta_path.parent} lists no trainable "
            "parameters; expected a checkpoint written by `epiray extend`. Delete the run "
            "folder and extend again."
        )
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return {**spec.extra["extend"]["meta"], "extend": record}
