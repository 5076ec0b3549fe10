"""S3 end to end: every location is s3:// on moto's server (127.0.0.1, real boto3): the inputs of three kinds, their
outputs with staging and score stores, a manifest over their index URIs, the loader and its resume, `mm1data train`
writing and resuming from s3://, `mm1data report` and `mm1data manifest check` of s3:// locations."""

from __future__ import annotations

import io
import itertools
import json

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import jpeg

from mm1data import storage
from mm1data.cli import main as cli
from mm1data.demo import ImageServer, Route
from mm1data.loader import MixtureDataset
from mm1data.manifest import load_manifest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*pretrained is null"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create"),
]
B = "e2e"
TINY_CLIP = ["clip.model=mm1data-tiny-clip", "clip.pretrained=null", "download.allow_private_hosts=true"]
RUNS = {  # kind -> its overrides: tiny models, no filters, small shards so every corpus has several
    "caption": [*TINY_CLIP, "download.image_size=64", "filters=[]", "shards.samples_per_shard=4"],
    "text": ["filters=[]", "dedup.minhash.enabled=false", "shards.samples_per_shard=4"],
    "interleaved": [
        *TINY_CLIP,
        "download.image_size=64",
        "relevance.min=-1",
        "filters=[]",
        "shards.samples_per_shard=2",
    ],  # fmt: skip
}
SEQUENCE = {"max_tokens": 192, "max_images": 3, "image_tokens": 4, "image_size": 32}


def keys(prefix: str) -> set[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=B, Prefix=prefix)
    return {o["Key"][len(prefix) :] for p in pages for o in p.get("Contents", [])}


def put(key: str, body: bytes) -> str:
    boto3.client("s3").put_object(Bucket=B, Key=key, Body=body)
    return f"s3://{B}/{key}"


def write_inputs(srv: ImageServer) -> dict[str, str]:
    """Caption parquet, text jsonl and interleaved (OBELICS form) jsonl on S3; images served on 127.0.0.1."""
    for i in range(10):
        srv.routes[f"/{i}.jpg"] = Route(jpeg(120 + 4 * i, 100, seed=200 + i))
    buf = io.BytesIO()
    rows = [{"url": srv.url(f"/{i}.jpg"), "caption": f"a red picture number {i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=5)
    docs = [
        {"url": f"https://site.example/{d}", "texts": [f"Paragraph {d} about a red picture.", None],
         "images": [None, srv.url(f"/{d}.jpg")]}
        for d in range(4)
    ]  # fmt: skip
    lines = [
        json.dumps({"text": f"Document {i} says something of its own about the number {i * 7}."}) for i in range(10)
    ]
    return {
        "caption": put("in/caption/part-0.parquet", buf.getvalue()),
        "text": put("in/text/docs.jsonl", ("\n".join(lines) + "\n").encode()),
        "interleaved": put("in/interleaved/docs.jsonl", "".join(json.dumps(d) + "\n" for d in docs).encode()),
    }


@pytest.fixture(scope="module")
def corpora_on_s3(ray_session):
    """The three kinds run from s3:// to s3://; -> {kind: index}."""
    from mm1data.pipelines import run_pipeline

    boto3.client("s3").create_bucket(Bucket=B)
    with ImageServer({}) as srv:
        inputs = write_inputs(srv)
        return {
            kind: run_pipeline(f"pipelines/{kind}.yaml", inputs[kind], f"s3://{B}/out/{kind}", over)
            for kind, over in RUNS.items()
        }


def test_pipelines_write_shards_staging_and_score_stores_to_s3(corpora_on_s3):
    expected = {"caption": 10, "text": 10, "interleaved": 4}
    for kind, index in corpora_on_s3.items():
        assert index["totals"]["samples"] == expected[kind], kind
        stored = keys(f"out/{kind}/")
        assert json.loads(storage.read_bytes(f"s3://{B}/out/{kind}/index.json"))["shards"] == index["shards"]
        for s in index["shards"]:
            assert s["path"] in stored and s["path"].replace(".tar", ".idx") in stored
        assert any(k.startswith("meta/") and k.endswith(".parquet") for k in stored), kind
        assert any(k.startswith("_staging/") for k in stored), kind  # the crash boundary lived on S3 too
        meta = pq.read_table(io.BytesIO(storage.read_bytes(f"s3://{B}/out/{kind}/meta/part-000000.parquet")))
        assert meta.num_rows > 0 and "drop_reason" in meta.column_names
    assert any(k.startswith("meta_images/") for k in keys("out/interleaved/"))
    # a rerun of a finished output redoes nothing and gives the same index
    from mm1data.pipelines import run_pipeline

    again = run_pipeline("pipelines/text.yaml", f"s3://{B}/in/text/docs.jsonl", f"s3://{B}/out/text", RUNS["text"])
    assert again["shards"] == corpora_on_s3["text"]["shards"]


@pytest.fixture(scope="module")
def manifest_uri(corpora_on_s3) -> str:
    """A manifest on S3 whose sources name their index.json by s3:// URI and by a path relative to the manifest."""
    doc = {
        "name": "e2e",
        "seed": 0,
        "sources": [
            {"name": "caption", "index": f"s3://{B}/out/caption/index.json", "weight": 0.45},
            {"name": "interleaved", "index": "interleaved/index.json", "weight": 0.45},  # beside the manifest
            {"name": "text", "index": f"s3://{B}/out/text/index.json", "weight": 0.1},
        ],
        "sequence": SEQUENCE,
    }
    return put("out/mix.yaml", yaml.safe_dump(doc).encode())


def test_manifest_check_and_loader_resume_on_s3(manifest_uri, capsys, fault_proxy, monkeypatch):
    assert cli(["manifest", "check", manifest_uri, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {s["name"]: s["samples"] for s in report["sources"]} == {"caption": 10, "interleaved": 4, "text": 10}
    m = load_manifest(manifest_uri)
    assert [s.index for s in m.sources][1] == f"s3://{B}/out/interleaved/index.json"

    def ids(items):
        return [(it["source"], it["key"]) for it in items]

    kw = {"samples_per_epoch": 40, "shuffle_buffer": 4}
    whole = list(MixtureDataset(m, **kw))
    assert {it["source"] for it in whole} == {"caption", "interleaved", "text"}
    assert all(it["shard"].startswith(f"s3://{B}/out/") for it in whole)
    assert all(img.size[0] > 0 for it in whole for img in it["images"])
    first = MixtureDataset(m, **kw)
    head = ids(itertools.islice(iter(first), 17))
    resumed = MixtureDataset(m, **kw)  # resumes by ranged GETs at the sample offsets the .idx sidecars record
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    requests = []  # (method, path, Range header) of every S3 request, seen by the proxy in front of moto
    decide = fault_proxy.decide
    monkeypatch.setattr(fault_proxy, "decide", lambda *r: requests.append(r) or decide(*r))
    assert head + ids(resumed) == ids(whole)
    tar_gets = [r for r in requests if r[0] == "GET" and r[1].endswith(".tar")]
    assert tar_gets and all(r[2] for r in tar_gets)  # shards are read by ranges, never whole
    assert any(not r[2].startswith("bytes=0-") for r in tar_gets)  # and the resume starts mid-shard


def test_report_of_an_s3_output(corpora_on_s3, capsys):
    assert cli(["report", f"s3://{B}/out/caption"]) == 0
    assert capsys.readouterr().out.strip() == f"report: s3://{B}/out/caption/report.html"
    page = storage.read_bytes(f"s3://{B}/out/caption/report.html").decode()
    assert "<html" in page and "a red picture number" in page


def test_train_checkpoints_to_s3_and_resumes_from_them(manifest_uri, tmp_path):
    out = f"s3://{B}/runs/tiny"
    args = ["train", "--manifest", manifest_uri, "--config", "tiny", "--out", out, "--set", "checkpoint_every=2"]
    assert cli([*args, "--steps", "2"]) == 0
    run = keys("runs/tiny/")
    assert {"checkpoint/ckpt.pt", "config.json", "metrics.jsonl"} <= run
    assert [json.loads(x)["step"] for x in storage.read_bytes(f"{out}/metrics.jsonl").splitlines()] == [1, 2]
    assert cli([*args, "--steps", "3"]) == 2  # the checkpoint exists: --resume is needed
    assert cli([*args, "--steps", "3", "--resume"]) == 0
    rows = [json.loads(x) for x in storage.read_bytes(f"{out}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the same three steps in one go on local disk give the same losses: the resume continued the data exactly
    local = tmp_path / "one-go"
    assert cli(["train", "--manifest", manifest_uri, "--config", "tiny", "--out", str(local), "--steps", "3"]) == 0
    one_go = [json.loads(x) for x in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in one_go], rel=1e-5)
