"""The built-in benchmark: deterministic, labels as declared, partial labels, hard organs."""

import json

import nibabel as nib
import numpy as np
import pytest

from data_prep.phantom import EXTENT_MM, ORGAN_HU, make_phantom
from data_prep.splits import split_source
from data_prep.synthetic import SOURCES, SPLIT_RATIOS, TARGET, generate


def _arrays(root):
    return {
        p.relative_to(root).as_posix(): np.asarray(nib.load(p).dataobj)
        for p in sorted(root.rglob("*.nii.gz"))
    }


@pytest.mark.slow
def test_deterministic_by_seed(tmp_path):
    a = _arrays(generate(tmp_path / "a", seed=11, max_cases=1, progress=False))
    b = _arrays(generate(tmp_path / "b", seed=11, max_cases=1, progress=False))
    c = _arrays(generate(tmp_path / "c", seed=12, max_cases=1, progress=False))
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(a[k].shape == c[k].shape and np.array_equal(a[k], c[k]) for k in a)


def test_label_values_match_declared_organs(synthetic_benchmark):
    bench = json.loads((synthetic_benchmark / "benchmark.json").read_text())
    assert bench["target"] == TARGET and bench["sources"] == [s.folder for s in SOURCES]
    annotating_spleen = []
    for spec in SOURCES:
        dataset = json.loads((synthetic_benchmark / spec.folder / "dataset.json").read_text())
        declared = {int(k): v for k, v in dataset["labels"].items()}
        assert sorted(declared.values()) == sorted(["background", *spec.labels])
        if "spleen" in spec.labels:
            annotating_spleen.append(spec.folder)
        if not spec.labels:
            assert dataset["training"] == [] and len(dataset["test"]) > 0
            continue
        for entry in dataset["training"]:
            label = np.asarray(nib.load(synthetic_benchmark / spec.folder / entry["label"]).dataobj)
            present = set(np.unique(label).tolist())
            assert present == set(declared), (entry, present)  # every declared organ is visible
    assert annotating_spleen == [TARGET]  # the target organ is labelled nowhere else


def test_spleen_and_liver_overlap_in_intensity():
    liver, spleen = [], []
    for i in range(6):
        rng = np.random.default_rng([5, i])
        image, masks = make_phantom(rng, "small", (1.5, 1.5, 2.5), noise_hu=15.0)
        liver.append(np.median(image[masks["liver"]]))
        spleen.append(np.median(image[masks["spleen"]]))
    # the per-case organ means overlap: intensity alone does not tell spleen from liver
    assert min(spleen) < max(liver) and min(liver) < max(spleen)
    assert abs(ORGAN_HU["spleen"][0] - ORGAN_HU["liver"][0]) < ORGAN_HU["spleen"][1]


def test_flipped_sources_store_the_same_world_anatomy(synthetic_benchmark):
    flipped = next(s for s in SOURCES if s.flip_xy)
    path = next((synthetic_benchmark / flipped.folder).rglob("*.nii.gz"))
    affine = nib.load(path).affine
    assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0


@pytest.mark.parametrize("size", sorted(SPLIT_RATIOS))
def test_every_size_keeps_the_target_organ_out_of_pretraining(size):
    """The design rule: the target organ is labelled by the target task only, at every size."""
    target_organs = set(SOURCES[0].labels)
    assert SOURCES[0].folder == TARGET
    for spec in SOURCES[1:]:
        assert not target_organs & set(spec.labels), spec.folder
        assert spec.cases[size] > 0


def test_study_benchmark_has_power_at_cpu_cost():
    """The study size: at least 10 validation and 30 test cases of the target, and every seeded
    label subset has at least two labelled cases at 5 %, nested in 15 % and 100 %; its volumes
    are the small ones."""
    val_ratio, test_ratio = SPLIT_RATIOS["study"]
    spec = SOURCES[0]
    cases = [(f"{TARGET}/case_{i:03d}", True, None) for i in range(spec.cases["study"])]
    split = split_source(TARGET, cases, seed=0, val_ratio=val_ratio, test_ratio=test_ratio)
    assert len(split["val"]) >= 10 and len(split["test"]) >= 30
    assert len(split["train"]) == spec.cases["study"] - len(split["val"]) - len(split["test"])
    assert len(split["label_subsets"]) >= 3
    firsts = set()
    for subset in split["label_subsets"]:
        five, fifteen, full = (set(subset[k]) for k in ("0.05", "0.15", "1"))
        assert len(five) >= 2
        assert five <= fifteen <= full == set(split["train"])
        firsts.add(tuple(sorted(five)))
    assert len(firsts) == len(split["label_subsets"])  # different labelled cases per subset
    assert EXTENT_MM["study"] == EXTENT_MM["small"]
