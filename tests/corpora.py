"""Small corpora of all three kinds (tar shards + .idx + index.json) and manifests over them, for the tests.

Sizes are exact functions of the sample number so tests can assert totals by hand:
- caption i: text f"caption {i:08d}" (16 tokens), one image;
- interleaved i: text, image, text, (image, text)... with 1 + i % 3 images and 1 + (1 + i % 3) text segments of
  50 bytes each (so 100, 150 or 200 tokens; exactly 2 images and 150 tokens per document on average over
  any multiple of 3 documents);
- text i: one document of `text_tokens` bytes (default 200).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import yaml
from PIL import Image

from mm1data import storage
from mm1data.schema import count_tokens, make_key
from mm1data.shards import TarShardWriter, build_index, shard_name, write_index

CAPTION_TOKENS = 16
SEGMENT_TOKENS = 50
TEXT_TOKENS = 200


def tiny_jpeg(seed: int, size: int = 8) -> bytes:
    """A small, decodable JPEG whose pixels depend on `seed`."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _text(i: int, n: int) -> str:
    head = f"doc {i:08d} "
    return (head + "x" * n)[:n]


def caption_sample(i: int, image: bytes | None = None) -> tuple[dict[str, bytes], int, int]:
    """(members, images, tokens) of caption sample i."""
    key = make_key("caption", i)
    text = f"caption {i:08d}"
    members = {
        f"{key}.jpg": image if image is not None else tiny_jpeg(i),
        f"{key}.txt": text.encode(),
        f"{key}.json": json.dumps({"i": i, "kind": "caption"}).encode(),
    }
    return members, 1, count_tokens(text)


def interleaved_sample(i: int, image: bytes | None = None) -> tuple[dict[str, bytes], int, int]:
    key = make_key("interleaved", i)
    n_images = 1 + i % 3
    segments: list[dict[str, Any]] = [{"text": _text(i, SEGMENT_TOKENS)}]
    members = {}
    for j in range(n_images):
        segments += [{"image": j}, {"text": _text(i * 10 + j, SEGMENT_TOKENS)}]
        members[f"{key}.{j}.jpg"] = image if image is not None else tiny_jpeg(1_000_000 + i * 10 + j)
    members[f"{key}.json"] = json.dumps({"i": i, "kind": "interleaved", "segments": segments}).encode()
    tokens = sum(count_tokens(s["text"]) for s in segments if "text" in s)
    return members, n_images, tokens


def text_sample(i: int, tokens: int = TEXT_TOKENS) -> tuple[dict[str, bytes], int, int]:
    key = make_key("text", i)
    text = _text(i, tokens)
    members = {f"{key}.txt": text.encode(), f"{key}.json": json.dumps({"i": i, "kind": "text"}).encode()}
    return members, 0, count_tokens(text)


SAMPLES = {"caption": caption_sample, "interleaved": interleaved_sample, "text": text_sample}


def write_corpus(root: str, kind: str, n: int, per_shard: int = 10, **sample_kwargs: Any) -> dict[str, Any]:
    """Write n samples of `kind` into shards of `per_shard` under `root` (local or s3://), then index.json."""
    infos, tokens = [], 0
    for s, start in enumerate(range(0, n, per_shard)):
        w = TarShardWriter(storage.join(root, shard_name(kind, s)))
        for i in range(start, min(start + per_shard, n)):
            members, n_images, n_tokens = SAMPLES[kind](i, **sample_kwargs)
            w.write(members, num_images=n_images)
            tokens += n_tokens
        infos.append(w.close())
    index = build_index(kind, kind, infos, tokens)
    write_index(root, index)
    return index


def write_manifest(path: str, sources: list[dict[str, Any]], unit: str = "samples", seed: int = 0) -> str:
    """A manifest YAML at `path` (sources: [{name, index, weight, ...}])."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    doc = {"name": "test", "seed": seed, "unit": unit, "sources": sources}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def write_mix(root: str, sizes: dict[str, int], per_shard: int = 10) -> dict[str, dict[str, Any]]:
    """One corpus per kind under root/KIND with sizes[kind] samples; returns {kind: index}."""
    return {kind: write_corpus(storage.join(root, kind), kind, n, per_shard) for kind, n in sizes.items()}
