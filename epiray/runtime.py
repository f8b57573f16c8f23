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


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once.

    Connects to the cluster named by ``RAY_ADDRESS`` (as set by ``ray job submit``) when
    present; otherwise starts a local runtime. Locally, Ray Data's read tasks starve when every
    CPU is taken by map tasks on a 2-core machine, so the local runtime advertises more logical
    CPUs than cores (``max(4, 2 × cores)`` unless ``num_cpus`` is given).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    n = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(
        num_cpus=n,
        include_dashboard=True,  # serves the State API that Ray Train's PG cleaner polls
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    log.info("started a local Ray runtime with %d logical CPUs", n)
