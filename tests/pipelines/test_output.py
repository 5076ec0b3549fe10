"""An output folder is claimed by one run at a time, foreign files in it are refused and never touched, and a run with
nothing to keep still ends in a complete index.json."""

from __future__ import annotations

import json
import os
import time

import boto3
import pyarrow.parquet as pq
import pytest

from mm1data import lease
from mm1data.config import ConfigError
from mm1data.demo import make_text_corpus
from mm1data.lease import OutputLease
from mm1data.pipelines import run_pipeline
from mm1data.shards import read_index

FAST = ["filters=[]", "dedup.minhash.enabled=false", "shards.samples_per_shard=5"]


def text_input(tmp_path, n: int = 12):
    lines, _ = make_text_corpus(n, seed=1)
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def tree(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize(
    "foreign",
    [
        {"index.json": b'{"version": 1, "shards": []}'},
        {"text-000000.tar": b"someone else's shard"},
        {"text-000007.idx": b"\0" * 16},
        {"meta/part-000000.parquet": b"not ours"},
        {"index.json": b"{}", "text-000001.tar": b"x", "README.md": b"keep me"},
    ],
)
def test_an_output_holding_foreign_files_is_refused_and_left_as_it_was(tmp_path, foreign):
    out = tmp_path / "out"
    for name, data in foreign.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = tree(out)
    with pytest.raises(ConfigError, match="already holds files this run did not write") as e:
        run_pipeline("pipelines/text.yaml", text_input(tmp_path), str(out), FAST)
    assert any(name in str(e.value) for name in foreign)
    assert tree(out) == before  # nothing deleted, nothing overwritten, no _staging left behind


@pytest.mark.slow
def test_only_what_the_run_wrote_is_removed(ray_session, tmp_path):
    """Files of other tools and other corpora stay; a shard of this output's earlier, larger plan goes; a file that
    merely looks like our shard (no record of ours) stays; a foreign index.json that appears later is refused."""
    out = tmp_path / "out"
    out.mkdir()
    others = {"README.md": b"notes", "other-000000.tar": b"another corpus", ".tmp-sometool": b"partial, not ours"}
    for name, data in others.items():
        (out / name).write_bytes(data)
    inp = text_input(tmp_path, 30)
    first = run_pipeline("pipelines/text.yaml", inp, str(out), [*FAST, "shards.samples_per_shard=2"])
    assert len(first["shards"]) > 3
    # the same input, bigger shards (the per-row config is unchanged): fewer shards, the old extra ones removed
    (out / "text-000900.tar").write_bytes(b"looks like ours, is not")
    second = run_pipeline("pipelines/text.yaml", inp, str(out), FAST)
    names = {p.name for p in out.glob("text-*.tar")}
    assert names == {s["path"] for s in second["shards"]} | {"text-000900.tar"}
    assert all((out / name).read_bytes() == data for name, data in others.items())

    (out / "index.json").write_text(json.dumps({**second, "run_id": "someone-else"}))
    with pytest.raises(ConfigError, match="was not written by the run that staged"):
        run_pipeline("pipelines/text.yaml", inp, str(out), FAST)


def test_a_second_run_on_an_output_in_use_fails_clearly(tmp_path):
    out = tmp_path / "busy"
    with OutputLease(str(out)):
        with pytest.raises(ConfigError, match=r"in use by another mm1data run \(pid \d+ on .*since"):
            run_pipeline("pipelines/text.yaml", text_input(tmp_path), str(out), FAST)
    with OutputLease(str(out)):  # released: free again
        pass


def test_s3_lease_is_exclusive_expires_and_is_taken_over(s3_server, monkeypatch):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="leases")
    out = "s3://leases/corpus"
    with OutputLease(out) as held:
        with pytest.raises(ConfigError, match="in use by another mm1data run"):
            OutputLease(out).__enter__()
        held.check()
    # released: the object is gone and the next run gets it at once
    assert "Contents" not in s3.list_objects_v2(Bucket="leases", Prefix="corpus/_staging/lease.json")
    # a holder killed with -9 on another host: its lease stands until it expires, then it is taken over
    stale = {"owner": "dead", "host": "elsewhere", "pid": 1, "since": 0, "expires": time.time() + 30}
    s3.put_object(Bucket="leases", Key="corpus/_staging/lease.json", Body=json.dumps(stale).encode())
    with pytest.raises(ConfigError, match="lease expires in"):
        OutputLease(out).__enter__()
    stale["expires"] = time.time() - 1
    s3.put_object(Bucket="leases", Key="corpus/_staging/lease.json", Body=json.dumps(stale).encode())
    with OutputLease(out) as taken:
        taken.check()
    # a dead process on this host frees its lease without waiting
    stale.update(host=lease.socket.gethostname(), pid=2**22 + 12345, expires=time.time() + 60)
    s3.put_object(Bucket="leases", Key="corpus/_staging/lease.json", Body=json.dumps(stale).encode())
    with OutputLease(out):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("content", ["", "\n\n", '{"broken\n{"text": null}\n'])
def test_nothing_to_keep_still_gives_a_complete_index(ray_session, tmp_path, content):
    """An empty file, a file of blank lines, a file whose every row is dropped: no crash in the corpus-wide half."""
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    out = tmp_path / "out"
    index = run_pipeline("pipelines/text.yaml", str(p), str(out), FAST)
    assert index["shards"] == [] and index["totals"]["samples"] == 0
    rows = content.count("{")
    assert index["funnel"]["rows_in"] == rows and index["funnel"]["kept"] == 0
    assert pq.read_table(out / "meta").num_rows == rows
    assert read_index(str(out)) == index


@pytest.mark.slow
@pytest.mark.parametrize("content", ["", '{"broken\n{"texts": ["a"], "images": [null, null]}\n'])
def test_interleaved_with_nothing_to_keep_still_gives_a_complete_index(ray_session, tmp_path, content):
    """The interleaved kind too: no document, or only bad ones; meta_images/ is there with its columns."""
    p = tmp_path / "docs.jsonl"
    p.write_text(content)
    out = tmp_path / "out"
    overrides = ["clip.enabled=false", "filters=[]"]
    index = run_pipeline("pipelines/interleaved.yaml", str(p), str(out), overrides)
    rows = content.count("{")
    assert index["shards"] == [] and index["funnel"]["rows_in"] == rows and index["funnel"]["kept"] == 0
    assert pq.read_table(out / "meta").num_rows == rows
    images = pq.read_table(out / "meta_images")
    assert images.num_rows == 0 and {"key", "position", "url", "kept", "drop_reason"} <= set(images.column_names)
