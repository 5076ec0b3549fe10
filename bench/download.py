"""Download throughput: mm1data's ImageDownloader stage against img2dataset, on the same URLs and cores.

Serves --n distinct PIL-drawn JPEGs (640-1024 px a side, seeded) from a local HTTP server on 127.0.0.1, then
times, with --processes worker processes and 32 threads each, the same fetch + decode + resize:
  img2dataset   download(..., distributor="multiprocessing", output_format="webdataset"): one input shard per
                process; it also writes tar/parquet shards to disk, which mm1data's runs below do not
  mm1data mp    ImageDownloader called on batches of 256 in --processes forkserver processes, one URL slice each
  mm1data ray   the same stage via ray.data map_batches on an actor pool (ray.init before the clock starts)
  mm1data run   the whole `mm1data run` (no filters, no CLIP): download, staging, dedup, tar shards, meta and
                index.json, i.e. the same output work img2dataset does
Wall times include starting each run's workers. Each run follows an untimed 50-URL warm-up (its time, mostly
that start-up, is printed too). Prints samples/s, samples/s per core, the mm1data /
img2dataset ratio and peak RSS per worker. The HTTP server runs in a process of its own on the same cores.

Peak RSS: Linux keeps a process's ru_maxrss across exec, so a "spawn" child starts with its parent's current
RSS as its high-water mark. img2dataset (whose pool is spawned) therefore runs inside a fresh runner process
and its workers' RUSAGE_CHILDREN is read there (still an upper bound: at least the runner's RSS, which has
imported img2dataset as its workers do) and covers img2dataset's logger process too; mm1data's workers are
forked from a small forkserver. Ray's actors are neither children nor forked from here, so for the ray and run
rows a thread samples, every 0.2 s, VmHWM (the kernel's peak RSS) in /proc/<pid>/status of every process whose
cmdline names ImageDownloader (Ray retitles an actor "ray::MapWorker(MapBatches(ImageDownloader))"), leaving
out those alive when the run starts: the warm-up's actors, which Ray takes a while to end.

    .venv/bin/python bench/download.py [--n 2000] [--processes 2] [--no-ray] [--out-json figures.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # img2dataset imports albumentations, which would phone PyPI
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds 127.0.0.1, not the host's IP

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import PeakRSS  # noqa: E402  (bench/ is on sys.path when a bench script runs)

from mm1data.demo import ImageServer, Route, draw_image  # noqa: E402
from mm1data.download import DownloadConfig, ImageDownloader  # noqa: E402

BATCH, THREADS, WARMUP = 256, 32, 50


def serve(n: int, conn: Connection, seed: int = 0) -> None:
    """Server process: draws n JPEGs, serves them on 127.0.0.1, sends back the rows, serves until told to stop."""
    rng, rows, t0 = np.random.default_rng(seed), [], time.perf_counter()
    with ImageServer() as server:
        for i in range(n):
            w, h = (int(x) for x in rng.integers(640, 1025, size=2))
            body, caption = draw_image(rng, size=(w, h))
            server.routes[f"/img/{i:05d}.jpg"] = Route(body)
            rows.append({"url": server.url(f"/img/{i:05d}.jpg"), "caption": caption})
        distinct = len({r.body for r in server.routes.values()})
        conn.send((rows, distinct, time.perf_counter() - t0))
        conn.recv()


def summarize(ok: int, w: int, h: int, errors: Counter) -> dict:
    return {"ok": int(ok), "mean_w": w / max(ok, 1), "mean_h": h / max(ok, 1), "errors": dict(errors)}


def run_img2dataset(rows: list[dict], args: argparse.Namespace, tmp: str, tag: str) -> dict:
    from img2dataset import download  # imports torch (via albumentations): ~680 MiB in every process that does

    inp, out = os.path.join(tmp, f"{tag}.parquet"), os.path.join(tmp, f"i2d_{tag}")
    pq.write_table(pa.Table.from_pylist(rows), inp)
    t0 = time.perf_counter()
    download(
        url_list=inp,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=out,
        output_format="webdataset",
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=True,  # mm1data's default; moot here, every image is larger than the target
        processes_count=args.processes,
        thread_count=THREADS,
        distributor="multiprocessing",
        number_sample_per_shard=math.ceil(len(rows) / args.processes),  # one shard per process
        timeout=10,
        retries=0,
        enable_wandb=False,
    )
    wall = time.perf_counter() - t0
    t = pa.concat_tables(
        [
            pq.read_table(p, columns=["status", "error_message", "width", "height"])
            for p in sorted(glob.glob(os.path.join(out, "*.parquet")))
        ]
    ).to_pydict()
    good = [s == "success" for s in t["status"]]
    stats_ok = sum(json.load(open(p))["successes"] for p in glob.glob(os.path.join(out, "*_stats.json")))
    assert stats_ok == sum(good), (stats_ok, sum(good))
    res = summarize(
        sum(good),
        sum(w for w, g in zip(t["width"], good) if g),
        sum(h for h, g in zip(t["height"], good) if g),
        Counter(e for e, g in zip(t["error_message"], good) if not g),
    )
    # max ru_maxrss over this runner's reaped children: img2dataset's pool workers and its logger process
    return {**res, "wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def stage_cfg(args: argparse.Namespace) -> DownloadConfig:
    return DownloadConfig(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        threads=THREADS,
        allow_private_hosts=True,
        retries=0,
        timeout_s=10,
        encode_format="jpg",
        encode_quality=95,
    )


def mp_worker(urls: list[str], cfg: DownloadConfig) -> dict:
    stage, ok, w, h, errors = ImageDownloader(cfg), 0, 0, 0, Counter()
    for i in range(0, len(urls), BATCH):
        part = urls[i : i + BATCH]
        out = stage({"url": np.array(part, dtype=object), "drop_reason": np.array([""] * len(part), dtype=object)})
        good = out["download_error"] == ""
        ok, w, h = ok + good.sum(), w + out["width"][good].sum(), h + out["height"][good].sum()
        errors.update(out["download_error"][~good])
    return {**summarize(ok, int(w), int(h), errors), "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def run_mm1data_mp(urls: list[str], args: argparse.Namespace) -> dict:
    cfg, n = stage_cfg(args), args.processes
    parts = [urls[len(urls) * k // n : len(urls) * (k + 1) // n] for k in range(n)]
    t0 = time.perf_counter()
    with mp.get_context("forkserver").Pool(n) as pool:
        res = pool.starmap(mp_worker, [(p, cfg) for p in parts])
    wall = time.perf_counter() - t0
    ok = sum(r["ok"] for r in res)
    out = summarize(
        ok,
        sum(r["mean_w"] * r["ok"] for r in res),
        sum(r["mean_h"] * r["ok"] for r in res),
        sum((Counter(r["errors"]) for r in res), Counter()),
    )
    return {**out, "wall_s": wall, "peak_rss_mib": max(r["maxrss_kib"] for r in res) / 1024}


def run_mm1data_ray(urls: list[str], args: argparse.Namespace) -> dict:
    import ray

    t0 = time.perf_counter()
    ds = ray.data.from_items([{"url": u, "drop_reason": ""} for u in urls]).map_batches(
        ImageDownloader,
        fn_constructor_kwargs={"cfg": stage_cfg(args)},
        batch_size=BATCH,
        compute=ray.data.ActorPoolStrategy(size=args.processes),
        num_cpus=1,
        zero_copy_batch=False,
    )
    ok, w, h, errors = 0, 0, 0, Counter()
    for b in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
        good = b["download_error"] == ""
        ok, w, h = ok + good.sum(), w + b["width"][good].sum(), h + b["height"][good].sum()
        errors.update(b["download_error"][~good])
    return {**summarize(ok, int(w), int(h), errors), "wall_s": time.perf_counter() - t0}


def run_mm1data_pipeline(rows: list[dict], args: argparse.Namespace, tmp: str, tag: str) -> dict:
    """The whole `mm1data run` (read, download, stage, dedup, shards, meta, index.json), no filters or CLIP:
    the same work img2dataset does, output included."""
    from mm1data.pipelines import run_pipeline

    inp, out = os.path.join(tmp, f"run_{tag}.parquet"), os.path.join(tmp, f"mm1_{tag}")
    pq.write_table(pa.Table.from_pylist(rows), inp)
    sets = [
        "filters=[]",
        "clip.enabled=false",
        "download.allow_private_hosts=true",
        "download.retries=0",
        f"download.threads={THREADS}",
        f"download.image_size={args.image_size}",
        f"download.resize_mode={args.resize_mode}",
        f"download.workers={args.processes}",
        f"shards.samples_per_shard={math.ceil(len(rows) / args.processes)}",
    ]
    t0 = time.perf_counter()
    index = run_pipeline("pipelines/caption.yaml", inp, out, sets)
    wall = time.perf_counter() - t0
    meta = pq.read_table(os.path.join(out, "meta"), columns=["download_error", "width", "height"]).to_pydict()
    good = [e == "" for e in meta["download_error"]]
    assert index["totals"]["samples"] == sum(good)
    res = summarize(
        sum(good),
        sum(w for w, g in zip(meta["width"], good) if g),
        sum(h for h, g in zip(meta["height"], good) if g),
        Counter(e for e, g in zip(meta["download_error"], good) if not g),
    )
    return {**res, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="keep_ratio")
    p.add_argument("--no-ray", dest="ray", action="store_false")
    p.add_argument("--out-json")
    args = p.parse_args()
    n = args.processes
    results: dict[str, dict] = {}
    warm: dict[str, dict] = {}  # the 50-URL warm-up runs
    conn, child_conn = mp.Pipe()
    server = mp.get_context("spawn").Process(target=serve, args=(args.n, child_conn), daemon=True)
    server.start()
    rows, distinct, gen_s = conn.recv()
    print(
        f"{args.n} JPEGs ({distinct} distinct, 640-1024 px a side) made in {gen_s:.1f}s, served from "
        f"{rows[0]['url'].rsplit('/', 2)[0]}/; {n} processes x {THREADS} threads, {os.cpu_count()} CPUs, "
        f"image_size={args.image_size} resize_mode={args.resize_mode}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        urls = [r["url"] for r in rows]
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as runner:  # fresh
            warm["img2dataset"] = runner.submit(run_img2dataset, rows[:WARMUP], args, tmp, "warmup").result()
            results["img2dataset"] = runner.submit(run_img2dataset, rows, args, tmp, "full").result()
        warm["mm1data mp"] = run_mm1data_mp(urls[:WARMUP], args)
        results["mm1data mp"] = run_mm1data_mp(urls, args)
        if args.ray:
            import ray

            ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            warm["mm1data ray"] = run_mm1data_ray(urls[:WARMUP], args)
            with PeakRSS() as rss:
                results["mm1data ray"] = run_mm1data_ray(urls, args)
            results["mm1data ray"].update(rss.result())
            warm["mm1data run"] = run_mm1data_pipeline(rows[:WARMUP], args, tmp, "warmup")
            with PeakRSS() as rss:
                results["mm1data run"] = run_mm1data_pipeline(rows, args, tmp, "full")
            results["mm1data run"].update(rss.result())
            ray.shutdown()
    conn.send("stop")
    server.join()

    base = args.n / results["img2dataset"]["wall_s"]
    print(
        f"\n{'mode':<13}{'ok':>6}{'wall s':>8}{'samples/s':>11}{'/core':>8}{'ratio':>7}{'mean w x h':>13}"
        f"{'peak RSS/worker':>17}"
    )
    for name, r in results.items():
        r["samples_per_s"] = args.n / r["wall_s"]
        r["samples_per_s_per_core"] = r["samples_per_s"] / n
        r["ratio_vs_img2dataset"] = r["samples_per_s"] / base
        rss = f"{r['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in r else "n/a"
        print(
            f"{name:<13}{r['ok']:>6}{r['wall_s']:>8.2f}{r['samples_per_s']:>11.1f}{r['samples_per_s_per_core']:>8.1f}"
            f"{r['ratio_vs_img2dataset']:>7.2f}{r['mean_w']:>7.1f}x{r['mean_h']:<5.1f}{rss:>17}"
        )
        if r["errors"]:
            print(f"  {name} errors: {r['errors']}")
    oks = {r["ok"] for r in results.values()}
    counts = ", ".join(f"{k}={r['ok']}" for k, r in results.items())
    print(f"\nsuccesses {'MATCH' if len(oks) == 1 else 'DIFFER'}: {counts}")
    print(f"untimed {WARMUP}-URL warm-ups: " + ", ".join(f"{k} {r['wall_s']:.2f}s" for k, r in warm.items()))
    print(
        "ratio = samples/s over img2dataset's; /core = samples/s / --processes. peak RSS/worker: img2dataset = "
        "max ru_maxrss over its child processes, pool workers and its logger (RUSAGE_CHILDREN in the process "
        "that ran it); mm1data mp = max ru_maxrss (RUSAGE_SELF) inside each worker; mm1data ray, run = max VmHWM "
        "(peak RSS) over the processes whose cmdline names ImageDownloader and that started during the timed run, "
        "sampled from /proc every 0.2 s ("
        + ", ".join(f"{k}: {r['rss_pids']}" for k, r in results.items() if "rss_pids" in r)
        + " seen)."
    )
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"args": vars(args), "results": results, "warmup": warm}, f, indent=2)
    sys.exit(0 if len(oks) == 1 else 1)


if __name__ == "__main__":
    main()
