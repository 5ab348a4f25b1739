"""A stage's checkpoint: the training state (model, optimiser, scheduler, AMP scaler, epoch and
step, RNG), its folder on disk, and where an interrupted run resumes (Ray Train's record)."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch

from mixcl_ray.models import unwrap

STATE_FILE = "state.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(
        tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def training_state(
    model, optimizer, scheduler, scaler, epoch: int, step: int, generator=None, extra=None
) -> dict:
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": rng_state(generator),
        "extra": extra or {},
    }


def restore_state(
    state: dict, model, optimizer, scheduler, scaler, generator=None
) -> tuple[int, int]:
    """Load a ``training_state``; return (next epoch, global step)."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], generator)
    return state["epoch"] + 1, state["step"]


def save_checkpoint_dir(state: dict, extra_files: dict | None = None) -> str:
    """Write the state (and extra files: name -> callable(path)) into a new temporary folder."""
    folder = tempfile.mkdtemp(prefix="mixcl-ckpt-")
    torch.save(state, Path(folder) / STATE_FILE)
    for name, write in (extra_files or {}).items():
        write(Path(folder) / name)
    return folder


def load_checkpoint_state(folder) -> dict:
    # weights_only: checkpoints hold tensors, numbers, strings and tuples only
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def resume_epoch(run_dir) -> int:
    """Next epoch of an interrupted run in ``run_dir`` (a folder or object-store URI; 0 when
    nothing is there).

    Read from the snapshot file that Ray Train resumes from, never from the ``epoch_*``
    folders: a run lost while uploading a checkpoint leaves a folder newer than the snapshot's
    latest checkpoint, and without a snapshot Ray starts over."""
    from data_prep import locations

    snapshot = locations.join(run_dir, SNAPSHOT_FILE)
    if not locations.exists(snapshot):
        return 0
    try:
        latest = json.loads(locations.read_text(snapshot)).get("latest_checkpoint_result")
        if latest is None:
            return 0  # no checkpoint reported yet: Ray starts over
        return int(latest["metrics"]["epoch"]) + 1  # every epoch's report carries its number
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(
            f"{locations.describe(snapshot)}: Ray Train's checkpoint record cannot be read "
            f"({type(e).__name__}: {e}); delete {locations.describe(run_dir)} to start this "
            "run over"
        ) from e
