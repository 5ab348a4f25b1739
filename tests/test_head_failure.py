"""Head failure: a Ray head with GCS fault tolerance (its state in a Redis server that the test
starts, as docs/cluster.md sets it up) loses its GCS in the middle of a ``python -m
mixcl_ray.pretrain``, which is restarted ten seconds later with the same command line, as a
supervisor would restart it. The pre-training goes on and loses nothing: every epoch trained,
its checkpoint written, every epoch's loss in MLflow as printed. (Without Redis the same kill
ends the command: the restarted GCS knows no node, job or actor of the old one.)"""

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.pretrain_runs import printed_losses, small_pretrain
from tests.servers import free_port

EPOCHS = 2
OUTAGE_S = 10


def redis_server() -> str:
    found = shutil.which("redis-server")
    if not found:
        why = "needs Debian's redis-server (apt-get install redis-server; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return found


def gcs_process(temp_dir: str) -> int:
    """The pid of the GCS server of the head whose session lives under ``temp_dir``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"/gcs_server") and any(temp_dir.encode() in a for a in argv):
            return int(entry.name)
    raise AssertionError(f"no gcs_server of the head in {temp_dir}")


def restart_gcs(temp_dir: str) -> tuple[int, subprocess.Popen]:
    """Kill the head's GCS server (SIGKILL: no chance to clean up), wait ``OUTAGE_S``, start it
    again with its own command line and environment (in a process group of its own)."""
    old = gcs_process(temp_dir)
    argv = Path(f"/proc/{old}/cmdline").read_bytes().split(b"\0")[:-1]
    environ = Path(f"/proc/{old}/environ").read_bytes().split(b"\0")
    env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
    os.kill(old, signal.SIGKILL)
    time.sleep(OUTAGE_S)
    new = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    return old, new


def stop_group(group: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("ray_paused")
def test_a_pretraining_survives_the_loss_of_its_heads_gcs(prepared_benchmark, tmp_path):
    redis_port, head_port, password = free_port(), free_port(), secrets.token_hex(16)
    redis = subprocess.Popen(
        [redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1"]
        + ["--requirepass", password, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env["RAY_idle_worker_killing_time_threshold_ms"] = "300000"
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: socket paths < 107 chars
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={head_port}"]
        + ["--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
        + ["--redis-username=default", f"--redis-password={password}"],
        env=dict(env, RAY_REDIS_ADDRESS=f"127.0.0.1:{redis_port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    events = []  # (killed, restarted) GCS pids
    try:
        started = head.communicate(timeout=120)[0]
        assert head.returncode == 0, started
        gcs_process(temp_dir)  # the head runs, its GCS backed by the Redis server

        def on_epoch(epoch: int) -> None:
            if epoch == 1:  # epoch 2 runs through the outage
                events.append(restart_gcs(temp_dir))

        args = ["--address", f"127.0.0.1:{head_port}"]
        code, out = small_pretrain(prepared_benchmark, tmp_path, EPOCHS, env, args, on_epoch, 480)
        assert code == 0, out[-4000:]
        assert len(events) == 1, out  # the GCS was killed and started again during the fit
        ((old, new),) = events
        assert gcs_process(temp_dir) == new.pid != old

        printed = printed_losses(out, EPOCHS)
        assert len(printed) == EPOCHS, out
        final = re.search(r"final checkpoint (\S+)", out).group(1)
        assert final.endswith(f"epoch_{EPOCHS - 1:04d}") and Path(final, "pretrained.pt").exists()
        client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
        (run,) = client.search_runs(
            [client.get_experiment_by_name("mixcl_ray-pretrain").experiment_id]
        )
        assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == final
        history = sorted(
            client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step
        )
        assert [m.step for m in history] == list(range(EPOCHS))
        assert [round(m.value, 4) for m in history] == printed
    finally:
        for _, new in events:
            stop_group(new.pid)
            new.wait(timeout=30)
        stop_group(head.pid)
        redis.terminate()
        redis.wait(timeout=30)
