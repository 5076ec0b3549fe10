"""MixtureDataset: the streaming loader (mix by weight, split by rank and worker, O(1) resume, local or s3://).

The design (MosaicML streaming's ideas on webdataset shards; no Ray, no local copy of the data):

1. One global stream per epoch, the same at every world size. Epoch e has `samples_per_epoch` positions, cut into
   blocks of B. Block b holds exactly C_s(b+1) - C_s(b) positions of source s, with C_s(b) = floor(b*B*p_s + 1/2)
   (the largest source takes the remainder so the counts sum to b*B; B >= S*S keeps every count >= 0), where
   p_s = weight_s / mean units per sample of s, normalised: by tokens, a source with longer samples is drawn less
   often so that tokens follow the weights (index.json totals). The block's sources are put in a random order by
   default_rng([seed, 0, e, b]). This is stratified drawing: shares are exact to one sample per source and block,
   and position g -> (source s, s's k-th draw) costs O(B) with no state, which is what makes resume O(1).
2. s's k-th draw in epoch e is pass p = k // n_s, sample i = k % n_s of that pass. A pass orders s's shards by a
   permutation from default_rng([seed, 1, s, e, p]) and, in that concatenated order, permutes samples inside
   fixed blocks of `shuffle_buffer` consecutive samples with default_rng([seed, 2, s, e, p, block]) (MosaicML's
   py1b). So (s, k) -> (shard, sample in shard) with O(shards) setup and O(shuffle_buffer) memory, no reading.
3. Rank r of N yields positions start + r + N*j for j < (samples_per_epoch - start) // N: every rank yields the
   same count, however few the shards. DataLoader worker w of W takes the rank's j in chunks of `batch_size`
   (chunk c -> worker c % W): torch's DataLoader takes one batch from each worker in turn, so the rank sees its
   j in order and no worker waits for shards (workers split positions, not shards).
4. state_dict() = {epoch, position}, position = start + N * samples this rank consumed (ranks step together, as
   under DDP). load_state_dict() at any world size or worker count continues with the same positions. The
   dataset copies in DataLoader workers do not report back, so MixtureLoader (a DataLoader) counts what the
   training loop took and hands that count to state_dict(); without it, pass state_dict(consumed=n).
5. Reading: sample i of a shard is the byte range [offsets[i], offsets[i+1]) of its `.idx` sidecar (read once per
   shard, cached), fetched by mm1data.storage (a local read or an S3 ranged GET); samples of one shard that are
   close within a window of WINDOW positions are coalesced into one read. A small thread pool reads, parses
   and decodes the next windows while the consumer takes the current one (Pillow releases the GIL while
   decoding). Memory is the read-ahead windows plus O(shards + shuffle_buffer) per source.
6. A sample that cannot be read (shard or sidecar missing, a range past the end of a truncated file, members that
   do not parse or an image that does not decode) is skipped, counted in `errors[shard]` and logged with the
   shard's name; every other position keeps its sample. A sidecar that disagrees with index.json (another sample
   count, offsets going backwards) is an error when the shard is first read, naming both: skipping would walk
   through every position that index.json claims, millions for a lying count, yielding nothing. A shard path in
   index.json must be a plain relative path inside the corpus folder (shards.shard_uri), checked at construction.

Limits: a skipped sample leaves its rank one item short (the other ranks are not told); `errors` counts what this
process read (DataLoader workers keep their own); set_epoch()/load_state_dict() reach DataLoader workers when
an iterator starts, so persistent_workers=True would keep the old epoch; the stream depends on numpy's
Generator.permutation and on the index totals (a rebuilt corpus gives another order: pin its sha256).
"""

from __future__ import annotations

import collections
import functools
import io
import json
import logging
import math
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from mm1data import storage
from mm1data.config import ConfigError, short
from mm1data.manifest import Manifest, draw_probabilities, resolve_sources
from mm1data.schema import IMAGE_EXTS
from mm1data.shards import shard_uri

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Seed-sequence tags so the three generators never share a stream: default_rng([seed, TAG, ...]).
_MIX, _SHARDS, _BLOCK = 0, 1, 2
WINDOW = 8  # positions per read task: small, so the first sample comes quickly
GAP = 256 << 10  # read two samples of one shard in one request when at most this many bytes lie between them
MAX_READ = 16 << 20  # ... and the request stays under this size
_IMAGE_MEMBER = re.compile(r"(\d+)\.(" + "|".join(IMAGE_EXTS) + ")")


class _SourceFiles:
    """Where a source's shards and sidecars are, and how many samples each holds. Every path must stay inside the
    corpus folder (shards.shard_uri): an index.json that points elsewhere is a ConfigError naming the path."""

    def __init__(self, name: str, kind: str, root: str, shards: list[dict[str, Any]], where: str) -> None:
        self.name, self.kind = name, kind
        self.tars = [shard_uri(root, s["path"], where) for s in shards]
        self.idxs = [shard_uri(root, s.get("offsets") or s["path"][: -len(".tar")] + ".idx", where) for s in shards]
        self.sizes = np.array([s["num_samples"] for s in shards], dtype=object)
        if not all(type(n) is int and n >= 0 for n in self.sizes):
            bad = next(n for n in self.sizes if not (type(n) is int and n >= 0))
            raise ConfigError(f"{where}: num_samples must be an integer >= 0, got {short(bad)}")
        self.sizes = self.sizes.astype(np.int64)


class _Mixture:
    """Position -> (source, draw) and (source, draw) -> (shard, sample in shard): pure functions of the seed."""

    def __init__(self, probs: np.ndarray, sizes: list[np.ndarray], seed: int, shuffle: bool, buffer: int) -> None:
        self.p, self.sizes, self.seed = probs, sizes, seed
        self.n = [int(s.sum()) for s in sizes]
        self.shuffle, self.buffer = shuffle, max(int(buffer), 1)
        self.block_size = max(1024, len(probs) ** 2)  # B >= S*S keeps the largest source's quota >= 0
        self.largest = int(np.argmax(probs))
        self._caches()

    def _caches(self) -> None:
        k = 2 * len(self.p) + 2  # a consumer moves through each source's draws in order: two entries per source
        self.block = functools.lru_cache(maxsize=2)(self._block)
        self.shard_order = functools.lru_cache(maxsize=k)(self._shard_order)
        self.sample_perm = functools.lru_cache(maxsize=k)(self._sample_perm)

    def __getstate__(self) -> dict[str, Any]:  # caches stay behind when the dataset goes to a worker process
        return {k: v for k, v in self.__dict__.items() if k not in ("block", "shard_order", "sample_perm")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._caches()

    def drawn_before(self, b: int) -> np.ndarray:
        """Draws of each source in blocks 0 .. b-1 (closed form, so any block is reached in O(1))."""
        c = np.floor(b * self.block_size * self.p + 0.5).astype(np.int64)
        c[self.largest] = 0
        c[self.largest] = b * self.block_size - c.sum()
        return c

    def _block(self, epoch: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        before, after = self.drawn_before(b), self.drawn_before(b + 1)
        src = np.repeat(np.arange(len(self.p)), after - before)
        src = np.random.default_rng([self.seed, _MIX, epoch, b]).permutation(src)
        draw = np.empty(len(src), dtype=np.int64)
        for s in range(len(self.p)):
            at = np.flatnonzero(src == s)
            draw[at] = before[s] + np.arange(len(at))
        return src, draw

    def source_at(self, epoch: int, g: int) -> tuple[int, int]:
        """(source, k): position g of epoch `epoch` is source's k-th draw of the epoch."""
        b, o = divmod(g, self.block_size)
        src, draw = self.block(epoch, b)
        return int(src[o]), int(draw[o])

    def _shard_order(self, s: int, epoch: int, npass: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.arange(len(self.sizes[s]))
        if self.shuffle:
            order = np.random.default_rng([self.seed, _SHARDS, s, epoch, npass]).permutation(order)
        return order, np.concatenate([[0], np.cumsum(self.sizes[s][order])])

    def _sample_perm(self, s: int, epoch: int, npass: int, q: int) -> np.ndarray:
        length = min(self.buffer, self.n[s] - q * self.buffer)
        return np.random.default_rng([self.seed, _BLOCK, s, epoch, npass, q]).permutation(length).astype(np.int32)

    def locate(self, s: int, epoch: int, k: int) -> tuple[int, int]:
        """(shard, sample in shard) of source s's k-th draw in `epoch`."""
        npass, i = divmod(k, self.n[s])
        if self.shuffle and self.buffer > 1:
            q, o = divmod(i, self.buffer)
            i = q * self.buffer + int(self.sample_perm(s, epoch, npass, q)[o])
        order, cum = self.shard_order(s, epoch, npass)
        at = int(np.searchsorted(cum, i, side="right")) - 1
        return int(order[at]), i - int(cum[at])


class MixtureDataset(torch.utils.data.IterableDataset):
    """Yields decoded samples of a manifest's sources, mixed by weight; split by (rank, worker); resumable.

    Items: {"source", "kind", "key", "text" (caption or document text; interleaved: the segments list),
    "images" (PIL RGB images in document order, or their bytes with decode_images=False), "json" (the sample's
    json), "epoch", "position" (global position in the epoch), "shard"}.

    Args:
        seed: the mixing and shuffling seed; default the manifest's.
        shuffle_buffer: samples are permuted within blocks of this many consecutive samples of a source (after
            its shards are permuted); costs 4 bytes a sample of memory, not the samples themselves.
        samples_per_epoch: positions per epoch, over all ranks; default the sum of the sources' samples.
        batch_size: the DataLoader's batch size (workers take the rank's samples in chunks of it).
        shuffle: permute each source's shards and samples (the interleaving of sources is always seeded-random).
        io_threads: threads reading and decoding ahead of the consumer.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1 << 16,
        samples_per_epoch: int | None = None,
        batch_size: int = 1,
        decode_images: bool = True,
        io_threads: int = 4,
    ) -> None:
        for arg, value, low in (
            ("world_size", world_size, 1),
            ("batch_size", batch_size, 1),
            ("io_threads", io_threads, 1),
            ("shuffle_buffer", shuffle_buffer, 1),
            ("seed", manifest.seed if seed is None else seed, 0),
            ("samples_per_epoch", 1 if samples_per_epoch is None else samples_per_epoch, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"MixtureDataset {arg} must be an integer >= {low}, got {short(value)}")
        if not (isinstance(rank, (int, np.integer)) and 0 <= rank < world_size):
            raise ValueError(f"rank {short(rank)} is not in [0, world_size={world_size})")
        resolved = resolve_sources(manifest)
        self.unit = manifest.unit
        self.sources = [_SourceFiles(s.name, s.kind, s.root, s.shards, s.index_uri) for s in resolved]
        self.seed = manifest.seed if seed is None else seed
        self.mixture = _Mixture(
            draw_probabilities(resolved, manifest.unit), [s.sizes for s in self.sources], self.seed, shuffle,
            shuffle_buffer,
        )  # fmt: skip
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.samples_per_epoch = samples_per_epoch or sum(self.mixture.n)
        self.decode_images, self.io_threads = decode_images, io_threads
        self.epoch = 0
        self.position = 0  # where this epoch's iteration starts (a loaded state's position)
        self._consumed = 0  # positions this rank took in the current iteration (num_workers=0 only)
        self.errors: collections.Counter[str] = collections.Counter()  # skipped samples per shard

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.position) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Like DistributedSampler.set_epoch: a new epoch starts at its beginning; the current one (e.g. the
        epoch of a loaded state) keeps its resume position."""
        if epoch != self.epoch:
            self.epoch, self.position, self._consumed = epoch, 0, 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """JSON-serialisable resume point. `consumed`: samples this rank has taken since the iteration began
        (default: what this object yielded itself, exact with num_workers=0; MixtureLoader passes its count)."""
        taken = self._consumed if consumed is None else consumed
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": min(self.position + taken * self.world_size, self.samples_per_epoch),
            "seed": self.seed,
            "samples_per_epoch": self.samples_per_epoch,
            "unit": self.unit,
            "sources": [s.name for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off, at this object's world size and worker count."""
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for k in ("seed", "samples_per_epoch", "unit", "sources"):
            if state[k] != mine[k]:
                raise ValueError(f"loader state has {k}={state[k]!r}, this dataset has {mine[k]!r}")
        self.epoch, self.position, self._consumed = int(state["epoch"]), int(state["position"]), 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._consumed = 0
        for j, item in _Reader(self, self.epoch).run(self._positions(worker, workers)):
            self._consumed = j + 1  # positions, not items: a skipped sample still counts as taken
            yield item

    def _positions(self, worker: int, workers: int) -> Iterator[tuple[int, int]]:
        """(j, global position) of this worker's share of the rank's positions, in order."""
        start, n, bs = self.position, self.world_size, self.batch_size
        local = len(self)
        for c in range(worker, math.ceil(local / bs), workers):
            for j in range(c * bs, min(c * bs + bs, local)):
                yield j, start + self.rank + n * j


def collate_samples(batch: Any) -> Any:
    """MixtureLoader's default collate: the list of item dicts as it is (PIL images do not stack)."""
    return batch


class MixtureLoader(torch.utils.data.DataLoader):
    """A DataLoader over a MixtureDataset that counts the samples the training loop has taken, so that
    state_dict() is exact with worker processes (whose dataset copies cannot report back)."""

    def __init__(self, dataset: MixtureDataset, batch_size: int | None = None, **kwargs: Any) -> None:
        if (batch_size or 1) != dataset.batch_size:
            raise ValueError(
                f"MixtureDataset(batch_size={dataset.batch_size}) must match the loader's batch_size={batch_size}: "
                "workers take the rank's samples in chunks of one batch"
            )
        kwargs.setdefault("collate_fn", collate_samples)
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self.consumed = 0

    def __iter__(self) -> Iterator[Any]:
        self.consumed = 0
        total = len(self.dataset)
        for batch in super().__iter__():
            self.consumed = min(self.consumed + (self.batch_size or 1), total)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict(consumed=self.consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self.consumed = 0


class _Reader:
    """One iteration's reading: the position -> sample plan, ranged reads and decoding in a thread pool."""

    def __init__(self, ds: MixtureDataset, epoch: int) -> None:
        self.ds, self.epoch = ds, epoch
        self.offsets = functools.lru_cache(maxsize=1024)(self._offsets)
        self.warned: set[str] = set()

    def run(self, positions: Iterator[tuple[int, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
        pool = ThreadPoolExecutor(self.ds.io_threads, thread_name_prefix="mm1data-read")
        pending: collections.deque = collections.deque()
        try:
            for window in self._windows(positions):
                pending.append(pool.submit(self._load, window))
                # emit what is ready; wait only when the read-ahead bound is reached (memory: these windows)
                while pending and (pending[0].done() or len(pending) > 2 * self.ds.io_threads):
                    yield from self._emit(pending.popleft().result())
            while pending:
                yield from self._emit(pending.popleft().result())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _windows(self, positions: Iterator[tuple[int, int]]) -> Iterator[list[tuple]]:
        """Windows of WINDOW positions, the first ones smaller (1, 2, 4, ...) so the first sample comes early."""
        mix, window, size = self.ds.mixture, [], 1
        for j, g in positions:
            s, k = mix.source_at(self.epoch, g)
            shard, i = mix.locate(s, self.epoch, k)
            window.append((j, g, s, shard, i))
            if len(window) == size:
                yield window
                window, size = [], min(2 * size, WINDOW)
        if window:
            yield window

    def _emit(self, results: list[tuple]) -> Iterator[tuple[int, dict[str, Any]]]:
        for j, g, s, shard, i, item, error in results:
            if item is not None:
                yield j, item
                continue
            uri = self.ds.sources[s].tars[shard]
            self.ds.errors[uri] += 1
            level = logging.DEBUG if uri in self.warned else logging.WARNING
            self.warned.add(uri)
            log.log(level, "skipped sample %d of shard %s (position %d): %s", i, uri, g, error)

    def _load(self, window: list[tuple]) -> list[tuple]:
        """Read, parse and decode one window (runs in the pool)."""
        wanted = collections.defaultdict(set)
        for _, _, s, shard, i in window:
            wanted[s, shard].add(i)
        raw = {}
        for (s, shard), ids in wanted.items():
            for i, data in self._read(s, shard, sorted(ids)).items():
                raw[s, shard, i] = data
        out = []
        for j, g, s, shard, i in window:
            src, data, item, error = self.ds.sources[s], raw[s, shard, i], None, None
            if isinstance(data, bytes):
                try:
                    item = _decode(src.kind, data, self.ds.decode_images)
                    item.update(source=src.name, kind=src.kind, epoch=self.epoch, position=g, shard=src.tars[shard])
                except Exception as e:  # a corrupt sample is data, not a bug: skipped and counted
                    error = f"{type(e).__name__}: {e}"
            else:
                error = data
            out.append((j, g, s, shard, i, item, error))
        return out

    def _offsets(self, s: int, shard: int) -> np.ndarray | str:
        """The shard's sample offsets, or why its sidecar cannot be read (its samples are then skipped). A sidecar
        that disagrees with index.json (another count, offsets that go backwards) raises: the positions planned
        from index.json would otherwise be skipped one by one, millions of them for a lying count."""
        src = self.ds.sources[s]
        try:
            data = storage.read_bytes(src.idxs[shard])
        except Exception as e:
            return f"offsets sidecar {src.idxs[shard]} unreadable: {type(e).__name__}: {e}"
        offs = np.frombuffer(data, dtype="<u8", count=len(data) // 8).astype(np.int64)
        if len(data) % 8 or len(offs) != src.sizes[shard] + 1 or (np.diff(offs) < 0).any() or (offs < 0).any():
            raise ConfigError(
                f"shard {src.tars[shard]}: its offsets sidecar {src.idxs[shard]} holds {len(data) / 8:g} offsets "
                f"{'' if (np.diff(offs) >= 0).all() else 'that go backwards '}where index.json lists "
                f"{src.sizes[shard]} samples ({src.sizes[shard] + 1} offsets): the index and the shard disagree"
            )
        return offs

    def _read(self, s: int, shard: int, ids: list[int]) -> dict[int, bytes | str]:
        """{sample: its bytes, or why they could not be read}; nearby samples share one ranged read."""
        offs = self.offsets(s, shard)
        if isinstance(offs, str):
            return {i: offs for i in ids}
        runs, out = [], {}
        for i in ids:
            if runs and offs[i] - offs[runs[-1][-1] + 1] <= GAP and offs[i + 1] - offs[runs[-1][0]] <= MAX_READ:
                runs[-1].append(i)
            else:
                runs.append([i])
        uri = self.ds.sources[s].tars[shard]
        for run in runs:
            lo, hi = int(offs[run[0]]), int(offs[run[-1] + 1])
            try:
                data = storage.read_range(uri, lo, hi)
            except Exception as e:  # missing shard, or (S3) a range that starts past the end
                out.update({i: f"read of bytes {lo}-{hi} failed: {type(e).__name__}: {e}" for i in run})
                continue
            for i in run:
                a, b = int(offs[i]) - lo, int(offs[i + 1]) - lo
                out[i] = data[a:b] if b <= len(data) else f"truncated: the shard ends at byte {lo + len(data)}"
        return out


def _parse_tar(data: bytes) -> tuple[str, dict[str, bytes]]:
    """One sample's tar members -> (key, {member name after the key's dot: bytes}). The members must fill the
    range exactly: a damaged header fails its checksum, and a short range fails the length checks."""
    try:
        members = _ustar_members(data)
    except _NotPlainUstar:  # pax/GNU headers (shards from other writers): the standard library handles those
        members = _tarfile_members(data)
    if not members:
        raise ValueError("no tar members")
    keys = {name.split(".", 1)[0] for name in members}
    if len(keys) != 1:
        raise ValueError(f"one sample holds several keys: {sorted(keys)}")
    key = keys.pop()
    return key, {name[len(key) + 1 :]: b for name, b in members.items()}


class _NotPlainUstar(Exception):
    pass


def _ustar_members(data: bytes) -> dict[str, bytes]:
    """Plain ustar regular files, as TarShardWriter writes them. Hand-parsed because tarfile takes ~80 us per
    sample (file object, TarInfo machinery) against ~14 us here, which is most of the cost of a text sample."""
    out, pos = {}, 0
    while pos < len(data):
        hdr = data[pos : pos + 512]
        if len(hdr) < 512:
            raise ValueError(f"truncated tar header at byte {pos}")
        if hdr[156:157] not in (b"0", b"\0"):
            raise _NotPlainUstar
        # the checksum counts its own 8-byte field as spaces (0x20 * 8 = 256)
        if int(hdr[148:156].rstrip(b" \0") or b"0", 8) != sum(hdr) - sum(hdr[148:156]) + 256:
            raise ValueError(f"bad tar header checksum at byte {pos}")
        name, prefix = hdr[:100].rstrip(b"\0").decode(), hdr[345:500].rstrip(b"\0")
        name = f"{prefix.decode()}/{name}" if prefix else name
        size = int(hdr[124:136].rstrip(b" \0") or b"0", 8)
        end = pos + 512 + -(-size // 512) * 512
        if end > len(data):
            raise ValueError(f"member {name} runs past the sample's {len(data)} bytes")
        out[name] = data[pos + 512 : pos + 512 + size]
        pos = end
    return out


def _tarfile_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        infos = tar.getmembers()
        members = {m.name: tar.extractfile(m).read() for m in infos if m.isfile()}
    end = infos[-1].offset_data + -(-infos[-1].size // 512) * 512 if infos else 0
    if end != len(data):  # tarfile stops quietly at a damaged later header
        raise ValueError(f"tar members end at byte {end} of the sample's {len(data)}")
    return members


def _caption_fields(members: dict[str, bytes], meta: dict[str, Any]) -> tuple[Any, list[bytes]]:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise KeyError("caption sample without an image member")
    return members["txt"].decode("utf-8"), [members[ext]]


def _interleaved_fields(members: dict[str, bytes], meta: dict[str, Any]) -> tuple[Any, list[bytes]]:
    segments = meta["segments"]
    found = sorted((int(m.group(1)), b) for name, b in members.items() if (m := _IMAGE_MEMBER.fullmatch(name)))
    want = sum(1 for seg in segments if "image" in seg)
    if [n for n, _ in found] != list(range(want)):
        raise KeyError(f"segments name {want} images, the sample has members {[n for n, _ in found]}")
    return segments, [b for _, b in found]


def _text_fields(members: dict[str, bytes], meta: dict[str, Any]) -> tuple[Any, list[bytes]]:
    return members["txt"].decode("utf-8"), []


# kind -> (members, json) -> (text, image bytes in document order)
KIND_FIELDS = {"caption": _caption_fields, "interleaved": _interleaved_fields, "text": _text_fields}


def _decode(kind: str, data: bytes, decode_images: bool) -> dict[str, Any]:
    key, members = _parse_tar(data)
    meta = json.loads(members["json"]) if "json" in members else {}
    text, images = KIND_FIELDS[kind](members, meta)
    if decode_images:
        images = [_open_image(b) for b in images]
    return {"key": key, "text": text, "images": images, "json": meta}


def _open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # decode here, in the pool thread, and fail here on a bad image
    return img if img.mode == "RGB" else img.convert("RGB")
