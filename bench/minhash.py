"""MinHash signatures per second and LSH dedup quality: mm1data against datatrove and datasketch on the same texts.

Draws --n English-like documents (200-2000 words, Zipfian word frequencies over a 50,000-word vocabulary of
letter strings, capitalised sentences, punctuation, curly quotes and dashes, paragraphs; np.random.default_rng(0)),
then times, in this one process and thread (docs/s per core), each implementation over all of them after a short
untimed warm-up, every one with 112 = 14 x 8 permutations, word 5-grams and seed 1:
  mm1data      minhash_signatures(batch, MinHashConfig()) on batches of --batch documents
  datatrove    MinhashDedupSignature(...).get_signature(step.get_shingles(text)) per document, which is what the
               step's run() does before its disk writer (skipped): simplify_text, the English word tokenizer
               (spaCy blank "en", the step's default), xxhash64 per shingle string, (a x + b) mod (2^61 - 1)
  datatrove-split   the same step with str.split as its word tokenizer: its hashing and signature alone
  datasketch   MinHash(num_perm=112).copy().update_batch(shingles) per document, the shingles being the UTF-8
               word 5-grams of mm1data's normalize_text (its time included); default hashfunc (sha1_hash32)
  datasketch-xxh32  the same with xxhash.xxh32_intdigest as hashfunc
xxhash 4 refuses str, which datatrove passes (its `processing` extra pins xxhash<4): with xxhash >= 4 datatrove's
hash function is wrapped to encode first, and the cost of that wrapper is printed.

Then dedup quality: --quality-n originals, a fifth of them copied with word edits (each word substituted, deleted
or followed by an inserted word, one third each) at each rate of 1, 5, 10, 20, 30%, plus as many unrelated
documents; mm1data's minhash_bands and near_duplicates (Ray, local, 2 CPUs). Prints per rate the mean true 5-gram
Jaccard, recall (copies in their original's cluster), the recall 1 - (1 - J^8)^14 predicts, and precision (pairs
within predicted clusters that are planted pairs). Last, memory: bytes of signatures and band hashes per 1M
documents, and tracemalloc peaks of the LSH group step (all band rows in one group, at two corpus sizes, per 1M
documents by linear extrapolation) and of the driver's union-find.

    .venv/bin/python bench/minhash.py [--n 10000] [--batch 1000] [--quality-n 3000] [--skip-peers]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import xxhash

from mm1data import dedup
from mm1data.dedup import MinHashConfig, minhash_bands, minhash_signatures, normalize_text

WARMUP = 20
RATES = (0.01, 0.05, 0.10, 0.20, 0.30)
CFG = MinHashConfig()  # 14 x 8, 5-grams, seed 1


# --- documents ---------------------------------------------------------------------------------------------------

LETTERS = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
LETTER_P = np.array(
    [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8]
    + [0.15, 0.15, 0.1, 0.07]
)


class Corpus:
    """English-like word streams: a seeded vocabulary, Zipf(1.1) word ranks, sentences and paragraphs."""

    def __init__(self, seed: int = 0, vocab: int = 50_000) -> None:
        self.rng = np.random.default_rng(seed)
        lengths = np.clip(self.rng.poisson(4.5, vocab), 1, 14)
        p = LETTER_P / LETTER_P.sum()
        self.vocab = np.array(["".join(self.rng.choice(LETTERS, n, p=p)) for n in lengths], dtype=object)
        ranks = 1.0 / np.arange(1, vocab + 1) ** 1.1
        self.p = ranks / ranks.sum()

    def words(self, n: int) -> list[str]:
        return list(self.vocab[self.rng.choice(len(self.vocab), n, p=self.p)])

    def render(self, words: list[str]) -> str:
        """Words -> text: capitalised sentences of 5-24 words, punctuation, quotes, paragraphs."""
        out, i = [], 0
        while i < len(words):
            n = int(self.rng.integers(5, 25))
            s = words[i : i + n]
            i += n
            s[0] = s[0].capitalize()
            if self.rng.random() < 0.1:
                s[-1] = f"“{s[-1]}”"
            end = self.rng.choice([". ", ". ", ". ", ", ", "? ", "! ", " — ", ".\n\n"])
            out.append(" ".join(s) + end)
        return "".join(out).strip()

    def document(self) -> tuple[list[str], str]:
        w = self.words(int(self.rng.integers(200, 2001)))
        return w, self.render(w)

    def edit(self, words: list[str], rate: float) -> list[str]:
        out = []
        for w, u, op in zip(words, self.rng.random(len(words)), self.rng.integers(0, 3, len(words))):
            if u >= rate or op == 0:  # kept, or substituted below
                out.append(w if u >= rate else self.words(1)[0])
            elif op == 2:  # insertion after the word
                out += [w, self.words(1)[0]]
            # op == 1: deletion
        return out


# --- the implementations -----------------------------------------------------------------------------------------


def timed(name: str, fn: Callable[[list[str]], object], texts: list[str]) -> float:
    fn(texts[:WARMUP])
    t0 = time.perf_counter()
    fn(texts)
    rate = len(texts) / (time.perf_counter() - t0)
    print(f"  {name:<18} {rate:9.1f} docs/s")
    return rate


def mm1data_fn(batch: int) -> Callable[[list[str]], np.ndarray]:
    def run(texts: list[str]) -> np.ndarray:
        return np.concatenate([minhash_signatures(texts[i : i + batch], CFG) for i in range(0, len(texts), batch)])

    return run


def datatrove_fn(split_words: bool) -> Callable[[list[str]], list]:
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    kwargs = {"language": SplitTokenizer()} if split_words else {}
    step = MinhashDedupSignature(tempfile.mkdtemp(prefix="dt-minhash-"), config=cfg, **kwargs)
    if int(xxhash.VERSION.split(".")[0]) >= 4:
        step._hash_func = lambda s: xxhash.xxh64_intdigest(s.encode())  # xxhash 3 encodes str itself, in C

    def run(texts: list[str]) -> list:
        out = []
        for text in texts:  # as MinhashDedupSignature.run, less the per-bucket struct.pack + write
            shingles = step.get_shingles(text)
            if shingles.size != 0:
                out.append(step.get_signature(shingles))
        return out

    return run


def datasketch_fn(hashfunc: Callable | None) -> Callable[[list[str]], list]:
    from datasketch import MinHash

    base = MinHash(num_perm=CFG.num_perm, seed=1, **({"hashfunc": hashfunc} if hashfunc else {}))

    def run(texts: list[str]) -> list:
        out = []
        for text in texts:
            w = normalize_text(text).split()
            m = base.copy()
            m.update_batch([" ".join(w[i : i + 5]).encode() for i in range(max(1, len(w) - 4))])
            out.append(m)
        return out

    return run


def wrapper_cost(texts: list[str]) -> float:
    """Seconds per document that the encode wrapper adds to datatrove's xxhash64 calls (upper bound)."""
    shingles = [" ".join(g) for t in texts for g in zip(*(normalize_text(t).split()[k:] for k in range(5)))]
    encoded = [s.encode() for s in shingles]
    wrapper = lambda s: xxhash.xxh64_intdigest(s.encode())  # noqa: E731  (as installed on the step)

    def best(fn: Callable, items: list) -> float:  # fastest of 3: the machine may be shared
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for x in items:
                fn(x)
            times.append(time.perf_counter() - t0)
        return min(times)

    return max(0.0, best(wrapper, shingles) - best(xxhash.xxh64_intdigest, encoded)) / len(texts)


def speed(texts: list[str], batch: int, peers: bool) -> None:
    words = sum(len(t.split()) for t in texts)
    print(
        f"\n== signatures: {len(texts)} documents, {words / len(texts):.0f} words and "
        f"{sum(map(len, texts)) / len(texts):.0f} characters on average, 112 permutations, 1 process x 1 thread"
    )
    rates = {"mm1data": timed("mm1data", mm1data_fn(batch), texts)}
    if not peers:
        return
    rates["datatrove"] = timed("datatrove", datatrove_fn(split_words=False), texts)
    rates["datatrove-split"] = timed("datatrove-split", datatrove_fn(split_words=True), texts)
    rates["datasketch"] = timed("datasketch", datasketch_fn(None), texts)
    rates["datasketch-xxh32"] = timed("datasketch-xxh32", datasketch_fn(xxhash.xxh32_intdigest), texts)
    if int(xxhash.VERSION.split(".")[0]) >= 4:
        cost = wrapper_cost(texts[:500])
        dt_ms = 1e3 / rates["datatrove"]
        print(
            f"  (xxhash {xxhash.VERSION}: the encode wrapper costs datatrove {cost * 1e3:.3f} ms of its "
            f"{dt_ms:.2f} ms per document; without it datatrove would run at most "
            f"{1 / (1 / rates['datatrove'] - cost):.1f} docs/s)"
        )
    for peer in ("datatrove", "datatrove-split", "datasketch", "datasketch-xxh32"):
        goal = {"datatrove": 10.0, "datasketch": 1.5}.get(peer)
        note = (
            f"   (goal >= {goal:g}x: {'met' if rates['mm1data'] / rates[peer] >= goal else 'MISSED'})" if goal else ""
        )
        print(f"  mm1data / {peer:<17} {rates['mm1data'] / rates[peer]:7.1f}x{note}")


# --- quality -------------------------------------------------------------------------------------------------------


def jaccard(a: list[str], b: list[str]) -> float:
    sa = {tuple(a[i : i + 5]) for i in range(len(a) - 4)}
    sb = {tuple(b[i : i + 5]) for i in range(len(b) - 4)}
    return len(sa & sb) / len(sa | sb)


def quality(corpus: Corpus, n: int) -> np.ndarray:
    import pyarrow as pa
    import ray

    per_rate = n // len(RATES)
    docs, origin, rate_of = [], [], []  # origin: index of the original a copy was made from, else -1
    originals = [corpus.document() for _ in range(n)]
    for _, t in originals:
        docs.append(t)
        origin.append(-1)
        rate_of.append(np.nan)
    true_j = {}
    for k, rate in enumerate(RATES):
        for i in range(k * per_rate, (k + 1) * per_rate):
            edited = corpus.edit(originals[i][0], rate)
            true_j[len(docs)] = jaccard(originals[i][0], edited)  # vocabulary words are their own normal form
            docs.append(corpus.render(edited))
            origin.append(i)
            rate_of.append(rate)
    docs += [corpus.document()[1] for _ in range(n)]  # unrelated
    origin += [-1] * n
    rate_of += [np.nan] * n
    origin_a, rate_a = np.array(origin), np.array(rate_of)
    print(f"\n== dedup quality: {n} originals, {per_rate} copies at each edit rate, {n} unrelated; 14 x 8 bands")

    t0 = time.perf_counter()
    bands = minhash_bands(docs, CFG)
    t_bands = time.perf_counter() - t0
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = pa.table(
        {
            "pos": np.arange(len(docs), dtype=np.int64),
            "mh_bands": pa.FixedSizeListArray.from_arrays(pa.array(bands.ravel()), CFG.bands),
        }
    )
    t0 = time.perf_counter()
    with dedup.task_shuffles():
        roots = dedup.near_duplicates(ray.data.from_arrow(table), CFG).to_pandas().sort_values("id")
    ids, cluster = roots["id"].to_numpy(), roots["root"].to_numpy()
    t_lsh = time.perf_counter() - t0
    ray.shutdown()
    print(f"  bands {t_bands:.1f}s, near_duplicates on Ray (2 CPUs, incl. start-up of the shuffle) {t_lsh:.1f}s")

    label = np.full(len(docs), -1, dtype=np.int64)
    label[ids] = cluster
    pairs = []  # predicted pairs: all pairs within each cluster
    for c in np.unique(cluster):
        members = ids[cluster == c]
        pairs += [(int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :]]
    truth = {(int(origin_a[c]), c) for c in np.flatnonzero(origin_a >= 0)}
    print(f"  {'edit rate':>9} {'mean J':>7} {'recall':>7} {'expected':>8} {'precision':>9}")
    for rate in RATES:
        copies = np.flatnonzero(rate_a == rate)
        js = np.array([true_j[c] for c in copies])
        found = np.mean([label[c] >= 0 and label[c] == label[origin_a[c]] for c in copies])
        expected = np.mean(1 - (1 - js**CFG.rows) ** CFG.bands)
        group = set(copies.tolist()) | set(origin_a[copies].tolist())
        mine = [p for p in pairs if p[0] in group or p[1] in group]
        precision = f"{np.mean([p in truth for p in mine]):9.3f}" if mine else f"{'-':>9}"  # no pair predicted
        print(f"  {rate:>9.0%} {js.mean():7.3f} {found:7.3f} {expected:8.3f} {precision}")
    wrong = [p for p in pairs if p not in truth]
    print(
        f"  all predicted pairs: {len(pairs)}, planted: {len(truth)}, not planted: {len(wrong)}"
        f" (precision {1 - len(wrong) / max(len(pairs), 1):.4f})"
    )
    return bands


# --- memory --------------------------------------------------------------------------------------------------------


def traced_peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def memory(texts: list[str], bands: np.ndarray, batch: int) -> None:
    mib = 1 << 20
    per_m = 1_000_000
    print("\n== memory per 1M documents (14 x 8)")
    print(f"  signatures uint32 x 112: {per_m * CFG.num_perm * 4 / mib:8.0f} MiB   (only per batch: not kept)")
    print(f"  band hashes uint64 x 14: {per_m * CFG.bands * 8 / mib:8.0f} MiB   (the column staged per row)")
    peak = traced_peak(lambda: minhash_bands(texts[:batch], CFG))
    print(f"  minhash_bands working set for one batch of {batch}: {peak / mib:.0f} MiB (constant, not per document)")
    for frac in (0.5, 1.0):
        n = int(len(bands) * frac)
        rows = dedup._BandRows("pos", "mh_bands", CFG.bands, 1)
        batch_in = {"pos": np.arange(n, dtype=np.int64), "mh_bands": bands[:n]}
        group = rows(batch_in)
        row_bytes = sum(v.nbytes for v in group.values())
        peak = traced_peak(lambda: dedup._bucket_edges(rows(batch_in)))  # noqa: B023
        print(
            f"  LSH rows (part, band, hash, id) from {n} documents: {row_bytes / n * per_m / mib:.0f} MiB per 1M"
            f" in the shuffle; group step peak {peak / mib:.1f} MiB -> {peak / n * per_m / mib:.0f} MiB per 1M"
            " if one group held them all"
        )
    print(
        f"  (a group holds at most {dedup._BAND_ROWS_PER_GROUP:,} rows, "
        f"{dedup._BAND_ROWS_PER_GROUP / CFG.bands:,.0f} documents' worth, so a worker's share stays bounded)"
    )
    rng = np.random.default_rng(1)
    n_edges = 1_000_000
    src = rng.integers(0, 10 * n_edges, n_edges)
    dst = np.minimum(src, rng.integers(0, 10 * n_edges, n_edges))
    peak = traced_peak(lambda: dedup.join_clusters(src, dst))
    print(f"  driver union-find over 1M edges: {peak / mib:.0f} MiB peak (edges arrive as 16 bytes each)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--quality-n", type=int, default=3000)
    p.add_argument("--skip-peers", action="store_true", help="time mm1data only")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    corpus = Corpus(seed=0)
    t0 = time.perf_counter()
    texts = [corpus.document()[1] for _ in range(args.n)]
    print(f"{args.n} documents drawn in {time.perf_counter() - t0:.1f}s")
    speed(texts, args.batch, peers=not args.skip_peers)
    bands = quality(Corpus(seed=1), args.quality_n)
    memory(texts, bands, args.batch)


if __name__ == "__main__":
    main()
