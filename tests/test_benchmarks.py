"""The benchmark scripts still run (smoke, small sizes); their figures are not asserted."""

import os
import signal
import subprocess
import sys
import time
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


SWEEP = """
import signal, sys, time
from pathlib import Path
def stop(*_):
    time.sleep(1)  # saving its state
    Path(sys.argv[1]).write_text("saved")
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
Path(sys.argv[1] + ".started").write_text("")
time.sleep(60)
"""

WRAPPER = """
import sys
sys.path.insert(0, sys.argv[1])
import common
common.run_sweep([sys.executable, "-c", sys.argv[2], sys.argv[3]], "continue with --resume")
"""


def test_ctrl_c_lets_a_benchmark_sweep_save_its_state(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) during a benchmark's sweep: the wrapper
    waits until the sweep has saved its state and ended, then says how to resume."""
    saved = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(ROOT / "benchmarks"), SWEEP, str(saved)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 60
    while not Path(f"{saved}.started").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert saved.read_text() == "saved"  # not killed before it saved
    assert proc.returncode == 1 and "interrupted; continue with --resume" in err
