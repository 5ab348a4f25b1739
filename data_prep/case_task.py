"""One case of ``prepare``, as a Ray task: read and check the files, preprocess, map the labels
to the corpus's class ids, and return the Parquet row with the case's statistics, or an error
that names the case, the file and the cause (a bad case never raises out of the task)."""

from __future__ import annotations

import warnings

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.layouts import CaseEntry
from data_prep.preprocess import (
    Preset,
    TransformError,
    body_mask,
    preprocess_arrays,
    root_cause,
)
from data_prep.validate import read_case
from data_prep.writer import case_row


def _stats(raw: np.ndarray, label: np.ndarray | None, modality: str, preset: Preset) -> dict:
    if label is not None and label.any():
        mask = label > 0
    else:
        mask = body_mask(raw, modality, preset)
    values = raw[mask] if mask.any() else raw.ravel()
    p_lo, p_hi = np.percentile(values, [0.5, 99.5])
    return {
        "foreground_mean": float(values.mean()),
        "foreground_std": float(values.std()),
        "foreground_p00_5": float(p_lo),
        "foreground_p99_5": float(p_hi),
    }


def process_case(
    case: CaseEntry, ds_labels: dict[int, str], lut: np.ndarray, preset: Preset, modality: str
) -> dict:
    """Read, check and preprocess one case. Returns the row and statistics, or an error dict."""
    warnings.simplefilter("ignore", FutureWarning)
    try:
        raw = read_case(case.image, case.label, ds_labels, case=case.case_id)
        image, label, affine = preprocess_arrays(raw.image, raw.affine, raw.label, preset, modality)
        stats = _stats(raw.image, raw.label, preset.modality or modality, preset)
        if label is not None:
            label = lut[label]
            if not label.any():
                raise DataPrepError(
                    "label is empty after resampling and cropping (the labelled structure is "
                    "smaller than one voxel at the target spacing)",
                    case=case.case_id,
                    path=str(case.label),
                )
        annotated = sorted({int(lut[v]) for v in ds_labels if v})
        row = case_row(
            case_id=case.case_id,
            source=case.source,
            image=image,
            label=label,
            affine=affine,
            annotated_classes=annotated,
            image_file=str(case.image),
            label_file=str(case.label) if case.label else None,
        )
    except DataPrepError as err:
        return {"error": str(err), "case": case.case_id, "path": err.path}
    except Exception as err:  # a failing step, or an unforeseen failure: case, file, cause
        if isinstance(err, TransformError):
            problem = str(err)
        else:
            problem = f"{type(root_cause(err)).__name__}: {root_cause(err)}"
        where = str(case.image)
        error = DataPrepError(problem, case=case.case_id, path=where)
        return {"error": str(error), "case": case.case_id, "path": where}
    voxels = np.bincount(label.ravel(), minlength=1) if label is not None else np.zeros(0)
    return {
        "row": row,
        "info": {
            "source": case.source,
            "labelled": label is not None,
            "given_split": case.given_split,
            "shape": list(image.shape),
            "voxels_per_class": {str(i): int(n) for i, n in enumerate(voxels) if n},
            "intensity": stats,
            "image_file": str(case.image),
            "label_file": str(case.label) if case.label else None,
            "image_sha256": raw.image_sha256,
            "label_sha256": raw.label_sha256,
            "input_bytes": case.image.stat().st_size
            + (case.label.stat().st_size if case.label else 0),
        },
    }
