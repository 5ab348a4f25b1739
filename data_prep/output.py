"""Where ``prepare`` writes: OUT is refused when it holds something else, replaced atomically
on local disk (two renames, the old one removed after), or uploaded under an object-store
prefix with its manifest last."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from data_prep import locations
from data_prep.errors import DataPrepError
from data_prep.reader import MANIFEST, SPLITS
from data_prep.writer import SHARD_DIR


def swap_in(tmp: Path, out: Path) -> None:
    """Replace OUT by tmp with two renames; the old OUT is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def upload(tmp: Path, out: str, shards: list[str]) -> None:
    """Put a finished local output under an object-store prefix. The old manifest goes first
    (readers then see "not prepared", never a mix), the new one last; old shards that the new
    output does not name are removed at the end."""
    import pyarrow.fs as pafs

    fs, path = locations.resolve(out)
    old = [f"{SHARD_DIR}/{n}" for n in locations.list_names(locations.join(out, SHARD_DIR))]
    if MANIFEST in locations.list_names(out):
        fs.delete_file(f"{path}/{MANIFEST}")
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(tmp / SHARD_DIR), f"{path}/{SHARD_DIR}", pafs.LocalFileSystem(), fs)
    locations.write_bytes(locations.join(out, SPLITS), (tmp / SPLITS).read_bytes())
    locations.write_bytes(locations.join(out, MANIFEST), (tmp / MANIFEST).read_bytes())
    for name in old:
        if name not in shards:
            fs.delete_file(f"{path}/{name}")


def check_out(out) -> None:
    if locations.is_remote(out):
        names = locations.list_names(out)
        if names and MANIFEST not in names and locations.exists(out):
            raise DataPrepError(
                "output prefix holds other objects and no manifest.json; refusing to write "
                "into it: choose another --out",
                path=locations.describe(out),
            )
        return
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())
    ):
        raise DataPrepError(
            "output exists and is not a data_prep output (no manifest.json); refusing to "
            "replace it: choose another --out or remove it",
            path=str(out),
        )
