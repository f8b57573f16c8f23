"""deploy/mlflow/run_server.sh: the MLflow tracking server epiray runs log to.

The server runs as a subprocess on a free loopback port with a SQLite backend and a proxied
local artifact store (``--artifacts-destination``). A real epiray training run (``epiray.train``:
Ray Train, one worker, Avocado on the tiny synthetic store) logs to it over HTTP, then the run
is read back the way other tools see it: the REST API, the artifact proxy, the logged model
loaded through MLflow, and (marked ``browser``, where Chromium is installed) the MLflow UI in
headless Chromium.

``EPIRAY_SCREENSHOT_DIR=docs pytest tests/test_mlflow_server.py -k mlflow_ui`` writes the UI
page of that run to ``docs/mlflow_run.png``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "mlflow" / "run_server.sh"
MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STARTUP_TIMEOUT_S = 150
# No telemetry from the server or the client: this test talks to loopback only.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
SCRIPT_SETTINGS = (
    "MLFLOW_HOST",
    "MLFLOW_ALLOWED_HOSTS",
    "MLFLOW_SERVER_ALLOWED_HOSTS",
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_WORKERS",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
)


# ---------------------------------------------------------------------------------------------
# The server


@dataclass
class Server:
    url: str
    port: int
    data_dir: Path
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, host: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """GET ``url`` (loopback only), optionally with another Host header; (status, body)."""
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1", url
    request = urllib.request.Request(url)
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(server: Server, endpoint: str, **query) -> dict:
    status, body = http(f"{server.url}{endpoint}?{urllib.parse.urlencode(query)}")
    assert status == 200, f"GET {endpoint} -> {status}: {body[:300]!r}"
    return json.loads(body)


def start_server(data_dir: Path, **env) -> Server:
    """Run deploy/mlflow/run_server.sh DATA_DIR PORT in its own process group; wait for
    /health."""
    port = free_loopback_port()
    log = data_dir.parent / f"{data_dir.name}.log"
    # The script's own settings come from ``env`` only, never from the caller's environment.
    inherited = {k: v for k, v in os.environ.items() if k not in SCRIPT_SETTINGS}
    full_env = {
        **inherited,
        **QUIET_ENV,
        "MLFLOW_BIN": str(MLFLOW_BIN),
        "MLFLOW_WORKERS": "1",
        **env,
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["bash", str(SCRIPT), str(data_dir), str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,  # its own process group: uvicorn is a child of mlflow
        )
    server = Server(f"http://127.0.0.1:{port}", port, data_dir, process, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"mlflow server exited with {process.returncode}:\n{server.log_tail()}"
            )
        try:
            if http(f"{server.url}/health", timeout=2)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise AssertionError(
        f"mlflow server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}"
    )


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count: on a machine
    whose PID 1 does not reap, orphans stay zombies)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_server(server: Server) -> None:
    """Stop the process group this test started (the script's PID leads it): SIGTERM, then
    SIGKILL for whatever is left after 15 s."""
    pgid = server.process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            server.process.poll()  # reap the leader
            if not group_alive(pgid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    server.process.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for key, value in QUIET_ENV.items():
            mp.setenv(key, value)
        srv = start_server(tmp_path_factory.mktemp("mlflow") / "data")
        try:
            yield srv
        finally:
            stop_server(srv)


# ---------------------------------------------------------------------------------------------
# The run: a real epiray training run, logged to the server


@dataclass
class EpirayRun:
    """A finished ``epiray.train`` run on the tiny store, and what it logged to the server."""

    cfg: object  # epiray.train.TrainConfig
    result: object  # epiray.train.RunResult
    store: object  # epiray.store.Store
    experiment_id: str
    run_id: str
    run_name: str
    model_id: str

    @property
    def history(self) -> pd.DataFrame:
        return self.result.history


def train_config(tracking_uri: str, store, out: Path):
    """Avocado at CPU test size (as in tests/test_train.py): one worker, two epochs, one
    validation track per assay (so ``val/mse`` has a curve too)."""
    from epiray.loop import LoopParams
    from epiray.tracking import TrackingConfig
    from epiray.train import (
        FoldSection,
        ModelSection,
        ScalingSection,
        TrainConfig,
        ValidationSection,
    )

    return TrainConfig(
        store=str(store.root),
        out=str(out),
        assembly="mmSyn1",
        chroms=["chr1"],
        model=ModelSection(
            name="avocado", params={"n_nodes": 32, "n_layers": 1, "n_assay_factors": 16}
        ),
        folds=FoldSection(scheme="experiment", k=3, fold=0),
        validation=ValidationSection(per_assay=1, min_train=1),
        train=LoopParams(epochs=2, batch_size=2048, patience=None),
        scaling=ScalingSection(num_workers=1, use_gpu=False),
        tracking=TrackingConfig(tracking_uri=tracking_uri, experiment="epiray-server"),
    )


def run_epiray(tracking_uri: str, store, out: Path) -> EpirayRun:
    """Train one (chromosome, fold) with ``epiray.train.train`` logging to ``tracking_uri``:
    params, per-epoch metrics (from the Ray Train worker), test scores, the resolved config and
    the trained model (``tracking.log_model``), all through the server."""
    from epiray import tracking
    from epiray.train import train

    cfg = train_config(tracking_uri, store, out)
    (result,) = train(cfg)
    mlc = tracking.client(tracking_uri)
    run = mlc.get_run(result.mlflow_run_id)
    model_id = tracking.find_logged_model(mlc, run.info.run_id).model_id
    return EpirayRun(
        cfg,
        result,
        store,
        run.info.experiment_id,
        run.info.run_id,
        run.info.run_name,
        model_id,
    )


@pytest.fixture(scope="module")
def epiray_run(server, tiny_store, tmp_path_factory) -> EpirayRun:
    _, store = tiny_store
    return run_epiray(server.url, store, tmp_path_factory.mktemp("epiray") / "runs")


def download(server: Server, run: EpirayRun, rel: str) -> bytes:
    """A run artifact through the server's artifact proxy (the route the UI and remote Ray
    workers use)."""
    status, body = http(
        f"{server.url}/api/2.0/mlflow-artifacts/artifacts/"
        f"{run.experiment_id}/{run.run_id}/artifacts/{rel}"
    )
    assert status == 200, f"{rel}: {status} {body[:300]!r}"
    return body


# ---------------------------------------------------------------------------------------------
# Tests


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) of sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                address, hex_port = fields[1].rsplit(":", 1)
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    found.add(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_server_listens_on_loopback_only(server):
    assert listening_addresses(server.port) == {"0100007F"}  # 127.0.0.1, little-endian hex


@pytest.mark.ray
def test_epiray_run_reads_back_over_the_rest_api(server, epiray_run):
    from epiray.tracking import flatten_params

    run = get_json(server, "/api/2.0/mlflow/runs/get", run_id=epiray_run.run_id)["run"]
    info = run["info"]
    assert info["status"] == "FINISHED"
    assert info["run_name"] == epiray_run.run_name == "avocado_mouse_only.chr1.fold0"
    assert info["experiment_id"] == epiray_run.experiment_id
    # Artifacts go through the server, not to a path the client would need to reach.
    assert info["artifact_uri"].startswith("mlflow-artifacts:/")
    experiment = get_json(
        server, "/api/2.0/mlflow/experiments/get", experiment_id=epiray_run.experiment_id
    )["experiment"]
    assert experiment["name"] == "epiray-server"
    assert experiment["artifact_location"].startswith("mlflow-artifacts:/")
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["epiray.model"] == "avocado_mouse_only"
    assert tags["epiray.chrom"] == "chr1" and tags["epiray.fold"] == "0"
    assert tags["epiray.checkpoint"] == epiray_run.result.checkpoint

    # Params: the resolved config, flattened (no value here reaches the 500-character cut).
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    expected = flatten_params(epiray_run.cfg)
    assert max(len(v) for v in expected.values()) < 500
    assert params == expected
    assert params["model.params.n_nodes"] == "32"
    assert params["train.epochs"] == "2" and params["scaling.num_workers"] == "1"
    assert params["tracking.tracking_uri"] == server.url

    # Per-epoch curves, logged by the Ray Train worker (rank 0) over HTTP: step = epoch.
    history = epiray_run.history
    assert list(history["epoch"]) == [1, 2]
    for key, column in (("train/mse", "train_mse"), ("val/mse", "val_mse")):
        points = get_json(
            server,
            "/api/2.0/mlflow/metrics/get-history",
            run_id=epiray_run.run_id,
            metric_key=key,
        )["metrics"]
        got = sorted((m["step"], m["value"]) for m in points)
        assert [s for s, _ in got] == [1, 2], key
        np.testing.assert_allclose([v for _, v in got], history[column], rtol=1e-6)
        assert np.isfinite([v for _, v in got]).all()

    # Final test metrics: the mean held-out scores of the run's own model.
    latest = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"train/mse", "train/examples_per_s", "val/mse", "test/mse", "test/pearson"} <= set(
        latest
    )
    scores = epiray_run.result.scores
    own = scores[scores["model"] == "avocado_mouse_only"]
    assert len(own) == len(epiray_run.result.spec.evaluate) > 0
    assert latest["test/mse"] == pytest.approx(own["mse"].mean(), rel=1e-9)
    assert latest["test/pearson"] == pytest.approx(own["pearson"].mean(), rel=1e-9)


@pytest.mark.ray
def test_epiray_artifacts_are_listed_served_and_stored_by_the_server(server, epiray_run):
    from epiray.tracking import load_scores

    listed = {}
    for folder in ("", "scores", "plots"):
        listing = get_json(
            server, "/api/2.0/mlflow/artifacts/list", run_id=epiray_run.run_id, path=folder
        )
        listed |= {f["path"]: f for f in listing["files"] if not f["is_dir"]}
    track_plots = [p for p in listed if p.startswith("plots/tracks_") and p.endswith(".png")]
    assert len(track_plots) == 1, sorted(listed)
    rels = (
        "config.yaml",
        "scores/scores.parquet",
        "scores/scores.csv",
        "plots/factors.png",
        "plots/mse_vs_average_activity.png",
        *track_plots,
    )
    assert set(rels) <= set(listed)
    for rel in rels:
        if rel.endswith(".png"):
            assert download(server, epiray_run, rel)[:8] == b"\x89PNG\r\n\x1a\n", rel
    stored_root = (
        server.data_dir / "artifacts" / epiray_run.experiment_id / epiray_run.run_id / "artifacts"
    )
    for rel in rels:
        body = download(server, epiray_run, rel)
        assert int(listed[rel]["file_size"]) == len(body)
        # ... and the bytes landed under --artifacts-destination.
        assert (stored_root / rel).read_bytes() == body
    # The resolved config, as the run used it.
    config = yaml.safe_load(download(server, epiray_run, "config.yaml"))
    assert config == epiray_run.cfg.model_dump(mode="json")
    # The score table: the same rows the run computed, read back by epiray itself.
    table = pd.read_parquet(io.BytesIO(download(server, epiray_run, "scores/scores.parquet")))
    pd.testing.assert_frame_equal(table, epiray_run.result.scores, check_dtype=False)
    back = load_scores(server.url, epiray_run.run_id)
    assert set(back["run_name"]) == {epiray_run.run_name}
    pd.testing.assert_frame_equal(
        back.drop(columns=["run_id", "run_name"]), epiray_run.result.scores, check_dtype=False
    )
    assert (server.data_dir / "mlflow.db").is_file()  # the SQLite backend store


@pytest.mark.ray
def test_epiray_model_loads_from_the_server_and_reproduces_the_run(server, epiray_run):
    import torch

    from epiray import tracking
    from epiray.metrics import score_track

    run = get_json(server, "/api/2.0/mlflow/runs/get", run_id=epiray_run.run_id)["run"]
    outputs = [o["model_id"] for o in run["outputs"]["model_outputs"]]
    assert outputs == [epiray_run.model_id]
    mlc = tracking.client(server.url)
    lm = mlc.get_logged_model(epiray_run.model_id)
    assert lm.name == tracking.MODEL_NAME and lm.source_run_id == epiray_run.run_id
    assert lm.artifact_location.startswith("mlflow-artifacts:/")
    # The model's files went through the proxy into --artifacts-destination.
    stored = (
        server.data_dir / "artifacts" / lm.artifact_location.removeprefix("mlflow-artifacts:/")
    )
    assert (stored / "MLmodel").is_file()
    assert (stored / "artifacts" / "pytorch_model" / "data" / "model.pth").is_file()

    # A held-out experiment of the run: the MLflow model predicts what the run's worker
    # predicted (and scored) for it.
    spec = epiray_run.result.spec
    experiment = spec.evaluate[0]
    row = epiray_run.store.experiments().set_index("experiment").loc[experiment]
    worker_pred = np.concatenate(
        [
            np.load(p)
            for p in sorted((Path(spec.out_dir) / "predictions" / experiment).glob("*.npy"))
        ]
    )
    n_bins = epiray_run.store.n_bins("mmSyn1", "chr1")
    assert worker_pred.shape == (n_bins,)

    pyfunc = tracking.load_model(server.url, epiray_run.run_id, device="cpu")
    out = pyfunc.predict(pd.DataFrame({"biosample": [row["biosample"]], "assay": [row["assay"]]}))
    assert list(out["bin"]) == list(range(n_bins)) and set(out["chrom"]) == {"chr1"}
    np.testing.assert_allclose(out["value"].to_numpy(), worker_pred, rtol=1e-5, atol=1e-6)
    truth = epiray_run.store.read("mmSyn1", "chr1", [experiment])[0]
    scored = epiray_run.result.scores.set_index(["model", "experiment"])
    assert score_track(truth, out["value"].to_numpy())["mse"] == pytest.approx(
        scored.loc[("avocado_mouse_only", experiment), "mse"], rel=1e-4
    )
    # The pytorch flavour of the same logged model (by model id) is the Avocado module.
    module = tracking.load_model(server.url, epiray_run.model_id, flavor="pytorch", device="cpu")
    assert type(module).__name__ == "Avocado"
    vocab = module.vocab
    with torch.no_grad():
        direct = module.predict(
            tracking.prediction_context(model=module),
            vocab.biosample_index(row["biosample"]),
            vocab.assay_index(row["assay"]),
        )
    np.testing.assert_allclose(direct.numpy(), worker_pred, rtol=1e-5, atol=1e-6)


def test_default_allowed_hosts_reject_dns_names(server):
    # MLflow's default admits localhost and private IPs only; a Kubernetes Service name gets
    # 403, which is why deploy/k8s/mlflow.yaml passes --allowed-hosts.
    runs = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http(runs, host=f"localhost:{server.port}")[0] == 200
    status, body = http(runs, host=f"mlflow.epiray.svc.cluster.local:{server.port}")
    assert status == 403 and b"Invalid Host header" in body
    # Health checks (kubelet probes hit the pod IP) are exempt.
    assert http(f"{server.url}/health", host="10.1.2.3:5000")[0] == 200


def test_allowed_hosts_admit_the_names_listed(tmp_path):
    srv = start_server(
        tmp_path / "data", MLFLOW_ALLOWED_HOSTS="mlflow.epiray.svc.cluster.local:*,127.0.0.1:*"
    )
    try:
        search = f"{srv.url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http(search, host=f"mlflow.epiray.svc.cluster.local:{srv.port}")[0] == 200
        assert http(search, host=f"127.0.0.1:{srv.port}")[0] == 200
        # The list replaces the defaults: localhost is now refused.
        assert http(search, host=f"localhost:{srv.port}")[0] == 403
        assert "--allowed-hosts" in " ".join(
            Path(f"/proc/{srv.process.pid}/cmdline").read_text().split("\0")
        )
    finally:
        stop_server(srv)
    assert srv.process.returncode is not None


def test_script_rejects_a_missing_data_dir_argument():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr


# ---------------------------------------------------------------------------------------------
# The MLflow UI, as a person sees it


def chromium(args: list[str], user_data_dir: Path, timeout: float = 120) -> str:
    """Run headless Chromium that can reach only 127.0.0.1; its stdout."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={user_data_dir}",
        # Every host name fails to resolve except loopback: nothing leaves the machine.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        # Virtual time runs until the SPA's requests settle (or 20 s of page time).
        "--virtual-time-budget=20000",
        "--window-size=1400,1600",
        *args,
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **QUIET_ENV}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.ray
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")
def test_mlflow_ui_shows_the_epiray_run(server, epiray_run, tmp_path):
    # workflowType: the UI's "Model training" views (its default is the GenAI ones).
    run_page = f"{server.url}/#/experiments/{epiray_run.experiment_id}/runs/{epiray_run.run_id}"
    query = "?workflowType=machine_learning"
    overview = chromium(["--dump-dom", run_page + query], tmp_path / "profile1")
    assert epiray_run.run_name in overview
    for key in ("train/mse", "val/mse", "test/mse", "test/pearson"):
        assert key in overview, f"metric {key} not on the run page"
    for key in ("model.name", "model.params.n_nodes", "train.epochs"):
        assert key in overview, f"param {key} not on the run page"
    # The artifact view opened on the resolved config shows its text.
    page = chromium(
        ["--dump-dom", f"{run_page}/artifacts/config.yaml{query}"], tmp_path / "profile2"
    )
    assert "n_assay_factors" in page and "avocado" in page, "config.yaml is not shown"
    # The plots the run logged are listed, and the factor plot is shown as an image.
    page = chromium(
        ["--dump-dom", f"{run_page}/artifacts/plots/factors.png{query}"], tmp_path / "profile4"
    )
    for name in ("factors.png", "mse_vs_average_activity.png", "tracks_"):
        assert name in page, f"plot {name} not listed on the artifacts page"
    assert re.search(r"<img[^>]+factors\.png", page), "the factor plot is not rendered"
    shot = tmp_path / "mlflow_run.png"
    chromium([f"--screenshot={shot}", run_page + query], tmp_path / "profile3")
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1400)
    assert pixels[..., :3].std() > 0.05  # a rendered page, not a blank one
    # EPIRAY_SCREENSHOT_DIR=docs keeps the picture (docs/mlflow_run.png).
    if out := os.environ.get("EPIRAY_SCREENSHOT_DIR"):
        shutil.copyfile(shot, Path(out) / shot.name)


CI_GUARD_CASES = """
import pytest

@pytest.mark.browser
@pytest.mark.skipif(True, reason="needs headless Chromium (apt-get install chromium)")
def test_ui_without_chromium():
    pass

@pytest.mark.browser
def test_ui_with_chromium():
    pass

@pytest.mark.skipif(True, reason="needs CUDA")
def test_gpu_elsewhere():
    pass

@pytest.mark.browser
@pytest.mark.xfail(reason="a known failure stays an xfail")
def test_ui_known_failure():
    assert False
"""


@pytest.mark.parametrize("ci", ["true", None, "false"])
def test_ci_fails_a_skipped_browser_test(pytester, monkeypatch, ci):
    """tests/conftest.py: under CI=true a skipped ``browser`` test fails the session (CI
    installs Chromium for it); elsewhere it is a skip. Other skips stay skips."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeini("[pytest]\nmarkers =\n    browser: needs headless Chromium\n")
    pytester.makepyfile(test_cases=CI_GUARD_CASES)
    result = pytester.runpytest("-p", "tests.conftest", "-p", "no:cacheprovider")
    if ci == "true":
        result.assert_outcomes(passed=1, skipped=1, errors=1, xfailed=1)
        result.stdout.fnmatch_lines(
            ["*test_ui_without_chromium was skipped under CI=true*needs headless Chromium*"]
        )
        assert result.ret != 0
    else:
        result.assert_outcomes(passed=1, skipped=2, xfailed=1)
        assert result.ret == 0
