"""Find the cases a dataset folder declares: MSD, BTCV (MONAI's dataset_0.json) or a plain folder.

Everything here only reads the dataset *file* and the file system; NIfTI contents are checked
later, per case, in ``validate``. Errors name the dataset file or the case and the problem.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import DataPrepError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
BENCHMARK_FILE = "benchmark.json"


@dataclass(frozen=True)
class CaseEntry:
    """One image (and optionally its label) as a dataset declares it."""

    case_id: str  # "<source>/<stem>", unique in a corpus
    source: str
    image: Path
    label: Path | None
    given_split: str | None = None  # "train"/"val" when the dataset file fixes it


@dataclass(frozen=True)
class SourceDataset:
    """A dataset folder with its own label space (which classes it annotates)."""

    name: str
    root: Path
    layout: str  # "msd" | "btcv" | "folder"
    modality: str  # "CT" | "MR"
    labels: dict[int, str]  # source label value -> class name; 0 is background
    cases: tuple[CaseEntry, ...] = field(default=())
    dataset_file: Path | None = None


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith((".", "._"))


def resolve_inside(root: Path, relative: str, *, where: str) -> Path:
    """Resolve a path from a dataset file; refuse one that escapes the dataset root."""
    if not isinstance(relative, str) or not relative.strip():
        raise DataPrepError(f"expected a file path, got {relative!r}", path=where)
    root = root.resolve()
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise DataPrepError(
            f"path {relative!r} escapes the dataset root {root}; dataset files may only "
            "name files inside their own folder",
            path=where,
        )
    return candidate


def load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataPrepError(
            f"malformed dataset file: not valid JSON ({err.msg} at line {err.lineno})",
            path=str(path),
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataPrepError(f"cannot read dataset file: {err}", path=str(path)) from None
    if not isinstance(data, dict):
        raise DataPrepError("malformed dataset file: top level must be an object", path=str(path))
    return data


def _parse_labels(raw: object, where: str) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise DataPrepError(
            "malformed dataset file: 'labels' must be a non-empty object", path=where
        )
    labels: dict[int, str] = {}
    for key, name in raw.items():
        # nnU-Net v2 writes {"background": 0, "spleen": 1}; MSD writes {"0": "background"}.
        if isinstance(name, int) and not str(key).lstrip("-").isdigit():
            key, name = name, key
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DataPrepError(
                f"malformed dataset file: label key {key!r} is not an integer", path=where
            ) from None
        if not 0 <= value <= 254 or not isinstance(name, str) or not name.strip():
            raise DataPrepError(
                f"malformed dataset file: label {key!r}: {name!r} must map 0..254 to a name",
                path=where,
            )
        labels[value] = normalise_class_name(name)
    if labels.get(0) is None:
        labels[0] = "background"
    return dict(sorted(labels.items()))


def normalise_class_name(name: str) -> str:
    return re.sub(r"\s+", "_", name.strip().lower())


def _parse_modality(raw: object, where: str) -> str:
    if raw is None:
        return "CT"
    values = list(raw.values()) if isinstance(raw, dict) else [raw]
    if len(values) != 1:
        raise DataPrepError(
            f"dataset declares {len(values)} modalities {values}; mixcl_ray expects one 3D "
            "channel (CT or MR)",
            path=where,
        )
    text = str(values[0]).upper()
    if text == "CT":
        return "CT"
    if text in {"MR", "MRI"} or text.startswith(("T1", "T2", "FLAIR", "ADC", "DWI")):
        return "MR"
    raise DataPrepError(f"unknown modality {values[0]!r}; expected CT or MR", path=where)


def _entry_paths(entry: object, where: str) -> tuple[str, str | None]:
    if isinstance(entry, str):
        return entry, None
    if isinstance(entry, dict) and "image" in entry:
        return entry["image"], entry.get("label")
    raise DataPrepError(
        f"malformed dataset file: entry {entry!r} needs an 'image' (and 'label') path", path=where
    )


def read_dataset_file(root: Path, dataset_file: Path, source: str | None = None) -> SourceDataset:
    """Read an MSD ``dataset.json`` or MONAI's BTCV ``dataset_0.json``."""
    where = str(dataset_file)
    data = load_json(dataset_file)
    layout = "btcv" if "validation" in data else "msd"
    name = source or root.name
    labels = _parse_labels(data.get("labels"), where)
    modality = _parse_modality(data.get("modality"), where)
    lists = {"training": "train", "validation": "val"}
    cases: list[CaseEntry] = []
    for key, given in lists.items():
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise DataPrepError(f"malformed dataset file: '{key}' must be a list", path=where)
        for entry in entries:
            image_rel, label_rel = _entry_paths(entry, where)
            if label_rel is None:
                raise DataPrepError(
                    f"malformed dataset file: '{key}' entry {image_rel!r} has no 'label'",
                    path=where,
                )
            image = resolve_inside(root, image_rel, where=where)
            label = resolve_inside(root, label_rel, where=where)
            split = given if layout == "btcv" else None
            cases.append(CaseEntry(f"{name}/{nifti_stem(image)}", name, image, label, split))
    test = data.get("test", [])
    if not isinstance(test, list):
        raise DataPrepError("malformed dataset file: 'test' must be a list", path=where)
    for entry in test:
        image_rel, label_rel = _entry_paths(entry, where)
        image = resolve_inside(root, image_rel, where=where)
        label = resolve_inside(root, label_rel, where=where) if label_rel else None
        cases.append(CaseEntry(f"{name}/{nifti_stem(image)}", name, image, label, None))
    if not cases:
        raise DataPrepError(
            "dataset file lists no cases ('training', 'validation', 'test')", path=where
        )
    return SourceDataset(name, root, layout, modality, labels, tuple(cases), dataset_file)


_PAIR_FOLDERS = (("imagesTr", "labelsTr"), ("images", "labels"))


def _match_label(image: Path, label_dir: Path) -> Path | None:
    stem = nifti_stem(image)
    # nnU-Net names images case_0000.nii.gz (channel 0) and labels case.nii.gz
    candidates = [stem, re.sub(r"_0000$", "", stem)]
    for base in candidates:
        for suffix in NIFTI_SUFFIXES:
            path = label_dir / f"{base}{suffix}"
            if path.exists():
                return path
    return None


def read_plain_folder(root: Path, source: str | None = None) -> SourceDataset:
    """A folder of image/label pairs: ``images/`` + ``labels/`` (or ``imagesTr``/``labelsTr``)
    with matching file names, or ``NAME.nii.gz`` beside ``NAME_label.nii.gz`` / ``NAME_seg.nii.gz``.

    Class names come from an optional ``labels.json`` (``{"0": "background", "1": "liver"}``);
    without it the folder is taken as binary (1 = foreground) and any other label value is
    reported as undeclared.
    """
    name = source or root.name
    labels_file = root / "labels.json"
    labels = (
        _parse_labels(load_json(labels_file), str(labels_file))
        if labels_file.exists()
        else {0: "background", 1: "foreground"}
    )
    modality = "CT"
    if (root / "modality.txt").exists():
        modality = _parse_modality((root / "modality.txt").read_text().strip(), str(root))
    pairs: list[tuple[Path, Path | None]] = []
    for image_dir_name, label_dir_name in _PAIR_FOLDERS:
        image_dir = root / image_dir_name
        if image_dir.is_dir():
            label_dir = root / label_dir_name
            for image in sorted(p for p in image_dir.iterdir() if _is_nifti(p)):
                label = _match_label(image, label_dir) if label_dir.is_dir() else None
                pairs.append((image, label))
            break
    else:
        files = sorted(p for p in root.iterdir() if _is_nifti(p))
        label_re = re.compile(r"_(label|seg|mask|gt)$")
        label_files = {
            label_re.sub("", nifti_stem(p)): p for p in files if label_re.search(nifti_stem(p))
        }
        for image in files:
            if label_re.search(nifti_stem(image)):
                continue
            pairs.append((image, label_files.get(nifti_stem(image))))
    if not pairs:
        raise DataPrepError(
            "no dataset.json, dataset_0.json or NIfTI image/label pairs found "
            "(expected images/ + labels/, imagesTr/ + labelsTr/, or NAME.nii.gz + NAME_label.nii.gz)",
            path=str(root),
        )
    cases = tuple(
        CaseEntry(
            f"{name}/{re.sub(r'_0000$', '', nifti_stem(img))}",
            name,
            img.resolve(),
            lbl.resolve() if lbl else None,
        )
        for img, lbl in pairs
    )
    return SourceDataset(name, root, "folder", modality, labels, cases, None)


def read_dataset(root: str | os.PathLike, source: str | None = None) -> SourceDataset:
    """Read one dataset folder, whichever of the three layouts it has."""
    root = Path(root)
    if not root.is_dir():
        raise DataPrepError("dataset folder does not exist or is not a folder", path=str(root))
    for file_name in ("dataset.json", "dataset_0.json"):
        if (root / file_name).exists():
            return read_dataset_file(root, root / file_name, source)
    return read_plain_folder(root, source)
