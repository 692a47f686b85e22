"""Small files by URI: a local path, or anything pyarrow's filesystems open (s3://, gs://, file://...).

Statistics, normalizers, run configs and step markers go through here, so a
run path on an object store needs no shared filesystem between nodes. Writes
are atomic: a temporary sibling renamed over the target locally, a single
object PUT on object stores.

Object stores are configured by their clients' standard environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...), which pyarrow and Lance both read, so rayattr has no storage settings of its
own; ``reachable`` turns a client's failure to reach the store into one line.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

from rayattr.config import RayattrError

# How the clients report a store they cannot talk to: Lance's object_store ("Generic S3 error: ... error
# sending request", "... 403 Forbidden") and pyarrow's S3FileSystem (the AWS SDK's "AWS Error NETWORK_CONNECTION").
_CLIENT = re.compile(r"Generic \w+ error|AWS Error")
_FAILURE = re.compile(r"error sending request|tcp connect error|connection refused|connection reset|dns error|"
                      r"timed out|NETWORK_CONNECTION|ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|"
                      r"403 Forbidden", re.IGNORECASE)
_ENDPOINT = re.compile(r"https?://[^/\s\"')]+|(?<=connect to )[\w.-]+:\d+")


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


def remove_empty_tree(uri: str) -> None:
    """Delete a directory that holds no file at any depth (a run path a refused command created, so bad input
    leaves nothing behind); anything else is left as it is."""
    fs, path = _resolve(str(uri))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    if all(info.type == pafs.FileType.Directory for info in infos):
        fs.delete_dir(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Names of the files directly under ``uri`` ending in ``suffix`` (empty when it does not exist)."""
    fs, path = _resolve(str(uri))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


@contextmanager
def reachable(uri: str) -> Iterator[None]:
    """Re-raise an object store's network or credential failure, in this process or in a Ray worker and however
    wrapped, as one line naming the store and the way on (the clients' own errors are pages of trace)."""
    try:
        yield
    except Exception as exc:
        failure = store_failure(exc)
        if failure is None:
            raise
        raise RayattrError(f"cannot reach the object store of {uri} ({failure}); check the endpoint and credentials "
                           "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...), then rerun to resume: committed rows and "
                           "completed steps are kept") from exc


def store_failure(exc: BaseException | None) -> str | None:
    """``"ENDPOINT: what failed"`` when ``exc`` or an error in its chain is a client failing to reach an object
    store; None otherwise."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        failure = _FAILURE.search(text)
        if failure and _CLIENT.search(text):
            endpoint = _ENDPOINT.search(text)
            return f"{endpoint.group()}: {failure.group()}" if endpoint else failure.group()
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
