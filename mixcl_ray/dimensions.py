"""The sweep dimensions: one table (name -> stage, config field, type, check) that validates a
space file's values, turns a trial's sample into each stage's overrides, names the MLflow params
of every run and documents the vocabulary (``python -m mixcl_ray.tune --help``).

Adding a dimension is one row here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixcl_ray.config import DENSE_SOURCES, METHODS, deep_merge, method_weights, to_dict


def _fraction(value) -> str | None:
    return None if 0 <= value <= 1 else f"{value} is not in [0, 1]"


def _whole(minimum: int = 0, what: str = "whole number"):
    """The check of a whole-number dimension: at least ``minimum``."""

    def check(value) -> str | None:
        ok = value >= minimum and value == int(value)
        return None if ok else f"{value!r} is not a {what} >= {minimum}"

    return check


def _view_setting(field: str):
    """The check of a ``ViewConfig`` field: the config's own validation, so the ranges live in
    one place."""

    def check(value) -> str | None:
        from mixcl_ray.data.views import ViewConfig

        try:
            ViewConfig(**{field: value})
        except ValueError as err:
            return str(err)
        return None

    return check


@dataclass(frozen=True)
class Dimension:
    name: str
    stage: str  # "pretrain", "finetune" or "both"; "" for method (it picks the pre-training)
    field: str  # dotted path in the stage's config
    kind: type
    doc: str
    choices: tuple = ()
    check: Any = None  # value -> an error message, or None
    default: Any = None  # set when a sample leaves it out (None: the stage's own setting)
    absent: Any = ""  # the param of a run without that stage (scratch has no pre-training)

    def problem(self, value) -> str | None:
        """What is wrong with one value of this dimension (None: nothing)."""
        if self.kind in (float, int) and (
            not isinstance(value, int | float) or isinstance(value, bool)
        ):
            return f"{value!r} is not a number"
        if self.choices and value not in self.choices:
            return f"{value!r} is not one of {list(self.choices)}"
        return self.check(value) if self.check else None


DIMENSIONS: dict[str, Dimension] = {
    d.name: d
    for d in (
        Dimension(
            "method", "", "", str, "which loss terms pre-train (scratch: none)", tuple(METHODS)
        ),
        Dimension("l_id", "pretrain", "loss.l_id", float, "identity term weight", absent=0.0),
        Dimension("l_label", "pretrain", "loss.l_label", float, "label term weight", absent=0.0),
        Dimension(
            "l_rec", "pretrain", "loss.l_rec", float, "reconstruction term weight", absent=0.0
        ),
        Dimension("temperature_id", "pretrain", "loss.temperature_id", float, "identity tau"),
        Dimension(
            "gather_negatives",
            "pretrain",
            "loss.gather_negatives",
            bool,
            "identity negatives gathered from every worker's batch",
            (False, True),
        ),
        Dimension("temperature_label", "pretrain", "loss.temperature_label", float, "label tau"),
        Dimension(
            "pretrain_label_fraction",
            "pretrain",
            "pretrain_label_fraction",
            float,
            "share of the labelled pre-training cases whose labels are used",
            check=_fraction,
        ),
        Dimension(
            "label_fraction",
            "finetune",
            "label_fraction",
            float,
            "share of the target's labelled training cases fine-tuned on",
            check=_fraction,
            default=1.0,
        ),
        Dimension(
            "label_subset",
            "finetune",
            "label_subset",
            int,
            "which seeded nested subset of labelled cases the fraction is drawn from",
            check=_whole(),
        ),
        Dimension("seed", "both", "optim.seed", int, "seed of both stages", default=0),
        Dimension("lr", "finetune", "optim.lr", float, "fine-tuning learning rate"),
        Dimension("pretrain_lr", "pretrain", "optim.lr", float, "pre-training learning rate"),
        Dimension(
            "pretrain_epochs",
            "pretrain",
            "optim.epochs",
            int,
            "pre-training epochs (the pre-training budget)",
            check=_whole(1),
            absent=0,
        ),
        Dimension(
            "crop_offset",
            "pretrain",
            "views.crop_offset",
            int,
            "voxels between the two views' crops",
            check=_whole(0, "whole number of voxels"),
        ),
        Dimension(
            "rotate_degrees",
            "pretrain",
            "views.rotate_degrees",
            float,
            "each view's in-plane rotation, up to +/- this many degrees",
            check=_view_setting("rotate_degrees"),
        ),
        Dimension(
            "zoom",
            "pretrain",
            "views.zoom",
            float,
            "each view's scale, in [1 - zoom, 1 + zoom]",
            check=_view_setting("zoom"),
        ),
        Dimension(
            "dense_source",
            "pretrain",
            "model.dense_source",
            str,
            "where the label term's voxel embeddings come from",
            DENSE_SOURCES,
        ),
        Dimension(
            "pretrained_lr_scale",
            "finetune",
            "pretrained_lr_scale",
            float,
            "learning rate of the loaded parameters, x lr",
        ),
    )
}


def _nested(path: str, value) -> dict:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _read(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config


def stage_overrides(stage: str, sample: dict, fixed: dict) -> dict | None:
    """The overrides of ``stage`` ("pretrain" or "finetune") that a trial's sample asks for, on
    top of the space's fixed ones; None for the pre-training of scratch. The method's loss
    weights come first, so that l_id, l_label and l_rec in the sample override them."""
    over = dict(fixed)
    if stage == "pretrain":
        weights = method_weights(sample.get("method", "mixcl"))
        if weights is None:
            return None
        over = deep_merge(over, {"loss": weights})
    for d in DIMENSIONS.values():
        if d.stage not in (stage, "both") or (d.name not in sample and d.default is None):
            continue
        value = sample.get(d.name, d.default)
        over = deep_merge(over, _nested(d.field, int(value) if d.kind is int else value))
    return over


def trial_params(
    sample: dict, pre_cfg, ft_cfg, *, preset: str, fingerprint: str, pretrained=None
) -> dict:
    """The flat params every trial run carries: every dimension (as the configs resolved it)
    and what else tells two trials apart. ``pretrained``: whether fine-tuning starts from
    pre-trained weights (default: whether there is a pre-training config)."""
    pretrained = bool(pre_cfg) if pretrained is None else pretrained
    params = {"method": sample.get("method", "mixcl")}
    for d in DIMENSIONS.values():
        if d.field:
            config = pre_cfg if d.stage == "pretrain" else ft_cfg
            params[d.name] = _read(config, d.field) if config is not None else d.absent
    if not ft_cfg.scaled_parts(pretrained):
        params["pretrained_lr_scale"] = ""  # one rate for every parameter
    return {
        **params,
        "finetune_epochs": ft_cfg.optim.epochs,
        "load_decoder": ft_cfg.load_decoder if pretrained else "",
        "preset": preset,
        "data_fingerprint": fingerprint[:16],
        "workers": ft_cfg.scaling.workers,
    }


def pretrain_params(pre_cfg, key: str, *, preset: str, fingerprint: str) -> dict:
    """The params of a pre-training run: its loss settings and what else tells two cached
    pre-trainings apart (seed, views, corpus, schedule), so that the runs of a multi-seed
    study can be told apart in MLflow."""
    return {
        "cache_key": key,
        "preset": preset,
        "data_fingerprint": fingerprint[:16],
        **to_dict(pre_cfg.loss),
        "epochs": pre_cfg.optim.epochs,
        "seed": pre_cfg.optim.seed,
        "lr": pre_cfg.optim.lr,
        "crop_offset": pre_cfg.views.crop_offset,
        "rotate_degrees": pre_cfg.views.rotate_degrees,
        "zoom": pre_cfg.views.zoom,
        "dense_source": pre_cfg.model.dense_source,
        "pretrain_label_fraction": pre_cfg.pretrain_label_fraction,
        "target_images": pre_cfg.target_images,
        "patch_size": "x".join(str(s) for s in pre_cfg.patches.patch_size),
        "batch_size": pre_cfg.patches.batch_size,
        "workers": pre_cfg.scaling.workers,
    }


def markdown() -> str:
    """The dimensions as a Markdown table (``--dimensions``, the docs)."""
    rows = ["| dimension | sets | type | what |", "|---|---|---|---|"]
    for d in DIMENSIONS.values():
        where = f"{d.stage}: `{d.field}`" if d.field else "the pre-training's loss terms"
        kind = " / ".join(map(str, d.choices)) if d.choices else d.kind.__name__
        rows.append(f"| `{d.name}` | {where} | {kind} | {d.doc} |")
    return "\n".join(rows)
