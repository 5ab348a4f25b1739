"""Where ``prepare`` writes: OUT is refused when it holds something else, replaced atomically
on local disk (two renames, the old one removed after), or uploaded under an object-store
prefix as a new version that its manifest switches to last."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from data_prep import locations
from data_prep.errors import DataPrepError
from data_prep.reader import MANIFEST, SPLITS


def swap_in(tmp: Path, out: Path) -> None:
    """Replace OUT by tmp with two renames; the old OUT is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


VERSION_PATTERN = r"v-\d{8}T\d{6}-[0-9a-f]{6}"  # an upload's version folder
# test-only fault injection: the upload fails after this many shards (tests/test_object_store.py)
FAIL_AFTER_SHARDS_ENV = "DATA_PREP_FAIL_AFTER_SHARDS"


def upload(tmp: Path, out: str, shards: list[str]) -> None:
    """Put a finished local output under an object-store prefix without ever half-writing it.

    The shards and splits go under a new version folder (``<out>/v-<time>-<id>/``), which no
    reader sees yet; then ``manifest.json``, naming that version's shards and splits, replaces
    the old one in one write: the switch. Until then the old manifest and everything it names
    stay as they were, so an upload that dies leaves the previous output readable and the same
    command finishes the next time. Objects the new manifest does not name (older versions, a
    dead upload's leftovers) are removed last."""
    fs, path = locations.resolve(out)
    version = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"  # VERSION_PATTERN
    fail_after = int(os.environ.get(FAIL_AFTER_SHARDS_ENV, "-1"))
    fs.create_dir(path, recursive=True)
    for done, shard in enumerate(shards):
        if done == fail_after:
            raise RuntimeError(f"{FAIL_AFTER_SHARDS_ENV}: upload stopped after {done} shards")
        locations.write_bytes(locations.join(out, version, shard), (tmp / shard).read_bytes())
    locations.write_bytes(locations.join(out, version, SPLITS), (tmp / SPLITS).read_bytes())
    manifest = json.loads((tmp / MANIFEST).read_text())
    for case in manifest["cases"].values():
        case["shard"] = f"{version}/{case['shard']}"
    manifest["shards"] = [f"{version}/{shard}" for shard in manifest["shards"]]
    manifest["splits"] = f"{version}/{SPLITS}"
    locations.write_text(locations.join(out, MANIFEST), json.dumps(manifest, indent=1))
    keep = {MANIFEST, manifest["splits"], *manifest["shards"]}
    for name in locations.list_files(out):
        if name not in keep:
            fs.delete_file(f"{path}/{name}")


def check_out(out) -> None:
    if locations.is_remote(out):
        names = locations.list_names(out)
        # what an upload that died before its first manifest leaves: version folders only
        ours = all(re.fullmatch(VERSION_PATTERN, n) for n in names)
        if names and MANIFEST not in names and not ours and locations.exists(out):
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
