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
   decoding); the consumer reads the first window itself and, rather than wait, runs any window no thread has
   started. Memory is the read-ahead windows plus O(shards + shuffle_buffer) per source.
6. A sample that cannot be read (shard or sidecar missing, a range past the end of a truncated file, members that
   do not parse or an image that does not decode) is replaced by the next readable draw of the same source (draw
   k+1, k+2, ... of the pass order), counted in `errors[shard]`, logged with the shard's name and listed in the
   item's `replaced`: every position yields an item, so every rank yields the same count. A sidecar that
   disagrees with index.json (another sample count, offsets going backwards) is an error when the shard is first
   read, naming both: skipping would walk through every position that index.json claims, millions for a lying
   count. A shard path in index.json must be a plain relative path inside the corpus folder (shards.shard_uri),
   checked at construction.
7. A source's `holdout: N` samples (evenly spaced over its shards in index order) are left out of the draws;
   holdout_items() reads them for a held-out loss.
8. A caption source yields its alt-text (KEY.txt), its synthetic caption (KEY.syn.txt, `caption: synthetic`) or,
   with `caption: mix`, the synthetic one with probability `synthetic_prob` by a coin that is a hash of (seed,
   source, epoch, position, key): the same on every rank and worker and after a resume, with no state. A sample
   without a synthetic caption yields its alt-text (a corpus with none is refused when the manifest is resolved).
   item["caption"] says which one came.

Limits: a replacement repeats a sample (its own position still yields it); `errors` counts what this process read
(MixtureLoader.errors counts what reached the main process, from the items); set_epoch()/load_state_dict() reach
DataLoader workers when an iterator starts, so persistent_workers=True would keep the old epoch; the stream depends
on numpy's Generator.permutation and on the index totals (a rebuilt corpus gives another order: pin its sha256).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import queue
import re
import tarfile
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from mm1data import storage
from mm1data.config import ConfigError, short
from mm1data.manifest import Manifest, draw_probabilities, resolve_sources
from mm1data.packing import resize_crop, rgbx_pixels
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
    """Where a source's shards and sidecars are, how many samples each holds, and which are held out. Every path
    must stay inside the corpus folder (shards.shard_uri): an index.json that points elsewhere is a ConfigError.

    The `holdout` held-out samples are the global indices floor(j * n / holdout), j < holdout, over the shards in
    index.json order: evenly spread over the corpus, and independent of the seed and the weights, so runs with other
    mixtures report loss on the same samples. The training stream sees only the other samples; a shard's t-th
    training sample is found in O(log holdout) with no table."""

    def __init__(
        self, name: str, kind: str, root: str, shards: list[dict[str, Any]], where: str, holdout: int = 0,
        synthetic: float = 0.0,
    ) -> None:  # fmt: skip
        self.name, self.kind = name, kind
        self.synthetic = synthetic  # chance that a sample yields its synthetic caption (manifest `caption`)
        self.tars = [shard_uri(root, s["path"], where) for s in shards]
        self.idxs = [shard_uri(root, s.get("offsets") or s["path"][: -len(".tar")] + ".idx", where) for s in shards]
        self.sizes = np.array([s["num_samples"] for s in shards], dtype=object)
        if not all(type(n) is int and n >= 0 for n in self.sizes):
            bad = next(n for n in self.sizes if not (type(n) is int and n >= 0))
            raise ConfigError(f"{where}: num_samples must be an integer >= 0, got {short(bad)}")
        self.sizes = self.sizes.astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)  # global index of each shard
        self.n, self.holdout = int(self.starts[-1]), int(holdout)
        held = self._held_before(self.starts)
        self.train_sizes = self.sizes - np.diff(held)  # what the mixture draws from
        self.train_starts = self.starts - held

    def _held_before(self, x: Any) -> Any:
        """Held-out global indices < x: #{j : j * n / holdout < x} (elementwise for arrays)."""
        if not self.holdout:
            return x * 0
        return np.minimum(self.holdout, -(-x * self.holdout // self.n))

    def sample(self, shard: int, t: int) -> int:
        """Sample in `shard` of the shard's t-th training sample."""
        if not self.holdout:
            return t
        i = int(self.train_starts[shard]) + t
        lo, hi = i, i + self.holdout  # the smallest global g with (g + 1) - held_before(g + 1) > i
        while lo < hi:
            mid = (lo + hi) // 2
            if mid + 1 - int(self._held_before(mid + 1)) > i:
                hi = mid
            else:
                lo = mid + 1
        return lo - int(self.starts[shard])

    def held_out(self) -> list[tuple[int, int]]:
        """(shard, sample in shard) of every held-out sample, in order."""
        g = np.arange(self.holdout, dtype=np.int64) * self.n // max(self.holdout, 1)
        shard = np.searchsorted(self.starts, g, side="right") - 1
        return [(int(sh), int(x - self.starts[sh])) for sh, x in zip(shard, g)]


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
    json), "epoch", "position" (global position in the epoch), "shard", "replaced" (the unreadable draws this
    item stands in for, as [shard, sample, error]; usually empty)}, and for a caption source "caption" ("alt" or
    "synthetic": which caption "text" is, as the manifest's `caption` chose; see 8. above).

    Every position yields an item: a sample that cannot be read is replaced by the next readable draw of the same
    source (counted in `errors`, logged), so all ranks yield the same count and DDP never waits at an epoch end.

    Args:
        seed: the mixing and shuffling seed; default the manifest's.
        shuffle_buffer: samples are permuted within blocks of this many consecutive samples of a source (after
            its shards are permuted); costs 4 bytes a sample of memory, not the samples themselves.
        samples_per_epoch: positions per epoch, over all ranks; default the sum of the sources' samples.
        batch_size: the DataLoader's batch size (workers take the rank's samples in chunks of it).
        shuffle: permute each source's shards and samples (the interleaving of sources is always seeded-random).
        io_threads: threads reading and decoding ahead of the consumer (which helps them when it would wait).
        image_size: decode (JPEG draft), resize and center-crop images to this square size, as open_clip's eval
            transform does, in the reading threads; None keeps them as stored.
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
        image_size: int | None = None,
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
        self.sources = [
            _SourceFiles(s.name, s.kind, s.root, s.shards, s.index_uri, s.holdout, s.synthetic_share) for s in resolved
        ]
        self.seed = manifest.seed if seed is None else seed
        self.mixture = _Mixture(
            draw_probabilities(resolved, manifest.unit), [s.train_sizes for s in self.sources], self.seed, shuffle,
            shuffle_buffer,
        )  # fmt: skip
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.samples_per_epoch = samples_per_epoch or sum(self.mixture.n)
        self.decode_images, self.io_threads, self.image_size = decode_images, io_threads, image_size
        self.epoch = 0
        self.position = 0  # where this epoch's iteration starts (a loaded state's position)
        self._consumed = 0  # positions this rank took in the current iteration (num_workers=0 only)
        self.errors: collections.Counter[str] = collections.Counter()  # unreadable samples per shard

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
            "holdout": [s.holdout for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off, at this object's world size and worker count."""
        mine = self.state_dict()
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        state = {"holdout": [0] * len(self.sources), **state}  # states from before holdouts existed
        for k in ("seed", "samples_per_epoch", "unit", "sources", "holdout"):
            if state[k] != mine[k]:
                raise ValueError(f"loader state has {k}={state[k]!r}, this dataset has {mine[k]!r}")
        self.epoch, self.position, self._consumed = int(state["epoch"]), int(state["position"]), 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._consumed = 0
        reader = _Reader(self, self.epoch)
        for j, item in reader.run(reader.plan(self._positions(worker, workers))):
            self._consumed = j + 1
            yield item

    def read_positions(self, epoch: int, positions: list[int]) -> list[dict[str, Any]]:
        """The items the stream yields at these global positions of `epoch` (replacements included), read in one
        go: how a resumed packer gets back the documents it held."""
        reader, out = _Reader(self, epoch), [None] * len(positions)
        for j, item in reader.run(reader.plan(enumerate(positions))):
            out[j] = item
        return out

    def holdout_items(self, source: str) -> Iterator[dict[str, Any]]:
        """The held-out samples of `source` (manifest `holdout: N`), in order, with epoch and position None. An
        unreadable one is skipped, counted and logged: replacing it would hold out a training sample."""
        s = next((i for i, src in enumerate(self.sources) if src.name == source), None)
        if s is None:
            raise KeyError(f"no source {source!r} (sources: {', '.join(src.name for src in self.sources)})")
        reader = _Reader(self, None)
        plan = ((j, None, s, None, shard, i) for j, (shard, i) in enumerate(self.sources[s].held_out()))
        for _, item in reader.run(plan):
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
    state_dict() is exact with worker processes (whose dataset copies cannot report back).

    With workers and the default collate, decoded RGB images travel in shared-memory buffers that each worker
    reuses once the main process has dropped every image viewing them (Pillow's Arrow export: one copy in the
    worker, none in the main process), instead of being pickled (a pixel repack and two copies each way, which
    made workers slower than threads). `errors` counts the unreadable samples that the items reaching this
    process replaced, per shard, whichever process read them."""

    def __init__(self, dataset: MixtureDataset, batch_size: int | None = None, **kwargs: Any) -> None:
        if (batch_size or 1) != dataset.batch_size:
            raise ValueError(
                f"MixtureDataset(batch_size={dataset.batch_size}) must match the loader's batch_size={batch_size}: "
                "workers take the rank's samples in chunks of one batch"
            )
        self._share = "collate_fn" not in kwargs and kwargs.get("num_workers", 0) > 0 and hasattr(Image, "fromarrow")
        if self._share:
            import pyarrow  # noqa: F401  (here, so that forked workers do not each import it on their first batch)
        kwargs.setdefault("collate_fn", collate_samples)
        super().__init__(dataset, batch_size=batch_size, **kwargs)
        self.consumed = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def __iter__(self) -> Iterator[Any]:
        self.consumed = 0
        total = len(self.dataset)
        if self._share:  # a new pool per iteration: the workers are new, and a batch never taken keeps its slot
            self.collate_fn = _SharedImages(self.num_workers)
        for batch in super().__iter__():
            if isinstance(batch, _SharedBatch):
                batch = batch.unpack()
            if isinstance(batch, list):
                for item in batch:
                    for shard, _, _ in item.get("replaced", ()) if isinstance(item, dict) else ():
                        self.errors[shard] += 1
            self.consumed = min(self.consumed + (self.batch_size or 1), total)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict(consumed=self.consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self.consumed = 0


class _SharedBatch:
    """A batch whose RGB images are in a shared-memory buffer (pool slot `slot`, or -1 for a one-off buffer)."""

    def __init__(self, items: list[dict[str, Any]], buffer: torch.Tensor, slot: int, busy: torch.Tensor,
                 layout: list[list[tuple]]) -> None:  # fmt: skip
        self.items, self.buffer, self.slot, self.busy, self.layout = items, buffer, slot, busy, layout

    def unpack(self) -> list[dict[str, Any]]:
        """In the main process: PIL images that view the buffer; the slot is freed when the last one is gone."""
        import pyarrow as pa

        flat = self.buffer.numpy()
        if self.slot >= 0:  # the worker may reuse the slot once no image holds the tensor (each one does, below)
            weakref.finalize(self.buffer, self.busy.__setitem__, self.slot, 0)
        for item, images in zip(self.items, self.layout):
            for j, (start, stop, size) in images:
                rgbx = pa.Array.from_buffers(pa.uint8(), stop - start, [None, pa.py_buffer(flat[start:stop])])
                pixels = pa.FixedSizeListArray.from_arrays(rgbx, 4)  # RGB is stored as RGBX
                item["images"][j] = img = Image.fromarrow(pixels, "RGB", size)
                img._mm1data_buffer = self.buffer  # numpy views do not keep the tensor object alive
        return self.items


class _SharedImages:
    """Worker-side collate: RGB PIL images -> one shared-memory buffer, from a few slots per worker that are
    reused once free (a fresh buffer's pages fault and are zeroed on first write, which cost more than pickling)."""

    SLOTS = 4  # per worker: batches the main process may hold before a worker allocates one-off buffers

    def __init__(self, workers: int) -> None:
        self.busy = torch.zeros(max(workers, 1) * self.SLOTS, dtype=torch.int8).share_memory_()  # 1: main holds it
        self.buffers: dict[int, torch.Tensor] = {}  # this worker's slots (each worker process has its own dict)

    def __call__(self, batch: Any) -> Any:
        if not isinstance(batch, list):  # batch_size=None: one item, as it is
            return batch
        views, layout, total = [], [], 0
        for item in batch:
            images = []
            for j, im in enumerate(item["images"]):
                if isinstance(im, Image.Image) and im.mode == "RGB":
                    flat = rgbx_pixels(im)  # Pillow's own pixels, no copy
                    views.append(flat)
                    images.append((j, (total, total + len(flat), im.size)))
                    total += len(flat)
                    item["images"][j] = None  # travels in the buffer, not in the pickle
            layout.append(images)
        if not views:
            return batch
        slot, buffer = self._buffer(total)
        flat, at = buffer.numpy(), 0
        for view in views:
            flat[at : at + len(view)] = view
            at += len(view)
        return _SharedBatch(batch, buffer[:total], slot, self.busy, layout)

    def _buffer(self, size: int) -> tuple[int, torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        first = (info.id if info is not None else 0) * self.SLOTS
        for slot in range(first, first + self.SLOTS):
            if self.busy[slot] == 0:
                buf = self.buffers.get(slot)
                if buf is None or len(buf) < size:
                    buf = self.buffers[slot] = _shared_uint8(size + size // 4)
                self.busy[slot] = 1
                return slot, buf
        return -1, _shared_uint8(size)


def _shared_uint8(size: int) -> torch.Tensor:
    """A uint8 tensor allocated in shared memory (so sending it to the main process moves no bytes)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size))


class _Task:
    """One window to load, run by a pool thread or by the consumer, whichever claims it first."""

    def __init__(self, fn: Any, arg: Any) -> None:
        self.fn, self.arg = fn, arg
        self.claim = threading.Lock()
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> bool:
        if not self.claim.acquire(blocking=False):
            return False
        try:
            self.result = self.fn(self.arg)
        except BaseException as e:  # re-raised in the consumer
            self.error = e
        finally:
            self.done.set()
        return True

    def get(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class _Reader:
    """One iteration's reading: the position -> sample plan, ranged reads and decoding in a thread pool."""

    def __init__(self, ds: MixtureDataset, epoch: int | None) -> None:
        self.ds, self.epoch = ds, epoch
        if Image.core.get_blocks_max() == 0:  # Pillow's default frees every image's memory at once; keeping some
            Image.core.set_blocks_max(4 * WINDOW * ds.io_threads)  # spares the next decode's page faults (-11% CPU)
        self.offsets = functools.lru_cache(maxsize=1024)(self._offsets)
        self.warned: set[str] = set()

    def plan(self, positions: Iterator[tuple[int, int]]) -> Iterator[tuple]:
        """(j, global position) -> (j, position, source, its draw k, shard, sample in shard)."""
        mix = self.ds.mixture
        for j, g in positions:
            s, k = mix.source_at(self.epoch, g)
            shard, t = mix.locate(s, self.epoch, k)
            yield j, g, s, k, shard, self.ds.sources[s].sample(shard, t)

    def run(self, plan: Iterator[tuple]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(j, item) for each planned sample, in order. A consumer that would wait for the oldest window runs a
        window that no thread has started yet instead (pool threads skip what it claimed)."""
        pool = ThreadPoolExecutor(self.ds.io_threads, thread_name_prefix="mm1data-read")
        pending: collections.deque[_Task] = collections.deque()
        windows, started = self._windows(plan), False
        try:
            while True:
                while len(pending) <= 2 * (self.ds.io_threads + 1):  # read-ahead (the consumer works too)
                    window = next(windows, None)
                    if window is None:
                        break
                    pending.append(task := _Task(self._load, window))
                    if started:
                        pool.submit(task.run)
                if not pending:
                    return
                head = pending[0]
                # The first window (one sample) runs here before any thread starts (starting one waits for the GIL);
                # later, help with any window no thread has started, but only after the head, which comes first.
                if not head.done.is_set() and not (head.run() or (started and any(t.run() for t in pending))):
                    head.done.wait()
                if head.done.is_set():
                    yield from self._emit(pending.popleft().get())
                    if not started:  # the first sample is out: now start the threads
                        started = True
                        for task in pending:
                            pool.submit(task.run)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _windows(self, plan: Iterator[tuple]) -> Iterator[list[tuple]]:
        """Windows of WINDOW samples, the first ones smaller (1, 2, 4, ...) so the first sample comes early."""
        window, size = [], 1
        for target in plan:
            window.append(target)
            if len(window) == size:
                yield window
                window, size = [], min(2 * size, WINDOW)
        if window:
            yield window

    def _emit(self, results: list[tuple]) -> Iterator[tuple[int, dict[str, Any]]]:
        for j, g, item, failures in results:
            for uri, i, error in failures:
                self.ds.errors[uri] += 1
                level = logging.DEBUG if uri in self.warned else logging.WARNING
                self.warned.add(uri)
                instead = "skipped" if item is None else f"replaced by {item['key']} of shard {item['shard']}"
                log.log(level, "unreadable sample %d of shard %s (position %s) %s: %s", i, uri, g, instead, error)
            if item is not None:
                yield j, item

    def _load(self, window: list[tuple]) -> list[tuple]:
        """Read, parse and decode one window (runs in the pool): (j, position, item or None, failures)."""
        wanted = collections.defaultdict(set)
        for _, _, s, _, shard, i in window:
            wanted[s, shard].add(i)
        raw = {}
        for (s, shard), ids in wanted.items():
            for i, data in self._read(s, shard, sorted(ids)).items():
                raw[s, shard, i] = data
        out = []
        for j, g, s, k, shard, i in window:
            item, error = self._item(s, shard, i, g, raw[s, shard, i])
            failures = [] if item is not None else [(self.ds.sources[s].tars[shard], i, error)]
            if item is None and k is not None:
                item = self._replacement(s, k, g, failures)
            if item is not None:
                item["replaced"] = [list(f) for f in failures]
            out.append((j, g, item, failures))
        return out

    def _item(self, s: int, shard: int, i: int, g: int | None, data: bytes | str) -> tuple[dict | None, str | None]:
        """(item, None) from a sample's bytes, or (None, why not)."""
        if not isinstance(data, bytes):
            return None, data
        src = self.ds.sources[s]
        try:
            item = _decode(src.kind, data, self.ds.decode_images, self.ds.image_size)
        except Exception as e:  # a corrupt sample is data, not a bug: replaced (or skipped) and counted
            return None, f"{type(e).__name__}: {e}"
        item.update(source=src.name, kind=src.kind, epoch=self.epoch, position=g, shard=src.tars[shard])
        synthetic = item.pop("synthetic", None)
        if src.kind == "caption":
            use = synthetic is not None and src.synthetic > 0
            if use and src.synthetic < 1:
                use = _coin(self.ds.seed, src.name, self.epoch, g, item["key"]) < src.synthetic
            item["caption"] = "synthetic" if use else "alt"
            if use:
                item["text"] = synthetic
        return item, None

    def _replacement(self, s: int, k: int, g: int, failures: list[tuple]) -> dict[str, Any]:
        """The next readable draw of source s after its k-th (a whole pass is tried before giving up)."""
        mix, src = self.ds.mixture, self.ds.sources[s]
        for k2 in range(k + 1, k + 1 + mix.n[s]):
            shard, t = mix.locate(s, self.epoch, k2)
            i = src.sample(shard, t)
            item, error = self._item(s, shard, i, g, self._read(s, shard, [i])[i])
            if item is not None:
                return item
            failures.append((src.tars[shard], i, error))
        raise RuntimeError(f"source {src.name!r}: no readable sample in {mix.n[s]} draws (last: {failures[-1]})")

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


def _coin(seed: int, source: str, epoch: int | None, position: int | None, key: str) -> float:
    """A uniform number in [0, 1) for the caption mix: a hash, not a generator, because it must be a pure function
    of the sample's place in the stream (any rank, any worker, after a resume) and cost ~1 us, not a Generator's
    ~30 us."""
    digest = hashlib.blake2b(f"{seed}/{source}/{epoch}/{position}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


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


def _decode(kind: str, data: bytes, decode_images: bool, image_size: int | None = None) -> dict[str, Any]:
    key, members = _parse_tar(data)
    meta = json.loads(members["json"]) if "json" in members else {}
    text, images = KIND_FIELDS[kind](members, meta)
    if decode_images:
        images = [_open_image(b, image_size) for b in images]
    item = {"key": key, "text": text, "images": images, "json": meta}
    if "syn.txt" in members:  # a caption's synthetic caption (the caller picks which text the item yields)
        item["synthetic"] = members["syn.txt"].decode("utf-8")
    return item


def _open_image(data: bytes, size: int | None = None) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if size is not None:
        img.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale that keeps both sides >= size
    img.load()  # decode here, in the pool thread, and fail here on a bad image
    img = img if img.mode == "RGB" else img.convert("RGB")
    return img if size is None else resize_crop(img, size)


# ------------------------------------------------------------------------------------------------ packed batches

PACKED_STATE_VERSION = 1


class PackedLoader:
    """Batches of packed sequences from a MixtureDataset, epoch after epoch, with an exact state_dict().

    A thread pulls items through a MixtureLoader (DataLoader workers read and decode), packs them with `packer`
    and collates `batch_size` sequences at a time (`collate_fn(list of sequences)`), up to `prefetch` batches
    ahead. Each batch carries the state after it: the loader's position after the last item the packer pulled
    and the documents the packer holds (SequencePacker.state_dict), so state_dict() is the state after the last
    batch the caller took however far the thread has read ahead, and load_state_dict() resumes the same batches.
    An epoch that ends starts the next one (set_epoch), so the stream never runs out.
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        packer: Any,
        batch_size: int,
        collate_fn: Any,
        *,
        num_workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        self.dataset, self.packer, self.batch_size, self.collate_fn = dataset, packer, batch_size, collate_fn
        self.num_workers, self.prefetch = num_workers, prefetch
        self.errors: collections.Counter[str] = collections.Counter()  # unreadable samples replaced, per shard
        self._state = self._snapshot(0)
        self._started = False

    def _snapshot(self, pulled: int) -> dict[str, Any]:
        return {
            "version": PACKED_STATE_VERSION,
            "loader": self.dataset.state_dict(consumed=pulled),
            "packer": self.packer.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the state after the last batch taken from the iterator."""
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != PACKED_STATE_VERSION:
            raise ValueError(f"packed loader state version {state.get('version')!r}, expected {PACKED_STATE_VERSION}")
        self.dataset.load_state_dict(state["loader"])
        self.packer.load_state_dict(state["packer"], self._fetch)
        self._state = state

    def _fetch(self, refs: list[list[Any]]) -> list[dict[str, Any]]:
        """Items at [epoch, position] refs (what the packer held), read again from the shards."""
        out: list[Any] = [None] * len(refs)
        by_epoch = collections.defaultdict(list)
        for i, (epoch, position) in enumerate(refs):
            by_epoch[epoch].append((i, position))
        for epoch, wanted in by_epoch.items():
            for (i, _), item in zip(wanted, self.dataset.read_positions(epoch, [p for _, p in wanted])):
                out[i] = item
        return out

    def __iter__(self) -> Iterator[Any]:
        if self._started:  # the last iteration's thread read ahead: go back to what the caller took
            self.load_state_dict(self._state)
        self._started = True
        ready: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(ready, stop), name="mm1data-pack", daemon=True)
        thread.start()
        try:
            while True:
                batch, state, error = ready.get()
                if error is not None:
                    raise error
                self._state = state
                yield batch
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def _produce(self, ready: queue.Queue, stop: threading.Event) -> None:
        ds, pulled = self.dataset, 0

        def items() -> Iterator[dict[str, Any]]:
            nonlocal pulled
            while not stop.is_set():
                fresh = ds.position == 0
                loader = MixtureLoader(ds, ds.batch_size, num_workers=self.num_workers)
                for batch in loader:
                    for item in batch:
                        for shard, _, _ in item["replaced"]:
                            self.errors[shard] += 1
                        pulled += 1  # counted before the packer holds it: a state taken after it includes it
                        yield item
                    if stop.is_set():
                        return
                if fresh and pulled == 0:
                    raise RuntimeError(f"rank {ds.rank} of {ds.world_size} gets no samples in an epoch")
                ds.set_epoch(ds.epoch + 1)
                pulled = 0

        try:
            seqs = self.packer.pack(items())
            while not stop.is_set():
                group = list(itertools.islice(seqs, self.batch_size))
                if len(group) < self.batch_size:  # only when stopping
                    return
                item = (self.collate_fn(group), self._snapshot(pulled), None)
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which raises it
            ready.put((None, None, e))
