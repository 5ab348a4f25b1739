"""The benchmark scripts still run (smoke, small sizes); their figures are not asserted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mixcl_step_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/mixcl_step.py"), "--skip-large", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    for part in (
        "MixCL step",
        "ratio",
        "identity loss",
        "label loss",
        "reconstruction loss",
        "backward",
    ):
        assert part in proc.stdout


SWEEP = """
import signal, sys, time
from pathlib import Path
def stop(*_):
    time.sleep(1)  # saving its state
    Path(sys.argv[1]).write_text("saved")
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
Path(sys.argv[1] + ".started").write_text("")
time.sleep(60)
"""

# as in a terminal, Ctrl-C raises KeyboardInterrupt in the wrapper, even when this test run
# inherited SIGINT ignored (a background job of a shell)
WRAPPER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[1])
import common
common.run_sweep([sys.executable, "-c", sys.argv[2], sys.argv[3]], "continue with --resume")
"""


def test_ctrl_c_lets_a_benchmark_sweep_save_its_state(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) during a benchmark's sweep: the wrapper
    waits until the sweep has saved its state and ended, then says how to resume."""
    saved = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(ROOT / "benchmarks"), SWEEP, str(saved)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 60
    while not Path(f"{saved}.started").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert saved.read_text() == "saved"  # not killed before it saved
    assert proc.returncode == 1 and "interrupted; continue with --resume" in err


def test_linear_probe_separates_what_the_features_separate(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import torch
    from linear_probe import fit_probe, mean_dice

    torch.manual_seed(0)
    labels = (torch.rand(4000) < 0.1).long()
    noise = torch.randn(4000, 3)
    informative = torch.cat([noise, labels[:, None] * 4.0 + 0.1 * torch.randn(4000, 1)], 1)
    assert mean_dice(fit_probe(informative, labels, 2)(informative), labels, 2) > 0.95
    # features that hold nothing about the organ give a probe no better than guessing
    assert mean_dice(fit_probe(noise, labels, 2)(noise), labels, 2) < 0.35
    # an organ absent from prediction and truth counts as found; one missed counts 0
    empty = torch.zeros(10, dtype=torch.long)
    assert mean_dice(empty, empty, 2) == 1.0
    assert mean_dice(empty, torch.ones(10, dtype=torch.long), 2) == 0.0


def test_linear_probe_benchmark_smoke(prepared_benchmark, tmp_path):
    # a real pretrained.pt (random weights, written as pre-training writes it) against two
    # random networks, on the test benchmark's cases
    import json

    import torch

    from data_prep.reader import read_splits
    from mixcl_ray.config import load_config, to_dict
    from mixcl_ray.feed import target_source
    from mixcl_ray.models import MixCLModel, save_pretrained

    model = load_config("pretrain").model
    torch.manual_seed(5)
    weights = tmp_path / "pretrained.pt"
    save_pretrained(MixCLModel(model), weights, to_dict(model))
    source = target_source(prepared_benchmark)
    fractions = read_splits(prepared_benchmark)["sources"][source]["label_fractions"]
    smallest = min(fractions, key=float)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/linear_probe.py"),
            "--data",
            str(prepared_benchmark),
            "--pretrained",
            f"mine={weights}",
            "--fractions",
            smallest,
            "--random-seeds",
            "0",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| random init, seed 0",
        "| random init, seed 1",
        "| mine",
        "| random init, mean",
    ], proc.stdout
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1])
    assert set(summary["networks"]) == {"random init, seed 0", "random init, seed 1", "mine"}
    assert all(0 <= d <= 1 for r in summary["networks"].values() for d in r.values())


def test_label_efficiency_cells_add_up_across_runs(tmp_path, monkeypatch, capsys):
    """The study split by seed: each part is a valid space of its own, its finished cells are
    recorded in one file that a later run (another day, another machine) adds to, and a file
    recorded with other study settings is refused rather than mixed in, as is a cell of a
    method whose pre-training weights changed since."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import json

    import pytest
    import yaml
    from label_efficiency import seed_space, settings_key
    from study_results import (
        RESULTS,
        load_results,
        method_weights,
        missing_cells,
        missing_commands,
        record,
        results_file,
        space_file,
    )

    from mixcl_ray.spaces import load_space
    from mixcl_ray.tracking import code_version

    full = space_file("label_efficiency")
    part = seed_space(full, [1], tmp_path / "storage")
    spec = load_space(part)
    assert spec.name == "label_efficiency-seeds-1" and spec.space["seed"] == {"grid": [1]}
    assert spec.space["method"] == load_space(full).space["method"]
    key = settings_key(full, None)
    assert settings_key(part, None) == key  # the seeds are not part of the settings
    assert settings_key(full, "/data/spleen") != key
    # part of a seed: a sweep of its own, named by its seeds and methods
    some = load_space(seed_space(full, [2], tmp_path / "storage", ["scratch", "label"]))
    assert some.name == "label_efficiency-seeds-2-scratch-label"
    assert some.space["method"] == {"grid": ["scratch", "label"]}
    assert some.space["seed"] == {"grid": [2]}
    every_seed = load_space(seed_space(full, None, tmp_path, ["mixcl"]))
    assert every_seed.space["seed"]["grid"] == [0, 1]
    with pytest.raises(SystemExit, match="no method swav in its grid"):
        seed_space(full, [2], tmp_path, ["swav"])
    # the target's cells alone: one label fraction of some methods
    target = load_space(seed_space(full, [0, 1], tmp_path, ["identity"], [0.05]))
    assert target.name == "label_efficiency-seeds-0-1-identity-labels-5pc"
    assert target.space["label_fraction"] == {"grid": [0.05]}
    with pytest.raises(SystemExit, match="no label fraction 0.5 in its grid"):
        seed_space(full, [0], tmp_path, None, [0.05, 0.5])
    # another study space keeps its own results file and says so in the commands it gives
    slow = space_file("label_efficiency_slow_encoder")
    assert results_file(full) == RESULTS
    assert results_file(slow) == RESULTS.parent / "label_efficiency_slow_encoder.json"
    assert settings_key(slow, None) != key
    assert missing_commands(slow, {"0": {"mixcl": [0.05, 0.15, 1.0]}}) == [
        "python benchmarks/label_efficiency.py --space label_efficiency_slow_encoder "
        "--seeds 0 --methods mixcl"
    ]

    results = tmp_path / "results.json"
    mixcl, zeros = method_weights("mixcl"), [0.0, 0.0, 0.0]
    row = {"method": "mixcl", "label_fraction": 0.05, "val": 0.3, "test": 0.2, "run_id": "a"}
    row["weights"] = mixcl
    scratch = {**row, "seed": 1, "method": "scratch", "weights": zeros}
    record(results, "exp", key, [{**row, "seed": "0"}, scratch])
    # seed 0's MixCL at 5 % run again, seed 1's added: one replaced, one added
    # (a cell's own commit, tagged on its run by the sweep's driver, wins over the study's)
    again = [{**row, "seed": 0, "test": 0.25}, {**row, "seed": "1", "commit": "fed9876"}]
    cells = record(results, "exp", key, again, "abc1234")
    assert [c["commit"] for c in cells] == ["abc1234", "fed9876", None]
    if (ROOT / ".git").exists():
        assert code_version()[:7].isalnum()
    assert [(c["seed"], c["method"], c["test"]) for c in cells] == [
        ("0", "mixcl", 0.25),
        ("1", "mixcl", 0.2),
        ("1", "scratch", 0.2),
    ]
    assert load_results(results, "exp", key) == cells
    command = "python benchmarks/label_efficiency.py --seeds"
    assert missing_commands(full, missing_cells(full, [])) == [f"{command} 0 1"]

    def every_subset(recorded):  # these cells recorded for each labelled subset of the grid
        return [{**c, "label_subset": str(k)} for c in recorded for k in range(3)]

    assert missing_cells(full, cells)["0"]["mixcl"] == [0.05, 0.15, 1.0]  # 2 subsets to run
    missing = missing_cells(full, every_subset(cells))
    assert {seed: sum(map(len, m.values())) for seed, m in missing.items()} == {
        "0": 14,
        "1": 13,
    }
    assert missing["1"]["scratch"] == [0.15, 1.0] and missing["1"]["mixcl"] == [0.15, 1.0]
    # what is recorded is not asked for again: the methods and fractions left, grouped
    assert missing_commands(full, missing) == [
        f"{command} 0 --methods scratch identity label reconstruction",
        f"{command} 0 --methods mixcl --fractions 0.15 1",
        f"{command} 1 --methods scratch mixcl --fractions 0.15 1",
        f"{command} 1 --methods identity label reconstruction",
    ]
    # a seed whose baselines are done: only its MixCL cells are asked for
    baselines = [
        {"method": m, "label_fraction": f, "seed": "1"}
        for m in ("scratch", "identity", "label", "reconstruction")
        for f in (0.05, 0.15, 1.0)
    ]
    missing = missing_cells(full, every_subset([*cells, *baselines]))
    assert missing["1"] == {"mixcl": [0.15, 1.0]}  # seed 1's MixCL at 5 % is recorded above
    assert missing_commands(full, missing)[1] == f"{command} 0 1 --methods mixcl --fractions 0.15 1"
    assert load_results(results, "other experiment", key) == []  # not this study's table
    with pytest.raises(SystemExit, match="another experiment"):
        record(results, "other experiment", key, [{**row, "seed": "0"}])

    changed = yaml.safe_load(full.read_text())
    changed["finetune"]["optim"]["epochs"] = 2
    (tmp_path / "shorter.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(SystemExit, match="3 cells were recorded with other study settings"):
        load_results(results, "exp", settings_key(tmp_path / "shorter.yaml", None))
    assert json.loads(results.read_text())["cells"] == cells  # nothing lost

    # MixCL's weights changed since seed 0's 5 % cell was recorded: that cell is left out of
    # the tables and asked for again, kept in the file; the run with the new weights replaces it
    old = [0.0, 1.0, 1.0]
    assert mixcl != old and method_weights("scratch") == zeros
    earlier = tmp_path / "earlier.json"
    recorded = [{**row, "seed": "0", "weights": old}, {**scratch, "seed": "1"}]
    earlier.write_text(json.dumps({"experiment": "exp", "settings": key, "cells": recorded}))
    assert [c["method"] for c in load_results(earlier, "exp", key)] == ["scratch"]
    assert "mixcl l_id/l_label/l_rec 0/1/1, now 1/1/1" in capsys.readouterr().out
    assert json.loads(earlier.read_text())["cells"] == recorded  # reading changes nothing
    assert missing_cells(full, load_results(earlier, "exp", key))["0"]["mixcl"] == [0.05, 0.15, 1.0]
    cells = record(earlier, "exp", key, [{**row, "seed": "0", "test": 0.3}])
    assert [(c["method"], c["test"]) for c in cells] == [("mixcl", 0.3), ("scratch", 0.2)]
    saved = json.loads(earlier.read_text())
    assert saved["cells"] == cells and [c["weights"] for c in saved["superseded"]] == [old]
    # a cell without weights (recorded before they were) is not taken for the current ones,
    # nor a sweep's cell pre-trained with other weights (a space that sets l_id)
    cells = record(earlier, "exp", key, [{**row, "seed": "1", "weights": None}])
    cells = record(earlier, "exp", key, [{**row, "seed": "2", "weights": [0.1, 1.0, 1.0]}])
    assert [c["seed"] for c in cells] == ["0", "1"]  # seed 1: scratch
    assert len(json.loads(earlier.read_text())["superseded"]) == 3


def _study_cells(gains: dict, subsets=3, seeds=2, cases=30) -> list[dict]:
    """A whole study's cells, each with test Dice per case: scratch at 0.3 plus per-case noise
    shared by the pair (the same cases, subset and seed), each method ``gains[method]`` above."""
    import numpy as np
    from study_results import method_weights

    rng = np.random.default_rng(0)
    cells = []
    for fraction in (0.05, 0.15, 1.0):
        for subset in range(subsets):
            for seed in range(seeds):
                base = 0.3 + rng.normal(0, 0.1, cases)
                for method, gain in gains.items():
                    dice = base + gain.get(fraction, 0.0) + rng.normal(0, 0.01, cases)
                    per_case = {f"case_{i:03d}": float(d) for i, d in enumerate(dice)}
                    cells.append(
                        {
                            "method": method,
                            "label_fraction": fraction,
                            "label_subset": str(subset),
                            "seed": seed,
                            "val": 0.3,
                            "test": float(dice.mean()),
                            "run_id": f"{method}-{fraction}-{subset}-{seed}",
                            "weights": method_weights(method),
                            "per_case": per_case,
                        }
                    )
    return cells


def test_label_efficiency_records_paired_cells_with_their_summary_and_targets(
    tmp_path, monkeypatch
):
    """A study of 3 subsets x 2 seeds: each (subset, seed) is its own cell, the results file
    carries each method's weights and the paired summary with intervals, the targets are read
    from paired intervals, a missing subset is asked for again, and the plot is drawn."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import json

    from study_results import method_weights, missing_cells, record, space_file, target_lines

    from mixcl_ray import paired
    from mixcl_ray.plots import paired_png

    gains = {
        "scratch": {},
        "identity": {0.05: 0.02},
        "label": {0.05: 0.01},
        "reconstruction": {0.05: 0.03},
        "mixcl": {0.05: 0.08, 0.15: 0.03, 1.0: -0.005},
    }
    cells = _study_cells(gains)
    results = tmp_path / "results.json"
    recorded = record(results, "exp", "key", cells[:-1], "abc1234")  # the last cell still to run
    assert len(recorded) == len(cells) - 1  # every subset and seed a cell of its own
    saved = json.loads(results.read_text())
    weights = dict(zip(("l_id", "l_label", "l_rec"), method_weights("mixcl"), strict=True))
    assert saved["methods"]["mixcl"] == weights
    assert saved["methods"]["scratch"] == {"l_id": 0.0, "l_label": 0.0, "l_rec": 0.0}
    by = {(e["method"], e["label_fraction"]): e for e in saved["summary"]}
    assert by[("scratch", 0.05)]["n"] == 6 and 0.2 < by[("scratch", 0.05)]["mean"] < 0.4
    gain = by[("mixcl", 0.05)]
    assert gain["n_pairs"] == 6 and abs(gain["mean_diff"] - 0.08) < 0.01
    assert gain["ci95"][0] > 0.05 and gain["ci95"][1] < 0.11
    assert by[("mixcl", 1.0)]["n_pairs"] == 5  # the missing cell has no pair
    # the cell not yet recorded is asked for: its seed's method at that fraction
    space = space_file("label_efficiency")
    last = cells[-1]
    assert missing_cells(space, recorded) == {str(last["seed"]): {last["method"]: [1.0]}}
    assert missing_cells(space, record(results, "exp", "key", cells[-1:])) == {}
    # a cell run again replaces its own (method, fraction, subset, seed) only
    again = record(results, "exp", "key", [{**cells[0], "test": 0.9}])
    assert len(again) == len(cells) and sum(c["test"] == 0.9 for c in again) == 1

    lines = target_lines(cells)
    assert len(lines) == 6
    assert lines[0].startswith("target: MixCL vs scratch at 5 %") and lines[0].endswith("met")
    assert all(line.endswith("-> met") for line in lines), lines
    # a gain within the noise is not a met target, whatever its mean
    noisy = _study_cells({"scratch": {}, "mixcl": {0.05: 0.06}}, subsets=1, seeds=1, cases=3)
    for cell in noisy:
        cell["per_case"] = None  # one pair and no cases: no interval
    assert "no interval -> not established" in target_lines(noisy)[0]
    behind = target_lines(_study_cells({**gains, "mixcl": {1.0: -0.05}}))
    assert behind[0].endswith("not met") and behind[-1].endswith("not met")

    plot = tmp_path / "paired.png"
    paired_png(paired.summary(cells), plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_label_efficiency_records_only_a_sweep_of_its_own_run(tmp_path, monkeypatch):
    """The cells recorded after a study are those of a sweep that began in that run: a study
    that failed before its sweep started does not record an older sweep's cells again."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import time

    from label_efficiency import latest_rows
    from mlflow import MlflowClient

    from mixcl_ray.tracking import CODE_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("study")
    assert latest_rows(uri, "study") == []  # no sweep yet
    sweep = client.create_run(exp, tags={"mixcl.stage": "sweep"})
    trial = client.create_run(
        exp, tags={"mixcl.stage": "trial", "mlflow.parentRunId": sweep.info.run_id}
    )
    client.set_tag(trial.info.run_id, CODE_TAG, "abc1234")
    params = {"method": "mixcl", "label_fraction": "0.05", "seed": "1", "l_id": "0.0"}
    for name, value in {**params, "l_label": "1.0", "l_rec": "0.5"}.items():
        client.log_param(trial.info.run_id, name, value)
    client.log_metric(trial.info.run_id, "test/dice_mean", 0.4)
    client.set_terminated(trial.info.run_id)
    (row,) = latest_rows(uri, "study", since=time.time() - 600)
    assert (row["method"], row["label_fraction"], row["seed"], row["test"]) == (
        "mixcl",
        0.05,
        "1",
        0.4,
    )
    assert row["weights"] == [0.0, 1.0, 0.5]  # the pre-training's, from the trial's params
    assert row["commit"] == "abc1234"
    assert latest_rows(uri, "study", since=time.time() + 1) == []  # began before this run
    assert latest_rows(uri, "missing experiment") == []
    # a sweep over another setting (two MixCL arms) is not a study this benchmark records
    other = client.create_run(
        exp, tags={"mixcl.stage": "trial", "mlflow.parentRunId": sweep.info.run_id}
    )
    for name, value in {**params, "l_id": "1.0", "l_label": "1.0", "l_rec": "0.5"}.items():
        client.log_param(other.info.run_id, name, value)
    client.log_metric(other.info.run_id, "test/dice_mean", 0.5)
    client.set_terminated(other.info.run_id)
    with pytest.raises(SystemExit, match=r"arms: mixcl l_id=0.0, mixcl l_id=1.0.*mixcl_ray.report"):
        latest_rows(uri, "study")


def test_label_efficiency_cells_name_their_machine_and_mixed_machines_are_said(
    tmp_path, monkeypatch
):
    """One seed's cell differs between kinds of machine (other kernels round otherwise), so every
    cell records what it was fine-tuned on and the report says when a table mixes kinds."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import torch
    from label_efficiency import settings_key
    from study_results import record, space_file

    from mixcl_ray.report import hardware_line
    from mixcl_ray.train_utils import cpu_model, hardware

    here = hardware(torch.device("cpu"))
    assert here.startswith(cpu_model()) and torch.__version__ in here
    assert torch.backends.cpu.get_cpu_capability() in here
    key = settings_key(space_file("label_efficiency"), None)
    row = {"method": "scratch", "label_fraction": 0.05, "val": 0.3, "test": 0.2, "run_id": "a"}
    row["weights"] = [0.0, 0.0, 0.0]
    results = tmp_path / "results.json"
    cells = record(
        results, "exp", key, [{**row, "seed": "0", "hardware": here, "data_fingerprint": "b" * 16}]
    )
    assert (cells[0]["hardware"], cells[0]["data_fingerprint"]) == (here, "b" * 16)
    assert hardware_line(cells) == f"fine-tuned on: {here}"
    other = "NVIDIA H200, torch 2.13.0+cu130"
    cells = record(
        results, "exp", key, [{**row, "seed": "1", "hardware": other}, {**row, "seed": "2"}]
    )
    line = hardware_line(cells)
    assert "3 kinds of machine" in line and here in line and other in line
    assert "not recorded" in line  # a cell from before the hardware was recorded


def test_feed_check_names_each_size_below_the_floor(monkeypatch):
    """feed_vs_monai.py --check RATIO: the sizes where ours fell below RATIO x MONAI's standard
    pipeline, none when every size is at or above it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from feed_vs_monai import below

    summary = {32: {"throughput_ratio": 0.64}, 96: {"throughput_ratio": 1.0}}
    assert below(summary, 1.0) == ["32^3: ours 0.64x MONAI's standard pipeline, below 1.0x"]
    assert below(summary, 0.5) == []
