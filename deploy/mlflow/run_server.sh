#!/usr/bin/env bash
# Run the MLflow tracking server that epiray runs log to.
#
#   deploy/mlflow/run_server.sh DATA_DIR [PORT]
#
# Backend store: SQLite at DATA_DIR/mlflow.db (runs, params, metrics).
# Artifacts:     DATA_DIR/artifacts, served *through* the server (--artifacts-destination), so
#                a Ray worker on another machine uploads plots and checkpoints over HTTP with
#                only MLFLOW_TRACKING_URI set: no shared filesystem, no S3 credentials on workers.
#                New experiments get the artifact root `mlflow-artifacts:/<experiment_id>`.
#
# Binds to 127.0.0.1 by default: only this machine can reach it. Environment overrides:
#   MLFLOW_HOST                   interface to bind (default 127.0.0.1). 0.0.0.0 opens it to
#                                 the network; then also set MLFLOW_ALLOWED_HOSTS.
#   MLFLOW_ALLOWED_HOSTS          comma-separated Host headers the server answers (fnmatch
#                                 patterns, port included: 'mlflow.lab.org:5000,10.0.0.7:*').
#                                 MLflow's default is localhost plus private IP ranges; any other
#                                 name clients use (a DNS name, a Kubernetes Service name) must be
#                                 listed, or requests get 403 "Invalid Host header". It guards
#                                 against DNS rebinding; it is not authentication.
#   MLFLOW_BACKEND_STORE_URI      e.g. postgresql://user:pass@db:5432/mlflow (default: SQLite)
#   MLFLOW_ARTIFACTS_DESTINATION  e.g. s3://bucket/artifacts (default: file://DATA_DIR/artifacts)
#   MLFLOW_WORKERS                uvicorn worker processes (default 2)
#   MLFLOW_BIN                    the mlflow executable (default: `mlflow` on PATH)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION
#                                 MLflow's background job runner (GenAI trace scoring, judges;
#                                 several huey processes). epiray logs classic runs only, so the
#                                 default here is false; set true to get it back.
#
# The script execs `mlflow server`, so its PID is the server's; `mlflow server` starts uvicorn
# as a child, so stop the whole process group (kill -- -PID when started with setsid).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 DATA_DIR [PORT]" >&2
    exit 2
fi
data_dir=$(mkdir -p "$1" && cd "$1" && pwd)
port=${2:-5000}
host=${MLFLOW_HOST:-127.0.0.1}
backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///${data_dir}/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-file://${data_dir}/artifacts}
mlflow=${MLFLOW_BIN:-mlflow}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

args=(
    server
    --backend-store-uri "$backend"
    --artifacts-destination "$artifacts"
    --serve-artifacts
    --host "$host"
    --port "$port"
    --workers "${MLFLOW_WORKERS:-2}"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec "$mlflow" "${args[@]}"
