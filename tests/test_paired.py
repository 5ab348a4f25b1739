"""Paired comparisons with scratch: pairs by (labelled subset, seed), per-case differences,
a hierarchical bootstrap interval, the verdict, the report's JSON and its refusal to mix."""

import json

import numpy as np
import pytest

from mixcl_ray import paired, tracking


def _row(method, fraction, seed, subset, cases, **extra):
    return {
        "method": method,
        "label_fraction": fraction,
        "seed": str(seed),
        "label_subset": str(subset),
        "test": float(np.mean(list(cases.values()))),
        "per_case": cases,
        **extra,
    }


def _study(gain, noise, pairs=6, cases=30, seed=0):
    """scratch and mixcl on the same cases and pairs; mixcl = scratch + gain + case noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(pairs):
        base = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.7, cases))}
        rows.append(_row("scratch", 0.05, k % 2, k // 2, base))
        better = {c: v + gain + float(rng.normal(0, noise)) for c, v in base.items()}
        rows.append(_row("mixcl", 0.05, k % 2, k // 2, better))
    return rows


def test_a_clear_gain_has_an_interval_above_zero_and_noise_spans_it():
    (scratch, clear) = paired.summary(_study(gain=0.05, noise=0.05))
    assert scratch["method"] == "scratch" and scratch["n"] == 6
    assert clear["n_pairs"] == 6 and clear["mean_diff"] == pytest.approx(0.05, abs=0.01)
    lo, hi = clear["ci95"]
    assert 0 < lo < clear["mean_diff"] < hi
    assert "better than scratch" in paired.render([scratch, clear])
    (_, noise) = paired.summary(_study(gain=0.0, noise=0.2))
    assert noise["ci95"][0] < 0 < noise["ci95"][1]
    assert "no detectable difference" in paired.render([noise])


def test_trials_pair_on_subset_and_seed_and_per_case_on_common_cases():
    rows = [
        _row("scratch", 0.05, 0, 0, {"a": 0.2, "b": 0.4}),
        _row("mixcl", 0.05, 0, 0, {"a": 0.5, "b": 0.4, "c": 0.9}),  # c: scratch lacks it
        _row("mixcl", 0.05, 1, 0, {"a": 0.9, "b": 0.9}),  # seed 1: no scratch to pair with
        _row("label", 0.05, 0, 1, {"a": 0.9}),  # subset 1: no scratch either
    ]
    (found,) = paired.pairs(rows, "mixcl", 0.05)
    assert found["key"] == ("0", "0") and list(found["per_case"]) == pytest.approx([0.3, 0.0])
    assert found["diff"] == pytest.approx(0.15)
    assert paired.pairs(rows, "label", 0.05) == []
    entries = {e["method"]: e for e in paired.summary(rows)}
    assert entries["mixcl"]["n_pairs"] == 1 and "ci95" in entries["mixcl"]  # two cases
    assert entries["label"]["n_pairs"] == 0
    assert "no pair with scratch" in paired.render([entries["label"]])


def test_a_sweep_that_varies_more_has_arms_each_paired_with_scratch_at_its_settings():
    """A grid over l_id (a pre-training setting) and lr (a fine-tuning one): MixCL splits into
    four arms, scratch into two; each arm pairs with the scratch arm of its own lr, and none
    of them mixes into another's mean. A sweep that varies nothing else keeps its names."""
    dims = ("method", "label_fraction", "label_subset", "seed", "l_id", "lr", "zoom")
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1):
        for subset in (0, 1, 2):
            for lr in ("0.001", "0.002"):
                base = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.6, 20))}
                params = {"l_id": "0.0", "lr": lr, "zoom": ""}
                rows.append(_row("scratch", 0.05, seed, subset, base, params=params))
                for l_id, gain in (("0.0", 0.0), ("1.0", 0.1 if lr == "0.002" else 0.05)):
                    better = {c: v + gain + float(rng.normal(0, 0.02)) for c, v in base.items()}
                    params = {"l_id": l_id, "lr": lr, "zoom": "0.0"}
                    rows.append(_row("mixcl", 0.05, seed, subset, better, params=params))
    arms = paired.label_arms(rows, dims)
    assert {r["method"] for r in arms} == {
        "scratch lr=0.001",
        "scratch lr=0.002",
        "mixcl l_id=0.0 lr=0.001",
        "mixcl l_id=0.0 lr=0.002",
        "mixcl l_id=1.0 lr=0.001",
        "mixcl l_id=1.0 lr=0.002",
    }
    entries = {e["method"]: e for e in paired.summary(arms)}
    assert entries["scratch lr=0.001"]["n"] == 6 and "mean" in entries["scratch lr=0.002"]
    best = entries["mixcl l_id=1.0 lr=0.002"]
    assert best["baseline"] == "scratch lr=0.002" and best["n_pairs"] == 6
    assert best["mean_diff"] == pytest.approx(0.1, abs=0.01) and best["ci95"][0] > 0.08
    assert entries["mixcl l_id=1.0 lr=0.001"]["mean_diff"] == pytest.approx(0.05, abs=0.01)
    none = entries["mixcl l_id=0.0 lr=0.001"]
    assert none["n_pairs"] == 6 and none["ci95"][0] < 0 < none["ci95"][1]
    text = paired.render(list(entries.values()))
    assert "| scratch lr=0.002 | 5 % | 6 runs |" in text
    assert "| mixcl l_id=1.0 lr=0.002 | 5 % | 6 |" in text
    # one arm against another: the question of whether a change to the method helps
    versus = paired.summary(arms, versus="mixcl l_id=0.0 lr=0.002")
    assert versus[0] == {
        "method": "mixcl l_id=0.0 lr=0.002",
        "label_fraction": 0.05,
        "n": 6,
        "mean": pytest.approx(entries["scratch lr=0.002"]["mean"], abs=0.02),
    }
    gain = next(e for e in versus if e["method"] == "mixcl l_id=1.0 lr=0.002")
    assert gain["baseline"] == "mixcl l_id=0.0 lr=0.002" and gain["ci95"][0] > 0.08
    text = paired.render(versus, "mixcl l_id=0.0 lr=0.002")
    assert "Paired difference to mixcl l_id=0.0 lr=0.002" in text
    assert "better than mixcl l_id=0.0 lr=0.002" in text
    with pytest.raises(ValueError, match="no method or arm named 'mixcl'.*scratch lr=0.001"):
        paired.summary(arms, versus="mixcl")
    # one arm per method: the names, pairs and numbers of the plain study
    plain = [r for r in rows if r["params"]["lr"] == "0.001" and r["params"]["l_id"] != "0.0"]
    plain += [r for r in rows if r["method"] == "scratch" and r["params"]["lr"] == "0.001"]
    labelled = paired.label_arms(plain, dims)
    assert {r["method"] for r in labelled} == {"scratch", "mixcl"}
    assert paired.summary(labelled) == paired.summary(plain)


def test_rows_sort_scratch_first_and_numbers_as_numbers():
    names = ["mixcl pretrain_epochs=12", "label", "scratch lr=0.01", "mixcl pretrain_epochs=3"]
    names += ["scratch lr=0.002", "mixcl"]
    assert sorted(names, key=paired.row_order) == [
        "scratch lr=0.002",
        "scratch lr=0.01",
        "label",
        "mixcl",
        "mixcl pretrain_epochs=3",
        "mixcl pretrain_epochs=12",
    ]


def test_the_bootstrap_is_seeded_and_resamples_pairs_then_cases():
    found = paired.pairs(_study(gain=0.02, noise=0.1, pairs=3), "mixcl", 0.05)
    assert paired.bootstrap_ci(found) == paired.bootstrap_ci(found)
    lo, hi = paired.bootstrap_ci(found, rounds=500)
    assert lo < np.mean([p["diff"] for p in found]) < hi


@pytest.fixture()
def paired_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "paired", tmp_path / "artifacts")
    parent = tracking.start_run(uri, exp, "sweep", {"mixcl.stage": "sweep"}, {})
    for row in _study(gain=0.1, noise=0.02, pairs=3, cases=8):
        params = {k: row[k] for k in ("method", "label_fraction", "seed", "label_subset")}
        run = tracking.start_run(
            uri,
            exp,
            row["method"],
            {"mixcl.stage": "trial", tracking.CODE_TAG: "abc"},
            params,
            parent_id=parent,
        )
        tracking.log_metrics(
            uri, run, {"test/dice_mean": row["test"], "val/best_dice_mean": 0.5}, 0
        )
        cases = sorted(row["per_case"])
        table = {"case_id": cases, "dice_mean": [row["per_case"][c] for c in cases]}
        tracking.log_table(uri, run, table, tracking.PER_CASE_FILE)
        tracking.end_run(uri, run)
    return uri, exp, parent


def test_report_json_gives_the_paired_summary_and_mixed_code_is_refused(
    paired_store, tmp_path, capsys
):
    from mixcl_ray.report import main

    uri, exp, parent = paired_store
    args = ["--tracking-uri", uri, "--experiment", "paired", "--out", str(tmp_path / "r")]
    assert main([*args, "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    (mixcl,) = [e for e in summary if e["method"] == "mixcl"]
    assert mixcl["n_pairs"] == 3 and mixcl["mean_diff"] == pytest.approx(0.1, abs=0.02)
    assert 0 < mixcl["ci95"][0] < mixcl["ci95"][1]
    assert main([*args, "--format", "json", "--versus", "mixcl"]) == 0
    versus = json.loads(capsys.readouterr().out)
    (scratch,) = [e for e in versus["summary"] if e["method"] == "scratch"]
    assert versus["versus"] == "mixcl" and scratch["baseline"] == "mixcl"
    assert scratch["mean_diff"] == pytest.approx(-mixcl["mean_diff"])
    assert main([*args, "--versus", "identity"]) == 2
    assert "no method or arm named 'identity'" in capsys.readouterr().err
    other = tracking.start_run(
        uri,
        exp,
        "scratch",
        {"mixcl.stage": "trial", tracking.CODE_TAG: "def"},
        {"method": "scratch", "label_fraction": 0.05, "seed": 9},
        parent_id=parent,
    )
    tracking.log_metrics(uri, other, {"test/dice_mean": 0.4}, 0)
    tracking.end_run(uri, other)
    assert main(args) == 2
    assert "2 code versions (abc; def)" in capsys.readouterr().err
    assert main([*args, "--allow-mixed"]) == 0
