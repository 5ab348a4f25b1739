"""The per-epoch line of standalone pretrain and finetune (no Ray: the line's content)."""

from mixcl_ray.progress import _duration, epoch_line


def test_a_fine_tuning_line_has_loss_dice_speed_and_time_left():
    metrics = {
        "epoch": 2,
        "train/loss": 0.41234,
        "val/dice_mean": 0.731,
        "train/patches_per_s": 17.46,
    }
    line = epoch_line("finetune", metrics, 6, 21.7)
    assert line == "finetune epoch 3/6  loss 0.4123  val Dice 0.7310  17.5 patches/s  left 1m05s"


def test_a_pre_training_line_names_every_loss_term_and_skips_what_is_not_there():
    metrics = {"epoch": 0, "train/loss": 2.5, "train/loss_identity": 1.25, "train/loss_label": 0.5}
    line = epoch_line("pretrain", metrics, 3, None)
    assert line == "pretrain epoch 1/3  loss 2.5000  identity 1.2500 label 0.5000"


def test_time_left_reads_in_seconds_minutes_or_hours():
    assert [_duration(s) for s in (0, 59.4, 60, 3599, 3600, 7385)] == [
        "0s",
        "59s",
        "1m00s",
        "59m59s",
        "1h00m",
        "2h03m",
    ]
