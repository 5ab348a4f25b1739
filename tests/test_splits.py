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
