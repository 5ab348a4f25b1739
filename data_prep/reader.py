"""Read a prepared folder: manifest, splits, single cases, and a ``ray.data.Dataset`` of cases.

Decoded cases are dicts with ``image`` (X, Y, Z) float32 and ``label`` (X, Y, Z) uint8 in
global class ids; an unlabelled case's label is filled with ``UNLABELLED`` (255) so that
downstream code cannot mistake "not annotated" for background.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq

from data_prep import SCHEMA_VERSION, locations
from data_prep.errors import DataPrepError
from data_prep.splits import fraction_key

UNLABELLED = 255
MANIFEST = "manifest.json"
SPLITS = "splits.json"


def _load(out: str | os.PathLike, name: str) -> dict:
    try:
        text = locations.read_text(locations.join(out, name))
    except FileNotFoundError:
        raise DataPrepError(
            f"{name} not found: is this the --out folder of `python -m data_prep prepare`?",
            path=locations.describe(locations.as_location(out)),
        ) from None
    return json.loads(text)


def read_manifest(out: str | os.PathLike) -> dict:
    manifest = _load(out, MANIFEST)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataPrepError(
            f"prepared with schema version {manifest.get('schema_version')}, this version reads "
            f"{SCHEMA_VERSION}: run `python -m data_prep prepare` again",
            path=locations.describe(out),
        )
    return manifest


def read_splits(out: str | os.PathLike) -> dict:
    """splits.json: beside the manifest, or where the manifest says (an object-store output
    keeps it in the version its manifest switched to)."""
    return _load(out, _load(out, MANIFEST).get("splits", SPLITS))


def select_case_ids(
    out: str | os.PathLike,
    *,
    split: str | None = None,
    label_fraction: float | None = None,
    sources: list[str] | None = None,
) -> list[str]:
    """Case ids of a split ("train", "val", "test", "unlabelled"; None = all cases), optionally
    the label-fraction subset of train, optionally restricted to some sources."""
    manifest = read_manifest(out)
    if split is None and label_fraction is None:
        ids = list(manifest["cases"])
    else:
        splits = read_splits(out)
        if label_fraction is not None:
            key = fraction_key(label_fraction)
            if key not in splits["label_fractions"]:
                raise ValueError(
                    f"label fraction {label_fraction} is not in splits.json; available: "
                    f"{sorted(splits['label_fractions'], key=float)}"
                )
            ids = splits["label_fractions"][key]
        else:
            if split not in ("train", "val", "test", "unlabelled"):
                raise ValueError(f"unknown split {split!r}; use train, val, test or unlabelled")
            ids = splits[split]
    if sources is not None:
        unknown = set(sources) - set(manifest["sources"])
        if unknown:
            raise ValueError(
                f"unknown sources {sorted(unknown)}; known: {sorted(manifest['sources'])}"
            )
        ids = [i for i in ids if manifest["cases"][i]["source"] in sources]
    return sorted(ids)


def decode_case(row: dict) -> dict:
    """Turn a Parquet row into arrays. Used by ``read_cases`` (Ray Data) and ``load_case``."""
    shape = tuple(int(s) for s in row["shape"])
    image = np.frombuffer(row["image"], dtype=np.float32).reshape(shape)
    if row["label"] is not None:
        label = np.frombuffer(row["label"], dtype=np.uint8).reshape(shape)
    else:
        label = np.full(shape, UNLABELLED, dtype=np.uint8)
    return {
        "case_id": row["case_id"],
        "source": row["source"],
        "labelled": bool(row["labelled"]),
        "image": image,
        "label": label,
        "spacing": np.asarray(row["spacing"], dtype=np.float32),
        "affine": np.asarray(row["affine"], dtype=np.float64).reshape(4, 4),
        "annotated_classes": np.asarray(row["annotated_classes"], dtype=np.int16),
    }


def load_case(out: str | os.PathLike, case_id: str) -> dict:
    """One decoded case, read straight from its shard (no Ray needed)."""
    manifest = read_manifest(out)
    if case_id not in manifest["cases"]:
        raise KeyError(f"case '{case_id}' is not in {out}")
    fs, path = locations.resolve(locations.join(out, manifest["cases"][case_id]["shard"]))
    table = pq.read_table(path, filesystem=fs, filters=[("case_id", "=", case_id)])
    return decode_case(table.to_pylist()[0])


def read_cases(
    out: str | os.PathLike,
    *,
    split: str | None = None,
    label_fraction: float | None = None,
    sources: list[str] | None = None,
    case_ids: list[str] | None = None,
    decode: bool = True,
    num_cpus: float = 1.0,
    blocks: int | None = None,
):
    """A ``ray.data.Dataset`` with one row per selected case (see ``select_case_ids``, or the
    explicit ``case_ids``).

    Only the shards that hold selected cases are read. With ``decode=False`` rows keep the raw
    Parquet columns (volumes as bytes), which is cheaper to move around before sampling.
    ``num_cpus`` is what every read and decode task asks of the scheduler. The read makes one
    block per shard file, or ``blocks`` where that is more: a block is one task downstream,
    and a corpus streamed every epoch moves in pieces of a shard (whole-corpus blocks of 464
    cases held 2.9 GiB in the read tasks at the 16x memory benchmark).

    The read uses Ray Data's first Parquet datasource. Its successor (Ray 2.60's default)
    lists the files in a task that always asks for a whole CPU, which no node may have free
    while Train workers hold fractions of its CPUs: after a node was lost mid-run, a stream
    that reads every epoch waited for it forever. It also indexed the files' footers in a pool
    of actors that held 5.75 GiB at the peak of the 16x memory benchmark.
    """
    import ray.data
    from ray.data.expressions import col

    manifest = read_manifest(out)
    if case_ids is not None:
        unknown = sorted(set(case_ids) - set(manifest["cases"]))
        if unknown:
            raise ValueError(f"cases not in {out}: {unknown[:5]}")
        ids = sorted(case_ids)
    else:
        ids = select_case_ids(out, split=split, label_fraction=label_fraction, sources=sources)
    if not ids:
        raise ValueError(
            f"no case selected in {out} (split={split}, label_fraction={label_fraction}, sources={sources})"
        )
    shards = sorted({manifest["cases"][i]["shard"] for i in ids})
    fs, _ = locations.resolve(out)
    paths = [locations.resolve(locations.join(out, s))[1] for s in shards]
    # the datasource is chosen when read_parquet is called; the process's setting is restored
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            paths,
            filesystem=fs,
            num_cpus=num_cpus,
            override_num_blocks=max(blocks or 0, len(paths)),
        )
    finally:
        context.use_datasource_v2 = previous
    ds = ds.filter(expr=col("case_id").is_in(ids), num_cpus=num_cpus)
    return ds.map(decode_case, num_cpus=num_cpus) if decode else ds
