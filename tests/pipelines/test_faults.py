"""S3 that fails: a caption run, a text run and the loader give the same output through a proxy that answers 503
and cuts bodies mid-stream for a seeded share of requests (tests/faults.py) as without faults. The runs' workers
reach S3 through the same proxy (conftest starts Ray after pointing AWS_ENDPOINT_URL at it)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import boto3
import corpora
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg
from PIL import Image

from mm1data import storage
from mm1data.demo import Route, make_text_corpus
from mm1data.loader import MixtureDataset, MixtureLoader
from mm1data.manifest import load_manifest
from mm1data.pipelines import run_pipeline
from mm1data.schema import make_key
from mm1data.shards import read_index

# ServiceUnavailable: botocore retries it after ~50 ms (SlowDown, a throttling code, after ~1 s, doubling: tested
# in test_storage.py); both are 503s that standard mode retries.
FAULTS = {"rate_503": 0.25, "rate_cut": 0.1, "code": "ServiceUnavailable"}


TIMING = "download_time_s"  # the one field that differs between two runs of the same input (a caption run)


def outputs(uri: str) -> dict:
    """What a run produced, minus the output location, the run id and the download timings it records: index.json
    (shards without their bytes and sha256, which the timings change), every meta row, every sample's tar members."""
    index = read_index(uri)
    del index["config"]["output"], index["run_id"]
    shards = [{k: v for k, v in s.items() if k not in ("bytes", "sha256")} for s in index.pop("shards")]
    totals = {k: v for k, v in index.pop("totals").items() if k != "bytes"}
    meta = []
    for part in storage.list_files(storage.join(uri, "meta")):
        for m in pq.read_table(io.BytesIO(storage.read_bytes(part))).to_pylist():  # NaN -> None: NaN != NaN
            meta.append({k: None if v != v else v for k, v in m.items() if k != TIMING})
    samples = []
    for s in shards:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(uri, s["path"])))) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".json"):
                    data = {k: v for k, v in json.loads(data).items() if k != TIMING}
                samples.append((member.name, data))
    return {
        "index": index,
        "shards": shards,
        "totals": totals,
        "meta": sorted(meta, key=lambda m: m["key"]),
        "samples": samples,
    }


@pytest.fixture(scope="module")
def bucket(s3_server):
    boto3.client("s3").create_bucket(Bucket="flaky")
    return "s3://flaky"


@pytest.mark.slow
def test_caption_run_under_faults_gives_the_clean_output(ray_session, server, bucket, fault_proxy):
    """Input (a parquet file read by ranged GETs, a jsonl.gz streamed), staging, shards, meta and index.json all on
    S3 under faults. A caption run is not byte-identical from run to run (download timings are recorded), so the
    output is checked against what a clean run gives, row by row and member by member."""
    s3 = boto3.client("s3")
    rows = []
    for i in range(16):
        server.routes[f"/f/{i}.jpg"] = Route(jpeg(150, 120, seed=300 + i))
        rows.append({"url": server.url(f"/f/{i}.jpg"), "caption": f"flaky storage image {i}", "n": i})
    rows.append({"url": server.url("/f/0.jpg"), "caption": "a copy", "n": 99})  # dup_url
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows[:9]), buf, row_group_size=3)
    s3.put_object(Bucket="flaky", Key="cap-in/a.parquet", Body=buf.getvalue())
    body = gzip.compress("".join(json.dumps(r) + "\n" for r in rows[9:]).encode())
    s3.put_object(Bucket="flaky", Key="cap-in/b.jsonl.gz", Body=body)
    overrides = [
        "clip.enabled=false",
        "filters=[]",
        "download.allow_private_hosts=true",
        "download.image_size=64",
        "input.rows_per_unit=3",
        "download.batch_size=4",
        "shards.samples_per_shard=4",
    ]
    with fault_proxy.faults(**FAULTS, seed=1) as proxy:
        index = run_pipeline("pipelines/caption.yaml", f"{bucket}/cap-in/", f"{bucket}/cap-faulty", overrides)
    assert proxy.counts["503"] >= 5 and proxy.counts["cut"] >= 3, proxy.counts
    got = outputs(f"{bucket}/cap-faulty")
    where = [("a.parquet", i) for i in range(9)] + [("b.jsonl.gz", i) for i in range(8)]
    assert index["funnel"] == {"rows_in": 17, "downloaded": 17, "dropped": {"dup_url": 1}, "kept": 16}
    assert [s["num_samples"] for s in got["shards"]] == [4, 4, 4, 4] and got["totals"]["samples"] == 16
    meta = {(m["src_file"], m["src_row"]): m for m in got["meta"]}
    assert {w: meta[w]["drop_reason"] for w in where} == {
        w: "dup_url" if w == ("b.jsonl.gz", 7) else "" for w in where
    }
    members = dict(got["samples"])
    for (src, row), r in zip(where[:16], rows[:16]):
        key = make_key(src, row)
        assert members[f"{key}.txt"] == r["caption"].encode()
        assert (members[f"{key}.json"]["url"], members[f"{key}.json"]["n"]) == (r["url"], r["n"])
        assert Image.open(io.BytesIO(members[f"{key}.jpg"])).size == (80, 64)  # 150x120 at keep_ratio 64
    assert [name for name, _ in got["samples"]][::3] == [f"{make_key(s, r)}.jpg" for s, r in where[:16]]  # in order


@pytest.mark.slow
def test_text_run_under_faults_equals_the_clean_run(ray_session, bucket, fault_proxy):
    """A text run is deterministic to the byte: the run under faults (a jsonl.gz streamed and resumed after cuts, a
    jsonl read by ranged GETs, staging, MinHash dedup, shards) writes the shards of the clean run."""
    s3 = boto3.client("s3")
    lines, expect = make_text_corpus(60, seed=5)
    half = len(lines) // 2
    s3.put_object(
        Bucket="flaky", Key="txt-in/a.jsonl.gz", Body=gzip.compress(("\n".join(lines[:half]) + "\n").encode())
    )
    s3.put_object(Bucket="flaky", Key="txt-in/b.jsonl", Body=("\n".join(lines[half:]) + "\n").encode())
    overrides = ["input.rows_per_unit=20", "batch_size=16", "shards.samples_per_shard=10"]
    clean = run_pipeline("pipelines/text.yaml", f"{bucket}/txt-in/", f"{bucket}/txt-clean", overrides)
    with fault_proxy.faults(**FAULTS, seed=2) as proxy:
        faulty = run_pipeline("pipelines/text.yaml", f"{bucket}/txt-in/", f"{bucket}/txt-faulty", overrides)
    assert proxy.counts["503"] >= 5 and proxy.counts["cut"] >= 3, proxy.counts
    assert clean["funnel"]["rows_in"] == len(lines) and clean["totals"]["samples"] > 20
    assert faulty["shards"] == clean["shards"]  # text runs are deterministic to the byte
    assert outputs(f"{bucket}/txt-faulty") == outputs(f"{bucket}/txt-clean")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than CPUs here
def test_loader_under_faults_yields_the_same_samples(bucket, fault_proxy, tmp_path):
    corpora.write_mix(f"{bucket}/mix", {"caption": 30, "interleaved": 20, "text": 20}, per_shard=10)
    srcs = [
        {"name": k, "index": f"{bucket}/mix/{k}/index.json", "weight": w}
        for k, w in (("caption", 2), ("interleaved", 1), ("text", 1))
    ]
    m = load_manifest(corpora.write_manifest(str(tmp_path / "m.yaml"), srcs))
    kw = {"samples_per_epoch": 100, "shuffle_buffer": 8}

    def items(**extra):
        out = []
        for it in MixtureDataset(m, **kw, **extra):
            out.append(
                (
                    it["position"],
                    it["source"],
                    it["key"],
                    json.dumps(it["text"]),
                    [im.tobytes() for im in it["images"]],
                )
            )
        return out

    clean = items()
    with fault_proxy.faults(**FAULTS, seed=3) as proxy:
        assert items() == clean
        loader = MixtureLoader(MixtureDataset(m, **kw, decode_images=False, batch_size=5), 5, num_workers=2)
        assert [(it["position"], it["key"]) for b in loader for it in b] == [(p, k) for p, _, k, _, _ in clean]
    assert proxy.counts["503"] >= 5 and proxy.counts["cut"] >= 3, proxy.counts
