"""The corpus-wide half of a run at scale: driver and worker memory and wall time against rows, new and old code.

Writes synthetic staging (what the per-row half leaves behind) and runs only the corpus-wide step on a local Ray:
  caption   LAION-like rows: a ~100-byte URL, a ~70-byte caption, a small extra json, a 100-byte "image", sizes,
            download status, two scores; 2% repeat an earlier URL, 2% an earlier image, 10% dropped by a filter
  text      documents of ~100 bytes with their exact-dup hash and 14 MinHash band hashes; 3% repeat an earlier
            text, 5% share 3 bands with an earlier document (planted near duplicates, clusters and chains)
  interleaved  documents of 3 paragraphs and 1-3 images (100-byte "images"), their per-position columns and the
            repetition values (image URLs, domain paragraphs); 2% repeat an earlier URL, 2% an earlier image set,
            20% carry one of 500 site logos (each in ~thousands of documents: removed everywhere), 10% one of 50
            boilerplate paragraphs of their domain; new code only (the old had no interleaved kind)
in units of --unit-rows rows (one staging folder each, parts of 25,000 rows), then, each in a fresh process:
  new       mm1data.split.finalize: dedup shuffles, per-unit decisions, shards, meta, index.json on Ray
  old       the same step as of commit 378be1b (read_staged into the driver, then finalize), on the same parts
            (hard links in the flat layout it reads), where it fits: sizes up to --old-max rows
Prints per run: driver peak RSS (ru_maxrss of the process that calls finalize, Ray's client included), the largest
Ray worker's peak RSS (VmHWM of processes titled ray::..., from /proc; it counts the shared object-store pages a
worker mapped) and its largest private memory (RssAnon sampled every 0.2 s, with the task the worker ran then),
wall time, and microseconds per row; then a projection to 2B rows.
Nothing here is asserted; the machine is shared, so wall times move with its load.

    .venv/bin/python bench/scale.py [--caption 1e6,3e6,1e7] [--text 1e6,3e6] [--interleaved 1e6] [--old-max 3e6]
                                    [--dir /tmp/mm1scale]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

OLD_COMMIT = "378be1b"  # the last commit before the runner (issue 8)
PART_ROWS = 25_000
WORDS = "a photo of the red blue green small large old new dog cat house tree car street view beach city".split()


def _keys(source: str, rows: np.ndarray) -> list[str]:
    from mm1data.schema import make_key

    return [make_key(source, int(r)) for r in rows]


def caption_part(source: str, rows: np.ndarray, rng: np.random.Generator, seen: dict) -> pa.Table:
    n = len(rows)
    ids = rows + seen["offset"]
    url = [
        f"https://img{i % 977}.example-cdn.com/photos/2024/{i % 12:02d}/{i:012d}/image-full-size-{i}.jpg" for i in ids
    ]
    image = [rng.bytes(100) for _ in range(n)]
    dup_url, dup_img = rng.random(n) < 0.02, rng.random(n) < 0.02
    if seen["urls"]:  # repeat an earlier row's URL / image bytes (planted exact duplicates)
        for j in np.flatnonzero(dup_url):
            url[j] = seen["urls"][int(rng.integers(len(seen["urls"])))]
        for j in np.flatnonzero(dup_img):
            image[j] = seen["images"][int(rng.integers(len(seen["images"])))]
    seen["urls"] = (seen["urls"] + url[:: max(1, n // 200)])[-2000:]
    seen["images"] = (seen["images"] + image[:: max(1, n // 200)])[-2000:]
    words = rng.integers(0, len(WORDS), size=(n, 12))
    caption = [" ".join(WORDS[w] for w in ws) for ws in words]
    dropped = rng.random(n) < 0.10
    reason = np.where(dropped, "image_min_side", "")
    sizes = rng.integers(200, 1024, size=(n, 2)).astype(np.int32)
    import hashlib

    return pa.table(
        {
            "key": _keys(source, rows),
            "src_file": [source] * n,
            "src_row": rows.astype(np.int64),
            "url": url,
            "caption": caption,
            "extra": [f'{{"id": {i}, "license": "cc-by-4.0", "nsfw": "UNLIKELY"}}' for i in ids],
            "drop_reason": reason.tolist(),
            "image": pa.array([b"" if d else im for d, im in zip(dropped, image)], pa.binary()),
            "image_ext": ["jpg"] * n,
            "width": np.minimum(sizes[:, 0], 512),
            "height": np.minimum(sizes[:, 1], 512),
            "orig_width": sizes[:, 0],
            "orig_height": sizes[:, 1],
            "sha256": ["" if d else hashlib.sha256(im).hexdigest() for d, im in zip(dropped, image)],
            "download_status": np.full(n, 200, np.int32),
            "download_error": [""] * n,
            "download_bytes": np.full(n, 30_000, np.int64),
            "download_time_s": rng.random(n).astype(np.float32),
            "download_attempts": np.ones(n, np.int32),
            "image_min_side": sizes.min(axis=1).astype(np.float32),
            "clip_score": rng.random(n).astype(np.float32),
            "image_bytes": np.where(dropped, 0, 100).astype(np.int64),
        }
    )


def text_part(source: str, rows: np.ndarray, rng: np.random.Generator, seen: dict) -> pa.Table:
    n = len(rows)
    ids = rows + seen["offset"]
    text = [f"document {i} " + " ".join(WORDS[w] for w in rng.integers(0, len(WORDS), 16)) for i in ids]
    thash = [f"{int(h):032x}" for h in rng.integers(1, 2**62, n)]
    bands = rng.integers(1, 2**63, size=(n, 14), dtype=np.int64).astype(np.uint64)
    if seen["hashes"]:
        for j in np.flatnonzero(rng.random(n) < 0.03):  # exact copies
            thash[j] = seen["hashes"][int(rng.integers(len(seen["hashes"])))]
        for j in np.flatnonzero(rng.random(n) < 0.05):  # near copies: 3 bands in common with an earlier text
            src = seen["bands"][int(rng.integers(len(seen["bands"])))]
            cols = rng.choice(14, 3, replace=False)
            bands[j, cols] = src[cols]
    seen["hashes"] = (seen["hashes"] + thash[:: max(1, n // 200)])[-2000:]
    seen["bands"] = (seen["bands"] + list(bands[:: max(1, n // 200)]))[-2000:]
    dropped = rng.random(n) < 0.10
    return pa.table(
        {
            "key": _keys(source, rows),
            "src_file": [source] * n,
            "src_row": rows.astype(np.int64),
            "text": text,
            "text_bytes": np.array([len(t) for t in text], np.int64),
            "url": [""] * n,
            "id": [f"doc-{i}" for i in ids],
            "extra": ["{}"] * n,
            "drop_reason": np.where(dropped, "gopher_words", "").tolist(),
            "gopher_words": rng.integers(10, 500, n).astype(np.float32),
            "text_hash": thash,
            "mh_bands": pa.FixedSizeListArray.from_arrays(pa.array(np.where(dropped[:, None], 0, bands).ravel()), 14),
        }
    )


def interleaved_part(source: str, rows: np.ndarray, rng: np.random.Generator, seen: dict) -> pa.Table:
    import hashlib

    from mm1data.dedup import text_fingerprints

    n = len(rows)
    ids = rows + seen["offset"]
    cols: dict[str, list] = {c: [] for c in ("url", "texts", "images", "seg_reason", "image", "image_ext",
                                             "image_sha256", "para_hash", "repeats", "image_set")}  # fmt: skip
    all_paras = []
    for i in ids:
        paras = [f"paragraph {j} of document {i}: " + " ".join(WORDS[w] for w in rng.integers(0, len(WORDS), 12))
                 for j in range(3)]  # fmt: skip
        if rng.random() < 0.1:
            paras[2] = f"Subscribe to the newsletter of site{i % 5000}.example.org number {int(rng.integers(50))}."
        all_paras += paras
    all_prints = text_fingerprints(all_paras).tolist()  # one call per part: the per-call cost would dominate
    for d, i in enumerate(ids):
        domain = f"site{i % 5000}.example.org"
        paras, prints = all_paras[3 * d : 3 * d + 3], all_prints[3 * d : 3 * d + 3]
        k = int(rng.integers(1, 4))
        imgs = [f"https://cdn.{domain}/{i}/{j}.jpg" for j in range(k)]
        if rng.random() < 0.2:
            imgs[0] = f"https://static{i % 500}.example.net/logo.png"
        data = [rng.bytes(100) for _ in imgs]
        if seen["sets"] and rng.random() < 0.02:  # the same images as an earlier document
            imgs, data = seen["sets"][int(rng.integers(len(seen["sets"])))]
        url = f"https://{domain}/post/{i}"
        if seen["urls"] and rng.random() < 0.02:
            url = seen["urls"][int(rng.integers(len(seen["urls"])))]
        shas = [hashlib.sha256(b).hexdigest() for b in data]
        cols["url"].append(url)
        cols["texts"].append([*paras, *[None] * len(imgs)])
        cols["images"].append([None] * 3 + imgs)
        cols["seg_reason"].append([""] * (3 + len(imgs)))
        cols["image"].append([None] * 3 + data)
        cols["image_ext"].append([""] * 3 + ["jpg"] * len(imgs))
        cols["image_sha256"].append([""] * 3 + shas)
        cols["para_hash"].append(prints + [""] * len(imgs))
        cols["repeats"].append([f"img:{u}" for u in dict.fromkeys(imgs)] + [f"para:{domain} {h}" for h in prints])
        cols["image_set"].append(hashlib.sha256("\n".join(sorted(set(shas))).encode()).hexdigest())
        if i % 50 == 0:
            seen["sets"] = (seen["sets"] + [(imgs, data)])[-2000:]
            seen["urls"] = (seen["urls"] + [url])[-2000:]
    strings = pa.list_(pa.string())
    return pa.table(
        {
            "key": _keys(source, rows),
            "src_file": [source] * n,
            "src_row": rows.astype(np.int64),
            "url": cols["url"],
            "texts": pa.array(cols["texts"], strings),
            "images": pa.array(cols["images"], strings),
            "alts": pa.array([[None] * len(x) for x in cols["images"]], strings),
            "seg_reason": pa.array(cols["seg_reason"], strings),
            "image": pa.array(cols["image"], pa.list_(pa.binary())),
            "image_ext": pa.array(cols["image_ext"], strings),
            "image_sha256": pa.array(cols["image_sha256"], strings),
            "image_relevance": pa.array([[float("nan")] * len(x) for x in cols["images"]], pa.list_(pa.float32())),
            "para_hash": pa.array(cols["para_hash"], strings),
            "repeats": pa.array(cols["repeats"], strings),
            "image_set": cols["image_set"],
            "extra": ["{}"] * n,
            "drop_reason": [""] * n,
            "doc_bytes": np.array([100 * (len(x) - 3) + 200 for x in cols["images"]], np.int64),
        }
    )


PARTS = {"caption": caption_part, "text": text_part, "interleaved": interleaved_part}


def generate(kind: str, rows: int, root: str, unit_rows: int) -> None:
    """Staging for `rows` rows in both layouts: new (one folder per unit) and old (flat hard links)."""
    from mm1data.read import Unit
    from mm1data.staging import unit_dir

    new, old = os.path.join(root, "new"), os.path.join(root, "old")
    rng, seen = (
        np.random.default_rng(0),
        {"urls": [], "images": [], "hashes": [], "bands": [], "sets": [], "offset": 0},
    )
    units = []
    os.makedirs(os.path.join(old, "_staging", "rows"), exist_ok=True)
    for u, start in enumerate(range(0, rows, unit_rows)):
        source = f"part-{u:05d}.parquet"
        unit = Unit(f"synthetic/{source}", source, "parquet", 0, min(unit_rows, rows - start), 1, (0,))
        units.append(unit)
        seen["offset"] = start
        for p, a in enumerate(range(0, unit.stop, PART_ROWS)):
            table = PARTS[kind](source, np.arange(a, min(a + PART_ROWS, unit.stop)), rng, seen)
            path = os.path.join(unit_dir(new, unit.id), f"part-{p:06d}.parquet")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path, compression="zstd")
            os.link(path, os.path.join(old, "_staging", "rows", f"part-{u:05d}-{p:06d}.parquet"))
    with open(os.path.join(root, "units.json"), "w") as f:
        json.dump([u.__dict__ for u in units], f)


def measure(version: str, kind: str, root: str, cpus: int) -> dict:
    """In this (fresh) process: start Ray, then time the corpus-wide step alone."""
    import ray
    from common import PeakRSS

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = os.path.join(root, version)
    with PeakRSS("ray::", new_only=False) as rss:  # Ray's workers started by ray.init run tasks too
        t0 = time.perf_counter()
        if version == "new":
            from mm1data.pipelines import caption, interleaved, text
            from mm1data.read import Unit
            from mm1data.split import finalize

            with open(os.path.join(root, "units.json")) as f:
                units = [Unit(**{**u, "row_groups": tuple(u["row_groups"])}) for u in json.load(f)]
            k = {"caption": caption.KIND, "text": text.KIND, "interleaved": interleaved.KIND}[kind]
            extra = {"caption": {"clip": caption.ClipConfig(enabled=False)}, "interleaved": {"filters": ()}}
            cfg = k.config(output=out, **extra.get(kind, {}))
            index = finalize(k, cfg, units, "bench", [])
        else:  # the code as of OLD_COMMIT, on PYTHONPATH
            import functools

            from mm1data.split import ShardConfig, finalize
            from mm1data.staging import read_staged

            if kind == "caption":
                from mm1data.pipelines import caption as m

                args = (
                    read_staged(out),
                    m.build_sample,
                    ShardConfig(),
                    functools.partial(m.dedup, cfg=m.DedupConfig()),
                )
                index = finalize(out, "caption", "caption", *args, m.Config(output=out), [])
            else:
                from mm1data.pipelines import text as m

                table = read_staged(out, columns_exclude=("text",))
                args = (table, m.build_sample, ShardConfig(), functools.partial(m.dedup, cfg=m.TextDedupConfig()))
                index = finalize(out, "text", "text", *args, m.Config(output=out), [], size_col="text_bytes")
        wall = time.perf_counter() - t0
    ray.shutdown()
    return {
        "wall_s": wall,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mib": rss.result().get("peak_rss_mib", 0.0),
        "worker_private_mib": rss.result().get("peak_private_mib", 0.0),
        "worker_private_in": rss.result().get("peak_private_in", ""),
        "kept": index["funnel"]["kept"],
        "rows_in": index["funnel"]["rows_in"],
        "dropped": index["funnel"]["dropped"],
        "shards": len(index["shards"]),
    }


def run_measure(version: str, kind: str, root: str, cpus: int) -> dict:
    env = dict(os.environ)
    if version == "old":
        old_src = os.path.join(os.path.dirname(root), "mm1data-old")
        if not os.path.isdir(old_src):
            os.makedirs(old_src)
            archive = subprocess.run(["git", "archive", OLD_COMMIT, "mm1data"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old_src], input=archive.stdout, check=True)
        env["PYTHONPATH"] = old_src
    script = os.path.abspath(__file__)
    cmd = [sys.executable, script, "--measure", version, "--kind", kind, "--dir", root, "--cpus", str(cpus)]
    # run from the data folder: Ray puts the driver's working directory first on its workers' path, and from the
    # checkout that would import the new mm1data into the old run's workers
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--caption", default="1e6,3e6,1e7")
    p.add_argument("--text", default="1e6,3e6")
    p.add_argument("--interleaved", default="1e6")
    p.add_argument("--old-max", type=float, default=3e6, help="run the old code up to this many rows")
    p.add_argument("--unit-rows", type=int, default=100_000)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--dir", default="/tmp/mm1scale")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.kind, args.dir, args.cpus)))
        return

    from mm1data import dedup, split

    print(
        f"{args.cpus} CPUs; units of {args.unit_rows:,} rows; worker bounds: dedup groups {dedup.ROWS_PER_GROUP:,} "
        f"rows, LSH groups {dedup._BAND_ROWS_PER_GROUP:,} band rows, CC groups {dedup.CC_ROWS_PER_GROUP:,} edges, "
        f"meta parts {split.META_ROWS:,} rows"
    )
    print(
        f"{'kind':<8}{'rows':>12}{'code':>5}{'wall s':>9}{'us/row':>8}{'driver MiB':>12}{'worker MiB':>12}"
        f"{'private':>9}  kept; where the largest private worker memory was"
    )
    figures = []
    for kind, sizes in (("caption", args.caption), ("text", args.text), ("interleaved", args.interleaved)):
        for n in (int(float(x)) for x in sizes.split(",") if x):
            root = os.path.join(args.dir, f"{kind}-{n}")
            shutil.rmtree(root, ignore_errors=True)
            t0 = time.perf_counter()
            generate(kind, n, root, args.unit_rows)
            print(f"  (staging for {n:,} {kind} rows written in {time.perf_counter() - t0:.0f}s)", flush=True)
            for version in ("new", "old") if n <= args.old_max and kind != "interleaved" else ("new",):
                r = run_measure(version, kind, root, args.cpus)
                figures.append((kind, n, version, r))
                if "error" in r:
                    print(f"{kind:<8}{n:>12,}{version:>5}  failed: {r['error'][-300:]}")
                    continue
                us = r["wall_s"] / n * 1e6
                print(
                    f"{kind:<8}{n:>12,}{version:>5}{r['wall_s']:>9.1f}{us:>8.1f}{r['driver_peak_mib']:>12.0f}"
                    f"{r['worker_peak_mib']:>12.0f}{r['worker_private_mib']:>9.0f}  {r['kept']:,} {r['dropped']}; "
                    f"{r['worker_private_in']}",
                    flush=True,
                )
                for sub in ("new", "old"):
                    shutil.rmtree(os.path.join(root, sub, "_staging", "decided"), ignore_errors=True)
                for f in os.listdir(os.path.join(root, version)):  # the tar shards: the bulk of the disk
                    if f.endswith((".tar", ".idx")):
                        os.unlink(os.path.join(root, version, f))
            shutil.rmtree(root, ignore_errors=True)

    print("\nprojection to 2B rows (new code; linear in rows from the largest run of each kind):")
    for kind in ("caption", "text", "interleaved"):
        runs = [(n, r) for k, n, v, r in figures if k == kind and v == "new" and "error" not in r]
        if not runs:
            continue
        n, r = max(runs, key=lambda x: x[0])
        units = 2e9 / args.unit_rows
        core_h = r["wall_s"] * args.cpus / n * 2e9 / 3600
        held = (units * 400 + 2e9 / 10_000 * 600) / 2**20  # per-unit summaries and per-shard records
        print(
            f"  {kind}: {core_h:,.0f} core-hours ({core_h / args.cpus:,.0f} h on these {args.cpus} CPUs); the driver "
            f"holds O(units + shards) = {units:,.0f} units and {2e9 / 10_000:,.0f} shards (~{held:,.0f} MiB) beside "
            f"the {r['driver_peak_mib']:,.0f} MiB measured at {n:,} rows"
        )
    for kind in ("caption", "text"):
        pairs = {(n, v): r for k, n, v, r in figures if k == kind and "error" not in r}
        for n in sorted({n for n, _ in pairs}):
            if (n, "old") in pairs and (n, "new") in pairs:
                ratio = pairs[(n, "old")]["wall_s"] / pairs[(n, "new")]["wall_s"]
                new, old = pairs[(n, "new")]["driver_peak_mib"], pairs[(n, "old")]["driver_peak_mib"]
                print(
                    f"  {kind} {n:,}: new / old speed {ratio:.2f}x; driver peak {new:.0f} MiB new, {old:.0f} MiB old"
                )


if __name__ == "__main__":
    main()
