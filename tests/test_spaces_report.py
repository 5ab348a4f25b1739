"""Search-space validation and the report on a real local MLflow store with known runs."""

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from mixcl_ray import tracking, tracking_access
from mixcl_ray.report import collect, make_report, summarise, with_curves
from mixcl_ray.spaces import SPACES_DIR, SpaceError, load_space, make_search, to_tune_space

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


@pytest.mark.parametrize(
    "name",
    [
        "demo",
        "ablation",
        "label_efficiency",
        "spleen",
        "btcv",
        "search",
        "finetune_search",
        "cropped_views",
        "mixcl_balance",
        "encoder_label_term",
        "pretrained_lr",
        "label_efficiency_slow_encoder",
        "scratch_slow_encoder",
        "view_geometry",
    ],
)
def test_shipped_spaces_are_valid(name):
    spec = load_space(SPACES / f"{name}.yaml")
    assert spec.name == name and spec.space
    assert load_space(name).space == spec.space  # found by name too


@pytest.mark.parametrize(
    "text, message",
    [
        ("space: {method: mixcl}\nschedular: {type: asha}\n", "unknown keys ['schedular']"),
        ("space: {methd: mixcl}\n", "unknown dimension 'methd'"),
        ("space: {method: {grid: [scratch, simclr]}}\n", "method: 'simclr' is not one of"),
        ("space: {lr: {normal: [0, 1]}}\n", "a distribution is one of"),
        ("space: {lr: {loguniform: [0, 0.1]}}\n", "0 < low < high"),
        ("space: {l_id: {uniform: [2, 1]}}\n", "low < high"),
        ("space: {label_fraction: 1.5}\n", "not in [0, 1]"),
        ("space: {seed: {grid: []}}\n", "non-empty list"),
        ("space: {}\n", "'space' must map"),
        (
            "space: {seed: 0}\nfinetune: {optim: {epoch: 3}}\n",
            "finetune: FinetuneConfig.optim: unknown keys ['epoch']",
        ),
        ("space: {seed: 0}\nscheduler: {type: hyperband}\n", "scheduler.type"),
        ("space: [1, 2\n", "not valid YAML"),
        ("space: {seed: 0}\nsearch_seed: 1.5\n", "search_seed must be a non-negative integer"),
        ("space: {crop_offset: {grid: [0, 2.5]}}\n", "crop_offset: 2.5 is not a whole number"),
        ("space: {dense_source: bottleneck}\n", "dense_source: 'bottleneck' is not one of"),
        ("space: {pretrain_epochs: {grid: [3, 0]}}\n", "pretrain_epochs: 0 is not a whole number"),
    ],
)
def test_space_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert message in str(info.value) and "bad.yaml" in str(info.value)


def test_asha_lets_a_surviving_trial_finish_its_fit(tmp_path):
    """Tune's ASHA stops a trial that reports max_t iterations; with max_t equal to the epochs
    the best trial would be cut off before its test score, so max_t is one past them."""
    from mixcl_ray.spaces import make_scheduler

    path = tmp_path / "asha.yaml"
    body = "space: {seed: 0}\nfinetune: {optim: {epochs: 6}}\nscheduler: "
    path.write_text(body + "{type: asha, grace_period: 1, reduction_factor: 2}\n")
    asha = make_scheduler(load_space(path))
    assert asha._max_t == 7
    assert max(b._rungs[0][0] for b in asha._brackets) <= 6  # every rung within the fit
    path.write_text(body + "{type: asha, max_t: 2}\n")  # a shorter budget is kept
    assert make_scheduler(load_space(path))._max_t == 2
    path.write_text(body + "{type: none}\n")
    assert make_scheduler(load_space(path)) is None


def test_numbers_written_like_1e_3_are_numbers_in_space_and_config_files(tmp_path):
    from mixcl_ray.config import load_config

    config = tmp_path / "finetune.yaml"
    config.write_text("optim: {lr: 1e-3, weight_decay: 2E-5}\n")
    optim = load_config("finetune", path=config).optim
    assert (optim.lr, optim.weight_decay) == (0.001, 2e-5)
    space = tmp_path / "lr.yaml"
    space.write_text(
        "space: {lr: {loguniform: [1e-4, 1e-2]}, seed: 0}\nfinetune: {optim: {lr: 3e-3}}\n"
    )
    spec = load_space(space)
    assert spec.space["lr"] == {"loguniform": [1e-4, 1e-2]}
    assert spec.finetune["optim"]["lr"] == 0.003


def test_report_reads_the_store_under_storage_as_every_command_names_it(tmp_path, capsys):
    from mixcl_ray.report import main

    assert main(["--storage", str(tmp_path), "--experiment", "no-such-study"]) == 2
    assert (tmp_path / "mlflow.db").exists()  # the sweep's own local store
    assert "no-such-study" in capsys.readouterr().err


def _sampled_configs(spec, storage) -> list[dict]:
    """The configurations a real Tune run of ``spec``'s search draws (a trivial trainable)."""
    from ray import tune

    tuner = tune.Tuner(
        lambda config: {"score": 0.0},
        param_space=to_tune_space(spec.space, spec.search),
        tune_config=tune.TuneConfig(search_alg=make_search(spec), num_samples=spec.num_samples),
        run_config=tune.RunConfig(storage_path=str(storage), verbose=0),
    )
    return sorted((r.config for r in tuner.fit()), key=lambda c: (c["seed"], c["lr"], c["l_id"]))


def test_search_seed_draws_the_same_configurations(ray_session, tmp_path):
    """The same ``search_seed`` samples the same trials (the two sweeps of
    benchmarks/sweep_cost.py compare like with like); another seed samples others; the search
    itself carries the concurrency limit, which Tune ignores for a search it is given."""
    path = tmp_path / "seeded.yaml"
    body = (
        "num_samples: 3\nresources: {max_concurrent_trials: 2}\n"
        "space: {seed: {grid: [0, 1]}, lr: {loguniform: [1.0e-4, 1.0e-2]}, "
        "l_id: {uniform: [0, 2]}}\n"
    )
    path.write_text(body + "search_seed: 7\n")
    spec = load_space(path)
    first = _sampled_configs(spec, tmp_path / "a")
    assert len(first) == 6 and len({c["lr"] for c in first}) == 6
    assert _sampled_configs(spec, tmp_path / "b") == first
    path.write_text(body + "search_seed: 8\n")
    assert _sampled_configs(load_space(path), tmp_path / "c") != first
    assert make_search(spec).max_concurrent == 2


def test_tune_space_conversion():
    space = to_tune_space(
        {"method": {"grid": ["scratch", "mixcl"]}, "lr": {"loguniform": [1e-4, 1e-2]}, "seed": 3},
        "basic",
    )
    assert space["method"] == {"grid_search": ["scratch", "mixcl"]} and space["seed"] == 3
    assert 1e-4 <= space["lr"].sample() <= 1e-2
    assert not isinstance(to_tune_space({"method": {"grid": ["a", "b"]}}, "optuna")["method"], dict)


KNOWN = [
    ("scratch", 0.05, 0, 0.30),
    ("scratch", 0.05, 1, 0.40),
    ("mixcl", 0.05, 0, 0.50),
    ("mixcl", 0.05, 1, 0.60),
    ("scratch", 1.0, 0, 0.80),
    ("mixcl", 1.0, 0, 0.81),
]


@pytest.fixture()
def known_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "known", tmp_path / "artifacts")
    parent = tracking.start_run(uri, exp, "sweep", {"mixcl.stage": "sweep"}, {"space": "test"})
    for method, fraction, seed, dice in KNOWN:
        run = tracking.start_run(
            uri,
            exp,
            f"{method}",
            {"mixcl.stage": "trial"},
            {"method": method, "label_fraction": fraction, "seed": seed},
            parent_id=parent,
        )
        for epoch, val in enumerate((dice - 0.1, dice + 0.01, dice)):  # rises, then falls back
            tracking.log_metrics(uri, run, {"val/dice_mean": val}, step=epoch)
        tracking.log_metrics(
            uri, run, {"test/dice_mean": dice, "val/best_dice_mean": dice + 0.01}, step=2
        )
        tracking.end_run(uri, run)
    stopped = tracking.start_run(
        uri,
        exp,
        "stopped",
        {"mixcl.stage": "trial"},
        {"method": "mixcl", "label_fraction": 0.05, "seed": 2},
        parent_id=parent,
    )
    tracking.log_metrics(uri, stopped, {"test/dice_mean": 0.0}, step=0)
    tracking.end_run(uri, stopped, "KILLED")  # early-stopped trials are not results
    return uri, parent


def test_report_on_known_runs(known_store, tmp_path):
    uri, parent = known_store
    text, plot = make_report(uri, "known", tmp_path / "report")
    assert "| scratch | 0.350 ± 0.050 (n=2) | 0.800 (n=1) |" in text
    assert "| mixcl | 0.550 ± 0.050 (n=2) [+0.200] | 0.810 (n=1) [+0.010] |" in text
    assert text.endswith("\nfine-tuned on: not recorded")  # runs from before the tag
    # paired with scratch by seed: +0.2 on both seeds at 5 %, one pair at 100 %
    assert "| mixcl | 5 % | 2 | +0.200 | [+0.200, +0.200] | better than scratch |" in text
    assert "| mixcl | 100 % | 1 | +0.010 | | one pair: no interval |" in text
    assert plot.exists() and plot.stat().st_size > 1000
    assert (tmp_path / "report/report.md").read_text().strip() == text.strip()
    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "report")}
    assert logged == {
        "report/report.md",
        "report/paired.json",
        "report/label_efficiency.png",
        "report/validation_curves.png",
    }
    assert (tmp_path / "report/validation_curves.png").stat().st_size > 1000
    # each trial's curve is its validation Dice per epoch, in epoch order
    rows = with_curves(uri, collect(uri, "known")[0])
    assert len(rows) == len(KNOWN)
    for row in rows:
        dice = row["test"]
        assert [epoch for epoch, _ in row["curve"]] == [0, 1, 2]
        assert [val for _, val in row["curve"]] == pytest.approx([dice - 0.1, dice + 0.01, dice])


def test_a_sweep_over_a_view_setting_is_reported_by_arm(tmp_path):
    """Trials logged as a sweep over rotate_degrees logs them: the report reads the dimension
    from each run's params and gives each MixCL arm its own row and its own pairs."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "arms", tmp_path / "artifacts")
    parent = tracking.start_run(uri, exp, "sweep", {"mixcl.stage": "sweep"}, {"space": "t"})
    trials = [("scratch", "", s, 0.3 + 0.1 * s) for s in (0, 1)]
    trials += [
        ("mixcl", r, s, 0.3 + 0.1 * s + (0.2 if r else 0.05)) for r in (0, 10) for s in (0, 1)
    ]
    for method, rotate, seed, dice in trials:
        params = {"method": method, "label_fraction": 0.05, "seed": seed, "rotate_degrees": rotate}
        run = tracking.start_run(uri, exp, method, {"mixcl.stage": "trial"}, params, parent)
        tracking.log_metrics(uri, run, {"test/dice_mean": dice}, step=0)
        tracking.end_run(uri, run)
    rows, _ = collect(uri, "arms")
    assert sorted({r["method"] for r in rows}) == [
        "mixcl rotate_degrees=0",
        "mixcl rotate_degrees=10",
        "scratch",
    ]
    text, _ = make_report(uri, "arms", tmp_path / "report")
    assert "| mixcl rotate_degrees=10 | 5 % | 2 | +0.200 | [+0.200, +0.200] | better" in text
    assert "| mixcl rotate_degrees=0 | 5 % | 2 | +0.050 | [+0.050, +0.050] | better" in text
    assert "| scratch | 5 % | 2 runs | mean 0.350 |" in text


def test_differences_inside_the_spread_are_marked():
    rows = [{"method": "scratch", "label_fraction": 0.05, "test": v} for v in (0.2, 0.6)]
    rows += [{"method": "mixcl", "label_fraction": 0.05, "test": v} for v in (0.3, 0.7)]
    from mixcl_ray.report import render_table

    summary = summarise(rows)
    assert math.isclose(summary["mixcl"][0.05][0], 0.5)
    assert "within spread" in render_table(summary)


def test_secrets_never_become_params():
    assert tracking.flat_params(
        {"db_password": "x", "aws_secret_key": "y", "l_label": 1.0, "lr": 0.1}
    ) == {"l_label": "1.0", "lr": "0.1"}
    assert tracking.flat_params({"cache_key": "abc", "store": "postgresql://u:pw@db/mlflow"}) == {
        "cache_key": "abc",
        "store": "postgresql://***@db/mlflow",
    }
    assert tracking_access.safe_uri("http://user:pw@host:5000") == "http://***@host:5000"
    assert tracking_access.split_credentials("https://me:p%40ss@host:5000/mlflow") == (
        "https://host:5000/mlflow",
        "me",
        "p@ss",
    )
    assert tracking_access.split_credentials("sqlite:////tmp/a@b/mlflow.db")[1] is None


def test_optuna_search_samples_the_space_and_tune_keeps_the_constants():
    """``search: optuna`` (needs ``pip install optuna``): grids become choices, the searcher
    samples every distribution, and Tune merges the constants back into each trial's config."""
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.search_generator import merge_dicts

    spec = load_space("search")
    space = to_tune_space({**spec.space, "seed": {"grid": [0, 1]}}, "optuna")
    searcher = OptunaSearch(metric=spec.metric, mode=spec.mode)
    assert searcher.set_search_properties(spec.metric, spec.mode, space)
    for trial in ("a", "b"):
        config = merge_dicts(space, searcher.suggest(trial))
        assert config["method"] == "mixcl" and config["label_fraction"] == 0.05
        assert config["seed"] in (0, 1) and 0.05 <= config["temperature_id"] <= 0.5
        assert 0.0 <= config["l_rec"] <= 2.0
        searcher.on_trial_complete(trial, {spec.metric: 0.5})


def test_sweep_cost_variants_and_the_cache_switch(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sweep_cost import variants

    space = yaml.safe_load((SPACES_DIR / "demo.yaml").read_text())
    both = variants(space, 1, 3)
    assert both["asha+cache"]["scheduler"] == {
        "type": "asha",
        "grace_period": 1,
        "reduction_factor": 3,
    }
    assert both["full budget"]["scheduler"] == {"type": "none"}
    assert both["asha+cache"]["pretrain_cache"] is True
    assert both["full budget"]["pretrain_cache"] is False
    assert both["full budget"]["space"] == space["space"]
    assert both["full budget"]["search_seed"] == both["asha+cache"]["search_seed"] == 0
    seeded = variants({**space, "search_seed": 5}, 1, 3)
    assert {v["search_seed"] for v in seeded.values()} == {5}
    for name, variant in both.items():  # each is a valid space file
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(variant))
        assert load_space(path).pretrain_cache is variant["pretrain_cache"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**space, "pretrain_cache": "sometimes"}))
    with pytest.raises(SpaceError, match="pretrain_cache must be true or false"):
        load_space(bad)


def test_a_late_failure_keeps_the_status_the_sweep_driver_gave(tmp_path):
    """A trial stopped by the scheduler is closed as KILLED by the sweep driver; its thread may
    fail afterwards, when its Train run is torn down, and must not turn it into FAILED."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "late", tmp_path / "artifacts")
    stopped = tracking.start_run(uri, exp, "stopped", {"mixcl.stage": "trial"})
    tracking.end_run(uri, stopped, "KILLED")
    tracking.fail_run(uri, stopped, RuntimeError("controller died"))
    broken = tracking.start_run(uri, exp, "broken", {"mixcl.stage": "trial"})
    tracking.fail_run(uri, broken, ValueError("bad case spleen_3"))
    client = MlflowClient(uri)
    assert client.get_run(stopped).info.status == "KILLED"
    assert "mixcl.error" not in client.get_run(stopped).data.tags
    assert client.get_run(broken).info.status == "FAILED"
    assert client.get_run(broken).data.tags["mixcl.error"] == "ValueError: bad case spleen_3"


def test_trial_key_changes_with_any_fixed_stage_setting():
    """Two sweeps whose spaces differ only in a fixed ``finetune:`` (or ``pretrain:``) override
    must not share a trial key: the key names the MLflow run and the fine-tuning folder a trial
    resumes or reuses."""
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import trial_params
    from mixcl_ray.trial import trial_key

    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    sample = {"method": "mixcl", "label_fraction": 0.05, "seed": 0}

    def key(pre_over=None, ft_over=None):
        pre = load_config("pretrain", overrides=pre_over or {})
        ft = load_config("finetune", overrides={"label_fraction": 0.05, **(ft_over or {})})
        return trial_key(trial_params(sample, pre, ft, **ctx), pre, ft)

    base = key()
    assert key() == base  # stable: a resumed trial finds its run and folder again
    assert key(ft_over={"min_patches_per_epoch": "full"}) != base
    assert key(ft_over={"patches": {"patch_size": [48, 48, 48]}}) != base
    assert key(pre_over={"views": {"noise_std": 0.05}}) != base


def test_crop_offset_dimension_sets_the_pretraining_views_and_is_a_param():
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import stage_overrides, trial_params

    fixed = {"views": {"gamma": [0.9, 1.1]}}
    over = stage_overrides("pretrain", {"method": "mixcl", "crop_offset": 6}, fixed)
    assert over["views"] == {"gamma": [0.9, 1.1], "crop_offset": 6}
    pre = load_config("pretrain", overrides=over)
    assert pre.views.crop_offset == 6 and pre.views.gamma == (0.9, 1.1)
    ft = load_config("finetune")
    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    assert trial_params({"method": "mixcl"}, pre, ft, **ctx)["crop_offset"] == 6
    assert trial_params({"method": "scratch"}, None, ft, **ctx)["crop_offset"] == ""
    assert stage_overrides("pretrain", {"method": "scratch", "crop_offset": 6}, {}) is None


def test_pretrain_epochs_dimension_sets_the_pretraining_budget_and_is_a_param():
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import stage_overrides, trial_params

    fixed = {"optim": {"epochs": 3, "lr": 0.01}}
    over = stage_overrides("pretrain", {"method": "mixcl", "pretrain_epochs": 12}, fixed)
    pre = load_config("pretrain", overrides=over)
    assert pre.optim.epochs == 12 and pre.optim.lr == 0.01
    assert (
        load_config("pretrain", overrides=stage_overrides("pretrain", {}, fixed)).optim.epochs == 3
    )
    ft = load_config("finetune")
    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    assert trial_params({"method": "mixcl"}, pre, ft, **ctx)["pretrain_epochs"] == 12
    assert trial_params({"method": "scratch"}, None, ft, **ctx)["pretrain_epochs"] == 0
    finetune = stage_overrides("finetune", {"method": "mixcl", "pretrain_epochs": 12}, {})
    assert "epochs" not in finetune.get("optim", {})


def test_dense_source_dimension_sets_the_pretraining_model_and_is_a_param():
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import stage_overrides, trial_params

    fixed = {"model": {"dense_dim": 16}}
    over = stage_overrides("pretrain", {"method": "label", "dense_source": "encoder"}, fixed)
    pre = load_config("pretrain", overrides=over)
    assert (pre.model.dense_source, pre.model.dense_dim) == ("encoder", 16)
    ft = load_config("finetune")
    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    assert trial_params({"method": "label"}, pre, ft, **ctx)["dense_source"] == "encoder"
    assert trial_params({"method": "scratch"}, None, ft, **ctx)["dense_source"] == ""
    default = load_config(
        "pretrain", overrides=stage_overrides("pretrain", {"method": "mixcl"}, {})
    )
    assert default.model.dense_source == "decoder"


def test_gather_negatives_dimension_reaches_the_identity_loss_and_is_a_param(tmp_path):
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import stage_overrides, trial_params
    from mixcl_ray.losses import MixCLLoss
    from mixcl_ray.spaces import load_space

    over = stage_overrides("pretrain", {"method": "identity", "gather_negatives": True}, {})
    pre = load_config("pretrain", overrides=over)
    assert pre.loss.gather_negatives and MixCLLoss(pre.loss).identity.gather
    assert not MixCLLoss(load_config("pretrain").loss).identity.gather  # off by default
    ft = load_config("finetune")
    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    assert trial_params({"method": "identity"}, pre, ft, **ctx)["gather_negatives"] is True
    space = tmp_path / "bad.yaml"
    space.write_text("space:\n  gather_negatives: {grid: [true, 2]}\n")
    with pytest.raises(ValueError, match="gather_negatives"):
        load_space(space)


def test_concurrent_trials_share_the_cpus_between_them():
    """On CPU, each of ``max_concurrent_trials`` trials sizes its workers on its part of the
    cluster (two trials' 1-CPU workers on 2 CPUs would leave Ray Data none: a hang); one
    trial at a time, a GPU or an explicit ``cpus_per_worker`` keeps the stage's own sizing."""
    from mixcl_ray.trial import trial_scaling

    ctx = {"workers": 1, "gpus_per_worker": 0, "max_concurrent_trials": 2}
    assert trial_scaling(ctx, {}, 2) == {"workers": 1, "use_gpu": False, "cpus_per_worker": 0.5}
    assert trial_scaling({**ctx, "workers": 2}, None, 2)["cpus_per_worker"] == 0.25
    assert trial_scaling({**ctx, "max_concurrent_trials": 4}, {}, 16)["cpus_per_worker"] == 2
    for alone in (
        {**ctx, "max_concurrent_trials": 1},
        {k: ctx[k] for k in ("workers", "gpus_per_worker")},
    ):
        assert "cpus_per_worker" not in trial_scaling(alone, {}, 2)  # the stage's default
    assert "cpus_per_worker" not in trial_scaling({**ctx, "gpus_per_worker": 1}, {}, 2)
    explicit = {"scaling": {"cpus_per_worker": 0.75}}
    assert "cpus_per_worker" not in trial_scaling(ctx, explicit, 2)  # the stage's own value stays


def test_test_scoring_uses_the_trials_share_of_the_cpus(monkeypatch):
    """After its fit, a trial scores the test split on the CPUs the fit held: the cluster's
    over the trials at once, at least one, at most this node's."""
    from mixcl_ray import scoring

    monkeypatch.setattr(scoring.os, "cpu_count", lambda: 8)
    assert scoring.scoring_threads(2, 1) == 2
    assert scoring.scoring_threads(2, 2) == 1
    assert scoring.scoring_threads(2, 4) == 1
    assert scoring.scoring_threads(64, 2) == 8  # a cluster: this node's CPUs at most
    assert scoring.scoring_threads(6, 0) == 6


def test_pretraining_runs_carry_what_tells_two_pretrainings_apart():
    # two cached pre-trainings of a multi-seed study differ in their seed (and views): their
    # MLflow runs must say so, not only their loss weights
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import pretrain_params, stage_overrides

    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    runs = []
    for seed, offset in ((0, 0), (1, 0), (1, 6)):
        over = stage_overrides(
            "pretrain", {"method": "mixcl", "seed": seed, "crop_offset": offset}, {}
        )
        pre = load_config("pretrain", overrides=over)
        runs.append(pretrain_params(pre, f"key-{seed}", **ctx))
    assert [r["seed"] for r in runs] == [0, 1, 1]
    assert [r["crop_offset"] for r in runs] == [0, 0, 6]
    assert runs[0]["l_label"] == 1.0 and runs[0]["temperature_id"] == 0.1
    assert runs[0]["patch_size"] == "32x32x32" and runs[0]["data_fingerprint"] == "f" * 16


@pytest.mark.slow
def test_a_new_sweep_of_a_space_trains_its_trials_anew(ray_session, prepared_benchmark, tmp_path):
    """Two sweeps of one space in one storage, the second without ``--resume``: its trial is
    trained again from its first epoch, in a fine-tuning folder of its own sweep. (The folder
    was named by the trial key alone, so the second sweep's fine-tuning found the first one's
    finished run, trained nothing and reported nothing, and Tune stopped the whole sweep.)
    Only the pre-training cache is shared between sweeps.

    Then the second sweep as if its driver had been lost while the trial scored the test split
    (its run still RUNNING, nothing of it in Tune's state): ``--resume`` finds the fine-tuning
    finished, so its epochs come from the checkpoint into the new run and to Tune."""
    from mlflow import MlflowClient

    from mixcl_ray.tune import run_sweep

    space = tmp_path / "twice.yaml"
    space.write_text(
        "preset: cpu-tiny\nexperiment: twice\nmetric: val/dice_mean\nmode: max\n"
        "scheduler: {type: none}\n"
        "resources: {workers: 1, gpus_per_worker: 0, max_concurrent_trials: 1}\n"
        "finetune: {optim: {epochs: 1}, min_patches_per_epoch: 8, patches: {patches_per_case: 4}}\n"
        "space: {method: scratch, label_fraction: 1.0, seed: 0}\n"
    )
    storage = tmp_path / "runs"
    sweeps = []
    for _ in range(2):
        results, _, _, uri = run_sweep(space, data=prepared_benchmark, storage=storage)
        assert not results.errors
        (result,) = results
        assert result.metrics["epoch"] == 0 and "val/dice_mean" in result.metrics
        sweeps.append(result)
        time.sleep(1.1)  # a sweep is named by the second it starts
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("twice")
    trials = client.search_runs([exp.experiment_id], "tags.`mixcl.stage` = 'trial'")
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FINISHED"}
    assert len({t.data.tags["mixcl.trial_key"] for t in trials}) == 1  # the same cell twice
    for t in trials:  # each trained its epoch, test score included
        history = client.get_metric_history(t.info.run_id, "val/dice_mean")
        assert [m.step for m in history] == [0] and "test/dice_mean" in t.data.metrics
    folders = sorted(p.relative_to(storage / "finetune") for p in storage.glob("finetune/*/*"))
    assert len(folders) == 2 and folders[0].name == folders[1].name != folders[0].parent.name

    state = json.loads((storage / "tune" / "twice.latest.json").read_text())
    (lost,) = [t for t in trials if t.data.tags[tracking.PARENT_TAG] == state["parent_run_id"]]
    client.update_run(lost.info.run_id, status="RUNNING")
    shutil.rmtree(storage / "tune" / state["name"])
    results, _, _, _ = run_sweep(space, data=prepared_benchmark, storage=storage, resume=True)
    assert not results.errors and results[0].metrics["epoch"] == 0
    assert client.get_run(lost.info.run_id).info.status == "KILLED"
    (resumed,) = [
        t
        for t in client.search_runs([exp.experiment_id], "tags.`mixcl.stage` = 'trial'")
        if t.data.tags.get("mixcl.resumed_from") == lost.info.run_id
    ]
    assert resumed.info.status == "FINISHED" and "test/dice_mean" in resumed.data.metrics
    history = client.get_metric_history(resumed.info.run_id, "val/dice_mean")
    assert [(m.step, m.value) for m in history] == [
        (0, lost.data.metrics["val/dice_mean"])
    ]  # the epoch its checkpoint recorded


def test_pretrained_lr_scale_slows_the_loaded_parameters_only():
    """``pretrained_lr_scale``: the loaded parameters train at that multiple of the rate, the
    schedule scaling both groups alike; at 1 (the default) both groups have one rate. As a
    space dimension it sets the fine-tuning and is a param ("" for scratch, nothing loaded)."""
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import stage_overrides, trial_params
    from mixcl_ray.models import SegmentationNet
    from mixcl_ray.train_utils import build_optimizer, build_scheduler

    ft = load_config(
        "finetune", overrides=stage_overrides("finetune", {"pretrained_lr_scale": 0.1}, {})
    )
    assert ft.pretrained_lr_scale == 0.1 and load_config("finetune").pretrained_lr_scale == 1
    net = SegmentationNet(ft.model, 2)
    loaded = list(net.backbone.encoder.parameters())
    optimizer = build_optimizer(net, ft.optim, loaded, ft.pretrained_lr_scale)
    fast, slow = optimizer.param_groups
    assert {id(p) for p in slow["params"]} == {id(p) for p in loaded}
    assert len(fast["params"]) + len(slow["params"]) == len(list(net.parameters()))
    scheduler = build_scheduler(optimizer, ft.optim, steps_per_epoch=10)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
        main, pre = scheduler.get_last_lr()
        assert pre == pytest.approx(0.1 * main) and main > 0
    alike = build_optimizer(net, ft.optim, loaded, 1.0).param_groups
    assert [group["lr"] for group in alike] == [ft.optim.lr, ft.optim.lr]
    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    pre = load_config("pretrain")
    assert trial_params({"method": "mixcl"}, pre, ft, **ctx)["pretrained_lr_scale"] == 0.1
    assert trial_params({"method": "scratch"}, None, ft, **ctx)["pretrained_lr_scale"] == ""
    with pytest.raises(ValueError, match="pretrained_lr_scale must be > 0"):
        load_config("finetune", overrides={"pretrained_lr_scale": 0})


def test_the_loaded_parts_are_held_then_ramped_in_while_the_rest_follows_the_schedule():
    """Fine-tuning's protocol: the second group (the loaded parts) learns at rate 0 for
    ``encoder_hold_epochs``, then rises linearly over ``encoder_ramp_epochs`` to the rate of
    the schedule, which the first group follows from step 0."""
    from mixcl_ray.config import OptimConfig
    from mixcl_ray.train_utils import build_optimizer, build_scheduler

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    optim = OptimConfig(epochs=4, lr=1.0, warmup_epochs=0)
    optimizer = build_optimizer(net, optim, list(net[0].parameters()), 0.5)
    scheduler = build_scheduler(optimizer, optim, steps_per_epoch=4, hold_ramp=(1.0, 1.0))
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    main, loaded = zip(*rates, strict=True)
    assert loaded[:4] == (0.0,) * 4 and min(main[:4]) > 0.9  # held while the rest learns
    ramp = [loaded[k] / (0.5 * main[k]) for k in range(4, 12)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])  # then in step with it
    single = build_optimizer(net, optim)  # no second group: the schedule alone
    assert len(build_scheduler(single, optim, 4, hold_ramp=(1.0, 1.0)).get_last_lr()) == 1


def test_scale_scratch_slows_a_fresh_encoder_as_a_control():
    """``scale_scratch``: a run from scratch trains the parts a pre-trained run would load at
    ``pretrained_lr_scale`` (the control for a slower encoder); without it scratch has one rate,
    and a pre-trained run's parts are the loaded ones either way."""
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import trial_params

    plain = load_config("finetune", overrides={"pretrained_lr_scale": 0.1})
    control = load_config("finetune", overrides={"pretrained_lr_scale": 0.1, "scale_scratch": True})
    both = load_config("finetune", overrides={"scale_scratch": True, "load_decoder": True})
    assert plain.scaled_parts(pretrained=False) == ()
    assert plain.scaled_parts(pretrained=True) == ("encoder",)
    assert control.scaled_parts(pretrained=False) == ("encoder",)
    assert both.scaled_parts(pretrained=False) == ("encoder", "decoder")
    ctx = {"preset": "cpu-tiny", "fingerprint": "f" * 64}
    assert trial_params({"method": "scratch"}, None, control, **ctx)["pretrained_lr_scale"] == 0.1
    assert trial_params({"method": "scratch"}, None, plain, **ctx)["pretrained_lr_scale"] == ""


def test_every_dimension_sets_its_stage_field_and_is_a_param():
    """The dimension table drives the overrides and the params: a value of each dimension lands
    in its stage's config and comes back as the param of the same name."""
    from mixcl_ray.config import load_config
    from mixcl_ray.dimensions import DIMENSIONS, markdown, stage_overrides, trial_params

    values = {"float": 0.25, "int": 3}
    for d in DIMENSIONS.values():
        if not d.field:
            continue
        value = d.choices[-1] if d.choices else values[d.kind.__name__]
        sample = {"method": "mixcl", d.name: value}
        pre = load_config("pretrain", overrides=stage_overrides("pretrain", sample, {}))
        ft = load_config("finetune", overrides=stage_overrides("finetune", sample, {}))
        params = trial_params(sample, pre, ft, preset="cpu-tiny", fingerprint="f" * 64)
        assert params[d.name] == value, d.name
        stages = [pre, ft] if d.stage == "both" else [pre if d.stage == "pretrain" else ft]
        for config in stages:
            for part in d.field.split("."):
                config = getattr(config, part)
            assert config == value, d.name
        assert f"| `{d.name}` |" in markdown()
    # the method's weights first, a sampled weight over them; scratch has no pre-training
    over = stage_overrides("pretrain", {"method": "label", "l_rec": 0.5}, {"loss": {"l_id": 2}})
    assert over["loss"] == {"l_id": 0.0, "l_label": 1.0, "l_rec": 0.5}
    assert stage_overrides("pretrain", {"method": "scratch", "l_rec": 0.5}, {}) is None
    assert stage_overrides("finetune", {}, {})["label_fraction"] == 1.0  # defaults apply


def test_the_report_names_each_cells_best_model_chosen_on_validation():
    from mixcl_ray.report import best_models

    rows = [
        # seed 1 scores higher on test but lower on validation: the choice never sees the test
        {
            "method": "mixcl",
            "label_fraction": 0.05,
            "seed": "0",
            "val": 0.4,
            "test": 0.2,
            "model": "runs:/a/model",
        },
        {
            "method": "mixcl",
            "label_fraction": 0.05,
            "seed": "1",
            "val": 0.3,
            "test": 0.9,
            "model": "runs:/b/model",
        },
        {
            "method": "scratch",
            "label_fraction": 0.05,
            "seed": "0",
            "val": 0.2,
            "test": 0.2,
            "model": "runs:/c/model",
        },
        {
            "method": "scratch",
            "label_fraction": 1.0,
            "seed": "0",
            "val": 0.7,
            "test": 0.7,
            "model": None,
        },  # logged before models were
    ]
    text = best_models(rows)
    assert "- mixcl, 5 %: runs:/a/model (validation Dice 0.400, seed 0)" in text
    assert "- scratch, 5 %: runs:/c/model" in text and "runs:/b/model" not in text
    assert "100 %" not in text and best_models(rows[3:]) == ""


def test_credentials_never_cross_a_network_in_clear_and_reach_other_nodes(monkeypatch):
    from mixcl_ray import tracking_access

    monkeypatch.delenv(tracking_access.ALLOW_HTTP_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    tracking_access.refuse_clear_credentials(
        "http://mlflow.example.org:5000"
    )  # no password: allowed
    tracking_access.refuse_clear_credentials("https://me:pw@mlflow.example.org")
    tracking_access.refuse_clear_credentials("http://me:pw@127.0.0.1:5000")  # this machine
    with pytest.raises(ValueError, match=r"plain http to http://\*\*\*@mlflow.example.org"):
        tracking_access.refuse_clear_credentials("http://me:pw@mlflow.example.org")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "me")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p@ss:w/rd")
    with pytest.raises(ValueError, match="https://"):
        tracking_access.check_reachable("http://10.0.0.5:5000")  # refused before any request
    monkeypatch.setenv(tracking_access.ALLOW_HTTP_ENV, "1")
    tracking_access.refuse_clear_credentials("http://10.0.0.5:5000")
    # the trials' URI carries this environment's credentials, which split back unchanged
    folded = tracking_access.with_env_credentials("https://mlflow.example.org/base")
    assert tracking_access.split_credentials(folded) == (
        "https://mlflow.example.org/base",
        "me",
        "p@ss:w/rd",
    )
    assert tracking_access.with_env_credentials("https://u:v@h") == "https://u:v@h"
    assert (
        tracking_access.with_env_credentials("sqlite:////tmp/mlflow.db")
        == "sqlite:////tmp/mlflow.db"
    )
