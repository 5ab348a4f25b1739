"""Parquet shards of prepared cases: one case per row group, schema versioned in the metadata.

Columns: case_id, source, labelled, shape (3 int32), spacing (3 float32, mm), affine (16
float64, voxel -> RAS mm), image (float32 C-order bytes), label (uint8 C-order bytes, global
class ids; null when unlabelled), classes_present and annotated_classes (global class ids),
image_file, label_file. Volumes are raw bytes so that reading one is a zero-copy
``np.frombuffer(...).reshape(shape)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import SCHEMA_VERSION

SHARD_DIR = "shards"
SCHEMA_KEY = b"mixcl_ray.schema_version"

CASE_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("labelled", pa.bool_(), nullable=False),
        pa.field("shape", pa.list_(pa.int32(), 3), nullable=False),
        pa.field("spacing", pa.list_(pa.float32(), 3), nullable=False),
        pa.field("affine", pa.list_(pa.float64(), 16), nullable=False),
        pa.field("image", pa.large_binary(), nullable=False),
        pa.field("label", pa.large_binary(), nullable=True),
        pa.field("classes_present", pa.list_(pa.int16()), nullable=False),
        pa.field("annotated_classes", pa.list_(pa.int16()), nullable=False),
        pa.field("image_file", pa.string(), nullable=False),
        pa.field("label_file", pa.string(), nullable=True),
    ],
    metadata={SCHEMA_KEY: str(SCHEMA_VERSION).encode()},
)


def case_row(
    *,
    case_id: str,
    source: str,
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    annotated_classes: list[int],
    image_file: str,
    label_file: str | None,
) -> dict:
    """One Parquet row. image: (X, Y, Z) float32; label: (X, Y, Z) uint8 global ids or None."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    present = (
        np.flatnonzero(np.bincount(label.ravel(), minlength=1)).tolist()
        if label is not None
        else []
    )
    return {
        "case_id": case_id,
        "source": source,
        "labelled": label is not None,
        "shape": list(image.shape),
        "spacing": spacing.astype(np.float32).tolist(),
        "affine": affine.astype(np.float64).ravel().tolist(),
        "image": np.ascontiguousarray(image, dtype=np.float32).tobytes(),
        "label": None if label is None else np.ascontiguousarray(label, dtype=np.uint8).tobytes(),
        "classes_present": present,
        "annotated_classes": sorted(annotated_classes),
        "image_file": image_file,
        "label_file": label_file,
    }


class ShardWriter:
    """Writes rows into ``shards/shard-NNNNN.parquet`` files of at most ``cases_per_shard``."""

    def __init__(self, out_dir: Path, cases_per_shard: int = 8, compression: str = "zstd"):
        if cases_per_shard < 1:
            raise ValueError(f"cases_per_shard must be >= 1, got {cases_per_shard}")
        self.dir = Path(out_dir) / SHARD_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cases_per_shard = cases_per_shard
        self.compression = compression
        self._writer: pq.ParquetWriter | None = None
        self._count = 0
        self._index = -1
        self.shards: list[str] = []

    def add(self, row: dict) -> str:
        """Write one case as its own row group; return the shard's path relative to OUT."""
        if self._writer is None or self._count >= self.cases_per_shard:
            self._open_next()
        table = pa.Table.from_pylist([row], schema=CASE_SCHEMA)
        self._writer.write_table(table)
        self._count += 1
        return self.shards[-1]

    def _open_next(self) -> None:
        self.close()
        self._index += 1
        name = f"shard-{self._index:05d}.parquet"
        self._writer = pq.ParquetWriter(self.dir / name, CASE_SCHEMA, compression=self.compression)
        self._count = 0
        self.shards.append(f"{SHARD_DIR}/{name}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def schema_version_of(path: Path) -> int:
    metadata = pq.read_schema(path).metadata or {}
    return int(metadata.get(SCHEMA_KEY, b"0"))
