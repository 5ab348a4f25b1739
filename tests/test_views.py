"""Patches, views and corruptions: inversion, statistics, determinism."""

import itertools

import numpy as np
import pytest
import torch

from mixcl_ray.data.corruptions import (
    CorruptionConfig,
    bezier_curve,
    corrupt,
    inpaint,
    local_shuffle,
    nonlinear_transform,
    outpaint,
)
from mixcl_ray.data.pairs import make_pretrain_example
from mixcl_ray.data.patches import (
    UNLABELLED,
    crop,
    crop_patches,
    offset_centres,
    sample_centres,
    sample_patches,
)
from mixcl_ray.data.views import (
    ViewConfig,
    apply_spatial,
    apply_warp,
    augment_intensity,
    gaussian_noise,
    invert_spatial,
    random_warp,
    unwarp,
)


@pytest.mark.parametrize(
    "flips, rot",
    list(
        itertools.product(
            [np.array(f, bool) for f in itertools.product([0, 1], repeat=3)], range(4)
        )
    ),
)
def test_inverse_puts_every_voxel_back(flips, rot):
    x = np.arange(2 * 6 * 6 * 4, dtype=np.float32).reshape(2, 6, 6, 4)
    view = apply_spatial(x, flips, rot)
    back = invert_spatial(torch.from_numpy(view)[None], torch.tensor([flips]), torch.tensor([rot]))[
        0
    ]
    assert np.array_equal(back.numpy(), x)


def _coordinates(shape) -> np.ndarray:
    """(3, X, Y, Z): each voxel's own coordinates, a map trilinear resampling keeps exact."""
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))


@pytest.mark.parametrize("shape", [(16, 16, 16), (24, 20, 16)])
def test_unwarp_puts_every_seen_voxel_back(shape):
    """A warped view's map, unwarped, is the patch's own map wherever the view saw the patch and
    its trilinear neighbours lie inside the patch; the voxels it did not see are flagged."""
    rng = np.random.default_rng(1)
    config = ViewConfig(rotate_degrees=20, zoom=0.2)
    x = _coordinates(shape)
    for _ in range(6):
        warp = random_warp(rng, config)
        view = apply_warp(x, warp)
        back, seen = unwarp(torch.from_numpy(view)[None], torch.from_numpy(warp)[None])
        # the view voxel each patch voxel comes from, and whether it lies inside the view
        c = ((np.asarray(shape) - 1) / 2)[:, None, None, None]
        q = np.einsum("ij,jxyz->ixyz", np.linalg.inv(warp), x - c) + c
        inside = np.all((q >= -1e-3) & (q <= np.asarray(shape)[:, None, None, None] - 1 + 1e-3), 0)
        assert np.array_equal(seen[0].numpy(), inside)
        # exact where every view voxel the trilinear lookup reads saw the patch itself
        interior = inside.copy()
        for corner in itertools.product([0, 1], repeat=3):
            n = np.floor(q) + np.asarray(corner)[:, None, None, None] - c
            hits = np.einsum("ij,jxyz->ixyz", warp, n)
            interior &= np.all(np.abs(hits) <= c + 1e-4, 0)
        assert interior.mean() > 0.3
        err = (back[0].numpy() - x)[:, interior]
        assert np.abs(err).max() < 1e-3, np.abs(err).max()
        assert view.shape == x.shape and view.dtype == x.dtype


def test_no_warp_is_the_identity_and_the_warps_stay_small():
    x = torch.from_numpy(_coordinates((8, 12, 16)))[None]
    back, seen = unwarp(x, torch.eye(3)[None])
    assert torch.allclose(back, x, atol=1e-4) and seen.all()
    rng = np.random.default_rng(0)
    config = ViewConfig(rotate_degrees=10, zoom=0.1)
    for _ in range(50):
        warp = random_warp(rng, config)
        scale = np.linalg.svd(warp, compute_uv=False)  # the inverse of the view's zoom
        assert (
            np.allclose(scale, scale[0], atol=1e-5) and 1 / 1.1 - 1e-5 <= scale[0] <= 1 / 0.9 + 1e-5
        )
        angle = np.degrees(np.arctan2(warp[1, 0], warp[0, 0]))
        assert abs(angle) <= 10 + 1e-4 and warp[2, 0] == warp[2, 1] == warp[0, 2] == 0
    with pytest.raises(ValueError, match="rotate_degrees"):
        ViewConfig(rotate_degrees=60)
    with pytest.raises(ValueError, match="zoom"):
        ViewConfig(zoom=0.5)


def test_warped_views_carry_their_warps_and_unwarped_embeddings_line_up():
    """Two warped views of an 'equivariant network' (the identity map) agree wherever both saw
    the patch, once mapped back; the default views draw no warp (their random streams are
    unchanged)."""
    from mixcl_ray.config import LossConfig
    from mixcl_ray.data.pairs import example_keys, loss_example

    shape = (16, 16, 16)
    patch = _coordinates(shape)[0] / 16  # a ramp along X
    views = ViewConfig(
        rotate_degrees=15, zoom=0.1, scale=(1, 1), shift=(0, 0), gamma=(1, 1), noise_std=0
    )
    ex = make_pretrain_example(
        patch, np.zeros(shape, np.uint8), np.random.default_rng(3), views, corruptions=None
    )
    assert ex["warp1"].shape == ex["warp2"].shape == (3, 3) and ex["warp1"].dtype == np.float32
    batch = {k: torch.from_numpy(np.asarray(v))[None] for k, v in ex.items()}
    back = []
    for v in ("1", "2"):
        flipped = invert_spatial(batch["input" + v], batch["flips" + v], batch["rot" + v])
        back.append(unwarp(flipped, batch["warp" + v]))
    (b1, s1), (b2, s2) = back
    both = (s1 & s2)[0]
    both[0], both[-1], both[:, 0], both[:, -1] = False, False, False, False  # edge interpolation
    assert both.float().mean() > 0.5
    assert torch.allclose(b1[0, 0][both], b2[0, 0][both], atol=1e-3)
    assert torch.allclose(b1[0, 0][both], torch.from_numpy(patch)[both], atol=1e-3)
    keys = loss_example(
        patch,
        np.zeros(shape, np.uint8),
        np.random.default_rng(3),
        views,
        CorruptionConfig(),
        LossConfig(),
    )
    assert set(keys) == set(example_keys(1, warped=True)) and {"warp1", "warp2"} <= set(keys)
    plain = make_pretrain_example(
        patch, np.zeros(shape, np.uint8), np.random.default_rng(3), corruptions=None
    )
    assert "warp1" not in plain


def test_voxel_correspondence_between_two_views():
    """Embeddings of an equivariant 'network' (identity map) agree voxel for voxel once mapped back."""
    rng = np.random.default_rng(0)
    patch = rng.random((8, 8, 8)).astype(np.float32)
    ex = make_pretrain_example(
        patch,
        np.zeros((8, 8, 8), np.uint8),
        rng,
        corruptions=None,
        views=ViewConfig(
            flip_prob=1.0, rotate=True, scale=(1, 1), shift=(0, 0), gamma=(1, 1), noise_std=0
        ),
    )
    batch = {k: torch.from_numpy(np.asarray(v))[None] for k, v in ex.items()}
    back1 = invert_spatial(batch["input1"], batch["flips1"], batch["rot1"])
    back2 = invert_spatial(batch["input2"], batch["flips2"], batch["rot2"])
    assert torch.allclose(back1[0, 0], torch.from_numpy(patch)) and torch.allclose(back1, back2)


@pytest.mark.parametrize("restored", [0, 1, 2])
def test_only_the_restored_views_are_corrupted(restored):
    rng = np.random.default_rng(3)
    patch = rng.random((16, 16, 16)).astype(np.float32)
    always = CorruptionConfig(nonlinear_prob=1.0, shuffle_prob=1.0, paint_prob=1.0)
    ex = make_pretrain_example(
        patch, np.zeros((16, 16, 16), np.uint8), rng, corruptions=always, restored=restored
    )
    for index, v in enumerate(("1", "2")):
        if index < restored:
            assert not np.array_equal(ex["input" + v], ex["clean" + v])
        else:
            assert ex["input" + v] is ex["clean" + v]  # not corrupted, not copied


def test_second_view_cropped_at_an_offset_carries_its_own_label():
    """ViewConfig.crop_offset: the second view is the crop at a centre moved by at most crop_offset
    voxels per axis, with that crop's label; without a second crop nothing changes (the same
    random draws, no label2)."""
    rng = np.random.default_rng(5)
    image = rng.random((40, 40, 40)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8)
    centres = np.array([[20, 20, 20]] * 200)
    moved = offset_centres(centres, 4, rng)
    offsets = moved - centres
    assert np.abs(offsets).max() == 4 and len({tuple(o) for o in offsets}) > 100
    plain = ViewConfig(scale=(1, 1), shift=(0, 0), gamma=(1, 1), noise_std=0)
    first = crop_patches(image, label, centres[:1], (16, 16, 16))
    second = crop_patches(image, label, moved[:1], (16, 16, 16))
    ex = make_pretrain_example(
        first[0][0], first[1][0], rng, plain, None, second=(second[0][0], second[1][0])
    )
    assert np.allclose(ex["clean1"][0], first[0][0], atol=1e-6)  # the identity intensity map
    assert np.allclose(ex["clean2"][0], second[0][0], atol=1e-6)
    assert np.array_equal(ex["label"], first[1][0])
    assert np.array_equal(ex["label2"], second[1][0])
    a = make_pretrain_example(image[:8, :8, :8], label[:8, :8, :8], np.random.default_rng(1))
    b = make_pretrain_example(image[:8, :8, :8], label[:8, :8, :8], np.random.default_rng(1))
    assert "label2" not in a and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="crop_offset must be an integer >= 0"):
        ViewConfig(crop_offset=-1)


def test_views_differ_in_intensity_independently():
    rng = np.random.default_rng(1)
    patch = rng.random((8, 8, 8)).astype(np.float32)
    ex = make_pretrain_example(
        patch,
        np.zeros((8, 8, 8), np.uint8),
        rng,
        corruptions=None,
        views=ViewConfig(flip_prob=0, rotate=False),
    )
    assert ex["clean1"].shape == (1, 8, 8, 8) and ex["clean1"].dtype == np.float32
    assert not np.allclose(ex["clean1"], ex["clean2"])
    # same geometry: strongly correlated; different intensity curves
    assert np.corrcoef(ex["clean1"].ravel(), ex["clean2"].ravel())[0, 1] > 0.8


def test_intensity_augmentation_ranges():
    rng = np.random.default_rng(2)
    x = np.linspace(0, 1, 1000, dtype=np.float32)
    y = augment_intensity(x, rng, ViewConfig(noise_std=0))
    assert np.all(np.diff(y) >= -1e-6)  # gamma, scale and shift keep the order
    assert y.min() > -0.2 and y.max() < 1.4


def test_intensity_augmentation_is_the_gamma_scale_shift_formula():
    x = np.random.default_rng(7).random((1, 8, 8, 8)).astype(np.float32) * 0.8 + 0.1
    config = ViewConfig(noise_std=0)
    y = augment_intensity(x, np.random.default_rng(1), config)
    rng = np.random.default_rng(1)
    gamma, scale, shift = (rng.uniform(*r) for r in (config.gamma, config.scale, config.shift))
    lo, hi = float(x.min()), float(x.max())
    want = (((x - lo) / (hi - lo)) ** gamma * (hi - lo) + lo) * scale + shift
    assert y.dtype == np.float32 and np.allclose(y, want, atol=1e-5)
    flat = augment_intensity(np.full((4, 4, 4), 0.3, np.float32), np.random.default_rng(1), config)
    assert np.allclose(flat, 0.3 * scale + shift)
    noisy = augment_intensity(x, np.random.default_rng(1), ViewConfig(noise_std=0.05))
    assert noisy.dtype == np.float32 and 0 < np.abs(noisy - y).mean() < 0.05


def test_gaussian_noise_windows():
    a = gaussian_noise((8, 16, 16), np.random.default_rng(4), 0.5)
    b = gaussian_noise((8, 16, 16), np.random.default_rng(4), 0.5)
    c = gaussian_noise((8, 16, 16), np.random.default_rng(5), 0.5)
    assert a.dtype == np.float32 and a.shape == (8, 16, 16)
    assert np.array_equal(a, b) and not np.allclose(a, c)  # seeded: reproducible, not constant
    big = gaussian_noise((64, 64, 64), np.random.default_rng(6), 2.0)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 2.0) < 0.02
    assert abs(np.corrcoef(a.ravel(), c.ravel())[0, 1]) < 0.1
    huge = gaussian_noise((2, 1 << 22), np.random.default_rng(7), 1.0)  # more than the bank
    assert huge.shape == (2, 1 << 22) and abs(huge.std() - 1.0) < 0.01


def test_rot90_needs_a_square_plane():
    with pytest.raises(ValueError, match="square"):
        apply_spatial(np.zeros((4, 6, 4)), np.zeros(3, bool), 1)


def test_nonlinear_curve_maps_unit_interval_monotonically():
    rng = np.random.default_rng(3)
    x = np.linspace(0, 1, 500, dtype=np.float32)
    for _ in range(20):
        y = nonlinear_transform(x, rng)
        d = np.diff(y)
        assert y.min() >= 0 and y.max() <= 1
        assert (d >= -1e-6).all() or (d <= 1e-6).all()


def test_tabulated_curve_matches_interpolating_the_bezier_points():
    x = np.random.default_rng(0).random((4, 32, 32, 32)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, 1.0, 0.5]
    for seed in range(100):
        xs, ys = bezier_curve(np.random.default_rng(seed))
        y = nonlinear_transform(x, np.random.default_rng(seed))  # the same curve
        error = np.abs(y - np.interp(x, xs, ys))
        assert y.dtype == np.float32 and y.shape == x.shape
        assert error.mean() < 1e-4 and error.max() < 0.01


def test_local_shuffle_permutes_within_blocks():
    rng = np.random.default_rng(4)
    x = rng.random((1, 16, 16, 16)).astype(np.float32)
    y = local_shuffle(x, rng, blocks=50, block_max=0.25)
    assert np.array_equal(np.sort(y.ravel()), np.sort(x.ravel()))  # the same values
    moved = (y != x).mean()
    assert 0.01 < moved < 0.9
    # voxels stay local: the blurred volumes still agree closely
    assert np.abs(y.mean(axis=(1, 2)) - x.mean(axis=(1, 2))).max() < 0.1


def test_painting_statistics():
    rng = np.random.default_rng(5)
    x = np.full((1, 24, 24, 24), 0.5, np.float32)
    changed_in = [(inpaint(x, rng) != x).mean() for _ in range(50)]
    changed_out = [(outpaint(x, rng) != x).mean() for _ in range(50)]
    assert 1 / 216 * 0.3 < min(changed_in) and max(changed_in) < 5 / 27 + 0.05
    assert min(changed_out) > 0.3 and max(changed_out) < 0.95


def test_corrupt_probabilities_and_determinism():
    x = np.random.default_rng(6).random((1, 16, 16, 16)).astype(np.float32)
    off = CorruptionConfig(nonlinear_prob=0, shuffle_prob=0, paint_prob=0)
    assert np.array_equal(corrupt(x, np.random.default_rng(0), off), x)
    on = CorruptionConfig()
    a = corrupt(x, np.random.default_rng(9), on)
    b = corrupt(x, np.random.default_rng(9), on)
    assert np.array_equal(a, b) and not np.array_equal(a, x)
    fractions = [(corrupt(x, np.random.default_rng(s), on) != x).mean() > 0 for s in range(40)]
    assert np.mean(fractions) > 0.9  # P(no corruption) = 0.1 * 0.5 * 0.1


def test_patch_centres_follow_the_pos_neg_ratio():
    label = np.zeros((30, 30, 30), np.uint8)
    label[10:14, 10:14, 10:14] = 2  # 64 of 27000 voxels
    rng = np.random.default_rng(7)
    centres = sample_centres(label, 2000, pos=1, neg=1, rng=rng)
    on_fg = label[tuple(centres.T)] > 0
    assert 0.45 < on_fg.mean() < 0.55
    assert (label[tuple(sample_centres(label, 200, 1, 0, rng).T)] > 0).all()
    assert (label[tuple(sample_centres(label, 200, 0, 1, rng).T)] == 0).all()


def test_patches_are_padded_and_unlabelled_stays_unlabelled():
    rng = np.random.default_rng(8)
    image = rng.random((10, 40, 20)).astype(np.float32)
    label = np.full(image.shape, UNLABELLED, np.uint8)
    images, labels = sample_patches(image, label, (16, 16, 16), 4, rng)
    assert images.shape == (4, 16, 16, 16) and labels.shape == (4, 16, 16, 16)
    assert (labels == UNLABELLED).all()
    assert (images[:, 10:] == image.min()).all()  # padding beyond the 10 voxels of x
    window = crop(np.arange(27).reshape(3, 3, 3), np.array([0, 0, 0]), (2, 2, 2), fill=-1)
    assert np.array_equal(window, np.arange(27).reshape(3, 3, 3)[:2, :2, :2])


def test_patches_are_the_crops_at_the_sampled_centres():
    rng = np.random.default_rng(0)
    label = np.zeros((20, 18, 9), np.uint8)
    label[5:9, 4:8, 2:5] = 3
    image = rng.random(label.shape, dtype=np.float32)
    one = sample_patches(image, label, (8, 8, 12), 5, np.random.default_rng(7))
    centres = sample_centres(label, 5, 1.0, 1.0, np.random.default_rng(7))
    two = crop_patches(image, label, centres, (8, 8, 12))
    assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
    assert two[0].shape == (5, 8, 8, 12) and two[1].dtype == np.uint8  # z padded to 12
