"""Search-space files (``tune_spaces/*.yaml``): loading, validation, and Ray Tune spaces.

A space file names the data, the preset, fixed overrides of each stage, the resources per
trial, the scheduler and search algorithm, and the searched dimensions. Dimensions use one
flat vocabulary (the same names are MLflow params): the table in ``mixcl_ray.dimensions``.
Each is a constant or one of
{grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import tune_spaces
from mixcl_ray.config import load_yaml
from mixcl_ray.dimensions import DIMENSIONS

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
TOP_KEYS = {
    "description",
    "data",
    "preset",
    "experiment",
    "metric",
    "mode",
    "num_samples",
    "scheduler",
    "search",
    "search_seed",
    "resources",
    "pretrain",
    "finetune",
    "pretrain_cache",
    "space",
}
SPACES_DIR = Path(tune_spaces.__file__).resolve().parent  # package data: any install finds them


# ASHA settings a space leaves out (its rungs: epochs grace, grace x reduction, ...)
ASHA_DEFAULTS = {"grace_period": 2, "reduction_factor": 2}


@dataclass(frozen=True)
class SweepSpec:
    name: str
    space: dict
    data: str | None = None
    preset: str = "cpu-tiny"
    experiment: str = "mixcl_ray"
    metric: str = "val/dice_mean"
    mode: str = "max"
    num_samples: int = 1
    scheduler: dict = field(default_factory=lambda: {"type": "asha", **ASHA_DEFAULTS})
    search: str = "basic"  # basic (grid + random) | optuna
    # seeds the random sampling (basic) or Optuna's sampler: the same seed samples the same
    # configurations; null: a new draw each sweep
    search_seed: int | None = None
    resources: dict = field(
        default_factory=lambda: {"workers": 2, "gpus_per_worker": 0, "max_concurrent_trials": 1}
    )
    pretrain: dict = field(default_factory=dict)
    finetune: dict = field(default_factory=dict)
    description: str = ""
    # trials with the same pre-training config share one pre-training; false: each trial
    # pre-trains its own (the full-budget baseline of benchmarks/sweep_cost.py)
    pretrain_cache: bool = True


class SpaceError(ValueError):
    pass


def _check_dimension(path: str, name: str, value) -> None:
    if name not in DIMENSIONS:
        raise SpaceError(f"{path}: unknown dimension {name!r}; known: {sorted(DIMENSIONS)}")
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise SpaceError(
                f"{path}: {name}: a distribution is one of {list(DISTRIBUTIONS)}, got {value}"
            )
        dist, args = next(iter(value.items()))
        if dist in ("grid", "choice"):
            if not isinstance(args, list) or not args:
                raise SpaceError(f"{path}: {name}: {dist} needs a non-empty list, got {args!r}")
            values = args
        else:
            if (
                not isinstance(args, list)
                or len(args) != 2
                or not all(isinstance(a, int | float) for a in args)
            ):
                raise SpaceError(f"{path}: {name}: {dist} needs [low, high], got {args!r}")
            if args[0] >= args[1] or (dist == "loguniform" and args[0] <= 0):
                raise SpaceError(
                    f"{path}: {name}: {dist} bounds {args} must satisfy 0 < low < high"
                    if dist == "loguniform"
                    else f"{path}: {name}: {dist} bounds {args} must satisfy low < high"
                )
            values = args
    else:
        values = [value]
    for v in values:
        problem = DIMENSIONS[name].problem(v)
        if problem:
            raise SpaceError(f"{path}: {name}: {problem}")


def space_path(path: str | os.PathLike) -> Path:
    """A space file's path: ``path`` itself, or a name in ``tune_spaces/``."""
    path = Path(path)
    if not path.exists() and (SPACES_DIR / f"{path}.yaml").exists():
        return SPACES_DIR / f"{path}.yaml"
    return path


def load_space(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a space file; errors name the file and the key."""
    path = space_path(path)
    try:
        data = load_yaml(path.read_text())
    except OSError as err:
        raise SpaceError(f"cannot read space file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: a space file is a mapping")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise SpaceError(f"{path}: unknown keys {unknown}; known: {sorted(TOP_KEYS)}")
    space = data.get("space") or {}
    if not isinstance(space, dict) or not space:
        raise SpaceError(f"{path}: 'space' must map dimensions to values or distributions")
    for name, value in space.items():
        _check_dimension(str(path), name, value)
    if data.get("mode", "max") not in ("max", "min"):
        raise SpaceError(f"{path}: mode must be max or min")
    if data.get("search", "basic") not in ("basic", "optuna"):
        raise SpaceError(f"{path}: search must be basic or optuna")
    seed = data.get("search_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise SpaceError(
            f"{path}: search_seed must be a non-negative integer or null, got {seed!r}"
        )
    if not isinstance(data.get("pretrain_cache", True), bool):
        raise SpaceError(f"{path}: pretrain_cache must be true or false")
    sched = data.get("scheduler", {"type": "asha"})
    if not isinstance(sched, dict) or sched.get("type") not in ("asha", "none"):
        raise SpaceError(f"{path}: scheduler.type must be asha or none")
    bad = sorted(set(sched) - {"type", "grace_period", "reduction_factor", "max_t"})
    if bad:
        raise SpaceError(
            f"{path}: scheduler: unknown keys {bad}; known: grace_period, max_t, reduction_factor, type"
        )
    resources = {
        "workers": 2,
        "gpus_per_worker": 0,
        "max_concurrent_trials": 1,
        **(data.get("resources") or {}),
    }
    bad = sorted(set(resources) - {"workers", "gpus_per_worker", "max_concurrent_trials"})
    if bad:
        raise SpaceError(f"{path}: resources: unknown keys {bad}")
    fields = {k: v for k, v in data.items() if k not in ("space", "resources")}
    spec = SweepSpec(name=path.stem, space=space, resources=resources, **fields)
    _check_stage_overrides(spec, path)
    return spec


def _check_stage_overrides(spec: SweepSpec, path: Path) -> None:
    from mixcl_ray.config import load_config

    for stage in ("pretrain", "finetune"):
        try:
            load_config(stage, spec.preset, overrides=getattr(spec, stage) or None)
        except ValueError as err:
            raise SpaceError(f"{path}: {stage}: {err}") from None


def make_scheduler(spec):
    """ASHA on the per-epoch validation reports, or None.

    Tune's ASHA stops a trial as soon as it reports ``max_t`` iterations, which would cut a
    surviving trial off before its test score and its MLflow run are written. Unless the space
    asks for a shorter budget, ``max_t`` is therefore one past the last fine-tuning epoch: the
    rungs still lie within the fit, and a trial that passes them all finishes on its own.
    """
    from ray import tune

    from mixcl_ray.config import load_config

    if spec.scheduler.get("type") != "asha":
        return None
    epochs = load_config("finetune", spec.preset, overrides=spec.finetune or None).optim.epochs
    max_t = spec.scheduler.get("max_t")
    return tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",  # one report per epoch, counted from 1
        max_t=epochs + 1 if max_t is None or max_t >= epochs else max_t,
        **{k: spec.scheduler.get(k, v) for k, v in ASHA_DEFAULTS.items()},
    )


def make_search(spec: SweepSpec):
    """The Tune search algorithm of a space, seeded by ``search_seed`` when it is set and
    running at most ``resources.max_concurrent_trials`` trials at once (Tune ignores its own
    limit for a search algorithm it is given, so the limit lives here)."""
    limit = spec.resources["max_concurrent_trials"]
    if spec.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.search_seed), max_concurrent=limit)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=limit, random_state=spec.search_seed)


def to_tune_space(space: dict, search: str) -> dict:
    """The Ray Tune param_space of a validated space."""
    from ray import tune

    out = {}
    for name, value in space.items():
        if not isinstance(value, dict):
            out[name] = value
            continue
        dist, args = next(iter(value.items()))
        if dist == "grid" and search == "optuna":
            dist = "choice"  # Optuna samples; it cannot expand grids
        out[name] = (
            {"grid": tune.grid_search, "choice": tune.choice}.get(dist, None)(args)
            if dist in ("grid", "choice")
            else {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[
                dist
            ](*args)
        )
    return out
