"""The caption pipeline with recaptioning on Ray: KEY.syn.txt beside the alt-text in the shards, syn_caption in the
score store, only on rows that survived the filters, resume, and the shards read back by every reader."""

from __future__ import annotations

import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import jpeg

from mm1data.demo import Route
from mm1data.pipelines import run_pipeline

SETTINGS = [
    "clip.enabled=false",
    "download.allow_private_hosts=true",
    "download.timeout_s=2",
    "download.image_size=96",
    "download.batch_size=4",
    "input.rows_per_unit=4",
    "shards.samples_per_shard=4",
    "filters=[{name: caption_words, min: 2}]",
    "recaption.enabled=true",
    "recaption.model=mm1data-tiny-coca",
    "recaption.pretrained=null",
    "recaption.max_tokens=8",
    "recaption.batch_size=4",
]


@pytest.mark.slow
def test_recaption_end_to_end(ray_session, server, tmp_path):
    import ray

    rows = []
    for i in range(9):
        server.routes[f"/img/{i}.jpg"] = Route(jpeg(120 + 9 * i, 100, seed=i))
        rows.append({"url": server.url(f"/img/{i}.jpg"), "caption": f"a picture number {i}"})
    rows[3]["caption"] = "short"  # caption_words
    rows[5]["url"] = server.url("/missing.jpg")  # http_404
    rows.append({"url": server.url("/img/0.jpg"), "caption": "the first picture again"})  # dup_url, after staging
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    out = str(tmp_path / "out")
    index = run_pipeline("pipelines/caption.yaml", str(inp), out, SETTINGS)

    meta = {m["src_row"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    reasons = [meta[i]["drop_reason"] for i in range(len(rows))]
    assert reasons == ["", "", "", "caption_words", "", "http_404", "", "", "", "dup_url"]
    syn = [meta[i]["syn_caption"] for i in range(len(rows))]
    # every row that survived the filters has one (dedup comes later, so the duplicate has one too)
    assert [bool(s) for s in syn] == [r not in ("caption_words", "http_404") for r in reasons]
    kept = [i for i, r in enumerate(reasons) if r == ""]
    assert index["funnel"]["recaptioned"] == index["totals"]["samples"] == len(kept) == 7
    assert any("recaption.pretrained is null" in w for w in index["warnings"])
    assert index["config"]["recaption"]["model"] == "mm1data-tiny-coca"

    paths = [os.path.join(out, s["path"]) for s in index["shards"]]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [meta[i]["key"] for i in kept]  # syn.txt is a member, not a sample
    assert [s["txt"].decode() for s in samples] == [rows[i]["caption"] for i in kept]  # KEY.txt: the alt-text
    assert [s["syn.txt"].decode() for s in samples] == [syn[i] for i in kept]
    assert all(b"syn_caption" not in s["json"] for s in samples)  # in its own member, not twice
    names = []
    for p in paths:
        with tarfile.open(p) as t:
            names += t.getnames()
    assert len(names) == 4 * len(kept) and sum(n.endswith(".syn.txt") for n in names) == len(kept)
    ray_rows = ray.data.read_webdataset(paths, decoder=None).take_all()
    assert sorted(r["syn.txt"].decode() for r in ray_rows) == sorted(syn[i] for i in kept)

    # the same command again: everything staged and committed is kept as it is
    mtimes = {p: os.path.getmtime(p) for p in paths}
    again = run_pipeline("pipelines/caption.yaml", str(inp), out, SETTINGS)
    assert again["shards"] == index["shards"] and mtimes == {p: os.path.getmtime(p) for p in paths}
    # rows staged with synthetic captions do not mix with rows staged without, or with another captioner
    for change in ("recaption.enabled=false", "recaption.max_tokens=9"):
        with pytest.raises(Exception, match=r"different config \(recaption differ"):
            run_pipeline("pipelines/caption.yaml", str(inp), out, [*SETTINGS, change])
