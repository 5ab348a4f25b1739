"""GPU pre-training throughput: MixCL pre-training on Ray Train (one GPU worker fed by Ray Data)
against a plain MONAI training loop (CacheDataset + RandCropByPosNegLabeld + DataLoader workers
feeding the same model and loss, bf16 autocast) on the same GPU, in the same run, for the UNet
and the SwinUNETR backbone at 96^3. Prints patches/s, the GPU-busy share (step time not spent
waiting for data) and peak GPU memory of each, and the ratios.

    python benchmarks/gpu_pretrain.py [--data DIR] [--steps 25] [--shuffle-buffers 32 8 0]
    python benchmarks/gpu_pretrain.py --smoke        # CPU, tiny sizes: checks it runs (CI)

On a machine without CUDA it runs the smoke version. Each side's first epoch (start-up,
caching, cuDNN autotuning) is excluded from the figures.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import common

SIZES = {"unet": 96, "swinunetr": 96}
SMOKE_SIZES = {"unet": 32, "swinunetr": 64}


def overrides(backbone: str, size: int, smoke: bool, steps: int, cases: int) -> dict:
    per_case = max(1, -(-steps * 2 // cases))  # enough patches for ~steps steps of batch 2
    model = {"backbone": backbone}
    if smoke:
        model.update({"features": [4, 8, 8, 16, 16, 4], "feature_size": 12})
    return {
        "model": model,
        "patches": {"patch_size": [size] * 3, "patches_per_case": per_case, "batch_size": 2},
        "optim": {"epochs": 1 if smoke else 2},
    }


def ours(data: Path, over: dict, smoke: bool, shuffle_buffer: int | None) -> dict:
    import ray

    from mixcl_ray.config import load_config
    from mixcl_ray.pretrain import run_pretraining
    from mixcl_ray.ray_start import init_ray

    gpu = not smoke
    init_ray(**({"num_cpus": 2} if smoke else {}))  # with the dashboard: Train uses it
    over = dict(over, scaling={"workers": 1, "use_gpu": gpu, "amp": "bf16"})
    patches = dict(over["patches"], **({} if smoke else {"cpus_per_data_task": 1.0}))
    if shuffle_buffer is not None:
        patches["shuffle_buffer"] = shuffle_buffer
    over["patches"] = patches
    config = load_config("pretrain", "cpu-tiny" if smoke else "paper", overrides=over)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_pretraining(data, tmp, config, name="gpu-bench")
    finally:
        ray.shutdown()
    last = result.history[-1]
    return {
        "patches_per_s": last["train/patches_per_s"],
        "busy_share": 1 - last["train/data_wait_share"],
        "gpu_mem_gib": last.get("train/gpu_mem_peak_gib", float("nan")),
    }


def plain_monai(data: Path, over: dict, smoke: bool) -> dict:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai_pipeline import monai_items, monai_transform

    from mixcl_ray.config import load_config, to_dict
    from mixcl_ray.losses import MixCLLoss, view_outputs
    from mixcl_ray.models import MixCLModel
    from mixcl_ray.train_utils import autocast, build_optimizer, grad_scaler

    device = torch.device("cpu" if smoke else "cuda")
    config = load_config("pretrain", "cpu-tiny" if smoke else "paper", overrides=over)
    items = monai_items(data)
    size = config.patches.patch_size
    assert len(set(size)) == 1, size
    transform = monai_transform(size[0], to_dict(config), config.patches.patches_per_case)
    workers = 1 if smoke else max(1, (os.cpu_count() or 2) - 2)
    loader = DataLoader(
        CacheDataset(items, transform, num_workers=workers, progress=False),
        batch_size=max(1, 2 // config.patches.patches_per_case),  # 2 patches, as ours
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        pin_memory=not smoke,
    )
    model = MixCLModel(config.model).to(device)
    loss_fn = MixCLLoss(config.loss)
    optimizer = build_optimizer(model, config.optim)
    scaler = grad_scaler(device, "bf16")
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    figures = {}
    for _epoch in range(2):  # the first warms up; the second is measured
        wait = patches = 0.0
        start = tick = time.perf_counter()
        for step, raw in enumerate(loader):
            if smoke and step == 2:  # checks that it runs, nothing more
                break
            wait += time.perf_counter() - tick
            batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
            with autocast(device, "bf16"):
                out1, out2 = view_outputs(model, loss_fn.heads, batch)
                terms = loss_fn(out1, out2, batch, step=step, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            patches += batch["input1"].shape[0]
            tick = time.perf_counter()
        seconds = time.perf_counter() - start
        figures = {
            "patches_per_s": patches / seconds,
            "busy_share": 1 - wait / seconds,
            "gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else float("nan"),
        }
    return figures


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--steps",
        type=int,
        default=25,
        help="at least this many steps of 2 patches in the measured epoch (rounded up to whole "
        "patches per case; 29 on the built-in benchmark)",
    )
    parser.add_argument(
        "--shuffle-buffers",
        type=int,
        nargs="+",
        help="measure our side once per local shuffle buffer size (patches.shuffle_buffer; 0: "
        "none); default: the paper preset's",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    parser.add_argument(
        "--backbones",
        nargs="+",
        help="default: unet swinunetr on a GPU; unet alone in the smoke run (SwinUNETR's "
        "smallest input, 64^3, trains at about 0.1 patches/s on 2 CPU cores)",
    )
    args = parser.parse_args(argv)
    began = time.perf_counter()

    import torch

    from mixcl_ray.feed import pretraining_cases

    smoke = args.smoke or not torch.cuda.is_available()
    backbones = args.backbones or (["unet"] if smoke else ["unet", "swinunetr"])
    steps = 2 if smoke else args.steps
    data = common.ensure_data(args.data).absolute()
    cases = len(pretraining_cases(data, 1.0, True)[0])
    where = "CPU smoke run (no CUDA)" if smoke else torch.cuda.get_device_name(0)
    print(f"{common.machine()}, {where}; torch {torch.__version__}")
    print(
        "| backbone | patch | loop | patches/s | GPU-busy share | peak GPU GiB | vs plain MONAI |"
    )
    print("|---|---|---|---|---|---|---|")
    start = time.perf_counter()
    failed = []
    for backbone in backbones:
        size = (SMOKE_SIZES if smoke else SIZES)[backbone]
        over = overrides(backbone, size, smoke, steps, cases)
        try:
            rows = [("plain MONAI loop", plain_monai(data, over, smoke))]
            for buffer in args.shuffle_buffers or [None]:
                name = "mixcl_ray Ray Train" + ("" if buffer is None else f", buffer {buffer}")
                rows.append((name, ours(data, over, smoke, buffer)))
        except Exception as err:  # the other backbone's figures still count
            print(f"| {backbone} | {size}^3 | failed: {type(err).__name__}: {err} | | | | |")
            failed.append(backbone)
            continue
        plain = rows[0][1]
        for name, r in rows:
            print(
                f"| {backbone} | {size}^3 | {name} | {r['patches_per_s']:.2f} | "
                f"{100 * r['busy_share']:.1f} % | {r['gpu_mem_gib']:.2f} | "
                f"{r['patches_per_s'] / plain['patches_per_s']:.2f}x |",
                flush=True,
            )
    now = time.perf_counter()
    print(f"total {now - began:.0f} s (data {start - began:.0f} s, measuring {now - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
