"""Shared fixtures: the real reference data, a local Ray runtime, small generated inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def ci_requires_run(item: pytest.Item) -> bool:
    """Whether ``item`` may not be skipped in this session: under ``CI=true`` (as ``.ci/run``
    sets it), a test marked ``browser`` must run, since CI installs headless Chromium for it."""
    return os.environ.get("CI") == "true" and item.get_closest_marker("browser") is not None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``CI=true``, a skipped ``browser`` test (the MLflow UI in headless Chromium) is a
    failure: a CI run that never opened the UI must not pass as green."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and ci_requires_run(item):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} was skipped under CI=true ({reason}). CI must run the browser "
            "tests: .ci/run installs headless Chromium (apt-get install chromium, or "
            "chromium-browser) so that `chromium` or `chromium-browser` is on PATH; install "
            "it, or run with CI unset to allow the skip."
        )
    return report


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
    # The heaviest Ray tests (sweeps, the two-node cluster) run last.
    last = ("test_sweep.py", "test_multinode.py")
    items.sort(key=lambda i: i.path.name in last)


@pytest.fixture(autouse=True)
def _isolated_mlflow_env():
    """``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI`` into ``os.environ``; every
    process a later test starts would inherit it and log to that test's store. Restore the
    ``MLFLOW_*`` variables after each test."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        if k not in before:
            del os.environ[k]
    os.environ.update(before)


@pytest.fixture
def one_torch_thread():
    """Tiny models on the shared cores: one intra-op thread is faster than two and avoids spin
    contention. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def one_torch_thread_seeded(one_torch_thread):
    """:func:`one_torch_thread`, with torch's global RNG seeded to 0 before each test."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real reference data); tests using it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the session, with more logical CPUs than cores (Ray Data's
    read tasks starve on 2 cores otherwise)."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        # as epiray's own local runtime (runtime.ensure_ray): no preemption watcher on one
        # machine (why the suite runs in two processes: scripts/test.sh)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # workers inherit the environment at ray.init; an earlier mlflow.set_tracking_uri in
        # this process must not become their MLFLOW_TRACKING_URI
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            logging_level="ERROR",
        )
    yield ray
    # left running for the session; pytest's exit shuts it down


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """Write a manifest-like TSV from dicts (header: every key, in first-seen order)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["\t".join(cols)] + ["\t".join(str(r.get(c, "")) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def small_bigwigs(tmp_path):
    """Three bigWigs constant per 25 bp bin on a 2-chromosome assembly, with a manifest.

    Returns (manifest path, chrom sizes dict, truth dict experiment -> chrom -> raw bin values).
    """
    from epiray.bigwig import write_bigwig

    sizes = {"chr1": 25 * 2000 + 7, "chr2": 25 * 700}
    rng = np.random.default_rng(0)
    (tmp_path / "genomes").mkdir()
    (tmp_path / "genomes" / "toy1.chrom.sizes").write_text(
        "".join(f"{c}\t{n}\n" for c, n in sizes.items())
    )
    truth, rows = {}, []
    for i, (bio, assay) in enumerate([("B1", "H3K4me3"), ("B2", "H3K4me3"), ("B1", "CTCF")]):
        exp = f"{bio}.{assay}"
        tracks = {c: np.round(rng.gamma(1.0, 2.0, -(-n // 25)), 3) for c, n in sizes.items()}
        write_bigwig(tmp_path / f"{exp}.bw", sizes, tracks, 25)
        truth[exp] = tracks
        rows.append(
            {
                "experiment": exp,
                "species": "mouse",
                "assembly": "toy1",
                "biosample": bio,
                "assay": assay,
                "category": "protein_binding" if assay == "CTCF" else "histone_modification",
                "path": f"{exp}.bw",
            }
        )
        del i
    return write_tsv(tmp_path / "manifest.tsv", rows), sizes, truth


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, ray_local):
    """A tiny synthetic human+mouse compendium ingested into a float32 store (session-wide).

    Returns (synthetic result, Store).
    """
    from epiray import synthetic
    from epiray.ingest import IngestConfig, ingest

    root = tmp_path_factory.mktemp("tiny")
    res = synthetic.generate(root / "data", seed=3, params=synthetic.SynthParams.tiny())
    store = ingest(
        IngestConfig(manifest=str(res.manifest), store=str(root / "store"), chroms="all")
    )
    return res, store
