"""Shards: atomic commit, deterministic bytes, offsets that point at samples, planning by count and bytes."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from mm1data.schema import CaptionSample, make_key
from mm1data.shards import TarShardWriter, build_index, plan_shards, read_index, read_offsets, write_index


def samples(n: int) -> list[CaptionSample]:
    return [CaptionSample(make_key("f", i), f"caption {i}", bytes([i]) * (100 + i), "jpg", {"i": i}) for i in range(n)]


def write(path: str, items: list[CaptionSample]):
    w = TarShardWriter(path)
    for s in items:
        w.write(s.to_members())
    assert not os.path.exists(path)  # nothing visible before commit
    return w.close()


def test_writer_commits_reads_back_and_is_deterministic(tmp_path):
    a, b = str(tmp_path / "c-000000.tar"), str(tmp_path / "c-000001.tar")
    info = write(a, samples(5))
    assert write(b, samples(5)).sha256 == info.sha256  # same samples, same bytes
    assert (info.path, info.num_samples, info.num_images, info.bytes) == ("c-000000.tar", 5, 5, os.path.getsize(a))
    with tarfile.open(a) as t:
        assert len(t.getnames()) == 15
    got = list(wds.WebDataset(a, shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples(5)]
    assert got[2]["txt"] == b"caption 2"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_offsets_seek_to_each_sample(tmp_path):
    path = str(tmp_path / "c-000000.tar")
    items = samples(4)
    write(path, items)
    offsets = read_offsets(str(tmp_path / "c-000000.idx"))
    assert len(offsets) == 5
    data = open(path, "rb").read()
    for i, s in enumerate(items):
        with tarfile.open(fileobj=io.BytesIO(data[offsets[i] : offsets[i + 1]])) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        assert CaptionSample.from_members(s.key, {k.split(".", 1)[1]: v for k, v in members.items()}) == s


def test_plan_shards_by_count_and_bytes():
    assert plan_shards([1] * 7, 3, 10**9) == [(0, 3), (3, 6), (6, 7)]
    assert plan_shards([5, 5, 5, 20, 1], 100, 10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert plan_shards([], 3, 10) == []


def test_index_round_trip(tmp_path):
    info = write(str(tmp_path / "c-000000.tar"), samples(3))
    index = build_index("caption", "c", [info], tokens=27, funnel={"kept": 3})
    write_index(str(tmp_path), index)
    back = read_index(str(tmp_path))
    assert back["totals"] == {"samples": 3, "images": 3, "tokens": 27, "bytes": info.bytes}
    assert back["shards"][0]["sha256"] == info.sha256 and back["kind"] == "caption"


def test_sample_json_keeps_extra_columns_but_mm1data_fields_win():
    import json

    from mm1data.pipelines.caption import build_sample

    row = {
        "key": make_key("f", 0),
        "caption": "a cat",
        "image": b"\xff\xd8jpeg",
        "image_ext": "jpg",
        "url": "http://a/1.jpg",
        "width": 64,
        "clip_score": float("nan"),
        "drop_reason": "",
        "download_error": "",
        "src_file": "in.parquet",
        "src_row": 0,
        "extra": json.dumps({"source": "laion", "width": 9999, "license": "cc-by"}),
    }
    members, tokens = build_sample(row)
    meta = json.loads(members[f"{row['key']}.json"])
    assert meta == {
        "url": "http://a/1.jpg",
        "width": 64,
        "clip_score": None,
        "source": "in.parquet",
        "row": 0,
        "license": "cc-by",
    }
    assert members[f"{row['key']}.txt"] == b"a cat" and tokens == 5


def test_shard_uri_keeps_paths_inside_the_corpus():
    import pytest

    from mm1data.config import ConfigError
    from mm1data.shards import shard_uri

    assert shard_uri("/data/c", "c-000000.tar") == "/data/c/c-000000.tar"
    assert shard_uri("/data/c", "part/c-000000.idx") == "/data/c/part/c-000000.idx"
    assert shard_uri("s3://b/c", "c-000001.tar") == "s3://b/c/c-000001.tar"
    assert shard_uri("/data/c", "..tar.tar") == "/data/c/..tar.tar"  # dots inside a name are not a parent
    for bad in [
        "/etc/passwd",
        "/data/other/c-000000.tar",
        "../other/c-000000.tar",
        "..",
        "a/../../b.tar",
        "a/..",
        "./c.tar",
        "a//b.tar",
        "a/",
        "",
        "s3://other-bucket/c.tar",
        "file:///etc/passwd",
        "http://evil/x.tar",
        "C:\\\\data\\\\x.tar",
        "..\\\\..\\\\x.tar",
        "a\\\\b.tar",
        "c.tar\x00.idx",
        "c\n.tar",
        None,
        5,
        ["c.tar"],
    ]:
        with pytest.raises(ConfigError, match="not a plain relative path") as e:
            shard_uri("/data/c", bad, "/data/c/index.json")
        assert "/data/c/index.json" in str(e.value)


def test_corpus_names():
    import pytest

    from mm1data.config import ConfigError
    from mm1data.shards import check_corpus_name

    for good in ("caption", "text", "laion-2b", "c4_en.v2", "0", "A.b-c_d"):
        assert check_corpus_name(good) == good
    for bad in ("", "../x", "a/b", "/abs", "a\\\\b", "..", "a..b", ".hidden", "-x", "_x", "a b", "caption\n",
                "s3://b/x", "x" * 129, None, 3, "é"):  # fmt: skip
        with pytest.raises(ConfigError, match="corpus name"):
            check_corpus_name(bad)


@pytest.mark.parametrize("seed", range(5))
def test_shard_bytes_equal_what_tarfile_writes(tmp_path, seed):
    """The hand-written ustar headers give the archive tarfile itself gives for the same members (the same bytes,
    so the same sha256), for every size around the block and record boundaries."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(int(rng.integers(1, 40))):
        key = f"{int(rng.integers(0, 2**63)):016x}"
        n = int(rng.choice([0, 1, 511, 512, 513, 10239, 10240, 10241, int(rng.integers(0, 70000))]))
        samples.append({f"{key}.jpg": rng.bytes(n), f"{key}.json": b'{"i": %d}' % i, f"{key}.txt": "é".encode() * i})
    w = TarShardWriter(str(tmp_path / "mine.tar"))
    for members in samples:
        w.write(members)
    info = w.close()
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as ref:
        for members in samples:
            for name in sorted(members):
                t = tarfile.TarInfo(name)
                t.size, t.mtime, t.mode = len(members[name]), 0, 0o444
                ref.addfile(t, io.BytesIO(members[name]))
    assert (tmp_path / "mine.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert info.sha256 == hashlib.sha256((tmp_path / "ref.tar").read_bytes()).hexdigest()
