"""Move pre-trained encoder/decoder weights into a segmentation network, with every key and
shape checked and a report of what loaded and what did not (as nnU-Net's
``load_pretrained_weights`` does). DDP (``.module``) and torch.compile (``._orig_mod``)
wrappers are looked through on both sides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from data_prep.locations import open_for_torch

PARTS = ("encoder", "decoder")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            hasattr(model, "module")
            and isinstance(model.module, nn.Module)
            and type(model).__name__.endswith("DataParallel")
        ):
            model = model.module
        else:
            return model


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network, absent from the checkpoint
    unexpected: list[str] = field(
        default_factory=list
    )  # in the checkpoint, absent from the network
    shape_mismatch: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "shape_mismatch"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
                lines.append(f"{name.replace('_', ' ')}: {len(keys)} ({shown})")
        return "; ".join(lines)


def pretrained_state(model: nn.Module, parts: tuple[str, ...] = PARTS) -> dict[str, torch.Tensor]:
    """Backbone tensors of the given parts, keyed ``encoder.*`` / ``decoder.*``."""
    backbone = unwrap(model).backbone
    state = {}
    for part in parts:
        for key, value in getattr(backbone, part).state_dict().items():
            state[f"{part}.{key}"] = value.detach().cpu().clone()
    return state


def save_pretrained(model: nn.Module, path: str | os.PathLike, config: dict | None = None) -> None:
    """Write the encoder and decoder weights (and the model config) to ``path`` atomically."""
    payload = {
        "format": "mixcl_ray.pretrained/1",
        "config": config or {},
        "state": pretrained_state(model),
    }
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_pretrained(
    model: nn.Module,
    source: str | os.PathLike | dict,
    parts: tuple[str, ...] = PARTS,
    strict: bool = True,
    copy: bool = True,
) -> LoadReport:
    """Copy ``parts`` of a pre-trained backbone into ``model.backbone``.

    ``source``: a file from ``save_pretrained`` (a path or object-store URI) or a state dict keyed
    ``encoder.*``/``decoder.*``.
    Every key of the requested parts is checked in both directions and by shape; with
    ``strict`` any mismatch raises before anything is copied. ``copy`` false only checks and
    reports (``model`` may then live on the meta device: nothing is allocated).
    """
    if isinstance(source, dict) and "state" not in source:
        state = source
    else:
        payload = (
            source
            if isinstance(source, dict)
            else torch.load(open_for_torch(source), map_location="cpu", weights_only=True)
        )
        state = payload["state"]
    backbone = unwrap(model).backbone
    report = LoadReport()
    targets: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in getattr(backbone, part).state_dict().items():
            targets[f"{part}.{key}"] = value
    wanted = {k: v for k, v in state.items() if k.split(".", 1)[0] in parts}
    report.missing = sorted(set(targets) - set(wanted))
    report.unexpected = sorted(set(wanted) - set(targets))
    report.shape_mismatch = sorted(
        f"{k}: checkpoint {tuple(wanted[k].shape)} vs network {tuple(targets[k].shape)}"
        for k in set(targets) & set(wanted)
        if wanted[k].shape != targets[k].shape
    )
    if strict and not report.ok:
        raise ValueError(f"pre-trained weights do not fit the network: {report.summary()}")
    with torch.no_grad():
        for key in sorted(set(targets) & set(wanted)):
            if wanted[key].shape == targets[key].shape:
                if copy:
                    targets[key].copy_(wanted[key])
                report.loaded.append(key)
    return report
