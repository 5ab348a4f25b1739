"""prepare end to end on NIfTI files written to disk, with the real Ray instance."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from data_prep.prepare import PrepareOptions, prepare
from data_prep.reader import (
    UNLABELLED,
    load_case,
    read_cases,
    read_manifest,
    read_splits,
    select_case_ids,
)
from data_prep.writer import schema_version_of
from tests.nifti_helpers import make_msd, phantom, save, tree_snapshot, write_dataset_json


def test_round_trip_orientation_spacing_and_intensity(tmp_path, ray_session):
    # stored LPS-like (x and y reversed) at 0.75 x 0.75 x 4 mm, with one marker voxel block
    shape = (48, 40, 6)
    affine = np.diag([-0.75, -0.75, 4.0, 1.0])
    affine[:3, 3] = [30.0, 20.0, -10.0]
    image = np.full(shape, -1000.0, np.float32)
    image[4:-4, 4:-4, :] = 40.0
    label = np.zeros(shape, np.uint8)
    label[8:16, 10:18, 2:4] = 1  # a 6 x 6 x 8 mm block
    root = tmp_path / "Task09_Orient"
    save(root / "imagesTr/o.nii.gz", image.astype(np.int16), affine)
    save(root / "labelsTr/o.nii.gz", label, affine)
    write_dataset_json(
        root, [{"image": "imagesTr/o.nii.gz", "label": "labelsTr/o.nii.gz"}], {1: "spleen"}
    )
    out = tmp_path / "out"
    prepare([root], out, PrepareOptions(preset="spleen", val_ratio=0, test_ratio=0), progress=False)

    case = load_case(out, "Task09_Orient/o")
    assert np.allclose(case["spacing"], [1.5, 1.5, 2.0])
    new_affine = case["affine"]
    assert np.allclose(np.diag(new_affine)[:3], [1.5, 1.5, 2.0])  # RAS, positive axes

    # the label block's centre lies at the same world position before and after
    def centre(aff, mask):
        idx = np.argwhere(mask).mean(axis=0)
        return aff[:3, :3] @ idx + aff[:3, 3]

    assert np.allclose(centre(affine, label == 1), centre(new_affine, case["label"] == 1), atol=1.0)
    assert case["label"].sum() == pytest.approx(6 * 6 * 8 / (1.5 * 1.5 * 2.0), rel=0.35)
    # spleen window: 40 HU -> (40 + 57) / 221; air clipped to 0; body cropped with a margin
    assert np.median(case["image"][case["label"] == 1]) == pytest.approx(97 / 221, abs=0.01)
    assert case["image"].min() == 0.0 and case["image"].max() <= 1.0
    assert case["image"].shape[0] < 48 * 0.75 / 1.5 + 1


def test_corpus_of_several_sources_merges_classes_by_name(tmp_path, ray_session):
    liver = make_msd(tmp_path / "Task03_Liver", n=3, labels={1: "liver"})
    organs = make_msd(tmp_path / "BTCV_like", n=3, labels={1: "spleen", 2: "Liver"}, seed=1)
    out = tmp_path / "out"
    prepare([liver, organs], out, progress=False)
    manifest = read_manifest(out)
    assert manifest["class_map"] == {"background": 0, "liver": 1, "spleen": 2}
    assert manifest["sources"]["BTCV_like"]["annotated_classes"] == {"spleen": 2, "liver": 1}
    case = load_case(out, "BTCV_like/case_0")
    raw = np.asarray(nib.load(organs / "labelsTr/case_0.nii.gz").dataobj)
    assert set(np.unique(raw)) == {0, 1, 2}
    assert set(np.unique(case["label"])) == {0, 1, 2}
    # source value 1 (spleen) became global 2 and source value 2 (liver) global 1: same voxel counts
    assert (case["label"] == 2).sum() == (raw == 1).sum()
    assert list(case["annotated_classes"]) == [1, 2]
    assert manifest["cases"]["BTCV_like/case_0"]["image_sha256"]
    assert schema_version_of(out / manifest["shards"][0]) == 1
    assert set(manifest["sources"]["Task03_Liver"]["intensity"]) >= {
        "foreground_mean",
        "foreground_std",
    }


def test_btcv_dataset_0_keeps_its_24_6_split(tmp_path, ray_session):
    root = tmp_path / "BTCV"
    rng = np.random.default_rng(0)
    entries = []
    for i in range(30):
        image, label = phantom(rng, shape=(16, 16, 8), classes=(1,))
        save(root / f"imagesTr/img{i:04d}.nii.gz", image.astype(np.int16))
        save(root / f"labelsTr/label{i:04d}.nii.gz", label)
        entries.append(
            {"image": f"imagesTr/img{i:04d}.nii.gz", "label": f"labelsTr/label{i:04d}.nii.gz"}
        )
    data = {
        "name": "btcv",
        "labels": {"0": "background", "1": "spleen"},
        "modality": {"0": "CT"},
        "training": entries[:24],
        "validation": entries[24:],
        "test": [],
    }
    (root / "dataset_0.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    prepare([root], out, PrepareOptions(preset="btcv"), progress=False)
    splits = read_splits(out)
    assert splits["train"] == [f"BTCV/img{i:04d}" for i in range(24)]
    assert splits["val"] == [f"BTCV/img{i:04d}" for i in range(24, 30)]
    assert read_manifest(out)["sources"]["BTCV"]["layout"] == "btcv"
    assert (
        len(splits["label_fractions"]["0.05"]) == 1 and len(splits["label_fractions"]["0.15"]) == 4
    )


@pytest.mark.parametrize("layout", ["images_labels", "suffix"])
def test_plain_folder_of_pairs(tmp_path, ray_session, layout):
    root = tmp_path / "mine"
    rng = np.random.default_rng(2)
    for i in range(3):
        image, label = phantom(rng, classes=(1, 2))
        if layout == "images_labels":
            save(root / f"images/p{i}_0000.nii.gz", image.astype(np.int16))
            save(root / f"labels/p{i}.nii.gz", label)
        else:
            save(root / f"p{i}.nii.gz", image.astype(np.int16))
            save(root / f"p{i}_seg.nii.gz", label)
    save(
        root / ("images/extra_0000.nii.gz" if layout == "images_labels" else "extra.nii.gz"),
        phantom(rng)[0].astype(np.int16),
    )
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "kidney", "2": "tumour"}))
    out = tmp_path / "out"
    prepare([root], out, progress=False)
    manifest = read_manifest(out)
    assert sorted(manifest["cases"]) == ["mine/extra", "mine/p0", "mine/p1", "mine/p2"]
    assert manifest["cases"]["mine/extra"]["labelled"] is False
    assert read_splits(out)["unlabelled"] == ["mine/extra"]
    assert (load_case(out, "mine/extra")["label"] == UNLABELLED).all()
    assert manifest["class_map"] == {"background": 0, "kidney": 1, "tumour": 2}


def test_idempotent_and_recomputes_when_an_input_changes(tmp_path, ray_session):
    root = make_msd(tmp_path / "Task09_Idem", n=3)
    out = tmp_path / "out"
    first = prepare([root], out, progress=False)
    assert not first.reused
    before = tree_snapshot(out)
    again = prepare([root], out, progress=False)
    assert again.reused and tree_snapshot(out) == before
    different_seed = prepare([root], out, PrepareOptions(seed=5), progress=False)
    assert not different_seed.reused
    image_path = root / "imagesTr/case_0.nii.gz"
    image = np.asarray(nib.load(image_path).dataobj).copy()
    image[5, 5, 5] += 100
    save(image_path, image)
    os.utime(image_path, ns=(1, 1))
    changed = prepare([root], out, PrepareOptions(seed=5), progress=False)
    assert not changed.reused
    assert (
        read_manifest(out)["cases"]["Task09_Idem/case_0"]["image_sha256"]
        != json.loads(before["manifest.json"])["cases"]["Task09_Idem/case_0"]["image_sha256"]
    )


def test_failure_midway_leaves_previous_out_untouched(tmp_path, ray_session, monkeypatch):
    from data_prep import prepare as prepare_module

    root = make_msd(tmp_path / "Task09_Mid", n=6)
    out = tmp_path / "out"
    prepare([root], out, progress=False)
    before = tree_snapshot(out)
    calls = []
    real_add = prepare_module.ShardWriter.add

    def add_then_fail(self, row):
        calls.append(row["case_id"])
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real_add(self, row)

    monkeypatch.setattr(prepare_module.ShardWriter, "add", add_then_fail)
    with pytest.raises(OSError, match="No space left"):
        prepare([root], out, PrepareOptions(seed=1, cases_per_shard=1), progress=False)
    assert len(calls) == 4  # three shards had been written to the temporary folder
    assert tree_snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task09_Mid", "out"]


def test_reader_gives_ray_dataset_of_selected_cases(prepared_benchmark, ray_session):
    splits = read_splits(prepared_benchmark)
    target = read_manifest(prepared_benchmark)["target_source"]
    ids = select_case_ids(prepared_benchmark, label_fraction=1.0, sources=[target])
    assert ids == splits["sources"][target]["label_fractions"]["1"]
    rows = read_cases(prepared_benchmark, label_fraction=1.0, sources=[target]).take_all()
    assert sorted(r["case_id"] for r in rows) == ids
    direct = load_case(prepared_benchmark, rows[0]["case_id"])
    assert np.array_equal(rows[0]["image"], direct["image"])
    assert np.array_equal(rows[0]["label"], direct["label"])
    assert rows[0]["image"].dtype == np.float32 and rows[0]["label"].dtype == np.uint8
    unlabelled = read_cases(prepared_benchmark, split="unlabelled").take(1)[0]
    assert not unlabelled["labelled"] and (unlabelled["label"] == UNLABELLED).all()


def test_reader_makes_a_block_per_shard_or_more(prepared_benchmark, ray_session):
    manifest = read_manifest(prepared_benchmark)
    ids = sorted(manifest["cases"])
    shards = {manifest["cases"][i]["shard"] for i in ids}
    per_shard = read_cases(prepared_benchmark, case_ids=ids, num_cpus=0.5).materialize()
    assert per_shard.num_blocks() == len(shards) and per_shard.count() == len(ids)
    more = read_cases(prepared_benchmark, case_ids=ids, num_cpus=0.5, blocks=3 * len(shards))
    more = more.materialize()
    assert more.num_blocks() > len(shards) and more.count() == len(ids)


def test_inspect_cli_summarises(prepared_benchmark):
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "inspect", str(prepared_benchmark)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for expected in (
        "Task09_SynthSpleen",
        "spleen",
        "kidney_left",
        "label fractions",
        "unlabelled",
    ):
        assert expected in text


@pytest.mark.slow
def test_the_cli_imports_torch_and_monai_only_to_transform_cases():
    """``python -m data_prep --help``, ``inspect`` and ``synthetic`` answer without the 3-5 s
    that importing torch and MONAI takes; the transforms import them where they run."""
    code = (
        "import sys\n"
        "import data_prep.cli, data_prep.prepare, data_prep.preprocess\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
        "data_prep.preprocess.build_transforms(data_prep.preprocess.get_preset('ct'), 'CT', True)\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "['monai', 'torch']"], proc.stdout


@pytest.mark.slow
def test_prepare_shuts_down_the_ray_it_started(tmp_path):
    """A caller that prepares data, then starts Ray its own way (another address, other
    resources, as the sweep and the benchmarks do), must not find prepare's instance."""
    root = make_msd(tmp_path / "Task09_Own", n=2)
    code = (
        "import sys, ray\n"
        "from data_prep.prepare import prepare\n"
        "prepare([sys.argv[1]], sys.argv[2], progress=False)\n"
        "assert not ray.is_initialized(), 'prepare left its Ray instance running'\n"
        "ray.init(num_cpus=1, include_dashboard=False)\n"
        "ray.shutdown()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "manifest.json").exists()
