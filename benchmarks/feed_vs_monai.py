"""Data feeding: pre-training examples per second (positive/negative patch sampling, two views,
Models-Genesis corruptions) of our Ray Data feed against the standard MONAI pipeline
(CacheDataset + RandCropByPosNegLabeld + DataLoader with workers) on the same prepared cases,
with the peak memory (PSS, summed over the whole process tree) of each, and a profile of where
the per-patch time goes. Each pipeline runs in its own subprocess; every figure and ratio is
measured in this run.

The MONAI pipeline runs twice: with MONAI's own transforms for the views and corruptions (what
a MONAI user writes: RandAdjustContrastd, RandScaleIntensityd, RandShiftIntensityd,
RandGaussianNoised, RandHistogramShiftd, RandCoarseShuffled, RandCoarseDropoutd; the baseline
of the target), and with our augmentation functions (the same work as ours, so the ratio is
the feed's machinery alone).

    python benchmarks/feed_vs_monai.py [--data DIR] [--sizes 32 96] [--epochs 6] [--workers 2]
                                       [--unordered] [--check RATIO]

The prepared folder defaults to the built-in benchmark (prepared on first use). The first epoch
of each pipeline includes its one-off cost (reading and decoding for ours, CacheDataset's
caching for MONAI) and is reported separately; throughput is over the later epochs. Memory is
sampled in the first epoch and in one more run after the measured ones, not while throughput
is measured (the sampler's reads of the Ray processes' memory maps slowed them).
``--unordered`` adds our feed with ``patches.deterministic`` off (blocks in the order their
tasks finish, as Ray Data does by default): what the deterministic feed costs. Beside the
figures: the settings that decide ours (cached or streamed, blocks, object store, idle worker
processes kept). ``--check RATIO`` exits 1 when ours is below RATIO x MONAI's standard pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import common
import numpy as np
from monai_pipeline import monai_items, monai_transform, monai_views

ROOT = Path(__file__).resolve().parents[1]


class TreeMemory:
    """Peak PSS of this process and all its descendants, sampled in a thread while ``active``;
    ``by_process`` is the peak sample split by process name (``ray::TrainController``,
    ``raylet``, ...)."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.root, self.interval, self.peak = psutil.Process(), interval, 0
        self.active = True
        self.by_process: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _name(proc) -> str:
        title = " ".join(proc.cmdline()[:1]) or proc.name()
        if title.startswith("ray::"):
            return title.split("(")[0].split(".")[0]  # ray::MapBatches(...) -> ray::MapBatches
        return Path(title.split()[0]).name if title else proc.name()

    def _sample(self) -> tuple[int, dict[str, int]]:
        parts: dict[str, int] = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                name = "driver" if proc.pid == self.root.pid else self._name(proc)
                parts[name] = parts.get(name, 0) + proc.memory_full_info().pss
            except Exception:  # a process that just ended
                continue
        return sum(parts.values()), parts

    def _record(self) -> None:
        total, parts = self._sample()
        if total > self.peak:
            self.peak, self.by_process = total, parts

    def _run(self):
        while not self._stop.is_set():
            if self.active:
                self._record()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._record()


def pretrain_config(size: int, patches_per_case: int) -> dict:
    from mixcl_ray.config import load_config, to_dict

    return to_dict(
        load_config(
            "pretrain",
            overrides={"patches": {"patch_size": [size] * 3, "patches_per_case": patches_per_case}},
        )
    )


def sampled(epoch: int, epochs: int) -> bool:
    """Whether memory is sampled in this epoch: the first (the one-off cost) and one more after
    the ``epochs`` measured, never during the epochs whose throughput is reported. Reading the
    PSS of a dozen Ray processes that map the object store took 63 ms a sample on 2 cores and
    slowed the feed by a fifth at 96^3 (the MONAI pipeline, three small processes, far less)."""
    return epoch in (0, epochs)


def run_ray(data: Path, size: int, epochs: int, workers: int, ppc: int, batch: int) -> dict:
    """Our feed: Ray Data tasks sample and augment, the consumer iterates batches."""
    import ray

    from mixcl_ray.config import PretrainConfig, from_dict
    from mixcl_ray.feed import build_pretrain_dataset
    from mixcl_ray.ray_start import init_ray

    init_ray(num_cpus=workers, include_dashboard=False)
    config = pretrain_config(size, ppc)
    if "FEED_TASK_CPUS" in os.environ:  # else the default (0.5: two tasks share a CPU)
        config["patches"]["cpus_per_data_task"] = float(os.environ["FEED_TASK_CPUS"])
    config["patches"]["deterministic"] = os.environ.get("FEED_UNORDERED") != "1"
    cfg = from_dict(PretrainConfig, config)
    times, counts = [], []
    with TreeMemory() as memory:
        start = time.perf_counter()
        # reads, decodes, materialises the cases
        ds = build_pretrain_dataset(data, cfg)
        for epoch in range(epochs + 1):
            memory.active = sampled(epoch, epochs)
            n = 0
            for b in ds.iter_batches(batch_size=batch, batch_format="numpy", drop_last=False):
                n += len(b["input1"])
            times.append(time.perf_counter() - start)
            counts.append(n)
            start = time.perf_counter()
    settings = feed_settings(data, cfg)
    ray.shutdown()
    return {
        "epoch_seconds": times,
        "patches": counts,
        "peak_pss": memory.peak,
        "settings": settings,
    }


def feed_settings(data: Path, cfg) -> dict:
    """What decides our feed's speed in this run: whether the decoded cases stay cached or are
    read again every epoch (and why), the blocks (sampling tasks an epoch), the CPUs a task
    asks, the object store, how long idle task processes live, the block order."""
    import ray

    from mixcl_ray.feed import decoded_bytes, pretraining_cases, should_cache, spread_blocks
    from mixcl_ray.ray_start import IDLE_WORKER_ENV

    ids, _ = pretraining_cases(data, cfg.pretrain_label_fraction, cfg.target_images)
    cached = should_cache(data, ids, cfg.patches.cache_cases)
    return {
        "cases": len(ids),
        "cases cached": f"{cached} (cache_cases {cfg.patches.cache_cases})",
        "decoded MiB": round(decoded_bytes(data, ids) / 2**20, 1),
        "object store MiB": round(ray.cluster_resources().get("object_store_memory", 0) / 2**20),
        "blocks": spread_blocks(len(ids)),
        "cpus per data task": cfg.patches.cpus_per_data_task,
        "idle workers kept ms": os.environ.get(IDLE_WORKER_ENV, "1000 (Ray's default)"),
        "deterministic": cfg.patches.deterministic,
        "ray": ray.__version__,
    }


def run_monai(
    data: Path, size: int, epochs: int, workers: int, ppc: int, batch: int, views: str = "ours"
) -> dict:
    """CacheDataset (decoded cases in memory) + RandCropByPosNegLabeld + the two views (ours or
    MONAI's transforms) in the DataLoader's worker processes."""
    import torch
    from monai.data import CacheDataset, DataLoader

    torch.set_num_threads(1)
    config = pretrain_config(size, ppc)
    times, counts = [], []
    with TreeMemory() as memory:
        start = time.perf_counter()
        items = monai_items(data)
        transform = monai_transform(size, config, ppc, views=views)
        dataset = CacheDataset(items, transform, num_workers=workers, progress=False)
        del items
        loader = DataLoader(
            dataset,
            batch_size=max(1, batch // ppc),
            shuffle=True,
            num_workers=workers,
            persistent_workers=True,
        )
        for epoch in range(epochs + 1):
            memory.active = sampled(epoch, epochs)
            n = 0
            for b in loader:
                n += len(b["input1"])
            times.append(time.perf_counter() - start)
            counts.append(n)
            start = time.perf_counter()
        del loader
    return {"epoch_seconds": times, "patches": counts, "peak_pss": memory.peak}


def profile(data: Path, size: int, ppc: int, cases: int = 6) -> dict:
    """Where a patch's time goes: sampling/cropping, views, corruptions (in one process)."""
    from data_prep.reader import load_case
    from mixcl_ray.config import PretrainConfig, from_dict
    from mixcl_ray.data.corruptions import corrupt
    from mixcl_ray.data.pairs import restored_views
    from mixcl_ray.data.patches import sample_patches
    from mixcl_ray.data.views import (
        apply_spatial,
        augment_intensity,
        gaussian_noise,
        random_spatial,
    )
    from mixcl_ray.feed import pretraining_cases

    cfg = from_dict(PretrainConfig, pretrain_config(size, ppc))
    restored = restored_views(cfg.loss.l_id, cfg.loss.l_label, cfg.loss.l_rec)
    ids, _ = pretraining_cases(data, 1.0, True)
    rng = np.random.default_rng(0)
    gaussian_noise((1,), rng, 1.0)  # draws the noise bank: once per process, not per patch
    spent = {"decode case": 0.0, "sample + crop": 0.0, "two views": 0.0, "corruptions": 0.0}
    n = 0
    for case_id in ids[:cases]:
        t = time.perf_counter()
        case = load_case(data, case_id)
        spent["decode case"] += time.perf_counter() - t
        t = time.perf_counter()
        images, _ = sample_patches(case["image"], case["label"], (size,) * 3, ppc, rng)
        spent["sample + crop"] += time.perf_counter() - t
        for image in images:
            for view in range(2):
                t = time.perf_counter()
                flips, rot = random_spatial(rng, cfg.views)
                clean = augment_intensity(apply_spatial(image[None], flips, rot), rng, cfg.views)
                spent["two views"] += time.perf_counter() - t
                if view < restored:  # MixCL corrupts the first view only
                    t = time.perf_counter()
                    corrupt(clean, rng, cfg.corruptions)
                    spent["corruptions"] += time.perf_counter() - t
            n += 1
    # shares of the work done every epoch: the feed reads and decodes a case once per run
    # (cached) or once per epoch (streamed), not once per patch as this loop does
    total = sum(v for k, v in spent.items() if k != "decode case")
    return {
        k: {"ms_per_patch": 1000 * v / n, "share": None if k == "decode case" else v / total}
        for k, v in spent.items()
    }


CHILDREN = {
    "ray": run_ray,
    "monai": run_monai,
    "monai-transforms": partial(run_monai, views="monai"),
}


def monai_views_ms(data: Path, size: int, ppc: int, cases: int = 6) -> float:
    """Milliseconds per patch of ``monai_views`` (two views, the first corrupted) in one
    process, on the patches ``profile`` times ours on."""
    import torch
    from monai.transforms import Compose

    from data_prep.reader import load_case
    from mixcl_ray.data.patches import sample_patches
    from mixcl_ray.feed import pretraining_cases

    torch.set_num_threads(1)  # as in a DataLoader worker
    chain = Compose(monai_views(size, pretrain_config(size, ppc)))
    ids, _ = pretraining_cases(data, 1.0, True)
    rng = np.random.default_rng(0)
    spent, n = 0.0, 0
    for case_id in ids[:cases]:
        case = load_case(data, case_id)
        images, labels = sample_patches(case["image"], case["label"], (size,) * 3, ppc, rng)
        for image, label in zip(images, labels, strict=True):
            item = {"image": image[None], "label": label[None], "annotated": np.zeros(1)}
            t = time.perf_counter()
            chain(item)
            spent += time.perf_counter() - t
            n += 1
    return 1000 * spent / n


def _child(args) -> None:
    fn = CHILDREN[args.child]
    out = fn(args.data, args.size, args.epochs, args.workers, args.patches_per_case, args.batch)
    print("RESULT " + json.dumps(out))


def _spawn(args, which: str, size: int, unordered: bool = False) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--data",
        str(args.data),
        "--size",
        str(size),
        "--epochs",
        str(args.epochs),
        "--workers",
        str(args.workers),
        "--patches-per-case",
        str(args.patches_per_case),
        "--batch",
        str(args.batch),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEED_UNORDERED="1" if unordered else "0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(
            f"{which} at {size}^3 failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return json.loads(line[-1][7:])


def _rate(result: dict) -> float:
    """Patches/s of the measured epochs after the first (the last epoch, run for the memory
    sampler, is not one of them)."""
    measured = slice(1, -1) if len(result["epoch_seconds"]) > 2 else slice(0, -1)
    return sum(result["patches"][measured]) / sum(result["epoch_seconds"][measured])


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument(
        "--epochs", type=int, default=6, help="epochs per pipeline; the first is reported apart"
    )
    parser.add_argument("--workers", type=int, default=2, help="CPUs for each pipeline")
    parser.add_argument("--patches-per-case", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--unordered",
        action="store_true",
        help="also measure our feed without the deterministic block order",
    )
    parser.add_argument(
        "--check",
        type=float,
        metavar="RATIO",
        help="exit 1 if ours is below RATIO x MONAI's standard pipeline at any size (the "
        "regression check: --sizes 32 --check 1.0)",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    args.data = common.ensure_data(args.data).absolute()
    print(
        f"{common.machine()}; {args.workers} CPUs per pipeline, {args.epochs} epochs, {args.patches_per_case} patches "
        f"per case, data {args.data}"
    )
    print(
        "| patch | pipeline | first epoch s | patches/s (later epochs) | peak PSS GiB "
        "| vs MONAI, its transforms | vs MONAI, our functions |"
    )
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for size in args.sizes:
        standard = _spawn(args, "monai-transforms", size)
        monai = _spawn(args, "monai", size)
        ours = _spawn(args, "ray", size)
        rows = [
            ("MONAI CacheDataset+DataLoader, MONAI's transforms", standard),
            ("MONAI CacheDataset+DataLoader, our augmentation functions", monai),
            ("mixcl_ray Ray Data", ours),
        ]
        if args.unordered:
            unordered = _spawn(args, "ray", size, unordered=True)
            rows.append(("mixcl_ray Ray Data, unordered", unordered))
        print("| " + " | ".join(f"{k}: {v}" for k, v in ours["settings"].items()) + " |")
        for name, r in rows:
            print(
                f"| {size}^3 | {name} | {r['epoch_seconds'][0]:.1f} | {_rate(r):.1f} | "
                f"{r['peak_pss'] / 2**30:.2f} | {_rate(r) / _rate(standard):.2f}x | "
                f"{_rate(r) / _rate(monai):.2f}x |"
            )
        summary[size] = {
            "throughput_ratio": _rate(ours) / _rate(standard),
            "throughput_ratio_same_functions": _rate(ours) / _rate(monai),
            "memory_ratio": ours["peak_pss"] / standard["peak_pss"],
        }
        if args.unordered:
            summary[size]["deterministic_vs_unordered"] = _rate(ours) / _rate(unordered)
    for size in args.sizes:
        print(f"\nwhere a {size}^3 patch's time goes (one process, no pipeline):")
        for step, v in profile(args.data, size, args.patches_per_case).items():
            share = (
                "(once a run when cached)" if v["share"] is None else f"{100 * v['share']:5.1f} %"
            )
            print(f"  {step:14s} {v['ms_per_patch']:8.2f} ms/patch  {share}")
        ms = monai_views_ms(args.data, size, args.patches_per_case)
        print(f"  MONAI's transforms for the same views + corruptions: {ms:.2f} ms/patch")
    print("\nsummary: " + json.dumps(summary))
    if args.check is not None:
        failed = below(summary, args.check)
        for line in failed:
            print("CHECK FAILED: " + line)
        if failed:
            return 1
        print(f"check passed: ours at least {args.check}x MONAI's standard pipeline")
    return 0


def below(summary: dict, floor: float) -> list[str]:
    """The sizes at which ours fed fewer than ``floor`` x the patches/s of MONAI's standard
    pipeline, one line each."""
    return [
        f"{size}^3: ours {s['throughput_ratio']:.2f}x MONAI's standard pipeline, below {floor}x"
        for size, s in summary.items()
        if s["throughput_ratio"] < floor
    ]


if __name__ == "__main__":
    raise SystemExit(main())
