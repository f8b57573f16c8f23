"""deploy/mlflow/run_server.sh: the MLflow tracking server epiray runs log to.

The server runs as a subprocess on a free loopback port with a SQLite backend and a proxied
local artifact store (``--artifacts-destination``). A run is logged to it over HTTP, then read
back the way other tools see it: the REST API, the artifact proxy, and (marked ``browser``,
where Chromium is installed) the MLflow UI in headless Chromium.

``log_example_run`` is the one place that produces the run; swapping in a real epiray training
run (``epiray.tracking``) only needs it to return a ``LoggedRun`` describing what was logged.
"""

from __future__ import annotations

import json
import os
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
import pytest

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
# The run


@dataclass
class LoggedRun:
    """What a run logged, to check against what the server shows."""

    experiment_id: str
    run_id: str
    run_name: str
    params: dict[str, str]
    metrics: dict[str, list[tuple[int, float]]]  # key -> [(step, value)]
    artifacts: dict[str, Path]  # artifact path (relative to the run's root) -> local file


def write_plot(path: Path, history: dict[str, list[tuple[int, float]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for key, points in history.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_example_run(tracking_uri: str, workdir: Path) -> LoggedRun:
    """Log an epiray-shaped run (params, per-epoch metrics, a PNG plot) to ``tracking_uri``.

    Stand-in for a training run through ``epiray.tracking``: the names follow its conventions
    (run name ``model.chrom.foldK``, the shared vocabulary for params). Everything goes over
    HTTP; the plot is uploaded through the server's artifact proxy.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=tracking_uri)
    # The experiment kind tag makes the UI open the "Model training" views, not the GenAI ones.
    experiment_id = client.create_experiment(
        "epiray-quickstart", tags={"mlflow.experimentKind": "custom_model_development"}
    )
    run_name = "avocado.chr19.fold0"
    run = client.create_run(experiment_id, run_name=run_name)
    run_id = run.info.run_id
    params = {
        "model": "avocado",
        "chrom": "chr19",
        "fold": "0",
        "bin_size": "25",
        "n_genomic_positions": "2460000",
        "lr": "0.001",
    }
    epochs = np.arange(6)
    metrics = {
        "train_mse": [
            (int(e), float(v)) for e, v in zip(epochs, 1.0 / (1.0 + epochs), strict=True)
        ],
        "val_pearson": [
            (int(e), float(v)) for e, v in zip(epochs, 0.3 + 0.1 * epochs, strict=True)
        ],
    }
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[Metric(k, v, now, s) for k, pts in metrics.items() for s, v in pts],
    )
    plot = write_plot(workdir / "val_pearson_by_epoch.png", metrics)
    client.log_artifact(run_id, str(plot), artifact_path="plots")
    client.set_terminated(run_id)
    return LoggedRun(
        experiment_id, run_id, run_name, params, metrics, {f"plots/{plot.name}": plot}
    )


@pytest.fixture(scope="module")
def logged(server, tmp_path_factory) -> LoggedRun:
    return log_example_run(server.url, tmp_path_factory.mktemp("run"))


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


def test_logged_run_reads_back_over_the_rest_api(server, logged):
    run = get_json(server, "/api/2.0/mlflow/runs/get", run_id=logged.run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == logged.run_name
    assert run["info"]["experiment_id"] == logged.experiment_id
    # Artifacts go through the server, not to a path the client would need to reach.
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == logged.params
    latest = {m["key"]: (m["step"], m["value"]) for m in run["data"]["metrics"]}
    assert latest == {k: pts[-1] for k, pts in logged.metrics.items()}
    for key, points in logged.metrics.items():
        history = get_json(
            server, "/api/2.0/mlflow/metrics/get-history", run_id=logged.run_id, metric_key=key
        )["metrics"]
        got = sorted((m["step"], m["value"]) for m in history)
        np.testing.assert_allclose(np.array(got), np.array(points), rtol=1e-12)
    experiment = get_json(
        server, "/api/2.0/mlflow/experiments/get", experiment_id=logged.experiment_id
    )["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:/")


def test_artifacts_are_listed_served_and_stored_by_the_server(server, logged):
    for rel, local in logged.artifacts.items():
        folder = rel.rpartition("/")[0]
        listing = get_json(
            server, "/api/2.0/mlflow/artifacts/list", run_id=logged.run_id, path=folder
        )
        files = {f["path"]: f for f in listing["files"]}
        assert rel in files and not files[rel]["is_dir"]
        assert int(files[rel]["file_size"]) == local.stat().st_size
        # Download through the proxy (the route a remote worker or the UI uses).
        status, body = http(
            f"{server.url}/api/2.0/mlflow-artifacts/artifacts/"
            f"{logged.experiment_id}/{logged.run_id}/artifacts/{rel}"
        )
        assert status == 200 and body == local.read_bytes()
        assert body.startswith(b"\x89PNG\r\n\x1a\n")
        # ... and the bytes landed under --artifacts-destination.
        stored = (
            server.data_dir
            / "artifacts"
            / logged.experiment_id
            / logged.run_id
            / "artifacts"
            / rel
        )
        assert stored.read_bytes() == local.read_bytes()
    assert (server.data_dir / "mlflow.db").is_file()  # the SQLite backend store


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


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium)")
def test_mlflow_ui_shows_the_run(server, logged, tmp_path):
    # workflowType: the UI's "Model training" views (its default is the GenAI ones).
    run_page = f"{server.url}/#/experiments/{logged.experiment_id}/runs/{logged.run_id}"
    query = "?workflowType=machine_learning"
    overview = chromium(["--dump-dom", run_page + query], tmp_path / "profile1")
    assert logged.run_name in overview
    for key in logged.metrics:
        assert key in overview, f"metric {key} not on the run page"
    for key in logged.params:
        assert key in overview, f"param {key} not on the run page"
    # The artifact view opened on the plot renders it as an image.
    for rel in logged.artifacts:
        page = chromium(
            ["--dump-dom", f"{run_page}/artifacts/{rel}{query}"], tmp_path / "profile2"
        )
        assert f'<img alt="{rel}"' in page, f"plot {rel} is not shown as an image"
    shot = tmp_path / "mlflow_run.png"
    chromium([f"--screenshot={shot}", run_page + query], tmp_path / "profile3")
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1400)
    assert pixels[..., :3].std() > 0.05  # a rendered page, not a blank one
    # EPIRAY_SCREENSHOT_DIR=docs keeps the picture (docs/mlflow_run.png).
    if out := os.environ.get("EPIRAY_SCREENSHOT_DIR"):
        shutil.copyfile(shot, Path(out) / shot.name)
