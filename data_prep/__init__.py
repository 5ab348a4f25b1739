"""Data preparation for mixcl_ray: NIfTI datasets -> Parquet shards + manifest.json + splits.json.

Pipeline order: ``layouts`` (find the cases a dataset declares) -> ``validate`` (reject bad
input with a message that names the case) -> ``preprocess`` (MONAI transforms, once) ->
``writer`` (Parquet shards, manifest) with ``splits`` (seeded, nested label fractions), run in
parallel by ``prepare``. ``reader`` turns a prepared folder into a ``ray.data.Dataset``;
``synthetic`` writes the built-in benchmark. This package never imports ``mixcl_ray``.
"""

from data_prep.errors import DataPrepError

SCHEMA_VERSION = 1

__all__ = ["DataPrepError", "SCHEMA_VERSION"]
