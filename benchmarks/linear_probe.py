"""Linear probe: how much of the target task a pre-training's frozen features hold, in seconds
instead of a fine-tuning's minutes, against randomly initialised networks of the same
architecture measured in the same run.

    python benchmarks/linear_probe.py [--data DIR] [--storage DIR] [--pretrained [NAME=]PATH ...]
        [--fractions 0.05 0.15] [--random-seeds 0 1 2]

Each network's backbone is frozen; its last decoder level (what the segmentation head reads) is
computed over every case by sliding windows of the preset's patch size. A linear classifier per
voxel (a 1x1x1 convolution on the standardised features) is trained on the target's labelled
training cases at each label fraction (cross-entropy weighted by the square root of the
inverse class frequency, full batch), and scored by
the validation split's mean Dice over the target's organs. ``--storage`` probes every cached
pre-training of a study (``<storage>/pretrain_cache``), named by its MLflow run's method and
seed; ``--pretrained`` takes pretrained.pt files or pre-training checkpoint folders.

A probe is not a fine-tuning: it asks whether the features already separate the organ, not how
fast fine-tuning gets there. Read its ratio to the random networks as evidence, not as a result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

STEPS = 300  # full-batch Adam steps of the probe


def backbone_features(net, image: np.ndarray, roi, sw_batch_size: int = 4) -> torch.Tensor:
    """(voxels, channels) of the frozen backbone's last decoder level over a whole case."""
    from monai.inferers import sliding_window_inference

    x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None, None]
    with torch.no_grad():
        f = sliding_window_inference(
            x, tuple(roi), sw_batch_size, lambda p: net.backbone(p)[1], overlap=0.25
        )
    return f[0].reshape(f.shape[1], -1).T.contiguous()


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0):
    """A linear voxel classifier on standardised features; returns predict(features) -> classes."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    counts = torch.bincount(labels, minlength=classes).float()
    # the square root of the inverse class frequency: fully balanced weights made every
    # network's probe mark far too much as organ (validation Dice 0.03-0.07 for all of them)
    weight = torch.where(counts > 0, counts.sum() / (classes * counts.clamp(min=1)), 0.0).sqrt()
    linear = torch.nn.Linear(x.shape[1], classes)
    optimiser = torch.optim.Adam(linear.parameters(), lr=0.05)
    for _ in range(STEPS):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), labels, weight=weight)
        loss.backward()
        optimiser.step()

    def predict(f: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return linear((f - mean) / std).argmax(1)

    return predict


def mean_dice(prediction: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    """Mean Dice over the organs (classes 1..), as validation computes it (``dice_per_class``),
    except that an organ absent from both counts as 1 rather than being skipped."""
    from mixcl_ray.evaluate import dice_per_class

    dice = dice_per_class(prediction.reshape(1, 1, -1), target.reshape(1, 1, -1), classes)
    return float(dice.nan_to_num(1.0).mean())


def probe_network(net, train: dict, val: list, classes: int, roi) -> dict:
    """{fraction: validation Dice} of one frozen network; ``train``: fraction -> [(image, label)]."""
    net.eval()
    cache: dict[int, torch.Tensor] = {}

    def feats(image):
        key = id(image)
        if key not in cache:
            cache[key] = backbone_features(net, image, roi)
        return cache[key]

    out = {}
    for fraction, cases in train.items():
        x = torch.cat([feats(image) for image, _ in cases])
        y = torch.cat([torch.as_tensor(label.reshape(-1)).long() for _, label in cases])
        predict = fit_probe(x, y, classes)
        dice = [
            mean_dice(predict(feats(image)), torch.as_tensor(label.reshape(-1)).long(), classes)
            for image, label in val
        ]
        out[fraction] = float(np.mean(dice))
    return out


def _named(spec: str) -> tuple[str, str]:
    """NAME=PATH, or PATH named by itself."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (spec, spec)


def cached_pretrainings(storage: Path, uri: str | None) -> list[tuple[str, str]]:
    """(name, pretrained.pt) of every finished pre-training in a study's cache."""
    from mixcl_ray.config import METHODS
    from mixcl_ray.tracking import default_tracking_uri

    found = []
    uri = uri or default_tracking_uri(str(storage))
    for done in sorted((storage / "pretrain_cache").glob("*/DONE.json")):
        record = json.loads(done.read_text())
        name = done.parent.name
        try:
            from mlflow import MlflowClient

            params = MlflowClient(uri).get_run(record["run_id"]).data.params
            weights = tuple(float(params[k]) for k in ("l_id", "l_label", "l_rec"))
            method = next((m for m, w in METHODS.items() if w == weights), str(weights))
            name = f"{method} seed {params.get('seed', '?')}"
            if float(params.get("crop_offset", 0) or 0):
                name += f" crop_offset {params['crop_offset']}"
        except Exception as error:  # an unreadable store names the run by its cache key
            print(f"[{done.parent.name}: MLflow params not read ({error}); named by key]")
        if name in {n for n, _ in found} or "?" in name:
            name += f" ({done.parent.name})"
        found.append((name, record["pretrained"]))
    return found


def _load(path: str | None, seed: int, default_model, classes: int):
    """A SegmentationNet: random with ``seed`` (path None), or with pre-trained encoder and decoder."""
    from mixcl_ray.config import ModelConfig, from_dict
    from mixcl_ray.models import SegmentationNet, load_pretrained

    torch.manual_seed(seed)
    if path is None:
        return SegmentationNet(default_model, classes)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = from_dict(ModelConfig, payload["config"]) if payload.get("config") else default_model
    net = SegmentationNet(config, classes)
    load_pretrained(net, payload, parts=("encoder", "decoder"))
    return net


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--storage", type=Path, help="a study's storage: probe its cached pre-trainings"
    )
    parser.add_argument("--tracking-uri", help="the study's MLflow store (default: the storage's)")
    parser.add_argument(
        "--pretrained",
        nargs="*",
        default=[],
        help="[NAME=]PATH: a pretrained.pt or a pre-training checkpoint folder",
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.15])
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--preset", default="cpu-tiny", help="patch size, and the random networks' model"
    )
    args = parser.parse_args(argv)
    if not args.storage and not args.pretrained:
        parser.error("nothing to probe: give --storage or --pretrained")
    if not args.random_seeds:
        parser.error("--random-seeds needs at least one seed: the baseline")

    from data_prep.reader import load_case, read_splits
    from data_prep.splits import fraction_key
    from mixcl_ray.config import load_config
    from mixcl_ray.feed import target_source
    from mixcl_ray.finetune_feed import class_lookup
    from mixcl_ray.pretrain import PRETRAINED_FILE

    data = common.ensure_data(args.data)
    source = target_source(data)
    lut, names = class_lookup(data, source)
    splits = read_splits(data)["sources"][source]
    available = splits["label_fractions"]
    missing = [f for f in args.fractions if fraction_key(f) not in available]
    if missing:
        parser.error(
            f"label fractions {missing} are not in {data}/splits.json; "
            f"available: {sorted(available, key=float)}"
        )

    def case(case_id):
        c = load_case(data, case_id)
        return c["image"], lut[c["label"]]

    train = {f: [case(i) for i in available[fraction_key(f)]] for f in args.fractions}
    val = [case(i) for i in splits["val"]]
    ft = load_config("finetune", args.preset)

    networks = [(f"random init, seed {s}", None, s) for s in args.random_seeds]
    if args.storage:
        networks += [
            (n, p, 0) for n, p in cached_pretrainings(args.storage.absolute(), args.tracking_uri)
        ]
    for spec in args.pretrained:
        name, path = _named(spec)
        if name in {n for n, _, _ in networks}:
            parser.error(f"two networks are named {name!r}: name them NAME=PATH")
        if Path(path).is_dir():
            path = str(Path(path) / PRETRAINED_FILE)
        if not Path(path).is_file():
            parser.error(f"pre-trained weights not found: {path}")
        networks.append((name, path, 0))

    print(f"{common.machine()}; linear probe on the frozen last decoder level of each network")
    print(
        f"target {source} ({', '.join(names[1:])}), {len(val)} validation cases; labelled "
        "training cases per fraction: " + ", ".join(f"{f:g}: {len(c)}" for f, c in train.items())
    )
    results = {}
    for number, (name, path, seed) in enumerate(networks, 1):
        start = time.perf_counter()
        net = _load(path, seed, ft.model, len(names))
        results[name] = probe_network(net, train, val, len(names), ft.patches.patch_size)
        seconds = time.perf_counter() - start
        print(f"[{number}/{len(networks)}] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    base = {
        f: float(np.mean([results[n][f] for n, p, _ in networks if p is None]))
        for f in args.fractions
    }
    print(
        "| network | "
        + " | ".join(f"val Dice @ {f:g}" for f in args.fractions)
        + " | "
        + " | ".join(f"vs random @ {f:g}" for f in args.fractions)
        + " |"
    )
    print("|---" * (1 + 2 * len(args.fractions)) + "|")
    for name, scores in results.items():
        cells = [f"{scores[f]:.3f}" for f in args.fractions]
        cells += [f"{scores[f] / base[f]:.2f}x" if base[f] > 0 else "-" for f in args.fractions]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "| random init, mean | "
        + " | ".join(f"{base[f]:.3f}" for f in args.fractions)
        + " | "
        + " | ".join("1.00x" for _ in args.fractions)
        + " |"
    )
    summary = {
        "random_mean": {fraction_key(f): base[f] for f in args.fractions},
        "networks": {n: {fraction_key(f): s for f, s in r.items()} for n, r in results.items()},
    }
    print("SUMMARY " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
