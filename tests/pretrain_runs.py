"""``python -m mixcl_ray.pretrain`` as the fault tests run it: the suite's benchmark with the
smallest feed, a fault injected as each epoch's line appears."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def small_pretrain(
    data: Path, folder: Path, epochs: int, env: dict, args=(), on_epoch=None, timeout=800
) -> tuple[int, str]:
    """Run a pre-training of ``epochs`` epochs (1 worker, 1 patch per case, batches of 2, stored
    under ``folder/runs``), calling ``on_epoch(n)`` when the line of epoch n (from 1) appears
    (the fit goes on meanwhile: its output waits in the pipe); returns (exit code, output),
    the output also written to ``folder/pretrain.log``."""
    small = folder / "small.yaml"
    small.write_text("patches: {patches_per_case: 1, batch_size: 2}\n")
    command = [sys.executable, "-m", "mixcl_ray.pretrain", "--data", str(data)]
    command += ["--storage", str(folder / "runs"), "--epochs", str(epochs), "--workers", "1"]
    command += ["--config", str(small), *args]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            seen = re.match(rf"pretrain epoch (\d+)/{epochs} ", line)
            if seen and on_epoch:
                on_epoch(int(seen.group(1)))
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    (folder / "pretrain.log").write_text(out)
    return code, out


def printed_losses(out: str, epochs: int) -> list[float]:
    """The loss of each epoch line, as printed (4 decimals)."""
    return [float(x) for x in re.findall(rf"^pretrain epoch \d+/{epochs}  loss (\S+)", out, re.M)]
