"""Training overhead: steps/s of our Ray Train pre-training (one worker, fed by Ray Data) against
a plain single-process PyTorch loop with the same model, loss, batch size, optimiser and torch
threads, on batches built beforehand by the same sampling and augmentation code (so the plain
loop never waits for data: it is the upper bound). Also the data-wait share of Ray Train's step
time. Every figure and ratio is measured in this run.

    python benchmarks/train_overhead.py [--data DIR] [--epochs 3] [--threads 1] [--size 32]

Ray's steps/s is taken over its epochs after the first (which includes start-up, reading and
decoding); the plain loop's after two warm-up steps.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import common
import numpy as np


def plain_loop(data: Path, config: dict, steps: int, threads: int) -> float:
    """Steps/s of a plain loop over pre-built batches."""
    import torch

    from data_prep.reader import load_case, read_manifest
    from mixcl_ray.config import PretrainConfig, from_dict
    from mixcl_ray.feed import _pretrain_case, _pretrain_examples, pretraining_cases
    from mixcl_ray.losses import MixCLLoss, view_outputs
    from mixcl_ray.models import MixCLModel
    from mixcl_ray.train_utils import (
        build_optimizer,
        build_scheduler,
        grad_scaler,
        optimizer_step,
    )

    torch.set_num_threads(threads)
    cfg = from_dict(PretrainConfig, config)
    ids, labelled = pretraining_cases(data, cfg.pretrain_label_fraction, cfg.target_images)
    num_classes = len(read_manifest(data)["class_map"])
    examples: list[dict] = []
    for case_id in ids:
        case = load_case(data, case_id)
        row = {**case, "annotated_classes": case["annotated_classes"]}
        one = _pretrain_case(row, frozenset(labelled), num_classes)
        batch = _pretrain_examples({k: [v] for k, v in one.items()}, cfg, 0)
        examples += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input1"]))]
    # every case, shuffled, as the feed mixes them: batches of one case each (the cases in id
    # order) had another share of labelled batches, and the label term's cost depends on it
    order = np.random.default_rng(0).permutation(len(examples))
    b = cfg.patches.batch_size
    examples = [examples[i] for i in order[: (steps + 2) * b]]
    batches = [
        {k: torch.as_tensor(np.stack([e[k] for e in examples[i : i + b]])) for k in examples[0]}
        for i in range(0, len(examples) - b + 1, b)
    ]
    model = MixCLModel(cfg.model)
    loss_fn = MixCLLoss(cfg.loss)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, len(batches))
    generator = torch.Generator().manual_seed(0)
    scaler = grad_scaler(torch.device("cpu"), "none")  # disabled, as on CPU in the product
    model.train()
    start = None
    for i, batch in enumerate(batches):
        if i == 2:
            start = time.perf_counter()
        out1, out2 = view_outputs(model, loss_fn.heads, batch)
        terms = loss_fn(out1, out2, batch, step=i, generator=generator)
        optimizer_step(terms["loss"], model, optimizer, scaler, scheduler, cfg.optim.grad_clip)
    return (len(batches) - 2) / (time.perf_counter() - start)


def ray_train(data: Path, overrides: dict, storage: Path) -> tuple[float, float, list[dict]]:
    """(steps/s after the first epoch, data-wait share after the first epoch, history)."""
    import ray

    from mixcl_ray.config import load_config
    from mixcl_ray.pretrain import run_pretraining
    from mixcl_ray.ray_start import init_ray

    init_ray(num_cpus=os.cpu_count())  # with the dashboard: Train wants it
    config = load_config("pretrain", overrides=overrides)
    result = run_pretraining(data, storage, config, name="overhead")
    ray.shutdown()
    history = result.history
    later = history[1:] or history
    if len(history) > 1:  # later[i] follows history[i]
        steps = [h["step"] - history[i]["step"] for i, h in enumerate(later)]
    else:
        steps = [history[0]["step"]]
    seconds = sum(h["time/train_s"] for h in later)
    wait = sum(h["time/data_wait_s"] for h in later) / seconds
    return sum(steps) / seconds, wait, history


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--patches-per-case", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)

    from mixcl_ray.config import load_config, to_dict

    data = common.ensure_data(args.data).absolute()
    overrides = {
        "optim": {"epochs": args.epochs},
        "patches": {
            "patch_size": [args.size] * 3,
            "patches_per_case": args.patches_per_case,
            "batch_size": args.batch,
        },
        "scaling": {"workers": 1, "cpus_per_worker": float(args.threads)},
    }
    config = to_dict(load_config("pretrain", overrides=overrides))
    print(
        f"{common.machine()}; MixCL cpu-tiny model, batch {args.batch} at {args.size}^3, {args.threads} torch thread(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        ray_rate, wait, history = ray_train(data, overrides, Path(tmp))
    steps = int(history[-1]["step"] / len(history))
    plain = plain_loop(data, config, max(8, min(steps, 40)), args.threads)
    print("| loop | steps/s | vs plain | data-wait share |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch, pre-built batches | {plain:.2f} | 1.00x | 0 % (by construction) |")
    print(
        f"| mixcl_ray Ray Train + Ray Data | {ray_rate:.2f} | {ray_rate / plain:.2f}x | {100 * wait:.1f} % |"
    )
    print(
        "per epoch (Ray): "
        + ", ".join(
            f"epoch {h['epoch']}: {h['time/train_s']:.1f} s, wait {100 * h['train/data_wait_share']:.1f} %"
            for h in history
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
