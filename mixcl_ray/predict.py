"""Segment new scans: ``python -m mixcl_ray.predict --model MODEL --input FILE_OR_DIR --out DIR``.

MODEL is a fine-tuning's output folder (its newest ``best_model.pt`` is used), a
``best_model.pt`` itself, or the MLflow model a fine-tuning logged (``runs:/<run id>/model``,
``models:/<name>/<version>``). The file carries a model card: class names, the data preset
(orientation, spacing, intensities) and the fine-tuning config. Each scan is preprocessed
exactly as the model's training data was, segmented with MONAI sliding-window inference, and
the class map is taken back to the scan's own grid (orientation, crop and spacing inverted by
MONAI's ``Invertd``, nearest neighbour), so ``DIR/<same file name>`` overlays the input.
``DIR/labels.json`` names the class ids, in the format ``data_prep`` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import locations
from data_prep.layouts import NIFTI_SUFFIXES
from mixcl_ray.finetune import BEST_FILE


@dataclass
class LoadedModel:
    model: object  # SegmentationNet in eval mode
    card: dict
    preset: object  # data_prep.preprocess.Preset
    patch_size: tuple[int, int, int]
    source: str  # where the weights came from


def find_weights(model: str | Path) -> locations.Location:
    """``best_model.pt`` itself, or the newest one under a fine-tuning output folder."""
    location = locations.as_location(model)
    if locations.is_file(location):
        return location
    if not locations.is_remote(location) and Path(location).is_dir():
        found = sorted(Path(location).rglob(BEST_FILE))
        if found:
            return found[-1]  # epoch_NNNN folders sort by epoch
    raise FileNotFoundError(
        f"no {BEST_FILE} at {locations.describe(location)}: pass a fine-tuning output folder "
        f"or its {BEST_FILE}"
    )


def load_model(
    model: str | Path, device: str = "cpu", tracking_uri: str | None = None
) -> LoadedModel:
    """The network and its card from a fine-tuning's folder, its ``best_model.pt`` or an MLflow
    model URI (looked up in ``tracking_uri``, default: $MLFLOW_TRACKING_URI or runs/mlflow.db)."""
    import tempfile

    import torch

    from data_prep.preprocess import Preset
    from mixcl_ray.config import FinetuneConfig, from_dict
    from mixcl_ray.mlflow_model import is_mlflow_uri, local_weights
    from mixcl_ray.models import SegmentationNet

    with tempfile.TemporaryDirectory(prefix="mixcl-model-") as tmp:
        if is_mlflow_uri(str(model)):
            from mixcl_ray.tracking import default_tracking_uri

            uri = tracking_uri or default_tracking_uri("runs")
            path = local_weights(str(model), uri, Path(tmp))
        else:
            path = find_weights(model)
        state = torch.load(locations.open_for_torch(path), map_location="cpu", weights_only=True)
    source = str(model) if is_mlflow_uri(str(model)) else str(path)
    card = state.get("card")
    if card is None:
        raise ValueError(
            f"{locations.describe(path)} carries no model card (class names, preprocessing): it "
            "was written by an older version; fine-tune again to predict with it"
        )
    config = from_dict(FinetuneConfig, card["finetune_config"])
    net = SegmentationNet(config.model, num_classes=len(card["class_names"]))
    net.load_state_dict(state["model"])
    preset = Preset(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in card["preset"].items()}
    )
    return LoadedModel(
        net.to(device).eval(), card, preset, tuple(config.patches.patch_size), source
    )


def scan_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
        )
        if files:
            return files
    raise FileNotFoundError(f"no NIfTI file (.nii, .nii.gz) at {path}")


def segment_file(loaded: LoadedModel, path: Path, device: str = "cpu") -> tuple[np.ndarray, object]:
    """(X, Y, Z) class map in the file's own grid, and the file's NIfTI image."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor

    from data_prep.preprocess import TransformError, apply_steps, build_transforms
    from data_prep.validate import check_image, load_nifti
    from mixcl_ray.evaluate import predict_volume

    name = path.name
    image, affine = load_nifti(path, case=name, kind="image")
    check_image(image, case=name, path=path)
    chain = build_transforms(loaded.preset, loaded.card["modality"], with_label=False)
    data = {"image": MetaTensor(torch.from_numpy(image)[None], affine=torch.as_tensor(affine))}
    try:
        data = apply_steps(chain, data)
    except TransformError as err:
        raise ValueError(str(err)) from None
    prepared = data["image"]
    classes = predict_volume(loaded.model, prepared[0].numpy(), loaded.patch_size, device)
    return to_input_grid(classes[0], prepared, chain), nib.load(path)


def to_input_grid(classes, prepared, chain) -> np.ndarray:
    """Invert the preprocessing on a (1, X', Y', Z') class map of ``prepared``'s grid."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    pred = MetaTensor(classes.float(), meta=prepared.meta)
    pred.applied_operations = prepared.applied_operations
    inverse = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=True)
    out = inverse({"pred": pred, "image": prepared})["pred"]
    return np.rint(np.asarray(out[0])).astype(np.uint8)


def write_segmentation(classes: np.ndarray, source, out: Path) -> Path:
    """Save ``classes`` with the source image's header (affine, qform and sform codes)."""
    import nibabel as nib

    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = classes.reshape(source.shape)  # (X, Y, Z, 1) stays as the scanner wrote it
    nib.save(nib.Nifti1Image(classes, source.affine, header), out)
    return out


def predict(
    model, inputs, out_dir, device: str = "cpu", progress: bool = True, tracking_uri=None
) -> dict:
    """Segment every NIfTI of ``inputs``. Returns {"written": [...], "failed": {file: why}}."""
    from tqdm.auto import tqdm

    loaded = load_model(model, device, tracking_uri)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {str(i): n for i, n in enumerate(loaded.card["class_names"])}
    (out_dir / "labels.json").write_text(json.dumps(names, indent=1))
    written, failed = [], {}
    for path in tqdm(
        scan_files(Path(inputs)), desc="segmenting", unit="scan", disable=not progress
    ):
        try:
            classes, source = segment_file(loaded, path, device)
        except (ValueError, OSError) as err:  # a bad scan: the others still go on
            failed[str(path)] = str(err)
            continue
        written.append(write_segmentation(classes, source, out_dir / path.name))
    return {"written": written, "failed": failed, "model": loaded.source}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.predict",
        description="Segment NIfTI scans with a fine-tuned model: the model's own preprocessing, "
        "sliding-window inference, and the class map written in each scan's own geometry.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"fine-tuning output folder, its {BEST_FILE}, or an MLflow model URI "
        "(runs:/<run id>/model, models:/<name>/<version>)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store of a model URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)",
    )
    parser.add_argument(
        "--input", required=True, type=Path, help="a NIfTI file or a folder of them"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for <same file name> and labels.json"
    )
    parser.add_argument("--gpu", action="store_true", help="run on the first CUDA device")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu given but no CUDA device is visible", file=sys.stderr)
        return 2
    device = "cuda" if args.gpu else "cpu"
    try:
        result = predict(
            args.model, args.input, args.out, device, not args.no_progress, args.tracking_uri
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: {result['model']}")
    print(f"wrote {len(result['written'])} segmentations and labels.json to {args.out}")
    for path, why in result["failed"].items():
        print(f"error: {path}: {why}", file=sys.stderr)
    return 2 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
