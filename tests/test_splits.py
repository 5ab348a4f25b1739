import pytest

from data_prep.splits import make_splits


def _cases(n, source="a", labelled=True, given=None):
    return [(f"{source}/c{i:02d}", source, labelled, given) for i in range(n)]


def test_splits_are_deterministic_and_disjoint():
    cases = _cases(40) + _cases(10, "b") + _cases(5, "u", labelled=False)
    first = make_splits(cases, seed=7)
    assert first == make_splits(list(reversed(cases)), seed=7)
    assert first != make_splits(cases, seed=8)
    train, val, test = set(first["train"]), set(first["val"]), set(first["test"])
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 50
    assert first["unlabelled"] == [f"u/c{i:02d}" for i in range(5)]
    assert (len(first["sources"]["a"]["val"]), len(first["sources"]["a"]["test"])) == (8, 8)


def test_label_fractions_are_nested_inside_train_with_at_least_one_case():
    splits = make_splits(_cases(40) + _cases(7, "b"), seed=1)
    for source in ("a", "b"):
        fractions = splits["sources"][source]["label_fractions"]
        previous = set()
        for key in ("0.05", "0.15", "0.25", "0.5", "1"):
            subset = set(fractions[key])
            assert len(subset) >= 1
            assert previous <= subset
            assert subset <= set(splits["sources"][source]["train"])
            previous = subset
        assert fractions["1"] == splits["sources"][source]["train"]
    assert len(splits["sources"]["a"]["label_fractions"]["0.05"]) == 1  # round(0.05 * 24)
    assert len(splits["sources"]["a"]["label_fractions"]["0.5"]) == 12


def test_label_subsets_are_nested_families_on_other_cases():
    """A study repeats a fraction on K seeded subsets: each is nested like label_fractions
    (subset 0 is label_fractions itself), and they draw other cases."""
    from data_prep.splits import SUBSETS

    splits = make_splits(_cases(40), seed=1)
    source = splits["sources"]["a"]
    subsets = source["label_subsets"]
    assert len(subsets) == SUBSETS >= 3 and subsets[0] == source["label_fractions"]
    for nested in subsets:
        previous = set()
        for key in ("0.05", "0.15", "0.25", "0.5", "1"):
            assert previous <= set(nested[key]) <= set(source["train"])
            previous = set(nested[key])
        assert nested["1"] == source["train"]
    assert len({tuple(n["0.15"]) for n in subsets}) == SUBSETS  # other labelled cases
    assert make_splits(_cases(40), seed=1)["sources"]["a"]["label_subsets"] == subsets


def test_given_split_is_honoured():
    cases = [(f"btcv/img{i:02d}", "btcv", True, "train" if i < 24 else "val") for i in range(30)]
    splits = make_splits(cases, seed=0)
    assert splits["train"] == [f"btcv/img{i:02d}" for i in range(24)]
    assert splits["val"] == [f"btcv/img{i:02d}" for i in range(24, 30)]
    assert splits["test"] == []
    assert splits["sources"]["btcv"]["given_split"] is True


def test_adding_a_source_does_not_change_another_sources_split():
    alone = make_splits(_cases(20), seed=3)["sources"]["a"]
    together = make_splits(_cases(20) + _cases(12, "z"), seed=3)["sources"]["a"]
    assert alone == together


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_ratio": 1.0},
        {"test_ratio": -0.1},
        {"val_ratio": 0.5, "test_ratio": 0.5},
        {"fractions": (0.0, 1.0)},
    ],
)
def test_bad_split_options_raise(kwargs):
    with pytest.raises(ValueError):
        make_splits(_cases(10), **kwargs)


def test_fine_tuning_reads_the_subset_it_is_given(tmp_path):
    import json

    from data_prep import SCHEMA_VERSION
    from mixcl_ray.finetune_feed import finetune_case_ids

    splits = make_splits(_cases(40), seed=1)
    manifest = {"schema_version": SCHEMA_VERSION, "sources": {"a": {}}, "target_source": "a"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    subsets = splits["sources"]["a"]["label_subsets"]
    for k in range(len(subsets)):
        assert finetune_case_ids(tmp_path, 0.15, subset=k) == subsets[k]["0.15"]
    with pytest.raises(ValueError, match="label subset 3 is not in .*it has 3"):
        finetune_case_ids(tmp_path, 0.15, subset=3)
    del splits["sources"]["a"]["label_subsets"]  # prepared by an earlier version
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    assert finetune_case_ids(tmp_path, 0.15) == subsets[0]["0.15"]
    with pytest.raises(ValueError, match="prepare the data again"):
        finetune_case_ids(tmp_path, 0.15, subset=1)
