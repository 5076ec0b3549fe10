"""Text dedup: normalisation, exact fingerprints, MinHash signatures and bands, LSH clusters on Ray."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from mm1data import dedup
from mm1data.dedup import (
    MinHashConfig,
    join_clusters,
    minhash_bands,
    minhash_signatures,
    near_duplicates,
    normalize_text,
    text_fingerprints,
)

CFG = MinHashConfig()
M64 = (1 << 64) - 1
VOCAB = [f"w{i}x" for i in range(200_000)]  # distinct words: every 5-gram of a random text is distinct


def words(rng: np.random.Generator, n: int) -> list[str]:
    return [VOCAB[i] for i in rng.integers(0, len(VOCAB), n)]


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = normalize_text(text).split()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else ({tuple(w)} if w else set())


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# --- normalisation and exact fingerprints ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello,  World!", "hello world"),
        ("  Tabs\tand\nnew-lines\r\n ", "tabs and new lines"),
        ("snake_case.and/slashes", "snake case and slashes"),
        ("Ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３", "fullwidth abc123"),  # NFKC folds compatibility forms
        ("Straße ﬁne ÉCOLE", "strasse fine école"),  # casefold, ligature, accents kept
        ("cafe\u0301 l’été—2024…", "café l été 2024"),  # combining accent composed; curly quote and dashes split
        ("हिन्दी भाषा", "हिन्दी भाषा"),  # marks (virama, vowel signs) stay inside their word
        ("I ❤️ NY", "i ny"),
        ("a\udc80b", "a b"),  # a lone surrogate is a break, not an error
        ("", ""),
        (" ?!… ", ""),
    ],
)
def test_normalize_text_exact(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


def test_fingerprints_fold_case_space_punctuation_only() -> None:
    texts = ["Hello World", "hello,   WORLD!!", "  hello\nworld.", "Hello Worlds", "hello world 2", "", "--- !"]
    fp = text_fingerprints(texts)
    assert fp[0] == xxhash.xxh3_128_hexdigest(b"hello world")
    assert fp[1] == fp[2] == fp[0]
    assert len({fp[0], fp[3], fp[4]}) == 3
    assert list(fp[5:]) == ["", ""]  # no words: no key, never a duplicate


# --- signatures ------------------------------------------------------------------------------------------------


def _fmix(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    return x ^ (x >> 33)


def naive_signature(text: str, cfg: MinHashConfig) -> list[int]:
    """The definition, one Python int at a time: what the vectorised code must reproduce exactly."""
    g = dedup._GOLDEN
    w = normalize_text(text).split()
    grams = [w[i : i + cfg.ngram] for i in range(len(w) - cfg.ngram + 1)] if len(w) >= cfg.ngram else [w]
    mult = [_fmix(((k + 1) * g) & M64) | 1 for k in range(cfg.ngram)]

    def word_hash(word: str) -> int:
        h = 0
        for c in word:
            h = (h * g + ord(c)) & M64
        return _fmix(h)

    xs = [_fmix(sum(word_hash(x) * m for x, m in zip(gram, mult)) & M64) >> 32 for gram in grams if gram]
    a, b = dedup._permutations(cfg.seed, cfg.num_perm)
    return [
        min(((int(ap) * x + int(bp)) & M64) >> 32 for x in xs) if xs else 0xFFFFFFFF
        for ap, bp in zip(a.ravel(), b.ravel())
    ]


def test_signatures_equal_the_naive_definition() -> None:
    cfg = MinHashConfig(bands=4, rows=3, ngram=3, seed=7)
    texts = ["The quick brown fox jumps over the lazy dog.", "Ünïcode wörds, ok", "two words", "solo", "", "¿?"]
    sig = minhash_signatures(texts, cfg)
    assert sig.shape == (6, 12) and sig.dtype == np.uint32
    assert sig.tolist() == [naive_signature(t, cfg) for t in texts]


def test_signatures_do_not_depend_on_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    texts = [" ".join(words(rng, int(n))) + " Ünï." for n in rng.integers(0, 60, 40)]
    whole = minhash_signatures(texts, CFG)
    # tiny chunks, word windows and permutation blocks: every boundary path runs many times
    monkeypatch.setattr(dedup, "_CHUNK_CHARS", 97)
    monkeypatch.setattr(dedup, "_WORD_WINDOW", 16)
    monkeypatch.setattr(dedup, "_SHINGLE_BLOCK", 7)
    np.testing.assert_array_equal(minhash_signatures(texts, CFG), whole)
    np.testing.assert_array_equal(minhash_signatures(texts[5:6], CFG), whole[5:6])


def test_signatures_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    a, b = " ".join(words(rng, 200)), " ".join(words(rng, 200))
    s1 = minhash_signatures([a, b, a], CFG)
    np.testing.assert_array_equal(s1, minhash_signatures([a, b, a], MinHashConfig()))
    np.testing.assert_array_equal(s1[0], s1[2])
    assert (s1[0] == s1[1]).mean() < 0.05
    assert (minhash_signatures([a], MinHashConfig(seed=2))[0] == s1[0]).mean() < 0.05
    # identical after normalisation -> identical signature and bands
    variant = a.upper().replace(" ", " ,\n ")
    np.testing.assert_array_equal(minhash_signatures([variant], CFG)[0], s1[0])


def test_estimated_jaccard_tracks_true_jaccard() -> None:
    # B is A shifted by s words: they share a known fraction of 5-grams
    rng = np.random.default_rng(11)
    seq = words(rng, 3000)
    pairs = [(" ".join(seq[:1000]), " ".join(seq[s : s + 1000])) for s in (100, 330, 660)]
    sig = minhash_signatures([t for p in pairs for t in p], CFG)
    est = (sig[0::2] == sig[1::2]).mean(axis=1)
    true = np.array([true_jaccard(a, b) for a, b in pairs])
    np.testing.assert_allclose(true, [(996 - s) / (996 + s) for s in (100, 330, 660)])  # 0.82, 0.50, 0.20
    # each of the 112 minhashes matches with probability J: a binomial mean, sd sqrt(J(1-J)/112) <= 0.047
    assert np.all(np.abs(est - true) <= 4 * np.sqrt(true * (1 - true) / CFG.num_perm))
    # and no bias: over 200 independent pairs the mean error is within 4 sd of the mean
    shifts = rng.integers(5, 300, 200)
    seqs = [words(rng, 300 + s) for s in shifts]
    a_texts = [" ".join(w[:300]) for w in seqs]
    b_texts = [" ".join(w[s : s + 300]) for w, s in zip(seqs, shifts)]
    sig_a, sig_b = minhash_signatures(a_texts, CFG), minhash_signatures(b_texts, CFG)
    est = (sig_a == sig_b).mean(axis=1)
    true = (295 - shifts) / (295 + shifts)  # 296 shingles each, 296 - s shared
    assert abs(np.mean(est - true)) < 4 * np.sqrt(np.mean(true * (1 - true) / CFG.num_perm) / 200)


def test_short_and_empty_texts() -> None:
    texts = ["", "  !!! ", "one two three", "One, two; THREE.", "one two four", "solo"]
    sig = minhash_signatures(texts, CFG)
    bands = minhash_bands(texts, CFG)
    assert bands.shape == (6, 14) and bands.dtype == np.uint64
    assert (sig[:2] == 0xFFFFFFFF).all() and (bands[:2] == 0).all()  # no words: no bands, never a candidate
    assert (bands[2:] != 0).all()
    np.testing.assert_array_equal(bands[2], bands[3])  # one shingle of all three words, equal after folding
    assert not (bands[2] == bands[4]).any()
    np.testing.assert_array_equal(sig[5], naive_signature("solo", CFG))


def test_five_megabyte_document_memory_is_linear() -> None:
    rng = np.random.default_rng(5)
    small = " ".join(words(rng, 20_000)) + " été"
    minhash_signatures([small], CFG)  # warm the cached tables
    text = " ".join(words(rng, 700_000)) + " été"  # ~5.2 MB, not ASCII
    assert len(text.encode()) > 5_000_000
    tracemalloc.start()
    sig = minhash_signatures([text], CFG)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # ~14 bytes per input byte (code points as uint32, ~12 uint64 arrays per word); a quadratic step would explode
    assert peak < 25 * len(text.encode())
    # the signature covers the whole text: its first half has Jaccard ~0.5 with it (4 sd: +-0.19)
    half = text[: len(text) // 2].rsplit(" ", 1)[0]
    est = (minhash_signatures([half], CFG)[0] == sig[0]).mean()
    assert 0.31 < est < 0.69


# --- LSH buckets and clusters ----------------------------------------------------------------------------------


def test_join_clusters_is_transitive_and_keeps_the_smallest_id() -> None:
    ids, cluster = join_clusters(np.array([5, 3, 9, 12, 5]), np.array([3, 1, 7, 9, 1]))
    assert ids.tolist() == [1, 3, 5, 7, 9, 12]
    assert cluster.tolist() == [1, 1, 1, 7, 7, 7]
    empty = join_clusters(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert [len(x) for x in empty] == [0, 0]


def test_bucket_edges_link_each_member_to_the_bucket_minimum() -> None:
    group = {
        "band": np.array([0, 0, 0, 1, 1, 2, 2, 0, 3, 3], dtype=np.int32),
        "hash": np.array([7, 7, 7, 7, 8, 9, 9, 8, 0, 0], dtype=np.uint64),
        "id": np.array([30, 10, 20, 40, 10, 30, 10, 50, 60, 70], dtype=np.int64),
    }
    # band 0 hash 7: {10, 20, 30}; band 1 hash 7 and 8, band 0 hash 8: singletons; band 2 hash 9: {10, 30} again;
    # hash 0 (no words): no bucket
    edges = dedup._bucket_edges(group)
    assert sorted(zip(edges["src"].tolist(), edges["dst"].tolist())) == [(20, 10), (30, 10)]


def test_band_rows_accept_list_and_tensor_columns() -> None:
    bands = np.array([[5, 0, 7], [0, 0, 0]], dtype=np.uint64)
    fn = dedup._BandRows("pos", "mh_bands", bands=3, parts=2)
    from_tensor = fn({"pos": np.array([4, 9]), "mh_bands": bands})
    from_list = fn({"pos": np.array([4, 9]), "mh_bands": np.array([bands[0], bands[1]], dtype=object)})
    for out in (from_tensor, from_list):
        assert out["id"].tolist() == [4, 4, 4, 9, 9, 9] and out["band"].tolist() == [0, 1, 2, 0, 1, 2]
        assert out["hash"].tolist() == [5, 0, 7, 0, 0, 0]
        assert out["part"].tolist() == [1, 0, 1, 1, 1, 1]  # by hash; zeros by id
    with pytest.raises(ValueError, match="3 bands"):
        dedup._BandRows("pos", "mh_bands", bands=4, parts=1)({"pos": np.array([4, 9]), "mh_bands": bands})


def roots_of(ds) -> tuple[list[int], list[int]]:
    """A Dataset of (id, root) rows -> (ids ascending, each one's root)."""
    rows = sorted((int(r["id"]), int(r["root"])) for r in ds.take_all())
    return [i for i, _ in rows], [r for _, r in rows]


def test_exact_dedup_on_ray_keeps_the_first_kept_copy(ray_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal values in several shuffle groups: every copy after the first (smallest pos) is marked; empty values
    never match; a copy a filter dropped (not a candidate) never knocks out a kept one."""
    import ray

    monkeypatch.setattr(dedup, "ROWS_PER_GROUP", 3)  # several groups
    values = ["a", "b", "a", "c", "b", "c", "", "", "a", "d"]
    pos = np.array([50, 10, 30, 40, 20, 60, 70, 80, 5, 90], dtype=np.int64)  # not in input order
    step = dedup.ExactDedup("v", "dup_v")
    cols = step.candidates(pa.table({"v": values}), "_s0_")
    ds = ray.data.from_arrow(pa.table({"pos": pos, **cols})).repartition(3)
    with dedup.task_shuffles():
        kept, marks = step.apply(ds, "_s0_", len(pos), keys=None)
        dup = sorted(int(p) for p in marks.to_pandas()["pos"])
        kept_pos = sorted(int(p) for p in kept.to_pandas()["pos"])
    # a: 5 first, so 30, 50 are copies; b: 10 then 20; c: 40 then 60; "" (70, 80) and d: no copies
    assert dup == [20, 30, 50, 60]
    assert set(marks.to_pandas()["reason"]) == {"dup_v"}
    assert kept_pos == [5, 10, 40, 70, 80, 90]


@pytest.mark.parametrize("shape", ["chains", "stars", "random"])
def test_connected_components_on_ray_equal_scipy(ray_session, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    """The large-star / small-star rounds give every id the smallest id of its component, as scipy does."""
    import ray

    monkeypatch.setattr(dedup, "LOCAL_CC_EDGES", 0)  # force the distributed path
    monkeypatch.setattr(dedup, "CC_ROWS_PER_GROUP", 100)  # several groups per round
    rng = np.random.default_rng({"chains": 1, "stars": 2, "random": 3}[shape])
    nodes = rng.permutation(200).astype(np.int64) * 7 + 3  # ids in no particular order
    if shape == "chains":  # long paths: the most rounds
        src, dst = nodes[1:60], nodes[:59]
        src, dst = np.r_[src, nodes[61:100]], np.r_[dst, nodes[60:99]]
    elif shape == "stars":
        centre = nodes[rng.integers(0, 10, 190)]
        src, dst = nodes[10:], centre
    else:
        src, dst = nodes[rng.integers(0, 200, 150)], nodes[rng.integers(0, 200, 150)]
        src, dst = src[src != dst], dst[src != dst]
    edges = ray.data.from_arrow(pa.table({"src": src, "dst": dst})).repartition(4)
    with dedup.task_shuffles():
        ids, roots = roots_of(dedup.connected_components(edges))
    want_ids, want_roots = join_clusters(src, dst)
    assert ids == want_ids.tolist() and roots == want_roots.tolist()


def edit(rng: np.random.Generator, w: list[str], n_edits: int) -> list[str]:
    """n_edits substitutions, insertions or deletions at positions at least 6 words apart."""
    out = list(w)
    for p in sorted(rng.choice(len(w) // 6, n_edits, replace=False) * 6, reverse=True):
        op = rng.integers(3)
        if op == 0:
            out[p] = "edited"
        elif op == 1:
            out.insert(p, "inserted")
        else:
            del out[p]
    return out


def test_near_duplicates_on_ray(ray_session, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(dedup, "_BAND_ROWS_PER_GROUP", 200)  # several groups, so buckets cross the shuffle
    rng = np.random.default_rng(2024)
    base = [words(rng, 400) for _ in range(40)]
    texts = [" ".join(w) for w in base]
    planted = {  # copy position -> its original
        40: 3,  # case, punctuation and spacing only
        41: 7,  # 2 edits in 400 words (0.5%)
        42: 7,  # 4 edits (1%) of the same original: a cluster of three
        43: 12,  # 4 edits (1%)
        44: 39,  # 4 edits (1%), the original comes later in the list than most
    }
    texts += [
        texts[3].upper().replace(" ", ",  "),
        " ".join(edit(rng, base[7], 2)),
        " ".join(edit(rng, base[7], 4)),
        " ".join(edit(rng, base[12], 4)),
        " ".join(edit(rng, base[39], 4)),
        " ".join(edit(rng, base[20], 60)),  # 45: 15% edits, Jaccard ~0.3: not a near duplicate
        "",  # 46, 47: no words, never paired
        "...",
    ]
    for copy, orig in planted.items():
        assert true_jaccard(texts[copy], texts[orig]) > 0.85  # catch probability > 1 - 1e-6 at 14 x 8
    assert true_jaccard(texts[45], texts[20]) < 0.35
    bands = minhash_bands(texts, CFG)

    # hand-made bands: a chain 105 ~ 103 (band 3), 103 ~ 101 (band 7) where 105 and 101 share nothing; the same
    # hash in two different bands (110, 111) is no match
    extra = np.random.default_rng(9).integers(1, 1 << 63, size=(5, 14), dtype=np.int64).astype(np.uint64)
    extra[1, 3] = extra[0, 3]
    extra[2, 7] = extra[1, 7]
    extra[4, 1] = extra[3, 0]
    extra_ids = [105, 103, 101, 110, 111]

    pos = np.r_[np.arange(len(texts)), extra_ids].astype(np.int64)
    all_bands = np.concatenate([bands, extra])
    table = pa.table({"pos": pos, "mh_bands": pa.FixedSizeListArray.from_arrays(pa.array(all_bands.ravel()), 14)})
    with dedup.task_shuffles():
        ids, cluster = roots_of(near_duplicates(ray.data.from_arrow(table).repartition(3), CFG))

    assert ids == [3, 7, 12, 39, 40, 41, 42, 43, 44, 101, 103, 105]
    assert cluster == [3, 7, 12, 39, 3, 7, 7, 12, 39, 101, 101, 101]


def test_batches_of_texts_shorter_than_the_ngram_match_the_reference() -> None:
    """Every mix of texts with 0 .. ngram + 1 words, alone or in batches of up to 4 (a batch whose words are all
    fewer than the n-gram crashed _shingle_hashes): signatures equal the one-Python-int-at-a-time definition, and
    exactly the texts without words get no bands."""
    import itertools

    for ngram in (1, 2, 3, 5):
        cfg = MinHashConfig(bands=4, rows=2, ngram=ngram, seed=3)
        texts = [" ".join(f"w{j}" for j in range(k)) for k in range(ngram + 2)] + ["second document", "a b c", "!!"]
        naive = {t: naive_signature(t, cfg) for t in texts}
        for size in (1, 2, 3, 4):
            for batch in itertools.islice(itertools.product(texts, repeat=size), 400):
                sig = minhash_signatures(list(batch), cfg)
                assert sig.tolist() == [naive[t] for t in batch], (ngram, batch)
                bands = minhash_bands(list(batch), cfg)
                assert bands.shape == (size, 4)
                assert [bool((b == 0).all()) for b in bands] == [not normalize_text(t) for t in batch], batch
    # the reported examples, with the default config
    assert minhash_bands(["second document"], CFG).shape == (1, 14)
    assert (minhash_bands(["a b c"], CFG) != 0).all()
    assert minhash_bands([], CFG).shape == (0, 14)
