"""One way to read and write any URI: a local path, file://, or s3:// (s3fs).

S3 settings come from the standard environment variables only (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL for MinIO or a moto server); nothing secret is ever taken from a config.

Writes are atomic under the final name: the bytes go to a temporary sibling first and are
moved into place only after the writer finished without an exception. A job killed or
failing mid-write leaves at most a `.tmp-*` object, never a half file under the real name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from iqa_spider.config import ConfigError

TMP_PREFIX = ".tmp-"
log = logging.getLogger(__name__)


# Credentials a URI may carry: user:password@ in its authority, and secrets in its query
# (tokens, presigned-URL signatures). Nothing that reaches MLflow (params, tags, the config
# artifact, decision.json), an error message or a log line keeps them.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
_SECRET_QUERY = re.compile(r"(?i)(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|"
                           r"x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig)=)[^&\s'\"]*")
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{REDACTED}", text)


def _s3_options() -> dict:
    opts: dict = {
        # botocore retries throttling and 5xx with backoff; "standard" mode also retries
        # connection errors, which is what a flaky endpoint produces. AWS_MAX_ATTEMPTS (the
        # AWS SDKs' own variable) overrides the 8, e.g. for a service that must fail fast.
        "config_kwargs": {"retries": {"max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or 8),
                                      "mode": "standard"}},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI. Local paths come back absolute."""
    uri = str(uri)
    if is_s3(uri):
        fs, path = fsspec.core.url_to_fs(uri, **_s3_options())
        return fs, path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    base = str(base)
    if is_s3(base) or base.startswith("file://"):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of get_fs for paths a listing returned."""
    if isinstance(fs, LocalFileSystem):
        return path
    return f"s3://{path}"


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def require_input(uri: str, key: str) -> None:
    """A job's pre-flight: its input `uri` exists and can be read, else a ConfigError naming
    the config `key`. Without it a mistyped path or bucket lists as empty and the job
    "succeeds" on nothing."""

    try:
        fs, path = get_fs(uri)
        fs.invalidate_cache(path)
        found = fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - no credentials, access denied, endpoint down: say which, in one line
        raise ConfigError(f"{uri} cannot be read: {type(exc).__name__}: {exc}", key=key) from None
    if not found:
        raise ConfigError(f"{uri}: no such file or folder", key=key)


def read_bytes(uri: str) -> bytes:
    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a read can raise when storage, not the object, failed: s3fs turns most S3 errors into
    OSError, but passes botocore's (endpoint unreachable, stream cut, no credentials yet) and
    aiohttp's through as they are."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError

        errors.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


def read_with_retry(uri: str, attempts: int = 4, backoff_s: float = 0.5, reader=None) -> bytes:
    """Read one object, retrying transient errors (connection, 5xx, throttling left after
    botocore's own retries) with exponential backoff and jitter. A missing object or a denied
    one is not retried."""
    reader = reader or read_bytes
    transient = transient_errors()
    for attempt in range(1, attempts + 1):
        try:
            return reader(uri)
        except (FileNotFoundError, PermissionError):
            raise
        except transient as exc:
            if attempt == attempts:
                raise
            wait = backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("read %s failed (%s: %s); retry %d/%d in %.2fs", uri, type(exc).__name__, exc, attempt,
                        attempts - 1, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def open_read(uri: str, mode: str = "rb") -> IO:
    fs, path = get_fs(uri)
    return fs.open(path, mode)


def makedirs(uri: str) -> None:
    fs, path = get_fs(uri)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Open `uri` for writing so that it appears only complete, or not at all."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    fs, path = get_fs(uri)
    parent, name = posixpath.split(path)  # local paths are POSIX too: Linux is the target
    tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
    if isinstance(fs, LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
    f = fs.open(tmp, mode)
    try:
        yield f
    except BaseException:
        _discard(fs, f, tmp)
        raise
    f.close()
    try:
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, path)  # atomic rename on POSIX
        else:
            # S3 has no rename: a server-side copy publishes the object in one step
            # (readers see the old object or the whole new one), then the temp key goes.
            fs.copy(tmp, path)
            fs.rm(tmp)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def _discard(fs: fsspec.AbstractFileSystem, f: IO, tmp: str) -> None:
    # s3fs would upload what was buffered if we called close(); discard() drops it instead.
    discard = getattr(f, "discard", None)
    with contextlib.suppress(Exception):
        if discard is not None:
            discard()
            f.closed = True  # else its __del__ would try to flush the discarded buffer
        else:
            f.close()
    with contextlib.suppress(Exception):
        if fs.exists(tmp):
            fs.rm(tmp)


def remove(uri: str) -> None:
    """Delete one file (object); a missing one is not an error."""
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_write(uri, "wb") as f:
        f.write(data)


def copy_tree(src_uri: str, dst_uri: str) -> int:
    """Copy every file below `src_uri` to the same relative key below `dst_uri` (any URIs),
    each file written atomically; returns how many. For model folders and the like: small
    numbers of large files, read whole."""
    base = src_uri.rstrip("/")
    count = 0
    for uri in iter_files(base):
        write_bytes(join(dst_uri, relative_key(base, uri)), read_bytes(uri))
        count += 1
    return count


def iter_files(uri: str, suffixes: tuple[str, ...] | None = None) -> Iterator[str]:
    """Every file below `uri` (recursively, in sorted order per folder), as URIs.

    Walks one folder listing at a time rather than listing the whole tree first, so the
    first keys of a bucket of millions come back at once. Temporary files of unfinished
    atomic writes and hidden files are skipped.
    """
    fs, root = get_fs(uri)
    # s3fs caches listings per process; files written since (by Ray workers, other jobs) would
    # be invisible to a second listing in this process.
    fs.invalidate_cache(root)
    if fs.isfile(root):
        yield to_uri(fs, root)
        return
    if not fs.isdir(root):
        raise FileNotFoundError(f"{uri}: no such file or folder")
    lowered = tuple(s.lower() for s in suffixes) if suffixes else None
    # fsspec's default (on_error="omit") lists a folder it cannot read (access denied,
    # throttled, network down) as empty: a job would then succeed on part of its input.
    for dirpath, dirnames, filenames in fs.walk(root, on_error="raise"):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if lowered and not name.lower().endswith(lowered):
                continue
            yield to_uri(fs, posixpath.join(dirpath, name))


def is_below(uri: str, folder_uri: str) -> bool:
    """True if `uri` lies inside `folder_uri` on the same filesystem: what keeps a job's output
    folder, placed inside its input folder, from being read back as input. No S3 client is made."""
    if is_s3(uri) != is_s3(folder_uri):
        return False

    def path(u: str) -> str:
        return u.split("://", 1)[1] if is_s3(u) else get_fs(u)[1]

    return path(uri).startswith(path(folder_uri).rstrip("/") + "/")


def relative_key(base_uri: str, uri: str) -> str:
    """`uri`'s path below `base_uri` (its file name if it is not below it): what names an input
    wherever its collection is stored or copied."""
    base = get_fs(base_uri)[1].rstrip("/")
    path = get_fs(uri)[1]
    rel = path[len(base):].lstrip("/") if path.startswith(base + "/") else posixpath.basename(path)
    return rel or posixpath.basename(path)


def arrow_path_uri(like_uri: str, path: str) -> str:
    """The URI of `path`, a path in the filesystem ``arrow_filesystem(like_uri)`` returned
    (pyarrow's S3 paths drop the scheme: "bucket/key")."""
    return f"s3://{path}" if is_s3(like_uri) and not is_s3(path) else path


def arrow_filesystem(uri: str):
    """(pyarrow FileSystem, path) for Ray Data and Ray Train, with the same S3 settings as get_fs."""
    import pyarrow.fs as pafs

    fs, path = get_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
