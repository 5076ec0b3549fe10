"""Local paths and s3:// URIs behind one small API (boto3 with the standard AWS configuration).

S3 requests are retried at two levels. botocore retries each request (throttling, 5xx, connection errors) under a
policy taken from the standard AWS settings, AWS_RETRY_MODE and AWS_MAX_ATTEMPTS (or `retry_mode` and
`max_attempts` in the profile), defaulting here to standard mode with 10 attempts: a 25% rate of 503 SlowDown then
fails one request in a million, where botocore's default of 3 attempts fails one in 64. botocore cannot retry a
response whose body is cut off after the call returned (a GET read later by the caller), so this module does:
read_bytes and read_range issue the GET again, and open_read resumes with a ranged GET from the last byte it
delivered (pinned to the object's ETag), up to the same number of attempts, with jittered exponential backoff.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import logging
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_MODES = ("legacy", "standard", "adaptive")
DEFAULT_RETRY_MODE = "standard"
DEFAULT_MAX_ATTEMPTS = 10
BACKOFF_S = 0.1  # our own retries of cut bodies wait up to BACKOFF_S * 2**attempt (full jitter), at most MAX_BACKOFF_S
MAX_BACKOFF_S = 5.0
_jitter = random.Random()  # retry timing only: never data


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


@functools.cache
def s3_retry_policy() -> tuple[str, int]:
    """(retry mode, total attempts per request): AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, else the profile's retry_mode /
    max_attempts, else standard mode with DEFAULT_MAX_ATTEMPTS. A bad value is a ConfigError naming its setting."""
    import botocore.session

    from mm1data.config import ConfigError, short

    scoped = botocore.session.get_session().get_scoped_config()
    mode = os.environ.get("AWS_RETRY_MODE") or scoped.get("retry_mode") or DEFAULT_RETRY_MODE
    attempts = os.environ.get("AWS_MAX_ATTEMPTS") or scoped.get("max_attempts") or DEFAULT_MAX_ATTEMPTS
    if mode not in RETRY_MODES:
        raise ConfigError(f"AWS_RETRY_MODE / retry_mode must be one of {', '.join(RETRY_MODES)}, got {short(mode)}")
    try:
        attempts = int(attempts)
    except ValueError:
        attempts = 0
    if attempts < 1:
        raise ConfigError(f"AWS_MAX_ATTEMPTS / max_attempts must be an integer >= 1, got {short(attempts)}")
    return mode, attempts


@functools.cache
def s3_client():
    # boto3 honours AWS_ENDPOINT_URL(_S3), profiles and the usual credential chain; one client per process.
    import boto3
    from botocore.config import Config

    mode, attempts = s3_retry_policy()
    return boto3.client("s3", config=Config(retries={"mode": mode, "total_max_attempts": attempts}))


class _BodyCut(Exception):
    """A response body that failed while being read, after botocore's retries were over (the call had returned)."""


def _read_body(body: Any, amt: int | None = None) -> bytes:
    """body.read(amt), with any failure while reading (ResponseStreamingError, IncompleteReadError, a timeout, a
    reset connection) turned into _BodyCut, which _with_retries retries. botocore checks the length it got
    against Content-Length, so a short body fails here rather than passing as data."""
    try:
        return body.read(amt)
    except Exception as e:
        raise _BodyCut(f"{type(e).__name__}: {e}") from e


def _retryable() -> tuple[type[BaseException], ...]:
    from botocore.parsers import ResponseParserError

    # ResponseParserError: botocore reads a non-streaming body (a listing's XML) without checking its length, so
    # a cut one fails to parse
    return _BodyCut, ResponseParserError


def _with_retries(what: str, fn: Callable[[], T]) -> T:
    """fn(), again after a body cut mid-read; other errors (botocore has retried them already) propagate."""
    attempts = s3_retry_policy()[1]
    for attempt in range(attempts):
        try:
            return fn()
        except _retryable() as e:
            if attempt == attempts - 1:
                _raise_cause(e)
            log.info("%s: %s; retrying (%d of %d)", what, e, attempt + 2, attempts)
            _sleep(attempt)
    raise AssertionError("unreachable")


def _raise_cause(e: BaseException) -> None:
    """Out of attempts: raise what botocore raised (ResponseStreamingError, ...), not the internal _BodyCut."""
    if isinstance(e, _BodyCut) and e.__cause__ is not None:
        raise e.__cause__
    raise e


def _sleep(attempt: int) -> None:
    time.sleep(_jitter.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt)))


# A forked process (a DataLoader worker, a multiprocessing pool) must not share the parent's cached client and its
# pooled connections: the child starts without one and makes its own on first use.
os.register_at_fork(after_in_child=s3_client.cache_clear)


TMP_PREFIX = ".tmp-mm1data-"  # files being written: invisible to readers, removed when a killed run is finished


def create_temp(directory: str, prefix: str = TMP_PREFIX, suffix: str = "") -> tuple[int, str]:
    """Like tempfile.mkstemp (a new file, O_EXCL, an fd open for writing), but created with mode 0666 so that the
    umask decides its permissions as for any file a tool writes (mkstemp's 0600 would survive the final rename)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        path = os.path.join(directory, f"{prefix}{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _with_retries(f"GET {uri}", lambda: _read_body(s3_client().get_object(Bucket=bucket, Key=key)["Body"]))
    return Path(uri).read_bytes()


def open_read(uri: str) -> IO[bytes]:
    """A binary stream; S3 objects are streamed, not copied to disk (a cut connection resumes where it stopped)."""
    if is_s3(uri):
        return io.BufferedReader(_S3Stream(uri), 1 << 20)
    return open(uri, "rb")


class _S3Stream(io.RawIOBase):
    """One GET of an S3 object read as a stream. When the body fails mid-read, the rest is fetched with a ranged
    GET from the first byte not yet delivered, conditional on the ETag of the first response (an object replaced
    in between fails with 412 instead of splicing two versions); after `attempts` failures without progress the
    error is raised."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.pos, self.etag, self.size = 0, None, None
        self._body = None
        self._open()

    def _open(self) -> None:
        kwargs = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        if self.etag:
            kwargs["IfMatch"] = self.etag
        resp = s3_client().get_object(Bucket=self.bucket, Key=self.key, **kwargs)
        if self.size is None:
            self.etag, self.size = resp.get("ETag"), resp["ContentLength"]
        self._body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        failures = 0
        while self.pos < self.size:
            try:
                if self._body is None:
                    self._open()
                data = _read_body(self._body, len(buf))
                if not data:  # botocore raises on a short body; an empty read before the end is a cut as well
                    raise _BodyCut(f"the body ended at byte {self.pos} of {self.size}")
            except _BodyCut as e:
                failures += 1
                self._close_body()
                if failures >= s3_retry_policy()[1]:
                    _raise_cause(e)
                log.info("GET %s: %s at byte %d; resuming (%d)", self.uri, e, self.pos, failures)
                _sleep(failures - 1)
                continue
            buf[: len(data)] = data
            self.pos += len(data)
            return len(data)
        return 0

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # a broken connection may fail to close: it is dropped anyway
                pass
        self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic: a local file is written under a temporary name and renamed; an S3 object appears whole."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _with_retries(f"PUT {uri}", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    fd, tmp = create_temp(os.path.dirname(uri) or ".", suffix=os.path.basename(uri))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def put_file(local_path: str, uri: str) -> None:
    """Move a finished local file to `uri` atomically (rename locally, whole upload to S3)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        # multipart upload: invisible until complete; botocore retries each part, we retry a cut reply
        _with_retries(f"upload {uri}", lambda: s3_client().upload_file(local_path, bucket, key))
        os.unlink(local_path)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    try:
        os.replace(local_path, uri)
    except OSError:  # another filesystem: copy under a temp name next to the target, then rename
        tmp = os.path.join(os.path.dirname(uri), TMP_PREFIX + os.path.basename(uri))
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, uri)
        os.unlink(local_path)


def local_tmp_dir(uri: str) -> str:
    """Where to build a file that ends up at `uri`: beside it locally (so rename is atomic), else /tmp."""
    if is_s3(uri):
        return tempfile.gettempdir()
    d = os.path.dirname(uri) or "."
    os.makedirs(d, exist_ok=True)
    return d


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Sorted files under a directory or prefix, or matching a glob, or the file itself."""
    return [u for u, _ in list_sizes(uri, recursive)]


def list_sizes(uri: str, recursive: bool = True) -> list[tuple[str, int]]:
    """list_files with each file's size in bytes (from the listing itself: no request per file)."""
    has_glob = any(c in uri for c in "*?[")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.split("*")[0].split("?")[0].split("[")[0] if has_glob else key
        if not recursive:
            prefix = prefix.rstrip("/") + "/"
        out = []
        for u, size in _s3_listing(f"s3://{bucket}/{prefix}", recursive).items():
            k = u[len(f"s3://{bucket}/") :]
            if has_glob and not fnmatch.fnmatchcase(k, key):
                continue
            if not has_glob and k != key and not k.startswith(key.rstrip("/") + "/"):
                continue
            out.append((u, size))
        return sorted(out)
    if has_glob:
        import glob

        paths = sorted(p for p in glob.glob(uri, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(uri):
        paths = sorted(str(p) for p in (Path(uri).rglob("*") if recursive else Path(uri).iterdir()) if p.is_file())
    else:
        paths = [uri] if os.path.isfile(uri) else []
    return [(p, os.path.getsize(p)) for p in paths]


def _s3_listing(prefix_uri: str, recursive: bool = True) -> dict[str, int]:
    """{s3 URI: size} of the objects whose key starts with the prefix (directly in it, when not recursive),
    one listing (retried whole when a page comes back cut)."""
    bucket, prefix = split_s3(prefix_uri)

    def listing() -> dict[str, int]:
        pages = s3_client().get_paginator("list_objects_v2")
        kwargs = {} if recursive else {"Delimiter": "/"}
        return {
            f"s3://{bucket}/{o['Key']}": o["Size"]
            for page in pages.paginate(Bucket=bucket, Prefix=prefix, **kwargs)
            for o in page.get("Contents", [])
        }

    return _with_retries(f"LIST {prefix_uri}", listing)


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    elif os.path.exists(uri):
        os.unlink(uri)


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path for `uri`: the path itself, or a cached download of an s3:// object (model weights)."""
    if not is_s3(uri):
        return uri
    import hashlib

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "mm1data")
    dest = os.path.join(cache_dir, hashlib.sha256(uri.encode()).hexdigest()[:16], os.path.basename(uri))
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        bucket, key = split_s3(uri)
        tmp = f"{dest}.{os.getpid()}.part"
        _with_retries(f"download {uri}", lambda: s3_client().download_file(bucket, key, tmp))
        os.replace(tmp, dest)
    return dest


def read_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file or object (an S3 ranged GET)."""
    if stop <= start:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        get = lambda: s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")  # noqa: E731
        return _with_retries(f"GET {uri} bytes {start}-{stop - 1}", lambda: _read_body(get()["Body"]))
    with open(uri, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


def open_seekable(uri: str, buffer_size: int = 1 << 20) -> IO[bytes]:
    """A seekable binary file (parquet reads only the footer and the columns it needs): a local file, or an
    S3 object read by ranged GETs through the same boto3 client as everything else."""
    if not is_s3(uri):
        return open(uri, "rb", buffering=buffer_size)
    return io.BufferedReader(_S3RangeReader(uri), buffer_size=buffer_size)


class _S3RangeReader(io.RawIOBase):
    """Seekable raw reader over one S3 object; each read is one ranged GET. boto3 has no seekable object
    file, and pyarrow's S3 filesystem would be a second credential and endpoint path (it ignores
    AWS_ENDPOINT_URL)."""

    def __init__(self, uri: str) -> None:
        self.bucket, self.key = split_s3(uri)
        self.size = s3_client().head_object(Bucket=self.bucket, Key=self.key)["ContentLength"]
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        data = read_range(f"s3://{self.bucket}/{self.key}", self.pos, self.pos + n)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def size(uri: str) -> int:
    """Size in bytes of a file or object."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(uri)
