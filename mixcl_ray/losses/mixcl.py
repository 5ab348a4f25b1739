"""The MixCL loss: l_id * L_identity + l_label * L_label + l_rec * L_reconstruction.

Our reconstruction of the paper's objective (arXiv 2203.02114, public only as an abstract:
identity, label and reconstruction consistency kept together). A zero weight skips the term's
computation (and its heads, see ``heads``); every computed term is returned for logging; a
non-finite term stops training with its name and the step.
"""

from __future__ import annotations

import torch
from torch import nn

from mixcl_ray.config import LossConfig
from mixcl_ray.losses.identity import IdentityConsistencyLoss
from mixcl_ray.losses.label import LabelConsistencyLoss, sample_voxels
from mixcl_ray.losses.reconstruction import ReconstructionConsistencyLoss


class NonFiniteLossError(FloatingPointError):
    pass


class MixCLLoss(nn.Module):
    def __init__(self, config: LossConfig):
        super().__init__()
        if config.l_id == config.l_label == config.l_rec == 0:
            raise ValueError("at least one of l_id, l_label, l_rec must be > 0")
        self.config = config
        self.identity = IdentityConsistencyLoss(config.temperature_id, config.gather_negatives)
        self.label = LabelConsistencyLoss(config.temperature_label)
        self.reconstruction = ReconstructionConsistencyLoss(config.reconstruction)

    @property
    def heads(self) -> tuple[str, ...]:
        """The model heads the active terms need."""
        c = self.config
        return tuple(
            h
            for h, w in (("global", c.l_id), ("dense", c.l_label), ("reconstruction", c.l_rec))
            if w > 0
        )

    def label_term(self, out1, out2, batch, generator=None, diagnostics=None) -> torch.Tensor:
        """Supervised contrast of voxels sampled per annotated class from both views.
        ``diagnostics`` (a dict), when given, gets ``label_excess``: the term minus its floor
        (``label_floor``), only for a batch with labelled voxels."""
        c = self.config
        # views cropped apart carry a label each (ViewConfig.crop_offset)
        view_labels = (batch["label"], batch["label2"]) if "label2" in batch else batch["label"]
        if "voxel_valid" in out1:  # warped views: only the voxels a view saw
            view_labels = seen_labels(view_labels, out1["voxel_valid"], out2["voxel_valid"])
        embeddings, labels, annotated = sample_voxels(
            (out1["voxel_embeddings"], out2["voxel_embeddings"]),
            view_labels,
            batch["annotated"],
            c.voxels_per_class,
            c.background_voxels,
            generator,
        )
        loss, floor = self.label.loss_and_floor(embeddings, labels, annotated)
        if diagnostics is not None and floor is not None:
            diagnostics["label_excess"] = loss.detach() - floor
        return loss

    def reconstruction_term(self, out1, out2, batch) -> torch.Tensor:
        """The mean over the views that were reconstructed (MixCL restores the first view only,
        see ``view_outputs``)."""
        restored = [
            self.reconstruction(out["reconstruction"], batch[f"clean{v}"])
            for out, v in ((out1, "1"), (out2, "2"))
            if "reconstruction" in out
        ]
        return sum(restored) / len(restored)

    def forward(
        self,
        out1: dict[str, torch.Tensor],
        out2: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        step: int | None = None,
        generator: torch.Generator | None = None,
        diagnostics: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """out1/out2: model outputs of the two views, ``voxel_embeddings`` already mapped back
        to the patch frame (B, E, X, Y, Z); batch: ``clean1``/``clean2`` (B, 1, X, Y, Z),
        ``label`` (B, X, Y, Z) and ``annotated`` (B, K) bool. Returns ``loss`` and each term;
        ``diagnostics``, when given, gets what is not a term (see ``label_term``)."""
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        if c.l_id > 0:
            terms["identity"] = self.identity(out1["global_embedding"], out2["global_embedding"])
        if c.l_label > 0:
            terms["label"] = self.label_term(out1, out2, batch, generator, diagnostics)
        if c.l_rec > 0:
            terms["reconstruction"] = self.reconstruction_term(out1, out2, batch)
        for name, value in terms.items():
            if not torch.isfinite(value):
                where = f" at step {step}" if step is not None else ""
                raise NonFiniteLossError(
                    f"non-finite {name} consistency loss ({value.item()}){where}: lower the learning "
                    "rate, raise the temperature or check the input patches"
                )
        weights = {"identity": c.l_id, "label": c.l_label, "reconstruction": c.l_rec}
        loss = sum(weights[name] * value for name, value in terms.items())
        if not (torch.is_tensor(loss) and loss.requires_grad):
            # nothing to learn from this batch (e.g. label consistency alone on a batch without
            # labelled voxels): a zero still connected to the outputs, so that every DDP rank
            # runs its backward pass and the gradients are zeros rather than missing
            loss = loss + sum(
                0.0 * v.sum() for v in (*out1.values(), *out2.values()) if v.requires_grad
            )
        terms["loss"] = loss
        return terms


def seen_labels(labels, valid1: torch.Tensor, valid2: torch.Tensor):
    """The label term's labels with the voxels a warped view did not see marked unlabelled: per
    view when the views are cropped apart (a tuple of labels), else where either view did not
    see them (both views' voxels are drawn at the same locations)."""
    from mixcl_ray.losses.label import UNLABELLED

    def keep(label, valid):
        return torch.where(valid, label, torch.full_like(label, UNLABELLED))

    if isinstance(labels, tuple):
        return keep(labels[0], valid1), keep(labels[1], valid2)
    return keep(labels, valid1 & valid2)


def view_outputs(
    model: nn.Module, heads: tuple[str, ...], batch: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both views' outputs from one forward pass of ``model`` (a ``MixCLModel``, DDP-wrapped or
    not): ``(out1, out2)`` for ``MixCLLoss``.

    The reconstruction head restores the corrupted inputs (``input1``/``input2``). When a
    contrastive head (global, dense) is asked for as well (MixCL), the contrastive heads see the
    clean views (``clean1``/``clean2``) and only the first view's corrupted input is restored:
    3B patches in one pass, where each term alone needs 2B. On corrupted views, even on one of
    the two, the identity term collapsed to its chance value, ln(2B - 1), with every global
    embedding the same; on clean views it learns.
    """
    both = "reconstruction" in heads and len(heads) > 1
    keys = ("clean1", "clean2", "input1") if both else ("input1", "input2")
    flips = [batch["flips" + k[-1]] for k in keys]
    rots = [batch["rot" + k[-1]] for k in keys]
    warps = torch.cat([batch["warp" + k[-1]] for k in keys]) if "warp1" in batch else None
    out = model(
        torch.cat([batch[k] for k in keys]), heads, torch.cat(flips), torch.cat(rots), warps
    )
    b = batch["input1"].shape[0]

    def part(name: str, view: int) -> torch.Tensor:
        block = 2 if both and name == "reconstruction" else view
        return out[name][block * b : (block + 1) * b]

    return tuple(
        {name: part(name, view) for name in out if not (both and name == "reconstruction" and view)}
        for view in (0, 1)
    )
