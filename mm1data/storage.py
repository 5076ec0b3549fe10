"""Local paths and s3:// URIs behind one small API (boto3 with the standard AWS configuration)."""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO


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
def s3_client():
    # boto3 honours AWS_ENDPOINT_URL(_S3), profiles and the usual credential chain; one client per process.
    import boto3

    return boto3.client("s3")


# A forked process (a DataLoader worker, a multiprocessing pool) must not share the parent's cached client and its
# pooled connections: the child starts without one and makes its own on first use.
os.register_at_fork(after_in_child=s3_client.cache_clear)


def create_temp(directory: str, prefix: str = ".tmp-", suffix: str = "") -> tuple[int, str]:
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
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def open_read(uri: str) -> IO[bytes]:
    """A binary stream; S3 objects are streamed, not copied to disk."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return io.BufferedReader(s3_client().get_object(Bucket=bucket, Key=key)["Body"], 1 << 20)
    return open(uri, "rb")


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic: a local file is written under a temporary name and renamed; an S3 object appears whole."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
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
        s3_client().upload_file(local_path, bucket, key)  # multipart upload: invisible until complete
        os.unlink(local_path)
        return
    os.makedirs(os.path.dirname(uri) or ".", exist_ok=True)
    try:
        os.replace(local_path, uri)
    except OSError:  # another filesystem: copy under a temp name next to the target, then rename
        tmp = os.path.join(os.path.dirname(uri), ".tmp-" + os.path.basename(uri))
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
    has_glob = any(c in uri for c in "*?[")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key.split("*")[0].split("?")[0].split("[")[0] if has_glob else key
        out = []
        paginator = s3_client().get_paginator("list_objects_v2")
        if not recursive:
            prefix = prefix.rstrip("/") + "/"
        kwargs = {} if recursive else {"Delimiter": "/"}
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **kwargs):
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if has_glob and not fnmatch.fnmatchcase(k, key):
                    continue
                if not has_glob and k != key and not k.startswith(key.rstrip("/") + "/"):
                    continue
                out.append(f"s3://{bucket}/{k}")
        return sorted(out)
    if has_glob:
        import glob

        return sorted(p for p in glob.glob(uri, recursive=True) if os.path.isfile(p))
    if os.path.isdir(uri):
        return sorted(str(p) for p in (Path(uri).rglob("*") if recursive else Path(uri).iterdir()) if p.is_file())
    return [uri] if os.path.isfile(uri) else []


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
        s3_client().download_file(bucket, key, tmp)
        os.replace(tmp, dest)
    return dest


def read_range(uri: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a file or object (an S3 ranged GET)."""
    if stop <= start:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")["Body"].read()
    with open(uri, "rb") as f:
        f.seek(start)
        return f.read(stop - start)


def open_seekable(uri: str) -> IO[bytes]:
    """A seekable binary file (parquet reads only the footer and the columns it needs): a local file, or an
    S3 object read by ranged GETs through the same boto3 client as everything else."""
    if not is_s3(uri):
        return open(uri, "rb")
    return io.BufferedReader(_S3RangeReader(uri), buffer_size=1 << 20)


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
