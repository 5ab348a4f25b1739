"""Folders that are either local paths or object-store URIs (``s3://bucket/prefix``,
``gs://bucket/prefix``, anything ``pyarrow.fs.FileSystem.from_uri`` resolves).

Local paths stay ``pathlib.Path``; a URI stays a string, its query (``?endpoint_override=...``)
kept on every joined child so that the same filesystem options reach every reader. Credentials
come from the usual environment (``AWS_ACCESS_KEY_ID``..., ``AWS_ENDPOINT_URL`` for an S3-
compatible server, ``GOOGLE_APPLICATION_CREDENTIALS``), never from our logs: ``describe`` drops
the query (which may hold ``secret_key=``) from anything printed.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from pathlib import Path

Location = Path | str


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def as_location(location: str | os.PathLike) -> Location:
    """A URI as it is, ``file://`` and plain paths as an absolute ``Path``."""
    text = str(location)
    if is_remote(text):
        return text
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text).absolute()


def join(location: Location, *parts: str) -> Location:
    location = as_location(location)
    if isinstance(location, Path):
        return location.joinpath(*parts)
    base, sep, query = location.partition("?")
    return posixpath.join(base.rstrip("/"), *parts) + sep + query


def describe(location: Location) -> str:
    """For messages: a URI without its query (which may carry keys)."""
    return str(location).partition("?")[0]


def resolve(location: Location):
    """(pyarrow filesystem, path on it)."""
    import pyarrow.fs as pafs

    location = as_location(location)
    if isinstance(location, Path):
        return pafs.LocalFileSystem(), str(location)
    return pafs.FileSystem.from_uri(location)


def exists(location: Location) -> bool:
    import pyarrow.fs as pafs

    location = as_location(location)
    if isinstance(location, Path):
        return location.exists()
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: Location) -> bool:
    import pyarrow.fs as pafs

    location = as_location(location)
    if isinstance(location, Path):
        return location.is_file()
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: Location) -> bytes:
    location = as_location(location)
    if isinstance(location, Path):
        return location.read_bytes()
    fs, path = resolve(location)
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{describe(location)} not found") from None


def read_text(location: Location) -> str:
    return read_bytes(location).decode()


def write_bytes(location: Location, data: bytes) -> None:
    """Replace the file whole: locally via a temporary file and a rename; on an object store a
    single put, which readers never see half-written."""
    location = as_location(location)
    if isinstance(location, Path):
        location.parent.mkdir(parents=True, exist_ok=True)
        tmp = location.with_name(f".{location.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, location)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode())


def list_names(location: Location) -> list[str]:
    """Names of the entries directly inside a folder ([] when it does not exist)."""
    import pyarrow.fs as pafs

    location = as_location(location)
    if isinstance(location, Path):
        return sorted(p.name for p in location.iterdir()) if location.is_dir() else []
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def list_files(location: Location) -> list[str]:
    """Paths, relative to ``location``, of every file under it ([] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File)


def upload_folder(local: Path, location: Location) -> None:
    """Copy a local folder's files under ``location`` (which may be local too)."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local).absolute()), path, pafs.LocalFileSystem(), fs)


def open_for_torch(location: Location):
    """What ``torch.load`` takes: the local path, or the object's bytes in memory."""
    location = as_location(location)
    return location if isinstance(location, Path) else io.BytesIO(read_bytes(location))
