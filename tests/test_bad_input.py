"""Every kind of bad input stops prepare with one message naming the case and the problem,
and leaves an existing OUT untouched; --skip-bad prepares the rest and lists the bad ones."""

import gzip
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep.errors import DataPrepError
from data_prep.prepare import PrepareOptions, prepare
from tests.nifti_helpers import make_msd, save, tree_snapshot, write_dataset_json


def _truncate(root):
    path = root / "imagesTr/case_1.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "case_1", "truncated"


def _not_nifti(root):
    (root / "imagesTr/case_1.nii.gz").write_bytes(b"this is a text file, not an image\n" * 20)
    return "case_1", "not a readable NIfTI"


def _plain_text_gzip(root):
    with gzip.open(root / "labelsTr/case_2.nii.gz", "wb") as handle:
        handle.write(b"hello" * 100)
    return "case_2", "label is not a readable NIfTI"


def _shape_mismatch(root):
    save(root / "labelsTr/case_1.nii.gz", np.ones((10, 10, 10), np.uint8))
    return "case_1", "does not match image shape"


def _affine_mismatch(root):
    label = nib.load(root / "labelsTr/case_0.nii.gz")
    save(root / "labelsTr/case_0.nii.gz", np.asarray(label.dataobj), np.diag([1.5, 1.5, 3.0, 1.0]))
    return "case_0", "affine does not match"


def _four_d(root):
    save(
        root / "imagesTr/case_2.nii.gz",
        np.zeros((24, 20, 12, 3), np.int16) + np.arange(3, dtype=np.int16),
    )
    return "case_2", "3D volume is expected"


def _empty_image(root):
    save(root / "imagesTr/case_1.nii.gz", np.zeros((24, 20, 12), np.int16))
    return "case_1", "image is empty"


def _nan_voxels(root):
    image = np.asarray(nib.load(root / "imagesTr/case_1.nii.gz").dataobj, dtype=np.float32)
    image[3, 3, 3] = np.nan
    image[4, 4, 4] = np.inf
    save(root / "imagesTr/case_1.nii.gz", image)
    return "case_1", "2 NaN/Inf voxels"


def _undeclared_label(root):
    label = np.asarray(nib.load(root / "labelsTr/case_2.nii.gz").dataobj).copy()
    label[0, 0, 0] = 7
    save(root / "labelsTr/case_2.nii.gz", label)
    return "case_2", "label values [7] are not declared"


def _non_integer_label(root):
    label = np.asarray(nib.load(root / "labelsTr/case_0.nii.gz").dataobj).astype(np.float32)
    label[0, 0, 0] = 0.5
    save(root / "labelsTr/case_0.nii.gz", label)
    return "case_0", "non-integer values"


def _empty_label(root):
    save(root / "labelsTr/case_1.nii.gz", np.zeros((24, 20, 12), np.uint8))
    return "case_1", "label is empty"


def _missing_label(root):
    (root / "labelsTr/case_2.nii.gz").unlink()
    return "case_2", "missing label file"


def _missing_image(root):
    (root / "imagesTr/case_0.nii.gz").unlink()
    return "case_0", "missing image file"


def _duplicate_entry(root):
    data = json.loads((root / "dataset.json").read_text())
    data["training"].append(dict(data["training"][1]))
    (root / "dataset.json").write_text(json.dumps(data))
    return "case_1", "duplicate entry"


def _malformed_json(root):
    (root / "dataset.json").write_text('{"training": [')
    return "dataset.json", "not valid JSON"


def _missing_label_key(root):
    data = json.loads((root / "dataset.json").read_text())
    del data["training"][0]["label"]
    (root / "dataset.json").write_text(json.dumps(data))
    return "dataset.json", "has no 'label'"


def _escaping_path(root):
    outside = root.parent / "outside.nii.gz"
    shutil.copy(root / "imagesTr/case_0.nii.gz", outside)
    data = json.loads((root / "dataset.json").read_text())
    data["training"][0]["image"] = "../outside.nii.gz"
    (root / "dataset.json").write_text(json.dumps(data))
    return "dataset.json", "escapes the dataset root"


# (corruption, whether --skip-bad can step over it: dataset-file errors stop the run)
BAD_INPUTS = {
    "truncated": (_truncate, True),
    "not_nifti": (_not_nifti, True),
    "gzip_not_nifti": (_plain_text_gzip, True),
    "shape_mismatch": (_shape_mismatch, True),
    "affine_mismatch": (_affine_mismatch, True),
    "four_d": (_four_d, True),
    "empty_image": (_empty_image, True),
    "nan_voxels": (_nan_voxels, True),
    "undeclared_label": (_undeclared_label, True),
    "non_integer_label": (_non_integer_label, True),
    "empty_label": (_empty_label, True),
    "missing_label": (_missing_label, True),
    "missing_image": (_missing_image, True),
    "duplicate_entry": (_duplicate_entry, False),
    "malformed_json": (_malformed_json, False),
    "missing_label_key": (_missing_label_key, False),
    "escaping_path": (_escaping_path, False),
}


@pytest.fixture(scope="module")
def good_out(ray_session, tmp_path_factory):
    """A previous, good output that every failing run must leave untouched."""
    root = make_msd(tmp_path_factory.mktemp("good") / "Task09_Good", n=3)
    out = tmp_path_factory.mktemp("out") / "prepared"
    prepare([root], out, progress=False)
    return out


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_names_case_and_problem_and_keeps_out(kind, tmp_path, good_out, ray_session):
    corrupt, _ = BAD_INPUTS[kind]
    root = make_msd(tmp_path / "Task09_Bad", n=3)
    case, problem = corrupt(root)
    before = tree_snapshot(good_out)
    with pytest.raises(DataPrepError) as info:
        prepare([root], good_out, progress=False)
    message = str(info.value)
    assert case in message and problem in message, message
    assert tree_snapshot(good_out) == before
    assert [p.name for p in good_out.parent.iterdir()] == ["prepared"]  # no temporary left


@pytest.mark.parametrize("kind", sorted(k for k, (_, skippable) in BAD_INPUTS.items() if skippable))
def test_skip_bad_prepares_the_rest(kind, tmp_path, ray_session):
    corrupt, _ = BAD_INPUTS[kind]
    root = make_msd(tmp_path / "Task09_Bad", n=3)
    case, problem = corrupt(root)
    result = prepare([root], tmp_path / "out", PrepareOptions(skip_bad=True), progress=False)
    assert result.num_cases == 2
    assert [s["case"] for s in result.skipped] == [f"Task09_Bad/{case}"]
    assert problem in result.skipped[0]["problem"]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert f"Task09_Bad/{case}" not in manifest["cases"]
    assert manifest["skipped"] == result.skipped


@pytest.mark.slow
def test_cli_reports_bad_case_and_exits_non_zero(tmp_path):
    root = make_msd(tmp_path / "Task09_Bad", n=2)
    _nan_voxels(root)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "prepare",
            "--dataset",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: case 'Task09_Bad/case_1'" in proc.stderr and "NaN/Inf" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_folder_that_is_not_an_output(tmp_path, ray_session):
    root = make_msd(tmp_path / "Task09_A", n=2)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DataPrepError, match="not a data_prep output"):
        prepare([root], precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_duplicate_file_across_entries(tmp_path):
    root = make_msd(tmp_path / "Task09_A", n=2)
    write_dataset_json(
        root,
        [
            {"image": "./imagesTr/case_0.nii.gz", "label": "./labelsTr/case_0.nii.gz"},
            {"image": "./imagesTr/case_1.nii.gz", "label": "./labelsTr/case_0.nii.gz"},
        ],
        {1: "spleen"},
    )
    with pytest.raises(
        DataPrepError, match="duplicate entry: label file is also used by case 'Task09_A/case_0'"
    ):
        prepare([root], tmp_path / "out", progress=False)
