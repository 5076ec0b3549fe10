"""Interleaved documents: HTML extraction, the extractor alone against mm1data's reader on the same pages.

Sections of main() (each a function; the end-to-end run of the interleaved kind is added as another):
  pages       --n generated pages (make_page: a header with a logo, a nav menu, a cookie banner, an article of
              headings, paragraphs and images -- relative, protocol-relative, srcset, lazy data-src behind a
              placeholder, <picture>, figure captions --, a sidebar of related links, share buttons, a footer and
              scripts; half of them built of <header>/<nav>/<main>/<aside>/<footer>, half of classed <div>s) into a
              gzipped WARC of HTML responses, with each page's true paragraphs and images.
  extractors  the candidate libraries on the same pages: mm1data.html.extract (selectolax/lexbor, the chosen one),
              resiliparse's main-content text (extract_plain_text(main_content=True): text only, no image
              positions), trafilatura (XML output with include_images=True, its <p>/<head>/<item>/<cell> texts and
              <graphic> images in order). Each: pages per CPU-second (best of --repeat, in this process, pages
              already read from the WARC) and precision / recall of paragraphs and of image URLs against the truth,
              and the share of pages whose whole sequence of positions is exactly the truth. With --real DIR, the
              same pages/s and the mean paragraphs and images per page on up to 300 real HTML files of DIR (no
              truth there; e.g. the Rust book that rustup installs: real sidebars, menus, scripts and code).
  reader      pages per CPU-second of extract() called alone on the WARC's pages (bodies and URLs read into memory
              before the clock) against read_interleaved_unit over the WARC (FastWARC, gunzip, charset, checks,
              batches), each in a fresh child process (best of --repeat), the overhead of the reader path (goal:
              under 20%) and each child's peak RSS (VmHWM; the reader never holds more than a batch of
              documents); then the same over the pages written to an uncompressed WARC (the reader's own cost,
              without gunzip's), and over the --real pages written to a gzipped WARC.

    .venv/bin/python bench/interleaved.py [--n 2000] [--repeat 3] [--real DIR] [--keep DIR]

Needs resiliparse for the extractors section (`pip install -c constraints.txt resiliparse`); trafilatura is in the
`html` and `test` extras.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a river garden morning library harbor painter village people market bridge station window winter summer "
    "quiet old new green tall bright small warm cold long short walked carried watched opened found built wrote "
    "read painted crossed followed remembered under over behind beside through across near along before after "
    "because while although city forest mountain valley island road train boat letter story picture song table "
    "kitchen school teacher student doctor farmer baker sailor children family friends neighbors visitors"
).split()
SITES = ("news.example.com", "blog.example.org", "shop.example.net", "travel.example.io")


# --- pages ---------------------------------------------------------------------------------------------------------


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 18))]
    return " ".join(words).capitalize() + "."


def make_page(i: int, rng: random.Random) -> tuple[str, bytes, list[str | None], list[str | None]]:
    """-> (url, html, texts, images): one page and its true positions (OBELICS form, image URLs resolved)."""
    site = SITES[i % len(SITES)]
    url = f"https://{site}/section{i % 7}/article-{i}.html"
    semantic = i % 2 == 0
    texts: list[str | None] = []
    images: list[str | None] = []
    body: list[str] = []

    def para(text: str, tag: str = "p") -> None:
        texts.append(text), images.append(None)
        body.append(f"<{tag}>{text}</{tag}>")

    def image(k: int) -> None:
        kind = rng.randrange(5)
        name = f"img{i}-{k}"
        if kind == 0:  # relative
            body.append(f'<img src="../media/{name}.jpg" alt="{sentence(rng)[:40]}">')
            images.append(f"https://{site}/media/{name}.jpg")
        elif kind == 1:  # protocol-relative, with a srcset: the largest candidate
            body.append(
                f'<img src="//cdn.{site}/{name}-640.jpg" srcset="//cdn.{site}/{name}-320.jpg 320w, '
                f'//cdn.{site}/{name}-1280.jpg 1280w, //cdn.{site}/{name}-640.jpg 640w" alt="">'
            )
            images.append(f"https://cdn.{site}/{name}-1280.jpg")
        elif kind == 2:  # lazy loading: a placeholder src, the real one in data-src
            body.append(
                f'<img class="lazy" src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="/i/{name}.png">'
            )
            images.append(f"https://{site}/i/{name}.png")
        elif kind == 3:  # a figure with its caption
            cap = sentence(rng)
            body.append(f'<figure><img src="https://img.{site}/{name}.webp"><figcaption>{cap}</figcaption></figure>')
            images.append(f"https://img.{site}/{name}.webp")
            texts.append(None)
            texts.append(cap), images.append(None)
            return
        else:  # <picture> with a 2x source
            body.append(
                f'<picture><source srcset="/p/{name}.avif 1x, /p/{name}@2x.avif 2x" type="image/avif">'
                f'<img src="/p/{name}.jpg" alt="{name}"></picture>'
            )
            images.append(f"https://{site}/p/{name}@2x.avif")
        texts.append(None)

    para(sentence(rng)[:-1], "h1")
    for k in range(rng.randint(3, 12)):
        if k and k % 4 == 0:
            para(sentence(rng)[:-1], "h2")
        para(" ".join(sentence(rng) for _ in range(rng.randint(2, 6))))
        if rng.random() < 0.4:
            image(k)
    article = "\n".join(body)
    menu = "".join(f'<li><a href="/{w}">{w.title()}</a></li>' for w in rng.sample(WORDS, 8))
    related = "".join(f'<li><a href="/r/{j}">{sentence(rng)}</a></li>' for j in range(5))
    cookie = (
        "We use cookies to give you the best experience on our website. "
        '<a href="/privacy">Privacy policy</a> <button>Accept all</button>'
    )
    share = '<a href="https://social.example/share">Share</a> <a href="mailto:?">Email</a>'
    tail = "<p>Copyright 2024 Example Media. All rights reserved.</p><a href='/terms'>Terms</a>"
    script = "<script>window.dataLayer = []; function t(){return '<p>not text</p>'}</script>"
    if semantic:
        page = (
            f"<header><img src='/logo.svg' alt='Logo'><span>{site}</span></header><nav><ul>{menu}</ul></nav>"
            f"<div id='cookie-notice'>{cookie}</div><main><article>{article}</article>"
            f"<div class='share-bar'>{share}</div></main><aside><h3>Related</h3><ul>{related}</ul></aside>"
            f"<footer>{tail}</footer>{script}"
        )
    else:  # no semantic tags: only class names and link density tell
        page = (
            f"<div class='site-header'><img src='/logo.png' alt='Logo'>{site}</div>"
            f"<div class='menu'><ul>{menu}</ul></div><div class='consent-banner'>{cookie}</div>"
            f"<div class='content'><div class='post'>{article}</div>"
            f"<div class='social'>{share}</div></div><div class='sidebar'><ul>{related}</ul></div>"
            f"<div class='site-footer'>{tail}</div>{script}"
        )
    html = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{texts[0]}</title>"
        f"<link rel='stylesheet' href='/s.css'><style>body{{margin:0}}</style>{script}</head>"
        f"<body>{page}</body></html>"
    )
    return url, html.encode(), texts, images


def write_warc(path: Path, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n pages as a WARC of HTML responses (gzipped per record if the name ends .gz, as crawls are); -> each page's
    truth (url, texts, images)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    truth = []
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=path.name.endswith(".gz"))
        for i in range(n):
            url, html, texts, images = make_page(i, rng)
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(html), http_headers=http))
            truth.append({"url": url, "texts": texts, "images": images})
    return truth


def write_real_warc(path: Path, folder: str, limit: int = 300) -> list[tuple[str, bytes]]:
    """Up to `limit` real HTML files of a folder as a gzipped WARC (URL: a made-up https one per file)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    pages = [
        (f"https://real.example/{p.relative_to(folder)}", p.read_bytes())
        for p in sorted(Path(folder).rglob("*.htm*"))[:limit]
    ]
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for url, html in pages:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(html), http_headers=http))
    return pages


def warc_pages(path: Path) -> list[tuple[str, bytes]]:
    """(url, body) of every response record, read before any clock starts."""
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        return [
            (r.rec_headers.get_header("WARC-Target-URI"), r.content_stream().read())
            for r in ArchiveIterator(f)
            if r.rec_type == "response"
        ]


# --- extractors ----------------------------------------------------------------------------------------------------


def by_selectolax(html: bytes, url: str) -> tuple[list, list]:
    from mm1data.html import extract

    texts, images, _ = extract(html, url)
    return texts, images


def by_resiliparse(html: bytes, url: str) -> tuple[list, list]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(bytes_to_str(html, detect_encoding(html)))
    text = extract_plain_text(tree, main_content=True, alt_texts=False, links=False, list_bullets=False)
    paras = [" ".join(p.split()) for p in text.split("\n") if p.strip()]
    return paras, [None] * len(paras)


def by_trafilatura(html: bytes, url: str) -> tuple[list, list]:
    import trafilatura
    from lxml import etree

    xml = trafilatura.extract(
        html, url=url, output_format="xml", include_images=True, include_comments=False, deduplicate=False
    )
    texts: list = []
    images: list = []
    if not xml:
        return texts, images
    for el in etree.fromstring(xml.encode()).iter():
        if el.tag == "graphic" and el.get("src"):
            texts.append(None), images.append(urljoin(url, el.get("src")))
        elif el.tag in ("p", "head", "item", "cell", "quote"):
            text = " ".join("".join(el.itertext()).split())
            if text:
                texts.append(text), images.append(None)
    return texts, images


EXTRACTORS = {"selectolax": by_selectolax, "resiliparse": by_resiliparse, "trafilatura": by_trafilatura}


def score(got: list[tuple[list, list]], truth: list[dict[str, Any]]) -> dict[str, float]:
    """Precision / recall of paragraphs and of image URLs (multisets per page, summed), and the share of pages
    whose positions are exactly the truth's."""
    from collections import Counter

    tp = {"text": 0, "image": 0}
    n_got = {"text": 0, "image": 0}
    n_true = {"text": 0, "image": 0}
    exact = 0
    for (texts, images), t in zip(got, truth):
        for kind, mine, theirs in (("text", texts, t["texts"]), ("image", images, t["images"])):
            a, b = Counter(x for x in mine if x is not None), Counter(x for x in theirs if x is not None)
            tp[kind] += sum((a & b).values())
            n_got[kind] += sum(a.values())
            n_true[kind] += sum(b.values())
        exact += texts == t["texts"] and images == t["images"]
    return {
        "text_p": tp["text"] / max(n_got["text"], 1),
        "text_r": tp["text"] / max(n_true["text"], 1),
        "image_p": tp["image"] / max(n_got["image"], 1),
        "image_r": tp["image"] / max(n_true["image"], 1),
        "exact": exact / max(len(truth), 1),
    }


def timed(fn: Any, pages: list[tuple[str, bytes]], repeat: int) -> tuple[float, list]:
    """-> (best pages per CPU-second, the outputs of the last run); a first call (imports) is off the clock."""
    fn(b"<p>warm</p>", "http://warm.example/")
    best, out = 0.0, []
    for _ in range(repeat):
        t = time.process_time()
        out = [fn(html, url) for url, html in pages]
        best = max(best, len(pages) / (time.process_time() - t))
    return best, out


def section_extractors(pages: list[tuple[str, bytes]], truth: list[dict], repeat: int, real: Path | None) -> None:
    real_pages = warc_pages(real) if real else []
    print(f"\n== extractors: {len(pages)} generated pages" + (f", {len(real_pages)} real pages" if real_pages else ""))
    header = f"{'extractor':<12} {'pages/s':>8} {'text P':>7} {'text R':>7} {'img P':>6} {'img R':>6} {'exact':>6}"
    print(header + (f" {'real p/s':>9} {'paras':>6} {'imgs':>5}" if real_pages else ""))
    for name, fn in EXTRACTORS.items():
        try:
            rate, out = timed(fn, pages, repeat)
        except ImportError as e:
            print(f"{name:<12} not installed ({e})")
            continue
        s = score(out, truth)
        line = (
            f"{name:<12} {rate:>8.0f} {s['text_p']:>7.3f} {s['text_r']:>7.3f} {s['image_p']:>6.3f} "
            f"{s['image_r']:>6.3f} {s['exact']:>6.3f}"
        )
        if real_pages:
            real_rate, real_out = timed(fn, real_pages, 1)
            paras = sum(sum(t is not None for t in texts) for texts, _ in real_out) / len(real_out)
            imgs = sum(sum(u is not None for u in images) for _, images in real_out) / len(real_out)
            line += f" {real_rate:>9.0f} {paras:>6.1f} {imgs:>5.1f}"
        print(line)


# --- reader --------------------------------------------------------------------------------------------------------


def side(kind: str, warc: str) -> dict[str, Any]:
    """In a fresh child: pages per CPU-second of `kind` (extract | reader) over the WARC's pages. CPU time of this
    one-threaded process, not wall time: other load on the machine disturbs it least."""
    from mm1data.html import extract

    extract(b"<p>warm</p><img src='a.png'>", "http://warm.example/")  # imports and first-call costs off the clock
    if kind == "extract":
        pages = warc_pages(Path(warc))
        t, wall = time.process_time(), time.perf_counter()
        n_images = sum(sum(u is not None for u in extract(html, url)[1]) for url, html in pages)
        cpu, wall = time.process_time() - t, time.perf_counter() - wall
        n = len(pages)
    else:
        import fastwarc.warc  # noqa: F401  (its import off the clock, as extract's above)

        from mm1data.read import InterleavedInputConfig, plan_units, read_interleaved_unit

        cfg = InterleavedInputConfig(path=warc)
        t, wall = time.process_time(), time.perf_counter()
        n = n_images = 0
        for unit in plan_units(cfg):
            for batch in read_interleaved_unit(unit, cfg):
                n += len(batch["key"])
                n_images += sum(sum(u is not None for u in images) for images in batch["images"])
        cpu, wall = time.process_time() - t, time.perf_counter() - wall
    with open("/proc/self/status") as f:  # VmHWM: peak RSS of this process (ru_maxrss keeps the parent's over exec)
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return {"pages": n, "images": n_images, "cpu_s": cpu, "wall_s": wall, "pages_s": n / cpu, "peak_rss_mib": rss}


def run_side(kind: str, warc: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--side", kind, "--warc", str(warc)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def section_reader(warc: Path, repeat: int) -> None:
    runs: dict[str, list[dict]] = {"extract": [], "reader": []}
    for _ in range(repeat):  # interleaved, so that load on the machine falls on both alike
        for kind in runs:
            runs[kind].append(run_side(kind, warc))
    best = {k: max(v, key=lambda r: r["pages_s"]) for k, v in runs.items()}
    print(f"\n== reader: {best['reader']['pages']} pages, {warc.name}, {warc.stat().st_size / 2**20:.1f} MB")
    print(f"{'path':<34} {'pages/CPU-s':>11} {'pages/s wall':>12} {'images':>7} {'peak RSS MiB':>13}")
    for kind, label in (
        ("extract", "extract() alone (bodies in memory)"),
        ("reader", "read_interleaved_unit over WARC"),
    ):
        r = best[kind]
        wall = r["pages"] / r["wall_s"]
        print(f"{label:<34} {r['pages_s']:>11.0f} {wall:>12.0f} {r['images']:>7} {r['peak_rss_mib']:>13.0f}")
    overhead = best["extract"]["pages_s"] / best["reader"]["pages_s"] - 1
    print(f"reader overhead over the extractor alone: {overhead:+.1%} (goal: under 20%); all runs, pages/CPU-s:")
    for kind, rs in runs.items():
        print(f"  {kind:<8} " + " ".join(f"{r['pages_s']:.0f}" for r in rs))


# --- pipeline: the interleaved kind end to end -------------------------------------------------------------------


def section_pipeline(work: Path, n: int, cpus: int, sets: list[str]) -> None:
    """--docs documents in OBELICS form (parquet), 1 to 4 images each from a local server (distinct 640x480 JPEGs),
    through `mm1data run pipelines/interleaved.yaml` on a local Ray of `cpus`
    CPUs: download and resize every image, the OBELICS preset, CLIP relevance (mm1data-tiny-clip, random weights),
    dedup, shards. Documents/s and images/s per CPU over the whole run (Ray start included), driver and Ray worker
    peak RSS. In a child process, so that Ray starts fresh with `cpus` CPUs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mm1data.demo import make_document  # English-like prose that OBELICS' text rules keep

    rng = random.Random(1)
    gen = np.random.default_rng(1)
    rows, n_images = [], 0
    for d in range(n):
        texts, images = [], []
        for j in range(rng.randint(1, 4)):
            texts += [make_document(gen, rng.randint(3, 5)), None]
            images += [None, f"/img/{d}/{j}.jpg"]
            n_images += 1
        texts.append(make_document(gen, 3))
        images.append(None)
        rows.append({"url": f"https://{rng.choice(SITES)}/doc/{d}", "texts": texts, "images": images})
    inp = work / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    out = work / "pipeline-out"
    cmd = [sys.executable, __file__, "--side", "pipeline", "--warc", str(inp), "--cpus", str(cpus), "--out", str(out)]
    cmd += [f"--set={s}" for s in sets]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split("RESULT ")[-1])
    wall = res["wall_s"]
    print(f"\npipeline: {n} documents, {n_images} images, Ray with {cpus} CPUs, whole run {wall:.1f} s")
    print(f"  documents/s per CPU {n / wall / cpus:8.1f}   images/s per CPU {n_images / wall / cpus:8.1f}")
    print(f"  kept {res['kept']} documents, {res['images']} images; funnel {json.dumps(res['funnel'])}")
    print(f"  peak RSS: driver {res['driver_mib']:.0f} MiB; Ray workers {res['workers']}")


def pipeline_side(inp: str, cpus: int, out: str, sets: list[str]) -> dict[str, Any]:
    import resource
    import shutil

    import ray

    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from common import PeakRSS

    from mm1data.demo import ImageServer, Route, draw_image
    from mm1data.pipelines import run_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    shutil.rmtree(out, ignore_errors=True)
    gen = np.random.default_rng(0)
    n_images = sum(1 for doc in pq.read_table(inp, columns=["images"])["images"].to_pylist() for u in doc if u)
    pool = [draw_image(gen, (640, 480))[0] for _ in range(n_images)]  # distinct images: no image-set duplicates
    with ImageServer() as srv:
        t = pq.read_table(inp)
        images = [[srv.url(u) if u else None for u in doc] for doc in t["images"].to_pylist()]
        k = 0
        for doc in images:
            for u in doc:
                if u:
                    srv.routes[u.split(str(srv.port), 1)[1]] = Route(pool[k % len(pool)])
                    k += 1
        t = t.set_column(t.column_names.index("images"), "images", pa.array(images, pa.list_(pa.string())))
        served = str(Path(inp).with_name("served.parquet"))
        pq.write_table(t, served)
        overrides = [
            "download.allow_private_hosts=true",
            "download.image_size=256",
            "relevance.min=-1",
            "clip.model=mm1data-tiny-clip",
            "clip.pretrained=null",
            "input.rows_per_unit=500",
            *sets,
        ]
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with PeakRSS("ray::", new_only=False) as rss:
            t0 = time.perf_counter()
            index = run_pipeline(str(ROOT / "pipelines" / "interleaved.yaml"), served, out, overrides)
            wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "kept": index["totals"]["samples"],
        "images": index["totals"]["images"],
        "funnel": {k: v for k, v in index["funnel"].items() if k in ("images", "paragraphs", "dropped")},
        "driver_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers": rss.result(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="generated pages")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (the best is kept)")
    p.add_argument("--real", help="a folder of real .html files to time the extractors on too")
    p.add_argument(
        "--sections", default="extractors,reader,pipeline", help="comma-separated: extractors, reader, pipeline"
    )
    p.add_argument("--docs", type=int, default=1000, help="documents for the pipeline section")
    p.add_argument("--cpus", type=int, default=2, help="Ray CPUs for the pipeline section")
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help="run config override for the pipeline section")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    p.add_argument("--side", choices=("extract", "reader", "pipeline"), help=argparse.SUPPRESS)
    p.add_argument("--warc", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "pipeline":
        print("RESULT " + json.dumps(pipeline_side(args.warc, args.cpus, args.out, args.set)))
        return
    if args.side:
        print("RESULT " + json.dumps(side(args.side, args.warc)))
        return

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-interleaved-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        warc = work / "pages.warc.gz"
        truth = write_warc(warc, args.n)  # section "pages"
        sections = args.sections.split(",")
        print(f"{args.n} pages, {sum(len(t['texts']) for t in truth)} positions, cpu count {os.cpu_count()}")
        real = None
        if args.real:
            real = work / "real.warc.gz"
            write_real_warc(real, args.real)
        if "extractors" in sections:
            section_extractors(warc_pages(warc), truth, args.repeat, real)
        if "reader" in sections:
            section_reader(warc, args.repeat)
            if real:
                section_reader(real, args.repeat)
            plain = work / "pages.warc"  # the same pages uncompressed: the reader's own cost without gunzip's
            write_warc(plain, args.n)
            section_reader(plain, args.repeat)
        if "pipeline" in sections:
            section_pipeline(work, args.docs, args.cpus, args.set)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
