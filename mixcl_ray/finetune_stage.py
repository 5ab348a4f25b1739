"""Fine-tuning's side of the training engine: what every worker gets (``FinetuneJob``) and does
(``FinetuneStage``): the loss, the protocol's rates and moving average, validation and the
kept weights. ``mixcl_ray.finetune`` starts it."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mixcl_ray.engine import Stage, StageJob
from mixcl_ray.train_utils import autocast, gather, update_ema

BEST_FILE = "best_model.pt"
EMA_FILE = "ema_model.pt"  # the moving average of the weights, for a resumed fit


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneJob(StageJob):
    """What every fine-tuning worker gets besides the config."""

    class_names: tuple[str, ...]
    lut: tuple[int, ...]  # the source's label values -> the network's class indices
    data_dir: str
    val_ids: tuple[str, ...]
    pretrained: str | None  # the pre-trained weights' file
    model_card: dict  # what a prediction on a raw scan needs (mixcl_ray.predict)


class FinetuneStage(Stage):
    """DiceCE on the label fraction's patches, the loaded parts held and then ramped in; every
    rank keeps the same moving average of the weights (``ema_decay``), which is what validates:
    sliding-window Dice on this rank's share of the validation cases, gathered on every rank.
    Rank 0 keeps the selected weights (``selection``, on CPU) and writes them into every
    checkpoint, so the last checkpoint always has them and no local checkpoint folder has to
    outlive its upload."""

    loss_name = "DiceCE"

    def build(self):
        from monai.losses import DiceCELoss

        from data_prep.reader import load_case
        from mixcl_ray.models import SegmentationNet, load_pretrained

        job, cfg = self.job, self.cfg
        model = SegmentationNet(cfg.model, num_classes=len(job.class_names))
        self.load_report = None
        if job.pretrained:
            self.load_report = load_pretrained(model, job.pretrained, parts=cfg.pretrained_parts)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.best, self.best_weights, self.improved = {"dice": -1.0, "epoch": -1}, None, False
        self.ema, self.ema_state, self.ema_steps = None, None, 0
        lut = np.asarray(job.lut, dtype=np.uint8)
        self.val_cases = [
            dict(c, label=lut[c["label"]])
            for c in (load_case(job.data_dir, i) for i in job.val_ids[self.rank :: self.world])
        ]
        return model

    def scaled_parameters(self, model):
        parts = self.cfg.scaled_parts(bool(self.job.pretrained))
        loaded = self.cfg.pretrained_parts  # in a run from scratch too: the same schedule
        scale = self.cfg.pretrained_lr_scale if parts else 1.0
        return [p for part in loaded for p in getattr(model.backbone, part).parameters()], scale

    def scaled_hold_ramp(self):
        return self.cfg.encoder_hold_epochs, self.cfg.encoder_ramp_epochs

    def after_step(self, model):
        from mixcl_ray.models import unwrap

        if self.cfg.ema_decay:
            self.ema, self.ema_steps = update_ema(
                self.ema, unwrap(model), self.cfg.ema_decay, self.ema_steps, self.ema_state
            )

    def loss(self, model, batch, step):
        loss = self.loss_fn(model(batch["image"]), batch["label"].long())
        return loss, {"loss": loss}

    def epoch_metrics(self):
        if self.load_report is None:
            return {}
        return {"pretrained/loaded_tensors": len(self.load_report.loaded)}

    def validate(self, model, epoch):
        from mixcl_ray.evaluate import nan_mean, validate_cases

        cfg, names = self.cfg, self.job.class_names
        self.improved = False
        if (epoch + 1) % cfg.val_every and epoch != cfg.optim.epochs - 1:
            return {}
        model = self.ema if self.ema is not None else model
        results = {}
        for part in gather(
            validate_cases(
                model,
                self.val_cases,
                len(names),
                cfg.patches.patch_size,
                self.device,
                cfg.sw_batch_size,
                cfg.sw_overlap,
                autocast(self.device, cfg.scaling.amp),
            )
        ):
            results.update(part)
        per_case = np.stack([results[k] for k in sorted(results)])  # (cases, classes - 1)
        per_class = [nan_mean(per_case[:, c]) for c in range(per_case.shape[1])]
        metrics = {"val/dice_mean": nan_mean(per_class)}
        metrics.update({f"val/dice/{n}": d for n, d in zip(names[1:], per_class, strict=True)})
        self.improved = cfg.selection == "last" or metrics["val/dice_mean"] > self.best["dice"]
        if self.improved:
            self.best = {"dice": metrics["val/dice_mean"], "epoch": epoch}
            if self.rank == 0:
                weights = model.state_dict()
                self.best_weights = {
                    "model": {k: v.detach().cpu().clone() for k, v in weights.items()},
                    **self.best,
                }
        metrics["val/best_dice_mean"] = self.best["dice"]
        return metrics

    def restore(self, extra, folder):
        self.best, self.ema_steps = extra["best"], extra.get("ema_steps", 0)
        if (folder / EMA_FILE).exists():
            self.ema_state = torch.load(folder / EMA_FILE, map_location="cpu", weights_only=True)
        if self.rank == 0 and (folder / BEST_FILE).exists():
            self.best_weights = torch.load(
                folder / BEST_FILE, map_location="cpu", weights_only=True
            )

    def checkpoint_extra(self):
        return {"best": self.best, "ema_steps": self.ema_steps}

    def checkpoint_files(self, model):
        files = {}
        if self.ema is not None:
            ema = self.ema.state_dict()
            files[EMA_FILE] = lambda p: torch.save(ema, p)
        if self.best_weights is not None:
            with_card = {**self.best_weights, "card": self.job.model_card}
            files[BEST_FILE] = lambda p: torch.save(with_card, p)
        return files
