"""The main job end to end: ``python -m mixcl_ray.tune`` as a user runs it (its own local Ray,
with the dashboard, as the product starts it), logging over HTTP to a real ``mlflow server``
started on 127.0.0.1 with its own SQLite file, with its data and storage in a bucket of a real
S3-compatible server (as on a cluster whose nodes share only a bucket); then an interrupted
sweep (its trials stopped early by ASHA) resumed, and an unreachable tracking server."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient

from data_prep import locations
from mixcl_ray.tracking import CODE_TAG, HARDWARE_TAG, code_version
from mixcl_ray.train_utils import hardware
from tests.servers import (
    MLFLOW_PASSWORD,
    MLFLOW_RECIPE,
    MLFLOW_USER,
    S3_BUCKET,
    S3_SECRET,
    free_port,
    mlflow_client_env,
    mlflow_recipe_env,
    start_server,
    stop_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800), pytest.mark.usefixtures("ray_paused")]
ROOT = Path(__file__).resolve().parents[1]

SPACE = """
description: test sweep
preset: cpu-tiny
experiment: {experiment}
metric: val/dice_mean
mode: max
scheduler: {scheduler}
resources: {{workers: 1, gpus_per_worker: 0, max_concurrent_trials: {concurrent}}}
pretrain:
  optim: {{epochs: 1}}
  patches: {{patches_per_case: 1, batch_size: 2}}
finetune:
  optim: {{epochs: {epochs}}}
  val_every: {val_every}
  min_patches_per_epoch: 16
  patches: {{patches_per_case: 4}}
space:
  method: {{grid: [scratch, mixcl]}}
  label_fraction: {{grid: [0.5, 1.0]}}
  seed: 0
"""


PASSWORD = MLFLOW_PASSWORD
_SERVER_FOLDERS: dict[str, Path] = {}


def mlflow_server_folder(url: str) -> Path:
    return _SERVER_FOLDERS[url]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The deploy recipe's tracking server (SQLite, proxied artifacts, 127.0.0.1, no job
    runner, basic authentication), one worker; this process's MLflow clients sign in as its
    admin (the sweeps below get the credentials in their tracking URI only)."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(
        ["bash", str(MLFLOW_RECIPE)],
        f"{url}/health",
        "mlflow server",
        env=mlflow_recipe_env(folder, port),
    )
    _SERVER_FOLDERS[url] = folder
    with pytest.MonkeyPatch.context() as env:
        for key, value in mlflow_client_env().items():
            env.setenv(key, value)
        yield url
    stop_server(proc)


def _tune(args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # the test session's own Ray instance is not the user's
    for key in mlflow_client_env():  # a sweep's credentials come in its --tracking-uri
        env.pop(key, None)
    return subprocess.Popen(
        # its own local Ray instance, with the dashboard, as a user's command starts it
        [sys.executable, "-m", "mixcl_ray.tune", "--address", "local", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def _runs(client, experiment, stage):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mixcl.stage` = '{stage}'")


def _bucket_files(prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = locations.resolve(prefix)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return [f"s3://{i.path}" for i in infos if i.type == pafs.FileType.File]


@pytest.fixture(scope="module")
def store_sweep(prepared_benchmark, ray_paused, mlflow_server, s3_env, tmp_path_factory):
    """The main job as a cluster runs it, once for the tests below: a 2 x 2 sweep (two trials
    at once) with its data and storage in the bucket, logging to the tracking server with
    credentials in the URI; then ``--resume`` of the finished sweep, and the label-efficiency
    benchmark's report of it."""
    tmp = tmp_path_factory.mktemp("store-sweep")
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_env.items():
            env.setenv(key, value)
        data, storage = f"s3://{S3_BUCKET}/sweep-data", f"s3://{S3_BUCKET}/sweep"
        locations.upload_folder(prepared_benchmark, data)
        space = tmp / "sweep.yaml"
        space.write_text(
            SPACE.format(
                experiment="sweep-test",
                # epoch 0 reports no validation (Tune must take such results)
                epochs=2,
                val_every=2,
                scheduler="{type: none}",  # every trial runs its full budget (ASHA: below)
                # two trials at once on the 2 CPUs, each sizing its workers on its half; the two
                # MixCL trials then ask for the one pre-training together (the cache lock)
                concurrent=2,
            )
        )
        # credentials in the URI (the server checks them) must never be written
        with_password = mlflow_server.replace("http://", f"http://{MLFLOW_USER}:{PASSWORD}@")
        args = ["--space", str(space), "--data", data, "--storage", storage]
        proc = _tune([*args, "--tracking-uri", with_password])
        out, _ = proc.communicate(timeout=1500)
        (tmp / "tune.log").write_text(out)
        assert proc.returncode == 0, out[-5000:]
        client = MlflowClient(mlflow_server)
        first = sorted(t.info.run_id for t in _runs(client, "sweep-test", "trial"))
        resumed = _tune([*args, "--tracking-uri", with_password, "--resume"])
        resumed_out, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, resumed_out[-5000:]
        report = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "label_efficiency.py"),
                "--report-only",
                "--experiment",
                "sweep-test",
                "--tracking-uri",
                mlflow_server,
                "--storage",
                str(tmp / "bench"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert report.returncode == 0, report.stderr[-3000:]
        yield {
            "out": out,
            "client": client,
            "storage": storage,
            "server_folder": mlflow_server_folder(mlflow_server),
            "first_trial_runs": first,
            "report": report.stdout,
            "bench": tmp / "bench",
        }


@pytest.fixture
def sweep_runs(store_sweep):
    client = store_sweep["client"]
    (parent,) = _runs(client, "sweep-test", "sweep")
    return client, parent, _runs(client, "sweep-test", "trial")


def test_store_sweep_tells_the_user_where_the_results_are(store_sweep):
    out, storage = store_sweep["out"], store_sweep["storage"]
    assert "study finished" in out and "mlflow ui" in out
    assert f"label-efficiency plot: {storage}/report/" in out


def test_store_sweep_writes_no_credential_anywhere(store_sweep, sweep_runs, s3):
    assert PASSWORD not in store_sweep["out"] and S3_SECRET not in store_sweep["out"]
    written = [f for f in Path(store_sweep["server_folder"]).rglob("*") if f.is_file()]
    leaks = [f for f in written if PASSWORD.encode() in f.read_bytes()]
    leaks += [
        f
        for f in _bucket_files(store_sweep["storage"])
        if PASSWORD.encode() in (content := locations.read_bytes(f))
        or S3_SECRET.encode() in content
    ]
    assert not leaks, leaks
    client, parent, trials = sweep_runs
    pretrains = _runs(client, "sweep-test", "pretrain")
    for t in [*trials, *pretrains, parent]:
        recorded = json.dumps([t.data.params, t.data.tags, t.data.metrics])
        assert PASSWORD not in recorded and "alice" not in recorded


def test_store_sweep_has_a_parent_and_one_child_run_per_cell_with_the_vocabulary(sweep_runs):
    from mixcl_ray.dimensions import DIMENSIONS

    _, parent, trials = sweep_runs
    assert len(trials) == 4
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert {(t.data.params["method"], float(t.data.params["label_fraction"])) for t in trials} == {
        ("scratch", 0.5),
        ("scratch", 1.0),
        ("mixcl", 0.5),
        ("mixcl", 1.0),
    }
    vocabulary = {*DIMENSIONS, "preset", "data_fingerprint"}
    assert all(vocabulary <= set(t.data.params) for t in trials)
    assert {t.info.status for t in trials} == {"FINISHED"}


def test_store_sweep_pretrains_once_for_both_mixcl_trials_in_the_bucket(
    store_sweep, sweep_runs, s3
):
    client, _, trials = sweep_runs
    pretrains = _runs(client, "sweep-test", "pretrain")
    assert len(pretrains) == 1
    mixcl = [t for t in trials if t.data.params["method"] == "mixcl"]
    assert sorted(t.data.tags["pretrain_reused"] for t in mixcl) == ["False", "True"]
    (weights,) = {t.data.tags["pretrained_weights"] for t in mixcl}  # the one cached pre-training
    assert weights.startswith(f"{store_sweep['storage']}/pretrain_cache/")
    assert weights.endswith(".pt") and locations.is_file(weights)
    assert "train/loss_label" in pretrains[0].data.metrics
    assert {"seed", "crop_offset", "l_label", "epochs"} <= set(pretrains[0].data.params)


def test_store_sweep_runs_name_their_code_and_hardware(sweep_runs):
    client, parent, trials = sweep_runs
    pretrains = _runs(client, "sweep-test", "pretrain")
    if (ROOT / ".git").exists():  # a checkout: the sweep and its trials name the code they ran
        assert {t.data.tags.get(CODE_TAG) for t in [*trials, parent]} == {code_version()}
    assert {t.data.tags.get(HARDWARE_TAG) for t in [*trials, *pretrains]} == {
        hardware(torch.device("cpu"))
    }


def test_store_sweep_trials_log_epochs_test_scores_artifacts_and_checkpoints(
    store_sweep, sweep_runs, s3
):
    client, _, trials = sweep_runs
    for t in trials:
        history = client.get_metric_history(t.info.run_id, "val/dice_mean")
        assert [m.step for m in history] == [1]  # validated at the last epoch only
        assert {"test/dice_mean", "val/dice/spleen", "train/loss", "train/patches_per_s"} <= set(
            t.data.metrics
        )
        names = {a.path for a in client.list_artifacts(t.info.run_id)}
        assert "config.json" in names and "overlays" in names
        overlays = client.list_artifacts(t.info.run_id, "overlays")
        assert overlays and all(a.path.endswith(".png") for a in overlays)
        assert t.data.tags["model_uri"] == f"runs:/{t.info.run_id}/model"  # an MLflow model
        best = t.data.tags["best_checkpoint"]
        assert best.startswith(f"{store_sweep['storage']}/finetune/") and locations.is_file(best)


def test_store_sweep_reports_on_the_parent_run_and_in_the_bucket(store_sweep, sweep_runs, s3):
    client, parent, _ = sweep_runs
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {
        "report/report.md",
        "report/paired.json",
        "report/label_efficiency.png",
        "report/validation_curves.png",
    }
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/manifest.json",
        "sweep/splits.json",
    }
    storage = store_sweep["storage"]
    (tune_name,) = [n for n in locations.list_names(f"{storage}/tune") if not n.endswith(".json")]
    for name in ("report.md", "label_efficiency.png", "validation_curves.png"):
        assert locations.is_file(f"{storage}/report/{tune_name}/{name}")
    table = locations.read_text(f"{storage}/report/{tune_name}/report.md")
    assert f"fine-tuned on: {hardware(torch.device('cpu'))}" in table
    assert table.count("/model (validation Dice") == 4  # each cell's best model, by its URI


def test_resuming_a_finished_store_sweep_reruns_nothing(store_sweep, sweep_runs):
    # the sweep state and Tune's experiment are read back from the bucket
    client, _, trials = sweep_runs
    assert sorted(t.info.run_id for t in trials) == store_sweep["first_trial_runs"]
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert len(_runs(client, "sweep-test", "pretrain")) == 1


def test_label_efficiency_benchmark_reports_the_store_sweep(store_sweep):
    out = store_sweep["report"]
    assert "machine:" in out and "Validation Dice" in out and "Test Dice" in out
    # a row each in the validation and the test table, and in the paired table
    assert out.count("| mixcl | ") == 4 and out.count("| scratch | ") == 4
    assert "Paired difference to scratch" in out
    # each target from a paired interval (one pair here: the case-level interval)
    assert re.search(
        r"target: MixCL vs scratch at 50 % \(\+0\.05 or more, lower end above 0\): "
        r"[+-][0-9.]+ \[[+-][0-9.]+, [+-][0-9.]+\] over 1 pairs -> (met|not met)",
        out,
    ), out
    assert "target: MixCL vs identity at 50 % (ahead: lower end above 0): 0 pairs" in out
    assert "target: MixCL vs scratch at 100 % (lower end -0.02 or higher)" in out
    report = store_sweep["bench"] / "label-efficiency-report"
    assert (report / "label_efficiency_val.png").stat().st_size
    assert (report / "label_efficiency.png").stat().st_size  # the paired plot, beside the report
    assert not (ROOT / "benchmarks/results/label_efficiency.png").exists()  # not in the checkout


def _session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def test_killed_sweep_driver_resumes_without_rerunning_ended_trials(prepared_benchmark, tmp_path):
    """ASHA stops every trial after its first epoch (max_t 1 of 3 epochs, mid-fit), and its
    MLflow run is closed as early stopped right then; once the second trial has started (so
    the stopped one gave its CPUs back), SIGKILL of the sweep driver and every process it
    started (its local Ray included), then ``--resume``: the stopped trial is not run again,
    MLflow has one ended run per trial, both closed as early stopped, and the run the kill
    interrupted is closed as KILLED and linked from the run that resumed it."""
    space = tmp_path / "resume.yaml"
    text = SPACE.format(
        experiment="resume-test",
        epochs=3,
        val_every=1,
        scheduler="{type: asha, max_t: 1, grace_period: 1}",
        concurrent=1,
    )
    # two trials, scratch then MixCL: the kill lands in the second (its pre-training)
    space.write_text(text.replace("label_fraction: {grid: [0.5, 1.0]}", "label_fraction: 1.0"))
    args = [
        "--space",
        str(space),
        "--data",
        str(prepared_benchmark),
        "--storage",
        str(tmp_path / "runs"),
    ]
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    proc = _tune(args)
    deadline = time.time() + 900
    started = []
    state_file = tmp_path / "runs/tune/resume.latest.json"  # written once MLflow is set up
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        if not state_file.exists():  # two processes creating one SQLite store at once clash
            continue
        try:
            started = _runs(MlflowClient(uri), "resume-test", "trial")
        except Exception:
            continue
        # one trial at a time: the first one has been stopped. A run is created before its
        # params are logged, so wait for the second run's params too
        if len(started) == 2 and all("method" in t.data.params for t in started):
            break
    if proc.poll() is not None:
        pytest.fail(f"the sweep ended before it could be killed:\n{proc.communicate()[0][-5000:]}")
    assert len(started) == 2, "the second trial did not start before the deadline"
    # the stopped trial's run was closed when the scheduler stopped it (before the next trial
    # could start), not left RUNNING until the sweep's end
    (stopped,) = [t for t in started if t.data.params["method"] == "scratch"]
    assert stopped.info.status == "KILLED", stopped.info
    assert "early stopped" in stopped.data.tags["mixcl.stopped"]
    time.sleep(5)  # into the second trial's pre-training
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and the trial processes
    proc.communicate(timeout=60)
    deadline = time.time() + 60
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(1)
    assert not _session_processes(proc.pid)
    state = json.loads(state_file.read_text())

    resumed = _tune([*args, "--resume"])
    out, _ = resumed.communicate(timeout=1500)
    assert resumed.returncode == 0, out[-5000:]
    client = MlflowClient(uri)
    (parent,) = _runs(client, "resume-test", "sweep")
    assert parent.info.run_id == state["parent_run_id"] and parent.info.status == "FINISHED"
    trials = _runs(client, "resume-test", "trial")
    interrupted = [t for t in trials if "mixcl.interrupted" in t.data.tags]
    ended = [t for t in trials if "mixcl.interrupted" not in t.data.tags]
    keys = [t.data.tags["mixcl.trial_key"] for t in ended]
    assert len(keys) == len(set(keys)) == 2  # one ended run per trial, no duplicates
    assert stopped.info.run_id in {t.info.run_id for t in ended}  # stopped before the kill: kept
    for t in ended:
        assert t.info.status == "KILLED" and "early stopped" in t.data.tags["mixcl.stopped"]
        # MLflow hears of the epoch first; the stop can still cut the write short
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val/dice_mean")] in (
            [],
            [0],
        )
    successors = {t.data.tags.get("mixcl.resumed_from"): t for t in ended}
    (lost,) = interrupted  # the MixCL trial's run, cut off in its pre-training
    assert lost.info.status == "KILLED" and lost.data.params["method"] == "mixcl"
    assert (
        successors[lost.info.run_id].data.tags["mixcl.trial_key"]
        == lost.data.tags["mixcl.trial_key"]
    )
    pretrains = _runs(client, "resume-test", "pretrain")
    assert [p.info.status for p in pretrains].count("FINISHED") == 1
    assert all(p.info.status in ("FINISHED", "KILLED") for p in pretrains)


def test_unreachable_tracking_server_fails_before_compute(prepared_benchmark, tmp_path):
    port = free_port()
    proc = _tune(
        [
            "--data",
            str(prepared_benchmark),
            "--storage",
            str(tmp_path / "runs"),
            "--tracking-uri",
            f"http://127.0.0.1:{port}",
        ]
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert "not reachable" in out
    assert not (tmp_path / "runs" / "tune").exists()
