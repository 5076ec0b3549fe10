"""`mm1data demo` builds every corpus, checks their manifest, streams packed batches, writes the reports, trains."""

from __future__ import annotations

import os

import pytest
import webdataset as wds

from mm1data.demo import run_demo


@pytest.mark.slow
def test_demo_builds_a_readable_corpus(ray_session, tmp_path, capsys):
    indexes = run_demo(str(tmp_path / "demo"), n=60, n_text=60, steps=3, n_pages=16)
    index = indexes["caption"]
    out = capsys.readouterr().out
    assert "kept" in out and "caption-000000.tar" in out
    paths = [os.path.join(tmp_path, "demo", "caption", s["path"]) for s in index["shards"]]
    n = sum(1 for _ in wds.WebDataset(paths, shardshuffle=False))
    assert n == index["totals"]["samples"] > 30
    assert index["funnel"]["dropped"].get("lang", 0) > 0 and index["funnel"]["dropped"].get("http_404", 0) > 0
    text = indexes["text"]
    assert text["kind"] == "text" and text["totals"]["samples"] > 30
    assert {"dup_text", "dup_near"} <= set(text["funnel"]["dropped"])
    web = indexes["interleaved"]
    assert web["kind"] == "interleaved" and web["totals"]["samples"] >= 12 and web["totals"]["images"] > 12
    assert web["funnel"]["images_dropped"]["http_404"] > 0 and web["funnel"]["dropped"] == {"dup_image_set": 1}
    assert "interleaved-000000.tar" in out
    assert "kept in kept documents" in out and "dup_paragraph" in out  # the images and paragraphs are counted
    assert "manifest check" in out and "all present with their listed sizes" in out
    assert "input_ids [4, 4096]" in out and "images [4, 16, 3, 378, 378]" in out and "realised mix" in out
    # the reports and what to open
    for page in ("report-manifest.html", "interleaved/report.html", "caption/report.html", "text/report.html"):
        assert os.path.join(tmp_path, "demo", page) in out
        assert os.path.getsize(os.path.join(tmp_path, "demo", page)) > 10_000
    assert "Open:" in out and os.path.join(tmp_path, "demo", "train", "metrics.jsonl") in out
