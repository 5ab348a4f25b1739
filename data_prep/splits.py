"""Seeded train/val/test splits and nested label-fraction subsets (``splits.json``).

Per source: a split the dataset file gives (BTCV's training/validation lists) is kept as is;
otherwise the labelled cases are shuffled with a seed derived from (seed, source name) and cut
into test, val and train. Label-fraction subsets are prefixes of one seeded permutation of a
source's training cases, so 5 % is inside 15 %, which is inside 25 %, 50 % and 100 %; each
holds at least one case. ``label_subsets`` holds SUBSETS such nested families, each from its own
permutation, so that a study can repeat a fraction on other labelled cases (subset 0 is
``label_fractions``). Unlabelled cases form their own list. Adding a source does not change
another source's splits.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence

import numpy as np

LABEL_FRACTIONS = (0.05, 0.15, 0.25, 0.5, 1.0)
SUBSETS = 3  # nested label-fraction families per source


def fraction_key(fraction: float) -> str:
    return f"{float(fraction):g}"


def _rng(seed: int, source: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(source.encode()), zlib.crc32(purpose.encode())])


def _cut(n: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """Number of (val, test) cases out of n labelled ones; train keeps at least one."""
    if n < 3:
        return 0, 0
    n_test = max(1, round(n * test_ratio)) if test_ratio > 0 else 0
    n_val = max(1, round(n * val_ratio)) if val_ratio > 0 else 0
    while n_val + n_test > n - 1:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def split_source(
    source: str,
    cases: Iterable[tuple[str, bool, str | None]],
    *,
    seed: int,
    val_ratio: float,
    test_ratio: float,
    fractions: Sequence[float] = LABEL_FRACTIONS,
) -> dict:
    """Split one source. ``cases``: (case_id, labelled, given_split) triples."""
    cases = sorted(cases)
    labelled = [c for c in cases if c[1]]
    unlabelled = [c[0] for c in cases if not c[1]]
    given = any(c[2] for c in labelled)
    if given:
        train = [c[0] for c in labelled if c[2] == "train"]
        val = [c[0] for c in labelled if c[2] == "val"]
        test = [c[0] for c in labelled if c[2] == "test"]
    else:
        ids = [c[0] for c in labelled]
        order = _rng(seed, source, "split").permutation(len(ids))
        shuffled = [ids[i] for i in order]
        n_val, n_test = _cut(len(ids), val_ratio, test_ratio)
        test = sorted(shuffled[:n_test])
        val = sorted(shuffled[n_test : n_test + n_val])
        train = sorted(shuffled[n_test + n_val :])
    subsets = []
    for subset in range(SUBSETS):
        purpose = "fractions" if subset == 0 else f"fractions-{subset}"
        order = [train[i] for i in _rng(seed, source, purpose).permutation(len(train))]
        nested = {}
        for fraction in sorted(fractions):
            k = max(1, round(fraction * len(train))) if train else 0
            nested[fraction_key(fraction)] = sorted(order[:k])
        subsets.append(nested)
    return {
        "given_split": given,
        "train": sorted(train),
        "val": sorted(val),
        "test": sorted(test),
        "unlabelled": sorted(unlabelled),
        "label_fractions": subsets[0],
        "label_subsets": subsets,
    }


def make_splits(
    cases: Iterable[tuple[str, str, bool, str | None]],
    *,
    seed: int = 0,
    val_ratio: float = 0.2,
    test_ratio: float = 0.2,
    fractions: Sequence[float] = LABEL_FRACTIONS,
) -> dict:
    """Build ``splits.json`` content from (case_id, source, labelled, given_split) tuples."""
    for name, value in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not 0 <= val_ratio + test_ratio < 1:
        raise ValueError(f"val_ratio + test_ratio must be below 1, got {val_ratio + test_ratio}")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"label fractions must be in (0, 1], got {bad}")
    by_source: dict[str, list[tuple[str, bool, str | None]]] = {}
    for case_id, source, labelled, given in cases:
        by_source.setdefault(source, []).append((case_id, labelled, given))
    sources = {
        name: split_source(
            name, items, seed=seed, val_ratio=val_ratio, test_ratio=test_ratio, fractions=fractions
        )
        for name, items in sorted(by_source.items())
    }
    merged = {
        key: sorted(c for s in sources.values() for c in s[key])
        for key in ("train", "val", "test", "unlabelled")
    }
    merged["label_fractions"] = {
        fraction_key(f): sorted(
            c for s in sources.values() for c in s["label_fractions"][fraction_key(f)]
        )
        for f in sorted(fractions)
    }
    return {
        "seed": seed,
        "val_ratio": val_ratio,
        "test_ratio": test_ratio,
        "fractions": [float(f) for f in sorted(fractions)],
        **merged,
        "sources": sources,
    }
