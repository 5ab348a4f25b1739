"""Fine-tuning's protocol, every method alike (docs/method.md): augmentation that anatomy allows,
the moving average of the weights, and their settings. The held-then-ramped rate of the loaded
parts is tested with the optimiser groups (test_spaces_report.py), a resumed fit with all of it
in test_training.py."""

import numpy as np
import pytest
import torch

from mixcl_ray.config import AugmentConfig, load_config
from mixcl_ray.data.augment import augment_patches
from mixcl_ray.train_utils import update_ema


def organ_on_the_left(count: int = 4, side: int = 24):
    """Patches with a box-shaped "organ" (label 1, image 100, background 0) left of centre."""
    labels = np.zeros((count, side, side, side), np.uint8)
    labels[:, 3:10, 6:18, 6:18] = 1
    return labels.astype(np.float32) * 100, labels


def test_augmentation_off_changes_nothing():
    images, labels = organ_on_the_left()
    still = AugmentConfig(intensity_scale=0, intensity_shift=0, rotate_deg=0, zoom=0)
    out_images, out_labels = augment_patches(images, labels, still, np.random.default_rng(0))
    assert np.array_equal(out_images, images) and np.array_equal(out_labels, labels)
    assert out_images.dtype == np.float32 and out_labels.dtype == np.uint8


def test_augmentation_moves_image_and_label_together_and_never_mirrors():
    images, labels = organ_on_the_left(count=16)
    aug = AugmentConfig(intensity_scale=0, intensity_shift=0, rotate_deg=10, zoom=0.1)
    out_images, out_labels = augment_patches(images, labels, aug, np.random.default_rng(1))
    assert set(np.unique(out_labels)) <= {0, 1}  # nearest: no new label values
    assert not np.array_equal(out_labels, labels)  # it moved
    for image, label in zip(out_images, out_labels, strict=True):
        assert abs(int(label.sum()) - int(labels[0].sum())) < 0.4 * labels[0].sum()
        # the image moved with its label: above half the organ's value where the label is
        agree = ((image > 50) == (label == 1)).mean()
        assert agree > 0.98, agree
        x = np.nonzero(label)[0]
        assert x.mean() < (label.shape[0] - 1) / 2  # still left of centre: no mirroring
    again = augment_patches(images, labels, aug, np.random.default_rng(1))
    assert np.array_equal(again[0], out_images) and np.array_equal(again[1], out_labels)


def test_intensity_augmentation_scales_and_shifts_each_patch_within_its_bounds():
    images, labels = organ_on_the_left(count=64)
    aug = AugmentConfig(intensity_scale=0.1, intensity_shift=0.2, rotate_deg=0, zoom=0)
    out_images, out_labels = augment_patches(images, labels, aug, np.random.default_rng(2))
    assert np.array_equal(out_labels, labels)
    background = out_images[:, 0, 0, 0]  # 0 * scale + shift
    organ = out_images[:, 5, 10, 10]  # 100 * scale + shift
    scale = (organ - background) / 100
    assert np.all(np.abs(background) <= 0.2) and np.all(np.abs(scale - 1) <= 0.1 + 1e-6)
    assert background.std() > 0.05 and scale.std() > 0.03  # drawn per patch
    per_patch = out_images.reshape(64, -1)
    assert np.allclose(
        per_patch[:, :1] + 100 * scale[:, None] * (labels.reshape(64, -1) == 1),
        per_patch,
        atol=1e-3,
    )


def test_the_moving_average_starts_as_a_copy_and_follows_with_a_rising_decay():
    model = torch.nn.Linear(3, 1)
    ema, steps = update_ema(None, model, 0.99, 0)
    assert steps == 1 and ema is not model and not ema.weight.requires_grad
    assert torch.equal(ema.weight, model.weight)
    expected = model.weight.detach().clone()
    for step in range(2, 40):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema, steps = update_ema(ema, model, 0.99, steps)
        decay = min(0.99, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * model.weight.detach()
    assert steps == 39 and torch.allclose(ema.weight, expected)
    assert (ema.weight < model.weight).all()  # behind the trained weights, as an average is


def test_a_resumed_moving_average_goes_on_from_its_saved_state():
    model = torch.nn.Linear(3, 1)
    saved = {"weight": torch.full((1, 3), 7.0), "bias": torch.zeros(1)}
    ema, steps = update_ema(None, model, 0.5, 10, state=saved)
    # decay min(0.5, 12/21) = 0.5: halfway between the saved state and the weights
    assert steps == 11
    assert torch.allclose(ema.weight, 0.5 * saved["weight"] + 0.5 * model.weight.detach())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"selection": "peak"}, "selection must be"),
        ({"ema_decay": 1.0}, "ema_decay must be"),
        ({"encoder_hold_epochs": -1}, "encoder_hold_epochs"),
        ({"augment": {"zoom": 1.5}}, "augment:"),
        ({"augment": {"flip": True}}, "flip"),
    ],
)
def test_protocol_settings_are_checked(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("finetune", overrides=override)


def test_the_protocol_is_on_by_default_for_every_method():
    config = load_config("finetune")
    assert config.augment.moves and config.augment.intensity_scale > 0
    assert config.encoder_hold_epochs > 0 and config.ema_decay > 0 and config.selection == "last"
    paper = load_config("finetune", preset="paper")
    assert paper.augment == config.augment and paper.selection == "last"
