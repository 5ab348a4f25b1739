#!/usr/bin/env bash
# A shared MLflow tracking server for a team or a cluster: a database backend store
# (PostgreSQL, or SQLite for one machine) and artifacts in an object store, proxied by the
# server so that clients need no object-store credentials of their own.
#
#   MLFLOW_BACKEND_URI=postgresql://mlflow@db.internal/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/mlflow-artifacts \
#   bash deploy/mlflow_server.sh
#
# then point every run at it: export MLFLOW_TRACKING_URI=http://HOST:5000
# Defaults: SQLite in ~/mlflow/mlflow.db, artifacts in ~/mlflow/artifacts, listening on
# 127.0.0.1 only. Set MLFLOW_HOST=0.0.0.0 deliberately, and only behind an authenticating
# proxy or on a private network. The database password goes in ~/.pgpass (or PGPASSWORD),
# object-store keys in the usual AWS_*/GOOGLE_APPLICATION_CREDENTIALS variables or the
# instance role: never on this command line, where `ps` shows them.
# MLflow's job runner (GenAI evaluation jobs and the like, which mixcl_ray never submits) is off
# unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true: it starts six more processes of about 240 MB
# each, which poll their queues while idle.
set -euo pipefail
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
root="${MLFLOW_ROOT:-$HOME/mlflow}"
mkdir -p "$root"
backend="${MLFLOW_BACKEND_URI:-sqlite:///$root/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS:-$root/artifacts}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
case "$backend" in
    *://*:*@*) echo "error: put the database password in ~/.pgpass or PGPASSWORD, not in MLFLOW_BACKEND_URI" >&2; exit 2 ;;
esac
exec python -m mlflow server \
    --host "$host" --port "$port" \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" \
    --workers "${MLFLOW_WORKERS:-4}"
