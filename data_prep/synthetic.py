"""The built-in benchmark: procedural abdominal-CT-like phantoms in MSD layout.

Each case is a phantom of ``data_prep.phantom``: a body with organs as deformed ellipsoids in
Hounsfield-like units, blur, an intensity bias and scanner noise. Spleen and liver
overlap in intensity, so only shape and position tell them apart. Sources differ like
scanners do (voxel spacing, axis orientation, noise level) and each labels a different subset
of organs (partial labels); one pool is unlabelled; the target task labels only the spleen,
which no other source annotates. Everything is deterministic by seed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.layouts import BENCHMARK_FILE
from data_prep.phantom import EXTENT_MM, make_phantom


@dataclass(frozen=True)
class SourceSpec:
    folder: str
    description: str
    labels: tuple[str, ...]  # organs this source annotates (empty: unlabelled pool)
    cases: dict[str, int]  # size -> number of cases
    spacing: tuple[tuple[float, float], tuple[float, float]]  # (in-plane range, slice range) mm
    flip_xy: bool  # stored LPS-like (as many DICOM conversions are)
    noise_hu: tuple[float, float]


SOURCES = (
    SourceSpec(
        "Task09_SynthSpleen",
        "spleen target task",
        ("spleen",),
        {"small": 40, "medium": 60, "study": 90},
        ((1.1, 1.6), (2.0, 3.0)),
        True,
        (10.0, 22.0),
    ),
    SourceSpec(
        "Task20_SynthLiver",
        "liver-only source",
        ("liver",),
        {"small": 10, "medium": 30, "study": 10},
        ((1.2, 1.7), (2.0, 2.5)),
        False,
        (8.0, 15.0),
    ),
    SourceSpec(
        "Task21_SynthKidney",
        "kidney source",
        ("kidney_left", "kidney_right"),
        {"small": 10, "medium": 30, "study": 10},
        ((1.0, 1.4), (1.5, 2.5)),
        True,
        (12.0, 25.0),
    ),
    SourceSpec(
        "Task22_SynthAbdomen",
        "multi-organ source without spleen",
        ("liver", "aorta", "stomach", "pancreas"),
        {"small": 10, "medium": 30, "study": 10},
        ((1.3, 1.8), (2.5, 3.0)),
        False,
        (10.0, 20.0),
    ),
    SourceSpec(
        "Task23_SynthUnlabelled",
        "unlabelled pool (imagesTs only)",
        (),
        {"small": 16, "medium": 60, "study": 16},
        ((1.1, 1.8), (2.0, 3.0)),
        True,
        (8.0, 25.0),
    ),
)
TARGET = SOURCES[0].folder
# (val, test) shares of each source's labelled cases when the benchmark is prepared. "study"
# splits its 90 target cases into 10 validation, 30 test and 50 training cases: a test mean over
# 30 cases, selection on 10, and two labelled cases at 5 % (docs/data.md)
SPLIT_RATIOS = {"small": (0.2, 0.2), "medium": (0.2, 0.2), "study": (10 / 90, 30 / 90)}


def _affine(spacing, shape, flip_xy: bool) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)]
    if flip_xy:  # store with x and y reversed (LPS-like); the world position stays the same
        for k in range(2):
            affine[k, 3] = -affine[k, 3]
            affine[k, k] = -affine[k, k]
    return affine


def _write_case(
    root: Path, stem: str, image, label, spacing, flip_xy: bool, with_label: bool, images_dir: str
) -> None:
    affine = _affine(spacing, image.shape, flip_xy)
    if flip_xy:
        image, label = image[::-1, ::-1], label[::-1, ::-1]
    hu = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, affine), root / images_dir / f"{stem}.nii.gz")
    if with_label:
        nib.save(
            nib.Nifti1Image(np.ascontiguousarray(label), affine),
            root / "labelsTr" / f"{stem}.nii.gz",
        )


def write_source(
    spec: SourceSpec, root: Path, seed: int, size: str, max_cases: int | None = None
) -> None:
    """Write one source in MSD layout: imagesTr/labelsTr (or imagesTs) and dataset.json."""
    labelled = bool(spec.labels)
    images_dir = "imagesTr" if labelled else "imagesTs"
    (root / images_dir).mkdir(parents=True)
    if labelled:
        (root / "labelsTr").mkdir()
    label_values = {name: i + 1 for i, name in enumerate(spec.labels)}
    stems = []
    count = spec.cases[size] if max_cases is None else min(max_cases, spec.cases[size])
    for index in range(count):
        rng = np.random.default_rng([seed, sum(map(ord, spec.folder)), index])
        (lo, hi), (zlo, zhi) = spec.spacing
        inplane = rng.uniform(lo, hi)
        spacing = (inplane, inplane, rng.uniform(zlo, zhi))
        image, masks = make_phantom(rng, size, spacing, rng.uniform(*spec.noise_hu))
        label = np.zeros(image.shape, dtype=np.uint8)
        for name, value in label_values.items():
            label[masks[name]] = value
        stem = f"{spec.folder.split('_', 1)[1].lower()}_{index:03d}"
        _write_case(root, stem, image, label, spacing, spec.flip_xy, labelled, images_dir)
        stems.append(stem)
    dataset = {
        "name": spec.folder,
        "description": f"mixcl_ray synthetic benchmark: {spec.description}",
        "reference": "procedural phantom, data_prep.synthetic",
        "licence": "CC-BY-SA 4.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(v): n for n, v in label_values.items()}},
        "numTraining": len(stems) if labelled else 0,
        "numTest": 0 if labelled else len(stems),
        "training": [
            {"image": f"./imagesTr/{s}.nii.gz", "label": f"./labelsTr/{s}.nii.gz"} for s in stems
        ]
        if labelled
        else [],
        "test": [] if labelled else [f"./imagesTs/{s}.nii.gz" for s in stems],
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=1))


def generate(
    out: str | os.PathLike,
    seed: int = 0,
    size: str = "small",
    progress: bool = True,
    max_cases: int | None = None,
) -> Path:
    """Write the whole benchmark under OUT (atomically): one MSD folder per source and
    ``benchmark.json`` naming the sources and the target task."""
    if size not in EXTENT_MM:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(EXTENT_MM)}")
    from tqdm.auto import tqdm

    out = Path(out).absolute()
    if out.exists() and not (out / BENCHMARK_FILE).exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a synthetic benchmark; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for spec in tqdm(SOURCES, desc="synthetic sources", unit="source", disable=not progress):
            write_source(spec, tmp / spec.folder, seed, size, max_cases)
        (tmp / BENCHMARK_FILE).write_text(
            json.dumps(
                {
                    "name": "mixcl_ray synthetic abdomen",
                    "seed": seed,
                    "size": size,
                    "max_cases": max_cases,
                    "sources": [s.folder for s in SOURCES],
                    "target": TARGET,
                    "labels": {s.folder: list(s.labels) for s in SOURCES},
                },
                indent=1,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
