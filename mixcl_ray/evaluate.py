"""Validation: MONAI sliding-window inference and per-class Dice.

Dice follows MONAI's ``compute_dice`` with one rule from nnU-Net: when a class is absent from
both the prediction and the ground truth, its Dice is NaN (nothing to score) rather than 1;
when it is absent from the ground truth only, Dice is 0. Means skip NaN; background is
excluded.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice
from monai.networks.utils import one_hot


def dice_per_class(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """prediction, target: (B, 1, X, Y, Z) integer class maps -> (B, num_classes - 1) Dice."""
    pred = one_hot(prediction.long(), num_classes)
    true = one_hot(target.long(), num_classes)
    dice = compute_dice(pred, true, include_background=False, ignore_empty=False)
    both_empty = (pred[:, 1:].flatten(2).sum(-1) == 0) & (true[:, 1:].flatten(2).sum(-1) == 0)
    return dice.masked_fill(both_empty, float("nan"))


def nan_mean(values) -> float:
    array = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(array)) if np.isfinite(array).any() else float("nan")


@torch.no_grad()
def predict_volume(
    model,
    image: np.ndarray,
    patch_size,
    device,
    sw_batch_size: int = 4,
    overlap: float = 0.25,
    autocast=None,
) -> torch.Tensor:
    """image: (X, Y, Z) float32 -> predicted class map (1, 1, X, Y, Z) on the CPU."""
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
        logits = sliding_window_inference(
            x, patch_size, sw_batch_size, model, overlap=overlap, mode="gaussian"
        )
    return logits.argmax(dim=1, keepdim=True).cpu()


def validate_cases(
    model,
    cases: list[dict],
    num_classes: int,
    patch_size,
    device,
    sw_batch_size=4,
    overlap=0.25,
    autocast=None,
    on_prediction=None,
) -> dict[str, np.ndarray]:
    """Dice (num_classes - 1,) for each case: {case_id: dice}. cases: decoded cases with
    ``image`` and ``label`` in the network's class indices. ``on_prediction(case, prediction)``,
    if given, sees each case's predicted class map (1, 1, X, Y, Z), e.g. to draw it without
    predicting again."""
    model.eval()
    results = {}
    for case in cases:
        prediction = predict_volume(
            model, case["image"], patch_size, device, sw_batch_size, overlap, autocast
        )
        if on_prediction is not None:
            on_prediction(case, prediction)
        target = torch.from_numpy(np.ascontiguousarray(case["label"]))[None, None]
        results[case["case_id"]] = dice_per_class(prediction, target, num_classes)[0].numpy()
    return results


def evaluate_model(
    model, data_dir, split: str = "test", device: str = "cpu", tracking_uri=None
) -> list[dict]:
    """Dice per case and class of a fine-tuned model (see ``mixcl_ray.predict.load_model``) on
    a split of a prepared folder; the last row, ``case_id == "mean"``, holds the NaN-aware
    means."""
    from data_prep.reader import load_case, read_manifest, read_splits
    from mixcl_ray.config import FinetuneConfig, from_dict
    from mixcl_ray.feed import target_source
    from mixcl_ray.finetune_feed import class_lookup
    from mixcl_ray.predict import load_model

    loaded = load_model(model, device, tracking_uri)
    cfg = from_dict(FinetuneConfig, loaded.card["finetune_config"])
    prepared_with = read_manifest(data_dir)["preset"]
    if prepared_with != loaded.card["preset"]:
        raise ValueError(
            f"{data_dir} was prepared with preset {prepared_with}, the model was trained on "
            f"{loaded.card['preset']}: prepare the data again with the model's preset and spacing"
        )
    source = target_source(data_dir, cfg.source)
    lut, names = class_lookup(data_dir, source)
    if names != loaded.card["class_names"]:
        raise ValueError(f"{source} has classes {names}, the model {loaded.card['class_names']}")
    splits = read_splits(data_dir)["sources"][source]
    if split not in splits or not splits[split]:
        raise ValueError(f"source {source} has no {split!r} cases in splits.json")
    cases = [
        dict(c, label=lut[c["label"]]) for c in (load_case(data_dir, i) for i in splits[split])
    ]
    per_case = validate_cases(
        loaded.model,
        cases,
        len(names),
        cfg.patches.patch_size,
        device,
        cfg.sw_batch_size,
        cfg.sw_overlap,
    )
    rows = [
        {
            "case_id": case_id,
            **dict(zip(names[1:], map(float, dice), strict=True)),
            "mean": nan_mean(dice),
        }
        for case_id, dice in sorted(per_case.items())
    ]
    means = {n: nan_mean([r[n] for r in rows]) for n in names[1:]}
    rows.append({"case_id": "mean", **means, "mean": nan_mean(list(means.values()))})
    return rows


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.evaluate",
        description="Score a fine-tuned model on a split of a prepared folder: Dice per case "
        "and per class (background excluded, NaN where a class is absent from both) as CSV.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="fine-tuning output folder, best_model.pt, or an MLflow model URI",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store of a model URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)",
    )
    parser.add_argument(
        "--data", required=True, help="output folder of `python -m data_prep prepare`"
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--csv", help="where to write the table (default: stdout only)")
    parser.add_argument("--gpu", action="store_true", help="run on the first CUDA device")
    return parser


def main(argv: list[str] | None = None) -> int:
    import csv
    import sys

    args = build_parser().parse_args(argv)
    try:
        device = "cuda" if args.gpu else "cpu"
        rows = evaluate_model(args.model, args.data, args.split, device, args.tracking_uri)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    handle = open(args.csv, "w", newline="") if args.csv else sys.stdout
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    if args.csv:
        handle.close()
        print(f"wrote {len(rows) - 1} cases to {args.csv}")
    print(f"mean Dice on {args.split}: {rows[-1]['mean']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
