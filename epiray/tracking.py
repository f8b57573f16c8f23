"""MLflow tracking: experiment and run naming, params, metrics, artifacts and the logged model.

One MLflow *experiment* per config (``tracking.experiment``); one *run* per trained
(model, chromosome, fold), named ``f"{model}.{chrom}.fold{k}"`` (``+ ".{trial}"`` in sweeps), never
timestamped. Fold and chromosome runs hang under parent runs through MLflow's
``mlflow.parentRunId`` tag. A run records:

* params — the resolved config flattened to dotted keys (``model.params.n_layers``), values
  truncated to ``max_param_length`` characters (the full config is the ``config.yaml`` artifact),
  logged in batches of at most 100 (MLflow's limit);
* metrics — per epoch (``train/loss``, ``val/mse``; ``step`` = epoch) and final values;
* artifacts — ``config.yaml``, the per-experiment score table ``scores/scores.parquet`` and
  ``scores/scores.csv`` (read back by :func:`load_scores`), PNG plots under ``plots/``;
* the trained model — an MLflow 3 *logged model* named ``model`` that both
  ``mlflow.pyfunc.load_model`` (:class:`ImputationPyfunc`, a DataFrame-in/DataFrame-out imputer)
  and ``mlflow.pytorch.load_model`` (the :class:`~epiray.models.ImputationModel` itself) load from
  ``runs:/<run_id>/model`` or ``models:/<model_id>`` (MLflow resolves those through its global
  tracking URI; :func:`load_model` takes the URI explicitly). Loading needs ``epiray``
  importable: the module is pickled by reference to its class;
* tags — ``epiray.model``/``chrom``/``fold``/``trial``, the git commit
  (``mlflow.source.git.commit``, ``epiray.git.dirty``) and the epiray version;
* its input — the track store as an MLflow dataset (name, content hash as digest, location,
  a profile of what it holds; :meth:`TrackedRun.log_dataset`).

Every experiment epiray creates or reuses is tagged ``mlflow.experimentKind =
custom_model_development``, so the MLflow UI opens it on its runs table (the machine-learning
view) rather than on the GenAI overview of traces and tokens. Parent runs (quickstart, sweep)
hold the comparison of their children as metrics, ``heldout_<metric>/<model>/<fold>``
(:func:`log_heldout_comparison`), which the UI charts.

Everything goes through an explicit :class:`mlflow.MlflowClient` and explicit run ids — no active
run, no global tracking URI — so it works the same on the driver, in Ray workers and in threads.
Only the driver or world rank 0 logs (:func:`is_logging_rank`); elsewhere :func:`start_run`
returns a disabled run whose methods do nothing. A run used as a context manager always ends
``FINISHED``, ``FAILED`` (an exception) or ``KILLED`` (``KeyboardInterrupt``/``SystemExit``/
cancellation); runs still open at interpreter exit are ended ``KILLED``.

The tracking URI defaults to ``sqlite:///mlflow.db`` resolved against the job's output
directory; any ``http(s)://`` server works (use one when several processes log at once). The
plain ``./mlruns`` file store is refused by MLflow 3 unless ``MLFLOW_ALLOW_FILE_STORE`` is set:
:class:`TrackingConfig` refuses it up front unless ``allow_file_store: true``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, Field, ValidationInfo, field_validator

import epiray
from epiray.config import Section
from epiray.errors import ConfigError, EpirayError, InputDataError

logger = logging.getLogger(__name__)

#: MLflow's per-request limits (mlflow.utils.validation): params/tags and metrics per batch.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
#: Longest param value every MLflow server accepts (older servers: 500; 3.x: 6000).
DEFAULT_MAX_PARAM_LENGTH = 500
_MAX_KEY_LENGTH = 250
_MAX_TAG_LENGTH = 5000
#: Artifact paths of a run.
CONFIG_ARTIFACT = "config.yaml"
SCORES_ARTIFACT = "scores/scores.parquet"
SCORES_CSV_ARTIFACT = "scores/scores.csv"
MODEL_NAME = "model"
#: Tag keys.
TAG_PARENT = "mlflow.parentRunId"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_BRANCH = "mlflow.source.git.branch"
TAG_GIT_DIRTY = "epiray.git.dirty"
TAG_VERSION = "epiray.version"
TAG_ERROR = "epiray.error"
#: Experiment tag the MLflow 3 UI reads to choose an experiment's view, and epiray's value:
#: the runs table of a model-training experiment, not the GenAI overview (traces, tokens).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


# ---------------------------------------------------------------------------------------------
# Configuration and URIs
# ---------------------------------------------------------------------------------------------


def _scheme(uri: str) -> str:
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", uri)
    # A single letter before ":" is a Windows drive, not a scheme.
    return match.group(1).lower() if match and len(match.group(1)) > 1 else ""


def is_file_store(uri: str) -> bool:
    """Whether ``uri`` names MLflow's file store (``./mlruns``, a path, ``file:``)."""
    return _scheme(uri) in ("", "file")


def resolve_tracking_uri(
    uri: str, base_dir: str | Path | None = None, allow_file_store: bool = False
) -> str:
    """Make a tracking URI absolute and check MLflow will accept it.

    Parameters
    ----------
    uri
        ``sqlite:///relative.db`` (resolved against ``base_dir``), ``sqlite:////abs/path.db``,
        ``http(s)://host[:port]``, another SQLAlchemy database URI, ``databricks``, or a file
        store (``./mlruns``, ``file:///path``).
    base_dir
        Directory relative SQLite and file-store paths resolve against (the job's output
        directory); default the current working directory.
    allow_file_store
        Accept a file store (MLflow 3 refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, which
        :func:`client` then sets for this process).

    Returns
    -------
    str
        The absolute URI (``sqlite:////abs/mlflow.db``, ``file:///abs/mlruns``) or ``uri``
        unchanged for servers and other databases.

    Raises
    ------
    ConfigError
        For a file store without ``allow_file_store``, or an empty SQLite path.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    scheme = _scheme(uri)
    if scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(
                f"tracking.tracking_uri: no database file in {uri!r}; expected "
                f"sqlite:///PATH.db, got {uri!r}. Name a file, e.g. sqlite:///mlflow.db."
            )
        if path == ":memory:":
            return uri
        p = Path(path).expanduser()
        return "sqlite:///" + str(p if p.is_absolute() else (base / p).resolve())
    if scheme in ("", "file"):
        if not allow_file_store:
            raise ConfigError(
                f"tracking.tracking_uri: {uri!r} is an MLflow file store, which MLflow "
                f"{mlflow.__version__} refuses (maintenance mode); expected sqlite:///PATH.db or "
                f"http(s)://HOST:PORT, got {uri!r}. Use the default sqlite:///mlflow.db "
                "(migrate old runs with `mlflow migrate-filestore`), or set "
                "tracking.allow_file_store: true."
            )
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        path = path[len("file:") :] if path.startswith("file:") else path
        p = Path(path or "mlruns").expanduser()
        return (p if p.is_absolute() else (base / p).resolve()).as_uri()
    return uri


#: ``MLFLOW_TRACKING_URI`` as the process started with (a cluster's MLflow server). Read once:
#: ``mlflow.set_tracking_uri`` rewrites the variable inside the process, which must not
#: redirect configs that leave the URI unset.
ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


class TrackingConfig(Section):
    """The ``tracking`` section: where and how runs are recorded.

    Attributes
    ----------
    enabled
        Record runs at all (off: every logging call is a no-op).
    tracking_uri
        MLflow tracking URI; relative SQLite paths resolve against the job's output directory.
    experiment
        MLflow experiment name (one per config).
    artifact_location
        Artifact root of a *new* experiment; default ``mlartifacts/`` beside a SQLite database
        (a server chooses its own). Ignored for an existing experiment.
    allow_file_store
        Accept MLflow's deprecated file store (``./mlruns``).
    log_model
        Log the trained model with each run (one logged model per worker shard: ``model``,
        or ``model-shard0``, ``model-shard1``, ... when several workers split the chromosome).
    log_model_max_context_mb
        A model that imputes from observed tracks (eDICE) is logged with them (float16 as
        stored) when they take at most this many MB; a larger context is left out (the run is
        tagged ``epiray.model_context=bin_range``, a warning says so) and the logged model
        imputes only when given a context (the trained run's checkpoint and store always can).
    max_param_length
        Longest param value logged; longer values are cut (the full config is an artifact).
    tags
        Extra tags on every run.
    """

    enabled: bool = True
    # Declared before tracking_uri: the URI's validator reads it.
    allow_file_store: bool = False
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = Field("epiray", min_length=1, max_length=500)
    artifact_location: str | None = None
    log_model: bool = True
    log_model_max_context_mb: float = Field(1024.0, ge=0)
    max_param_length: int = Field(DEFAULT_MAX_PARAM_LENGTH, ge=16, le=6000)
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("tracking_uri")
    @classmethod
    def _check_uri(cls, uri: str, info: ValidationInfo) -> str:
        if is_file_store(uri) and not info.data.get("allow_file_store", False):
            raise ValueError(
                f"{uri!r} is an MLflow file store, which MLflow {mlflow.__version__} refuses; "
                "expected sqlite:///PATH.db or http(s)://HOST. Use sqlite:///mlflow.db, or set "
                "tracking.allow_file_store: true"
            )
        return uri

    def resolved_uri(self, base_dir: str | Path | None = None) -> str:
        """The tracking URI made absolute against ``base_dir`` (:func:`resolve_tracking_uri`).

        When the config leaves ``tracking_uri`` unset, ``MLFLOW_TRACKING_URI`` from the
        environment wins over the default (the cluster manifests set it to the MLflow server).
        """
        uri = self.tracking_uri
        if ENV_TRACKING_URI and "tracking_uri" not in self.model_fields_set:
            uri = ENV_TRACKING_URI
        return resolve_tracking_uri(uri, base_dir, self.allow_file_store)

    def resolved_artifact_location(self, base_dir: str | Path | None = None) -> str | None:
        """Artifact root for a new experiment: the configured one (relative paths against
        ``base_dir``), else ``mlartifacts/`` beside a SQLite database, else None (server's)."""
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        if self.artifact_location:
            loc = self.artifact_location
            if _scheme(loc) in ("", "file") and not loc.startswith("file:"):
                p = Path(loc).expanduser()
                return (p if p.is_absolute() else (base / p).resolve()).as_uri()
            return loc
        uri = self.resolved_uri(base_dir)
        if _scheme(uri) == "sqlite" and uri != "sqlite:///:memory:":
            return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        return None


def client(tracking_uri: str) -> MlflowClient:
    """An :class:`mlflow.MlflowClient` bound to an absolute ``tracking_uri`` (no global state).

    For a file store the process-wide opt-in ``MLFLOW_ALLOW_FILE_STORE=true`` is set (only
    reached when the config allowed it); a SQLite database's folder is created.
    """
    if is_file_store(tracking_uri):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    elif _scheme(tracking_uri) == "sqlite" and tracking_uri.startswith("sqlite:////"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


# ---------------------------------------------------------------------------------------------
# Naming, ranks, params, git
# ---------------------------------------------------------------------------------------------


def run_name(
    model: str,
    chrom: str | None = None,
    fold: int | str | None = None,
    trial: int | str | None = None,
) -> str:
    """Run name ``f"{model}.{chrom}.fold{k}"`` (+ ``".{trial}"``); absent parts are left out.

    Parameters
    ----------
    model
        Model name (registry name or a variant such as ``avocado_synteny``).
    chrom
        Chromosome, e.g. ``"chr19"``.
    fold
        Fold index ``k``.
    trial
        Sweep trial: an int gives ``".trial{n}"``, a string (a Ray Tune trial id) is appended
        as is.

    Returns
    -------
    str
        E.g. ``"avocado.chr19.fold0"``, ``"avocado.fold2"`` (a fold parent),
        ``"avocado.chr19.fold0.trial3"``. No timestamps: names identify the work, MLflow
        records the times.
    """
    parts = [str(model)]
    if chrom is not None:
        parts.append(str(chrom))
    if fold is not None:
        parts.append(f"fold{fold}")
    if trial is not None:
        parts.append(f"trial{trial}" if isinstance(trial, int) else str(trial))
    return ".".join(parts)


def is_logging_rank(rank: int | None = None) -> bool:
    """Whether this process records to MLflow: the driver (``rank=None``) or world rank 0.

    Parameters
    ----------
    rank
        The Ray Train world rank (``ray.train.get_context().get_world_rank()``), or None on the
        driver / outside Ray Train.
    """
    return rank is None or int(rank) == 0


def flatten_params(config: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a (resolved) config into dotted keys with string values.

    Parameters
    ----------
    config
        A pydantic config (dumped in JSON mode, so paths and enums become strings) or a mapping.
    prefix
        Prepended to every key, e.g. ``"train."``.

    Returns
    -------
    dict
        ``{"model.params.n_layers": "2", ...}``; strings are kept, other leaves are JSON
        (``true``, ``null``, ``[1, 2]``); empty mappings become ``"{}"``.
    """
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, BaseModel):
            node = node.model_dump(mode="json")
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, str):
            out[key] = node
        else:
            try:
                out[key] = json.dumps(node, default=str)
            except (TypeError, ValueError):
                out[key] = str(node)

    walk(config, prefix.rstrip("."))
    return out


def _clean_key(key: str) -> str:
    # MLflow keys: alphanumerics, _ - . space / (colons are refused on Windows servers).
    clean = re.sub(r"[^\w.\- /]", "_", key)
    if len(clean) > _MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        clean = clean[: _MAX_KEY_LENGTH - 9] + "~" + digest
    return clean


def _fit_params(params: Mapping[str, str], max_length: int) -> tuple[dict[str, str], list[str]]:
    out: dict[str, str] = {}
    truncated = []
    for k, v in params.items():
        v = str(v)
        if len(v) > max_length:
            v = v[: max_length - 3] + "..."
            truncated.append(k)
        out[_clean_key(k)] = v
    return out, truncated


@lru_cache(maxsize=8)
def git_tags(repo_dir: str | None = None) -> dict[str, str]:
    """Git commit, branch and dirty flag of the epiray checkout (or ``repo_dir``).

    Parameters
    ----------
    repo_dir
        A directory inside a git work tree; default the one holding the ``epiray`` package,
        falling back to the working directory.

    Returns
    -------
    dict
        ``mlflow.source.git.commit``, ``mlflow.source.git.branch``, ``epiray.git.dirty``
        (``"true"``/``"false"``, tracked files only); empty when git or the work tree is missing
        (e.g. an installed wheel in a container — child runs then copy their parent's tags).
    """
    candidates = [repo_dir] if repo_dir else [str(Path(epiray.__file__).parent), os.getcwd()]
    for d in candidates:
        try:

            def git(*args: str, d: str = d) -> str:
                return subprocess.run(
                    ["git", "-C", d, *args], capture_output=True, text=True, timeout=10, check=True
                ).stdout.strip()

            commit = git("rev-parse", "HEAD")
            branch = git("rev-parse", "--abbrev-ref", "HEAD")
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            continue
        return {TAG_GIT_COMMIT: commit, TAG_GIT_BRANCH: branch, TAG_GIT_DIRTY: str(dirty).lower()}
    logger.debug("no git work tree found in %s; runs carry no commit tag", candidates)
    return {}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

_open_runs: dict[str, TrackedRun] = {}
_open_lock = threading.Lock()
_atexit_registered = False


def _end_open_runs() -> None:
    with _open_lock:
        runs = list(_open_runs.values())
    for run in runs:
        run.end("KILLED")


def _register_open(run: TrackedRun) -> None:
    global _atexit_registered
    with _open_lock:
        _open_runs[run.run_id] = run
        if not _atexit_registered:
            atexit.register(_end_open_runs)
            _atexit_registered = True


def _experiment_id(mlc: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if needed; tagged as a model-training experiment
    (:data:`TAG_EXPERIMENT_KIND`) unless it already has a kind (a user's choice is kept)."""
    exp = mlc.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlc.create_experiment(
                name,
                artifact_location=artifact_location,
                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
            )
        except MlflowException:
            # Another process (a Ray worker, a parallel trial) created it first.
            exp = mlc.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(
            f"tracking.experiment: MLflow experiment {name!r} is deleted; expected an active "
            f"experiment, got lifecycle_stage 'deleted'. Restore it (`mlflow experiments "
            f"restore --experiment-id {exp.experiment_id}`) or choose another name."
        )
    if TAG_EXPERIMENT_KIND not in (exp.tags or {}):
        # an experiment made before epiray set the kind (or by hand): MLflow's UI would open
        # it on the GenAI overview
        with contextlib.suppress(MlflowException):
            mlc.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return exp.experiment_id


def _metric_value(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().item()
    return float(v)


class TrackedRun:
    """One MLflow run, addressed by id through its own client; a no-op when disabled.

    Create it with :func:`start_run` (or :meth:`child`). Use it as a context manager so that it
    always ends: ``FINISHED`` on success, ``FAILED`` on an exception, ``KILLED`` on
    ``KeyboardInterrupt``, ``SystemExit`` or task cancellation.

    Attributes
    ----------
    run_id
        MLflow run id, or None when disabled (non-zero rank, tracking off).
    tracking_uri
        Absolute tracking URI, or None when disabled.
    config
        The :class:`TrackingConfig` it was started with.
    """

    def __init__(
        self,
        config: TrackingConfig,
        mlc: MlflowClient | None,
        run_id: str | None,
        experiment_id: str | None,
        base_dir: Path | None,
    ) -> None:
        self.config = config
        self._client = mlc
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = mlc.tracking_uri if mlc is not None else None
        self._base_dir = base_dir
        self._ended = run_id is None
        self._lock = threading.Lock()

    # -- state --------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Picklable (e.g. passed to a Ray task): the copy rebuilds its client from the URI. It
        # is not registered for the exit hook; the process that started the run ends it.
        state = self.__dict__.copy()
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self.tracking_uri is not None:
            self._client = client(self.tracking_uri)

    @property
    def enabled(self) -> bool:
        """Whether calls record anything."""
        return self.run_id is not None

    @property
    def client(self) -> MlflowClient | None:
        """The run's client (None when disabled)."""
        return self._client

    def __repr__(self) -> str:
        return f"TrackedRun(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
            return
        killed = issubclass(exc_type, (KeyboardInterrupt, SystemExit, GeneratorExit)) or (
            exc_type.__name__ in ("TaskCancelledError", "CancelledError")
        )
        if self.enabled and not self._ended:
            with contextlib.suppress(Exception):
                self.set_tags({TAG_ERROR: f"{exc_type.__name__}: {exc}"[:_MAX_TAG_LENGTH]})
        self.end("KILLED" if killed else "FAILED")

    def end(self, status: RunStatus = "FINISHED") -> None:
        """End the run with ``status`` (idempotent; errors reaching MLflow are logged, not
        raised, so they never hide the exception that ended the run)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        with _open_lock:
            _open_runs.pop(self.run_id, None)
        try:
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:  # the server may be gone at exit; never mask the real error
            logger.warning("could not end MLflow run %s as %s: %s", self.run_id, status, err)

    # -- children -----------------------------------------------------------------------------
    def child(
        self,
        model: str | None = None,
        chrom: str | None = None,
        fold: int | str | None = None,
        trial: int | str | None = None,
        name: str | None = None,
        params: BaseModel | Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        resume: bool = False,
    ) -> TrackedRun:
        """Start a nested run (``mlflow.parentRunId`` = this run) in the same experiment.

        Parameters are those of :func:`start_run`; ``model`` defaults to this run's
        ``epiray.model`` tag. A disabled run gives disabled children.
        """
        if not self.enabled:
            return TrackedRun(self.config, None, None, None, self._base_dir)
        if model is None and name is None:
            model = self._client.get_run(self.run_id).data.tags.get("epiray.model")
        return start_run(
            self.config,
            model=model,
            chrom=chrom,
            fold=fold,
            trial=trial,
            name=name,
            params=params,
            tags=tags,
            parent=self,
            base_dir=self._base_dir,
            resume=resume,
        )

    # -- logging ------------------------------------------------------------------------------
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values stringified and cut to 5,000 characters)."""
        if not self.enabled or not tags:
            return
        items = [RunTag(_clean_key(k), str(v)[:_MAX_TAG_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_params(self, params: BaseModel | Mapping[str, Any], prefix: str = "") -> None:
        """Log a config (or any nested mapping) as flattened dotted params.

        Values longer than ``config.max_param_length`` are cut (ending ``...``) and their keys
        listed in the ``epiray.truncated_params`` tag. Batches of 100. Re-logging an identical
        value is allowed (MLflow params are immutable otherwise).

        Raises
        ------
        EpirayError
            When a param already logged on this run has a different value (a resumed run with
            a changed config).
        """
        if not self.enabled:
            return
        flat, truncated = _fit_params(flatten_params(params, prefix), self.config.max_param_length)
        existing = self._client.get_run(self.run_id).data.params
        changed = [k for k, v in flat.items() if k in existing and existing[k] != v]
        if changed:
            k = changed[0]
            raise EpirayError(
                f"MLflow run {self.run_id}: param {k!r} was logged as {existing[k]!r}; expected "
                f"the same value on resume, got {flat[k]!r} ({len(changed)} changed). Start a "
                "new run (resume: false) for a changed config."
            )
        items = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        if truncated:
            logger.info(
                "run %s: %d param value(s) cut to %d characters: %s",
                self.run_id,
                len(truncated),
                self.config.max_param_length,
                truncated,
            )
            self.set_tags({"epiray.truncated_params": ",".join(truncated)})

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = ""
    ) -> None:
        """Log scalar metrics (floats, numpy or 0-d torch values) at ``step``.

        Parameters
        ----------
        metrics
            ``{name: value}``; ``prefix`` is prepended to each name (e.g. ``"val/"``).
        step
            Step (the epoch for training curves); default 0.
        prefix
            Name prefix.
        """
        if not self.enabled or not metrics:
            return
        ts = int(time.time() * 1000)
        items = [
            Metric(_clean_key(f"{prefix}{k}"), _metric_value(v), ts, int(step or 0))
            for k, v in metrics.items()
        ]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def log_epoch(
        self,
        epoch: int,
        train: Mapping[str, Any] | None = None,
        val: Mapping[str, Any] | None = None,
        **other: Mapping[str, Any],
    ) -> None:
        """Log one epoch's metrics as ``train/<name>`` and ``val/<name>`` with ``step=epoch``.

        Parameters
        ----------
        epoch
            Epoch number (the MLflow step).
        train, val
            Training and validation metrics, e.g. ``{"loss": 0.05}``, ``{"mse": 0.06}``.
        **other
            Further groups, e.g. ``time={"epoch_s": 12.3}`` → ``time/epoch_s``.
        """
        merged: dict[str, Any] = {}
        for group, values in {"train": train, "val": val, **other}.items():
            for k, v in (values or {}).items():
                merged[f"{group}/{k}"] = v
        self.log_metrics(merged, step=epoch)

    def _log_file(self, data: bytes, artifact_file: str) -> None:
        artifact_dir, _, filename = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="epiray-artifact-") as tmp:
            path = Path(tmp) / filename
            path.write_bytes(data)
            self._client.log_artifact(self.run_id, str(path), artifact_dir or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log a text artifact at ``artifact_file`` (e.g. ``"reports/table.md"``)."""
        if self.enabled:
            self._log_file(text.encode(), artifact_file)

    def log_config(
        self, config: BaseModel | Mapping[str, Any] | str, artifact_file: str = CONFIG_ARTIFACT
    ) -> None:
        """Log the resolved config as YAML (``config.yaml``): the permanent record of the run.

        Parameters
        ----------
        config
            A pydantic config (dumped in JSON mode), a mapping, or YAML text.
        artifact_file
            Artifact path.
        """
        if not self.enabled:
            return
        if isinstance(config, BaseModel):
            config = config.model_dump(mode="json")
        text = config if isinstance(config, str) else yaml.safe_dump(dict(config), sort_keys=False)
        self.log_text(text, artifact_file)

    def log_table(self, df: pd.DataFrame, name: str) -> None:
        """Log a table as ``{name}.parquet`` and ``{name}.csv``.

        Parameters
        ----------
        df
            The table (index dropped unless named).
        name
            Artifact path without extension, e.g. ``"tables/comparison"``.
        """
        if not self.enabled:
            return
        keep_index = any(n is not None for n in df.index.names)
        buf = io.BytesIO()
        df.to_parquet(buf, index=keep_index)
        self._log_file(buf.getvalue(), f"{name}.parquet")
        self._log_file(df.to_csv(index=keep_index).encode(), f"{name}.csv")

    def log_scores(self, scores: pd.DataFrame) -> None:
        """Log the per-experiment score table (``scores/scores.parquet`` and ``.csv``).

        Parameters
        ----------
        scores
            Long frame, one row per (model, experiment[, chrom]) with ``model, experiment,
            biosample, assay, category, fold, chrom`` and the metric columns (see
            :mod:`epiray.evaluate`). :func:`load_scores` reads it back.

        Raises
        ------
        InputDataError
            When ``model`` or ``experiment`` is missing.
        """
        if not self.enabled:
            return
        missing = [c for c in ("model", "experiment") if c not in scores.columns]
        if missing:
            raise InputDataError(
                f"MLflow run {self.run_id}: score table lacks {missing}; expected columns "
                f"model, experiment, ... and metrics, got {list(scores.columns)}. Add them."
            )
        self.log_table(scores.reset_index(drop=True), SCORES_ARTIFACT.removesuffix(".parquet"))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Log a PNG plot: a matplotlib Figure, PNG bytes, or a path to a PNG file.

        Parameters
        ----------
        figure
            ``matplotlib.figure.Figure`` (rendered with :func:`epiray.plots.figure_to_png`),
            ``bytes`` or a path.
        artifact_file
            E.g. ``"plots/tracks_E003.png"``.
        """
        if not self.enabled:
            return
        if isinstance(figure, (bytes, bytearray)):
            data = bytes(figure)
        elif isinstance(figure, (str, Path)):
            data = Path(figure).read_bytes()
        else:
            from epiray.plots import figure_to_png

            data = figure_to_png(figure)
        self._log_file(data, artifact_file)

    def log_dataset(
        self,
        name: str,
        digest: str,
        source: str | Path,
        profile: Mapping[str, Any] | None = None,
        context: str = "training",
    ) -> None:
        """Record a dataset as an input of the run (the UI's *Datasets used*; the run table's
        ``Dataset`` column), as an MLflow meta dataset: name, digest and location, no data.

        Logging the same dataset again (a resumed run) adds nothing.

        Parameters
        ----------
        name
            Dataset name, e.g. the store folder's name.
        digest
            A stable hash of its content (the store hash): runs on the same data share it.
        source
            Where it lives: a local path (recorded as a ``file://`` URI) or a URI.
        profile
            A small JSON-serialisable summary (counts of experiments, assemblies, ...).
        context
            The ``mlflow.data.context`` input tag, e.g. ``"training"``.
        """
        if not self.enabled:
            return
        from mlflow.data.dataset_source_registry import (
            get_dataset_source_from_json,
            resolve_dataset_source,
        )
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        uri = str(source)
        if "://" not in uri:
            uri = Path(uri).expanduser().resolve().as_uri()
        if uri.startswith("file:"):
            src = get_dataset_source_from_json(json.dumps({"uri": uri}), "local")
        else:  # s3://, gs://, ...: MLflow's own source type for the scheme
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                src = resolve_dataset_source(uri)
        entity = MetaDataset(src, name=name, digest=digest)._to_mlflow_entity()
        if profile is not None:  # a meta dataset has no profile of its own
            entity = Dataset(
                entity.name,
                entity.digest,
                entity.source_type,
                entity.source,
                entity.schema,
                json.dumps(dict(profile), default=str, sort_keys=True),
            )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)] if context else []
        self._client.log_inputs(self.run_id, [DatasetInput(entity, tags)])

    def log_model(
        self,
        model: torch.nn.Module,
        data: Any = None,
        name: str = MODEL_NAME,
        step: int = 0,
    ) -> str | None:
        """Log a trained model loadable by ``mlflow.pyfunc`` and ``mlflow.pytorch``.

        Parameters
        ----------
        model
            An :class:`~epiray.models.ImputationModel` (``vocab`` and
            ``predict(data, biosample, assay)``); its class must be importable where the model
            is loaded (it is pickled by reference).
        data
            The :class:`~epiray.models.ChromData` its ``predict`` reads, stored with the model
            (tensors copied to CPU). Pass :func:`prediction_context` ``(data)`` to drop the
            tracks when ``predict`` does not read them (Avocado: only the bin range matters);
            keep them for models that impute from observed tracks (eDICE). None: an empty
            context over the model's bins (:func:`prediction_context`).
        name
            Logged-model name (``runs:/<run_id>/<name>``).
        step
            Step the model belongs to (e.g. the final epoch).

        Returns
        -------
        str or None
            The MLflow model id (``models:/<id>``), None when disabled.
        """
        if not self.enabled:
            return None
        context = data if data is not None else prediction_context(None, model=model)
        lm = self._client.create_logged_model(
            self.experiment_id,
            name=name,
            source_run_id=self.run_id,
            tags={"epiray.model_class": f"{type(model).__module__}.{type(model).__qualname__}"},
        )
        try:
            with tempfile.TemporaryDirectory(prefix="epiray-model-") as tmp:
                path = Path(tmp) / name
                save_model(model, path, context, mlflow_model=_mlflow_model(lm, self.run_id))
                self._client.log_model_artifacts(lm.model_id, str(path))
            self._client.log_outputs(self.run_id, [LoggedModelOutput(lm.model_id, step=step)])
            self._client.finalize_logged_model(lm.model_id, "READY")
        except BaseException:
            with contextlib.suppress(Exception):
                self._client.finalize_logged_model(lm.model_id, "FAILED")
            raise
        return lm.model_id


def start_run(
    config: TrackingConfig,
    model: str | None = None,
    chrom: str | None = None,
    fold: int | str | None = None,
    trial: int | str | None = None,
    name: str | None = None,
    params: BaseModel | Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    parent: TrackedRun | str | None = None,
    rank: int | None = None,
    base_dir: str | Path | None = None,
    resume: bool = False,
) -> TrackedRun:
    """Start (or resume) a run of ``config.experiment``; use the result as a context manager.

    Parameters
    ----------
    config
        The tracking section.
    model, chrom, fold, trial
        Identify the work: the run name is :func:`run_name` of them and each becomes an
        ``epiray.<field>`` tag.
    name
        Explicit run name instead (e.g. ``"sweep"``); ``model`` or ``name`` is required.
    params
        The resolved config (or any mapping) to log as flattened params.
    tags
        Extra tags (added to ``config.tags``).
    parent
        Parent run (a :class:`TrackedRun` or run id — pass the id to Ray workers) for the
        ``mlflow.parentRunId`` tag.
    rank
        Ray Train world rank; only rank 0 (or None, the driver) records — elsewhere the run is
        disabled.
    base_dir
        Output directory relative tracking URIs resolve against (default: working directory).
    resume
        Reuse the newest unfinished run of the same name and parent if there is one (a retried
        Ray task), instead of starting a new run.

    Returns
    -------
    TrackedRun
        Disabled when tracking is off or ``rank`` is not 0.

    Raises
    ------
    ConfigError
        When neither ``model`` nor ``name`` is given, for a refused tracking URI or a deleted
        experiment.
    """
    base = Path(base_dir) if base_dir is not None else None
    if not config.enabled or not is_logging_rank(rank):
        return TrackedRun(config, None, None, None, base)
    if name is None:
        if model is None:
            raise ConfigError(
                "start_run: no run name; expected model (and chrom, fold, trial) or name, got "
                "neither. Pass model=... as in the config."
            )
        name = run_name(model, chrom, fold, trial)
    mlc = client(config.resolved_uri(base))
    experiment_id = _experiment_id(mlc, config.experiment, config.resolved_artifact_location(base))
    parent_id = parent.run_id if isinstance(parent, TrackedRun) else parent
    if isinstance(parent, TrackedRun) and not parent.enabled:
        parent_id = None

    all_tags: dict[str, str] = {TAG_VERSION: epiray.__version__, **config.tags}
    for key, value in (("model", model), ("chrom", chrom), ("fold", fold), ("trial", trial)):
        if value is not None:
            all_tags[f"epiray.{key}"] = str(value)
    git = git_tags()
    if not git and parent_id:
        parent_tags = mlc.get_run(parent_id).data.tags
        git = {
            k: parent_tags[k]
            for k in (TAG_GIT_COMMIT, TAG_GIT_BRANCH, TAG_GIT_DIRTY)
            if k in parent_tags
        }
    all_tags |= git
    if parent_id:
        all_tags[TAG_PARENT] = parent_id
    all_tags |= dict(tags or {})

    run_id = None
    if resume:
        run_id = _find_resumable(mlc, experiment_id, name, parent_id)
        if run_id:
            mlc.update_run(run_id, status="RUNNING")
            logger.info("resuming MLflow run %s (%s)", name, run_id)
    if run_id is None:
        run = mlc.create_run(
            experiment_id, run_name=name, tags={_clean_key(k): str(v) for k, v in all_tags.items()}
        )
        run_id = run.info.run_id
        logger.info("MLflow run %s (%s) in experiment %r", name, run_id, config.experiment)
    tracked = TrackedRun(config, mlc, run_id, experiment_id, base)
    _register_open(tracked)
    try:
        if resume:
            tracked.set_tags(all_tags)
        if params is not None:
            tracked.log_params(params)
    except BaseException:
        tracked.end("FAILED")
        raise
    return tracked


def _find_resumable(
    mlc: MlflowClient, experiment_id: str, name: str, parent_id: str | None
) -> str | None:
    escaped = name.replace("'", "\\'")
    flt = f"attributes.run_name = '{escaped}' and attributes.status != 'FINISHED'"
    if parent_id:
        flt += f" and tags.`{TAG_PARENT}` = '{parent_id}'"
    runs = mlc.search_runs(
        [experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def _fold_step(fold: str, position: int) -> int:
    # "fold3" -> 3; other fold names (manifest folds, "all") by position
    tail = fold[4:] if fold.startswith("fold") else ""
    return int(tail) if tail.isdigit() else position


def log_heldout_comparison(
    run: TrackedRun,
    scores: pd.DataFrame,
    metric: str = "mse",
    name: str | None = None,
) -> dict[str, float]:
    """Log each model's held-out mean ``metric`` per fold on a parent run, for the UI's charts.

    Per fold, the mean is the ``overall`` column of :func:`epiray.evaluate.comparison_table`
    (over the experiments every model of the fold scored, as the printed table is).

    Parameters
    ----------
    run
        The parent run (quickstart, sweep); nothing is logged when it is disabled.
    scores
        Long score table with ``model``, ``experiment``, ``fold`` and ``metric`` (one row per
        model, experiment and chromosome of each fold).
    metric
        The metric column, e.g. ``"mse"``.
    name
        Metric name prefix; default ``heldout_<metric>``.

    Returns
    -------
    dict
        ``{"<name>/<model>/<fold>": mean}`` as logged (step 0). Each model's values are also
        logged as one series ``<name>/<model>`` with the fold index as step (``fold2`` -> 2),
        which the UI draws as a line across folds.
    """
    from epiray.evaluate import comparison_table

    name = name or f"heldout_{metric}"
    out: dict[str, float] = {}
    if not run.enabled or not len(scores) or not {"model", "fold", metric} <= set(scores):
        return out
    folds = list(dict.fromkeys(str(f) for f in scores["fold"]))
    folds.sort(key=lambda f: (_fold_step(f, 10**9), f))
    for position, fold in enumerate(folds):
        sub = scores[scores["fold"].astype(str) == fold]
        if not sub[metric].notna().any():
            continue
        table = comparison_table(sub, metric=metric)
        series = {}
        for model, value in table["overall"].items():
            if value is not None and np.isfinite(value):
                out[f"{name}/{model}/{fold}"] = float(value)
                series[f"{name}/{model}"] = float(value)
        run.log_metrics(series, step=_fold_step(fold, position))
    run.log_metrics(out)
    return out


# ---------------------------------------------------------------------------------------------
# The model: pyfunc wrapper + pytorch flavour in one MLflow model directory
# ---------------------------------------------------------------------------------------------


def prediction_context(data: Any = None, model: torch.nn.Module | None = None) -> Any:
    """A :class:`~epiray.models.ChromData` carrying only a bin range, no tracks.

    Parameters
    ----------
    data
        A ChromData: its chromosome and bin range ``[lo, hi)`` are kept, its tracks dropped
        (``values`` becomes ``[0, hi-lo]``; auxiliary and validation tracks None).
    model
        Used when ``data`` is None: the range is ``[model.lo, model.hi)`` when the model has
        them (a worker's slab), else the whole chromosome of ``model.vocab``.

    Returns
    -------
    ChromData
        On CPU.
    """
    from epiray.models import ChromData

    if data is None:
        vocab = getattr(model, "vocab", None)
        if vocab is None:
            raise EpirayError(
                f"log_model: model {type(model).__name__} has no vocab; expected an "
                "ImputationModel with .vocab, got none. Pass data= (a ChromData) explicitly."
            )
        # Models whose genome factors cover one worker's slab (Avocado) carry its lo/hi.
        n_bins = int(vocab.n_bins)
        chrom, lo, hi = (
            vocab.chrom,
            int(getattr(model, "lo", 0)),
            int(getattr(model, "hi", n_bins)),
        )
    else:
        chrom, lo, hi, n_bins = data.chrom, int(data.lo), int(data.hi), int(data.n_bins)
    return ChromData(
        chrom=chrom,
        lo=lo,
        hi=hi,
        n_bins=n_bins,
        values=torch.zeros(0, hi - lo),
        biosample=torch.zeros(0, dtype=torch.long),
        assay=torch.zeros(0, dtype=torch.long),
    )


def _context_state(data: Any) -> dict[str, Any]:
    return {
        f.name: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
        for f in fields(data)
        for v in [getattr(data, f.name)]
    }


def _mlflow_model(lm: Any, run_id: str) -> Any:
    from mlflow.models import Model

    return Model(
        artifact_path=lm.artifact_location,
        run_id=run_id,
        model_uuid=lm.model_id,
        model_id=lm.model_id,
    )


class _DropPickleNotice(logging.Filter):
    # MLflow warns on every pickled save. We pickle deliberately: predict(data, biosample,
    # assay) is not forward(), so the pt2 (torch.export) format cannot capture it.
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "CloudPickle" not in msg and "Pickle or CloudPickle" not in msg


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "biosample"),
                ColSpec("string", "assay"),
                ColSpec("long", "start", required=False),
                ColSpec("long", "end", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("string", "biosample"),
                ColSpec("string", "assay"),
                ColSpec("string", "chrom"),
                ColSpec("long", "bin"),
                ColSpec("float", "value"),
            ]
        ),
    )


def save_model(
    model: torch.nn.Module, path: str | Path, data: Any = None, mlflow_model: Any = None
) -> Path:
    """Write an MLflow model directory with the pyfunc and pytorch flavours.

    Layout: ``MLmodel`` (flavours ``python_function`` → :class:`ImputationPyfunc` and
    ``pytorch`` → ``artifacts/pytorch_model/data``), ``artifacts/pytorch_model/`` (an
    ``mlflow.pytorch`` model of the module, pickled), ``artifacts/context.pt`` (the ChromData
    ``predict`` reads, as a dict of CPU tensors) and ``artifacts/vocabulary.json``.

    Parameters
    ----------
    model
        The ImputationModel.
    path
        Directory to create (must not exist).
    data
        ChromData context (see :meth:`TrackedRun.log_model`); None: :func:`prediction_context`.
    mlflow_model
        Pre-filled ``mlflow.models.Model`` (ids of a logged model), or None.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import mlflow.pytorch
    from mlflow.models import Model

    path = Path(path)
    if path.exists():
        raise EpirayError(
            f"save_model {path}: the directory already exists; expected a new path. Choose "
            "another path or remove it."
        )
    context = data if data is not None else prediction_context(None, model=model)
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    flt = _DropPickleNotice()
    loggers = [logging.getLogger("mlflow.pytorch"), logging.getLogger("mlflow.pyfunc")]
    with tempfile.TemporaryDirectory(prefix="epiray-model-") as tmp:
        staged = Path(tmp)
        torch_dir = staged / "pytorch_model"
        for lg in loggers:
            lg.addFilter(flt)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mlflow.pytorch.save_model(
                    model,
                    str(torch_dir),
                    serialization_format="pickle",
                    pip_requirements=requirements,
                )
                torch.save(_context_state(context), staged / "context.pt")
                vocab = getattr(model, "vocab", None)
                vocab_json = staged / "vocabulary.json"
                vocab_json.write_text(
                    json.dumps(vocab.to_dict() if hasattr(vocab, "to_dict") else {}, indent=1)
                )
                mlflow.pyfunc.save_model(
                    str(path),
                    python_model=ImputationPyfunc(),
                    artifacts={
                        "pytorch_model": str(torch_dir),
                        "context": str(staged / "context.pt"),
                        "vocabulary": str(vocab_json),
                    },
                    pip_requirements=requirements + [f"epiray=={epiray.__version__}"],
                    signature=_signature(),
                    # Declared so that load_model(model_config={"device": ...}) may override it.
                    model_config={"device": None},
                    mlflow_model=mlflow_model,
                )
        finally:
            for lg in loggers:
                lg.removeFilter(flt)
    # The same directory also loads with mlflow.pytorch.load_model.
    meta = Model.load(str(path / "MLmodel"))
    meta.add_flavor(
        "pytorch",
        model_data="artifacts/pytorch_model/data",
        pytorch_version=str(torch.__version__),
        code=None,
    )
    meta.save(str(path / "MLmodel"))
    return path


class ImputationPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around any :class:`~epiray.models.ImputationModel`.

    ``predict`` takes a DataFrame with columns ``biosample`` and ``assay`` (names in the model's
    vocabulary) and optional ``start``/``end`` (global **bin** indices on the model's chromosome,
    0-based half-open, default the whole range the model covers) and returns the imputed
    arcsinh signal as a long DataFrame: ``biosample, assay, chrom, bin, value`` (one row per
    bin, in input order). Load with ``mlflow.pyfunc.load_model(uri)``; pass
    ``model_config={"device": "cuda"}`` to impute on a GPU (default: CUDA when available).
    """

    def load_context(self, context: Any) -> None:
        """Load the module and its ChromData context from the model's artifacts."""
        import mlflow.pytorch

        from epiray.models import ChromData, default_device

        device = (getattr(context, "model_config", None) or {}).get("device")
        device = torch.device(device) if device else default_device()
        self.model = mlflow.pytorch.load_model(
            context.artifacts["pytorch_model"], map_location=device
        )
        self.model.to(device).eval()
        state = torch.load(context.artifacts["context"], map_location=device, weights_only=True)
        self.data = ChromData(**state)
        vocab = getattr(self.model, "vocab", None)
        if vocab is None:
            from epiray.models import Vocabulary

            vocab = Vocabulary.from_dict(
                json.loads(Path(context.artifacts["vocabulary"]).read_text())
            )
        self.vocab = vocab

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Impute the requested (biosample, assay) tracks over their bin windows."""
        return impute_frame(self.model, self.data, model_input, vocab=self.vocab)


def impute_frame(
    model: torch.nn.Module, data: Any, requests: pd.DataFrame, vocab: Any = None
) -> pd.DataFrame:
    """Impute tracks for a request table (the pyfunc's ``predict``, usable directly).

    Parameters
    ----------
    model
        An ImputationModel.
    data
        The ChromData its ``predict`` reads (bins ``[data.lo, data.hi)``).
    requests
        Columns ``biosample``, ``assay`` and optional ``start``/``end`` (global bin indices;
        missing or NaN means the whole range).
    vocab
        Vocabulary for the name lookups (default ``model.vocab``).

    Returns
    -------
    pandas.DataFrame
        ``biosample, assay, chrom, bin (int64), value (float32)``, one row per requested bin.

    Raises
    ------
    InputDataError
        For a missing column or a window outside ``[data.lo, data.hi)``.
    EpirayError
        For an unknown biosample or assay (from the vocabulary).
    """
    vocab = vocab if vocab is not None else model.vocab
    missing = [c for c in ("biosample", "assay") if c not in requests.columns]
    if missing:
        raise InputDataError(
            f"imputation request: columns {missing} missing; expected biosample, assay "
            f"[, start, end], got {list(requests.columns)}. Add them."
        )
    lo, hi = int(data.lo), int(data.hi)
    cache: dict[tuple[int, int], np.ndarray] = {}
    frames = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, rec in enumerate(requests.itertuples(index=False)):
                row = rec._asdict()
                b = vocab.biosample_index(str(row["biosample"]))
                a = vocab.assay_index(str(row["assay"]))
                start = _bin_or(row.get("start"), lo)
                end = _bin_or(row.get("end"), hi)
                if not lo <= start < end <= hi:
                    raise InputDataError(
                        f"imputation request row {i} ({row['biosample']}, {row['assay']}) on "
                        f"{data.chrom}: bad bin window; expected {lo} <= start < end <= {hi}, "
                        f"got [{start}, {end}). Give global bin indices inside the model's range."
                    )
                if (b, a) not in cache:
                    track = model.predict(data, b, a)
                    cache[(b, a)] = track.detach().float().cpu().numpy().reshape(-1)
                values = cache[(b, a)][start - lo : end - lo]
                frames.append(
                    pd.DataFrame(
                        {
                            "biosample": str(row["biosample"]),
                            "assay": str(row["assay"]),
                            "chrom": data.chrom,
                            "bin": np.arange(start, end, dtype=np.int64),
                            "value": values.astype(np.float32),
                        }
                    )
                )
    finally:
        model.train(was_training)
    if not frames:
        return pd.DataFrame(
            {
                "biosample": pd.Series(dtype=str),
                "assay": pd.Series(dtype=str),
                "chrom": pd.Series(dtype=str),
                "bin": pd.Series(dtype=np.int64),
                "value": pd.Series(dtype=np.float32),
            }
        )
    return pd.concat(frames, ignore_index=True)


def _bin_or(value: Any, default: int) -> int:
    if value is None:
        return default
    try:
        if math.isnan(float(value)):
            return default
    except (TypeError, ValueError):
        return default
    return int(value)


def find_logged_model(mlc: MlflowClient, run_id: str, name: str = MODEL_NAME) -> Any:
    """The newest READY logged model ``name`` that run ``run_id`` produced.

    Raises
    ------
    InputDataError
        When the run logged no such model.
    """
    run = mlc.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    candidates = [mlc.get_logged_model(o.model_id) for o in outputs]
    candidates = [m for m in candidates if m.name == name and str(m.status).endswith("READY")]
    if not candidates:
        raise InputDataError(
            f"MLflow run {run_id} ({run.info.run_name}): no logged model {name!r}; expected a "
            f"model logged with TrackedRun.log_model, got {len(outputs)} other output(s). Check "
            "the run id or tracking.log_model."
        )
    return max(candidates, key=lambda m: m.creation_timestamp or 0)


def load_model(
    tracking_uri: str,
    run_or_model_id: str,
    flavor: Literal["pyfunc", "pytorch"] = "pyfunc",
    name: str = MODEL_NAME,
    device: str | None = None,
) -> Any:
    """Load a logged model without touching MLflow's global tracking URI.

    (MLflow's ``runs:/`` and ``models:/`` resolution looks logged models up through the global
    tracking URI; this resolves the model with an explicit client, then loads its files.)

    Parameters
    ----------
    tracking_uri
        Absolute tracking URI (see :func:`resolve_tracking_uri`).
    run_or_model_id
        The run that logged the model, or the model id (``m-...``).
    flavor
        ``"pyfunc"`` (an ``mlflow.pyfunc.PyFuncModel`` whose ``predict`` takes the request
        DataFrame, see :class:`ImputationPyfunc`) or ``"pytorch"`` (the ImputationModel).
    name
        Logged-model name, when a run id is given.
    device
        Device to load onto (default: CUDA when available for pyfunc; as saved for pytorch).

    Returns
    -------
    mlflow.pyfunc.PyFuncModel or torch.nn.Module
    """
    import mlflow.artifacts
    import mlflow.pytorch

    mlc = client(tracking_uri)
    if run_or_model_id.startswith("m-"):
        lm = mlc.get_logged_model(run_or_model_id)
    else:
        lm = find_logged_model(mlc, run_or_model_id, name)
    with tempfile.TemporaryDirectory(prefix="epiray-load-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=lm.artifact_location, dst_path=tmp, tracking_uri=mlc.tracking_uri
        )
        if flavor == "pytorch":
            kwargs = {"map_location": device} if device else {}
            return mlflow.pytorch.load_model(local, **kwargs)
        config = {"device": device} if device else None
        return mlflow.pyfunc.load_model(local, model_config=config)


# ---------------------------------------------------------------------------------------------
# Reading score tables back
# ---------------------------------------------------------------------------------------------


def _descendants(mlc: MlflowClient, experiment_id: str, run_id: str) -> list[Any]:
    # One search of the experiment, then the tree locally (MLflow filters have no tag IN).
    by_parent: dict[str, list[Any]] = {}
    for run in _search_all(mlc, experiment_id):
        parent = run.data.tags.get(TAG_PARENT)
        if parent:
            by_parent.setdefault(parent, []).append(run)
    found, frontier = [], [run_id]
    while frontier:
        children = [c for r in frontier for c in by_parent.get(r, [])]
        found += children
        frontier = [c.info.run_id for c in children]
    return found


def _search_all(mlc: MlflowClient, experiment_id: str, flt: str = "") -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = mlc.search_runs(
            [experiment_id],
            filter_string=flt,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def load_scores(
    tracking_uri: str, run_or_experiment: str, allow_file_store: bool = False
) -> pd.DataFrame:
    """Fetch the per-experiment score tables logged with :meth:`TrackedRun.log_scores`.

    Parameters
    ----------
    tracking_uri
        Tracking URI (relative SQLite paths resolve against the working directory).
    run_or_experiment
        A run id — its table and those of all its descendant runs — or an experiment name —
        the tables of every run in it.
    allow_file_store
        Read an old ``./mlruns`` file store.

    Returns
    -------
    pandas.DataFrame
        The tables concatenated in run end order (children before their parents), exact
        duplicate rows dropped (a parent may re-log its children's rows), with ``run_id`` and
        ``run_name`` of the first run that logged each row.

    Raises
    ------
    InputDataError
        When ``run_or_experiment`` matches neither a run nor an experiment, or no run logged a
        score table.
    """
    from epiray.evaluate import read_scores

    uri = resolve_tracking_uri(tracking_uri, allow_file_store=allow_file_store)
    mlc = client(uri)
    runs = None
    if re.fullmatch(r"[0-9a-f]{32}", run_or_experiment):
        try:
            root = mlc.get_run(run_or_experiment)
        except MlflowException:
            root = None
        if root is not None:
            runs = [root, *_descendants(mlc, root.info.experiment_id, root.info.run_id)]
    if runs is None:
        exp = mlc.get_experiment_by_name(run_or_experiment)
        if exp is None:
            names = [e.name for e in mlc.search_experiments()]
            raise InputDataError(
                f"MLflow {uri}: {run_or_experiment!r} is neither a run id nor an experiment; "
                f"expected a 32-hex run id or one of the experiments {names}, got "
                f"{run_or_experiment!r}. Check the name (`mlflow experiments search`)."
            )
        runs = _search_all(mlc, exp.experiment_id)
    # Children end before their parents: rows a parent re-logged are attributed to the child.
    runs = sorted(runs, key=lambda r: (r.info.end_time is None, r.info.end_time or 0))

    frames = []
    with tempfile.TemporaryDirectory(prefix="epiray-scores-") as tmp:
        for run in runs:
            listed = {f.path for f in mlc.list_artifacts(run.info.run_id, "scores")}
            for artifact in (SCORES_ARTIFACT, SCORES_CSV_ARTIFACT):
                if artifact in listed:
                    local = mlc.download_artifacts(
                        run.info.run_id, artifact, str(Path(tmp) / run.info.run_id)
                    )
                    df = read_scores(Path(local).read_bytes(), artifact)
                    df["run_id"] = run.info.run_id
                    df["run_name"] = run.info.run_name
                    frames.append(df)
                    break
    if not frames:
        raise InputDataError(
            f"MLflow {uri}: no score table in {run_or_experiment!r} ({len(runs)} run(s)); "
            f"expected an artifact {SCORES_ARTIFACT}, got none. Evaluate the runs first "
            "(TrackedRun.log_scores)."
        )
    scores = pd.concat(frames, ignore_index=True)
    data_columns = [c for c in scores.columns if c not in ("run_id", "run_name")]
    return scores.drop_duplicates(subset=data_columns, keep="first").reset_index(drop=True)
