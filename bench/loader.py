"""Streaming loader speed: mm1data's MixtureDataset against webdataset.WebDataset on the same shards and decode.

Writes, under --dir (default: a temp dir), caption shards (--captions samples, JPEGs of about 20-50 KB drawn
from a pool of 200 distinct images), interleaved shards (--docs documents of 1-3 of those images and text) and
text shards (--texts documents of 1-4 KB), --per-shard samples a shard, with mm1data's TarShardWriter. Then times,
in this process, after an untimed warm-up pass that fills the page cache, each comparison --reps times with the
two loaders alternating (medians printed: the machine may be shared):

  captions   one shuffled pass over the caption shards, images decoded to RGB PIL, txt and json decoded:
             MixtureDataset(caption-only manifest) vs WebDataset(shardshuffle=100).shuffle(1000).decode("pil");
             mm1data with io_threads=1 too (one reading thread; the consumer reads a window itself rather than
             wait); also both with 2 DataLoader workers (webdataset splits shards by worker, mm1data positions;
             webdataset's PIL images are pickled back to the main process, MixtureLoader's come through
             shared-memory buffers that the workers reuse)
  mix        --mix-samples samples of MM1's 45/45/10 interleaved/caption/text mix, decoded as above:
             MixtureDataset (mixing by a seeded generator, resumable) vs wds.RandomMix of three repeating
             WebDatasets with the same probabilities (not resumable)
  first      time from constructing the loader to its first sample (median of 5)
  resume     MixtureDataset: load_state_dict at position 0 and at 1,000,000 of a 10,000,000-sample epoch, then
             the first sample (median of 5); webdataset has no seek: the time to replay 1,000,000 samples is
             extrapolated from its undecoded read rate
  packing    mm1data.packing.SequencePacker(SequenceConfig()) over --pack-samples items of the mix: the share of
             non-padding positions (packing.efficiency)

Prints samples/s and MB/s (bytes of the samples' tar members) for each, and mm1data / webdataset ratios.

    .venv/bin/python bench/loader.py [--captions 3000] [--docs 1000] [--texts 3000] [--per-shard 200]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch.utils.data
import webdataset as wds
import yaml
from PIL import Image

from mm1data.loader import MixtureDataset, MixtureLoader
from mm1data.manifest import load_manifest
from mm1data.packing import SequenceConfig, SequencePacker, efficiency
from mm1data.schema import make_key
from mm1data.shards import TarShardWriter, build_index, read_offsets, shard_name, write_index

MIX = {"interleaved": 0.45, "caption": 0.45, "text": 0.10}  # MM1 (REFERENCE.md)


def image_pool(n: int, rng: np.random.Generator) -> list[bytes]:
    """n distinct JPEGs of 384x288 to 448x336 px, smooth colour waves plus noise: about 20-50 KB each."""
    out = []
    for _ in range(n):
        w, h = (384, 288) if rng.random() < 0.5 else (448, 336)
        y, x = np.mgrid[0:h, 0:w] / 64.0
        waves = [np.sin(x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(0.5, 2)) for _ in "rgb"]
        arr = np.stack(waves, -1) * 80 + 128 + rng.normal(0, rng.uniform(8, 14), (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def words(rng: np.random.Generator, n_bytes: int) -> str:
    vocab = ["the", "data", "model", "image", "of", "a", "large", "train", "mixture", "token", "and", "web"]
    text = " ".join(vocab[i] for i in rng.integers(0, len(vocab), n_bytes // 4 + 1))
    return text[:n_bytes]


def members(kind: str, i: int, rng: np.random.Generator, pool: list[bytes]) -> tuple[dict[str, bytes], int, int]:
    import json

    key = make_key(kind, i)
    if kind == "caption":
        text = words(rng, int(rng.integers(30, 120)))
        return {f"{key}.jpg": pool[i % len(pool)], f"{key}.txt": text.encode(), f"{key}.json": b"{}"}, 1, len(text)
    if kind == "text":
        text = words(rng, int(rng.integers(1000, 4000)))
        return {f"{key}.txt": text.encode(), f"{key}.json": b"{}"}, 0, len(text)
    n = int(rng.integers(1, 4))
    segments, out = [{"text": words(rng, 300)}], {}
    for j in range(n):
        segments += [{"image": j}, {"text": words(rng, int(rng.integers(100, 600)))}]
        out[f"{key}.{j}.jpg"] = pool[(7 * i + j) % len(pool)]
    out[f"{key}.json"] = json.dumps({"segments": segments}).encode()
    return out, n, sum(len(s["text"]) for s in segments if "text" in s)


def write_corpora(root: str, sizes: dict[str, int], per_shard: int) -> dict[str, list[str]]:
    rng, pool = np.random.default_rng(0), image_pool(200, np.random.default_rng(1))
    urls = {}
    for kind, n in sizes.items():
        folder, infos, tokens = os.path.join(root, kind), [], 0
        for s, start in enumerate(range(0, n, per_shard)):
            w = TarShardWriter(os.path.join(folder, shard_name(kind, s)))
            for i in range(start, min(start + per_shard, n)):
                m, n_images, n_tokens = members(kind, i, rng, pool)
                w.write(m, num_images=n_images)
                tokens += n_tokens
            infos.append(w.close())
        write_index(folder, build_index(kind, kind, infos, tokens))
        urls[kind] = [os.path.join(folder, i.path) for i in infos]
    return urls


def sample_bytes(urls: dict[str, list[str]]) -> dict[str, int]:
    """key -> bytes of the sample's tar members (headers included), from the .idx sidecars."""
    out = {}
    for shards in urls.values():
        for tar in shards:
            offs = read_offsets(tar[: -len(".tar")] + ".idx")
            with open(tar, "rb") as f:
                data = f.read()
            for a, b in itertools.pairwise(offs):
                out[data[a : a + 100].split(b"\0", 1)[0].decode().split(".", 1)[0]] = b - a
    return out


def manifest(root: str, weights: dict[str, float]) -> Any:
    path = os.path.join(root, "m-" + "-".join(weights) + ".yaml")
    sources = [{"name": k, "index": f"{k}/index.json", "weight": w} for k, w in weights.items()]
    with open(path, "w") as f:
        yaml.safe_dump({"name": "bench", "seed": 0, "unit": "samples", "sources": sources}, f)
    return load_manifest(path)


def timed(make: Callable[[], Iterable[Any]], n: int, key: Callable[[Any], str], sizes: dict[str, int]):
    """(samples/s, MB/s) over the first n samples of a fresh iterable from make()."""
    t0, count, nbytes = time.perf_counter(), 0, 0
    for item in itertools.islice(iter(make()), n):
        count += 1
        nbytes += sizes[key(item)]
    dt = time.perf_counter() - t0
    return count / dt, nbytes / dt / 1e6, count


def first_sample(make: Callable[[], Iterable[Any]], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        it = iter(make())
        next(it)
        times.append(time.perf_counter() - t0)
        del it
    return statistics.median(times)


def wds_pipeline(urls: list[str], decode: bool = True, repeat: bool = False, **kw: Any) -> Any:
    ds = wds.WebDataset(urls, shardshuffle=100, seed=0, repeat=repeat, empty_check=False, **kw).shuffle(1000)
    return ds.decode("pil") if decode else ds


def wds_key(item: dict[str, Any]) -> str:
    return item["__key__"]


def mm_key(item: dict[str, Any]) -> str:
    return item["key"]


def compare(name: str, ours: Callable, peer: Callable, n: int, sizes: dict[str, int], reps: int) -> None:
    """Alternate the two loaders `reps` times (the machine is shared: noise hits both) and print the medians."""
    runs = [(timed(ours, n, mm_key, sizes), timed(peer, n, wds_key, sizes)) for _ in range(reps)]
    row(name, *(tuple(statistics.median(r[i][k] for r in runs) for k in range(2)) for i in range(2)))


def row(name: str, ours: tuple, peer: tuple) -> None:
    print(
        f"{name:<32} mm1data {ours[0]:>6.0f}/s {ours[1]:>6.1f} MB/s  "
        f" webdataset {peer[0]:>6.0f}/s {peer[1]:>6.1f} MB/s   ratio {ours[0] / peer[0]:.2f}x"
    )


def flat(batches: Iterable[Any]) -> Iterable[Any]:
    for b in batches:
        yield from b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", help="where to write the shards (default: a temp dir)")
    p.add_argument("--captions", type=int, default=3000)
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--texts", type=int, default=3000)
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--mix-samples", type=int, default=4000)
    p.add_argument("--pack-samples", type=int, default=6000)
    p.add_argument("--reps", type=int, default=3, help="alternating runs per comparison (medians are printed)")
    args = p.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="mm1data-bench-loader-")
    t0 = time.perf_counter()
    urls = write_corpora(
        root, {"caption": args.captions, "interleaved": args.docs, "text": args.texts}, args.per_shard
    )
    sizes = sample_bytes(urls)
    mb = sum(os.path.getsize(u) for us in urls.values() for u in us) / 1e6
    mean_jpeg = np.mean([len(m) for m in image_pool(20, np.random.default_rng(1))]) / 1e3
    print(f"shards: {sum(map(len, urls.values()))} under {root}, {mb:.0f} MB, JPEGs ~{mean_jpeg:.0f} KB, "
          f"written in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, webdataset {wds.__version__}, {os.cpu_count()} CPUs, load average {load}")

    captions = manifest(root, {"caption": 1.0})
    mix = manifest(root, MIX)
    n = args.captions

    def ours_captions() -> MixtureDataset:
        return MixtureDataset(captions, shuffle_buffer=1000)

    def peer_captions() -> Any:
        return wds_pipeline(urls["caption"])

    timed(ours_captions, n, mm_key, sizes)  # warm-up: page cache, imports
    timed(peer_captions, n, wds_key, sizes)
    print(f"\n-- one pass over {n} captions, images decoded to RGB (medians of {args.reps} alternating runs)")
    compare("captions", ours_captions, peer_captions, n, sizes, args.reps)
    one_thread = lambda: MixtureDataset(captions, shuffle_buffer=1000, io_threads=1)  # noqa: E731
    compare("captions, mm1data io_threads=1", one_thread, peer_captions, n, sizes, args.reps)

    def ours_workers() -> Any:
        return flat(MixtureLoader(MixtureDataset(captions, shuffle_buffer=1000, batch_size=16), 16, num_workers=2))

    def peer_workers() -> Any:
        return flat(torch.utils.data.DataLoader(peer_captions().batched(16, collation_fn=list), batch_size=None,
                                                num_workers=2))  # fmt: skip

    compare("captions, 2 DataLoader workers", ours_workers, peer_workers, n, sizes, args.reps)

    print(f"\n-- {args.mix_samples} samples of the 45/45/10 interleaved/caption/text mix, images decoded (medians)")
    probs = list(MIX.values())

    def ours_mix() -> MixtureDataset:
        return MixtureDataset(mix, shuffle_buffer=1000, samples_per_epoch=10_000_000)

    def peer_mix() -> Any:
        return wds.RandomMix([wds_pipeline(urls[k], repeat=True) for k in MIX], probs)

    timed(ours_mix, 500, mm_key, sizes)
    compare("mix (mm1data resumable)", ours_mix, peer_mix, args.mix_samples, sizes, args.reps)

    print("\n-- time to first sample (median of 5)")
    f_ours, f_peer = first_sample(ours_captions), first_sample(peer_captions)
    print(f"captions: mm1data {f_ours * 1e3:.1f} ms, webdataset {f_peer * 1e3:.1f} ms (ratio {f_peer / f_ours:.1f}x)")
    f_mix, f_peer_mix = first_sample(ours_mix), first_sample(peer_mix)
    print(f"mix:      mm1data {f_mix * 1e3:.1f} ms, webdataset {f_peer_mix * 1e3:.1f} ms")

    print("\n-- resume (median of 5): load_state_dict then the first sample")
    base = MixtureDataset(mix, shuffle_buffer=1000, samples_per_epoch=10_000_000)
    state = base.state_dict()

    def resumed(position: int) -> Callable[[], MixtureDataset]:
        def make() -> MixtureDataset:
            ds = MixtureDataset(mix, shuffle_buffer=1000, samples_per_epoch=10_000_000)
            ds.load_state_dict({**state, "position": position})
            return ds

        return make

    r0, r1 = first_sample(resumed(0)), first_sample(resumed(1_000_000))
    print(f"mm1data at sample 0: {r0 * 1e3:.1f} ms, at sample 1,000,000: {r1 * 1e3:.1f} ms (ratio {r1 / r0:.2f})")
    raw = timed(lambda: wds_pipeline(urls["caption"], decode=False, repeat=True), n, wds_key, sizes)
    print(f"webdataset has no seek: replaying 1,000,000 samples at its undecoded rate of {raw[0]:.0f}/s takes "
          f"~{1_000_000 / raw[0]:.0f} s (extrapolated), {1_000_000 / raw[0] / r1:.0f}x mm1data's resume")  # fmt: skip

    print(f"\n-- packing {args.pack_samples} samples of the mix into MM1 sequences ({SequenceConfig()})")
    items = itertools.islice(MixtureDataset(mix, samples_per_epoch=10_000_000, decode_images=False), args.pack_samples)
    t0 = time.perf_counter()
    seqs = list(SequencePacker(SequenceConfig()).pack(items))
    dt = time.perf_counter() - t0
    print(f"{len(seqs)} sequences, efficiency (non-padding share) {efficiency(seqs):.3f}, "
          f"{args.pack_samples / dt:.0f} samples/s including loading")  # fmt: skip
    print(f"load average at the end: {'/'.join(f'{x:.1f}' for x in os.getloadavg())} (a shared machine: compare runs)")


if __name__ == "__main__":
    main()
