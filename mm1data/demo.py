"""`mm1data demo`: PIL-drawn images with captions served on 127.0.0.1, run through the caption pipeline on a
local Ray. The image server and data maker are also what the tests use (no network beyond 127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import threading
import time
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


def run_demo(out: str = "demo_out", n: int = 300) -> dict[str, Any]:
    """Build a caption corpus under `out` and print its funnel; returns index.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mm1data.cli import print_funnel
    from mm1data.pipelines import run_pipeline

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray on 127.0.0.1, like the server
    corpus = os.path.join(out, "caption")
    if os.path.exists(corpus):  # the server's port changes per run, so an earlier demo's rows are stale
        shutil.rmtree(corpus)
    os.makedirs(out, exist_ok=True)
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


# DataComp basic (REFERENCE.md): English, caption > 2 words and > 5 characters, shorter side >= 200, aspect <= 3
DEMO_FILTERS = [
    {"name": "caption_words", "min": 3},
    {"name": "caption_chars", "min": 6},
    {"name": "image_min_side", "min": 200},
    {"name": "image_aspect", "max": 3},
    {"name": "lang", "languages": ["en"]},
]
