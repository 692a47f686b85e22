"""Small files by URI: a local path, or anything pyarrow's filesystems open (s3://, gs://, file://...).

Statistics, normalizers, run configs and step markers go through here, so a
run path on an object store needs no shared filesystem between nodes. Writes
are atomic: a temporary sibling renamed over the target locally, a single
object PUT on object stores.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs

from rayattr.config import RayattrError


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:  # ArrowInvalid is a ValueError
            raise RayattrError(f"cannot open {uri!r} ({exc}); check the URI scheme and credentials") from exc
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_local(uri: str) -> bool:
    return "://" not in str(uri)


def absolute(uri: str) -> str:
    """A local path made absolute (processes that run elsewhere, such as Ray Train workers, start in
    other directories); URIs as they are."""
    return os.path.abspath(uri) if is_local(uri) else str(uri)


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` for local paths and URIs alike."""
    uri = str(uri)
    return posixpath.join(uri, *parts) if not is_local(uri) else os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = _resolve(str(uri))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = _resolve(str(uri))
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, payload: bytes) -> None:
    """Write ``payload`` to ``uri`` atomically, creating parent directories.

    A failed write (disk full, no permission) leaves the old file, or none,
    and raises a RayattrError naming the file.
    """
    uri = str(uri)
    try:
        if is_local(uri):
            _write_local(os.path.abspath(uri), payload)
            return
        fs, path = _resolve(uri)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(payload)
    except OSError as exc:
        raise RayattrError(f"cannot write {uri} ({exc}); free space or fix permissions, then rerun: "
                           "completed steps and committed rows are kept") from exc


def _write_local(path: str, payload: bytes) -> None:
    """Temp file, fsync, rename; the temp file is removed when anything fails."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove(uri: str) -> None:
    """Delete a file if it exists."""
    fs, path = _resolve(str(uri))
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def remove_tree(uri: str) -> None:
    """Delete a directory and everything under it, if it exists."""
    fs, path = _resolve(str(uri))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Names of the files directly under ``uri`` ending in ``suffix`` (empty when it does not exist)."""
    fs, path = _resolve(str(uri))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
