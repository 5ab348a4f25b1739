"""Pieces both training stages share: optimiser and schedule, autocast, the checkpoint state
(model, optimiser, scheduler, AMP scaler, epoch/step, RNG), the CPU budget, run names."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import tempfile
from pathlib import Path

import torch

from mixcl_ray.models import unwrap
from mixcl_ray.train_config import OptimConfig, ScalingSettings

STATE_FILE = "state.pt"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, scaled=(), lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW at ``optim.lr``; the parameters in ``scaled`` (e.g. the pre-trained ones) form a
    second group at ``lr_scale`` times that rate, which the schedule scales alike."""
    slow = {id(p) for p in scaled} if lr_scale != 1 else set()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) not in slow]}]
    if slow:
        groups.append({"params": [p for p in params if id(p) in slow], "lr": optim.lr * lr_scale})
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what Python's platform knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    """What a stage computed on: the GPU, else the CPU model and the vector instructions torch's
    kernels use there, and torch's build. One seed gives the same weights on one kind of machine,
    not across kinds (other kernels round otherwise), so results record it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
    return f"{name}, torch {torch.__version__}"


def build_scheduler(
    optimizer, optim: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the last step."""
    total = max(1, optim.epochs * steps_per_epoch)
    warmup = int(optim.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on GPU; fp32 on CPU."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and amp == "fp16")


def optimizer_step(loss, model, optimizer, scaler, scheduler, grad_clip: float) -> None:
    """Backward (scaled for fp16), optional gradient-norm clipping, optimiser and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


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


def cpus_per_worker(scaling: ScalingSettings, cluster_cpus: float) -> float:
    """CPUs each Train worker reserves. On CPU, the workers share half of the cluster's CPUs
    and Ray Data keeps the other half, so that neither deadlocks nor idles (RAY_NOTES: two
    1-CPU workers on a 2-CPU machine starve Ray Data and hang)."""
    if scaling.cpus_per_worker is not None:
        return scaling.cpus_per_worker
    if scaling.use_gpu:
        return 1.0
    return max(0.25, min(4.0, math.floor(4 * cluster_cpus / 2 / scaling.workers) / 4))


def run_name(stage: str, config: dict, data_fingerprint: str) -> str:
    """A name that the same command and data always get, so re-running resumes."""
    blob = json.dumps({"config": config, "data": data_fingerprint}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


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


def gather(obj) -> list:
    """``obj`` from every rank of the process group (just ``[obj]`` outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# test-only fault injection: set in the driver's environment, every rank of the next fits
# fails after that epoch (the resume tests); not part of any command's interface
FAIL_AFTER_EPOCH_ENV = "MIXCL_TEST_FAIL_AFTER_EPOCH"


def injected_failure_epoch() -> int | None:
    value = os.environ.get(FAIL_AFTER_EPOCH_ENV)
    return int(value) if value else None


def maybe_inject_failure(loop_config: dict, epoch: int) -> None:
    """Fail every rank after ``loop_config["fail_after_epoch"]`` (set by ``fit_stage`` from
    ``MIXCL_TEST_FAIL_AFTER_EPOCH``).

    The ranks meet first, so every rank's report of this epoch is queued before any rank
    fails: rank 1 reports at once while rank 0 still uploads the checkpoint, and a controller
    that saw rank 1's failure first dropped the epoch (the resume then started over)."""
    if loop_config.get("fail_after_epoch") == epoch:
        gather(None)
        raise RuntimeError(f"injected failure after epoch {epoch}")


def epoch_batches(shard, patches, seed: int, epoch: int, rank: int, device):
    """One epoch of a worker's dataset shard as torch batches on ``device`` (``patches``: the
    stage's ``PatchConfig``; its shuffle is seeded by (seed, epoch, rank) when deterministic)."""
    return shard.iter_torch_batches(
        batch_size=patches.batch_size,
        device=device,
        drop_last=True,
        local_shuffle_buffer_size=patches.local_shuffle_buffer,
        local_shuffle_seed=patches.shuffle_seed(seed, epoch, rank),
    )


def data_config(deterministic: bool, object_store_mb: int = 0):
    """Ray Train's ingest options: Train's defaults, with Ray Data's ``preserve_order`` when
    the feed must be deterministic (blocks handed over in order, and split between the
    workers without locality hints or buffering), and the feed's object-store budget when
    ``object_store_mb`` is set (Ray Data takes the smaller of it and half the store)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    if deterministic:
        options.preserve_order = True
    if object_store_mb:
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=object_store_mb * 2**20
        )
    return ray.train.DataConfig(execution_options=options)


def fit_stage(
    loop, loop_config: dict, config, per_worker_cpus: float, storage, name: str, callbacks, dataset
) -> tuple:
    """Run one Ray Train stage; returns (last checkpoint folder, last metrics, the last
    checkpoint's ``extra``: the epoch history, the hardware, what the stage kept).
    ``storage`` may be an object-store URI; the folder returned is then a URI too.

    Re-running with the same storage and name resumes from the last checkpoint; a worker
    failure restarts the group from it (``config.scaling.max_failures`` times). ``config``: the
    stage's config (its ``scaling``; with ``patches.deterministic`` the dataset's blocks reach
    the workers in the same order every run, see ``data_config``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    scaling = config.scaling
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "fail_after_epoch": injected_failure_epoch()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": per_worker_cpus},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=data_config(config.patches.deterministic, config.patches.object_store_mb),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} finished without a checkpoint: {result.error}")
    from data_prep import locations

    folder = locations.join(storage, name, Path(result.checkpoint.path).name)
    with result.checkpoint.as_directory() as local:
        extra = load_checkpoint_state(local)["extra"]
    return folder, dict(result.metrics or {}), extra
