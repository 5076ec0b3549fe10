"""Text decontamination: captions and documents that contain an eval set's text (the text rows of the blocklists in
`dedup.reference`) get drop_reason `eval_contamination`, and the score store records the matched eval item
(`contamination_source`: the blocklist row's source). A dedup step of the corpus-wide half (split.py), so a new
reference needs no restaging.

  captions   MinHash, as near-dup: a caption whose LSH bands collide with an eval text's and whose estimated Jaccard
             (the share of equal signature values) is >= `threshold` (CaptionMatch)
  documents  GPT-3 / datatrove NGramsDecont style n-gram overlap: a document with any window of `ngram` words equal
             to one of an eval item's (an item shorter than that, but of at least `min_words` words, is one window of
             its own length) is contaminated (DocumentMatch). Whole-document MinHash cannot find a 20-word question
             in a 2,000-word page: the Jaccard of their shingle sets is ~0.01.

The join is a broadcast hash join on Ray: one Ray task reads the blocklists and builds the eval side (sorted uint64
keys: a few million for the largest eval suites, tens of MB), which stays in the object store; each unit's
candidates task (split._candidates, already one per unit) looks its rows up with np.searchsorted. No shuffle of the
corpus, and the driver holds one object ref and a count, whatever the corpus or eval size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from mm1data.config import check
from mm1data.dedup import (
    U32_MAX,
    MinHashConfig,
    _mix64,
    band_hashes,
    minhash_signatures,
    word_ngram_hashes,
)

MATCH_BATCH = 4096  # texts matched together (bounds the signature and window arrays of one call)
_NONE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class CaptionMatch:
    """A caption is contaminated when its MinHash bands collide with an eval text's and their estimated Jaccard is
    >= threshold. Word 1-grams (captions are ~10 words: one changed word leaves a word-set Jaccard of ~0.8, but
    removes 2 of ~9 bigrams and 5 of ~6 5-grams); 20 bands x 5 rows: a pair at Jaccard 0.8 is a candidate with
    probability 0.9996, at 0.5 with 0.47 (then refused by the estimate, whose standard error is <= 0.05)."""

    ngram: int = 1  # words per shingle
    bands: int = 20
    rows: int = 5
    threshold: float = 0.8  # estimated Jaccard at or above which a caption is the eval text
    seed: int = 1

    def __post_init__(self) -> None:
        check(self, "threshold", gt=0, le=1)
        _ = self.minhash  # the MinHash ranges (bands, rows, ngram, seed) are checked there

    @property
    def minhash(self) -> MinHashConfig:
        return MinHashConfig(True, self.bands, self.rows, self.ngram, self.seed)


@dataclass(frozen=True)
class DocumentMatch:
    """A document is contaminated when any window of `ngram` words equals one of an eval item's (GPT-3's 13-gram
    rule, as datatrove's NGramsDecontFilter); an eval item of min_words..ngram-1 words must appear whole. Items
    shorter than min_words are not looked for (a 5-word question is in countless pages by chance)."""

    ngram: int = 13
    min_words: int = 8

    def __post_init__(self) -> None:
        check(self, "ngram", ge=1, le=64)
        check(self, "min_words", ge=1, le=self.ngram)


# ---- the eval side ------------------------------------------------------------------------------------------------


def _band_salt(bands: int) -> np.ndarray:
    """A 64-bit salt per band: band b's hash h is the key h ^ salt[b], so one sorted array holds every band."""
    return _mix64(np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def build_index(locations: list[str], match: CaptionMatch | DocumentMatch) -> tuple[int, dict[str, Any] | None]:
    """Ray task: the text rows of the blocklists -> (how many keys, the eval side: sorted uint64 `keys`, int64
    `ids` (eval row of each key, ascending within equal keys), the Bloom `bitset`, `texts` (for a CaptionMatch,
    which verifies candidates on them; empty for documents) and `sources` as Arrow arrays, `lengths`); (0, None)
    when no item can match (none, or all too short)."""
    import pyarrow as pa

    from mm1data.blocklist import read_texts

    texts, sources = read_texts(locations)
    if not texts:
        return 0, None
    keys, ids = [], []
    if isinstance(match, CaptionMatch):
        salt = _band_salt(match.bands)
        for lo in range(0, len(texts), MATCH_BATCH):
            _, bands = _bands(texts[lo : lo + MATCH_BATCH], match)
            row, band = np.nonzero(bands)  # 0: a text with no words
            keys.append(bands[row, band] ^ salt[band])
            ids.append(lo + row.astype(np.int64))
        lengths: list[int] = []
    else:
        used: set[int] = set()
        for lo in range(0, len(texts), MATCH_BATCH):
            words, windows = word_ngram_hashes(texts[lo : lo + MATCH_BATCH], range(match.min_words, match.ngram + 1))
            for L, (h, doc) in windows.items():
                whole = (words[doc] == L) | (L == match.ngram)  # shorter items: only the window of all their words
                keys.append(h[whole])
                ids.append(lo + doc[whole])
                used.update([L] if whole.any() else [])
        lengths = sorted(used)  # the window lengths a document is hashed at
    k = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    i = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.lexsort((i, k))
    index = {
        "keys": k[order],
        "bitset": _bitset(k),
        "ids": i[order],
        "texts": pa.array(texts if isinstance(match, CaptionMatch) else [], pa.string()),  # captions verify
        "sources": pa.array(sources, pa.string()),
        "lengths": lengths,
    }
    return (len(k), index) if len(k) else (0, None)


def _bands(texts: list[str], match: CaptionMatch) -> tuple[np.ndarray, np.ndarray]:
    """-> (MinHash signatures, LSH band hashes: 0 for a text with no words)."""
    sig = minhash_signatures(texts, match.minhash)
    return sig, band_hashes(sig, (sig != U32_MAX).any(axis=1), match.minhash)


# ---- the corpus side ----------------------------------------------------------------------------------------------


def match_texts(texts: list[str | None], index: dict[str, Any], match: CaptionMatch | DocumentMatch) -> np.ndarray:
    """-> int64 per text: the eval row it contains (the smallest such for a document; the highest Jaccard, then
    the smallest row, for a caption), or -1."""
    texts = ["" if t is None else t for t in texts]
    out = np.full(len(texts), -1, dtype=np.int64)
    for lo in range(0, len(texts), MATCH_BATCH):
        part = texts[lo : lo + MATCH_BATCH]
        fn = _match_captions if isinstance(match, CaptionMatch) else _match_documents
        out[lo : lo + len(part)] = fn(part, index, match)
    return out


def _bitset(keys: np.ndarray) -> tuple[int, np.ndarray]:
    """A one-hash Bloom filter over the keys' top bits, ~16 bits a key (2 MB per million keys; ~6% of absent
    hashes pass): a lookup is then one cached bit test, and only the few that pass pay a binary search (a
    searchsorted over a large array costs ~0.25 us a hash in cache misses: most of the match time without it)."""
    b = int(np.clip(np.ceil(np.log2(max(len(keys), 1) * 16)), 16, 34))
    bits = np.zeros(1 << (b - 3), dtype=np.uint8)
    slot = keys >> np.uint64(64 - b)
    np.bitwise_or.at(bits, slot >> np.uint64(3), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8))
    return b, bits


def _lookup(h: np.ndarray, index: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (the positions in h of hashes that are keys, where their runs of equal keys start and end in `keys`)."""
    b, bits = index["bitset"]
    slot = h >> np.uint64(64 - b)
    maybe = np.flatnonzero((bits[slot >> np.uint64(3)] >> (slot & np.uint64(7)).astype(np.uint8)) & 1)
    keys = index["keys"]
    lo, hi = np.searchsorted(keys, h[maybe], side="left"), np.searchsorted(keys, h[maybe], side="right")
    found = hi > lo
    return maybe[found], lo[found], hi[found]


def _match_documents(texts: list[str], index: dict[str, Any], match: DocumentMatch) -> np.ndarray:
    best = np.full(len(texts), _NONE, dtype=np.int64)
    _, windows = word_ngram_hashes(texts, index["lengths"])
    for h, doc in windows.values():
        at, a, _ = _lookup(h, index)
        np.minimum.at(best, doc[at], index["ids"][a])  # ids ascend within a key: a is the smallest
    return np.where(best == _NONE, -1, best)


def _match_captions(texts: list[str], index: dict[str, Any], match: CaptionMatch) -> np.ndarray:
    out = np.full(len(texts), -1, dtype=np.int64)
    sig, bands = _bands(texts, match)
    row, band = np.nonzero(bands)
    at, a, b = _lookup(bands[row, band] ^ _band_salt(match.bands)[band], index)
    if not len(at):
        return out
    row, n = row[at], b - a
    # every (caption, eval text) pair sharing a band, once
    rows = np.repeat(row, n)
    where = np.repeat(a - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
    pairs = np.unique(np.stack([rows, index["ids"][where]], axis=1), axis=0)
    evals, inv = np.unique(pairs[:, 1], return_inverse=True)
    eval_sig = minhash_signatures([index["texts"][int(e)].as_py() for e in evals], match.minhash)
    jaccard = (sig[pairs[:, 0]] == eval_sig[inv]).mean(axis=1)
    ok = jaccard >= match.threshold
    pairs, jaccard = pairs[ok], jaccard[ok]
    order = np.lexsort((pairs[:, 1], -jaccard, pairs[:, 0]))  # per caption: highest Jaccard, then smallest row
    pairs = pairs[order]
    first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]] if len(pairs) else np.zeros(0, bool)
    out[pairs[first, 0]] = pairs[first, 1]
    return out


def _joined(value: Any) -> str | None:
    """A text, or an interleaved document's positions (paragraphs; None at images) as one text: its paragraphs
    joined by a blank line. Every paragraph, also those a filter removed (the step reads one column, not
    seg_reason): a document is judged by all the text it came with."""
    if isinstance(value, list):
        return "\n\n".join(p for p in value if p)
    return value


_CACHE: dict[str, Any] = {}


def _get(ref: Any) -> dict[str, Any]:
    """The eval side, once per worker process (the last one asked for: a run has one)."""
    import ray

    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]


# ---- the dedup step ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextReference:
    """Dedup step (split.py): kept rows whose `text_col` contains an eval text of the `locations` blocklists get
    drop_reason `reason` and `contamination_source`; the others go on to the next step. `prepare` (on the driver,
    Ray up) builds the eval side in a Ray task; with no text rows in the blocklists the step reads nothing."""

    text_col: str
    locations: tuple[str, ...]
    match: CaptionMatch | DocumentMatch
    reason: str = "eval_contamination"
    index: Any = None  # the eval side's ObjectRef, set by prepare()
    added: ClassVar[dict[str, str]] = {"contamination_source": ""}

    @property
    def column(self) -> str:  # the staged column the candidates read (src_row, read anyway, when nothing to match)
        return self.text_col if self.index is not None else "src_row"

    def prepare(self) -> TextReference:
        import ray

        count, ref = ray.remote(num_cpus=1, num_returns=2)(build_index).remote(list(self.locations), self.match)
        return dataclasses.replace(self, index=ref if ray.get(count) else None)

    def candidates(self, t: Any, prefix: str) -> dict[str, np.ndarray]:
        if self.index is None or not t.num_rows:
            return {f"{prefix}eval": np.full(t.num_rows, -1, dtype=np.int64)}
        texts = [_joined(v) for v in t[self.text_col].to_pylist()]
        return {f"{prefix}eval": match_texts(texts, _get(self.index), self.match)}

    def apply(self, ds: Any, prefix: str, n: int, keys: Any) -> tuple:
        col, reason, ref = f"{prefix}eval", self.reason, self.index

        def marks(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            ev = np.asarray(b.get(col, np.zeros(0, np.int64)))
            hit = ev >= 0
            src = np.empty(int(hit.sum()), dtype=object)
            if len(src):
                sources = _get(ref)["sources"]
                src[:] = [sources[int(i)].as_py() for i in ev[hit]]
            pos = np.asarray(b.get("pos", np.zeros(0, np.int64)))[hit]
            return {"pos": pos, "reason": np.full(len(pos), reason, dtype=object), "contamination_source": src}

        def kept(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v[b[col] < 0] for k, v in b.items() if k != col} if col in b else b  # (an empty block)

        return ds.map_batches(kept, batch_format="numpy"), ds.map_batches(marks, batch_format="numpy")
