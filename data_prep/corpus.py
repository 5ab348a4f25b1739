"""The corpus of one ``prepare`` before any work: a benchmark root expanded into its source
folders (``expand_dataset_args``), and the sources checked together: no two with one name, no
case or file listed twice, missing files named (``check_corpus``)."""

from __future__ import annotations

import os
from pathlib import Path

from data_prep.errors import DataPrepError
from data_prep.layouts import BENCHMARK_FILE, CaseEntry, SourceDataset, load_json, resolve_inside


def expand_dataset_args(paths: list[str | os.PathLike]) -> tuple[list[Path], str | None]:
    """Expand a benchmark root (a folder with ``benchmark.json``) into its source folders.

    Returns the dataset folders and the target source the benchmark names (or None).
    """
    folders: list[Path] = []
    target = None
    for raw in paths:
        path = Path(raw)
        bench = path / BENCHMARK_FILE
        if bench.exists():
            spec = load_json(bench)
            sources = spec.get("sources")
            if not isinstance(sources, list) or not sources:
                raise DataPrepError("'sources' must be a non-empty list", path=str(bench))
            folders.extend(resolve_inside(path, s, where=str(bench)) for s in sources)
            target = spec.get("target", target)
        else:
            folders.append(path)
    return folders, target


def check_corpus(datasets: list[SourceDataset]) -> dict[str, DataPrepError]:
    """Refuse duplicate sources and duplicate entries before any work starts.

    Returns the cases whose image or label file is missing, with their error, so that the
    caller can stop on them or skip them.
    """
    missing: dict[str, DataPrepError] = {}
    names: dict[str, Path] = {}
    seen_case: dict[str, CaseEntry] = {}
    seen_file: dict[Path, str] = {}
    for ds in datasets:
        if ds.name in names:
            raise DataPrepError(
                f"two datasets share the source name '{ds.name}' ({names[ds.name]} and {ds.root})"
            )
        names[ds.name] = ds.root
        where = str(ds.dataset_file or ds.root)
        for case in ds.cases:
            if case.case_id in seen_case:
                raise DataPrepError(
                    "duplicate entry: the case is listed twice", case=case.case_id, path=where
                )
            seen_case[case.case_id] = case
            for kind, path in (("image", case.image), ("label", case.label)):
                if path is None:
                    continue
                if path in seen_file:
                    raise DataPrepError(
                        f"duplicate entry: {kind} file is also used by case '{seen_file[path]}'",
                        case=case.case_id,
                        path=str(path),
                    )
                seen_file[path] = case.case_id
                if not path.is_file() and case.case_id not in missing:
                    missing[case.case_id] = DataPrepError(
                        f"missing {kind} file", case=case.case_id, path=str(path)
                    )
    return missing
