"""Tracking under faults: the suite's ``mlflow server`` (the deploy recipe) is stopped and
started again while a ``python -m mixcl_ray.pretrain`` fits, and stopped for good before the
fit ends. Training goes on, nothing is lost: the epochs of the first outage reach MLflow when
the server is back, and those of the second, with the run's closing tags and status, when a
later command finds the server again."""

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mixcl_ray import tracking_buffer
from tests.pretrain_runs import printed_losses, small_pretrain
from tests.servers import (
    MLFLOW_RECIPE,
    free_port,
    mlflow_client_env,
    mlflow_recipe_env,
    start_server,
    stop_server,
)

EPOCHS = 4


class Server:
    """The recipe's server on one port and one database, stopped and started again."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        env = mlflow_recipe_env(self.folder, self.port)
        self.proc = start_server(
            ["bash", str(MLFLOW_RECIPE)], f"{self.url}/health", "mlflow", env=env
        )

    def stop(self):
        stop_server(self.proc)
        self.proc = None


def test_metrics_kept_while_the_server_is_away_are_sent_in_order_with_the_closing(
    tmp_path, monkeypatch
):
    """No server on ``away`` (a refused port): kept at once, not after MLflow's two minutes of
    retries; then sent to the store that holds the run, with their own steps and times."""
    import time

    monkeypatch.setenv("MIXCL_PENDING_DIR", str(tmp_path / "pending"))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    away = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    assert not tracking_buffer.log_epoch(away, run_id, {"epoch": 0, "train/loss": 0.5})
    assert not tracking_buffer.log_epoch(away, run_id, {"epoch": 1, "train/loss": 0.25})
    assert not tracking_buffer.close_run(away, run_id, "FINISHED", {"checkpoint": "c", "x": None})
    assert time.perf_counter() - start < 30
    assert tracking_buffer.flush_all(store) == []  # kept for the server they were meant for
    assert client.get_run(run_id).info.status == "RUNNING"
    assert tracking_buffer.flush(store, run_id)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["checkpoint"] == "c"
    assert "x" not in run.data.tags and "steps [0, 1]" in run.data.tags[tracking_buffer.GAP_TAG]
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.25)]
    assert not list((tmp_path / "pending").glob("*"))


def test_a_model_that_fails_to_log_is_an_error_while_the_server_answers(tmp_path, monkeypatch):
    """Only a server that went away makes a model "not logged"; a fault of the model logging
    itself (here: no weights file) is raised, not reported as an unreachable server."""
    from mixcl_ray.run_tracking import StandaloneRun

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(FileNotFoundError):
        with StandaloneRun("finetune", str(tmp_path), "e", "run", {}) as run:
            run.log_model(tmp_path / "missing.pt", {})
    assert "mixcl.model_not_logged" not in run.tags
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_run(run.run_id).info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("ray_paused")
def test_a_tracking_server_that_goes_away_mid_fit_loses_nothing(
    prepared_benchmark, tmp_path, monkeypatch
):
    for key, value in mlflow_client_env().items():
        monkeypatch.setenv(key, value)
    server = Server(tmp_path / "mlflow")
    server.start()
    pending = tmp_path / "pending"
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.url, MIXCL_PENDING_DIR=str(pending))
    env.pop("RAY_ADDRESS", None)
    events = []

    def on_epoch(epoch: int) -> None:
        # first outage: from epoch 1's line to epoch 2's; the second from epoch 3's to the end
        if epoch in (1, 3):
            server.stop()
            events.append(f"stopped after epoch {epoch}")
        elif epoch == 2:
            server.start()
            events.append("started again")

    args = ["--experiment", "faults"]
    code, out = small_pretrain(prepared_benchmark, tmp_path, EPOCHS, env, args, on_epoch)
    assert code == 0, out[-4000:]
    assert events == ["stopped after epoch 1", "started again", "stopped after epoch 3"], out
    assert "is incomplete" in out, out[-3000:]
    (kept,) = pending.glob("*.jsonl")  # the second outage's epochs and the closing, on disk
    run_id = kept.stem

    server.start()  # a later command finds it again and sends what was kept
    monkeypatch.setenv("MIXCL_PENDING_DIR", str(pending))
    assert tracking_buffer.flush_all(server.url) == [run_id]
    assert not list(pending.glob("*.jsonl"))
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["checkpoint"].endswith(f"epoch_{EPOCHS - 1:04d}")
    assert "sent late" in run.data.tags[tracking_buffer.GAP_TAG]
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(EPOCHS)), history
    printed = printed_losses(out, EPOCHS)
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert logged == pytest.approx(printed, abs=1e-4)
    server.stop()
