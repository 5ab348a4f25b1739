"""Object-store storage, as on a cluster whose nodes share only a bucket: data_prep output and
pre-training checkpoints (and resuming from them) on ``s3://`` URIs; a whole sweep on the
object store (Tune state, the pre-training cache, fine-tuning checkpoints, the report) is
``tests/test_sweep.py``'s first test. The server is a real S3-compatible
HTTP server (moto's) on 127.0.0.1; everything reaches it through pyarrow's S3 filesystem with
the standard AWS environment variables, as a user's cluster reaches S3 or MinIO."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import locations
from data_prep.output import FAIL_AFTER_SHARDS_ENV
from data_prep.reader import load_case, read_splits
from mixcl_ray.storage import StorageError, ensure_writable
from tests.servers import S3_BUCKET as BUCKET
from tests.servers import S3_SECRET as SECRET

pytestmark = [pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[1]


def test_locations_on_an_object_store(s3, tmp_path):
    base = f"s3://{BUCKET}/unit"
    assert locations.join(base + "?scheme=http", "a", "b.json") == f"{base}/a/b.json?scheme=http"
    assert locations.describe(f"{base}?secret_key={SECRET}") == base
    assert locations.as_location(f"file://{tmp_path}") == tmp_path
    assert locations.join(tmp_path, "a") == tmp_path / "a"
    target = locations.join(base, "x", "state.json")
    assert not locations.exists(target)
    locations.write_text(target, '{"a": 1}')
    assert locations.exists(target) and locations.is_file(target)
    assert json.loads(locations.read_text(target)) == {"a": 1}
    assert locations.list_names(locations.join(base, "x")) == ["state.json"]
    assert locations.list_names(locations.join(base, "missing")) == []
    with pytest.raises(FileNotFoundError, match="unit/nope.json not found"):
        locations.read_text(locations.join(base, "nope.json"))
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "sub" / "f.txt").write_text("hello")
    locations.upload_folder(tmp_path / "up", locations.join(base, "up"))
    assert locations.read_text(locations.join(base, "up", "sub", "f.txt")) == "hello"

    assert ensure_writable(f"s3://{BUCKET}/runs") == f"s3://{BUCKET}/runs"
    with pytest.raises(StorageError, match="s3://no-such-bucket/runs is not writable") as err:
        ensure_writable("s3://no-such-bucket/runs")
    assert SECRET not in str(err.value)


def _run(module, args, env, cwd, timeout=900):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    full_env.pop("RAY_ADDRESS", None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    return proc.returncode, proc.stdout


SPACE = """
preset: cpu-tiny
experiment: object-store
space: {method: mixcl, label_fraction: 1.0, seed: 0}
"""


@pytest.mark.slow
@pytest.mark.usefixtures("ray_paused")
def test_prepare_and_resume_pretraining_on_an_object_store(s3, synthetic_benchmark, tmp_path):
    data = f"s3://{BUCKET}/prepared"
    # data_prep writes into the bucket (staged locally, uploaded once every case is written)
    rc, out = _run(
        "data_prep",
        ["prepare", "--dataset", str(synthetic_benchmark), "--out", data, "--no-progress"],
        s3,
        tmp_path,
    )
    assert rc == 0, out[-4000:]
    assert f"prepared folder: {data}" in out
    first = json.loads(locations.read_text(f"{data}/manifest.json"))
    assert set(locations.list_files(data)) == {"manifest.json", first["splits"], *first["shards"]}
    rc, out = _run(
        "data_prep", ["prepare", "--dataset", str(synthetic_benchmark), "--out", data], s3, tmp_path
    )
    assert rc == 0 and "is up to date with its inputs" in out, out[-4000:]

    # a new output whose upload dies half-way: the previous one stays whole and readable, and
    # the same command run again finishes, leaving nothing of the dead upload behind
    case_id = sorted(first["cases"])[0]
    image = load_case(data, case_id)["image"]
    again = ["prepare", "--dataset", str(synthetic_benchmark), "--out", data, "--no-progress"]
    again += ["--cases-per-shard", "3"]  # other options: another output
    rc, out = _run("data_prep", again, {**s3, FAIL_AFTER_SHARDS_ENV: "2"}, tmp_path)
    assert rc != 0 and "upload stopped after 2 shards" in out, out[-4000:]
    assert json.loads(locations.read_text(f"{data}/manifest.json")) == first
    assert read_splits(data) == json.loads(locations.read_text(f"{data}/{first['splits']}"))
    assert np.array_equal(load_case(data, case_id)["image"], image)
    assert len([n for n in locations.list_names(data) if n.startswith("v-")]) == 2
    rc, out = _run("data_prep", again, s3, tmp_path)
    assert rc == 0, out[-4000:]
    second = json.loads(locations.read_text(f"{data}/manifest.json"))
    assert second["input_fingerprint"] != first["input_fingerprint"]
    assert len(second["shards"]) > len(first["shards"])
    assert set(locations.list_files(data)) == {"manifest.json", second["splits"], *second["shards"]}
    assert np.array_equal(load_case(data, case_id)["image"], image)

    # pre-training: checkpoints in the bucket; the same name with more epochs resumes from them
    config = tmp_path / "small.yaml"
    config.write_text("patches: {patches_per_case: 1, batch_size: 2}\n")
    storage = f"s3://{BUCKET}/runs"
    common = ["--data", data, "--storage", storage, "--name", "p", "--workers", "1"]
    rc, out = _run(
        "mixcl_ray.pretrain", [*common, "--config", str(config), "--epochs", "1"], s3, tmp_path
    )
    assert rc == 0, out[-4000:]
    assert "epoch_0000" in locations.list_names(f"{storage}/p")
    assert "not tracked in MLflow: an object store cannot hold" in out  # and it still trained
    rc, out = _run(
        "mixcl_ray.pretrain", [*common, "--config", str(config), "--epochs", "2"], s3, tmp_path
    )
    assert rc == 0, out[-4000:]
    metrics = json.loads(re.search(r"^\{$.*?^\}$", out, re.S | re.M).group(0))
    assert metrics["epoch"] == 1 and metrics["resumed_from_epoch"] == 1  # epoch 0 not redone
    # the resumed run's line per epoch: its one new epoch, with every loss term
    lines = re.findall(r"^pretrain epoch .*$", out, re.M)
    assert len(lines) == 1 and lines[0].startswith("pretrain epoch 2/2  loss "), out[-4000:]
    terms = {k[len("train/loss_") :]: v for k, v in metrics.items() if k.startswith("train/loss_")}
    assert {"identity", "label", "reconstruction"} <= set(terms), metrics
    for term, value in {"loss": metrics["train/loss"], **terms}.items():
        assert f" {term} {value:.4f}" in lines[0], lines
    assert f"final checkpoint {storage}/p/epoch_0001" in out
    assert locations.is_file(f"{storage}/p/epoch_0001/pretrained.pt")
    assert not (tmp_path / "runs").exists()  # nothing fell back to a local folder

    # an object store cannot hold the default SQLite tracking file: said before any compute
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    sweep = ["--space", str(space), "--data", data, "--storage", f"s3://{BUCKET}/sweep"]
    rc, out = _run("mixcl_ray.tune", [*sweep, "--address", "local"], s3, tmp_path, timeout=120)
    assert rc == 2 and "--tracking-uri" in out, out[-4000:]
    # (a whole sweep on the object store, tracked on an MLflow server: tests/test_sweep.py)
