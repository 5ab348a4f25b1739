"""Models-Genesis-style corruptions (Zhou et al., 2019) that the reconstruction head undoes:
a non-linear intensity curve (Bezier), local voxel shuffling, in-painting and out-painting.
Pure numpy on one patch (C, X, Y, Z) with values in about [0, 1]; vectorised over voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CorruptionConfig:
    nonlinear_prob: float = 0.9  # probability of a Bezier intensity transform
    shuffle_prob: float = 0.5  # probability of local pixel shuffling
    paint_prob: float = 0.9  # probability of in- or out-painting
    inpaint_rate: float = 0.8  # of painting: in-painting, else out-painting
    shuffle_blocks: int = 64  # blocks shuffled per patch
    shuffle_block_max: float = 0.1  # block side as a fraction of the patch side

    def __post_init__(self):
        for name in ("nonlinear_prob", "shuffle_prob", "paint_prob", "inpaint_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.shuffle_blocks < 0 or not 0 < self.shuffle_block_max <= 0.5:
            raise ValueError("shuffle_blocks must be >= 0 and shuffle_block_max in (0, 0.5]")


def bezier_curve(rng: np.random.Generator, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """A monotone-in-x cubic Bezier from (0, 0) to (1, 1), possibly flipped (decreasing)."""
    p = np.array([[0.0, 0.0], rng.random(2), rng.random(2), [1.0, 1.0]])
    t = np.linspace(0.0, 1.0, n)[:, None]
    curve = (
        ((1 - t) ** 3) * p[0]
        + 3 * ((1 - t) ** 2) * t * p[1]
        + 3 * (1 - t) * t**2 * p[2]
        + t**3 * p[3]
    )
    xs, ys = curve[:, 0], curve[:, 1]
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    if rng.random() < 0.5:
        ys = ys[::-1]
    return xs, ys


CURVE_TABLE = 1 << 14  # samples of the intensity curve on a uniform grid over [0, 1]


def nonlinear_transform(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The Bezier intensity curve applied to x clipped to [0, 1].

    The curve is tabulated once per call on a uniform grid of 2^14 points and each voxel reads
    its nearest entry: ``np.interp`` on the curve's 1000 unevenly spaced points
    binary-searches every voxel and took 70 % of a 32^3 example's augmentation time; this
    takes a sixth of it at 32^3 and a twelfth at 96^3. Against ``np.interp``, the mean error
    is below 1e-4 and the largest 0.008, where the curve is nearly vertical (tested)."""
    xs, ys = bezier_curve(rng)
    table = np.interp(np.linspace(0.0, 1.0, CURVE_TABLE), xs, ys).astype(np.float32)
    t = np.clip(x, 0.0, 1.0, dtype=np.float32)
    t *= np.float32(CURVE_TABLE - 1)
    t += np.float32(0.5)
    return table.take(t.astype(np.uint16))


def local_shuffle(
    x: np.ndarray, rng: np.random.Generator, blocks: int, block_max: float
) -> np.ndarray:
    """Shuffle the voxels inside ``blocks`` random small blocks (one block size per call)."""
    if blocks == 0:
        return x
    out = x.copy()
    size = np.array(x.shape[-3:])
    block = np.maximum(1, (rng.uniform(0.3, 1.0, 3) * block_max * size).astype(int))
    starts = np.stack(
        [rng.integers(0, s - b + 1, size=blocks) for s, b in zip(size, block, strict=True)], axis=1
    )
    # (K, bx, by, bz) flat voxel coordinates of every block
    grid = np.stack(np.meshgrid(*[np.arange(b) for b in block], indexing="ij"), axis=-1).reshape(
        -1, 3
    )
    coords = starts[:, None, :] + grid[None]  # (K, n, 3)
    flat = np.ravel_multi_index(tuple(coords[..., i] for i in range(3)), tuple(size))  # (K, n)
    perm = np.argsort(rng.random(flat.shape), axis=1)
    shuffled = np.take_along_axis(flat, perm, axis=1)
    for c in range(x.shape[0]) if x.ndim == 4 else [None]:
        src = x[c].reshape(-1) if c is not None else x.reshape(-1)
        dst = out[c].reshape(-1) if c is not None else out.reshape(-1)
        dst[flat.ravel()] = src[shuffled.ravel()]
    return out


def _box(rng: np.random.Generator, size: np.ndarray, lo: float, hi: float) -> tuple[slice, ...]:
    extent = np.maximum(1, (rng.uniform(lo, hi, 3) * size).astype(int))
    start = [int(rng.integers(0, s - e + 1)) for s, e in zip(size, extent, strict=True)]
    return tuple(slice(a, a + e) for a, e in zip(start, extent, strict=True))


def inpaint(x: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """Replace 1..max_boxes random boxes (1/6..1/3 of each side) with uniform noise."""
    out = x.copy()
    size = np.array(x.shape[-3:])
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        region = (Ellipsis, *_box(rng, size, 1 / 6, 1 / 3))
        out[region] = rng.random(out[region].shape)
    return out


def outpaint(x: np.ndarray, rng: np.random.Generator, max_boxes: int = 4) -> np.ndarray:
    """Keep 1..max_boxes inner boxes (1/2..3/4 of each side); fill the rest with uniform noise."""
    out = rng.random(x.shape).astype(np.float32)
    size = np.array(x.shape[-3:])
    for _ in range(int(rng.integers(1, max_boxes + 1))):
        region = (Ellipsis, *_box(rng, size, 0.5, 0.75))
        out[region] = x[region]
    return out


def corrupt(x: np.ndarray, rng: np.random.Generator, config: CorruptionConfig) -> np.ndarray:
    """Apply each corruption with its probability. x: (C, X, Y, Z) float32 -> same shape."""
    y = x
    if rng.random() < config.nonlinear_prob:
        y = nonlinear_transform(y, rng)
    if rng.random() < config.shuffle_prob:
        y = local_shuffle(y, rng, config.shuffle_blocks, config.shuffle_block_max)
    if rng.random() < config.paint_prob:
        y = inpaint(y, rng) if rng.random() < config.inpaint_rate else outpaint(y, rng)
    return np.ascontiguousarray(y, dtype=np.float32)
