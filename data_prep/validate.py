"""Read one case's NIfTI files with nibabel and reject bad input with a message naming it.

Checks: readable NIfTI (not truncated, not another format), 3D (trailing axes of size 1 are
dropped), not empty, finite voxels, image/label shape and affine agreement, integer label
values that the dataset declares, and a label that is not all background.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.errors import DataPrepError

# Image and label affines may differ by float noise written by different tools.
AFFINE_ATOL_MM = 1e-2


@dataclass
class RawCase:
    """A case as read from disk, before any preprocessing."""

    image: np.ndarray  # (X, Y, Z) float32, scanner units (HU for CT)
    affine: np.ndarray  # (4, 4) voxel -> world (RAS+ mm)
    label: np.ndarray | None  # (X, Y, Z) uint8 source label values, or None
    image_sha256: str
    label_sha256: str | None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_nifti(path: Path, *, case: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI volume as float32 plus its affine, or raise a DataPrepError."""
    try:
        img = nib.load(str(path))
    except FileNotFoundError:
        raise DataPrepError(f"missing {kind} file", case=case, path=str(path)) from None
    except Exception as err:  # nibabel raises several types for foreign formats
        raise DataPrepError(
            f"{kind} is not a readable NIfTI file ({type(err).__name__}: {err})",
            case=case,
            path=str(path),
        ) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise DataPrepError(
            f"{kind} is a {type(img).__name__}, not a NIfTI file", case=case, path=str(path)
        )
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1): a 3D volume written as 4D
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataPrepError(
            f"{kind} has shape {tuple(img.shape)} ({len(img.shape)}D); a 3D volume is expected "
            "(split multi-channel or time series into separate 3D files)",
            case=case,
            path=str(path),
        )
    if min(shape) == 0:
        raise DataPrepError(f"{kind} is empty: shape {tuple(shape)}", case=case, path=str(path))
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as err:  # truncated gzip streams raise EOFError, zlib.error, OSError...
        raise DataPrepError(
            f"{kind} cannot be read completely, the file looks truncated or corrupt "
            f"({type(err).__name__}: {err})",
            case=case,
            path=str(path),
        ) from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataPrepError(f"{kind} has an invalid affine", case=case, path=str(path))
    return data, affine


def check_image(image: np.ndarray, *, case: str, path: Path) -> None:
    bad = ~np.isfinite(image)
    if bad.any():
        raise DataPrepError(f"image has {int(bad.sum())} NaN/Inf voxels", case=case, path=str(path))
    if float(image.max()) == float(image.min()):
        raise DataPrepError(
            f"image is empty: every voxel is {float(image.min()):g}", case=case, path=str(path)
        )


def check_label(
    label: np.ndarray,
    image_shape: tuple[int, ...],
    declared: dict[int, str],
    *,
    case: str,
    path: Path,
) -> np.ndarray:
    """Return the label as uint8 after checking shape, values and non-emptiness."""
    if label.shape != image_shape:
        raise DataPrepError(
            f"label shape {label.shape} does not match image shape {image_shape}",
            case=case,
            path=str(path),
        )
    if not np.all(np.isfinite(label)):
        raise DataPrepError("label has NaN/Inf voxels", case=case, path=str(path))
    rounded = np.rint(label)
    if not np.array_equal(rounded, label):
        examples = np.unique(label[rounded != label])[:3]
        raise DataPrepError(
            f"label has non-integer values (e.g. {', '.join(f'{v:g}' for v in examples)})",
            case=case,
            path=str(path),
        )
    values = np.unique(rounded).astype(np.int64)
    undeclared = sorted(set(values.tolist()) - set(declared))
    if undeclared:
        raise DataPrepError(
            f"label values {undeclared} are not declared in the dataset's labels "
            f"{dict(sorted(declared.items()))}",
            case=case,
            path=str(path),
        )
    if values.max() == 0:
        raise DataPrepError("label is empty: every voxel is background", case=case, path=str(path))
    return rounded.astype(np.uint8)


def read_case(
    image_path: Path, label_path: Path | None, declared: dict[int, str], *, case: str
) -> RawCase:
    """Load and check one case; every failure is a DataPrepError that names it."""
    image, affine = load_nifti(image_path, case=case, kind="image")
    check_image(image, case=case, path=image_path)
    label = None
    label_sha = None
    if label_path is not None:
        raw_label, label_affine = load_nifti(label_path, case=case, kind="label")
        label = check_label(raw_label, image.shape, declared, case=case, path=label_path)
        if not np.allclose(affine, label_affine, rtol=0, atol=AFFINE_ATOL_MM):
            raise DataPrepError(
                "label affine does not match the image affine (max difference "
                f"{np.abs(affine - label_affine).max():.4g} mm): image and label are not in "
                "the same space",
                case=case,
                path=str(label_path),
            )
        label_sha = sha256_of(label_path)
    return RawCase(image, affine, label, sha256_of(image_path), label_sha)
