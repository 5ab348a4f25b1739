"""Memory scaling: peak memory (PSS, summed over the whole process tree: Ray's raylet, object
store and workers included) of one pre-training epoch at 1x, 4x and 16x the number of cases,
the largest corpus holding at least --target-gb of decoded volumes, against the standard MONAI
pipeline (CacheDataset of the decoded cases + RandCropByPosNegLabeld + two views in DataLoader
workers) feeding the same model, loss and optimiser in a plain loop, at the same sizes. Each run
is its own subprocess; every figure and ratio is measured in this run.

    python benchmarks/memory_scaling.py [--data DIR] [--scales 1 4 16] [--target-gb 6]
        [--work DIR] [--skip-monai]

The corpora are the prepared cases copied under new case ids (Parquet shards rewritten, the
manifest and splits extended), written once into --work. Ours runs with the default
``patches.cache_cases: auto``: the decoded cases are kept in Ray's object store while they fill
at most a quarter of it, and streamed (read and decoded every epoch) beyond that; the table says
which. One 32^3 patch per case and 4 patches a step on both sides: the MONAI loop's batch of 4,
two Train workers on CPU with 2 each (``--batch`` is the step's batch, split over the workers).
``--train-workers 1`` trains in one Train worker, as the MONAI loop trains in one process: each
Train worker is a process holding torch, the model and its activations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import common
from feed_vs_monai import TreeMemory
from monai.transforms import Transform
from monai_pipeline import monai_transform

ROOT = Path(__file__).resolve().parents[1]
SEP = "~"  # case id of copy r: "<id>~r"
WORKERS = 2  # Train workers of ours (default of --train-workers)


def pretraining_bytes(data: Path) -> tuple[int, int]:
    """(cases a pre-training run reads, their decoded bytes)."""
    from mixcl_ray.config import load_config
    from mixcl_ray.feed import decoded_bytes, pretraining_cases

    cfg = load_config("pretrain")
    ids, _ = pretraining_cases(data, cfg.pretrain_label_fraction, cfg.target_images)
    return len(ids), decoded_bytes(data, ids)


def replicate(src: Path, copies: int, out: Path) -> Path:
    """A prepared folder holding ``copies`` copies of every case of ``src`` (written once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.reader import MANIFEST, SPLITS, read_manifest, read_splits

    manifest = read_manifest(src)
    fingerprint = hashlib.sha256(f"{manifest['input_fingerprint']}x{copies}".encode()).hexdigest()
    if (out / MANIFEST).exists() and read_manifest(out)["input_fingerprint"] == fingerprint:
        return out
    known = set(manifest["cases"])

    def expand(value):  # every list of case ids in splits.json, copied
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, str) and v in known for v in value):
            return [f"{v}{SEP}{r}" for r in range(copies) for v in value]
        return value

    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    (tmp / "shards").mkdir(parents=True)
    cases, shards = {}, []
    for shard in manifest["shards"]:
        table = pq.read_table(src / shard)
        ids = table.column("case_id").to_pylist()
        column = table.schema.get_field_index("case_id")
        for r in range(copies):
            name = f"shards/r{r:03d}-{Path(shard).name}"
            renamed = [f"{i}{SEP}{r}" for i in ids]
            pq.write_table(
                table.set_column(column, "case_id", pa.array(renamed)),
                tmp / name,
                compression="zstd",
            )
            shards.append(name)
            for old, new in zip(ids, renamed, strict=True):
                cases[new] = {**manifest["cases"][old], "shard": name}
    manifest.update(
        cases=cases, shards=shards, input_fingerprint=fingerprint, replicated_copies=copies
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    (tmp / SPLITS).write_text(json.dumps(expand(read_splits(src))))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _config(size: int, batch: int, workers: int = 1, object_store_mb: int = 0) -> dict:
    """The pre-training config of one epoch; ``batch`` patches a step, split over ``workers``."""
    from mixcl_ray.config import load_config, to_dict

    if batch % workers:
        raise SystemExit(f"--batch {batch} does not split over {workers} Train workers")
    return to_dict(
        load_config(
            "pretrain",
            overrides={
                "optim": {"epochs": 1},
                "patches": {
                    "patch_size": [size] * 3,
                    "patches_per_case": 1,
                    "batch_size": batch // workers,
                    "object_store_mb": object_store_mb,
                },
                "scaling": {"workers": workers},
            },
        )
    )


def run_ours(
    data: Path, size: int, batch: int, object_store_mb: int = 0, workers: int = WORKERS
) -> dict:
    """One epoch of our Ray Train pre-training (``workers`` Train workers, Ray Data feed,
    ``batch`` patches a step: the same steps as the MONAI loop's)."""
    import ray

    from mixcl_ray.config import PretrainConfig, from_dict
    from mixcl_ray.feed import pretraining_cases, should_cache
    from mixcl_ray.pretrain import run_pretraining
    from mixcl_ray.ray_start import init_ray

    config = from_dict(PretrainConfig, _config(size, batch, workers, object_store_mb))
    with TreeMemory() as memory, tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        init_ray(num_cpus=2)  # with the dashboard: Train wants it
        ids, _ = pretraining_cases(data, config.pretrain_label_fraction, config.target_images)
        cached = should_cache(data, ids, config.patches.cache_cases)
        store = ray.cluster_resources().get("object_store_memory", 0)
        result = run_pretraining(data, storage, config, name="memory")
        seconds = time.perf_counter() - start
        ray.shutdown()
    return {
        "peak_pss": memory.peak,
        "by_process": memory.by_process,
        "seconds": seconds,
        "steps": result.history[-1]["step"],
        "mode": "cached" if cached else "streamed",
        "object_store": store,
    }


class LoadCase(Transform):
    """MONAI loader: a case id -> its decoded image and label (what LoadImaged does with NIfTI
    files), read from the prepared Parquet shard; the labels a pre-training run may use. A
    ``Transform``, so that CacheDataset caches its result (it caches nothing from the first
    random or non-Transform callable on)."""

    def __init__(self, data: Path, labelled: frozenset, num_classes: int):
        from data_prep.reader import read_manifest

        self.data, self.labelled, self.classes = Path(data), labelled, num_classes
        self.shards = {i: c["shard"] for i, c in read_manifest(data)["cases"].items()}

    def __call__(self, item: dict) -> dict:
        import pyarrow.parquet as pq

        from data_prep.reader import decode_case
        from mixcl_ray.feed import _pretrain_case

        table = pq.read_table(
            self.data / self.shards[item["case_id"]], filters=[("case_id", "=", item["case_id"])]
        )
        case = _pretrain_case(decode_case(table.to_pylist()[0]), self.labelled, self.classes)
        return {"image": case["image"], "label": case["label"], "annotated": case["annotated"]}


def run_monai(data: Path, size: int, batch: int, object_store_mb: int = 0) -> dict:
    """One epoch of the same model, loss and optimiser in a plain loop fed by CacheDataset +
    RandCropByPosNegLabeld + our two views in 2 DataLoader workers."""
    import torch
    from monai.data import CacheDataset, DataLoader

    from data_prep.reader import read_manifest
    from mixcl_ray.config import PretrainConfig, from_dict
    from mixcl_ray.feed import pretraining_cases
    from mixcl_ray.losses import MixCLLoss, view_outputs
    from mixcl_ray.models import MixCLModel
    from mixcl_ray.train_utils import build_optimizer, build_scheduler, grad_scaler, optimizer_step

    torch.set_num_threads(1)
    config = _config(size, batch)
    cfg = from_dict(PretrainConfig, config)
    with TreeMemory() as memory:
        start = time.perf_counter()
        ids, labelled = pretraining_cases(data, cfg.pretrain_label_fraction, cfg.target_images)
        classes = len(read_manifest(data)["class_map"])
        transform = monai_transform(size, config, 1, LoadCase(data, frozenset(labelled), classes))
        dataset = CacheDataset(
            [{"case_id": i} for i in ids], transform, num_workers=2, progress=False
        )
        cached = sum(1 for c in dataset._cache if c is not None)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=2)
        model = MixCLModel(cfg.model)
        loss_fn = MixCLLoss(cfg.loss)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, len(loader))
        scaler = grad_scaler(torch.device("cpu"), "none")
        generator = torch.Generator().manual_seed(0)
        steps = 0
        for b in loader:
            b = b[0] if isinstance(b, list) else b
            out1, out2 = view_outputs(model, loss_fn.heads, b)
            terms = loss_fn(out1, out2, b, step=steps, generator=generator)
            optimizer_step(terms["loss"], model, optimizer, scaler, scheduler, cfg.optim.grad_clip)
            steps += 1
        seconds = time.perf_counter() - start
        del loader, dataset
    return {
        "peak_pss": memory.peak,
        "by_process": memory.by_process,
        "seconds": seconds,
        "steps": steps,
        "mode": f"CacheDataset ({cached} cases cached)",
    }


def _breakdown(result: dict, top: int = 8) -> str:
    """The peak sample's PSS by process name (summed over processes of one name), largest
    first."""
    parts = sorted(result["by_process"].items(), key=lambda kv: -kv[1])
    shown = [f"{name} {pss / 2**30:.2f}" for name, pss in parts[:top]]
    rest = sum(pss for _, pss in parts[top:])
    return ", ".join(shown) + (f", other {rest / 2**30:.2f}" if rest else "") + " GiB"


def _spawn(which: str, data: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--data", str(data)]
    cmd += ["--size", str(args.size), "--batch", str(args.batch)]
    cmd += ["--object-store-mb", str(args.object_store_mb)]
    cmd += ["--train-workers", str(args.train_workers)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{which} on {data} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--target-gb", type=float, default=6.0, help="decoded GB of the largest corpus"
    )
    parser.add_argument(
        "--work", type=Path, help="folder for the corpora (default: a cache folder)"
    )
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument(
        "--batch", type=int, default=4, help="patches a step (ours: split over the Train workers)"
    )
    parser.add_argument(
        "--train-workers", type=int, default=WORKERS, help="ours: Ray Train workers (CPU)"
    )
    parser.add_argument(
        "--object-store-mb",
        type=int,
        default=0,
        help="ours: the feed's object-store budget (patches.object_store_mb; 0: Ray Data's own)",
    )
    parser.add_argument("--skip-monai", action="store_true", help="measure ours only")
    parser.add_argument("--child", choices=["ours", "monai"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "ours":
            result = run_ours(
                args.data, args.size, args.batch, args.object_store_mb, args.train_workers
            )
        else:
            result = run_monai(args.data, args.size, args.batch, args.object_store_mb)
        print("RESULT " + json.dumps(result))
        return 0

    workers = args.train_workers
    if workers < 1 or args.batch % workers:
        parser.error(f"--batch must split over the {workers} Train workers")
    from data_prep.cli import DEFAULT_CACHE

    data = common.ensure_data(args.data).absolute()
    work = (args.work or DEFAULT_CACHE / "memory-scaling").absolute()
    cases, nbytes = pretraining_bytes(data)
    base = max(1, math.ceil(args.target_gb * 1e9 / max(args.scales) / nbytes))
    budget = f"{args.object_store_mb} MiB" if args.object_store_mb else "Ray Data's default"
    print(
        f"{common.machine()}; one pre-training epoch, {args.size}^3 patches, 1 per case, "
        f"{args.batch} a step (ours: {args.batch // workers} on each of {workers} Train "
        f"workers, feed object-store budget {budget}); 1x = {base} copies of the {cases} "
        f"pre-training cases of {data}"
    )
    print(
        "| scale | cases | decoded GB | ours peak PSS GiB | ours feed | ours s | MONAI peak PSS "
        "GiB | MONAI s | ours / MONAI | ours vs ours at 1x |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows, first = {}, None
    for scale in sorted(args.scales):
        corpus = replicate(data, base * scale, work / f"x{base * scale}")
        n, decoded = pretraining_bytes(corpus)
        ours = _spawn("ours", corpus, args)
        monai = None if args.skip_monai else _spawn("monai", corpus, args)
        first = first or ours["peak_pss"]
        gib = 2**30
        monai_cells = (
            f"{monai['peak_pss'] / gib:.2f} | {monai['seconds']:.0f} | "
            f"{ours['peak_pss'] / monai['peak_pss']:.2f}x"
            if monai
            else "- | - | -"
        )
        print(
            f"| {scale}x | {n} | {decoded / 1e9:.2f} | {ours['peak_pss'] / gib:.2f} | "
            f"{ours['mode']} | {ours['seconds']:.0f} | {monai_cells} | "
            f"{ours['peak_pss'] / first:.2f}x |",
            flush=True,
        )
        rows[scale] = {"cases": n, "decoded_bytes": decoded, "ours": ours, "monai": monai}
    for scale, row in rows.items():
        for name in ("ours", "monai"):
            if row[name]:
                print(f"\nwhere the peak goes, {name} at {scale}x: {_breakdown(row[name])}")
    top = rows[max(rows)]
    summary = {
        "ours_growth_1x_to_max": top["ours"]["peak_pss"] / rows[min(rows)]["ours"]["peak_pss"],
        "ours_vs_monai_at_max": (
            top["ours"]["peak_pss"] / top["monai"]["peak_pss"] if top["monai"] else None
        ),
        "object_store_bytes": top["ours"]["object_store"],
    }
    print("\nsummary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
