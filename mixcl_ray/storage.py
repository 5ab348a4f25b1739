"""Where runs write: a local folder (the default), a shared filesystem mounted on every node, or
an object-store URI such as ``s3://bucket/runs`` (any URI ``pyarrow.fs`` resolves; Ray Train and
Tune write checkpoints and trial state there themselves). Checked before any compute, so that a
read-only or mistyped --storage is a clear error at start instead of a failed checkpoint an hour
later."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from data_prep import locations
from data_prep.locations import Location


class StorageError(ValueError):
    """The storage folder cannot be created or written."""


def ensure_writable(folder: str | os.PathLike, what: str = "storage") -> Location:
    """Create ``folder`` if needed and prove it writable with a temporary file; returns its
    absolute path (a URI stays a string). Raises StorageError naming the folder and the
    reason."""
    location = locations.as_location(folder)
    if locations.is_remote(location):
        return _ensure_remote(location, what)
    path = location
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise StorageError(
            f"{what} folder {path} is not writable ({reason}); pass a writable --storage "
            "(on a cluster: a folder every node mounts at the same path, or an object-store URI)"
        ) from None
    return path


def _ensure_remote(location: str, what: str) -> str:
    probe = locations.join(location, f".write-test-{uuid.uuid4().hex[:8]}")
    try:
        fs, path = locations.resolve(location)
        fs.create_dir(path, recursive=True)
        locations.write_bytes(probe, b"")
        fs.delete_file(locations.resolve(probe)[1])
    except (OSError, ValueError) as err:  # pyarrow: unknown scheme, bucket, credentials
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StorageError(
            f"{what} location {locations.describe(location)} is not writable ({reason}); check "
            "the bucket and the credentials in the environment (AWS_ACCESS_KEY_ID..., "
            "AWS_ENDPOINT_URL for an S3-compatible server, GOOGLE_APPLICATION_CREDENTIALS)"
        ) from None
    return location


def local_scratch(location: Location, *parts: str) -> Path:
    """A local folder standing in for ``location/parts`` where a real local file is needed (a
    lock): the folder itself when local, else one under the system's temporary folder."""
    if not locations.is_remote(location):
        return Path(locations.join(location, *parts))
    import hashlib

    digest = hashlib.sha256(locations.describe(location).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir(), f"mixcl_ray-{digest}", *parts)
