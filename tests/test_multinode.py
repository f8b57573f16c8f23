"""A real two-node Ray cluster on this machine: ``ray job submit`` of the ingest and train jobs.

Everything runs inside private Linux namespaces (``unshare --net --pid --fork --mount-proc``):
a network namespace whose loopback only this test uses (fixed ports cannot clash with other
Ray clusters on the machine), a PID namespace (when its first process exits, the kernel kills
every process the test started — Ray's daemons included — and nothing else), and a mount
namespace with private ``/tmp/ray`` and ``/dev/shm`` (Ray's session files and the object store
never touch the host's). No ``ray stop`` is needed or used.

The head and the worker node each offer one CPU and a custom resource naming the node; the
training job asks for two workers of one CPU each, so Ray Train must place one on each node.
Placement is read from Ray's state API (dead actors keep their node id) before the namespace
ends. Needs root (or CAP_SYS_ADMIN) for ``unshare``; skipped where namespaces are refused.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]
GCS_PORT, DASHBOARD_PORT = 6380, 8266
#: The same exclusions as deploy/README.md (the library comes from the environment).
RUNTIME_ENV = {
    "excludes": [
        ".git",
        ".venv",
        "/epiray/",
        "/tests/",
        "/benchmarks/",
        "/docs/",
        "/quickstart/",
        "/mlruns/",
    ]
}

pytestmark = [pytest.mark.multinode, pytest.mark.ray]

# Bring up loopback without iproute2: SIOCGIFFLAGS / SIOCSIFFLAGS on "lo".
LO_UP = textwrap.dedent(
    """
    import fcntl, socket, struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    req = struct.pack("16sH14s", b"lo", 0, b"")
    flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, req))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 0x1, b""))
    """
)

COLLECT = textwrap.dedent(
    """
    import json, sys
    from ray.util.state import list_actors, list_nodes
    addr = sys.argv[1]
    nodes = {
        n.node_id: sorted(k for k in (n.resources_total or {}) if k.startswith("epiray_node_"))
        for n in list_nodes(address=addr, detail=True)
    }
    workers = [
        {"node_id": a.node_id, "state": a.state, "pid": a.pid}
        for a in list_actors(
            address=addr, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
            limit=1000,
        )
    ]
    json.dump({"nodes": nodes, "workers": workers}, open(sys.argv[2], "w"), indent=1)
    """
)


def _namespaces_work() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        r = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unshare failed: {e}"
    if r.returncode != 0:
        return f"unshare refused (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}"
    return None


def _script(tmp: Path) -> str:
    dash = f"http://127.0.0.1:{DASHBOARD_PORT}"
    submit = (
        f"ray job submit --address {dash} --working-dir {ROOT} "
        f"--runtime-env-json '{json.dumps(RUNTIME_ENV)}' --"
    )
    common = "--node-ip-address 127.0.0.1 --num-cpus 1 --object-store-memory 80000000"
    return textwrap.dedent(
        f"""\
        set -euo pipefail
        export PATH="{BIN}:$PATH"
        unset RAY_ADDRESS
        export RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 PYTHONUNBUFFERED=1
        # token authentication (Ray >= 2.59 turns it on for local clusters) with a token of the
        # test's own, not ~/.ray/auth_token: every node, the job CLI and the state API read it
        export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="{tmp}/auth_token"
        "{sys.executable}" -c '{LO_UP}'
        mkdir -p /tmp/ray
        mount -t tmpfs -o size=64m tmpfs /tmp/ray
        mount -t tmpfs -o size=512m tmpfs /dev/shm
        echo "== head"
        ray start --head --port {GCS_PORT} {common} \\
          --resources '{{"epiray_node_head": 1}}' \\
          --include-dashboard=true --dashboard-host 127.0.0.1 --dashboard-port {DASHBOARD_PORT}
        echo "== worker node"
        ray start --address 127.0.0.1:{GCS_PORT} {common} \\
          --resources '{{"epiray_node_worker": 1}}'
        echo "== ingest job"
        {submit} python jobs/ingest.py --config {tmp}/ingest.yaml
        echo "== train job"
        {submit} python jobs/train.py --config {tmp}/train.yaml
        echo "== placement"
        python {tmp}/collect.py {dash} {tmp}/placement.json
        echo "== done"
        """
    )


def test_two_node_cluster_runs_ingest_and_train_jobs(tmp_path):
    why = _namespaces_work()
    if why:
        pytest.skip(why)
    from epiray import synthetic

    res = synthetic.generate(tmp_path / "data", seed=5, params=synthetic.SynthParams.tiny())
    (tmp_path / "ingest.yaml").write_text(
        yaml.safe_dump(
            {"manifest": str(res.manifest), "store": str(tmp_path / "store"), "chroms": "all"}
        )
    )
    (tmp_path / "train.yaml").write_text(
        yaml.safe_dump(
            {
                "store": str(tmp_path / "store"),
                "out": str(tmp_path / "runs"),
                "assembly": "mmSyn1",
                "chroms": ["chr1"],
                "model": {
                    "name": "avocado",
                    "params": {"n_nodes": 16, "n_layers": 1, "n_assay_factors": 8},
                },
                "folds": {"scheme": "experiment", "k": 3, "fold": 0},
                "validation": {"per_assay": 1, "min_train": 1},
                "train": {"epochs": 2, "batch_size": 1024},
                "scaling": {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": False},
                "tracking": {"experiment": "multinode"},
            }
        )
    )
    (tmp_path / "collect.py").write_text(COLLECT)
    (tmp_path / "auth_token").write_text(secrets.token_hex(32))
    (tmp_path / "auth_token").chmod(0o600)
    script = tmp_path / "cluster.sh"
    script.write_text(_script(tmp_path))
    log = tmp_path / "cluster.log"
    with open(log, "w") as fh:
        proc = subprocess.run(
            [*UNSHARE, "bash", str(script)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=900,
            cwd=tmp_path,
            # the cluster's processes start from this environment: an earlier test's
            # mlflow.set_tracking_uri (which exports MLFLOW_TRACKING_URI in-process) must not
            # send the job's run to that test's store
            env={
                k: v
                for k, v in os.environ.items()
                if k != "RAY_ADDRESS" and not k.startswith("MLFLOW_")
            },
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    assert "== done" in text, text[-6000:]
    assert text.count("succeeded") >= 2, text[-6000:]  # both jobs: "Job '...' succeeded"

    # the store the ingest job wrote
    from epiray.store import Store

    store = Store.open(tmp_path / "store")
    assert set(store.summary["assemblies"]) == {"hsSyn1", "mmSyn1"}

    # the two training workers ran on the two nodes
    placement = json.loads((tmp_path / "placement.json").read_text())
    names = {nid: res_ for nid, res_ in placement["nodes"].items()}
    assert sorted(sum(names.values(), [])) == ["epiray_node_head", "epiray_node_worker"]
    workers = placement["workers"]
    assert len(workers) == 2, placement
    used = sorted(names[w["node_id"]][0] for w in workers)
    assert used == ["epiray_node_head", "epiray_node_worker"], placement

    # the MLflow run of the job, in the run's output folder
    from mlflow import MlflowClient

    mlc = MlflowClient("sqlite:///" + str(tmp_path / "runs" / "mlflow.db"))
    exp = mlc.get_experiment_by_name("multinode")
    runs = mlc.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["avocado_mouse_only.chr1.fold0"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "test/mse" in run.data.metrics and "val/mse" in run.data.metrics
    ckpt = Path(run.data.tags["epiray.checkpoint"])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert len(meta["shards"]) == 2 and {p.name for p in ckpt.glob("rank*.pt")} == {
        "rank0.pt",
        "rank1.pt",
    }
