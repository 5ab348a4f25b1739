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
