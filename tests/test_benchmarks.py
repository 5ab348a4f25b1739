"""The benchmark scripts still run (smoke, small sizes); their figures are not asserted."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mixcl_step_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/mixcl_step.py"), "--skip-large", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for part in (
        "MixCL step",
        "ratio",
        "identity loss",
        "label loss",
        "reconstruction loss",
        "backward",
    ):
        assert part in proc.stdout
