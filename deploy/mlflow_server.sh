#!/usr/bin/env bash
# A shared MLflow tracking server for a team or a cluster: a database backend store
# (PostgreSQL, or SQLite for one machine) and artifacts in an object store, proxied by the
# server so that clients need no object-store credentials of their own; MLflow's basic
# authentication on, and only the Host names you list accepted.
#
#   MLFLOW_BACKEND_URI=postgresql://mlflow@db.internal/mlflow \
#   MLFLOW_ARTIFACTS=s3://my-bucket/mlflow-artifacts \
#   MLFLOW_ALLOWED_HOSTS=mlflow.example.org \
#   bash deploy/mlflow_server.sh
#
# then point every run at it through a TLS proxy (docs/cluster.md):
#   export MLFLOW_TRACKING_URI=https://mlflow.example.org
#   export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="$(cat admin_password)"
# Defaults: SQLite in ~/mlflow/mlflow.db, artifacts in ~/mlflow/artifacts, listening on
# 127.0.0.1:5000 only. Set MLFLOW_HOST=0.0.0.0 deliberately, and only behind the TLS proxy:
# clients send their password with every request, so never over plain http across a network.
# Authentication: the admin user (MLFLOW_ADMIN_USER, default admin) is created on the first
# start with the password in MLFLOW_ADMIN_PASSWORD_FILE (default ~/mlflow/admin_password; a
# random one is written there, mode 600, if the file does not exist); as the admin, create one
# user per person (docs/cluster.md). Users are kept in ~/mlflow/basic_auth.db, readable by all
# users, writable by each run's creator; MLFLOW_AUTH_CONFIG_PATH replaces the generated config.
# The database password goes in ~/.pgpass (or PGPASSWORD), object-store keys in the usual
# AWS_*/GOOGLE_APPLICATION_CREDENTIALS variables or the instance role: never on this command
# line, where `ps` shows them.
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
umask 077  # the secrets below are readable by this user only
secret_file() {  # $1: a file holding a secret; made with a random one if it does not exist
    [ -s "$1" ] || python -c 'import secrets; print(secrets.token_urlsafe(24))' > "$1"
    cat "$1"
}
password_file="${MLFLOW_ADMIN_PASSWORD_FILE:-$root/admin_password}"
MLFLOW_AUTH_ADMIN_PASSWORD="$(secret_file "$password_file")"
MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(secret_file "$root/flask_secret_key")}"
export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    export MLFLOW_AUTH_CONFIG_PATH="$root/basic_auth.ini"
    cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$root/basic_auth.db
admin_username = ${MLFLOW_ADMIN_USER:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
fi
# the Host headers accepted (against DNS rebinding): this machine's names, and yours
allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*${MLFLOW_ALLOWED_HOSTS:+,$MLFLOW_ALLOWED_HOSTS}"
echo "mlflow server on $host:$port, basic authentication on (admin password in $password_file)" >&2
exec python -m mlflow server \
    --app-name basic-auth \
    --allowed-hosts "$allowed" \
    --host "$host" --port "$port" \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" \
    --workers "${MLFLOW_WORKERS:-4}"
