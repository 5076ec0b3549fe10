"""Blocklist build and text decontamination throughput, single machine.

  .venv/bin/python bench/decontam.py [--images 400] [--evals 200000] [--docs-mb 20] [--captions 100000]

build     images/s of `mm1data blocklist build` on a folder of 640x480 JPEGs (sha256 + pHash), 1 and 2 workers
index     seconds to build the eval side from a blocklist of synthetic questions and captions, and its size
documents MB/s per core of the 13-gram document match (what each candidates task adds per unit of text)
captions  captions/s per core of the MinHash caption match
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mm1data.blocklist import META, SCHEMA, BuildOptions, build
from mm1data.decontam import CaptionMatch, DocumentMatch, build_index, match_texts


def words(rng: np.random.Generator, vocab: list[str], n: int) -> str:
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--evals", type=int, default=200_000)
    ap.add_argument("--docs-mb", type=float, default=20)
    ap.add_argument("--captions", type=int, default=100_000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(20_000)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "imgs")
        os.makedirs(folder)
        for i in range(a.images):
            arr = rng.integers(0, 255, (480 // 8, 640 // 8, 3), dtype=np.uint8)
            img = Image.fromarray(arr).resize((640, 480), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(buf.getvalue())
        for w in (1, 2):
            t = time.perf_counter()
            build(folder, os.path.join(tmp, "bl.parquet"), BuildOptions(workers=w))
            print(f"build     {a.images / (time.perf_counter() - t):8.0f} images/s  ({w} worker(s), 640x480 JPEG)")

        texts = [words(rng, vocab, int(rng.integers(6, 25))) for _ in range(a.evals)]
        n = len(texts)
        bl = os.path.join(tmp, "texts.parquet")
        table = pa.table(
            {"kind": ["text"] * n, "source": [f"q#{i}" for i in range(n)], "sha256": pa.nulls(n, pa.string()),
             "phash": pa.nulls(n, pa.int64()), "text": texts},
            schema=SCHEMA.with_metadata(META),
        )  # fmt: skip
        pq.write_table(table, bl)
        for match in (DocumentMatch(), CaptionMatch()):
            t = time.perf_counter()
            _, index = build_index([bl], match)
            mb = (index["keys"].nbytes + index["ids"].nbytes) / 1e6
            print(f"index     {time.perf_counter() - t:8.1f} s for {n:,} eval texts ({type(match).__name__}: "
                  f"{len(index['keys']):,} keys, {mb:.0f} MB + texts)")  # fmt: skip
            if isinstance(match, DocumentMatch):
                docs = []
                while sum(map(len, docs)) < a.docs_mb * 1e6:
                    docs.append(words(rng, vocab, 800))
                docs[::50] = [d + " " + texts[i] for i, d in enumerate(docs[::50])]  # plant a question in 2%
                t = time.perf_counter()
                hit = match_texts(docs, index, match)
                dt = time.perf_counter() - t
                print(f"documents {sum(map(len, docs)) / 1e6 / dt:8.1f} MB/s per core ({(hit >= 0).sum():,} of "
                      f"{len(docs):,} documents matched, {len(docs[::50]):,} planted)")  # fmt: skip
            else:
                caps = [words(rng, vocab, int(rng.integers(5, 15))) for _ in range(a.captions)]
                caps[::100] = texts[: len(caps[::100])]
                t = time.perf_counter()
                hit = match_texts(caps, index, match)
                dt = time.perf_counter() - t
                print(f"captions  {len(caps) / dt:8.0f} captions/s per core ({(hit >= 0).sum():,} matched, "
                      f"{len(caps[::100]):,} planted)")  # fmt: skip


if __name__ == "__main__":
    main()
