"""A trial's test-split score: Dice of its best weights on the target's test cases, and a few
overlay PNGs of the scored predictions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data_prep.locations import open_for_torch


def scoring_threads(cluster_cpus: float, concurrent_trials: int) -> int:
    """Threads for a trial's test scoring: its share of the CPUs (``cluster_cpus`` over the
    trials run at once), which its fit held and has just given back, at most this node's
    CPUs. (In the trial's process, which Ray gives one thread, 30 test cases of the study
    benchmark took about 56 s; at 2 threads about 38 s.)"""
    share = int(cluster_cpus // max(1, concurrent_trials))
    return max(1, min(os.cpu_count() or 1, share))


def test_scores(
    data_dir, ft_cfg, best_model, out_dir: Path, overlays: int = 3, threads: int = 1
) -> tuple[dict, list[Path]]:
    """Test-split Dice of the best weights (``test/dice_mean``, ``test/dice/<organ>``, and
    ``per_case``: a table of each case's Dice) and a few overlay PNGs (image / ground truth /
    prediction), computed on ``threads`` CPU threads (this process's count is restored)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _scores(data_dir, ft_cfg, best_model, out_dir, overlays)
    finally:
        torch.set_num_threads(previous)


def _scores(data_dir, ft_cfg, best_model, out_dir: Path, overlays: int):
    import torch

    from data_prep.reader import load_case, read_splits
    from mixcl_ray.evaluate import nan_mean
    from mixcl_ray.evaluate import validate_cases as _validate
    from mixcl_ray.feed import target_source
    from mixcl_ray.finetune_feed import class_lookup
    from mixcl_ray.models import SegmentationNet
    from mixcl_ray.plots import overlay_png

    source = target_source(data_dir, ft_cfg.source)
    lut, names = class_lookup(data_dir, source)
    ids = (
        read_splits(data_dir)["sources"][source]["test"]
        or read_splits(data_dir)["sources"][source]["val"]
    )
    model = SegmentationNet(ft_cfg.model, len(names))
    weights = torch.load(open_for_torch(best_model), map_location="cpu", weights_only=True)
    model.load_state_dict(weights["model"])
    cases = [dict(c, label=lut[c["label"]]) for c in (load_case(data_dir, i) for i in ids)]
    pngs = []

    def draw(case, prediction):  # the scored prediction of the first cases, not a second one
        if len(pngs) < overlays:
            path = out_dir / f"overlay_{case['case_id'].replace('/', '_')}.png"
            overlay_png(
                case["image"], case["label"], prediction[0, 0].numpy(), path, case["case_id"]
            )
            pngs.append(path)

    per_case = _validate(
        model,
        cases,
        len(names),
        ft_cfg.patches.patch_size,
        torch.device("cpu"),
        ft_cfg.sw_batch_size,
        ft_cfg.sw_overlap,
        on_prediction=draw,
    )
    table = np.stack([per_case[k] for k in sorted(per_case)])
    per_class = [nan_mean(table[:, c]) for c in range(table.shape[1])]
    metrics = {
        "test/dice_mean": nan_mean(per_class),
        "test/cases": len(cases),
        **{f"test/dice/{n}": d for n, d in zip(names[1:], per_class, strict=True)},
    }
    metrics["per_case"] = {  # the table of test Dice per case, logged beside the means
        "case_id": sorted(per_case),
        "dice_mean": [nan_mean(list(per_case[k])) for k in sorted(per_case)],
        **{
            f"dice/{n}": [float(per_case[k][c]) for k in sorted(per_case)]
            for c, n in enumerate(names[1:])
        },
    }
    return metrics, pngs
