"""Where runs write: checked before any compute, so that a read-only or mistyped --storage is a
clear error at start instead of a failed checkpoint an hour later."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class StorageError(ValueError):
    """The storage folder cannot be created or written."""


def ensure_writable(folder: str | os.PathLike, what: str = "storage") -> Path:
    """Create ``folder`` if needed and prove it writable with a temporary file; returns its
    absolute path. Raises StorageError naming the folder and the reason."""
    path = Path(folder).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise StorageError(
            f"{what} folder {path} is not writable ({reason}); pass a writable --storage "
            "(on a cluster: a folder every node mounts at the same path)"
        ) from None
    return path
