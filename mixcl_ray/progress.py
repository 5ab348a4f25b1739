"""A line per epoch on the terminal of a standalone ``pretrain`` or ``finetune``.

Ray Train reports to its controller, not to the driver, and the controller's output does not
reach the terminal. So a callback in the controller hands rank 0's metrics of each epoch to a
queue (a zero-CPU actor), and a thread of the driver prints them:

    finetune epoch 3/6  loss 0.4123  val Dice 0.7310  17.5 patches/s  left 1m05s
"""

from __future__ import annotations

import sys
import threading
import time

from mixcl_ray.tracking import _train_callback_base


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def epoch_line(stage: str, metrics: dict, epochs: int, seconds_per_epoch: float | None) -> str:
    """One epoch's line: its losses, validation Dice (when validated), speed and time left."""
    epoch = int(metrics.get("epoch", 0)) + 1
    parts = [f"{stage} epoch {epoch}/{epochs}"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    terms = sorted(k for k in metrics if k.startswith("train/loss_"))
    if terms:
        parts.append(" ".join(f"{k[len('train/loss_') :]} {metrics[k]:.4f}" for k in terms))
    if "val/dice_mean" in metrics:
        parts.append(f"val Dice {metrics['val/dice_mean']:.4f}")
    if "train/patches_per_s" in metrics:
        parts.append(f"{metrics['train/patches_per_s']:.1f} patches/s")
    if seconds_per_epoch is not None:
        parts.append(f"left {_duration(seconds_per_epoch * (epochs - epoch))}")
    return "  ".join(parts)


class _QueueCallback(_train_callback_base()):
    """Runs in Ray Train's controller: rank 0's metrics of each report onto the queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics[0])


class EpochLines:
    """``with EpochLines("finetune", epochs) as lines: run_finetuning(..., callbacks=[lines.callback])``
    prints a line per epoch while the fit runs (Ray must be initialised)."""

    def __init__(self, stage: str, epochs: int, out=None):
        self.stage, self.epochs, self.out = stage, epochs, out or sys.stdout
        self._stop = threading.Event()

    def __enter__(self) -> EpochLines:
        from ray.util.queue import Queue

        self._queue = Queue(actor_options={"num_cpus": 0})
        self.callback = _QueueCallback(self._queue)
        self._thread = threading.Thread(target=self._print, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._queue.shutdown()

    def _print(self) -> None:
        from ray.util.queue import Empty

        arrivals: list[float] = []
        while True:
            try:
                metrics = self._queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue went away with its cluster: no more lines
                return
            arrivals.append(time.monotonic())
            per_epoch = None
            if len(arrivals) > 1:  # the driver's clock between reports, start-up left out
                per_epoch = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
            elif "time/train_s" in metrics:  # the first epoch: its own timings
                per_epoch = sum(metrics.get(f"time/{k}_s", 0.0) for k in ("train", "val", "save"))
            print(
                epoch_line(self.stage, metrics, self.epochs, per_epoch), file=self.out, flush=True
            )
