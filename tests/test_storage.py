"""Unwritable storage is a clear error at start, before Ray or any compute starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixcl_ray.storage import StorageError, ensure_writable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot write: read-only by mode, or sysfs when running as root
    (root ignores modes)."""
    if os.geteuid() == 0:
        return Path("/sys/mixcl_ray_storage_test")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_ensure_writable(tmp_path, unwritable):
    assert ensure_writable(tmp_path / "a" / "b") == (tmp_path / "a" / "b").absolute()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    with pytest.raises(StorageError, match="is not writable"):
        ensure_writable(unwritable)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"file/runs is not writable \(Not a directory\)"):
        ensure_writable(tmp_path / "file" / "runs")


@pytest.mark.parametrize(
    "command",
    [
        ["mixcl_ray.tune"],
        ["mixcl_ray.pretrain", "--data", "{data}"],
        ["mixcl_ray.finetune", "--data", "{data}", "--label-fraction", "0.05"],
    ],
)
@pytest.mark.slow
def test_commands_refuse_unwritable_storage_before_compute(command, unwritable, tmp_path):
    argv = [a.replace("{data}", str(tmp_path)) for a in command]
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.run(
        [sys.executable, "-m", *argv, "--storage", str(unwritable)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{unwritable} is not writable" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
