"""Tar shard writer, shard planning and the per-corpus index.json (written last, atomically)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from mm1data import storage
from mm1data.config import ConfigError, short

INDEX_VERSION = 1
_CORPUS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PATH_PART = re.compile(r"[^\x00-\x1f\x7f\\:]+")  # no control characters, backslash or colon in a path segment


def check_corpus_name(name: Any) -> str:
    """A corpus name (the shard prefix `{corpus}-000000.tar`) is one plain file-name part: a letter or digit,
    then letters, digits, `_`, `.`, `-` (at most 128 characters), never `..`. Anything else (a `/`, a `\\`, a
    path or a URI) would put shards outside the output folder. Returns the name; raises ConfigError naming it."""
    if not isinstance(name, str) or not _CORPUS_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"corpus name {short(name)} is not allowed: use letters, digits, '_', '.' and '-' (starting with a "
            "letter or digit, no '..', at most 128 characters)"
        )
    return name


def shard_uri(root: str, path: Any, where: str = "index.json") -> str:
    """The location of a shard (or sidecar) listed in an index.json as `path`, under the corpus `root`.

    `path` must be a plain relative path inside the root: non-empty segments separated by `/`, none of them `.` or
    `..`, without a scheme or drive (`:`), a backslash or control characters. An absolute path, `../x`,
    `s3://other/x` or `/etc/passwd` would serve data from outside the corpus: a ConfigError naming the path and
    `where` (the index)."""
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or any(p in ("", ".", "..") or not _PATH_PART.fullmatch(p) for p in parts):
        raise ConfigError(
            f"{where}: shard path {short(path)} is not a plain relative path inside the corpus folder {root}"
        )
    return storage.join(root, path)


def shard_name(corpus: str, i: int) -> str:
    return f"{corpus}-{i:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the corpus root
    num_samples: int
    num_images: int
    bytes: int
    sha256: str
    offsets: str  # sidecar: little-endian uint64 start offset of each sample, then the end of the last one


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a regular file `name` of `size` bytes with mode 0444, uid/gid 0,
    mtime 0 and no owner names: byte for byte what tarfile.addfile gives for such a TarInfo (a test checks), at a
    tenth of its cost (tarfile copies the TarInfo and goes through its generic header code for every member, which
    was most of the time of writing a shard)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name over 100 bytes: {name[:120]!r}")
    header = bytearray(512)
    header[0 : len(raw)] = raw
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"  # devmajor and devminor stay empty for a regular file, as tarfile leaves them
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class TarShardWriter:
    """Writes one tar shard; nothing is visible at `uri` until close() commits it whole.

    Members get fixed mtime/uid/mode so the same samples give the same bytes (reruns are byte-identical).
    The start offset of each sample is recorded so a reader can seek to sample i (O(1) resume).
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        fd, self._tmp = storage.create_temp(storage.local_tmp_dir(uri), suffix=".tar")
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.offset = 0
        self.offsets: list[int] = []
        self.num_images = 0

    def write(self, members: dict[str, bytes], num_images: int = 1) -> None:
        """Append one sample: {member name: bytes}, all names starting with the same key."""
        self.offsets.append(self.offset)
        for name in sorted(members):
            data = members[name]
            pad = -len(data) % tarfile.BLOCKSIZE
            self._file.write(ustar_header(name, len(data)))
            self._file.write(data)
            self._file.write(b"\0" * pad)
            self.offset += tarfile.BLOCKSIZE + len(data) + pad
        self.num_images += num_images

    def close(self) -> ShardInfo:
        end = self.offset
        # two zero blocks end the archive, then zeros to a whole record, as tarfile.close() writes
        tail = 2 * tarfile.BLOCKSIZE
        tail += -(end + tail) % tarfile.RECORDSIZE
        self._file.write(b"\0" * tail)
        self._file.close()
        sha, size = _sha256_file(self._tmp)
        offsets = self.uri[: -len(".tar")] + ".idx"
        storage.write_bytes(offsets, struct.pack(f"<{len(self.offsets) + 1}Q", *self.offsets, end))
        storage.put_file(self._tmp, self.uri)  # the tar last: a listed shard always has its offsets
        return ShardInfo(
            os.path.basename(self.uri), len(self.offsets), self.num_images, size, sha, os.path.basename(offsets)
        )

    def abort(self) -> None:
        self._file.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)


def read_offsets(uri: str) -> list[int]:
    data = storage.read_bytes(uri)
    return list(struct.unpack(f"<{len(data) // 8}Q", data))


def _sha256_file(path: str) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def plan_shards(sizes: Iterable[int], max_samples: int, max_bytes: int) -> list[tuple[int, int]]:
    """Cut a sequence of sample sizes into [start, stop) ranges of at most max_samples and ~max_bytes each.

    A shard closes before the sample that would take it over max_bytes (a single larger sample gets its own).
    """
    ranges, start, acc, n = [], 0, 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_samples or acc + size > max_bytes):
            ranges.append((start, i))
            start, acc = i, 0
        acc += size
        n = i + 1
    if n > start:
        ranges.append((start, n))
    return ranges


def build_index(kind: str, corpus: str, shards: list[ShardInfo], tokens: int, **extra: Any) -> dict[str, Any]:
    """index.json: version, kind, totals (samples, images, text tokens, bytes), shards, then `extra`."""
    totals = {
        "samples": sum(s.num_samples for s in shards),
        "images": sum(s.num_images for s in shards),
        "tokens": tokens,
        "bytes": sum(s.bytes for s in shards),
    }
    return {
        "version": INDEX_VERSION,
        "kind": kind,
        "corpus": corpus,
        "totals": totals,
        "shards": [asdict(s) for s in shards],
        **extra,
    }


def write_index(root: str, index: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(root, "index.json"), json.dumps(index, indent=1, sort_keys=False).encode())


def read_index(root_or_file: str) -> dict[str, Any]:
    uri = root_or_file if root_or_file.endswith(".json") else storage.join(root_or_file, "index.json")
    return json.loads(storage.read_bytes(uri))
