"""The training engine both stages run on Ray Train.

On each worker, ``run_stage`` owns what every stage does: threads, seeds and device, the
optimiser and schedule, resuming from Ray Train's checkpoint, the epoch loop with its timing,
validation, the checkpoint and the report. A ``Stage`` supplies only its model, its loss on a
batch, its validation and the files its checkpoints carry. On the driver, ``fit_stage`` starts
the worker group and returns the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from mixcl_ray.checkpoints import (
    load_checkpoint_state,
    restore_state,
    save_checkpoint_dir,
    training_state,
)
from mixcl_ray.train_utils import (
    autocast,
    build_optimizer,
    build_scheduler,
    gather,
    grad_scaler,
    hardware,
    network_layout,
    optimizer_step,
)

# test-only fault injection: set in the driver's environment, every rank of the next fits
# fails after that epoch (the resume tests); not part of any command's interface
FAIL_AFTER_EPOCH_ENV = "MIXCL_TEST_FAIL_AFTER_EPOCH"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageJob:
    """What the driver hands every worker of a stage; it travels to the workers as it is."""

    config: Any  # the stage's PretrainConfig or FinetuneConfig
    steps_per_epoch: int  # of each worker (the schedule's length)
    torch_threads: int
    fail_after_epoch: int | None = None  # set by fit_stage from FAIL_AFTER_EPOCH_ENV


class Stage:
    """What a stage supplies to the engine. ``build`` makes the model (after the engine seeded
    torch with ``optim.seed + rank``); ``loss`` runs under autocast and returns the loss to
    step on with the terms to average over the epoch (``"loss"`` among them)."""

    loss_name = "training"
    ddp_kwargs: dict | None = None
    generator: torch.Generator | None = None  # drawn from by ``loss``; checkpointed

    def __init__(self, job: StageJob, rank: int, world: int, device: torch.device):
        self.job, self.cfg, self.rank, self.world, self.device = (
            job,
            job.config,
            rank,
            world,
            device,
        )

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def scaled_parameters(self, model) -> tuple[list, float]:
        """Parameters trained at a multiple of the learning rate, and that multiple."""
        return [], 1.0

    def scaled_hold_ramp(self) -> tuple[float, float]:
        """Epochs the scaled parameters are held at rate 0, then ramped in over."""
        return 0.0, 0.0

    def after_step(self, model) -> None:
        """Called after every optimiser step (``model`` as trained, DDP-wrapped or not)."""

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def epoch_metrics(self) -> dict:
        """The stage's own metrics of the epoch just trained."""
        return {}

    def validate(self, model, epoch: int) -> dict:
        """Validation metrics of this epoch ({} when it does not validate)."""
        return {}

    def restore(self, extra: dict, folder: Path) -> None:
        """Take back what ``checkpoint_extra`` and ``checkpoint_files`` wrote."""

    def checkpoint_extra(self) -> dict:
        return {}

    def checkpoint_files(self, model) -> dict:
        """Files for rank 0's checkpoint: name -> callable(path)."""
        return {}


def train_one_epoch(stage: Stage, model, batches, optimizer, scheduler, scaler, step: int):
    """One pass over ``batches``: the epoch's mean terms, its timing and the next step."""
    cfg, device = stage.cfg, stage.device
    model.train()
    sums: dict[str, float] = {}
    count = patches = 0
    wait = 0.0
    start = tick = time.perf_counter()
    for batch in batches:
        wait += time.perf_counter() - tick
        with autocast(device, cfg.scaling.amp):
            loss, terms = stage.loss(model, batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite {stage.loss_name} loss ({loss.item()}) at step {step}: "
                "lower the learning rate"
            )
        optimizer_step(loss, model, optimizer, scaler, scheduler, cfg.optim.grad_clip)
        stage.after_step(model)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        count += 1
        patches += next(iter(batch.values())).shape[0]
        step += 1
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    metrics = {
        f"train/{'loss' if k == 'loss' else 'loss_' + k}": v / max(1, count)
        for k, v in sums.items()
    }
    metrics.update(
        {
            "train/patches_per_s": patches * stage.world / seconds,
            "train/data_wait_share": wait / seconds,
            "train/lr": scheduler.get_last_lr()[0],
            # where the time goes (seconds; benchmarks/fit_cost.py adds them up)
            "time/train_s": seconds,
            "time/data_wait_s": wait,
        }
    )
    if len(optimizer.param_groups) > 1:  # the scaled parameters' rate
        metrics["train/lr_pretrained"] = scheduler.get_last_lr()[1]
    if device.type == "cuda":
        metrics["train/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics, step


def run_stage(stage_cls: type[Stage], job: StageJob) -> None:
    """The per-worker training function of a stage (Ray Train)."""
    import ray.train
    import ray.train.torch

    from mixcl_ray.models import unwrap

    loop_start = time.time()  # wall clock: the driver compares it with its own (fit_cost)
    cfg = job.config
    torch.set_num_threads(max(1, job.torch_threads))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    computed_on = hardware(device)  # recorded in every checkpoint
    torch.manual_seed(cfg.optim.seed + rank)
    stage = stage_cls(job, rank, ctx.get_world_size(), device)
    model = stage.build()
    model = network_layout(model, device, cfg.scaling.channels_last)
    scaled, lr_scale = stage.scaled_parameters(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=stage.ddp_kwargs)
    optimizer = build_optimizer(model, cfg.optim, scaled, lr_scale)
    scheduler = build_scheduler(optimizer, cfg.optim, job.steps_per_epoch, stage.scaled_hold_ramp())
    scaler = grad_scaler(device, cfg.scaling.amp)
    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint_state(folder)
            start_epoch, step = restore_state(
                state, model, optimizer, scheduler, scaler, stage.generator
            )
            history = state["extra"].get("history", [])
            stage.restore(state["extra"], Path(folder))
    shard = ray.train.get_dataset_shard("train")
    report_s = 0.0  # the previous epoch's report (checkpoint upload included)
    for epoch in range(start_epoch, cfg.optim.epochs):
        epoch_start = time.time()
        batches = shard.iter_torch_batches(
            batch_size=cfg.patches.batch_size,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=cfg.patches.local_shuffle_buffer,
            local_shuffle_seed=cfg.patches.shuffle_seed(cfg.optim.seed, epoch, rank),
        )
        metrics, step = train_one_epoch(stage, model, batches, optimizer, scheduler, scaler, step)
        metrics.update(stage.epoch_metrics())
        metrics.update(
            {
                "epoch": epoch,
                "step": step,
                "resumed_from_epoch": start_epoch,  # > 0: this worker group restarted there
                "time/prev_report_s": report_s,
            }
        )
        if epoch == start_epoch:  # model, optimiser, resume and the stage's own setup
            metrics["time/loop_start"] = loop_start
            metrics["time/setup_s"] = epoch_start - loop_start
        tick = time.perf_counter()
        metrics.update(stage.validate(unwrap(model), epoch))
        metrics["time/val_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if rank == 0:
            history.append(metrics)
            extra = {**stage.checkpoint_extra(), "history": history, "hardware": computed_on}
            state = training_state(
                model, optimizer, scheduler, scaler, epoch, step, stage.generator, extra
            )
            folder = save_checkpoint_dir(state, stage.checkpoint_files(unwrap(model)))
            metrics["time/save_s"] = time.perf_counter() - tick
            metrics["time/epoch_end"] = time.time()
            tick = time.perf_counter()
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"epoch_{epoch:04d}",
                delete_local_checkpoint_after_upload=True,  # persisted: the temporary copy goes
            )
        else:
            ray.train.report(metrics)
        report_s = time.perf_counter() - tick
        if job.fail_after_epoch == epoch:
            # the ranks meet first, so every rank's report of this epoch is queued before any
            # rank fails (a controller that saw rank 1 fail while rank 0 still uploaded its
            # checkpoint dropped the epoch, and the resume started over)
            gather(None)
            raise RuntimeError(f"injected failure after epoch {epoch}")
