"""The text pipeline end to end on Ray: bad documents, planted exact and near duplicates, WARC on S3, reruns."""

from __future__ import annotations

import json
import os
import tarfile

import boto3
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from test_read_text import ARTICLE, GOOD, write_warc

from mm1data.demo import make_text_corpus
from mm1data.pipelines import run_pipeline
from mm1data.schema import count_tokens, make_key


@pytest.mark.slow
def test_text_end_to_end_local(ray_session, tmp_path):
    lines, expect = make_text_corpus(150, seed=3)
    inp = tmp_path / "docs.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    overrides = ["shards.samples_per_shard=40", "input.bytes_per_unit=20000", "input.id_col=id", "batch_size=64"]
    index = run_pipeline("pipelines/text.yaml", str(inp), out, overrides)

    starts = [0]  # a jsonl row's position is the byte where its line starts
    for line in lines:
        starts.append(starts[-1] + len(line.encode()) + 1)
    line_of = {b: i for i, b in enumerate(starts)}
    meta = {line_of[m["src_row"]]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    assert len(meta) == len(lines) == index["funnel"]["rows_in"]
    assert {i: m["drop_reason"] for i, m in meta.items()} == {i: expect.get(i, "") for i in range(len(lines))}
    assert {"dup_text", "dup_near", "gopher_words", "lang", "empty_text", "binary_text", "malformed_row"} <= set(
        index["funnel"]["dropped"]
    )
    # a near copy's cluster is the key of the document it copies, which is kept and in the same cluster
    near = [m for m in meta.values() if m["drop_reason"] == "dup_near"]
    by_key = {m["key"]: m for m in meta.values()}
    for m in near:
        head = by_key[m["dup_cluster"]]
        assert head["drop_reason"] == "" and head["dup_cluster"] == head["key"] and head["src_row"] < m["src_row"]
    assert len(near) == list(expect.values()).count("dup_near")
    assert all(m["dup_cluster"] == "" for m in meta.values() if m["drop_reason"] not in ("", "dup_near"))

    kept = [i for i in range(len(lines)) if expect.get(i, "") == ""]
    paths = [os.path.join(out, s["path"]) for s in index["shards"]]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [make_key("docs.jsonl", starts[i]) for i in kept]  # input order
    texts = [json.loads(lines[i])["text"] for i in kept]
    assert [s["txt"].decode() for s in samples] == texts
    first = json.loads(samples[0]["json"])
    assert first["id"] == json.loads(lines[kept[0]])["id"] and first["source"] == "docs.jsonl"
    assert "gopher_words" in first and "mh_bands" not in first
    assert index["kind"] == "text" and index["totals"]["images"] == 0
    assert (
        index["totals"]["tokens"]
        == sum(count_tokens(t) for t in texts)
        == sum(json.loads(s["json"])["tokens"] for s in samples)
    )
    for p, s in zip(paths, index["shards"]):
        with tarfile.open(p) as t:
            assert len(t.getnames()) == 2 * s["num_samples"]

    # the same command again changes nothing; a lost shard and index.json are rebuilt byte-identical
    again = run_pipeline("pipelines/text.yaml", str(inp), out, overrides)
    assert again["shards"] == index["shards"]
    os.remove(paths[1])
    os.remove(os.path.join(out, "index.json"))
    assert run_pipeline("pipelines/text.yaml", str(inp), out, overrides)["shards"] == index["shards"]

    with pytest.raises(Exception, match="different config"):
        run_pipeline("pipelines/text.yaml", str(inp), out, [*overrides, "dedup.minhash.bands=20"])


@pytest.mark.slow
def test_text_warc_from_s3_to_s3(ray_session, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="crawl")
    for i in range(2):
        write_warc(tmp_path / f"c{i}.warc.gz")
        s3.upload_file(str(tmp_path / f"c{i}.warc.gz"), "crawl", f"in/c{i}.warc.gz")
    index = run_pipeline("pipelines/text.yaml", "s3://crawl/in/", "s3://crawl/out", ["filters=[]"])
    # per file: the WET text, an HTML article, an image, an empty record; the second file repeats the first
    assert index["funnel"]["rows_in"] == 8 and index["totals"]["samples"] == 2
    assert index["funnel"]["dropped"] == {"dup_text": 2, "empty_text": 2, "not_text": 2}
    body = s3.get_object(Bucket="crawl", Key=f"out/{index['shards'][0]['path']}")["Body"].read()
    (tmp_path / "s.tar").write_bytes(body)
    samples = list(wds.WebDataset([str(tmp_path / "s.tar")], shardshuffle=False))
    assert [s["txt"].decode() for s in samples] == [GOOD, "\n".join(ARTICLE)]
    assert json.loads(samples[1]["json"])["url"] == "http://a.example/2"


@pytest.mark.slow
def test_the_output_does_not_depend_on_how_the_input_is_cut(ray_session, tmp_path):
    """Units of 3 KB or of the whole file, one shard writer or one per CPU: the same keys, drop reasons, clusters and
    shard bytes (keys come from byte offsets, dedup keeps the first copy in input order, whatever ran where)."""
    lines, _ = make_text_corpus(120, seed=11)
    inp = tmp_path / "docs.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    runs = {}
    for name, extra in [("small units", ["input.bytes_per_unit=3000", "shards.workers=1"]), ("one unit", [])]:
        out = tmp_path / name.replace(" ", "_")
        index = run_pipeline("pipelines/text.yaml", str(inp), str(out), ["shards.samples_per_shard=25", *extra])
        rows = pq.read_table(out / "meta").to_pylist()
        meta = sorted(({k: None if v != v else v for k, v in m.items()} for m in rows), key=lambda m: m["key"])
        runs[name] = ([(s["path"], s["sha256"]) for s in index["shards"]], meta, index["funnel"])
    assert len(os.listdir(tmp_path / "small_units" / "_staging" / "rows")) > 5  # many units
    assert runs["small units"] == runs["one unit"]
