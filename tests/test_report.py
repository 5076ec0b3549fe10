"""`mm1data report`: the corpus and manifest pages, on corpora written here by hand (no Ray), rendered in headless
Chromium (Debian's chromium package) to check that every chart and thumbnail loads."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mm1data.cli import main
from mm1data.report import funnel_steps, read_corpus, write_report
from mm1data.shards import TarShardWriter, build_index, write_index

pytest.importorskip("matplotlib")

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "JPEG")
    return buf.getvalue()


def make_corpus(root, kind: str = "caption", n: int = 40) -> dict:
    """index.json, meta/part-000000.parquet and one shard, shaped as the runner writes them."""
    os.makedirs(root / "meta")
    rng = np.random.default_rng(0)
    reasons = ["", "", "", "http_404", "lang", "dup_url", "", "caption_words"]
    drop = [reasons[i % len(reasons)] for i in range(n)]
    cols = {
        "key": [f"{i:016x}" for i in range(n)],
        "drop_reason": drop,
        "shard": ["" if d else f"{kind}-000000.tar" for d in drop],
    }
    if kind == "caption":
        cols |= {
            "url": [f"http://host{i % 3}.example/{i}.jpg" for i in range(n)],
            "download_error": ["http_404" if d == "http_404" else "" for d in drop],
            "clip_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
            "lang": rng.uniform(0, 1, n).astype(np.float32),
            "original_width": [0 if d == "http_404" else 300 + i for i, d in enumerate(drop)],
            "original_height": [0 if d == "http_404" else 200 + i for i, d in enumerate(drop)],
            "caption_chars": rng.integers(5, 80, n),
        }
    else:
        cols |= {"text_bytes": rng.integers(100, 5000, n), "gopher_words": rng.integers(10, 900, n)}
    pq.write_table(pa.table(cols), root / "meta" / "part-000000.parquet")
    kept = [k for k, d in zip(cols["key"], drop) if not d]
    writer = TarShardWriter(str(root / f"{kind}-000000.tar"))
    for i, key in enumerate(kept):
        members = {f"{key}.txt": f"sample {i} <b>escaped</b>".encode()}
        if kind == "caption":
            members[f"{key}.jpg"] = jpeg((40 * i % 255, 90, 160))
        writer.write(members, num_images=int(kind == "caption"))
    info = writer.close()
    dropped = {r: drop.count(r) for r in set(drop) - {""}}
    funnel = {
        "rows_in": n,
        **({"downloaded": n - drop.count("http_404")} if kind == "caption" else {}),
        "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "kept": len(kept),
    }
    filters = [{"name": "lang"}, {"name": "caption_words"}]
    index = build_index(kind, kind, [info], 10 * len(kept), funnel=funnel, config={"filters": filters}, warnings=[])
    write_index(str(root), index)
    return index


def test_funnel_steps_in_pipeline_order(tmp_path):
    index = make_corpus(tmp_path / "c")
    steps = funnel_steps(index)
    assert [(s, r) for s, r, _ in steps] == [
        ("read, download", "http_404"),
        ("filters", "lang"),
        ("filters", "caption_words"),
        ("dedup", "dup_url"),
    ]
    assert index["funnel"]["rows_in"] - sum(n for *_, n in steps) == index["funnel"]["kept"]
    assert funnel_steps(make_corpus(tmp_path / "t", kind="text"))[0][0] == "read"  # no download stage


def test_histograms_count_every_row_and_kept_rows(tmp_path):
    make_corpus(tmp_path / "c", n=40)
    stats = read_corpus(str(tmp_path / "c"))
    clip = stats.charts["CLIP score"][0]
    assert clip.all.sum() == 40 and clip.kept.sum() == 20  # 4 of every 8 rows kept
    width = stats.charts["image size (px, as fetched)"][0]
    assert width.name == "original_width" and width.all.sum() == 35  # size 0 (no image: http_404) is missing
    assert stats.charts["language score"][0].name == "lang"
    assert stats.errors == {"http_404": 5} and sum(stats.domains.values()) == 5
    assert "words" not in stats.charts  # no column for it: no chart


def test_text_corpus_page_skips_absent_columns(tmp_path):
    make_corpus(tmp_path / "t", kind="text")
    page = open(write_report(str(tmp_path / "t"))).read()
    stats = read_corpus(str(tmp_path / "t"))
    assert set(stats.charts) == {"document length", "words"}
    assert "Download failures" not in page and "sample 0 &lt;b&gt;escaped&lt;/b&gt;" in page


def render(page: str, tmp_path) -> tuple[int, int]:
    """(images loaded, images) of the page in headless Chromium: a copy of the page with a script that counts,
    after the load event, the images that decoded to a non-empty picture."""
    probe = (
        "<script>addEventListener('load',()=>{const i=[...document.images];"
        "document.title='IMAGES '+i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>"
    )
    copy = tmp_path / "probe.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom"]
    out = subprocess.run([*cmd, copy.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", out)
    assert m, f"the page did not finish loading in Chromium: {out[:500]!r}"
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_corpus_page_loads_every_image_in_chromium(tmp_path, capsys):
    make_corpus(tmp_path / "c")
    assert main(["report", str(tmp_path / "c"), "--html", str(tmp_path / "r.html")]) == 0
    assert str(tmp_path / "r.html") in capsys.readouterr().out
    page = (tmp_path / "r.html").read_text()
    # self-contained: every image is a data URI, nothing is fetched from elsewhere
    assert "<script" not in page and "<link" not in page and re.findall(r'src="(?!data:)', page) == []
    loaded, total = render(page, tmp_path)
    # funnel, CLIP, sizes, document length, language, error classes, domains = 7 charts; 8 thumbnails
    assert loaded == total == 7 + 8


@pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_manifest_page_loads_every_image_in_chromium(tmp_path):
    make_corpus(tmp_path / "c")
    make_corpus(tmp_path / "t", kind="text")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        json.dumps(
            {
                "name": "mix",
                "seed": 0,
                "unit": "samples",
                "sources": [
                    {"name": "caption", "index": "c/index.json", "weight": 0.9},
                    {"name": "text", "index": "t/index.json", "weight": 0.1},
                ],
            }
        )
    )
    assert main(["report", "--manifest", str(manifest)]) == 0
    page = (tmp_path / "report-m.html").read_text()
    assert "target" in page and "<td>90.0%</td>" in page and "<td>10.0%</td>" in page
    loaded, total = render(page, tmp_path)
    assert loaded == total == 3  # the mix chart and one funnel per source


def test_report_needs_a_finished_corpus(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no index.json" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "OUTPUT_URI or --manifest" in capsys.readouterr().err
