"""CPU micro-benchmark of one MixCL pre-training step (forward + backward, batch 2).

Prints, for the tiny preset at 32^3 and the default (paper) UNet at 96^3: the whole step time,
and the share of it spent in the model forward, each loss term (its forward; the voxel sampling
counts with the label term) and the backward pass. The baseline measured in the same run is a
plain supervised step (same network, DiceCE on a segmentation head), the cost a user pays
anyway; ratio = MixCL step / supervised step.

    python benchmarks/mixcl_step.py [--repeats 5] [--skip-large]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from monai.losses import DiceCELoss

from mixcl_ray.config import LossConfig, ModelConfig
from mixcl_ray.losses import MixCLLoss, view_outputs
from mixcl_ray.models import MixCLModel, SegmentationNet

PRESETS = {
    "cpu-tiny @ 32^3": (ModelConfig(), 32),
    "paper UNet 16-256 @ 96^3": (
        ModelConfig(features=(16, 32, 64, 128, 256, 16), global_dim=128, dense_dim=64),
        96,
    ),
}


def _batch(size: int, b: int = 2) -> dict[str, torch.Tensor]:
    label = torch.zeros(b, size, size, size, dtype=torch.uint8)
    q = size // 4
    label[:, q : 2 * q, q : 2 * q, q : 2 * q] = 1
    label[:, 2 * q : 3 * q, 2 * q : 3 * q, 2 * q : 3 * q] = 2
    return {
        "input1": torch.rand(b, 1, size, size, size),
        "input2": torch.rand(b, 1, size, size, size),
        "clean1": torch.rand(b, 1, size, size, size),
        "clean2": torch.rand(b, 1, size, size, size),
        "flips1": torch.zeros(b, 3, dtype=torch.bool),
        "flips2": torch.zeros(b, 3, dtype=torch.bool),
        "rot1": torch.zeros(b, dtype=torch.int64),
        "rot2": torch.zeros(b, dtype=torch.int64),
        "label": label,
        "annotated": torch.ones(b, 3, dtype=torch.bool),
    }


def mixcl_step(model, loss_fn, batch, timings):
    t0 = time.perf_counter()
    # the corrupted views for the reconstruction head, the clean ones for the contrastive heads
    out1, out2 = view_outputs(model, loss_fn.heads, batch)
    t1 = time.perf_counter()
    timings["model forward"] += t1 - t0
    c = loss_fn.config
    gen = torch.Generator().manual_seed(0)
    parts = {}
    t = time.perf_counter()
    parts["identity"] = loss_fn.identity(out1["global_embedding"], out2["global_embedding"])
    timings["identity loss"] += time.perf_counter() - t
    t = time.perf_counter()
    parts["label"] = loss_fn.label_term(out1, out2, batch, gen)
    timings["label loss (incl. sampling)"] += time.perf_counter() - t
    t = time.perf_counter()
    parts["reconstruction"] = loss_fn.reconstruction_term(out1, out2, batch)
    timings["reconstruction loss"] += time.perf_counter() - t
    total = (
        c.l_id * parts["identity"] + c.l_label * parts["label"] + c.l_rec * parts["reconstruction"]
    )
    t = time.perf_counter()
    model.zero_grad(set_to_none=True)
    total.backward()
    timings["backward"] += time.perf_counter() - t


def supervised_step(seg, loss, batch):
    seg.zero_grad(set_to_none=True)
    logits = seg(torch.cat([batch["input1"], batch["input2"]]))
    target = torch.cat([batch["label"], batch["label"]])[:, None].long()
    loss(logits, target).backward()


def run(name, config, size, repeats):
    torch.manual_seed(0)
    model, loss_fn = MixCLModel(config), MixCLLoss(LossConfig())
    seg, dice_ce = (
        SegmentationNet(config, num_classes=3),
        DiceCELoss(to_onehot_y=True, softmax=True),
    )
    batch = _batch(size)
    timings = dict.fromkeys(
        [
            "model forward",
            "identity loss",
            "label loss (incl. sampling)",
            "reconstruction loss",
            "backward",
        ],
        0.0,
    )
    mixcl_step(model, loss_fn, batch, dict(timings))  # warm-up
    supervised_step(seg, dice_ce, batch)
    start = time.perf_counter()
    for _ in range(repeats):
        mixcl_step(model, loss_fn, batch, timings)
    step = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        supervised_step(seg, dice_ce, batch)
    baseline = (time.perf_counter() - start) / repeats
    print(
        f"\n{name}: batch 2 (two views each), {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
    )
    print(f"  MixCL step (forward + backward): {step * 1000:8.1f} ms")
    print(
        f"  supervised DiceCE step, same network and voxels: {baseline * 1000:8.1f} ms   ratio {step / baseline:.2f}x"
    )
    for part, seconds in timings.items():
        print(
            f"    {part:<30}{seconds / repeats * 1000:8.1f} ms  {100 * seconds / repeats / step:5.1f} %"
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--skip-large", action="store_true", help="only the 32^3 tiny preset (CI smoke)"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    for name, (config, size) in PRESETS.items():
        if args.skip_large and size > 32:
            continue
        run(name, config, size, args.repeats)


if __name__ == "__main__":
    main()
