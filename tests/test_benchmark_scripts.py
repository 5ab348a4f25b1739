"""The Ray-based benchmark scripts run end to end at smoke sizes on the test benchmark (each
starts its own local Ray, so the session's instance is paused). Figures are printed, not
asserted: the tables must be complete and every ratio finite."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_paused")]
ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 900) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _ratios(out: str) -> list[float]:
    # every "| 1.23x |" cell, adjacent ones included (not a scale column such as "| 16x |")
    return [float(x) for x in re.findall(r"\| ([0-9]+\.[0-9]+|nan|inf)x (?=\|)", out)]


def test_feed_benchmark_smoke(prepared_benchmark):
    out = _run(
        "feed_vs_monai.py",
        "--data",
        str(prepared_benchmark),
        "--sizes",
        "32",
        "--epochs",
        "2",
        "--patches-per-case",
        "1",
    )
    assert "machine:" in out and "mixcl_ray Ray Data" in out
    # the settings that decide our figure, beside it
    assert "cases cached: True (cache_cases auto)" in out and "blocks: " in out
    assert "idle workers kept ms: 300000" in out and "object store MiB: " in out
    assert "MONAI's transforms |" in out and "our augmentation functions |" in out
    ratios = _ratios(out)  # 3 rows x (vs MONAI's transforms, vs our functions)
    assert len(ratios) == 6 and ratios[0] == 1.0 and ratios[3] == 1.0, ratios
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    for step in ("sample + crop", "two views", "corruptions", "MONAI's transforms for the same"):
        assert step in out


def test_training_overhead_benchmark_smoke(prepared_benchmark):
    out = _run(
        "train_overhead.py",
        "--data",
        str(prepared_benchmark),
        "--epochs",
        "2",
        "--patches-per-case",
        "1",
    )
    assert "plain PyTorch" in out and "mixcl_ray Ray Train" in out and "data-wait share" in out
    ratios = _ratios(out)
    assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)


def test_gpu_benchmark_runs_as_a_cpu_smoke_test(prepared_benchmark):
    out = _run("gpu_pretrain.py", "--smoke", "--data", str(prepared_benchmark))
    assert "CPU smoke run" in out and "| unet | 32^3 | mixcl_ray Ray Train |" in out
    ratios = _ratios(out)
    assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)


def test_memory_scaling_benchmark_smoke(prepared_benchmark, tmp_path, monkeypatch):
    # one scale (the test corpus once), both pipelines
    out = _run(
        "memory_scaling.py",
        "--data",
        str(prepared_benchmark),
        "--scales",
        "1",
        "--target-gb",
        "0.001",
        "--work",
        str(tmp_path),
    )
    rows = [line for line in out.splitlines() if line.startswith("| 1x |")]
    assert len(rows) == 1, out
    ratios = _ratios(out)
    assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)
    # a larger corpus is a valid prepared folder (each copy of a case under its own id, every
    # split list extended)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from memory_scaling import replicate

    from data_prep.reader import load_case, read_manifest, read_splits

    replicate(prepared_benchmark, 2, tmp_path / "x2")
    one, two = read_manifest(prepared_benchmark), read_manifest(tmp_path / "x2")
    assert len(two["cases"]) == 2 * len(one["cases"])
    train = read_splits(prepared_benchmark)["train"]
    assert read_splits(tmp_path / "x2")["train"] == [f"{i}~{r}" for r in (0, 1) for i in train]
    copy = load_case(tmp_path / "x2", f"{train[0]}~1")
    assert (copy["image"] == load_case(prepared_benchmark, train[0])["image"]).all()
