import json

import pytest

from data_prep.corpus import expand_dataset_args
from data_prep.errors import DataPrepError
from data_prep.layouts import read_dataset
from tests.nifti_helpers import make_msd


def test_msd_layout(tmp_path):
    root = make_msd(tmp_path / "Task09_Spleen", n=2)
    ds = read_dataset(root)
    assert (ds.name, ds.layout, ds.modality) == ("Task09_Spleen", "msd", "CT")
    assert ds.labels == {0: "background", 1: "spleen"}
    assert [c.case_id for c in ds.cases] == ["Task09_Spleen/case_0", "Task09_Spleen/case_1"]
    assert all(c.image.is_absolute() and c.label.exists() for c in ds.cases)


@pytest.mark.parametrize(
    "labels, problem",
    [
        ([], "'labels' must be a non-empty object"),
        ({"x": "liver"}, "not an integer"),
        ({"0": "background", "300": "x"}, "must map 0..254"),
    ],
)
def test_malformed_labels(tmp_path, labels, problem):
    root = make_msd(tmp_path / "T", n=1)
    data = json.loads((root / "dataset.json").read_text())
    data["labels"] = labels
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataPrepError, match=problem) as info:
        read_dataset(root)
    assert "dataset.json" in str(info.value)


def test_multi_channel_modality_is_refused(tmp_path):
    root = make_msd(tmp_path / "T", n=1)
    data = json.loads((root / "dataset.json").read_text())
    data["modality"] = {"0": "FLAIR", "1": "T1w"}
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataPrepError, match="2 modalities"):
        read_dataset(root)


def test_absolute_path_outside_root_is_refused(tmp_path):
    root = make_msd(tmp_path / "T", n=1)
    data = json.loads((root / "dataset.json").read_text())
    data["training"][0]["label"] = "/etc/passwd"
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataPrepError, match="escapes the dataset root"):
        read_dataset(root)


def test_empty_folder_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPrepError, match="no dataset.json"):
        read_dataset(tmp_path / "empty")
    with pytest.raises(DataPrepError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")


def test_benchmark_root_expands_to_sources(synthetic_benchmark):
    folders, target = expand_dataset_args([synthetic_benchmark])
    assert target == "Task09_SynthSpleen"
    assert [f.name for f in folders][0] == "Task09_SynthSpleen" and len(folders) == 5
