"""Exact and near-duplicate (MinHash-LSH) text dedup over the whole run: deterministic, the first copy is kept."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import xxhash

from mm1data.config import BadValue, check

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

U32_MAX = np.uint32(0xFFFFFFFF)  # the minhash of an empty shingle set (as datasketch initialises its hash values)
_GOLDEN = 0x9E3779B97F4A7C15  # odd: the base of the polynomial word hash, and invertible mod 2**64
_CHUNK_CHARS = 1 << 20  # characters normalised and hashed together: bounds the temporaries of one call
_WORD_WINDOW = 1 << 18  # characters per prefix-sum window of the word hash (one huge text stays bounded too)
_SHINGLE_BLOCK = 4096  # shingles per permutation block: the (perms x block) uint64 matrix stays in L2 cache
MAX_PERMUTATIONS = 4096  # bands * rows (datatrove uses 112, datasketch 128)
MAX_NGRAM = 64  # words per shingle (5 is usual; one numpy pass per word of the n-gram)
_BAND_ROWS_PER_GROUP = 2_000_000  # (band, hash, id) rows per LSH group on a worker: ~160 MB peak (80 B a row)


@dataclass(frozen=True)
class MinHashConfig:
    enabled: bool = True  # near-duplicate removal (drop_reason dup_near)
    bands: int = 14  # LSH bands; 14 x 8 as datatrove: ~50% catch probability at Jaccard 0.72, ~92% at 0.8
    rows: int = 8  # minhash values per band; bands * rows permutations in all
    ngram: int = 5  # words per shingle
    seed: int = 1  # seeds the permutations; signatures only compare under the same seed

    def __post_init__(self) -> None:
        check(self, "bands", ge=1, le=MAX_PERMUTATIONS)
        check(self, "rows", ge=1, le=MAX_PERMUTATIONS)
        check(self, "ngram", ge=1, le=MAX_NGRAM)
        check(self, "seed", ge=0)
        if self.bands * self.rows > MAX_PERMUTATIONS:  # the (permutations x 4096) uint64 block is 32 KB a permutation
            raise BadValue("bands", self.bands, f"such that bands * rows <= {MAX_PERMUTATIONS} (rows is {self.rows})")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


# ---------------------------------------------------------------------------------------------------------------
# Normalisation. A text is NFKC-normalised and case folded (NFKC again after casefold, which can un-normalise, as
# Unicode's NFKC_Casefold does); then every run of characters that are not letters or numbers (Unicode categories
# L*, N* in Python's unicodedata), or marks (M*) attached to one, is one word break: punctuation, symbols, spaces,
# controls, format characters (soft hyphen, zero-width space) and underscore. Unlike datatrove's simplify_text,
# digits and diacritics are kept. The categories are looked up in a code point table so that a whole batch is split
# into words with numpy, without a regex pass per text (a regex costs ~0.3 ms on an 8 kB text, more than all the
# hashing).


_BREAK, _LETTER, _MARK = 0, 1, 2


@functools.cache
def _char_classes() -> np.ndarray:
    """uint8 per code point: letters and numbers 1, marks 2, the rest (breaks) 0. Built once per process (~0.2 s)."""
    n = sys.maxunicode + 1
    kind = {"L": _LETTER, "N": _LETTER, "M": _MARK}
    return np.fromiter((kind.get(unicodedata.category(chr(c))[0], _BREAK) for c in range(n)), dtype=np.uint8, count=n)


def _is_word(cp: np.ndarray) -> np.ndarray:
    """Word characters: letters, numbers, and marks that follow one (a lone mark, e.g. an emoji's variation
    selector after a symbol, is a break)."""
    cls = _char_classes()[cp]
    is_word = cls == _LETTER
    marks = cls == _MARK
    if marks.any():  # most batches have none: skip the scan
        idx = np.arange(len(cp))
        base = np.maximum.accumulate(np.where(marks, -1, idx))  # the last non-mark at or before each position
        is_word |= marks & (base >= 0) & is_word[np.maximum(base, 0)]
    return is_word


def _fold(text: str) -> str:
    if text.isascii():  # O(1) for a str; NFKC is the identity on ASCII and casefold is lower
        return text.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Folded texts joined by a space -> (uint32 code points, int64 start of each text plus the end, n + 1)."""
    folded = [_fold("" if t is None else t) for t in texts]  # a null text has no words
    lengths = np.fromiter((len(f) + 1 for f in folded), dtype=np.int64, count=len(folded))
    starts = np.zeros(len(folded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    joined = " ".join(folded) + " "  # the space keeps the last word of one text from running into the next
    # surrogatepass: a lone surrogate (from surrogateescape decoding) is a word break, not an encoding error
    return np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32), starts


def _word_bounds(is_word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (start, end) code point index of every word (maximal run of word characters)."""
    step = np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    return np.flatnonzero(step == 1), np.flatnonzero(step == -1)


def _normalized(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (code points of every normalised text, concatenated; int64 offsets, n + 1)."""
    cp, starts = _codepoints(texts)
    is_word = _is_word(cp)
    w_start, w_end = _word_bounds(is_word)
    # keep word characters, plus one space for the break after each word that another word of its text follows
    keep = is_word.copy()
    doc = np.searchsorted(starts, w_start, side="right") - 1
    inner = np.flatnonzero(doc[1:] == doc[:-1])  # words followed by a word of the same text
    keep[w_end[inner]] = True
    out = np.where(is_word, cp, np.uint32(ord(" ")))[keep]
    kept_before = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
    return out, kept_before[starts]


def normalize_text(text: str) -> str:
    """NFKC, case folded, each punctuation/symbol/space run -> one space, stripped: "Hi,  World!" -> "hi world".

    The words of this string are exactly the words minhash shingles are built from.
    """
    out, _ = _normalized([text])
    return out.tobytes().decode("utf-32-le")


def text_fingerprints(texts: Sequence[str]) -> np.ndarray:
    """Exact-duplicate key per text: 32 hex of xxh3-128 over the UTF-8 of normalize_text; "" where that is empty.

    128 bits so that a billion-document corpus has no accidental collision (64 bits would give ~3% odds of one).
    Exact dedup is then an ExactDedup step over a column of these.
    """
    out = np.full(len(texts), "", dtype="<U32")
    for lo in range(0, len(texts), 4096):  # batches bound the code point arrays
        cps, offsets = _normalized(texts[lo : lo + 4096])
        for i, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            if b > a:
                out[lo + i] = xxhash.xxh3_128_hexdigest(cps[a:b].tobytes().decode("utf-32-le").encode())
    return out


# ---------------------------------------------------------------------------------------------------------------
# MinHash. Every step is a numpy pass over a whole batch of texts, not a Python call per word or shingle:
#   words      polynomial hash of each word's code points from one prefix sum (x P^-j), a fixed 64-bit mix
#   shingles   sum_k word_hash[i + k] * M_k over the ngram words at i, mixed (a short text: one shingle of all)
#   permute    h_p(x) = ((a_p * x + b_p) mod 2**64) >> 32 for the top 32 bits x of each shingle hash, a_p, b_p
#              uniform 64-bit: Dietzfelbinger's multiply-add-shift, strongly universal (2-independent) like the
#              (a x + b) mod (2**61 - 1) of datatrove and old datasketch, but with no modulo (~2x faster in numpy);
#              datatrove's uint64 a * x also wraps mod 2**64 before its mod p, so it is not exactly that family
#   minimum    (perms x shingles) blocks, np.minimum.reduceat per text
#   bands      each band's `rows` values folded into one uint64 by a chain of bijective mixes; 0 is reserved
# Hand-written because no maintained library hashes word n-grams in bulk: datasketch and datatrove hash one Python
# string per shingle, which is most of their time.


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's fmix64 finaliser, a bijection of uint64 with full avalanche (in place on a fresh array)."""
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def _powers(base: int, n: int) -> np.ndarray:
    """base**j mod 2**64 for j < n; tables up to twice the window are cached (n a power of two: few of them)."""
    return _cached_powers(base, n) if n <= 2 * _WORD_WINDOW else _make_powers(base, n)


def _make_powers(base: int, n: int) -> np.ndarray:
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    return np.cumprod(p, out=p)  # uint64 products wrap mod 2**64, which is the ring the hash lives in


_cached_powers = functools.cache(_make_powers)


def _word_hashes(cp: np.ndarray, w_start: np.ndarray, w_end: np.ndarray) -> np.ndarray:
    """uint64 hash of each word, a function of its code points only (not of where it is)."""
    inv = pow(_GOLDEN, -1, 1 << 64)
    out = np.empty(len(w_start), dtype=np.uint64)
    # windows of whole words keep the prefix-sum arrays at ~_WORD_WINDOW even for one huge text
    cuts = np.searchsorted(w_start, np.arange(0, int(w_end[-1]) if len(w_end) else 0, _WORD_WINDOW)[1:])
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(w_start)]):
        if lo == hi:
            continue
        a, b = int(w_start[lo]), int(w_end[hi - 1])
        size = 1 << (b - a - 1).bit_length()
        prefix = np.zeros(b - a + 1, dtype=np.uint64)
        np.cumsum(cp[a:b] * _powers(inv, size)[: b - a], out=prefix[1:])
        s, e = w_start[lo:hi] - a, w_end[lo:hi] - a
        # sum_j cp[j] P**(e-1-j) over the word = P**(e-1) * (prefix[e] - prefix[s])
        out[lo:hi] = (prefix[e] - prefix[s]) * _powers(_GOLDEN, size)[e - 1]
    return _mix64(out)


def _shingle_hashes(word_hash: np.ndarray, word_doc: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint32 hash of every shingle, int64 text index of it); texts shorter than ngram words give one shingle."""
    n = len(word_hash)
    idx = np.arange(n)
    counts = np.bincount(word_doc)
    first = (np.cumsum(counts) - counts)[word_doc]  # first word of each word's text
    left = first + counts[word_doc] - idx  # words from here to the end of the text
    mult = _mix64(np.arange(1, ngram + 1, dtype=np.uint64) * np.uint64(_GOLDEN)) | np.uint64(1)
    acc = word_hash * mult[0]
    for k in range(1, min(ngram, n)):  # k >= n: no word of the batch has a k-th successor, nothing to add
        nxt = np.zeros(n, dtype=np.uint64)
        nxt[: n - k] = word_hash[k:]
        acc += np.where(left > k, nxt, np.uint64(0)) * mult[k]  # words past the end of the text count as absent
    keep = (left >= ngram) | ((idx == first) & (left < ngram))
    return (_mix64(acc[keep]) >> np.uint64(32)).astype(np.uint32), word_doc[keep]


@functools.cache
def _permutations(seed: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 64, size=(num_perm, 1), dtype=np.uint64, endpoint=False)
    b = rng.integers(0, 1 << 64, size=(num_perm, 1), dtype=np.uint64, endpoint=False)
    return a, b


def _chunks(texts: Sequence[str]) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of about _CHUNK_CHARS characters (a longer text is a chunk by itself)."""
    bounds, size, lo = [], 0, 0
    for i, t in enumerate(texts):
        size += len(t or "")
        if size >= _CHUNK_CHARS:
            bounds.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(texts):
        bounds.append((lo, len(texts)))
    return bounds


def _signatures(texts: Sequence[str], cfg: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint32 (n, bands*rows) minhash signatures, bool (n,) texts with at least one word)."""
    a, b = _permutations(cfg.seed, cfg.num_perm)
    sig = np.full((cfg.num_perm, len(texts)), U32_MAX, dtype=np.uint32)  # perms x texts: rows are contiguous
    valid = np.zeros(len(texts), dtype=bool)
    block = np.empty((cfg.num_perm, _SHINGLE_BLOCK), dtype=np.uint64)
    for lo, hi in _chunks(texts):
        cp, starts = _codepoints(texts[lo:hi])
        w_start, w_end = _word_bounds(_is_word(cp))
        word_doc = np.searchsorted(starts, w_start, side="right") - 1
        shingles, doc = _shingle_hashes(_word_hashes(cp, w_start, w_end), word_doc, cfg.ngram)
        valid[lo + doc] = True
        for s in range(0, len(shingles), _SHINGLE_BLOCK):
            x, d = shingles[s : s + _SHINGLE_BLOCK], doc[s : s + _SHINGLE_BLOCK]
            m = block[:, : len(x)]
            np.multiply(a, x.astype(np.uint64)[None, :], out=m)
            np.add(m, b, out=m)
            runs = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])  # each text's shingles are contiguous
            # >> 32 is monotone, so the minimum of the top halves is the top half of the minimum
            low = (np.minimum.reduceat(m, runs, axis=1) >> np.uint64(32)).astype(np.uint32)
            cols = lo + d[runs]
            sig[:, cols] = np.minimum(sig[:, cols], low)
    return np.ascontiguousarray(sig.T), valid


def minhash_signatures(texts: Sequence[str], cfg: MinHashConfig) -> np.ndarray:
    """uint32 (n, bands * rows) MinHash signatures of each text's word `ngram` shingles (words of normalize_text).

    A text with fewer than `ngram` words has one shingle of all its words; a text with no words has the empty
    set's signature (all 0xFFFFFFFF), and minhash_bands gives it no bands.
    """
    return _signatures(texts, cfg)[0]


def band_hashes(sig: np.ndarray, valid: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """uint64 (n, bands): one hash per band of `rows` signature values; 0 (never a real hash) where not valid."""
    v = sig.reshape(len(sig), cfg.bands, cfg.rows).astype(np.uint64)
    h = np.full(v.shape[:2], _GOLDEN, dtype=np.uint64)
    for r in range(cfg.rows):
        h = _mix64(h * np.uint64(0xD6E8FEB86659FD93) ^ v[:, :, r])  # a bijection of h for each value: no shortcuts
    h[h == 0] = 1
    h[~valid] = 0
    return h


def minhash_bands(texts: Sequence[str], cfg: MinHashConfig) -> np.ndarray:
    """uint64 (n, bands) LSH band hashes; two texts are candidates when any band's hash is equal.

    A text with no words gets a row of zeros, and near_duplicates skips zeros, so it never matches anything.
    """
    sig, valid = _signatures(texts, cfg)
    return band_hashes(sig, valid, cfg)


def word_ngram_hashes(texts: Sequence[str], lengths: Sequence[int]) -> tuple[np.ndarray, dict[int, tuple]]:
    """-> (int64 words per text, {L: (uint64 hash of every window of exactly L consecutive words, int64 text
    index of it)}) over the words of normalize_text, for each L in `lengths` (a text shorter than L has none).

    64 bits, not the 32 of MinHash shingles: a decontamination join looks up every window of a 2T-token corpus in a
    set of millions of eval n-grams, where 32 bits would give a false hit in most documents. A window of L words
    hashes as MinHash's shingle of the same words (the same word hashes and position multipliers), mixed to 64
    bits; so an eval item of L < ngram words, hashed whole, matches a document's window of those L words."""
    words = np.zeros(len(texts), dtype=np.int64)
    parts: dict[int, list] = {L: [] for L in lengths}
    top = max(lengths, default=0)
    mult = _mix64(np.arange(1, top + 1, dtype=np.uint64) * np.uint64(_GOLDEN)) | np.uint64(1)
    for lo, hi in _chunks(texts):
        cp, starts = _codepoints(texts[lo:hi])
        w_start, w_end = _word_bounds(_is_word(cp))
        word_doc = np.searchsorted(starts, w_start, side="right") - 1
        counts = np.bincount(word_doc, minlength=hi - lo)
        words[lo:hi] = counts
        if not len(word_doc):
            continue
        wh = _word_hashes(cp, w_start, w_end)
        n = len(wh)
        left = (np.cumsum(counts) - counts)[word_doc] + counts[word_doc] - np.arange(n)  # words to the text's end
        acc = wh * mult[0]
        for k in range(1, top + 1):  # acc = the hash of the window of k words starting at each word
            if k in parts:
                at = np.flatnonzero(left >= k)
                parts[k].append((_mix64(acc[at]), lo + word_doc[at]))
            if k < top and k < n:
                nxt = np.zeros(n, dtype=np.uint64)
                nxt[: n - k] = wh[k:]
                acc = acc + nxt * mult[k]
    out = {}
    for L, got in parts.items():
        h = np.concatenate([g[0] for g in got]) if got else np.zeros(0, np.uint64)
        d = np.concatenate([g[1] for g in got]) if got else np.zeros(0, np.int64)
        out[L] = (h, d)
    return words, out


# ---------------------------------------------------------------------------------------------------------------
# LSH on Ray. Each (band, hash, id) row goes to a group chosen by its hash, so every bucket lies whole in one group;
# a group is sorted and cut into buckets with numpy (one call per group, not per bucket: Ray's map_groups calls the
# function once per key, and there are bands x rows keys, nearly all singletons). Each bucket member links to the
# bucket's smallest id. The edges stay on Ray: connected_components joins them there (or, for a graph of at most
# LOCAL_CC_EDGES edges, on the driver with scipy: a constant bound, not one that grows with the corpus).


@contextlib.contextmanager
def task_shuffles():
    """Ray Data shuffles (groupby) as tasks while inside: Ray's default hash shuffle starts aggregator actors, which
    costs seconds per shuffle on a small cluster; its sort shuffle reuses the task workers. Datasets run inside."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    strategy, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = strategy


def _by_group(ds: ray.data.Dataset, parts: int, fn: Callable, key: Callable | None = None) -> ray.data.Dataset:
    """fn over every group of rows: one group per value of `key(batch)` (or of the `part` column the rows carry),
    by a shuffle. With a single group there is nothing to shuffle: all rows go to one task (a shuffle's start-up
    costs seconds, which would dominate a small run)."""
    if parts == 1:
        return ds.repartition(1).map_batches(fn, batch_size=None, batch_format="numpy")
    if key is not None:
        ds = ds.map_batches(lambda b: {**b, "part": np.asarray(key(b)).astype(np.int64)}, batch_format="numpy")
    return ds.groupby("part", num_partitions=parts).map_groups(fn, batch_format="numpy")


class _BandRows:
    """Batch of (id, bands) rows -> one row per band: part (group), band, hash, id."""

    def __init__(self, id_col: str, bands_col: str, bands: int, parts: int) -> None:
        self.id_col, self.bands_col, self.bands, self.parts = id_col, bands_col, bands, parts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch[self.id_col], dtype=np.int64)
        col = batch[self.bands_col]
        h = np.stack(col) if col.dtype == object else col  # a list column arrives as an array of arrays
        h = np.asarray(h).astype(np.uint64, copy=False).reshape(len(ids), -1)
        if h.shape[1] != self.bands:
            raise ValueError(f"{self.bands_col} has {h.shape[1]} bands per row, the config says {self.bands}")
        ids = np.repeat(ids, self.bands)
        h = h.ravel()
        # zeros (texts with no words) are kept to here so that no block is empty (Ray's shuffle cannot sort a block
        # without columns) and are spread by id; _bucket_edges ignores them
        part = np.where(h != 0, h % np.uint64(self.parts), ids.astype(np.uint64) % np.uint64(self.parts))
        band = np.tile(np.arange(self.bands, dtype=np.int32), len(h) // self.bands)
        return {"part": part.astype(np.int64), "band": band, "hash": h, "id": ids}


def _bucket_edges(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All the buckets of one group -> unique edges (member id, the bucket's smallest id), member != smallest."""
    real = group["hash"] != 0  # 0: a text with no words, in no bucket
    order = np.lexsort((group["id"][real], group["hash"][real], group["band"][real]))
    band, h, ids = group["band"][real][order], group["hash"][real][order], group["id"][real][order]
    new = np.ones(len(ids), dtype=bool)
    new[1:] = (band[1:] != band[:-1]) | (h[1:] != h[:-1])
    smallest = ids[new][np.cumsum(new) - 1]  # ids ascend within a bucket
    member = ~new & (ids != smallest)
    pairs = np.unique(np.stack([ids[member], smallest[member]], axis=1), axis=0)  # one edge per pair, not per band
    return {"src": pairs[:, 0].copy(), "dst": pairs[:, 1].copy()}


def lsh_edges(ds: ray.data.Dataset, cfg: MinHashConfig, id_col: str = "pos", bands_col: str = "mh_bands"):
    """Dataset of (int64 id, uint64 bands) rows (ids order rows as the input does) -> Dataset of edges (src, dst):
    src and dst share a band bucket, dst is the bucket's smallest id. Ids can be documents or paragraphs.
    `ds` is counted first to size the groups: cheap when it is materialised or read from parquet."""
    parts = max(1, math.ceil(ds.count() * cfg.bands / _BAND_ROWS_PER_GROUP))
    keyed = ds.map_batches(_BandRows(id_col, bands_col, cfg.bands, parts), batch_format="numpy", batch_size=4096)
    return _by_group(keyed, parts, _bucket_edges)


def near_duplicates(
    ds: ray.data.Dataset, cfg: MinHashConfig, id_col: str = "pos", bands_col: str = "mh_bands"
) -> ray.data.Dataset:
    """Near-duplicate clusters over a whole Dataset of (id, bands) rows -> Dataset of (id, root): every id in a
    cluster of two or more, and the smallest id of its cluster (the first text in input order: the one kept)."""
    return connected_components(lsh_edges(ds, cfg, id_col, bands_col))


def join_clusters(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges -> (ids, cluster): every id on an edge, ascending, and the smallest id of its connected component."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as components

    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if not len(src):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ids, node = np.unique(np.concatenate([src, dst]), return_inverse=True)
    m = len(src)
    graph = coo_matrix((np.ones(m, dtype=np.int8), (node[:m], node[m:])), shape=(len(ids), len(ids)))
    _, label = components(graph, directed=False)
    # ids ascend, so the first node of each component is its smallest id
    _, first = np.unique(label, return_index=True)
    return ids, ids[first][label]


# ---------------------------------------------------------------------------------------------------------------
# Connected components on Ray: the alternating large-star / small-star rounds of Kiveris et al. ("Connected
# Components in MapReduce and Beyond", SoCC 2014). Edges are kept as (a, b), a > b. A round groups the edges by node
# (one hash shuffle each) and relinks them to the smallest id around that node:
#   large-star: every neighbour v > u of u links to m(u) = min(u, its neighbours)
#   small-star: every neighbour v < u of u, and u itself, link to m = min(u, its smaller neighbours)
# until no node has both a smaller and a larger neighbour: then the graph is a forest of stars, each centred on its
# component's smallest id. O(log n) rounds; a worker holds one group of edges (CC_ROWS_PER_GROUP), the driver none.

LOCAL_CC_EDGES = 4_000_000  # up to this many edges (64 MB) are joined on the driver with scipy instead
CC_ROWS_PER_GROUP = 4_000_000  # directed edges per group of a round on one worker (~100 MB with the sort)
_MAX_ROUNDS = 100


def _part(node: np.ndarray, parts: int) -> np.ndarray:
    return (_mix64(node.astype(np.uint64)) % np.uint64(parts)).astype(np.int64)


class _Directed:
    """Undirected edges (a, b) -> directed (u, v) rows keyed by u: both ways (large-star) or a -> b (small-star)."""

    def __init__(self, both: bool, parts: int) -> None:
        self.both, self.parts = both, parts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b = batch["a"].astype(np.int64), batch["b"].astype(np.int64)
        u, v = (np.r_[a, b], np.r_[b, a]) if self.both else (a, b)
        return {"part": _part(u, self.parts), "u": u, "v": v}


def _star(group: dict[str, np.ndarray], large: bool) -> dict[str, np.ndarray]:
    """One star step over all the nodes of a group -> new undirected edges (a > b) and `c`: 1 where a large-star
    step relinked an edge past u (u had both smaller and larger neighbours: not converged)."""
    u, v = group["u"], group["v"]
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    first = np.r_[True, u[1:] != u[:-1]]
    starts = np.flatnonzero(first)
    m = np.minimum(np.minimum.reduceat(v, starts), u[starts])  # v ascend per node: the first one is its minimum
    mu = m[np.cumsum(first) - 1]
    if large:
        sel = v > u
        a, b, c = v[sel], mu[sel], mu[sel] < u[sel]
    else:  # v < u: the smaller neighbours; u itself links to m too
        sel = v != mu
        a, b = np.r_[v[sel], u[starts]], np.r_[mu[sel], m]
        keep = a != b
        a, b, c = a[keep], b[keep], np.zeros(0, dtype=bool)
    pairs = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else np.zeros((0, 2), np.int64)
    changed = np.zeros(len(pairs), dtype=np.int8)
    changed[:1] = c.any()  # one flag per group is enough: the driver only asks whether any node moved
    return {"a": pairs[:, 0].copy(), "b": pairs[:, 1].copy(), "c": changed}


def _round(edges: ray.data.Dataset, n: int, large: bool) -> ray.data.Dataset:
    parts = max(1, math.ceil(2 * n / CC_ROWS_PER_GROUP))
    directed = edges.map_batches(_Directed(large, parts), batch_format="numpy", batch_size=65536)
    return _by_group(directed, parts, functools.partial(_star, large=large)).materialize()


def _roots(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Star edges (leaf a, centre b) of a group of centres -> (id, root) for each leaf and, once, each centre."""
    centres = np.unique(group["b"])
    return {"id": np.r_[group["a"], centres], "root": np.r_[group["b"], centres]}


def connected_components(edges: ray.data.Dataset) -> ray.data.Dataset:
    """Edges (src, dst) -> Dataset of (id, root): every id on an edge and the smallest id of its component."""
    import ray

    undirected = edges.map_batches(
        lambda e: {"a": np.maximum(e["src"], e["dst"]), "b": np.minimum(e["src"], e["dst"])}, batch_format="numpy"
    ).materialize()
    n = undirected.count()
    if n <= LOCAL_CC_EDGES:
        batches = list(undirected.iter_batches(batch_size=None, batch_format="numpy"))
        a = np.concatenate([b["a"] for b in batches]) if batches else np.zeros(0, np.int64)
        b = np.concatenate([b["b"] for b in batches]) if batches else np.zeros(0, np.int64)
        import pyarrow as pa

        ids, root = join_clusters(a, b)
        return ray.data.from_arrow(pa.table({"id": ids, "root": root}))
    e = undirected
    with task_shuffles():
        for _ in range(_MAX_ROUNDS):
            large = _round(e, n, large=True)
            if not large.sum("c"):  # a forest of stars centred on each component's minimum
                e = large
                break
            e = _round(large, n, large=False)
            n = e.count()
        else:
            raise RuntimeError(f"connected components did not converge in {_MAX_ROUNDS} rounds")
    parts = max(1, math.ceil(n / CC_ROWS_PER_GROUP))
    return _by_group(e, parts, _roots, lambda s: _part(s["b"], parts))


# ---------------------------------------------------------------------------------------------------------------
# Dedup steps of a corpus kind. The runner reads the kept rows of every unit into one candidate Dataset (pos: the
# row's int64 position in input order, plus each step's columns under its own prefix), then runs the steps in order,
# each on the rows the earlier ones kept, and turns their marks (pos, reason, added columns) into drop reasons.

ROWS_PER_GROUP = 2_000_000  # candidate rows a dedup group holds on one worker (~100 MB with the sort)
GROUP_BYTES = 256 << 20  # Arrow bytes of candidate rows an ExactDedup group holds on one worker
VALUE_ROWS_PER_GROUP = 1_000_000  # FrequentValues rows (a value string each, ~100 B) a group holds on one worker


def key128(values: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 halves of xxh3-128 of each value's UTF-8; (0, 0), never a real hash, for an empty value.

    128 bits because the shuffle compares hashes, not values: no two of 10**12 values collide by chance."""
    hi = np.zeros(len(values), dtype=np.uint64)
    lo = np.zeros(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        if v:
            h = xxhash.xxh3_128_intdigest(v.encode("utf-8", "surrogatepass")) or 1
            hi[i], lo[i] = h >> 64, h & 0xFFFFFFFFFFFFFFFF
    return hi, lo


def _first_copies(group: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Marks `_dup` on every row of the group whose key equals an earlier (smaller pos) row's key."""
    hi, lo, pos = group[f"{prefix}hi"], group[f"{prefix}lo"], group["pos"]
    has = np.flatnonzero((hi != 0) | (lo != 0))
    order = has[np.lexsort((pos[has], lo[has], hi[has]))]
    dup = np.zeros(len(pos), dtype=bool)
    dup[order[1:]] = (hi[order[1:]] == hi[order[:-1]]) & (lo[order[1:]] == lo[order[:-1]])
    return {**group, "_dup": dup}


@dataclass(frozen=True)
class ExactDedup:
    """Rows whose `column` repeats an earlier kept row's value get drop_reason `reason`; the first copy in input
    order is kept and empty values never match. A hash shuffle on Ray by the value's 128-bit hash."""

    column: str
    reason: str
    added: ClassVar[dict[str, str]] = {}  # score-store columns the step adds, with their default

    def candidates(self, t: pa.Table, prefix: str) -> dict[str, np.ndarray]:
        hi, lo = key128(t[self.column].to_pylist() if t.num_rows else [])
        return {f"{prefix}hi": hi, f"{prefix}lo": lo}

    def apply(self, ds: ray.data.Dataset, prefix: str, n: int, keys: Callable) -> tuple:
        """-> (the candidates still kept, marks (pos, reason))."""
        # groups bounded in rows and in bytes: the later steps' candidate columns ride along (an interleaved
        # document's repetition values are ~0.5 KB); size_bytes() of a materialized dataset is its metadata
        parts = max(1, math.ceil(n / ROWS_PER_GROUP), math.ceil(ds.size_bytes() / GROUP_BYTES))
        fn = functools.partial(_first_copies, prefix=prefix)
        out = _by_group(ds, parts, fn, lambda b: b[f"{prefix}hi"] % np.uint64(parts)).materialize()
        reason = self.reason
        marks = out.map_batches(
            lambda b: {"pos": b["pos"][b["_dup"]], "reason": np.full(int(b["_dup"].sum()), reason, dtype=object)}
        )
        kept = out.map_batches(lambda b: {k: v[~b["_dup"]] for k, v in b.items() if k not in ("_dup", "part")})
        return kept, marks


@dataclass(frozen=True)
class NearDedup:
    """MinHash-LSH near duplicates over the staged band hashes in `column`: in each cluster the first row in input
    order is kept and the others get drop_reason `reason`; every member records its cluster's kept key. It must be a
    kind's last dedup step (it does not pass on the rows it keeps)."""

    column: str
    minhash: MinHashConfig
    reason: str = "dup_near"
    added: ClassVar[dict[str, str]] = {"dup_cluster": ""}  # the key of the kept row of the row's cluster

    def candidates(self, t: pa.Table, prefix: str) -> dict[str, np.ndarray]:
        if not t.num_rows:
            return {f"{prefix}bands": np.zeros((0, self.minhash.bands), dtype=np.uint64)}
        col = t[self.column].combine_chunks()
        bands = col.flatten().to_numpy(zero_copy_only=False).astype(np.uint64).reshape(len(col), -1)
        return {f"{prefix}bands": bands}

    def apply(self, ds: ray.data.Dataset, prefix: str, n: int, keys: Callable) -> tuple:
        roots = near_duplicates(ds.select_columns(["pos", f"{prefix}bands"]), self.minhash, "pos", f"{prefix}bands")
        reason = self.reason

        def marks(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ids, root = (b.get(c, np.zeros(0, dtype=np.int64)) for c in ("id", "root"))  # an empty block: no columns
            return {"pos": ids, "reason": np.where(ids != root, reason, "").astype(object), "dup_cluster": keys(root)}

        return None, roots.map_batches(marks, batch_format="numpy")


@dataclass(frozen=True)
class FrequentValues:
    """Values of the list column `column` found in too many of the rows still kept are removed from every row
    (OBELICS: an image URL in more than 10 documents is a logo or a banner; a paragraph 3 times in a domain is
    boilerplate). A value is "FAMILY:rest"; `limits` gives each family its most rows. Each row with removals records
    them in `removed` (a JSON list), and a row left with fewer than `min_left` values of family `counted` gets
    drop_reason `reason`. Two hash shuffles on Ray (by value, then by row); no value set on the driver. It must be a
    kind's last dedup step (it does not pass on the rows it keeps)."""

    column: str
    limits: tuple[tuple[str, int], ...]  # (family, most rows a value of it may be in)
    counted: str = ""  # the family min_left counts
    min_left: int = 0
    reason: str = "doc_images"
    removed: str = "removed_images"

    @property
    def added(self) -> dict[str, str]:
        return {self.removed: ""}

    def candidates(self, t: pa.Table, prefix: str) -> dict[str, np.ndarray]:
        values = t[self.column].to_pylist() if t.num_rows else []
        lists = [list(dict.fromkeys(v or ())) for v in values]  # a value counts once per row
        out = np.empty(len(lists), dtype=object)
        # the values travel as one JSON string per row (any character, a URL's newline too), as a ragged list
        # column would be pickled by Ray Data between the steps
        out[:] = [json.dumps(v, ensure_ascii=False) for v in lists]
        counts = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
        return {f"{prefix}values": out, f"{prefix}n": counts}

    def apply(self, ds: ray.data.Dataset, prefix: str, n: int, keys: Callable) -> tuple:
        # groups sized by values, not rows: a document holds tens of them (its image URLs and paragraphs)
        values = int(ds.sum(f"{prefix}n") or 0) if n else 0
        parts = max(1, math.ceil(values / VALUE_ROWS_PER_GROUP))
        explode = functools.partial(_explode_values, col=f"{prefix}values", counted=self.counted)
        rows = ds.select_columns(["pos", f"{prefix}values"]).map_batches(explode, batch_format="numpy")
        frequent = _by_group(
            rows, parts, functools.partial(_frequent, limits=dict(self.limits)), lambda b: b["hi"] % np.uint64(parts)
        )
        per_row = functools.partial(
            _removals, counted=self.counted, min_left=self.min_left, reason=self.reason, removed=self.removed
        )
        marks = _by_group(frequent, parts, per_row, lambda b: _part(b["pos"], parts))
        return None, marks


def _family(value: str) -> str:
    return value.split(":", 1)[0]


def _explode_values(b: dict[str, np.ndarray], col: str, counted: str) -> dict[str, np.ndarray]:
    """(pos, values as a JSON list) rows -> a row per value: pos, its row's count of `counted` values, the value and
    its hash."""
    pos = np.asarray(b["pos"], dtype=np.int64)
    lists = [json.loads(v) if v else [] for v in b[col]]
    sizes = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
    counts = np.fromiter((sum(_family(x) == counted for x in v) for v in lists), dtype=np.int64, count=len(lists))
    values = np.empty(int(sizes.sum()), dtype=object)
    values[:] = [v for vs in lists for v in vs]
    hi, lo = key128(values.tolist())
    return {"pos": np.repeat(pos, sizes), "n": np.repeat(counts, sizes), "value": values, "hi": hi, "lo": lo}


def _frequent(group: dict[str, np.ndarray], limits: dict[str, int]) -> dict[str, np.ndarray]:
    """Rows of values (any number of distinct values per group) -> the rows whose value is in more rows than its
    family's limit."""
    if not len(group.get("pos", ())):
        return {"pos": np.zeros(0, np.int64), "n": np.zeros(0, np.int64), "value": np.zeros(0, dtype=object)}
    hi, lo = group["hi"].astype(np.uint64), group["lo"].astype(np.uint64)
    order = np.lexsort((lo, hi))
    hi, lo = hi[order], lo[order]
    first = np.r_[True, (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])]
    run = np.cumsum(first) - 1
    sizes = np.bincount(run)
    values = group["value"][order]
    limit = np.fromiter((limits.get(_family(v), sys.maxsize) for v in values), dtype=np.int64, count=len(values))
    hit = order[sizes[run] > limit]
    return {
        "pos": group["pos"][hit].astype(np.int64),
        "n": group["n"][hit].astype(np.int64),
        "value": group["value"][hit],
    }


def _removals(
    group: dict[str, np.ndarray], counted: str, min_left: int, reason: str, removed: str
) -> dict[str, np.ndarray]:
    """Frequent values by row -> one mark per row: its reason ("" unless too few `counted` values are left) and the
    removed values as a JSON list (sorted: deterministic)."""
    pos = np.asarray(group.get("pos", np.zeros(0)), dtype=np.int64)
    if not len(pos):
        return {"pos": pos, "reason": np.zeros(0, dtype=object), removed: np.zeros(0, dtype=object)}
    order = np.argsort(pos, kind="stable")
    pos, n, values = pos[order], group["n"][order], group["value"][order]
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    ends = np.r_[starts[1:], len(pos)]
    gone = np.fromiter((_family(v) == counted for v in values), dtype=np.int64, count=len(values))
    left = n[starts] - np.add.reduceat(gone, starts)
    reasons = np.where(left < min_left, reason, "").astype(object)
    lists = np.empty(len(starts), dtype=object)
    lists[:] = [json.dumps(sorted(values[a:b].tolist())) for a, b in zip(starts, ends)]
    return {"pos": pos[starts], "reason": reasons, removed: lists}


# ---------------------------------------------------------------------------------------------------------------
# Near-duplicate images by pHash (mm1data.phash), and images of reference corpora (dedup.reference). One Ray job:
#   items     an image per row: id (the row's pos), sub (its position in an interleaved document; -1 for a caption
#             row), phash, sha256 halves, score (the keep rule's), n (a document's kept images), ref (0: this
#             run, 1: an mm1data output, 2: a blocklist)
#   bands     each item once per band of the 64 bits (multi-index hashing: `bands` slices of contiguous bits, so
#             two hashes within bands - 1 bits agree exactly on at least one slice), plus, when there are
#             references, once under its sha256 (a reference's same bytes); a hash shuffle by (band, value)
#   buckets   each bucket: every pair within max_distance (exact Hamming, numpy) -> an edge between two run images
#             or a hit of a run image on a reference image. A bucket larger than MAX_BUCKET is cut by the bits of
#             the next band too (and so on): its pairs are then found only if they also agree on those bits
#             (the recall this costs is measured in bench/phash.py); identical hashes are linked without pairs
#   clusters  connected_components over the edges; each cluster keeps its best image (highest score, then input
#             order) that no reference hit; the rest get dup_near_image
# Hand-written because no maintained library does Hamming LSH on Ray Data at this scale.

SHA_BAND = 255  # the band number of the sha256 rows (reference matching by the image's bytes)
MAX_BUCKET = 4096  # images compared pairwise in one bucket (~8M pairs, ~0.2 s); larger buckets are cut further
_SMALL_BUCKET = 64  # buckets up to this size are compared in one vectorised pass per offset, not one call each
IMAGE_BAND_ROWS_PER_GROUP = 2_000_000  # band rows (~60 B each) a bucket group holds on one worker
REF_REASONS = {1: "duplicate_of_reference", 2: "eval_contamination"}

_ITEM_TYPES = {
    "id": np.int64,
    "sub": np.int32,
    "phash": np.int64,
    "shahi": np.uint64,
    "shalo": np.uint64,
    "score": np.float64,
    "n": np.int32,
    "ref": np.int8,
}


def _empty(types: dict) -> dict[str, np.ndarray]:
    return {k: np.zeros(0, dtype=t) for k, t in types.items()}


def sha_halves(shas: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """The first two 64-bit words of each hex sha256 (128 bits: no chance collision); (0, 0) where there is none."""
    hi = np.zeros(len(shas), dtype=np.uint64)
    lo = np.zeros(len(shas), dtype=np.uint64)
    for i, s in enumerate(shas):
        if s and len(s) >= 32:
            try:
                hi[i], lo[i] = int(s[:16], 16) or 1, int(s[16:32], 16)
            except ValueError:  # not hex (a foreign reference file): nothing to match by
                pass
    return hi, lo


@dataclass(frozen=True)
class ImageReference:
    """A dedup.reference location, checked: an mm1data output (its score store's image rows) or a blocklist."""

    uri: str
    files: tuple[str, ...]  # the parquet files holding its image hashes
    flag: int  # 1 output, 2 blocklist (the reason: REF_REASONS)
    columns: tuple[str, ...] = ()  # the columns of those files that _reference_items reads


def check_references(locations: Sequence[str]) -> tuple[ImageReference, ...]:
    """Each location -> an ImageReference, or a ConfigError naming it: missing, or neither an output (index.json)
    nor a blocklist (.parquet with the mm1data blocklist metadata). Cheap: listings and a parquet footer."""
    from mm1data import storage
    from mm1data.blocklist import is_blocklist
    from mm1data.config import ConfigError

    out = []
    for loc in locations:
        if not isinstance(loc, str) or not loc:
            raise ConfigError(f"dedup.reference: {loc!r} is not a location")
        if loc.endswith(".parquet"):
            if not storage.exists(loc):
                raise ConfigError(f"dedup.reference: {loc} does not exist")
            try:
                ok = is_blocklist(loc)
            except Exception:
                ok = False
            if not ok:
                raise ConfigError(f"dedup.reference: {loc} is not a blocklist parquet (mm1data blocklist build)")
            out.append(ImageReference(loc, (loc,), 2, _reference_columns(loc)))
            continue
        index_uri = storage.join(loc, "index.json")
        if not storage.exists(index_uri):
            raise ConfigError(
                f"dedup.reference: {loc} is neither a blocklist parquet nor an mm1data output (no index.json)"
            )
        try:
            kind = json.loads(storage.read_bytes(index_uri)).get("kind", "")
        except (ValueError, AttributeError) as e:  # not JSON, or not an object
            raise ConfigError(f"dedup.reference: {index_uri} is not an mm1data index ({type(e).__name__})") from e
        folder = storage.join(loc, "meta_images" if kind == "interleaved" else "meta")
        files = tuple(sorted(f for f in storage.list_files(folder, recursive=False) if f.endswith(".parquet")))
        out.append(ImageReference(loc, files, 1, _reference_columns(files[0]) if files else ()))
    return tuple(out)


def _reference_columns(uri: str) -> tuple[str, ...]:
    """The columns of a reference's parquet that hold its images' hashes and which images count (a footer read)."""
    import pyarrow.parquet as pq

    from mm1data import storage

    with storage.open_seekable(uri) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return tuple(c for c in ("phash", "sha256", "image_sha256", "kind", "kept", "drop_reason") if c in names)


def _reference_items(t: pa.Table, flag: int) -> dict[str, np.ndarray]:
    """A batch of a reference's rows (meta/, meta_images/ or a blocklist) -> item rows: its kept images' hashes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = t.column_names
    keep = pc.is_valid(t["phash"]) if "phash" in names else pa.array(np.zeros(t.num_rows, bool))
    if "kind" in names:  # a blocklist: its image rows
        keep = pc.and_(keep, pc.equal(t["kind"], "image"))
    sha_col = "sha256" if "sha256" in names else "image_sha256"
    if "kept" in names:  # meta_images/: the images the output kept
        keep = pc.and_(keep, pc.fill_null(t["kept"], False))
    elif "drop_reason" in names:
        keep = pc.and_(keep, pc.equal(t["drop_reason"], ""))
    keep = pc.fill_null(keep, False)
    # an image without a pHash (undecodable) still matches by sha256
    has_sha = pc.is_valid(t[sha_col]) if sha_col in names else pa.array(np.zeros(t.num_rows, bool))
    if "kind" in names:
        has_sha = pc.and_(has_sha, pc.equal(t["kind"], "image"))
    rows = pc.or_(keep, pc.fill_null(has_sha, False))
    t = t.filter(rows)
    n = t.num_rows
    with_ph = n and "phash" in names
    ph_valid = pc.is_valid(t["phash"]).to_numpy(zero_copy_only=False) if with_ph else np.zeros(n, bool)
    ph = pc.fill_null(t["phash"], 0).to_numpy() if with_ph else np.zeros(n, np.int64)
    hi, lo = sha_halves(t[sha_col].to_pylist() if n and sha_col in names else [None] * n)
    out = {
        "id": np.full(n, -1, dtype=np.int64),
        "sub": np.full(n, -1, dtype=np.int32),
        "phash": ph.astype(np.int64),
        "shahi": hi,
        "shalo": lo,
        "score": np.zeros(n, dtype=np.float64),
        "n": np.zeros(n, dtype=np.int32),
        "ref": np.full(n, flag, dtype=np.int8),
        "has_phash": ph_valid.astype(bool),
    }
    return out


def read_references(refs: Sequence[ImageReference]):
    """Dataset of the references' image item rows (ref = 1 or 2), read by Ray tasks; None when there are none."""
    import ray

    parts = []
    for r in refs:
        if not r.files:
            continue
        if not r.columns:
            continue
        ds = ray.data.read_parquet(list(r.files), columns=list(r.columns))
        parts.append(ds.map_batches(_reference_items, batch_format="pyarrow", fn_kwargs={"flag": r.flag}))
    if not parts:
        return None
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _band_masks(bands: int) -> list[int]:
    """`bands` slices of contiguous bits covering the 64 (the first ones a bit wider when 64 % bands != 0)."""
    widths = [64 // bands + (i < 64 % bands) for i in range(bands)]
    out, lo = [], 0
    for w in widths:
        out.append(((1 << w) - 1) << lo)
        lo += w
    return out


class _ImageBandRows:
    """Item rows -> one row per band (the bits of the band, as the bucket key) and a sha256 row for images of this
    run and of references when references are present (they match by bytes too)."""

    def __init__(self, bands: int, parts: int, with_sha: bool) -> None:
        self.masks = np.array(_band_masks(bands), dtype=np.uint64)
        self.parts, self.with_sha = parts, with_sha

    def __call__(self, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        has = np.asarray(b["has_phash"], dtype=bool)
        ph = np.asarray(b["phash"], dtype=np.int64).view(np.uint64)
        nb = len(self.masks)
        rows = np.repeat(np.flatnonzero(has), nb)
        band = np.tile(np.arange(nb, dtype=np.int32), int(has.sum()))
        key = ph[rows] & self.masks[band]
        if self.with_sha:
            s = np.flatnonzero(np.asarray(b["shahi"], dtype=np.uint64) != 0)
            rows = np.r_[rows, s]
            band = np.r_[band, np.full(len(s), SHA_BAND, dtype=np.int32)]
            key = np.r_[key, np.asarray(b["shahi"], dtype=np.uint64)[s]]
        part = (_mix64(key ^ (band.astype(np.uint64) * np.uint64(_GOLDEN))) % np.uint64(self.parts)).astype(np.int64)
        out = {"part": part, "band": band, "key": key}
        for c, t in _ITEM_TYPES.items():
            out[c] = np.asarray(b[c], dtype=t)[rows]
        return out


_MATCH_TYPES = {"a": np.int64, "b": np.int64, "sa": np.float64, "sb": np.float64, "sub": np.int32, "n": np.int32}
_MATCH_TYPES["ref"] = np.int8  # 0: an edge (a, b) between two run images; 1 or 2: a hit of run image a (at sub)


def _pairs_within(ph: np.ndarray, lo: np.ndarray, hi: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, inside the same bucket [lo, hi) of the sorted rows, with Hamming <= k."""
    from mm1data.phash import hamming

    ii, jj = [], []
    sizes = hi - lo
    small = sizes <= _SMALL_BUCKET
    if small.any():  # one pass per offset over every small bucket's rows at once
        sz = sizes[small]
        idx = np.arange(int(sz.sum())) - np.repeat(np.cumsum(sz) - sz, sz) + np.repeat(lo[small], sz)
        end = np.repeat(hi[small], sz)
        for off in range(1, int(sz.max())):
            sel = idx + off < end
            i, j = idx[sel], idx[sel] + off
            near = hamming(ph[i], ph[j]) <= k
            ii.append(i[near])
            jj.append(j[near])
    for a, b in zip(lo[~small], hi[~small]):  # a big bucket: its matrix (MAX_BUCKET bounds it) in row blocks
        for r in range(a, b, _SMALL_BUCKET * 8):  # 512 x 4096 distances (16 MB) at a time
            d = hamming(ph[r : r + _SMALL_BUCKET * 8, None], ph[None, a:b]) <= k
            i, j = np.nonzero(d)
            i, j = i + r, j + a
            ii.append(i[j > i])
            jj.append(j[j > i])
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64)


def _runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) of each run of equal values in a sorted key."""
    if not len(key):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    new = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return new, np.r_[new[1:], len(key)]


def _image_matches(group: dict[str, np.ndarray], k: int, bands: int, cap: int) -> dict[str, np.ndarray]:
    """One group of band rows -> matches: edges between run images within k, hits of run images on references."""
    if not len(group.get("id", ())):
        return _empty(_MATCH_TYPES)
    band, key, ph = group["band"], group["key"].astype(np.uint64), group["phash"].astype(np.int64)
    masks = _band_masks(bands)
    pi, pj = [], []  # pairs of row indices (into the group) that match
    sha = band == SHA_BAND
    if sha.any():  # the same image bytes: same first and second words (no Hamming)
        rows = np.flatnonzero(sha)
        order = rows[np.lexsort((group["shalo"][rows], key[rows]))]
        k2 = group["shalo"][order]
        lo, hi = _runs(np.stack([key[order], k2], axis=1).view([("a", np.uint64), ("b", np.uint64)]).ravel())
        big = hi - lo > 1
        for a, b in zip(lo[big], hi[big]):  # a run image and a reference image with these bytes
            refs = group["ref"][order[a:b]] > 0
            if refs.any() and (~refs).any():
                best = order[a:b][refs][np.argmax(group["ref"][order[a:b]][refs])]
                runs = order[a:b][~refs]
                pi.append(runs)
                pj.append(np.full(len(runs), best))
    rows = np.flatnonzero(~sha)
    level = np.zeros(len(rows), dtype=np.int64)  # extra bands a row's bucket key holds (oversized buckets grow)
    while len(rows):
        b0 = band[rows].astype(np.int64)
        ext = np.zeros(len(rows), dtype=np.uint64)
        for lv in np.unique(level):  # the key: the bits of bands b0 .. b0 + level (cyclic)
            m = level == lv
            mask = np.zeros(m.sum(), dtype=np.uint64)
            for j in range(int(lv) + 1):
                mask |= np.array(masks, dtype=np.uint64)[(b0[m] + j) % bands]
            ext[m] = ph[rows[m]].view(np.uint64) & mask
        order = np.lexsort((group["id"][rows], ext, level, b0))
        rows, b0, ext, level = rows[order], b0[order], ext[order], level[order]
        keyed = np.stack([b0.astype(np.uint64), level.astype(np.uint64), ext], axis=1)
        lo, hi = _runs(keyed.view([("b", np.uint64), ("l", np.uint64), ("e", np.uint64)]).ravel())
        sizes = hi - lo
        over = sizes > cap
        full = level[lo] >= bands - 1  # the key is all 64 bits: every member has the same hash
        link = over & full
        for a, b in zip(lo[link], hi[link]):  # identical hashes: no pairs; each links to one anchor
            members = rows[a:b]
            flags = group["ref"][members]
            runs = members[flags == 0]
            if len(runs) > 1:  # run images: a chain to the first
                pi.append(runs[1:])
                pj.append(np.full(len(runs) - 1, runs[0]))
            if len(runs) and (flags > 0).any():  # a reference among them: every run image hits it
                pi.append(runs)
                pj.append(np.full(len(runs), members[np.argmax(flags)]))
        fine = sizes <= cap
        fine &= sizes > 1
        i, j = _pairs_within(ph[rows], lo[fine], hi[fine], k)
        pi.append(rows[i])
        pj.append(rows[j])
        grow = over & ~full
        if not grow.any():
            break
        sel = np.concatenate([np.arange(a, b) for a, b in zip(lo[grow], hi[grow])])
        rows, level = rows[sel], level[sel] + 1
    i = np.concatenate(pi).astype(np.int64) if pi else np.zeros(0, np.int64)
    j = np.concatenate(pj).astype(np.int64) if pj else np.zeros(0, np.int64)
    ref = group["ref"].astype(np.int8)
    ids, subs, score, n = group["id"], group["sub"], group["score"], group["n"]
    both = (ref[i] == 0) & (ref[j] == 0)
    # edges between two run images (caption: ids are rows; interleaved images share a row id, so no edges there)
    ea, eb = ids[i[both]], ids[j[both]]
    keep = ea != eb
    ea, eb, sa, sb = ea[keep], eb[keep], score[i[both]][keep], score[j[both]][keep]
    # a hit: the run side of a run/reference pair
    mixed = (ref[i] == 0) != (ref[j] == 0)
    run = np.where(ref[i[mixed]] == 0, i[mixed], j[mixed])
    other = np.where(ref[i[mixed]] == 0, j[mixed], i[mixed])
    return {
        "a": np.r_[ea, ids[run]].astype(np.int64),
        "b": np.r_[eb, np.full(len(run), -1)].astype(np.int64),
        "sa": np.r_[sa, score[run]].astype(np.float64),
        "sb": np.r_[sb, np.zeros(len(run))].astype(np.float64),
        "sub": np.r_[np.full(len(ea), -1), subs[run]].astype(np.int32),
        "n": np.r_[np.zeros(len(ea)), n[run]].astype(np.int32),
        "ref": np.r_[np.zeros(len(ea)), ref[other]].astype(np.int8),
    }


def image_matches(items, bands: int, max_distance: int, with_sha: bool, cap: int = MAX_BUCKET):
    """Dataset of item rows (_ITEM_TYPES + has_phash; run images ref 0, references 1 or 2) -> Dataset of matches
    (_MATCH_TYPES): an edge per pair of run images within max_distance found in a bucket, and a hit per run image
    within max_distance of (or with the bytes of) a reference image. The same pair may appear more than once."""
    n = items.count()
    parts = max(1, math.ceil(n * (bands + with_sha) / IMAGE_BAND_ROWS_PER_GROUP))
    rows = items.map_batches(_ImageBandRows(bands, parts, with_sha), batch_format="numpy", batch_size=16384)
    fn = functools.partial(_image_matches, k=max_distance, bands=bands, cap=cap)
    return _by_group(rows, parts, fn)


_NODE_TYPES = {"id": np.int64, "root": np.int64, "score": np.float64, "ref": np.int8}


def _node_rows(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Matches -> a row per image on an edge (its score) or hit (its reference flag)."""
    edge = b["ref"] == 0
    ids = np.r_[b["a"][edge], b["b"][edge], b["a"][~edge]].astype(np.int64)
    return {
        "id": ids,
        "root": np.full(len(ids), -1, dtype=np.int64),
        "score": np.r_[b["sa"][edge], b["sb"][edge], np.full(int((~edge).sum()), np.nan)].astype(np.float64),
        "ref": np.r_[np.zeros(2 * int(edge.sum())), b["ref"][~edge]].astype(np.int8),
    }


def _per_node(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All the rows of some images (by id) -> one row each: its cluster root (-1: none), score, reference flag."""
    if not len(group.get("id", ())):
        return _empty(_NODE_TYPES)
    order = np.argsort(group["id"], kind="stable")
    ids = group["id"][order]
    lo, hi = _runs(ids)
    score = np.where(np.isnan(group["score"][order]), -np.inf, group["score"][order])
    return {
        "id": ids[lo],
        "root": np.maximum.reduceat(group["root"][order], lo),
        "score": np.maximum.reduceat(score, lo),
        "ref": np.maximum.reduceat(group["ref"][order].astype(np.int8), lo),
    }


def _cluster_marks(group: dict[str, np.ndarray], keys: Callable, reason: str, cluster_col: str) -> dict:
    """Images by cluster root -> marks: a reference hit gets its reason; each cluster keeps its best image that no
    reference hit (highest score, then the smallest id: input order) and marks the others `reason`; every member
    records the kept image's key (none: "")."""
    ids = np.asarray(group.get("id", np.zeros(0)), dtype=np.int64)
    if not len(ids):
        return {"pos": ids, "reason": np.zeros(0, dtype=object), cluster_col: np.zeros(0, dtype=object)}
    root, score, ref = group["root"], group["score"].astype(np.float64), group["ref"]
    order = np.lexsort((ids, -score, ref > 0, root))  # per root: eligible first, best score, then input order
    ids, root, ref = ids[order], root[order], ref[order]
    lo, hi = _runs(root)
    first = np.repeat(lo, hi - lo)
    keeper = np.where((ref[first] == 0) & (root[first] >= 0), ids[first], -1)
    reasons = np.where(ids == keeper, "", reason).astype(object)
    reasons[root < 0] = ""  # not in a cluster: only a reference hit
    for flag, why in REF_REASONS.items():
        reasons[ref == flag] = why
    cluster = np.full(len(ids), "", dtype=object)
    has = keeper >= 0
    if has.any():
        cluster[has] = keys(keeper[has])
    return {"pos": ids, "reason": reasons, cluster_col: cluster}


@dataclass(frozen=True)
class NearImageDedup:
    """pHash near-duplicate images of the caption kind (a row = an image), over the whole run, and images of the
    references (dedup.reference): a row within max_distance bits of a reference image, or with its sha256, gets
    duplicate_of_reference (an mm1data output) or eval_contamination (a blocklist); with `within`, rows within
    max_distance of each other form clusters (connected components): each keeps its row with the highest
    `score_col` (then the first in input order) and the others get dup_near_image; every member records the kept
    row's key in dup_image_cluster. It must be a kind's last dedup step."""

    column: str = "phash"
    sha_column: str = "sha256"
    score_column: str = "clip_score"
    max_distance: int = 8
    bands: int = 9
    within: bool = True
    references: tuple[ImageReference, ...] = ()
    reason: str = "dup_near_image"
    added: ClassVar[dict[str, str]] = {"dup_image_cluster": ""}

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column, self.sha_column, self.score_column)

    def candidates(self, t: pa.Table, prefix: str) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        n = t.num_rows
        if self.column in t.column_names and n:
            has = pc.is_valid(t[self.column]).to_numpy(zero_copy_only=False)
            ph = pc.fill_null(t[self.column], 0).to_numpy().astype(np.int64)
        else:
            has, ph = np.zeros(n, bool), np.zeros(n, np.int64)
        hi, lo = np.zeros(n, np.uint64), np.zeros(n, np.uint64)
        if self.references and self.sha_column in t.column_names:  # sha256 is matched against references only
            hi, lo = sha_halves(t[self.sha_column].to_pylist())
        score = np.full(n, np.nan)
        if self.score_column in t.column_names and n:
            score = pc.fill_null(t[self.score_column], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        return {f"{prefix}phash": ph, f"{prefix}has": has, f"{prefix}hi": hi, f"{prefix}lo": lo, f"{prefix}s": score}

    def items(self, ds, prefix: str):
        def to_items(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            m = len(b["pos"])
            return {
                "id": np.asarray(b["pos"], dtype=np.int64),
                "sub": np.full(m, -1, dtype=np.int32),
                "phash": np.asarray(b[f"{prefix}phash"], dtype=np.int64),
                "shahi": np.asarray(b[f"{prefix}hi"], dtype=np.uint64),
                "shalo": np.asarray(b[f"{prefix}lo"], dtype=np.uint64),
                "score": np.asarray(b[f"{prefix}s"], dtype=np.float64),
                "n": np.zeros(m, dtype=np.int32),
                "ref": np.zeros(m, dtype=np.int8),
                "has_phash": np.asarray(b[f"{prefix}has"], dtype=bool),
            }

        cols = ["pos", *(f"{prefix}{c}" for c in ("phash", "has", "hi", "lo", "s"))]
        return ds.select_columns(cols).map_batches(to_items, batch_format="numpy")

    def apply(self, ds: ray.data.Dataset, prefix: str, n: int, keys: Callable) -> tuple:
        items = self.items(ds, prefix)
        refs = read_references(self.references)
        if refs is not None:
            items = items.union(refs)
        elif not self.within:
            return None, _empty_marks(self.added)
        items = items.materialize()  # counted to size the groups, then shuffled: computed once
        matches = image_matches(items, self.bands, self.max_distance, refs is not None).materialize()
        nodes = matches.map_batches(_node_rows, batch_format="numpy")
        if self.within:
            edges = matches.map_batches(
                lambda b: {"src": b["a"][b["ref"] == 0], "dst": b["b"][b["ref"] == 0]}, batch_format="numpy"
            )
            roots = connected_components(edges).map_batches(
                lambda b: {
                    "id": np.asarray(b.get("id", np.zeros(0)), dtype=np.int64),
                    "root": np.asarray(b.get("root", np.zeros(0)), dtype=np.int64),
                    "score": np.full(len(b.get("id", ())), np.nan),
                    "ref": np.zeros(len(b.get("id", ())), dtype=np.int8),
                },
                batch_format="numpy",
            )
            nodes = nodes.union(roots)
        m = nodes.materialize()
        parts = max(1, math.ceil(m.count() / ROWS_PER_GROUP))
        per_node = _by_group(m, parts, _per_node, lambda b: _part(b["id"], parts)).materialize()
        fn = functools.partial(_cluster_marks, keys=keys, reason=self.reason, cluster_col="dup_image_cluster")
        # by cluster; an image in none (only a reference hit, root -1) goes by its own id
        return None, _by_group(
            per_node, parts, fn, lambda b: _part(np.where(b["root"] >= 0, b["root"], b["id"]), parts)
        )


def _reference_hits(group: dict[str, np.ndarray], removed: str, min_left: int, reason: str) -> dict:
    """Hits on images of documents (by pos) -> one mark per document: the positions to remove with their reasons
    (a JSON list of [position, reason], in `removed`), and `reason` when fewer than min_left images are left."""
    pos = np.asarray(group.get("a", np.zeros(0)), dtype=np.int64)
    if not len(pos):
        return {"pos": pos, "reason": np.zeros(0, dtype=object), removed: np.zeros(0, dtype=object)}
    order = np.lexsort((group["sub"], pos))
    pos, sub, ref, n = pos[order], group["sub"][order], group["ref"][order], group["n"][order]
    lo, hi = _runs(pos)
    lists, reasons = [], []
    for a, b in zip(lo, hi):
        gone: dict[int, int] = {}
        for s, r in zip(sub[a:b].tolist(), ref[a:b].tolist()):
            gone[s] = max(gone.get(s, 0), r)  # a blocklist hit (eval_contamination) wins over an output's
        lists.append(json.dumps([[s, REF_REASONS[r]] for s, r in sorted(gone.items())]))
        reasons.append(reason if int(n[a]) - len(gone) < min_left else "")
    return {"pos": pos[lo], "reason": np.array(reasons, dtype=object), removed: np.array(lists, dtype=object)}


@dataclass(frozen=True)
class ReferenceImages:
    """Images of interleaved documents within max_distance of a reference image (dedup.reference), or with its
    sha256, are removed from their documents: `removed` lists [position, reason] (duplicate_of_reference or
    eval_contamination) for the kind's `decided` hook, and a document left with fewer than `min_left` of its kept
    images gets drop_reason `reason` (doc_images). The rows go on to the next step unchanged."""

    references: tuple[ImageReference, ...]
    max_distance: int = 8
    bands: int = 9
    column: str = "image_phash"
    min_left: int = 0
    reason: str = "doc_images"
    removed: str = "removed_ref"

    @property
    def added(self) -> dict[str, str]:
        return {self.removed: ""}

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column, "image_sha256", "seg_reason", "images")

    def candidates(self, t: pa.Table, prefix: str) -> dict[str, np.ndarray]:
        n = t.num_rows
        names = t.column_names
        hashes = t[self.column].to_pylist() if self.column in names and n else [None] * n
        shas = t["image_sha256"].to_pylist() if "image_sha256" in names and n else [None] * n
        segs = t["seg_reason"].to_pylist() if "seg_reason" in names and n else [None] * n
        urls = t["images"].to_pylist() if "images" in names and n else [None] * n
        out = np.empty(n, dtype=object)
        values = []
        for h, s, seg, u in zip(hashes, shas, segs, urls):
            h, s, seg, u = h or [], s or [], seg or [], u or []
            # the document's kept images: [position, pHash or null, sha256]
            values.append(
                json.dumps(
                    [
                        [i, h[i] if i < len(h) else None, s[i] if i < len(s) else ""]
                        for i in range(len(u))
                        if u[i] is not None and not (seg[i] if i < len(seg) else "")
                    ]
                )
            )
        out[:] = values
        return {f"{prefix}images": out}

    def apply(self, ds: ray.data.Dataset, prefix: str, n: int, keys: Callable) -> tuple:
        col = f"{prefix}images"

        def to_items(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ids, subs, phs, has, shas, counts = [], [], [], [], [], []
            for p, v in zip(b["pos"].tolist(), b[col]):
                imgs = json.loads(v) if v else []
                for i, h, s in imgs:
                    ids.append(p)
                    subs.append(i)
                    phs.append(h or 0)
                    has.append(h is not None)
                    shas.append(s)
                    counts.append(len(imgs))
            hi, lo = sha_halves(shas)
            m = len(ids)
            return {
                "id": np.array(ids, dtype=np.int64),
                "sub": np.array(subs, dtype=np.int32),
                "phash": np.array(phs, dtype=np.int64),
                "shahi": hi,
                "shalo": lo,
                "score": np.zeros(m),
                "n": np.array(counts, dtype=np.int32),
                "ref": np.zeros(m, dtype=np.int8),
                "has_phash": np.array(has, dtype=bool),
            }

        refs = read_references(self.references)
        if refs is None:
            return ds, _empty_marks(self.added)
        items = ds.select_columns(["pos", col]).map_batches(to_items, batch_format="numpy").union(refs).materialize()
        matches = image_matches(items, self.bands, self.max_distance, True)
        hits = matches.map_batches(lambda b: {k: v[b["ref"] > 0] for k, v in b.items()}, batch_format="numpy")
        hits = hits.materialize()
        parts = max(1, math.ceil(hits.count() / ROWS_PER_GROUP))
        fn = functools.partial(_reference_hits, removed=self.removed, min_left=self.min_left, reason=self.reason)
        return ds, _by_group(hits, parts, fn, lambda b: _part(b["a"], parts))


def _empty_marks(added: dict[str, str]):
    import pyarrow as pa
    import ray

    cols = {"pos": pa.array([], pa.int64()), "reason": pa.array([], pa.string())}
    cols.update((c, pa.array([], pa.string())) for c in added)
    return ray.data.from_arrow(pa.table(cols))
