"""One phantom of the built-in benchmark: a body (skin/fat, muscle wall, visceral fat with
bowel-like clutter, spine) with organs drawn as randomly deformed, rotated and scaled
ellipsoids in Hounsfield-like units, then partial-volume blur, a smooth intensity bias and
scanner noise, on a RAS grid (``make_phantom``). ``data_prep.synthetic`` writes them as
sources."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# name: (mean HU, spread of the per-case mean)
ORGAN_HU = {
    "liver": (100.0, 12.0),
    "spleen": (104.0, 14.0),
    "kidney_left": (165.0, 20.0),
    "kidney_right": (165.0, 20.0),
    "aorta": (180.0, 30.0),
    "stomach": (25.0, 10.0),
    "pancreas": (85.0, 12.0),
}
# Painting order: later organs overwrite earlier ones where shapes touch.
ORGAN_ORDER = ("liver", "stomach", "pancreas", "spleen", "kidney_left", "kidney_right", "aorta")


EXTENT_MM = {
    "small": (150.0, 126.0, 100.0),
    "medium": (230.0, 190.0, 160.0),
    "study": (150.0, 126.0, 100.0),  # small volumes, more target cases (synthetic.SOURCES)
}


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _blob(
    grid: tuple[np.ndarray, ...],
    centre,
    radii,
    rng: np.random.Generator,
    max_deg: float = 20.0,
    wobble: float = 0.25,
) -> np.ndarray:
    """Mask of a randomly deformed, rotated ellipsoid. grid: 3 broadcastable mm coordinates."""
    rot = random_rotation(rng, max_deg)
    d = [g - c for g, c in zip(grid, centre, strict=True)]
    # q = R^T (p - c) / r, in the ellipsoid's own unit coordinates
    q = [(rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]) / radii[k] for k in range(3)]
    field = q[0] ** 2 + q[1] ** 2 + q[2] ** 2
    for _ in range(3):  # smooth shape deformation: a few low-frequency waves
        w = rng.normal(size=3) * rng.uniform(1.5, 3.5)
        field = field + wobble * rng.uniform(0.3, 1.0) * np.cos(
            w[0] * q[0] + w[1] * q[1] + w[2] * q[2] + rng.uniform(0, 2 * np.pi)
        )
    return field < 1.0


def _smooth_noise(shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    coarse = rng.normal(size=tuple(max(2, s // 8) for s in shape))
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape, strict=True)], order=1)
    field = ndimage.gaussian_filter(field, sigma / 8)
    return (field - field.mean()) / (field.std() + 1e-6)


def make_phantom(
    rng: np.random.Generator, size: str, spacing: tuple[float, float, float], noise_hu: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One phantom on a RAS grid. Returns image (X, Y, Z) float32 HU and organ masks."""
    extent = np.array(EXTENT_MM[size]) * rng.uniform(0.9, 1.1, size=3)
    shape = tuple(int(round(e / s)) for e, s in zip(extent, spacing, strict=True))
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    half = extent / 2
    # body: an elliptic cylinder (x: left-right, y: posterior-anterior, z: along the body)
    a, b = half[0] * rng.uniform(0.82, 0.94), half[1] * rng.uniform(0.75, 0.88)
    wave = 1 + 0.04 * np.cos(2 * np.arctan2(y, x) + rng.uniform(0, np.pi))
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2) / wave
    image = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), -1000.0, dtype=np.float32)
    fat, muscle = rng.uniform(0.08, 0.14), rng.uniform(0.05, 0.08)
    image[np.broadcast_to(r < 1, image.shape)] = -100.0 + rng.normal(0, 8)
    image[np.broadcast_to(r < 1 - fat, image.shape)] = 55.0 + rng.normal(0, 6)
    inner = np.broadcast_to(r < 1 - fat - muscle, image.shape)
    image[inner] = -90.0 + rng.normal(0, 8)
    clutter = _smooth_noise(image.shape, rng, 3.0)
    bowel = inner & (clutter > 0.4)
    image[bowel] = 30.0 + 25.0 * clutter[bowel]
    # spine: vertebral body and canal, posterior midline
    sy = -b * rng.uniform(0.55, 0.65)
    rs = min(a, b) * rng.uniform(0.16, 0.2)
    spine = np.broadcast_to(((x / rs) ** 2 + ((y - sy) / rs) ** 2) < 1, image.shape)
    image[spine] = rng.uniform(350, 500)
    cortex = spine & ~np.broadcast_to(
        ((x / (0.8 * rs)) ** 2 + ((y - sy) / (0.8 * rs)) ** 2) < 1, image.shape
    )
    image[cortex] = 800.0

    # organs: centres and radii relative to the body, jittered per case
    def j(v, s):
        return v + rng.normal(0, s)

    scale = rng.uniform(0.75, 1.3)
    spec = {
        "liver": (
            (j(0.35, 0.05) * a, j(0.1, 0.06) * b, j(0.2, 0.08) * half[2]),
            (0.38 * a, 0.55 * b, 0.45 * half[2]),
            0.25,
        ),
        "stomach": (
            (j(-0.25, 0.05) * a, j(0.3, 0.06) * b, j(0.3, 0.08) * half[2]),
            (0.2 * a, 0.22 * b, 0.25 * half[2]),
            0.3,
        ),
        "pancreas": (
            (j(-0.05, 0.04) * a, j(0.05, 0.04) * b, j(-0.05, 0.06) * half[2]),
            (0.3 * a, 0.08 * b, 0.1 * half[2]),
            0.3,
        ),
        "spleen": (
            (j(-0.55, 0.07) * a, j(-0.2, 0.08) * b, j(0.2, 0.12) * half[2]),
            (0.16 * a * scale, 0.24 * b * scale, 0.28 * half[2] * scale),
            0.35,
        ),
        "kidney_left": (
            (j(-0.38, 0.04) * a, j(-0.45, 0.05) * b, j(-0.3, 0.08) * half[2]),
            (0.11 * a, 0.13 * b, 0.22 * half[2]),
            0.15,
        ),
        "kidney_right": (
            (j(0.38, 0.04) * a, j(-0.45, 0.05) * b, j(-0.35, 0.08) * half[2]),
            (0.11 * a, 0.13 * b, 0.22 * half[2]),
            0.15,
        ),
        "aorta": (
            (j(-0.06, 0.02) * a, sy + rs * j(1.7, 0.1), 0.0),
            (0.045 * a, 0.045 * a, 2 * half[2]),
            0.05,
        ),
    }
    masks: dict[str, np.ndarray] = {}
    body = np.broadcast_to(r < 1 - fat - muscle, image.shape)
    for name in ORGAN_ORDER:
        centre, radii, wobble = spec[name]
        mask = _blob((x, y, z), centre, radii, rng, wobble=wobble) & body & ~spine
        mean, spread = ORGAN_HU[name]
        hu = rng.normal(mean, spread)
        image[mask] = hu + 6.0 * clutter[mask]
        if name == "stomach":  # a gas pocket at the anterior top of the lumen
            gas = mask & np.broadcast_to(y > centre[1] + 0.4 * radii[1], image.shape)
            image[gas] = -850.0
        for other in masks.values():
            other &= ~mask
        masks[name] = mask
    # partial volume blur, smooth intensity bias, scanner noise
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.5, 0.9))
    soft = (image > -300) & (image < 300)
    bias = 1.0 + 0.05 * _smooth_noise(image.shape, rng, 6.0)
    image[soft] *= bias[soft]
    image += rng.normal(0, noise_hu, size=image.shape).astype(np.float32)
    return image.astype(np.float32), masks
