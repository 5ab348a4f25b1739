"""NIfTI cases written the way scanners and archives write them, from one phantom in world space.

The phantom is defined in millimetres (RAS+ world coordinates, centred on the origin): a body
ellipsoid with three organs placed asymmetrically, so that a flipped or swapped axis moves them.
Each case samples it on its own voxel grid (any orientation, oblique direction cosines, any
spacing), so every file shows the same anatomy and a prepared case can be checked in world
coordinates against the file it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

BODY = ((0.0, 0.0, 0.0), (40.0, 30.0, 36.0))  # centre, radii (mm)
# class id -> (name, centre, radii); liver left of the origin, spleen right, kidney low and back
ORGANS = {
    1: ("liver", (-14.0, 4.0, 4.0), (14.0, 12.0, 12.0)),
    2: ("spleen", (20.0, -6.0, 0.0), (8.0, 8.0, 10.0)),
    3: ("kidney", (10.0, -14.0, -14.0), (6.0, 6.0, 8.0)),
}
CT_HU = {"air": -1000.0, "body": 40.0, 1: 90.0, 2: 130.0, 3: 180.0}
MR_SIGNAL = {"air": 0.0, "body": 400.0, 1: 250.0, 2: 600.0, 3: 800.0}
FOV_MM = 96.0


def rotation(degrees_z: float = 0.0, degrees_x: float = 0.0) -> np.ndarray:
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


# voxel axes -> world directions: RAS, LPS (x and y reversed), PIR (axes permuted), oblique
ORIENTATIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "PIR": np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique": rotation(20.0, 12.0),
}


@dataclass(frozen=True)
class Geometry:
    orientation: str = "RAS"
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)

    def grid(self) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(4, 4) affine and shape of a grid covering the field of view, centred on the origin."""
        shape = tuple(int(np.ceil(FOV_MM / s)) for s in self.spacing)
        affine = np.eye(4)
        affine[:3, :3] = ORIENTATIONS[self.orientation] @ np.diag(self.spacing)
        affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
        return affine, shape


def world_coordinates(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(X, Y, Z, 3) world position of every voxel centre."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def inside(world: np.ndarray, centre, radii, scale: float = 1.0) -> np.ndarray:
    offset = (world - np.asarray(centre)) / (np.asarray(radii) * scale)
    return (offset**2).sum(axis=-1) <= 1.0


def phantom_label(world: np.ndarray) -> np.ndarray:
    label = np.zeros(world.shape[:-1], np.uint8)
    for cls, (_, centre, radii) in ORGANS.items():
        label[inside(world, centre, radii)] = cls
    return label


def phantom_image(world: np.ndarray, modality: str, rng: np.random.Generator, gain=1.0):
    """Scanner intensities: HU for CT; for MR arbitrary units times a scanner ``gain``, air as
    Rician-like noise."""
    table = CT_HU if modality == "CT" else MR_SIGNAL
    label = phantom_label(world)
    image = np.full(label.shape, table["air"], np.float32)
    image[inside(world, *BODY)] = table["body"]
    for cls in ORGANS:
        image[label == cls] = table[cls]
    image += rng.normal(0.0, 10.0, size=image.shape).astype(np.float32)
    if modality == "MR":
        image = np.abs(image) * gain
    return image.astype(np.float32)


def write_case(
    image_path: Path,
    label_path: Path | None,
    geometry: Geometry,
    modality: str,
    *,
    seed: int = 0,
    gain: float = 1.0,
    classes: tuple[int, ...] = (1, 2, 3),
    label_values: dict[int, int] | None = None,
    image_dtype: str = "float32",
    label_dtype: str = "uint8",
    four_d: bool = False,
) -> None:
    """Write one case. ``image_dtype="int16-scaled"`` stores CT as int16 with scl_slope 0.5 and
    scl_inter -1024 (the reader must apply them); ``label_values`` maps class ids to the values
    the file stores; ``four_d`` adds a trailing axis of size 1 to both files."""
    affine, shape = geometry.grid()
    world = world_coordinates(affine, shape)
    image = phantom_image(world, modality, np.random.default_rng(seed), gain)
    label = phantom_label(world)
    label[~np.isin(label, classes)] = 0
    if label_values:
        label = np.vectorize(lambda v: label_values.get(int(v), int(v)), otypes=[np.uint8])(label)
    if four_d:
        image, label = image[..., None], label[..., None]
    if image_dtype == "int16-scaled":
        stored = np.round((image + 1024.0) / 0.5).astype(np.int16)
        img = nib.Nifti1Image(stored, affine)
        img.header.set_slope_inter(0.5, -1024.0)
    else:
        img = nib.Nifti1Image(image.astype(image_dtype), affine)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, image_path)
    if label_path is not None:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label.astype(label_dtype), affine), label_path)


def centroid_mm(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    """World position (mm) of the centre of the voxels of ``value``."""
    index = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ index + affine[:3, 3]
