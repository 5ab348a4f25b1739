"""Fault injection on the real local Ray instance: a Ray Train worker process killed with
SIGKILL mid-epoch. The run must finish, having lost no epoch beyond its last checkpoint."""

import threading
import time

import psutil
import pytest

from mixcl_ray.checkpoints import load_checkpoint_state
from mixcl_ray.config import load_config
from mixcl_ray.pretrain import run_pretraining

pytestmark = pytest.mark.slow


def train_worker_processes() -> list[psutil.Process]:
    """Ray Train worker processes (their title is ray::RayTrainWorker...)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
            found.append(proc)
    return found


def kill_when(ready, seconds: float = 600) -> tuple[list[int], str]:
    """Once ``ready()`` holds, SIGKILL one Train worker; returns (its pid, what was true then)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if ready():
            workers = train_worker_processes()
            if workers:
                workers[0].kill()
                return [workers[0].pid], "killed"
        time.sleep(0.5)
    return [], "never ready"


def run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # re-raised in the test thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(
    ray_session, prepared_benchmark, tmp_path
):
    config = load_config(
        "pretrain",
        overrides={
            "optim": {"epochs": 2},
            "patches": {"patches_per_case": 1, "batch_size": 2},
            "scaling": {"workers": 2, "max_failures": 1},
        },
    )
    run = tmp_path / "killed"
    thread, box = run_in_thread(
        lambda: run_pretraining(prepared_benchmark, tmp_path, config, name="killed")
    )

    def in_epoch_1():  # epoch 0 is checkpointed, epoch 1 is not
        return (run / "epoch_0000").exists() and not (run / "epoch_0001").exists()

    def well_into_epoch_1():
        if not in_epoch_1():
            return False
        time.sleep(3)
        return in_epoch_1()

    pids, what = kill_when(well_into_epoch_1)
    assert what == "killed", "the run never reached epoch 1 with workers alive"
    assert not (run / "epoch_0001").exists()  # the kill landed inside epoch 1
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run did not finish after the worker was killed"
    if "error" in box:
        raise box["error"]
    result = box["result"]
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"
    # every epoch once, in order; the epoch after the kill came from a group restarted at
    # epoch 1, i.e. from the epoch-0 checkpoint: only the killed epoch's work was lost
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert [h["resumed_from_epoch"] for h in result.history] == [0, 1]
    final = load_checkpoint_state(result.checkpoint)
    assert result.checkpoint.name == "epoch_0001" and final["epoch"] == 1
    steps = result.history[0]["step"]  # the step counter went on from the checkpoint's
    assert [h["step"] for h in result.history] == [steps, 2 * steps] and final["step"] == 2 * steps
    assert result.pretrained.exists()
