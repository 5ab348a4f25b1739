"""Pieces both training stages share: optimiser and schedule, autocast and the AMP scaler, the
hardware a run computed on, the CPU budget and the network's layout, run names, gathering across
ranks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math

import torch

from mixcl_ray.config import OptimConfig, ScalingSettings


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, scaled=(), lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW at ``optim.lr``; the parameters in ``scaled`` (e.g. the loaded ones) form a second
    group at ``lr_scale`` times that rate, which the schedule scales alike (and may hold and
    ramp in: ``build_scheduler``)."""
    slow = {id(p) for p in scaled}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if id(p) not in slow]}]
    if slow:
        groups.append({"params": [p for p in params if id(p) in slow], "lr": optim.lr * lr_scale})
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def network_layout(model: torch.nn.Module, device: torch.device, channels_last: bool):
    """``model`` with its 3D weights in channels-last layout where that is faster: on a CPU
    device with ``channels_last`` (oneDNN's 3D convolutions; ``ScalingSettings.channels_last``).
    Its state dict loads into a network in the default layout unchanged."""
    if channels_last and device.type == "cpu":
        return model.to(memory_format=torch.channels_last_3d)
    return model


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
    optimizer, optim: OptimConfig, steps_per_epoch: int, hold_ramp: tuple[float, float] = (0, 0)
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the last step. The
    second parameter group, where there is one, is also held at 0 for ``hold_ramp[0]`` epochs
    and then ramped linearly to its rate over ``hold_ramp[1]`` epochs."""
    total = max(1, optim.epochs * steps_per_epoch)
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    hold, ramp = (int(epochs * steps_per_epoch) for epochs in hold_ramp)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def held_then_ramped(step: int) -> float:
        if step < hold:
            return 0.0
        return factor(step) * min(1.0, (step - hold + 1) / max(1, ramp))

    factors = [factor, held_then_ramped][: len(optimizer.param_groups)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


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


def gather(obj) -> list:
    """``obj`` from every rank of the process group (just ``[obj]`` outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def update_ema(ema, model, decay: float, steps: int, state: dict | None = None):
    """One step of an exponential moving average of ``model``'s weights: returns (the average,
    the steps it has seen). The first call copies ``model`` (then loads ``state``, a resumed
    average). The decay starts low, ``min(decay, (1 + steps) / (10 + steps))``, so that the
    first steps' weights do not dominate a short fit; buffers are copied as they are."""
    import copy

    if ema is None:
        ema = copy.deepcopy(model).requires_grad_(False)
        if state is not None:
            ema.load_state_dict(state)
    steps += 1
    weight = 1 - min(decay, (1 + steps) / (10 + steps))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), weight)
        for mine, theirs in zip(ema.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
    return ema, steps
