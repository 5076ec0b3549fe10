"""One run per output at a time: a lease on local disks (flock) and on S3 (conditional writes) that a kill -9 cannot
leave stuck: the kernel drops a dead process's flock, and an S3 lease that is not renewed expires."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from mm1data import storage
from mm1data.config import ConfigError

log = logging.getLogger(__name__)
LEASE_S = 60.0  # an S3 lease not renewed for this long is free; the holder renews it every LEASE_S / 4


class OutputLease:
    """`with OutputLease(output):` holds the output for this process; a second run fails with a ConfigError naming
    the holder. `check()` raises if an S3 lease was lost (a renewal failed for longer than LEASE_S)."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.uri = storage.join(output, "_staging", "lock" if not storage.is_s3(output) else "lease.json")
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self._fd: int | None = None
        self._etag = ""
        self._stop = threading.Event()
        self._lost = ""
        self._created_dir = False

    def __enter__(self) -> OutputLease:
        if storage.is_s3(self.output):
            self._acquire_s3()
            threading.Thread(target=self._renew, daemon=True, name="mm1data-lease").start()
        else:
            self._acquire_local()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if not self._etag:
            return
        self._etag = ""
        try:  # release only if it is still ours
            cur, _ = self._read_s3()
            if cur.get("owner") == self.me["owner"]:
                storage.delete(self.uri)
        except Exception:  # an expired lease frees itself anyway
            log.warning("could not release the lease %s", self.uri, exc_info=True)

    def release_unused(self) -> None:
        """Leave no trace in a folder we refused to touch: drop the lock file and _staging/ if we made them."""
        self.__exit__()
        if self._created_dir:
            os.unlink(self.uri)
            os.rmdir(os.path.dirname(self.uri))

    def check(self) -> None:
        if self._lost:
            raise RuntimeError(f"lost the lease on {self.output}: {self._lost}; another run may have taken it over")

    # ---- local: flock ---------------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        d = os.path.dirname(self.uri)
        self._created_dir = not os.path.isdir(d)
        try:
            os.makedirs(d, exist_ok=True)
            fd = os.open(self.uri, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot write to output location {self.output!r}: {type(e).__name__}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            raise ConfigError(
                f"{self.output} is in use by another mm1data run ({_describe(holder)}); "
                "wait for it to finish or use another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.me).encode(), 0)
        self._fd = fd

    # ---- S3: conditional writes -----------------------------------------------------------------------------

    def _body(self) -> bytes:
        return json.dumps({**self.me, "expires": time.time() + LEASE_S}).encode()

    def _put(self, **cond: str) -> bool:
        """put_object with a precondition; False when the precondition failed (someone else wrote)."""
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(self.uri)
        try:
            self._etag = storage.s3_client().put_object(Bucket=bucket, Key=key, Body=self._body(), **cond)["ETag"]
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise

    def _read_s3(self) -> tuple[dict[str, Any], str]:
        bucket, key = storage.split_s3(self.uri)
        resp = storage.s3_client().get_object(Bucket=bucket, Key=key)
        return json.loads(resp["Body"].read() or b"{}"), resp["ETag"]

    def _acquire_s3(self) -> None:
        try:
            won = self._put(IfNoneMatch="*")
        except Exception as e:
            raise ConfigError(f"cannot write to output location {self.output!r}: {type(e).__name__}: {e}") from e
        if not won:
            cur, etag = self._read_s3()
            dead = cur.get("host") == self.me["host"] and not _alive(int(cur.get("pid", 0)))
            if not (cur.get("expires", 0) < time.time() or dead) or not self._put(IfMatch=etag):
                raise ConfigError(
                    f"{self.output} is in use by another mm1data run ({_describe(cur)}); "
                    "wait for it to finish or use another --output"
                )
        # a store that ignores preconditions would let two writers both "win": the read-back tells
        if self._read_s3()[0].get("owner") != self.me["owner"]:
            raise ConfigError(f"{self.output} is in use by another mm1data run (lost the race for its lease)")

    def _renew(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(LEASE_S / 4):
            try:
                if not self._put(IfMatch=self._etag):
                    self._lost = "another run replaced the lease"
                    return
                last_ok = time.time()
            except Exception as e:  # S3 trouble: keep trying until the lease would have expired
                if time.time() - last_ok > LEASE_S:
                    self._lost = f"renewal failed for {LEASE_S:.0f} s ({type(e).__name__}: {e})"
                    return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _describe(holder: bytes | dict[str, Any]) -> str:
    try:
        h = json.loads(holder) if isinstance(holder, bytes) else holder
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
        left = f", lease expires in {h['expires'] - time.time():.0f} s" if "expires" in h else ""
        return f"pid {h['pid']} on {h['host']}, since {since}{left}"
    except Exception:
        return "holder unknown"
