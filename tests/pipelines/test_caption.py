"""The caption pipeline end to end on Ray: local HTTP images, every bad input, S3 via moto, kill -9 and rerun."""

from __future__ import annotations

import io
import json
import os
import tarfile

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import bad_routes, jpeg

from mm1data.demo import ImageServer, Route
from mm1data.pipelines import run_pipeline
from mm1data.schema import make_key
from mm1data.shards import read_index

TINY = [
    "clip.model=mm1data-tiny-clip",
    "clip.pretrained=null",
    "download.allow_private_hosts=true",
    "download.timeout_s=1",
    "download.backoff_s=0.05",
    "download.max_bytes=200000",
    "download.image_size=96",
]
FILTERS = "filters=[{name: caption_words, min: 2}, {name: image_min_side, min: 100}]"


def make_input(server: ImageServer, n_good: int = 24) -> tuple[list[dict], dict[str, str]]:
    """Rows and the drop reason each must get (by row index)."""
    rows, expect = [], {}
    for i in range(n_good):
        server.routes[f"/img/{i}.jpg"] = Route(jpeg(160 + 7 * i, 120 + 5 * i, seed=i))
        rows.append({"url": server.url(f"/img/{i}.jpg"), "caption": f"a picture number {i}", "id": i})
    server.routes.update(bad_routes())
    for path, reason in [
        ("/missing.jpg", "http_404"),
        ("/flaky.jpg", ""),
        ("/slow.jpg", "timeout"),
        ("/loop", "redirect_loop"),
        ("/page.html", "content_type"),
        ("/truncated.jpg", "decode_error"),
        ("/random.jpg", "decode_error"),
        ("/bomb.png", "decompression_bomb"),
        ("/big.jpg", "too_large"),
        ("/noai.jpg", "robots_optout"),
    ]:
        expect[len(rows)] = reason
        rows.append({"url": server.url(path), "caption": f"bad input {path}", "id": len(rows)})
    server.routes["/small.jpg"] = Route(jpeg(60, 60, seed=500))
    server.routes["/copy.jpg"] = server.routes["/img/0.jpg"]
    for url, caption, reason in [
        (server.url("/small.jpg"), "a small picture", "image_min_side"),
        (server.url("/img/1.jpg"), "one word", "dup_url"),
        (server.url("/copy.jpg"), "the same image again", "dup_image"),
        (server.url("/img/2.jpg"), "short", "caption_words"),
        (server.url("/img/3.jpg"), "", "empty_caption"),
    ]:
        expect[len(rows)] = reason
        rows.append({"url": url, "caption": caption, "id": len(rows)})
    return rows, expect


def check_output(out: str, rows: list[dict], expect: dict[int, str], source: str) -> dict:
    """Shards, meta and index agree with each other and with what each input row deserved."""
    index = read_index(out)
    kept = [i for i in range(len(rows)) if expect.get(i, "") == ""]
    assert index["totals"]["samples"] == index["funnel"]["kept"] == len(kept)
    meta = pq.read_table(os.path.join(out, "meta")).to_pylist()
    assert len(meta) == len(rows) and len({m["key"] for m in meta}) == len(rows)
    by_row = {m["src_row"]: m for m in meta}
    assert {i: by_row[i]["drop_reason"] for i in range(len(rows))} == {i: expect.get(i, "") for i in range(len(rows))}
    assert by_row[0]["key"] == make_key(source, 0)
    paths = [os.path.join(out, s["path"]) for s in index["shards"]]
    n_tar = 0
    for p, s in zip(paths, index["shards"]):
        with tarfile.open(p) as t:
            names = t.getnames()
        assert len(names) == 3 * s["num_samples"]
        n_tar += s["num_samples"]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert n_tar == len(samples) == len(kept)
    assert [s["__key__"] for s in samples] == [by_row[i]["key"] for i in kept]  # input order
    first = json.loads(samples[0]["json"])
    assert first["url"] == rows[0]["url"] and first["id"] == 0 and first["source"] == source
    assert first["width"] == 96 * first["orig_width"] // first["orig_height"] or first["height"] == 96
    assert isinstance(first["clip_score"], float) and samples[0]["txt"] == rows[0]["caption"].encode()
    # img2dataset's field names beside ours, in the sample json and in the score store
    assert (first["original_width"], first["original_height"]) == (first["orig_width"], first["orig_height"])
    assert first["status"] == "success" and first["error_message"] is None
    statuses = {m["drop_reason"]: (m["status"], m["error_message"]) for m in meta}
    assert statuses["http_404"] == ("failed_to_download", "http_404")
    assert statuses["decode_error"] == ("failed_to_resize", "decode_error")
    return index


@pytest.mark.slow
def test_caption_end_to_end_local(ray_session, server, tmp_path):
    import ray

    rows, expect = make_input(server)
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    out = str(tmp_path / "out")
    overrides = [*TINY, FILTERS, "shards.samples_per_shard=8", "input.rows_per_unit=10", "download.batch_size=8"]
    index = run_pipeline("pipelines/caption.yaml", str(inp), out, overrides)
    check_output(out, rows, expect, "in.parquet")
    assert len(index["shards"]) == 4 and index["funnel"]["rows_in"] == len(rows)  # 25 kept, 8 per shard
    assert index["funnel"]["dropped"]["decode_error"] == 2
    assert "random weights" in index["warnings"][0]
    assert index["config"]["filters"][0]["name"] == "caption_words"
    ds = ray.data.read_webdataset([os.path.join(out, s["path"]) for s in index["shards"]], decoder=None)
    assert ds.count() == index["totals"]["samples"]

    # the same command again: nothing is redone, the output is identical
    mtimes = {s["path"]: os.path.getmtime(os.path.join(out, s["path"])) for s in index["shards"]}
    hits = server.routes["/img/5.jpg"].hits
    again = run_pipeline("pipelines/caption.yaml", str(inp), out, overrides)
    assert again["shards"] == index["shards"] and server.routes["/img/5.jpg"].hits == hits
    assert mtimes == {s["path"]: os.path.getmtime(os.path.join(out, s["path"])) for s in again["shards"]}
    # more actors, threads or rows per call (a bigger cluster after a crash) still resume: they set how fast, not what
    faster = ["download.workers=1", "download.threads=3", "download.batch_size=4", "clip.workers=[1,2]"]
    again = run_pipeline("pipelines/caption.yaml", str(inp), out, [*overrides, *faster, "clip.batch_size=5"])
    assert again["shards"] == index["shards"] and server.routes["/img/5.jpg"].hits == hits

    with pytest.raises(Exception, match="different config"):
        run_pipeline("pipelines/caption.yaml", str(inp), out, [*overrides, "download.image_size=64"])


@pytest.mark.slow
def test_caption_s3_in_and_out(ray_session, server, tmp_path):
    """Input, output and CLIP weights on S3 (moto's server on 127.0.0.1, real boto3)."""
    import open_clip
    import torch

    from mm1data.scorers.clip import MODEL_CONFIGS

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="data")
    rows = []
    for i in range(12):
        server.routes[f"/s/{i}.jpg"] = Route(jpeg(200, 150, seed=100 + i))
        rows.append({"url": server.url(f"/s/{i}.jpg"), "caption": f"image number {i}"})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    s3.put_object(Bucket="data", Key="in/part-0.parquet", Body=buf.getvalue())
    open_clip.add_model_config(MODEL_CONFIGS)
    torch.manual_seed(0)
    model = open_clip.create_model("mm1data-tiny-clip", pretrained=None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    s3.upload_file(str(ckpt), "data", "models/tiny.pt")

    overrides = [*TINY, "filters=[]", "shards.samples_per_shard=5", "clip.pretrained=s3://data/models/tiny.pt"]
    index = run_pipeline("pipelines/caption.yaml", "s3://data/in/", "s3://data/out", overrides)
    assert index["totals"]["samples"] == 12 and len(index["shards"]) == 3 and index["warnings"] == []
    stored = json.loads(s3.get_object(Bucket="data", Key="out/index.json")["Body"].read())
    assert stored["shards"] == index["shards"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="out/")["Contents"]}
    assert {"out/caption-000000.tar", "out/caption-000002.idx", "out/meta/part-000000.parquet"} <= keys
    local = []
    for s in index["shards"]:
        path = tmp_path / s["path"]
        s3.download_file("data", f"out/{s['path']}", str(path))
        local.append(str(path))
    samples = list(wds.WebDataset(local, shardshuffle=False))
    assert [json.loads(x["json"])["url"] for x in samples] == [r["url"] for r in rows]
    scores = [json.loads(x["json"])["clip_score"] for x in samples]
    assert all(-1 <= s <= 1 for s in scores) and len(set(scores)) > 1


def blocklist(path, rows: list[dict]) -> str:
    """A blocklist parquet in the contract's schema (as `mm1data blocklist build` writes it)."""
    t = pa.table(
        {
            "kind": pa.array([r.get("kind", "image") for r in rows], pa.string()),
            "source": pa.array([r.get("source", f"eval/{i}.jpg") for i, r in enumerate(rows)], pa.string()),
            "sha256": pa.array([r.get("sha256") for r in rows], pa.string()),
            "phash": pa.array([r.get("phash") for r in rows], pa.int64()),
            "text": pa.array([r.get("text") for r in rows], pa.string()),
        }
    )
    pq.write_table(t.replace_schema_metadata({"mm1data": json.dumps({"blocklist": 1})}), str(path))
    return str(path)


@pytest.mark.slow
def test_caption_near_duplicate_images_and_references(ray_session, server, tmp_path):
    """Planted near-duplicates (recompressed, resized, cropped, brighter, colour-shifted) form clusters that keep
    their highest clip_score; look-alikes (mirrored, other pictures, a crop 12 bits away) stay. A second run with
    the first output and a blocklist as dedup.reference drops their images."""
    import hashlib

    from conftest import encode, near_copies, photo
    from PIL import ImageOps

    from mm1data.config import ConfigError
    from mm1data.phash import phash, to_hex

    pics = {s: photo(s) for s in (1, 3, 4, 5, 6, 7, 8)}
    near = {s: near_copies(pics[s]) for s in (1, 3, 4, 6, 8)}
    planted = [
        ("p3", encode(pics[3])),  # 0  cluster A: rows 0-3
        ("p3 q30", near[3]["q30"]),  # 1
        ("p3 resized", near[3]["resized"]),  # 2
        ("p3 shifted", near[3]["shifted"]),  # 3
        ("p3 mirrored", encode(ImageOps.mirror(pics[3]))),  # 4  a look-alike: stays
        ("p4", encode(pics[4])),  # 5  cluster B: rows 5-7
        ("p4 cropped", near[4]["cropped"]),  # 6
        ("p4 brighter", near[4]["brighter"]),  # 7
        ("p5", encode(pics[5])),  # 8
        ("p1", encode(pics[1])),  # 9
        ("p1 cropped", near[1]["cropped"]),  # 10  12 bits from p1 at 96 px: more than max_distance 8, stays
    ]
    rows = []
    for i, (name, data) in enumerate(planted):
        server.routes[f"/p/{i}.jpg"] = Route(data)
        rows.append({"url": server.url(f"/p/{i}.jpg"), "caption": f"planted picture {name}", "id": i})
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    out = str(tmp_path / "out")
    overrides = [*TINY, "filters=[{name: caption_words, min: 2}]", "input.rows_per_unit=4", "download.batch_size=4"]
    index = run_pipeline("pipelines/caption.yaml", str(inp), out, overrides)

    meta = {m["src_row"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    key = {r: m["key"] for r, m in meta.items()}
    score = {r: m["clip_score"] for r, m in meta.items()}

    def best(cluster: list[int]) -> int:  # the keep rule: highest clip_score, then input order
        return min(cluster, key=lambda r: (-score[r], r))

    a, b = best([0, 1, 2, 3]), best([5, 6, 7])
    want = {r: "" for r in range(len(planted))}
    want.update({r: "dup_near_image" for r in (0, 1, 2, 3) if r != a})
    want.update({r: "dup_near_image" for r in (5, 6, 7) if r != b})
    assert {r: m["drop_reason"] for r, m in meta.items()} == want
    clusters = {r: m["dup_image_cluster"] for r, m in meta.items()}
    assert clusters == {
        **{r: "" for r in want},
        **dict.fromkeys((0, 1, 2, 3), key[a]),
        **dict.fromkeys((5, 6, 7), key[b]),
    }
    assert index["funnel"]["dropped"] == {"dup_near_image": 5} and index["totals"]["samples"] == 6
    assert all(isinstance(m["phash"], int) for m in meta.values())
    samples = list(wds.WebDataset([os.path.join(out, s["path"]) for s in index["shards"]], shardshuffle=False))
    first = json.loads(samples[0]["json"])
    assert first["phash"] == to_hex(meta[min(r for r in want if want[r] == "")]["phash"]) and len(first["phash"]) == 16

    # dedup.reference: the first output and a blocklist (hashes of full-size eval images, as `blocklist build` makes)
    p7 = encode(pics[7])
    bl = blocklist(
        tmp_path / "eval.parquet",
        [
            {"phash": phash(pics[6])},  # p6 by pHash
            {"sha256": hashlib.sha256(p7).hexdigest()},  # p7 by its bytes only (an undecodable eval image)
            {"kind": "text", "text": "planted picture p8"},  # a text row: not an image
        ],
    )
    second = [
        ("p3 q60", near[3]["q60"]),  # 0  near the first output's kept p3: duplicate_of_reference
        ("p4 q60", near[4]["q60"]),  # 1  near the first output's kept p4
        ("p6 q30", near[6]["q30"]),  # 2  near a blocklist image: eval_contamination
        ("p7", p7),  # 3  a blocklisted sha256: eval_contamination
        ("p8", encode(pics[8])),  # 4  new: kept
        ("p8 q30", near[8]["q30"]),  # 5  its near-duplicate in this run
        ("p5 mirrored", encode(ImageOps.mirror(pics[5]))),  # 6  a look-alike of a reference image: kept
    ]
    rows2 = []
    for i, (name, data) in enumerate(second):
        server.routes[f"/q/{i}.jpg"] = Route(data)
        rows2.append({"url": server.url(f"/q/{i}.jpg"), "caption": f"second run {name}", "id": i})
    inp2 = tmp_path / "in2.parquet"
    pq.write_table(pa.Table.from_pylist(rows2), inp2)
    out2 = str(tmp_path / "out2")
    with pytest.raises(ConfigError, match="nowhere"):  # before anything starts
        run_pipeline("pipelines/caption.yaml", str(inp2), out2, [*overrides, f"dedup.reference=[{tmp_path}/nowhere]"])
    index2 = run_pipeline("pipelines/caption.yaml", str(inp2), out2, [*overrides, f"dedup.reference=[{out}, {bl}]"])
    meta2 = {m["src_row"]: m for m in pq.read_table(os.path.join(out2, "meta")).to_pylist()}
    s2 = {r: m["clip_score"] for r, m in meta2.items()}
    kept8 = min((4, 5), key=lambda r: (-s2[r], r))
    assert {r: m["drop_reason"] for r, m in meta2.items()} == {
        0: "duplicate_of_reference",
        1: "duplicate_of_reference",
        2: "eval_contamination",
        3: "eval_contamination",
        4: "" if kept8 == 4 else "dup_near_image",
        5: "" if kept8 == 5 else "dup_near_image",
        6: "",
    }
    assert index2["config"]["dedup"]["reference"] == [out, bl]
