"""Real servers the tests start on 127.0.0.1 (an MLflow tracking server, an S3-compatible
object store), each in its own process group so that stopping it stops its workers too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

S3_BUCKET = "mixcl"
S3_SECRET = "not-a-real-secret-4f1d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Until ``url`` answers 200; else kill the server's process group and fail the test."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{what} did not answer {url} within {timeout:.0f} s")


MLFLOW_RECIPE = Path(__file__).resolve().parents[1] / "deploy" / "mlflow_server.sh"


MLFLOW_USER = "alice"  # the recipe server's admin in the tests
MLFLOW_PASSWORD = "s3cret-Pa55-word"  # MLflow asks 12 characters at least


def mlflow_recipe_env(root: Path, port: int) -> dict[str, str]:
    """The environment that runs the deploy recipe (``MLFLOW_RECIPE``) with one worker on
    ``port``, its database and artifacts under ``root``, with this interpreter's mlflow and
    the recipe's own choice of MLflow's job runner; its admin ``MLFLOW_USER`` with
    ``MLFLOW_PASSWORD``, read from a file beside ``root`` (never inside: the tests look for the
    password in everything the server writes)."""
    password_file = root.parent / f"{root.name}-admin-password"
    password_file.write_text(MLFLOW_PASSWORD + "\n")
    env = dict(
        os.environ,
        MLFLOW_ROOT=str(root),
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_ADMIN_USER=MLFLOW_USER,
        MLFLOW_ADMIN_PASSWORD_FILE=str(password_file),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    for key in ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "MLFLOW_AUTH_CONFIG_PATH"):
        env.pop(key, None)
    return env


def mlflow_client_env() -> dict[str, str]:
    """What a client of the recipe's server in the tests authenticates with."""
    return {"MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD}


def start_server(argv: list[str], url: str, what: str, timeout: float = 120, **kwargs):
    """Start ``argv`` in a new session, wait until ``url`` answers; returns the process."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **kwargs,
    )
    wait_for_http(url, proc, what, timeout)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def start_s3_server() -> tuple[subprocess.Popen, dict[str, str]]:
    """moto's S3-compatible server with the bucket ``S3_BUCKET``; returns (process, the
    standard AWS environment a client needs to reach it)."""
    import pyarrow.fs as pafs

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = start_server(server, url, "the S3 test server", timeout=60)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    pafs.S3FileSystem(
        access_key="testing",
        secret_key=S3_SECRET,
        endpoint_override=url,
        region="us-east-1",
        allow_bucket_creation=True,
    ).create_dir(S3_BUCKET)
    return proc, env
