"""Two views of a patch: independent intensity augmentation and spatial transforms whose inverse
is known, so that voxel i of one view's embedding map, mapped back, lies on voxel i of the other's.

Spatial parameters of one view: ``flips`` (3,) bool over the three spatial axes and ``rot``
k in 0..3, a rotation by k * 90 degrees in the first two spatial axes (the axial plane of a
RAS volume). ``apply_spatial`` works on numpy (..., X, Y, Z) arrays in the data pipeline;
``invert_spatial`` undoes it on torch (B, C, X, Y, Z) tensors in the training step.

With ``rotate_degrees`` or ``zoom`` set, each view is first resampled by its own small rotation
in that plane and isotropic scale about the patch centre (``warp`` (3, 3): the view -> patch map
of voxel offsets from the centre; ``random_warp``, ``apply_warp``). ``unwarp`` maps a view's
voxel embeddings back onto the patch's grid (trilinear) and says which of the patch's voxels the
view saw; the others are left out of the label term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ViewConfig:
    """Per-view augmentation. Flips and rot90 are off by default: on abdominal CT a left-right
    flip turns the liver's side into the spleen's, so invariance to it works against telling
    them apart, and on short CPU budgets the identity term did not learn at all with them on
    (it stayed at its chance value log(2B - 1)); with intensity changes alone it did.

    ``crop_offset``: the second view is cropped at an offset of up to this many voxels per axis
    from the first (overlapping crops, as SimCLR's random crops: the identity term then has to
    match neighbouring regions instead of the same voxels under new intensities, which it
    solves almost at once); 0, the default, crops both views at the same place. With an
    offset each view carries its own label (``label2``) and the label term draws each view's
    voxels from its own."""

    flip_prob: float = 0.0  # per-axis flip probability of each view
    rotate: bool = False  # random 90-degree rotations in-plane
    scale: tuple[float, float] = (0.85, 1.15)  # intensity scale range
    shift: tuple[float, float] = (-0.1, 0.1)  # intensity shift range
    gamma: tuple[float, float] = (0.7, 1.5)  # gamma range
    noise_std: float = 0.03  # Gaussian noise std
    crop_offset: int = 0  # voxels per axis between the two views' crops (at most); 0: the same crop
    rotate_degrees: float = 0.0  # each view rotated in-plane by up to this angle (+/-); 0: none
    zoom: float = 0.0  # each view scaled by a factor in [1 - zoom, 1 + zoom]; 0: none

    @property
    def warps(self) -> bool:
        """Whether each view is resampled by a small rotation or scale (``random_warp``)."""
        return self.rotate_degrees > 0 or self.zoom > 0

    def __post_init__(self):
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.gamma[0] <= 0 or self.scale[0] <= 0 or self.noise_std < 0:
            raise ValueError("gamma and scale must be positive and noise_std >= 0")
        offset = self.crop_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"crop_offset must be an integer >= 0 (voxels), got {offset!r}")
        if not 0 <= self.rotate_degrees <= 45:
            raise ValueError(f"rotate_degrees must be in [0, 45], got {self.rotate_degrees}")
        if not 0 <= self.zoom < 0.5:
            raise ValueError(f"zoom must be in [0, 0.5), got {self.zoom}")


def random_spatial(rng: np.random.Generator, config: ViewConfig) -> tuple[np.ndarray, int]:
    flips = rng.random(3) < config.flip_prob
    rot = int(rng.integers(0, 4)) if config.rotate else 0
    return flips, rot


def apply_spatial(x: np.ndarray, flips: np.ndarray, rot: int) -> np.ndarray:
    """x: (..., X, Y, Z). Flip first, then rotate in (X, Y); needs X == Y when rot is odd."""
    if rot % 2 and x.shape[-3] != x.shape[-2]:
        raise ValueError(f"rot90 needs a square (X, Y) plane, got {x.shape[-3:]}")
    axes = tuple(x.ndim - 3 + i for i in range(3) if flips[i])
    if axes:
        x = np.flip(x, axis=axes)
    if rot:
        x = np.rot90(x, k=rot, axes=(x.ndim - 3, x.ndim - 2))
    return np.ascontiguousarray(x)


def invert_spatial(x: torch.Tensor, flips: torch.Tensor, rots: torch.Tensor) -> torch.Tensor:
    """Undo ``apply_spatial`` per sample. x: (B, C, X, Y, Z); flips: (B, 3) bool; rots: (B,)."""
    import torch  # here, not at the top: Ray Data's sampling processes never load torch

    out = []
    for sample, flip, rot in zip(x, flips.tolist(), rots.tolist(), strict=True):  # B iterations
        if rot:
            sample = torch.rot90(sample, k=-rot, dims=(1, 2))
        axes = [1 + i for i in range(3) if flip[i]]
        if axes:
            sample = torch.flip(sample, dims=axes)
        out.append(sample)
    return torch.stack(out)


def random_warp(rng: np.random.Generator, config: ViewConfig) -> np.ndarray:
    """One view's warp (3, 3) float32: voxel offset from the centre in the view -> in the patch,
    a rotation by an angle in +/- ``rotate_degrees`` in the (X, Y) plane divided by a scale in
    [1 - zoom, 1 + zoom] (a scale above 1 shows a smaller region, magnified)."""
    angle = np.deg2rad(rng.uniform(-config.rotate_degrees, config.rotate_degrees))
    scale = rng.uniform(1 - config.zoom, 1 + config.zoom)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return (rotation / scale).astype(np.float32)


def apply_warp(x: np.ndarray, warp: np.ndarray) -> np.ndarray:
    """x: (..., X, Y, Z) float; the view whose voxel at centre offset q shows the patch at centre
    offset ``warp @ q`` (trilinear; outside the patch, its nearest edge voxel)."""
    from scipy.ndimage import affine_transform

    centre = (np.asarray(x.shape[-3:], dtype=np.float64) - 1) / 2
    matrix = warp.astype(np.float64)
    offset = centre - matrix @ centre
    flat = x.reshape(-1, *x.shape[-3:])
    out = np.stack([affine_transform(v, matrix, offset, order=1, mode="nearest") for v in flat])
    return out.reshape(x.shape).astype(x.dtype, copy=False)


def unwarp(x: torch.Tensor, warps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``apply_warp`` per sample on the views' maps. x: (B, C, X, Y, Z) in the views'
    frames; warps: (B, 3, 3). Returns the maps on the patch's grid (trilinear) and (B, X, Y, Z)
    bool: the patch voxels that lie inside their view (the others are zeros)."""
    import torch
    import torch.nn.functional as F

    half = (torch.tensor(x.shape[2:], dtype=torch.float32, device=x.device) - 1) / 2
    # patch offset p -> view offset warp^-1 p, in [-1, 1] units per axis (align_corners=True)
    inverse = torch.linalg.inv(warps.float())
    theta = inverse * half[None, None, :] / half[None, :, None]  # diag(1/h) W^-1 diag(h)
    order = [2, 1, 0]  # grid_sample's coordinates are (Z, Y, X): the last axis first
    theta = theta[:, order][:, :, order]
    affine = torch.cat([theta, theta.new_zeros(theta.shape[0], 3, 1)], dim=2)
    grid = F.affine_grid(affine, list(x.shape), align_corners=True)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", align_corners=True)
    valid = (grid.abs() <= 1 + 1e-4).all(dim=-1)
    return out, valid


def augment_intensity(x: np.ndarray, rng: np.random.Generator, config: ViewConfig) -> np.ndarray:
    """Random gamma, scale, shift and Gaussian noise on an image in [0, 1]; returns float32.
    In float32 and in place: in float64 with a new array per step it took a third of a 32^3
    example's augmentation time."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    gamma = rng.uniform(*config.gamma)
    scale = rng.uniform(*config.scale)
    shift = rng.uniform(*config.shift)
    if hi > lo:  # ((x - lo) / (hi - lo)) ** gamma * (hi - lo) * scale + lo * scale + shift
        y = np.subtract(x, np.float32(lo))
        y *= np.float32(1.0 / (hi - lo))
        np.power(y, np.float32(gamma), out=y)
        y *= np.float32((hi - lo) * scale)
        y += np.float32(lo * scale + shift)
    else:
        y = np.full(x.shape, lo * scale + shift, dtype=np.float32)
    if config.noise_std > 0:
        sigma = rng.uniform(0, config.noise_std)
        y += gaussian_noise(x.shape, rng, sigma)
    return y


NOISE_BANK = 1 << 22  # standard normal values per process (16 MB)
_bank: np.ndarray | None = None


def gaussian_noise(shape: tuple[int, ...], rng: np.random.Generator, std: float) -> np.ndarray:
    """Zero-mean normal noise of ``shape`` and standard deviation ``std`` (float32): a window
    at a random offset into a bank of ``NOISE_BANK`` values drawn once per process (from a fixed seed, so the same ``rng`` gives
    the same noise in any process), with a random sign. Drawing 96^3 normal values took 8 ms,
    two thirds of a view's augmentation; the window costs a copy. Voxel by voxel, two windows
    at different offsets are independent draws."""
    global _bank
    n = int(np.prod(shape))
    if _bank is None or _bank.size < n:
        _bank = np.random.default_rng(0).standard_normal(max(NOISE_BANK, n), dtype=np.float32)
    start = int(rng.integers(0, _bank.size - n + 1))
    sign = -1.0 if rng.random() < 0.5 else 1.0
    return np.float32(sign * std) * _bank[start : start + n].reshape(shape)
