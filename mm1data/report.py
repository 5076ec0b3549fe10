"""`mm1data report`: one self-contained HTML page per corpus (the funnel, score histograms, failing domains and error
classes, sample thumbnails) or per manifest (the target mix against the realised one). Charts are matplotlib PNGs
embedded as data URIs, so the page is one file that opens anywhere.

Generic over corpus kinds: it reads index.json's funnel and totals and whichever meta/*.parquet columns exist (a
histogram whose column is absent is left out). Meta is streamed part by part, batch by batch, in two passes (range,
then fixed bins): memory does not grow with the corpus' rows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mm1data import storage
from mm1data.config import ConfigError
from mm1data.schema import IMAGE_EXTS
from mm1data.shards import read_index, shard_uri

BINS = 40
SAMPLES = 8  # thumbnails shown
TOP = 15  # failing domains and error classes shown
MAX_DOMAINS = 100_000  # distinct failing domains counted exactly; past it the rarest are pruned (counts become lower
# bounds for domains first seen late, the top ones stay right on any skewed list)
BATCH_ROWS = 65_536

# Histograms: (title, candidate column groups); the first group whose columns all exist is drawn, each column a series
HISTOGRAMS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("CLIP score", (("clip_score",),)),
    ("image-text relevance (CLIP)", (("image_relevance",),)),
    (
        "image size (px, as fetched)",
        (
            ("original_width", "original_height"),
            ("orig_width", "orig_height"),
            ("image_orig_width", "image_orig_height"),
        ),
    ),
    ("image size (px, stored)", (("width", "height"), ("image_width", "image_height"))),
    (
        "document length",
        (("text_tokens",), ("num_tokens",), ("tokens",), ("text_bytes",), ("text_chars",), ("caption_chars",)),
    ),
    ("words", (("gopher_words",), ("caption_words",), ("words",))),
)
LANG_COLUMN = re.compile(r"^(lang|.*_lang|lang_score|.*_lang_score)$")  # language-id confidence columns


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("mm1data report draws with matplotlib: pip install 'mm1data[report]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- reading a corpus --------------------------------------------------------------------------------------------


@dataclass
class Series:
    """One numeric column: range, then fixed-bin counts over all rows and over kept rows."""

    name: str
    lo: float = math.inf
    hi: float = -math.inf
    edges: np.ndarray | None = None
    all: np.ndarray | None = None
    kept: np.ndarray | None = None
    n: int = 0  # finite values seen

    def see(self, values: np.ndarray) -> None:
        v = values[np.isfinite(values)]
        if len(v):
            self.lo, self.hi, self.n = min(self.lo, float(v.min())), max(self.hi, float(v.max())), self.n + len(v)

    def bin(self, values: np.ndarray, kept: np.ndarray) -> None:
        if not self.n:  # no finite value anywhere: nothing to draw (the chart is left out)
            return
        if self.edges is None:
            hi = self.hi if self.hi > self.lo else self.lo + 1.0
            self.edges = np.linspace(self.lo, hi, BINS + 1)
            self.all, self.kept = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
        ok = np.isfinite(values)
        self.all += np.histogram(values[ok], self.edges)[0]
        self.kept += np.histogram(values[ok & kept], self.edges)[0]


@dataclass
class CorpusStats:
    index: dict[str, Any]
    columns: list[str] = field(default_factory=list)
    charts: dict[str, list[Series]] = field(default_factory=dict)
    domains: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    rows: int = 0


def meta_parts(root: str, folder: str = "meta") -> list[str]:
    return sorted(f for f in storage.list_files(storage.join(root, folder), recursive=False) if f.endswith(".parquet"))


def _batches(parts: list[str], columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    for uri in parts:
        with storage.open_seekable(uri) as f:
            pf = pq.ParquetFile(f)
            have = [c for c in columns if c in pf.schema_arrow.names]
            for b in pf.iter_batches(batch_size=BATCH_ROWS, columns=have):
                yield {c: b.column(c).to_numpy(zero_copy_only=False) for c in have}


def _numeric_columns(parts: list[str]) -> tuple[list[str], list[str]]:
    """(every column, the numeric ones) over the meta parts' schemas (footers only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names: dict[str, bool] = {}
    for uri in parts:
        with storage.open_seekable(uri) as f:
            for fld in pq.ParquetFile(f).schema_arrow:
                numeric = pa.types.is_integer(fld.type) or pa.types.is_floating(fld.type)
                names[fld.name] = names.get(fld.name, True) and numeric
    return list(names), [n for n, numeric in names.items() if numeric]


def read_corpus(root: str, folder: str = "meta", error_col: str = "download_error") -> CorpusStats:
    """index.json plus histograms, failing domains and error classes streamed from meta/*.parquet (or another
    score-store table of the corpus, e.g. meta_images/: a row per image of an interleaved corpus)."""
    stats = CorpusStats(read_index(root))
    parts = meta_parts(root, folder)
    stats.columns, numeric = _numeric_columns(parts)
    for title, groups in HISTOGRAMS:
        group = next((g for g in groups if all(c in numeric for c in g)), None)
        if group:
            stats.charts[title] = [Series(c) for c in group]
    lang = [c for c in numeric if LANG_COLUMN.match(c)]
    if lang:
        stats.charts["language score"] = [Series(c) for c in lang]
    series = [s for ss in stats.charts.values() for s in ss]
    wanted = sorted({s.name for s in series} | {"drop_reason"})
    for b in _batches(parts, wanted):  # pass 1: ranges
        for s in series:
            s.see(_values(b, s.name))
    for b in _batches(parts, [*wanted, "url", error_col]):  # pass 2: bins, failing domains, error classes
        kept = b["drop_reason"] == "" if "drop_reason" in b else np.ones(len(next(iter(b.values()))), bool)
        stats.rows += len(kept)
        for s in series:
            s.bin(_values(b, s.name), kept)
        if error_col in b:
            failed = np.flatnonzero((b[error_col] != "") & (b[error_col] != None))  # noqa: E711
            stats.errors.update(b[error_col][failed].tolist())
            if "url" in b:
                stats.domains.update(_domain(u) for u in b["url"][failed])
                if len(stats.domains) > MAX_DOMAINS:
                    stats.domains = Counter(dict(stats.domains.most_common(MAX_DOMAINS // 2)))
    stats.charts = {t: [s for s in ss if s.n] for t, ss in stats.charts.items() if any(s.n for s in ss)}
    return stats


def _values(batch: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A column as floats; a size of 0 (no image: the row failed before it had one) counts as missing."""
    v = batch[name].astype(np.float64)
    if "width" in name or "height" in name:
        v[v <= 0] = np.nan
    return v


def _domain(url: Any) -> str:
    try:
        return urlsplit(str(url)).hostname or "(no host)"
    except ValueError:
        return "(bad url)"


def read_samples(root: str, index: dict[str, Any], n: int = SAMPLES) -> list[dict[str, Any]]:
    """The first n samples of the first shard: {key, text, image (bytes or None)}; streamed, never the whole tar."""
    out: dict[str, dict[str, Any]] = {}
    for shard in index.get("shards", [])[:1]:
        with storage.open_read(shard_uri(root, shard["path"])) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key not in out:
                    if len(out) >= n:
                        break
                    out[key] = {"key": key, "text": "", "image": None}
                data = tar.extractfile(member).read() if member.isfile() else b""
                last = ext.rsplit(".", 1)[-1]
                if last in IMAGE_EXTS and out[key]["image"] is None:
                    out[key]["image"] = data
                elif ext == "txt":
                    out[key]["text"] = data.decode("utf-8", "replace")
                elif ext == "json" and not out[key]["text"]:
                    out[key]["text"] = _segments_text(data)
    return list(out.values())


def _segments_text(data: bytes) -> str:
    """An interleaved document's text (its segments' text joined), or "" for any other json."""
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    segs = doc.get("segments") if isinstance(doc, dict) else None
    if not isinstance(segs, list):
        return ""
    return " ".join(s["text"] for s in segs if isinstance(s, dict) and isinstance(s.get("text"), str))


# ---- drawing -------------------------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="chart" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def funnel_steps(index: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(stage, reason, rows dropped) in pipeline order: read (and download), then each filter in chain order, then
    dedup.
    A row carries only its first drop reason, so rows left after step k = rows in - drops of steps <= k."""
    f = index.get("funnel", {})
    dropped = dict(f.get("dropped", {}))
    chain = [c.get("name") for c in (index.get("config", {}) or {}).get("filters", []) or [] if isinstance(c, dict)]
    filters = [r for r in chain if r in dropped]
    dedup = sorted(r for r in dropped if r.startswith("dup_"))
    early = sorted((r for r in dropped if r not in filters and r not in dedup), key=lambda r: -dropped[r])
    first = "read, download" if "downloaded" in f else "read"  # kinds without a download stage (text)
    steps = [(first, r, dropped[r]) for r in early]
    steps += [("filters", r, dropped[r]) for r in filters] + [("dedup", r, dropped[r]) for r in dedup]
    return steps


def draw_funnel(index: dict[str, Any]) -> str:
    plt = _require_matplotlib()
    f = index.get("funnel", {})
    left = int(f.get("rows_in", 0))
    labels, values, colors = ["rows in"], [left], ["#4c72b0"]
    palette = {"read, download": "#dd8452", "read": "#dd8452", "filters": "#c44e52", "dedup": "#8172b3"}
    for stage, reason, n in funnel_steps(index):
        left -= n
        labels.append(f"{stage}: -{reason} ({n:,})")
        values.append(left)
        colors.append(palette[stage])
    labels.append("kept")
    values.append(int(f.get("kept", left)))
    colors.append("#55a868")
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1))
    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("rows left")
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:,}", va="center", fontsize=7)
    ax.set_title("funnel: rows left after each stage and filter")
    return _png(fig)


def draw_histogram(title: str, series: list[Series]) -> str:
    plt = _require_matplotlib()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 2.8), squeeze=False)
    for ax, s in zip(axes[0], series):
        centers, width = (s.edges[:-1] + s.edges[1:]) / 2, np.diff(s.edges)
        ax.bar(centers, s.all, width=width, color="#bbbbbb", label="all rows")
        ax.bar(centers, s.kept, width=width, color="#4c72b0", label="kept")
        ax.set_title(f"{title}: {s.name}", fontsize=9)
        ax.set_ylabel("rows")
        ax.legend(fontsize=7)
    return _png(fig)


def draw_counts(title: str, counts: list[tuple[str, int]]) -> str:
    plt = _require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(counts) + 1))
    y = np.arange(len(counts))[::-1]
    ax.barh(y, [c for _, c in counts], color="#c44e52")
    ax.set_yticks(y, [k for k, _ in counts], fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("rows")
    return _png(fig)


def _thumbnail(data: bytes | None) -> str:
    from PIL import Image

    if not data:
        return ""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((160, 160))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
    except Exception:  # an unreadable sample is shown without its image, not a failed report
        return ""
    return f'<img alt="sample" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


# ---- pages ---------------------------------------------------------------------------------------------------------

STYLE = """body{font:14px system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px;text-align:right}
td:first-child,th:first-child{text-align:left}
tr:nth-child(even){background:#f6f6f6}.samples{display:flex;flex-wrap:wrap;gap:12px}
.sample{width:180px;font-size:12px}.sample img{max-width:160px;display:block}.warn{color:#a33}
img{max-width:100%}"""


def _page(title: str, body: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.1%}" if 0 <= v <= 1 else f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def corpus_page(root: str) -> str:
    """The HTML of a corpus report."""
    _require_matplotlib()
    stats = read_corpus(root)
    index = stats.index
    f, t = index.get("funnel", {}), index.get("totals", {})
    name = index.get("corpus", index.get("kind", "corpus"))
    body = [f"<h1>{html.escape(name)} corpus ({html.escape(str(index.get('kind')))})</h1>"]
    body.append(f"<p>{html.escape(root)} &middot; mm1data {html.escape(str(index.get('mm1data_version', '?')))}</p>")
    body += [f"<p class='warn'>warning: {html.escape(w)}</p>" for w in index.get("warnings", [])]
    body.append(
        _table(
            ["rows in", "kept", "shards", "samples", "images", "tokens", "MB"],
            [
                [
                    f.get("rows_in", 0),
                    f.get("kept", 0),
                    len(index.get("shards", [])),
                    t.get("samples", 0),
                    t.get("images", 0),
                    t.get("tokens", 0),
                    f"{t.get('bytes', 0) / 1e6:,.1f}",
                ]
            ],
        )
    )
    body += ["<h2>Funnel per stage and filter</h2>", draw_funnel(index)]
    steps = funnel_steps(index)
    if steps:
        rows_in = max(int(f.get("rows_in", 0)), 1)
        body.append(
            _table(["stage", "drop reason", "rows", "share of rows in"], [[*s, s[2] / rows_in] for s in steps])
        )
    if stats.charts:
        body.append("<h2>Distributions (grey: all rows; blue: kept)</h2>")
        body += [draw_histogram(title, series) for title, series in stats.charts.items()]
    if stats.errors:
        body += ["<h2>Download failures</h2>", draw_counts("error classes", stats.errors.most_common(TOP))]
        body.append(draw_counts("top failing domains", stats.domains.most_common(TOP)))
    if meta_parts(root, "meta_images"):  # a corpus of documents: its images and paragraphs have their own funnel
        body += _items_section(root, f)
    samples = read_samples(root, index)
    if samples:
        body.append("<h2>Samples (first shard)</h2><div class='samples'>")
        for s in samples:
            text = s["text"][:300] + ("..." if len(s["text"]) > 300 else "")
            body.append(
                f"<div class='sample'>{_thumbnail(s['image'])}<b>{html.escape(s['key'])}</b><br>"
                f"{html.escape(text)}</div>"
            )
        body.append("</div>")
    body.append(f"<p>meta columns: {html.escape(', '.join(stats.columns))}</p>")
    return _page(f"mm1data report: {name}", body)


def _items_section(root: str, f: dict[str, Any]) -> list[str]:
    """Images and paragraphs of an interleaved corpus: in, downloaded, kept, the reason each was removed for (the
    funnel's per-position counts), then histograms and download failures from meta_images/ (a row per image)."""
    body = ["<h2>Images and paragraphs</h2>"]
    rows = []
    for what in ("images", "paragraphs"):
        counts = f.get(what, {})
        if counts:
            rows.append([what, counts.get("in", 0), counts.get("downloaded", ""), counts.get("kept", 0)])
    if rows:
        body.append(_table(["positions", "in", "downloaded", "kept (in kept documents)"], rows))
    removed = [(f"{what[:-8]}: {r}", n) for what in ("images_dropped", "paragraphs_dropped")
               for r, n in sorted(f.get(what, {}).items(), key=lambda kv: -kv[1])]  # fmt: skip
    if removed:
        body.append(draw_counts("positions removed, by reason", removed[: 2 * TOP]))
    stats = read_corpus(root, "meta_images", "image_error")
    if stats.charts:
        body.append("<h3>Images (grey: all; blue: in kept documents and kept)</h3>")
        body += [draw_histogram(title, series) for title, series in stats.charts.items()]
    if stats.errors:
        body += [draw_counts("image download errors", stats.errors.most_common(TOP))]
        body.append(draw_counts("top failing image domains", stats.domains.most_common(TOP)))
    return body


def write_report(root: str, out: str | None = None) -> str:
    """Writes the corpus report (default OUTPUT/report.html); returns where."""
    root = root.rstrip("/")
    if not storage.exists(storage.join(root, "index.json")):
        raise ConfigError(f"no index.json at {root}: not a finished mm1data corpus")
    out = out or storage.join(root, "report.html")
    storage.write_bytes(out, corpus_page(root).encode())
    return out


def manifest_page(manifest_path: str) -> str:
    """The HTML of a manifest report: target shares (weights, in the manifest's unit) against the realised mix by
    samples, tokens and images, and each source's totals and funnel."""
    from mm1data.manifest import check_manifest, load_manifest

    plt = _require_matplotlib()
    manifest = load_manifest(manifest_path)
    report = check_manifest(manifest)
    sources = report["sources"]
    names = [s["name"] for s in sources]
    series = [
        (f"target ({manifest.unit})", [s["weight_share"] for s in sources]),
        ("realised: samples", [s["share_samples"] for s in sources]),
        ("realised: tokens", [s["share_tokens"] for s in sources]),
        ("realised: images", [s["share_images"] for s in sources]),
    ]
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(names)), 3.2))
    x = np.arange(len(names))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("share")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{manifest.name}: target against realised mix")
    body = [f"<h1>Manifest {html.escape(manifest.name)}</h1><p>{html.escape(manifest_path)}</p>", _png(fig)]
    body.append(
        _table(
            [
                "source",
                "kind",
                "samples",
                "images",
                "tokens",
                "weight",
                "target",
                "by samples",
                "by tokens",
                "by images",
            ],
            [
                [
                    s["name"],
                    s["kind"],
                    s["samples"],
                    s["images"],
                    s["tokens"],
                    f"{s['weight']:g}",
                    s["weight_share"],
                    s["share_samples"],
                    s["share_tokens"],
                    s["share_images"],
                ]
                for s in sources
            ],
        )
    )
    body.append("<h2>Sources</h2>")
    for s in sources:
        index = read_index(s["index"])
        body += [f"<h3>{html.escape(s['name'])}: {html.escape(s['index'])}</h3>", draw_funnel(index)]
    return _page(f"mm1data report: manifest {manifest.name}", body)


def manifest_report(manifest_path: str, out: str | None = None) -> str:
    """Writes the manifest report (default: report-NAME.html beside the manifest); returns where."""
    page = manifest_page(manifest_path)
    if out is None:
        stem = os.path.splitext(os.path.basename(manifest_path))[0]
        out = storage.join(os.path.dirname(manifest_path) or ".", f"report-{stem}.html")
    storage.write_bytes(out, page.encode())
    return out
