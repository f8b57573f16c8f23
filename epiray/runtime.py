"""Connecting to Ray: a cluster from the environment, or a local runtime."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: glibc malloc settings of CPU training workers (``scaling.cpu_malloc: reuse``). A training
#: step at paper sizes allocates and frees ~8 activation tensors of batch x 2,048 floats
#: (328 MB at 40,000); glibc serves each from a fresh ``mmap`` and returns it on free, so every
#: step page-faults ~2.6 GB back in. With no mmap, no trimming and one arena (Ray Train runs the
#: training function in a thread, whose own arena would mmap them again) freed activations
#: are reused: +12 % samples/s on the project's 2-core VM (``benchmarks/RESULTS.md``). The
#: worker's RSS then stays at its peak, which the memory estimate plans for anyway. Ignored by
#: other C libraries.
REUSE_MALLOC_TUNABLES = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
)


def malloc_environ(mode: str, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a process started with ``scaling.cpu_malloc``'s ``mode``: ``reuse``
    sets ``GLIBC_TUNABLES`` to :data:`REUSE_MALLOC_TUNABLES`, ``system`` removes it."""
    env = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    if mode == "reuse":
        env["GLIBC_TUNABLES"] = REUSE_MALLOC_TUNABLES
    return env


#: The environment variable through which every Ray process finds its cluster.
RAY_ADDRESS = "RAY_ADDRESS"
#: Ray Train's preemption watcher (an actor per run that polls for node drains); off on the local
#: runtime epiray starts: one node, which is never drained, and the actor's start logs a Ray
#: core error line on every run.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
#: Ray's notice on every local start; :func:`ensure_ray` says the same in its one line.
_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"

#: ``RAY_ADDRESS`` as this process exported it for the runtime it started or joined.
_exported: str | None = None
#: Whether :func:`ensure_ray` initialised Ray in this process.
_initialised = False
#: Whether :func:`ensure_ray` turned Ray Train's preemption watcher off.
_watcher_off = False


def ensure_ray(num_cpus: int | None = None) -> str:
    """Initialise Ray once and log one line saying which Ray it is; returns that line (empty
    when Ray was initialised already).

    In this order:

    1. ``RAY_ADDRESS`` set (by ``ray job submit``, or by the user): connect to that cluster.
    2. A cluster started on this machine by ``ray start`` (``/tmp/ray/ray_current_cluster``):
       join it (``num_cpus`` does not apply).
    3. Otherwise start a local runtime, whatever other Ray instances run on the machine. Ray
       Data's read tasks starve when every CPU is taken by map tasks on a 2-core machine, so it
       advertises more logical CPUs than cores (``max(4, 2 × cores)`` unless ``num_cpus`` is
       given).

    In cases 2 and 3 ``RAY_ADDRESS`` is then exported (in this process, hence its children) and
    set in every Ray worker of the job (:func:`ray_worker_setup`), so that nothing that looks
    for "the" local cluster by itself (Ray's state API, used by Ray Train's placement group
    cleaner) trips over other Ray instances on the machine.

    Raises
    ------
    EpirayError
        The cluster of case 1 or 2 cannot be reached.
    """
    import ray

    global _exported, _initialised, _watcher_off
    if ray.is_initialized():
        return ""
    quiet_ray_driver()
    env = os.environ.get(RAY_ADDRESS, "")
    if env and env == _exported:  # exported for a runtime this process started and shut down
        del os.environ[RAY_ADDRESS]
        env = ""
    _exported = None
    if _watcher_off:  # set for a local runtime this process started before
        os.environ.pop(PREEMPTION_WATCHER, None)
        _watcher_off = False
    if env:
        _connect(f"the cluster at RAY_ADDRESS={env}", address=env, log_to_driver=True)
        line = f"Ray: the cluster at RAY_ADDRESS={env} ({_resources()})"
        log.info(line)
        return line
    setup = {"worker_process_setup_hook": f"{__name__}.ray_worker_setup"}
    local = _ray_start_address()
    if local:
        where = f"the local cluster started by `ray start` at {local}"
        _connect(where, address=local, log_to_driver=True, runtime_env=setup)
        line = f"Ray: {where} ({_resources()})"
        if num_cpus:
            line += f"; num_cpus {num_cpus} does not apply to it"
    else:
        n = num_cpus or max(4, 2 * (os.cpu_count() or 1))
        if PREEMPTION_WATCHER not in os.environ:
            os.environ[PREEMPTION_WATCHER] = "0"
            _watcher_off = True
        ctx = ray.init(
            address="local",  # a new runtime, even with RAY_ADDRESS of another in the way
            num_cpus=n,
            include_dashboard=True,  # serves the State API that Ray Train's PG cleaner polls
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level=logging.WARNING,
            runtime_env=setup,
        )
        line = f"Ray: started a local runtime at {_address()} with {n} logical CPUs"
        if getattr(ctx, "dashboard_url", None):
            line += f", dashboard http://{ctx.dashboard_url}"
    _initialised = True
    os.environ[RAY_ADDRESS] = _exported = _address()
    others = _other_instances(_exported)
    if others:
        line += f"; {others} other Ray instance(s) on this machine left alone"
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        line += "; token authentication on"
    log.info(line)
    return line


def _connect(where: str, **init) -> None:
    global _initialised
    import ray

    try:
        ray.init(**init)
    except ConnectionError as e:
        from epiray.errors import EpirayError

        raise EpirayError(
            f"Ray: cannot connect to {where} ({e}); expected a running cluster there. Start "
            f"it, or unset {RAY_ADDRESS} (or run `ray stop` for a `ray start` cluster) to let "
            "epiray start a local runtime."
        ) from e
    _initialised = True


def _address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def ray_initialised_here() -> bool:
    """Whether :func:`ensure_ray` connected this process to Ray (and it has not been shut
    down by :func:`shutdown_ray` since)."""
    return _initialised


def shutdown_ray() -> None:
    """Disconnect from Ray (stopping a local runtime) if :func:`ensure_ray` connected this
    process: the command line does so before printing an error, so that the lines Ray workers
    are still forwarding come before the message, not after it."""
    global _initialised
    import sys

    ray = sys.modules.get("ray")
    if _initialised and ray is not None and ray.is_initialized():
        ray.shutdown()
    _initialised = False


def _resources() -> str:
    import ray

    res = ray.cluster_resources()
    out = f"{res.get('CPU', 0):g} CPUs"
    return out + (f", {res['GPU']:g} GPUs" if res.get("GPU") else "")


def _ray_start_address() -> str | None:
    """The address of the cluster the last ``ray start`` on this machine started or joined
    (what ``ray.init()`` connects to without an address), or None."""
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address() or None
    except (ImportError, OSError):  # pragma: no cover - Ray internals moved
        return None


def _other_instances(address: str) -> int:
    """How many Ray clusters other than the one at ``address`` run on this machine."""
    try:
        from ray._private.services import find_gcs_addresses

        return len(set(find_gcs_addresses()) - {address})
    except Exception:  # pragma: no cover - Ray internals moved; only for the log line
        return 0


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TOKEN_NOTICE)


class _ShortTrainErrors(logging.Filter):
    """In Ray Train workers and controllers: an :class:`~epiray.errors.EpirayError` raised by
    the training function is logged in a few lines, without its traceback (the driver reports
    it, with the traceback in its error log), and Ray's transient "failed to send resource
    request" warning loses its traceback. Every other error keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from epiray.errors import EpirayError, error_from_traceback, unwrap

        msg = str(record.msg)
        if msg.startswith("Error in training function"):  # the worker, traceback as text
            err = error_from_traceback(record.getMessage())
            if err is not None:
                record.msg, record.args = f"training failed: {type(err).__name__}: {err}", ()
        elif msg.startswith("[FailurePolicy]") and record.exc_info:  # the controller
            err = unwrap(record.exc_info[1])
            if isinstance(err, EpirayError):
                head = record.getMessage().split("\nError: ", 1)[0]
                record.msg, record.args = f"{head}\nError: {type(err).__name__}: {err}", ()
                record.exc_info, record.exc_text = None, None
        elif msg.startswith("Failed to send resource request"):
            record.exc_info, record.exc_text = None, None
        return True


_TRAIN_LOGGERS = (
    "ray.train.v2._internal.util",
    "ray.train.v2._internal.execution.failure_handling.default",
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)


def _add_filter(name: str, flt: logging.Filter) -> None:
    lg = logging.getLogger(name)
    if not any(type(f) is type(flt) for f in lg.filters):
        lg.addFilter(flt)


def quiet_ray_driver() -> None:
    """Drop Ray's token-authentication notice, printed on every local start (the line of
    :func:`ensure_ray` says whether token authentication is on). Other warnings stay."""
    _add_filter("ray._private.authentication.authentication_token_setup", _DropTokenNotice())


def ray_worker_setup() -> None:
    """Run by Ray at the start of every worker process of a job that :func:`ensure_ray`
    started or joined on this machine: exports ``RAY_ADDRESS`` as the worker's own cluster
    (Ray's state API, used by Ray Train's placement group cleaner, otherwise refuses to choose
    between several local Ray instances) and shortens Ray Train's logs of errors that the
    driver reports anyway."""
    import ray

    os.environ[RAY_ADDRESS] = ray.get_runtime_context().gcs_address
    for name in _TRAIN_LOGGERS:
        _add_filter(name, _ShortTrainErrors())
