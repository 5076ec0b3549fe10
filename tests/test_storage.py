"""storage: files follow the umask; S3 reads and writes survive 503s and bodies cut mid-stream (a fault proxy)."""

from __future__ import annotations

import os
import stat

import pytest

from mm1data import storage
from mm1data.shards import TarShardWriter


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    """As other tools: 0666 & ~umask, not mkstemp's 0600 (a shared output folder was unreadable by the group)."""
    umask(mask)

    def mode_of(p) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    storage.write_bytes(str(tmp_path / "a" / "index.json"), b"{}")
    assert mode_of(tmp_path / "a" / "index.json") == mode
    fd, tmp = storage.create_temp(str(tmp_path))
    os.write(fd, b"x")
    os.close(fd)
    storage.put_file(tmp, str(tmp_path / "b" / "moved.bin"))
    assert mode_of(tmp_path / "b" / "moved.bin") == mode
    w = TarShardWriter(str(tmp_path / "c" / "c-000000.tar"))
    w.write({"0123456789abcdef.txt": b"hi"})
    w.close()
    assert mode_of(tmp_path / "c" / "c-000000.tar") == mode and mode_of(tmp_path / "c" / "c-000000.idx") == mode
    assert sorted(os.listdir(tmp_path / "c")) == ["c-000000.idx", "c-000000.tar"]  # no temp file left


# --- S3 under faults -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_bucket(s3_server, tmp_path_factory):
    """A bucket with a 3 MB object, a gzipped jsonl and a parquet file, written before any fault is on."""
    import gzip
    import io
    import json

    import boto3
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="faulty")
    data = np.random.default_rng(0).bytes(3 << 20)
    lines = [json.dumps({"i": i, "text": f"line {i} " + "x" * (i % 97)}) for i in range(20_000)]
    gz = gzip.compress("\n".join(lines).encode() + b"\n", compresslevel=1)
    buf = io.BytesIO()
    table = pa.table({"i": np.arange(50_000), "s": [f"row {i}" for i in range(50_000)]})
    pq.write_table(table, buf, row_group_size=10_000)
    for key, body in (("blob.bin", data), ("docs.jsonl.gz", gz), ("t.parquet", buf.getvalue()), ("empty", b"")):
        s3.put_object(Bucket="faulty", Key=key, Body=body)
    return {"blob": data, "lines": lines, "table": table}


def test_s3_reads_and_writes_survive_503s_and_cut_bodies(faulty_bucket, fault_proxy, tmp_path):
    """With 25% of requests answered 503 and 15% of bodies cut mid-stream, every storage call returns exactly
    the bytes it would without faults (botocore retries the requests, storage the cut bodies, and a streamed
    GET resumes where it was cut). The 503s say ServiceUnavailable, which botocore backs off from in ~50 ms
    (SlowDown: the next test)."""
    import gzip

    import numpy as np
    import pyarrow.parquet as pq

    blob, rng = faulty_bucket["blob"], np.random.default_rng(1)
    with fault_proxy.faults(rate_503=0.25, rate_cut=0.15, seed=7, code="ServiceUnavailable") as proxy:
        assert storage.read_bytes("s3://faulty/blob.bin") == blob
        for _ in range(15):
            a = int(rng.integers(0, len(blob)))
            b = int(rng.integers(a, min(len(blob), a + 200_000) + 1))
            assert storage.read_range("s3://faulty/blob.bin", a, b) == blob[a:b]
        for _ in range(3):
            with storage.open_read("s3://faulty/blob.bin") as f:
                assert f.read() == blob
        with gzip.open(storage.open_read("s3://faulty/docs.jsonl.gz")) as f:
            assert [line.decode().rstrip("\n") for line in f] == faulty_bucket["lines"]
        with storage.open_read("s3://faulty/empty") as f:
            assert f.read() == b""
        with storage.open_seekable("s3://faulty/t.parquet") as f:
            assert pq.read_table(f).equals(faulty_bucket["table"])
        for i in range(5):
            storage.write_bytes(f"s3://faulty/out/{i}.bin", blob[i : i + 100_000])
        local = tmp_path / "up.bin"
        local.write_bytes(blob[:500_000])
        storage.put_file(str(local), "s3://faulty/out/up.bin")
        names = [f"s3://faulty/out/{i}.bin" for i in range(5)] + ["s3://faulty/out/up.bin"]
        for _ in range(3):
            assert storage.list_files("s3://faulty/out/") == names
        assert storage.list_files("s3://faulty/out/*.bin") == names
        assert storage.exists("s3://faulty/out/up.bin") and not storage.exists("s3://faulty/out/none")
        assert dict(storage.list_sizes("s3://faulty/out/", recursive=False))["s3://faulty/out/up.bin"] == 500_000
        assert storage.read_bytes("s3://faulty/out/up.bin") == blob[:500_000]
        assert [storage.read_bytes(f"s3://faulty/out/{i}.bin") for i in range(5)] == [
            blob[i : i + 100_000] for i in range(5)
        ]
        assert open(storage.local_copy("s3://faulty/blob.bin", str(tmp_path / "cache")), "rb").read() == blob
    assert proxy.counts["503"] >= 5 and proxy.counts["cut"] >= 5, proxy.counts  # the faults did happen


def test_a_quarter_of_requests_slowed_down_passes_with_the_default_policy(faulty_bucket, fault_proxy):
    """The issue's case: 25% of requests answered 503 SlowDown (botocore's default of 3 attempts failed one request
    in 64; the proxy faults a request at most 3 times in a row, so here the 4th attempt always passes)."""
    blob = faulty_bucket["blob"]
    with fault_proxy.faults(rate_503=0.25, rate_cut=0.0, seed=3, code="SlowDown") as proxy:
        for i in range(8):
            assert (
                storage.read_range("s3://faulty/blob.bin", i * 1000, i * 1000 + 500) == blob[i * 1000 : i * 1000 + 500]
            )
        storage.write_bytes("s3://faulty/slow/a.bin", b"a")
        assert storage.list_files("s3://faulty/slow/") == ["s3://faulty/slow/a.bin"]
    assert proxy.counts["503"] >= 2, proxy.counts


def test_a_replaced_object_is_not_spliced_into_a_resumed_stream(faulty_bucket, fault_proxy):
    """open_read resumes with a ranged GET pinned to the first response's ETag: an object replaced in between
    fails (412) instead of returning the first half of one version and the second half of another."""
    import boto3
    import botocore.exceptions

    s3 = boto3.client("s3")
    s3.put_object(Bucket="faulty", Key="changing.bin", Body=b"a" * (3 << 20))
    f = storage.open_read("s3://faulty/changing.bin")
    assert f.read(1 << 20) == b"a" * (1 << 20)
    s3.put_object(Bucket="faulty", Key="changing.bin", Body=b"b" * (3 << 20))
    f.raw._close_body()  # as a cut connection would
    with pytest.raises(botocore.exceptions.ClientError, match="412|PreconditionFailed"):
        f.read()


@pytest.mark.parametrize(
    "env,policy",
    [
        ({}, ("standard", 10)),
        ({"AWS_RETRY_MODE": "adaptive"}, ("adaptive", 10)),
        ({"AWS_MAX_ATTEMPTS": "4"}, ("standard", 4)),
        ({"AWS_RETRY_MODE": "legacy", "AWS_MAX_ATTEMPTS": "2"}, ("legacy", 2)),
    ],
)
def test_retry_policy_from_the_standard_aws_settings(monkeypatch, env, policy):
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage.s3_retry_policy.cache_clear()
    storage.s3_client.cache_clear()
    try:
        assert storage.s3_retry_policy() == policy
        retries = storage.s3_client().meta.config.retries
        assert (retries["mode"], retries["total_max_attempts"]) == policy
    finally:
        storage.s3_retry_policy.cache_clear()
        storage.s3_client.cache_clear()


@pytest.mark.parametrize(
    "env", [{"AWS_RETRY_MODE": "sometimes"}, {"AWS_MAX_ATTEMPTS": "0"}, {"AWS_MAX_ATTEMPTS": "x"}]
)
def test_bad_retry_settings_are_config_errors(monkeypatch, env):
    from mm1data.config import ConfigError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    storage.s3_retry_policy.cache_clear()
    try:
        with pytest.raises(ConfigError, match=next(iter(env))):
            storage.s3_retry_policy()
    finally:
        storage.s3_retry_policy.cache_clear()
        storage.s3_client.cache_clear()
