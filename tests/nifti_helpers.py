"""Small real NIfTI datasets written to disk for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (24, 20, 12)


def phantom(rng: np.random.Generator, shape=SHAPE, classes=(1,)) -> tuple[np.ndarray, np.ndarray]:
    """A body of soft tissue in air with one cube per class. Returns (HU image, label)."""
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[2:-2, 2:-2, 1:-1] = 40.0 + rng.normal(
        0, 5, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2)
    )
    label = np.zeros(shape, dtype=np.uint8)
    for k, cls in enumerate(classes):
        x0 = 4 + 6 * k
        label[x0 : x0 + 4, 6:12, 3:8] = cls
        image[x0 : x0 + 4, 6:12, 3:8] = 120.0 + 20 * cls
    return image, label


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(
        nib.Nifti1Image(array, np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine), path
    )
    return path


def make_msd(
    root: Path,
    n: int = 4,
    labels: dict[int, str] | None = None,
    seed: int = 0,
    prefix: str = "case",
    affine: np.ndarray | None = None,
) -> Path:
    """An MSD-layout dataset of n small CT cases with dataset.json."""
    labels = labels or {1: "spleen"}
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n):
        image, label = phantom(rng, classes=tuple(labels))
        save(root / "imagesTr" / f"{prefix}_{i}.nii.gz", image.astype(np.int16), affine)
        save(root / "labelsTr" / f"{prefix}_{i}.nii.gz", label, affine)
        training.append(
            {"image": f"./imagesTr/{prefix}_{i}.nii.gz", "label": f"./labelsTr/{prefix}_{i}.nii.gz"}
        )
    write_dataset_json(root, training, labels)
    return root


def write_dataset_json(root: Path, training: list, labels: dict[int, str], **extra) -> None:
    data = {
        "name": root.name,
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "numTraining": len(training),
        "training": training,
        "test": [],
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(data))


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: to check that a failed run changed nothing."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
