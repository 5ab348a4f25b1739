"""Datasets written as scanners and archives write them, prepared end to end.

MR and CT in MSD layout; RAS, LPS, permuted and oblique direction cosines; 0.7 x 0.7 x 5 mm
voxels; int16 with scl_slope/scl_inter; float labels; a trailing axis of size 1; three label
classes; .nii and .nii.gz. Every prepared case is checked where it matters to a user: each
labelled structure's centre in world coordinates, the label ids, and the intensities the
preset promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.prepare import PrepareOptions, prepare
from data_prep.preprocess import PRESETS, MRBody, TransformError, get_preset
from data_prep.reader import load_case, read_manifest, read_splits
from mixcl_ray.feed import target_source
from tests.nifti_helpers import tree_snapshot
from tests.scanner_nifti import (
    BODY,
    CT_HU,
    ORGANS,
    Geometry,
    centroid_mm,
    inside,
    world_coordinates,
    write_case,
)

MR_NAME, CT_NAME = "Task10_MRAbdomen", "Task09_CTSpleen"
MR_LABELS = {1: "liver", 2: "spleen", 3: "kidney"}
OUTPUT_SPACING = get_preset("auto").spacing

# (file stem, geometry, writer options): every case of a dataset differs from the others
MR_CASES = [
    ("mr_0", Geometry("RAS", (1.5, 1.5, 2.0)), {"label_dtype": "float32"}),
    ("mr_1", Geometry("LPS", (1.0, 1.0, 3.0)), {"gain": 2.5, "suffix": ".nii"}),
    ("mr_2", Geometry("oblique", (1.2, 1.2, 2.5)), {"gain": 0.7, "label_dtype": "float32"}),
    ("mr_3", Geometry("PIR", (2.0, 1.5, 1.5)), {"image_dtype": "uint16"}),
    ("mr_4", Geometry("RAS", (0.7, 0.7, 5.0)), {"four_d": True, "gain": 1.8}),
    ("mr_5", Geometry("LPS", (1.5, 1.5, 1.5)), {"image_dtype": "int16", "suffix": ".nii"}),
]
CT_CASES = [
    ("ct_0", Geometry("LPS", (0.7, 0.7, 5.0)), {"image_dtype": "int16-scaled"}),
    ("ct_1", Geometry("oblique", (1.0, 1.0, 2.0)), {"image_dtype": "int16-scaled", "four_d": True}),
    ("ct_2", Geometry("RAS", (1.5, 1.5, 2.0)), {"label_dtype": "float32", "suffix": ".nii"}),
    ("ct_3", Geometry("PIR", (2.0, 1.0, 1.0)), {"image_dtype": "int16-scaled"}),
]


def write_msd(root: Path, modality: str, cases, labels: dict[int, str], **common) -> Path:
    """An MSD dataset of the given cases; ``common`` options go to every case."""
    training = []
    for i, (stem, geometry, options) in enumerate(cases):
        options = {**common, **options}
        suffix = options.pop("suffix", ".nii.gz")
        image, label = f"imagesTr/{stem}{suffix}", f"labelsTr/{stem}{suffix}"
        write_case(root / image, root / label, geometry, modality, seed=i, **options)
        training.append({"image": f"./{image}", "label": f"./{label}"})
    data = {
        "name": root.name,
        "modality": {"0": "MRI" if modality == "MR" else "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def mr_dataset(root: Path, cases=MR_CASES) -> Path:
    return write_msd(root / MR_NAME, "MR", cases, MR_LABELS)


def ct_dataset(root: Path, cases=CT_CASES) -> Path:
    # a spleen-only CT task: the file stores the spleen as 1
    return write_msd(root / CT_NAME, "CT", cases, {1: "spleen"}, classes=(2,), label_values={2: 1})


def read_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float64).reshape(img.shape[:3]), img.affine


def source_files(manifest: dict, case_id: str) -> tuple[Path, Path]:
    info = manifest["cases"][case_id]
    return Path(info["image_file"]), Path(info["label_file"])


def core(case: dict, cls: int, scale: float = 0.6) -> np.ndarray:
    """Voxels of the prepared case well inside organ ``cls`` (or the body for ``"body"``)."""
    world = world_coordinates(case["affine"], case["image"].shape)
    centre, radii = BODY if cls == "body" else ORGANS[cls][1:]
    return inside(world, centre, radii, scale)


def assert_geometry_survives(manifest: dict, case_id: str, case: dict, source_ids: dict) -> None:
    """Each structure's centre in world coordinates stays within one output voxel, and every
    label id of the file arrives as its class's global id."""
    _, label_file = source_files(manifest, case_id)
    label, affine = read_file(label_file)
    global_ids = {int(v) for v in np.unique(case["label"])}
    assert global_ids == {0, *source_ids.values()}, (case_id, global_ids)
    for file_value, global_id in source_ids.items():
        before = centroid_mm(np.rint(label), affine, file_value)
        after = centroid_mm(case["label"], case["affine"], global_id)
        assert np.linalg.norm(before - after) <= max(OUTPUT_SPACING), (case_id, before, after)
    assert np.allclose(case["spacing"], OUTPUT_SPACING, atol=1e-4), case["spacing"]


def expected_mr_z(image_file: Path, preset) -> dict[int, float]:
    """The z-score of each organ's signal as the MR preset defines it, from the raw file: crop
    to the body, clip at the percentiles, then mean and standard deviation of the body."""
    raw, affine = read_file(image_file)
    world = world_coordinates(affine, raw.shape)
    body = MRBody(preset.mr_body_fraction)(raw)
    # the preset's crop: the body's bounding box and a margin, where the percentiles are taken
    box = tuple(
        slice(max(0, i.min() - preset.crop_margin), i.max() + preset.crop_margin + 1)
        for i in np.nonzero(body)
    )
    raw, body, world = raw[box], body[box], world[box]
    lo, hi = np.percentile(raw, preset.mr_percentiles)
    clipped = np.clip(raw, lo, hi)
    mean, std = clipped[body].mean(), clipped[body].std()
    return {
        cls: (np.median(clipped[inside(world, *ORGANS[cls][1:], 0.6)]) - mean) / std
        for cls in ORGANS
    }


@pytest.fixture(scope="module")
def scanner_corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The MR and CT datasets prepared together by the command line, preset auto."""
    root = tmp_path_factory.mktemp("scanner")
    mr, ct, out = mr_dataset(root), ct_dataset(root), root / "prepared"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "prepare", "--dataset", str(mr), "--dataset", str(ct)]
        + ["--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"prepared {len(MR_CASES) + len(CT_CASES)} cases" in proc.stdout, proc.stdout
    return mr, ct, out


def test_mr_and_ct_cases_keep_their_anatomy_in_world_space(scanner_corpus):
    _, _, out = scanner_corpus
    manifest = read_manifest(out)
    assert manifest["class_map"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
    assert manifest["sources"][MR_NAME]["modality"] == "MR"
    assert manifest["sources"][CT_NAME]["modality"] == "CT"
    for stem, _, _ in MR_CASES:
        case_id = f"{MR_NAME}/{stem}"
        case = load_case(out, case_id)
        assert_geometry_survives(manifest, case_id, case, {1: 1, 2: 2, 3: 3})
    for stem, _, _ in CT_CASES:
        case_id = f"{CT_NAME}/{stem}"
        assert_geometry_survives(manifest, case_id, load_case(out, case_id), {1: 2})


def test_ct_intensities_land_in_the_window_whatever_the_file_stores(scanner_corpus):
    """int16 with scl_slope/scl_inter, float32 and 4D files: HU, then the preset's window."""
    _, ct, out = scanner_corpus
    lo, hi = get_preset("ct").ct_window
    assert nib.load(ct / "imagesTr/ct_0.nii.gz").dataobj.slope == 0.5  # scaled on disk
    for stem, _, _ in CT_CASES:
        case = load_case(out, f"{CT_NAME}/{stem}")
        spleen = np.median(case["image"][core(case, 2) & (case["label"] == 2)])
        assert spleen == pytest.approx((CT_HU[2] - lo) / (hi - lo), abs=0.03), stem
        assert case["image"].min() == 0.0 and case["image"].max() <= 1.0


def test_mr_is_clipped_and_z_scored_inside_the_body_whatever_the_scanner_gain(scanner_corpus):
    mr, _, out = scanner_corpus
    manifest = read_manifest(out)
    preset = get_preset("mr")
    organ_z = []
    for stem, _, _ in MR_CASES:
        case_id = f"{MR_NAME}/{stem}"
        case = load_case(out, case_id)
        # the body but its outermost millimetre, where resampled voxels mix body and air
        body = case["image"][core(case, "body", 0.97)]
        assert body.mean() == pytest.approx(0.0, abs=0.15), stem
        assert body.std() == pytest.approx(1.0, abs=0.15), stem
        expected = expected_mr_z(source_files(manifest, case_id)[0], preset)
        got = {cls: float(np.median(case["image"][core(case, cls)])) for cls in ORGANS}
        for cls in ORGANS:
            assert got[cls] == pytest.approx(expected[cls], abs=0.15), (stem, cls, got, expected)
        organ_z.append([got[cls] for cls in ORGANS])
    # the cases were written at 0.7x to 2.5x the signal: an organ's z-score moves only with
    # the grid it was sampled on (0.43 at most here), far less than the 3.5x of the raw signal
    assert np.ptp(np.array(organ_z), axis=0).max() < 0.5, organ_z


@pytest.fixture(scope="module")
def mr_model(scanner_corpus, ray_session, tmp_path_factory):
    """One epoch of fine-tuning on the MR source."""
    from mixcl_ray.config import load_config
    from mixcl_ray.finetune import run_finetuning

    _, _, out = scanner_corpus
    assert read_splits(out)["sources"][MR_NAME]["val"]
    config = load_config(
        "finetune",
        overrides={
            "label_fraction": 1.0,
            "source": MR_NAME,
            "optim": {"epochs": 1},
            "min_patches_per_epoch": 16,
        },
    )
    storage = tmp_path_factory.mktemp("mr_runs")
    return storage, run_finetuning(out, storage, config)


def test_mr_dataset_fine_tunes_one_epoch(mr_model):
    _, result = mr_model
    assert len(result.history) == 1
    assert np.isfinite(result.history[0]["train/loss"])
    assert 0.0 <= result.metrics["val/dice_mean"] <= 1.0
    assert {"val/dice/liver", "val/dice/spleen", "val/dice/kidney"} <= set(result.metrics)


def small_dataset(root: Path, modality: str) -> Path:
    cases = [(f"s_{i}", Geometry("LPS", (2.0, 2.0, 3.0)), {}) for i in range(2)]
    if modality == "MR":
        return write_msd(root / f"{MR_NAME}_small", "MR", cases, MR_LABELS)
    return write_msd(
        root / f"{CT_NAME}_small", "CT", cases, {1: "spleen"}, classes=(2,), label_values={2: 1}
    )


@pytest.mark.parametrize("preset", ["spleen", "btcv", "ct", "mr"])
def test_every_preset_runs_on_its_modality(preset, tmp_path, ray_session):
    """Each named preset on a dataset of its modality (auto on both: ``scanner_corpus``)."""
    modality = PRESETS[preset].modality
    root = small_dataset(tmp_path, modality)
    out = tmp_path / "out"
    options = PrepareOptions(preset=preset, val_ratio=0, test_ratio=0)
    prepare([root], out, options, progress=False)
    assert target_source(out) == root.name  # a single dataset is its own fine-tuning target
    case = load_case(out, f"{root.name}/s_0")
    spleen_id = read_manifest(out)["class_map"]["spleen"]
    spleen = np.median(case["image"][core(case, 2) & (case["label"] == spleen_id)])
    if modality == "CT":
        lo, hi = PRESETS[preset].ct_window
        assert spleen == pytest.approx((CT_HU[2] - lo) / (hi - lo), abs=0.03)
    else:  # spleen brighter than the body, liver darker, in units of the body's spread
        assert spleen > 1.0 and float(np.median(case["image"][core(case, 1)])) < -1.0


@pytest.mark.parametrize(
    "preset,modality", [("spleen", "MR"), ("btcv", "MR"), ("ct", "MR"), ("mr", "CT")]
)
def test_a_preset_of_the_other_modality_is_refused(preset, modality, tmp_path):
    root = small_dataset(tmp_path, modality)
    out = tmp_path / "out"
    with pytest.raises(DataPrepError, match=f"preset '{preset}' is for") as info:
        prepare([root], out, PrepareOptions(preset=preset), progress=False)
    assert root.name in str(info.value) and "dataset.json" in str(info.value)
    assert not out.exists()


def test_a_failing_transform_names_case_file_step_and_cause(tmp_path, ray_session):
    """A CT with no voxel of tissue (HU written twice over) fails in the foreground crop: one
    line names the case, the file, the step and the cause; exit code 2; OUT untouched."""
    root = ct_dataset(tmp_path, CT_CASES[2:])
    out = tmp_path / "out"
    prepare([root], out, progress=False)
    before = tree_snapshot(out)
    bad = root / "imagesTr/ct_2.nii"
    image = nib.load(bad)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) - 2048.0, image.affine), bad)
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "prepare", "--dataset", str(root), "--out", str(out)]
        + ["--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, proc.stderr[-3000:]
    for part in (f"case '{CT_NAME}/ct_2'", str(bad), "CropForegroundd", "no voxel above"):
        assert part in error[0], error[0]
    assert " object at 0x" not in proc.stderr
    assert tree_snapshot(out) == before


def test_a_monai_failure_is_told_by_its_step_and_underlying_cause():
    """MONAI wraps a transform's error in "applying transform <object repr>": the message
    keeps the step's class name and the innermost cause instead."""
    import torch
    from monai.transforms import Compose, ScaleIntensityRangePercentilesd

    step = ScaleIntensityRangePercentilesd(
        keys="image", lower=1, upper=99, b_min=None, b_max=None, clip=True
    )
    with pytest.raises(RuntimeError) as info:
        Compose([step])({"image": torch.rand(1, 8, 8, 8)})
    message = str(TransformError(step, info.value))
    assert message.startswith("preprocessing step ScaleIntensityRangePercentilesd failed: ")
    assert "applying transform" not in message and " object at 0x" not in message


def test_the_best_model_carries_what_predict_needs(mr_model, scanner_corpus):
    import torch

    _, result = mr_model
    card = torch.load(result.best_model, weights_only=True)["card"]
    assert card["class_names"] == ["background", "liver", "spleen", "kidney"]
    assert card["modality"] == "MR" and card["preset"] == read_manifest(scanner_corpus[2])["preset"]
    assert card["finetune_config"]["source"] == MR_NAME and card["pretrained"] is None


def test_predict_writes_each_scan_in_its_own_geometry_and_names_a_bad_file(
    mr_model, scanner_corpus, tmp_path
):
    """Raw MR scans of every orientation and a truncated file: the good ones are segmented
    into their own shape and affine with the training's class ids, the bad one is named and
    the exit code is 2."""
    storage, _ = mr_model
    mr = scanner_corpus[0]
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("mr_2.nii.gz", "mr_4.nii.gz", "mr_1.nii"):  # oblique, 4D 0.7 x 0.7 x 5, LPS
        (scans / name).write_bytes((mr / "imagesTr" / name).read_bytes())
    (scans / "broken.nii.gz").write_bytes((mr / "imagesTr/mr_0.nii.gz").read_bytes()[:3000])
    out = tmp_path / "seg"
    proc = subprocess.run(
        [sys.executable, "-m", "mixcl_ray.predict", "--model", str(storage)]
        + ["--input", str(scans), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "broken.nii.gz" in proc.stderr and "truncated" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((out / "labels.json").read_text()) == {
        "0": "background",
        "1": "liver",
        "2": "spleen",
        "3": "kidney",
    }
    assert sorted(p.name for p in out.glob("mr_*")) == ["mr_1.nii", "mr_2.nii.gz", "mr_4.nii.gz"]
    for name in ("mr_1.nii", "mr_2.nii.gz", "mr_4.nii.gz"):
        scan, seg = nib.load(scans / name), nib.load(out / name)
        assert seg.shape == scan.shape and np.allclose(seg.affine, scan.affine), name
        assert seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}


@pytest.mark.parametrize(
    "modality,stem",
    [("CT", "ct_0"), ("CT", "ct_1"), ("CT", "ct_3")]
    + [("MR", "mr_2"), ("MR", "mr_3"), ("MR", "mr_4")],
)
def test_predict_takes_a_class_map_back_to_the_scan_grid(modality, stem, tmp_path):
    """The inversion alone, with the true labels as the "prediction": preprocessed, then taken
    back to the file's oblique, LPS, permuted or 0.7 x 0.7 x 5 mm grid, they match the
    file's own labels."""
    import torch
    from monai.data import MetaTensor

    from data_prep.preprocess import apply_steps, build_transforms
    from mixcl_ray.predict import to_input_grid

    cases = CT_CASES if modality == "CT" else MR_CASES
    ((_, _, options),) = [c for c in cases if c[0] == stem]
    root = (ct_dataset if modality == "CT" else mr_dataset)(
        tmp_path, [c for c in cases if c[0] == stem]
    )
    suffix = options.get("suffix", ".nii.gz")
    image, affine = read_file(root / f"imagesTr/{stem}{suffix}")
    label, _ = read_file(root / f"labelsTr/{stem}{suffix}")
    preset = get_preset(modality.lower())

    def tensor(array):
        return MetaTensor(torch.from_numpy(array.astype(np.float32))[None], affine=affine)

    image_only = build_transforms(preset, modality, with_label=False)
    prepared = apply_steps(image_only, {"image": tensor(image)})["image"]
    both = apply_steps(
        build_transforms(preset, modality, True), {"image": tensor(image), "label": tensor(label)}
    )
    assert both["label"].shape == prepared.shape
    back = to_input_grid(torch.round(both["label"]), prepared, image_only)
    assert back.shape == label.shape
    for value in np.unique(label)[1:]:
        dice = (
            2
            * ((back == value) & (label == value)).sum()
            / ((back == value).sum() + (label == value).sum())
        )
        assert dice > 0.9, (value, dice)


def test_evaluate_scores_a_split_as_the_fine_tuning_validated_it(
    mr_model, scanner_corpus, tmp_path
):
    """The CSV of ``python -m mixcl_ray.evaluate`` on the validation split: one row per case,
    one column per organ, and a mean equal to the fine-tuning's own validation Dice (same
    weights, same sliding window)."""
    import csv

    storage, result = mr_model
    table = tmp_path / "val.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "mixcl_ray.evaluate", "--model", str(result.best_model)]
        + ["--data", str(scanner_corpus[2]), "--split", "val", "--csv", str(table)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(table.open()))
    val_ids = read_splits(scanner_corpus[2])["sources"][MR_NAME]["val"]
    assert [r["case_id"] for r in rows] == sorted(val_ids) + ["mean"]
    assert list(rows[0]) == ["case_id", "liver", "spleen", "kidney", "mean"]
    mean = float(rows[-1]["mean"])
    assert mean == pytest.approx(result.metrics["val/best_dice_mean"], abs=1e-6)
    assert f"mean Dice on val: {mean:.4f}" in proc.stdout
