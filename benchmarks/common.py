"""What the benchmark scripts share: the parser with --data, the built-in benchmark prepared on
first use, and the machine line every script prints first."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    out.add_argument(
        "--data",
        help="prepared folder, or builtin:SIZE (default: builtin:small, the built-in benchmark)",
    )
    return out


def ensure_data(data: Path | str | None) -> Path:
    """``data``: a prepared folder, or ``builtin:SIZE``; by default the built-in benchmark
    prepared into the cache (as the demo study does)."""
    from data_prep.cli import BUILTIN, builtin_benchmark

    chosen = str(data) if data is not None else f"{BUILTIN}small"
    return builtin_benchmark(chosen, progress=False) or Path(chosen).absolute()


def machine() -> str:
    """The line every script prints first: the CPU's model and the vector instructions torch
    uses on it (two machines sold as the same CPU name can differ 2x in these benchmarks)."""
    import torch

    from mixcl_ray.train_utils import cpu_model

    cpu = f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"
    return (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), "
        f"python {platform.python_version()}"
    )


def run_sweep(command: list[str], resume_hint: str, **popen_kwargs) -> None:
    """Run a sweep command and wait for it to end, Ctrl-C included.

    Ctrl-C in a terminal reaches the sweep too (one process group), and the sweep stops on its
    own: it saves its state and closes its runs. ``subprocess.run`` would SIGKILL it on the
    KeyboardInterrupt instead, leaving its MLflow runs open and its local Ray behind. So an
    interrupt here only waits; once the sweep has ended, exit with ``resume_hint``. A failing
    sweep exits with its status."""
    proc = subprocess.Popen(command, **popen_kwargs)
    interrupted = False
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise SystemExit(f"interrupted; {resume_hint}")
    if code:
        raise SystemExit(code)
