"""`mm1data demo`: every corpus kind built end to end on a local Ray (PIL-drawn images with captions served on
127.0.0.1, generated English-like documents), their manifest checked and streamed, the reports written and the tiny
model trained. The image server and data makers are also what the tests use (no network beyond 127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "purple": (130, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
FOREIGN = [
    "un cercle rouge sur un fond bleu",
    "ein roter Kreis auf blauem Hintergrund",
    "un cuadrado verde sobre un fondo negro",
    "un quadrato giallo su sfondo bianco",
]


@dataclass
class Route:
    """What the server answers for one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "image/jpeg"})
    delay_s: float = 0.0  # before answering (a slow or hanging server)
    fail_first: int = 0  # answer 500 this many times, then succeed
    hits: int = 0
    request_headers: dict[str, str] = field(default_factory=dict)  # of the last request


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 serving `routes`; a context manager. url(path) gives the URL."""

    def __init__(self, routes: dict[str, Route] | None = None, tls: tuple[str, str] | None = None) -> None:
        """tls: (certfile, keyfile) to serve HTTPS."""
        self.routes = routes if routes is not None else {}
        routes_ref = self.routes

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real image hosts do

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                route = routes_ref.get(self.path.split("?")[0])
                if route is None:
                    self._send(404, b"not found", {"Content-Type": "text/plain"})
                    return
                route.hits += 1
                route.request_headers = dict(self.headers)
                if route.delay_s:
                    time.sleep(route.delay_s)
                if route.hits <= route.fail_first:
                    self._send(500, b"try again", {"Content-Type": "text/plain"})
                    return
                self._send(route.status, route.body, route.headers)

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    if "Content-Length" not in headers:
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that hang up early (timeouts, byte caps) are expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "https" if tls else "http"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def draw_image(rng: np.random.Generator, size: tuple[int, int] | None = None) -> tuple[bytes, str]:
    """A JPEG of a coloured shape on a coloured background, and its English caption."""
    names = list(COLORS)
    fg, bg = rng.choice(names, 2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    w, h = size or (int(rng.integers(240, 900)), int(rng.integers(240, 900)))
    im = Image.new("RGB", (w, h), COLORS[bg])
    d = ImageDraw.Draw(im)
    m = min(w, h)
    cx, cy, r = w // 2 + int(rng.integers(-w // 8, w // 8 + 1)), h // 2, m // 3
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[fg])
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLORS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    for _ in range(int(rng.integers(0, 6))):  # a little texture so images differ beyond the shape
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.line((x, y, x + int(rng.integers(-60, 60)), y + int(rng.integers(-60, 60))), fill=COLORS[fg], width=3)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue(), f"a {fg} {shape} on a {bg} background"


def make_caption_corpus(server: ImageServer, n: int, seed: int = 0) -> list[dict[str, str]]:
    """n rows {url, caption, id}: mostly good pairs, plus the kinds of rows real web lists have (foreign
    captions, tiny and extreme-aspect images, dead links, HTML pages, repeated URLs and images)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = rng.random()
        path = f"/img/{i:05d}.jpg"
        if kind < 0.04:
            rows.append({"url": server.url(f"/missing/{i}.jpg"), "caption": "a photo that is gone"})
            continue
        if kind < 0.06:
            server.routes[path] = Route(b"<html>a page</html>", headers={"Content-Type": "text/html"})
            rows.append({"url": server.url(path), "caption": "a web page, not an image"})
            continue
        size = (120, 150) if kind < 0.09 else (900, 200) if kind < 0.11 else None
        body, caption = draw_image(rng, size)
        if 0.11 <= kind < 0.15:
            caption = FOREIGN[int(rng.integers(len(FOREIGN)))]
        server.routes[path] = Route(body)
        rows.append({"url": server.url(path), "caption": caption})
    for i in range(0, min(n, 20), 7):  # the same image under another URL, and the same URL twice
        server.routes[f"/copy/{i}.jpg"] = server.routes.get(f"/img/{i:05d}.jpg", Route(b""))
        rows.append({"url": server.url(f"/copy/{i}.jpg"), "caption": rows[i]["caption"]})
        rows.append(dict(rows[i]))
    for i, r in enumerate(rows):
        r["id"] = f"demo-{i}"
    return rows


# English-like documents for the text corpus: sentences from a small grammar over a few hundred common words,
# so that distinct documents share almost no word 5-grams, they read as English to lid.176, and pass Gopher's rules.
NOUNS = (
    "river city garden window teacher market forest letter mountain village harbor engine kitchen library bridge "
    "island doctor farmer student painter winter summer morning evening valley meadow station museum theater "
    "festival council border harvest journey machine storm signal lantern castle desert ocean planet school "
    "hospital factory orchard railway cottage chapel tower canal shelter museum workshop bakery stadium temple "
    "garden mirror notebook picture kettle blanket ladder bicycle carriage compass telescope violin piano drum "
    "record ticket basket bottle candle pillow feather pebble shell acorn branch root leaf flower stone wall roof"
).split()
VERBS = (
    "carried found built opened painted visited followed described watched repaired measured collected counted "
    "crossed discovered explained filled gathered guarded improved joined kept lifted moved noticed offered "
    "planted protected reached remembered returned shared studied turned used wanted washed welcomed wrote"
).split()
ADJS = (
    "old quiet bright narrow heavy gentle distant early late small large careful patient famous simple strange "
    "warm cold green golden silver wooden crowded empty ancient modern busy calm clever honest humble proud rapid "
    "steady tired useful wide young"
).split()
ADVS = "slowly quickly carefully often rarely together again finally early suddenly gently quietly".split()
FRENCH = (
    "Le petit village se trouve au bord de la rivière et les habitants aiment se promener le soir. "
    "La boulangerie ouvre très tôt le matin et le pain frais attire les voisins de toute la région. "
)


TEMPLATES = (
    "the {a} {n} {v} the {n} of the {a} {n}",
    "{d} a {a} {n} {v} the {n} near the {n}",
    "every {n} {v} some {a} {n} before the {n} {v} it",
    "when the {n} {v} a {n}, the {a} {n} {v} the {n} {d}",
    "our {n} and their {a} {n} {v} {d} to the {n}",
    "in the {a} {n} a {n} {v} the {a} {n}",
    "nobody {v} the {n} because the {n} was {a}",
    "{d} the {a} {n} {v} another {n} with a {a} {n}",
)


def _sentence(rng: np.random.Generator) -> str:
    pick = {k: v for k, v in (("n", NOUNS), ("v", VERBS), ("a", ADJS), ("d", ADVS))}
    parts = [TEMPLATES[int(rng.integers(len(TEMPLATES)))] for _ in range(int(rng.integers(1, 3)))]
    s = " and ".join(parts)
    out = []
    for tok in s.split(" "):  # fill each slot with a random word of its class
        core = tok.strip(",")
        out.append(pick[core[1]][int(rng.integers(len(pick[core[1]])))] + tok[len(core) :] if core[:1] == "{" else tok)
    s = " ".join(out)
    return s[0].upper() + s[1:] + "."


def make_document(rng: np.random.Generator, sentences: int = 12) -> str:
    """Paragraphs of grammatical English-like sentences (~20 words each)."""
    paras = []
    while sentences > 0:
        k = min(sentences, int(rng.integers(3, 6)))
        paras.append(" ".join(_sentence(rng) for _ in range(k)))
        sentences -= k
    return "\n\n".join(paras)


def _near_copy(rng: np.random.Generator, text: str, rate: float) -> str:
    """`text` with about `rate` of its words replaced (a near duplicate, as syndicated web pages are)."""
    words = text.split(" ")
    for i in rng.choice(len(words), max(1, int(rate * len(words))), replace=False):
        words[i] = NOUNS[int(rng.integers(len(NOUNS)))]
    return " ".join(words)


def make_text_corpus(n: int, seed: int = 0) -> tuple[list[str], dict[int, str]]:
    """n jsonl lines of {"text", "id"}: mostly good documents, plus planted exact and near duplicates and the bad
    rows web text has. Returns (lines, {line number: the drop reason it deserves under text_gopher})."""
    rng = np.random.default_rng(seed)
    lines, expect, docs = [], {}, []

    def add(obj: Any, reason: str = "", raw: str | None = None) -> None:
        if reason:
            expect[len(lines)] = reason
        lines.append(raw if raw is not None else json.dumps({**obj, "id": f"doc-{len(lines)}"}, ensure_ascii=False))

    for _ in range(n):
        kind = rng.random()
        if kind < 0.08 and docs:  # the same text again, lower-cased and re-spaced
            add({"text": "  " + docs[int(rng.integers(len(docs)))].lower().replace(". ", ".   ")}, "dup_text")
        elif kind < 0.16 and docs:  # a near copy: one word in a hundred changed (5-gram Jaccard ~0.9)
            add({"text": _near_copy(rng, docs[int(rng.integers(len(docs)))], 0.01)}, "dup_near")
        elif kind < 0.19:
            add({"text": "Too short to be a document."}, "gopher_words")
        elif kind < 0.21:
            add({"text": FRENCH * 6}, "lang")
        elif kind < 0.23:
            add({"text": "\n".join("- " + _sentence(rng) for _ in range(10))}, "gopher_bullet_lines")
        else:
            docs.append(make_document(rng, int(rng.integers(6, 30))))
            add({"text": docs[-1]})
    add({"text": "   \n\t "}, "empty_text")
    add({"text": None}, "empty_text")
    add({"text": "".join(chr(int(c)) for c in rng.integers(0, 32, 400))}, "binary_text")
    add({}, "text_utf8", raw='{"text": "a lone surrogate \\ud800 is not UTF-8"}')
    add({}, "malformed_row", raw='{"text": "a line cut in the mid')
    return lines, expect


# ---- the interleaved corpus: a small web site -----------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/static/site.css"><script>window.track = function () {{ return 1; }};</script></head>
<body>
<header><img src="/static/logo.png" alt="Demo site logo"><h1>The Demo Gazette</h1></header>
<nav><ul><li><a href="/">Home</a></li><li><a href="/news/">News</a></li><li><a href="/about">About us</a></li>
<li><a href="/contact">Contact</a></li><li><a href="/privacy">Privacy policy</a></li></ul></nav>
<div class="cookie-banner" id="cookie-consent">This site uses cookies. By continuing you accept our cookie policy.
<button>Accept</button></div>
<main><article><h2>{title}</h2>
{body}
</article></main>
<aside class="sidebar"><h3>Popular</h3><ul>{popular}</ul><img src="/static/banner-ad.jpg" alt="advert"></aside>
<footer><p>Copyright 2026 The Demo Gazette. All rights reserved.</p><p><a href="/terms">Terms of use</a> |
<a href="/privacy">Privacy policy</a></p></footer>
</body></html>
"""


NEWSLETTER = (
    "Subscribe to our weekly newsletter and we will send you the best stories of the week, with photographs from "
    "our readers and the news of the village, every Friday morning."
)


def make_web_site(server: ImageServer, n: int, seed: int = 0) -> list[str]:
    """n article pages on `server` (paragraphs of English-like prose with drawn images between them, inside the
    navigation, header, footer, cookie banner and sidebar real sites have), plus the things crawls hold: a logo and
    an advert on every page, images in srcset and lazy-load attributes, relative URLs, a data: placeholder, a
    dead image, a tiny icon, a page repeated under a second URL. Returns the page URLs to crawl."""
    rng = np.random.default_rng(seed)
    logo, _ = draw_image(rng, (240, 240))
    ad, _ = draw_image(rng, (600, 300))
    server.routes["/static/logo.png"] = Route(logo)
    server.routes["/static/banner-ad.jpg"] = Route(ad)
    server.routes["/static/icon-share.png"] = Route(draw_image(rng, (32, 32))[0])
    pages = []
    for i in range(n):
        parts = []
        for j in range(int(rng.integers(2, 5))):
            parts.append(f"<p>{make_document(rng, int(rng.integers(3, 6)))}</p>")
            body, caption = draw_image(rng)
            path = f"/img/{i}/{j}.jpg"
            server.routes[path] = Route(body)
            kind = rng.random()
            if kind < 0.2:  # a lazy-loaded image: a data: placeholder in src, the real one in data-src
                tag = f'<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="{path}" alt="{caption}">'
            elif kind < 0.35:  # a responsive image: the largest srcset candidate is the one to fetch
                server.routes[path.replace(".jpg", "-small.jpg")] = Route(draw_image(rng, (160, 160))[0])
                tag = f'<img src="{path.replace(".jpg", "-small.jpg")}" srcset="{path} 800w" alt="{caption}">'
            elif kind < 0.45:  # relative to the page
                tag = f'<img src="../img/{i}/{j}.jpg" alt="{caption}">'
            else:
                tag = f'<figure><img src="{path}" alt="{caption}"><figcaption>{caption}.</figcaption></figure>'
            parts.append(tag)
        if i % 7 == 3:
            parts.append('<img src="/img/gone.jpg" alt="a photo that is gone">')  # a dead link
        if i % 5 == 1:
            parts.append('<img src="/static/icon-share.png" alt="share">')  # too small, and an icon
        parts.append(f"<p>{make_document(rng, 3)}</p>")
        parts.append(f"<p>{NEWSLETTER}</p>")  # boilerplate inside the article: the domain rule removes it
        popular = "".join(f'<li><a href="/news/{k}.html">Story {k}</a></li>' for k in range(5))
        html = PAGE.format(title=f"Story number {i}", body="\n".join(parts), popular=popular).encode()
        server.routes[f"/news/{i}.html"] = Route(html, headers={"Content-Type": "text/html; charset=utf-8"})
        pages.append(server.url(f"/news/{i}.html"))
    server.routes["/mirror/0.html"] = server.routes["/news/0.html"]  # the same page under a second URL
    pages.append(server.url("/mirror/0.html"))
    return pages


def crawl_to_warc(urls: list[str], path: str) -> None:
    """Fetch each page and write it as a WARC response record (what a crawler like Common Crawl stores)."""
    import urllib.request

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url in urls:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
                headers = StatusAndHeaders(f"{resp.status} OK", list(resp.headers.items()), protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                          http_headers=headers))  # fmt: skip


def build_interleaved_corpus(out: str, n: int) -> dict[str, Any]:
    """The demo web site, crawled to a WARC, through the interleaved pipeline (OBELICS' rules, relevance scored by
    a random-weight CLIP: computed, not thresholded)."""
    from mm1data.cli import print_funnel
    from mm1data.pipelines import run_pipeline

    corpus = os.path.join(out, "interleaved")
    if os.path.exists(corpus):
        shutil.rmtree(corpus)
    with ImageServer() as server:
        pages = make_web_site(server, n)
        inp = os.path.join(out, "input", "crawl.warc.gz")
        os.makedirs(os.path.dirname(inp), exist_ok=True)
        crawl_to_warc(pages, inp)
        print(f"demo: {len(pages)} web pages served from {server.url('/')}, crawled to {inp}")
        overrides = [
            "download.allow_private_hosts=true",
            "download.image_size=256",
            "clip.model=mm1data-tiny-clip",
            "clip.pretrained=null",
            "relevance.min=-1",  # random weights: every similarity is noise, so nothing is removed by it
            "shards.samples_per_shard=50",
            "filters=interleaved_obelics",
        ]
        index = run_pipeline(None, inp, corpus, ["pipeline=interleaved", *overrides])
    print_funnel(index, corpus)
    for s in index["shards"]:
        print(f"  {os.path.join(corpus, s['path'])}  {s['num_samples']} documents, {s['num_images']} images")
    return index


@dataclass(frozen=True)
class CorpusStep:
    """One corpus the demo builds: `build(out, rows)` writes out/NAME and returns its index.json."""

    name: str  # the corpus folder under out/ and its manifest source name
    build: Callable[[str, int], dict[str, Any]]
    weight: float  # MM1's share of the mixture (REFERENCE.md); relative


def corpus_steps() -> list[CorpusStep]:
    """Every corpus kind the project builds, in the order the demo runs them (add a kind here: one line)."""
    return [
        CorpusStep("interleaved", build_interleaved_corpus, 0.45),
        CorpusStep("caption", build_caption_corpus, 0.45),
        CorpusStep("text", build_text_corpus, 0.10),
    ]


def run_demo(
    out: str = "demo_out", n: int = 300, n_text: int | None = None, steps: int = 30, n_pages: int | None = None
) -> dict[str, Any]:
    """Build every corpus under `out`, check their manifest, stream packed batches, write the reports, train the
    tiny model for `steps` steps, then print what to open; returns {corpus: index.json}. n rows per corpus (n_text
    for the text corpus, n_pages web pages for the interleaved one; default n and n / 5)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on 127.0.0.1, like the server
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    corpora = corpus_steps()
    indexes = {}
    for step in corpora:
        print(f"\n== {step.name} corpus ==")
        rows = {"text": n_text or n, "interleaved": n_pages or max(10, n // 5)}.get(step.name, n)
        indexes[step.name] = step.build(out, rows)
    manifest = write_demo_manifest(out, indexes, {c.name: c.weight for c in corpora})
    stream_mixture(manifest)
    reports = write_reports(out, manifest, indexes)
    opened = [*reports]
    if steps > 0:
        train_demo(manifest, os.path.join(out, "train"), steps)
        opened += [os.path.join(out, "train", name) for name in ("loss.png", "metrics.jsonl")]
    print(f"\ndemo finished in {time.monotonic() - t0:,.0f} s. Open:")
    for path in opened:
        if os.path.exists(path):
            print(f"  {os.path.abspath(path)}")
    print(f"  shards: {', '.join(os.path.abspath(os.path.join(out, k)) for k in indexes)} (index.json, meta/, *.tar)")
    return indexes


def write_reports(out: str, manifest: str, indexes: dict[str, dict[str, Any]]) -> list[str]:
    """`mm1data report` for every corpus and for the manifest; none (with a note) without matplotlib."""
    from mm1data.report import manifest_report, write_report

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\nreports skipped: they draw with matplotlib (pip install 'mm1data[report]')")
        return []
    print("\n$ mm1data report ...")
    pages = [manifest_report(manifest, os.path.join(out, "report-manifest.html"))]
    pages += [write_report(os.path.join(out, name)) for name in indexes]
    for page in pages:
        print(f"  {page}")
    return pages


def write_demo_manifest(out: str, indexes: dict[str, dict[str, Any]], weights: dict[str, float]) -> str:
    """manifest.yaml beside the corpora: MM1's weights for the kinds built."""
    import yaml

    doc = {
        "name": "demo",
        "seed": 0,
        "unit": "samples",
        "sources": [{"name": k, "index": f"{k}/index.json", "weight": weights[k]} for k in indexes],
        "sequence": {"max_tokens": 4096, "max_images": 16, "image_tokens": 144, "image_size": 378},
    }
    path = os.path.join(out, "manifest.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def stream_mixture(manifest_path: str, batches: int = 3, batch_size: int = 4) -> dict[str, Any]:
    """`mm1data manifest check` on the demo manifest, then a few packed MM1 batches from the streaming loader."""
    from collections import Counter

    from mm1data.loader import MixtureDataset
    from mm1data.manifest import check_manifest, format_report, load_manifest
    from mm1data.packing import SequencePacker, collate, efficiency

    manifest = load_manifest(manifest_path)
    print(f"\n$ mm1data manifest check {manifest_path} --budget-tokens 1000000")
    report = check_manifest(manifest, 1_000_000)
    print(format_report(report))
    want = ", ".join(
        f"{r['name']} {r['share_samples']:.0%}" for r in sorted(report["sources"], key=lambda r: r["name"])
    )
    ds = MixtureDataset(manifest, seed=0)
    drawn: Counter[str] = Counter()

    def counted():
        for item in ds:
            drawn[item["source"]] += 1
            yield item

    seqs = SequencePacker(manifest.sequence).pack(counted())
    print(
        f"\nstreaming {batches} packed batches of {batch_size} sequences (MixtureDataset -> SequencePacker -> collate)"
    )
    shapes, taken = {}, []
    for b in range(batches):
        group = [s for _, s in zip(range(batch_size), seqs)]
        if not group:
            break
        taken += group
        batch = collate(group, manifest.sequence)
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        print(
            f"  batch {b}: "
            + ", ".join(f"{k} {list(v)}" for k, v in shapes.items() if k in ("input_ids", "images", "loss_mask"))
            + f"; images in batch {int(batch['num_images'].sum())}"
        )
    total = sum(drawn.values())
    mix = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(drawn.items()))
    print(f"  realised mix over {total} samples drawn: {mix} (manifest: {want})")
    print(f"  packing efficiency (non-padding share of tokens): {efficiency(taken):.3f}")
    return {"drawn": dict(drawn), "shapes": shapes, "efficiency": efficiency(taken)}


def build_caption_corpus(out: str, n: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mm1data.cli import print_funnel
    from mm1data.pipelines import run_pipeline

    corpus = os.path.join(out, "caption")
    if os.path.exists(corpus):  # the server's port changes per run, so an earlier demo's rows are stale
        shutil.rmtree(corpus)
    with ImageServer() as server:
        rows = make_caption_corpus(server, n)
        inp = os.path.join(out, "input", "captions.parquet")
        os.makedirs(os.path.dirname(inp), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), inp)
        print(f"demo: {len(rows)} caption rows served from {server.url('/')}")
        overrides = [
            "download.allow_private_hosts=true",  # the demo serves on 127.0.0.1
            "download.image_size=256",
            "clip.model=mm1data-tiny-clip",  # random weights: no download; the score is computed, not thresholded
            "clip.pretrained=null",
            "shards.samples_per_shard=100",
            "filters=" + json.dumps(DEMO_FILTERS),
        ]
        index = run_pipeline(None, inp, corpus, ["pipeline=caption", *overrides])
    print_funnel(index, corpus)
    for s in index["shards"]:
        print(f"  {os.path.join(corpus, s['path'])}  {s['num_samples']} samples")
    return index


def build_text_corpus(out: str, n: int) -> dict[str, Any]:
    from mm1data.cli import print_funnel
    from mm1data.pipelines import run_pipeline

    corpus = os.path.join(out, "text")
    if os.path.exists(corpus):
        shutil.rmtree(corpus)
    lines, _ = make_text_corpus(n)
    inp = os.path.join(out, "input", "docs.jsonl")
    os.makedirs(os.path.dirname(inp), exist_ok=True)
    with open(inp, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"demo: {len(lines)} text documents (with planted exact and near duplicates) from {inp}")
    # Gopher quality and repetition rules + English (filters/text_gopher.yaml), exact and MinHash dedup
    overrides = ["input.id_col=id", "shards.samples_per_shard=100", "filters=text_gopher"]
    index = run_pipeline(None, inp, corpus, ["pipeline=text", *overrides])
    print_funnel(index, corpus)
    return index


# DataComp basic (REFERENCE.md): English, caption > 2 words and > 5 characters, shorter side >= 200, aspect <= 3
DEMO_FILTERS = [
    {"name": "caption_words", "min": 3},
    {"name": "caption_chars", "min": 6},
    {"name": "image_min_side", "min": 200},
    {"name": "image_aspect", "max": 3},
    {"name": "lang", "languages": ["en"]},
]


def train_demo(manifest_path: str, out: str, steps: int = 30) -> dict[str, Any]:
    """`mm1data train --config tiny` on the demo mixture for a few dozen steps, with a held-out slice of each
    source (written as manifest-train.yaml beside the manifest), then where the loss curve is."""
    import yaml

    from mm1data.train.train import train

    with open(manifest_path) as f:
        doc = yaml.safe_load(f)
    for s in doc["sources"]:  # never trained on: the held-out loss of each source (at most a quarter of it)
        with open(os.path.join(os.path.dirname(manifest_path), s["index"])) as f:
            samples = json.load(f)["totals"]["samples"]
        s["holdout"] = min(16, max(1, samples // 4))
    train_manifest = os.path.join(os.path.dirname(manifest_path), "manifest-train.yaml")
    with open(train_manifest, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    if os.path.exists(out):
        shutil.rmtree(out)  # a fresh run each demo (a kept one would need --resume)
    overrides = ["batch_size=2", "micro_batch=2", "eval_every=10"]  # 2 x 4096-token sequences a step on CPU
    print(f"\n$ mm1data train --manifest {train_manifest} --config tiny --steps {steps} --out {out} "
          + " ".join(f"--set {o}" for o in overrides))  # fmt: skip
    summary = train(train_manifest, "tiny", steps, out, overrides=overrides)
    first, last = summary["first"], summary["last"]
    held = ", ".join(f"{k} {v:.2f}" for k, v in summary.get("heldout", {}).items())
    print(
        f"  training loss {first['loss']:.2f} at step 1 -> {last['loss']:.2f} at step {last['step']} "
        f"(nats per text token; {last['tokens_per_s']:,.0f} tokens/s on this CPU)"
    )
    print(f"  held-out loss per source at step {last['step']}: {held}")
    print(f"  curve: {os.path.join(out, 'metrics.jsonl')}, {os.path.join(out, 'loss.png')}")
    return summary
