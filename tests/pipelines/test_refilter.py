"""Percentile thresholds in a run and `mm1data refilter` end to end on Ray: exact kept keys, rows brought back, no
HTTP request, readable shards, refusals, rerun, S3."""

from __future__ import annotations

import io
import json
import os
import shutil

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import jpeg

from mm1data.cli import main
from mm1data.config import ConfigError
from mm1data.demo import ImageServer, Route
from mm1data.percentile import exact_threshold
from mm1data.pipelines import run_pipeline
from mm1data.refilter import refilter
from mm1data.schema import make_key
from mm1data.shards import read_index

TINY = [
    "clip.model=mm1data-tiny-clip",
    "clip.pretrained=null",
    "download.allow_private_hosts=true",
    "download.timeout_s=1",
    "download.backoff_s=0.05",
    "download.image_size=96",
    "shards.samples_per_shard=4",
]
SOURCE_CHAIN = "[{name: caption_words, min: 5}, {name: image_min_side, min: 100}, {name: clip_score, min: -1}]"
N_GOOD = 16


def words(n: int) -> str:
    return " ".join(f"w{j}" for j in range(n))


def make_rows(srv: ImageServer) -> list[dict]:
    """Rows 0-15: good images, caption of i + 1 words; 16: a 60 px image; 17: a 404; 18: row 10's URL again."""
    rows = []
    for i in range(N_GOOD):
        srv.routes[f"/img/{i}.jpg"] = Route(jpeg(160 + 4 * i, 130, seed=i))
        rows.append({"url": srv.url(f"/img/{i}.jpg"), "caption": words(i + 1)})
    srv.routes["/small.jpg"] = Route(jpeg(60, 60, seed=99))
    rows.append({"url": srv.url("/small.jpg"), "caption": words(10)})
    rows.append({"url": srv.url("/missing.jpg"), "caption": words(10)})
    rows.append({"url": srv.url("/img/10.jpg"), "caption": words(12)})
    return rows


def write_input(rows: list[dict], path) -> str:
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def hits(srv: ImageServer) -> int:
    return sum(r.hits for r in srv.routes.values())


def meta_by_row(out: str) -> dict[int, dict]:
    return {m["src_row"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}


def reasons(out: str) -> dict[int, str]:
    return {i: m["drop_reason"] for i, m in sorted(meta_by_row(out).items())}


def shard_keys(out: str) -> list[str]:
    index = read_index(out)
    return [s["__key__"] for s in wds.WebDataset([os.path.join(out, s["path"]) for s in index["shards"]])]


def keys(rows: list[int]) -> list[str]:
    return [make_key("in.parquet", i) for i in rows]


@pytest.fixture(scope="module")
def source(ray_session, tmp_path_factory):
    """A caption output: caption_words >= 5, image_min_side >= 100, clip_score (tiny CLIP, random weights) >= -1."""
    tmp = tmp_path_factory.mktemp("refilter")
    with ImageServer({}) as srv:
        rows = make_rows(srv)
        inp = write_input(rows, tmp / "in.parquet")
        out = str(tmp / "source")
        run_pipeline("pipelines/caption.yaml", inp, out, [*TINY, f"filters={SOURCE_CHAIN}"])
        yield {"out": out, "srv": srv, "tmp": tmp, "inp": inp}


def test_source_as_expected(source):
    expect = {i: "caption_words" if i < 4 else "" for i in range(N_GOOD)}
    expect.update({16: "image_min_side", 17: "http_404", 18: "dup_url"})
    assert reasons(source["out"]) == expect


def test_percentile_in_a_run(ray_session, tmp_path):
    """caption_words top 30% over the rows every per-row stage kept, before dedup: 17 rows (16 good, row 18's copy
    of row 10's URL with 12 words), rank ceil(17 * 0.7) = 12 of [1..11, 12, 12, 13..16] is 12 words. Row 10 (11
    words) falls under it, so row 18 is the first of that URL still kept, and dedup keeps it."""
    with ImageServer({}) as srv:
        inp = write_input(make_rows(srv), tmp_path / "in.parquet")
        out = str(tmp_path / "out")
        chain = "[{name: image_min_side, min: 100}, {name: caption_words, min_percentile: 70}]"
        index = run_pipeline("pipelines/caption.yaml", inp, out, [*TINY, "clip.enabled=false", f"filters={chain}"])
    expect = {i: "caption_words" if i < 11 else "" for i in range(N_GOOD)}
    expect.update({16: "image_min_side", 17: "http_404", 18: ""})
    assert reasons(out) == expect
    assert shard_keys(out) == keys([*range(11, 16), 18])
    record = {
        "filter": "caption_words",
        "min_percentile": 70.0,
        "threshold": 12.0,
        "population": 17,
        "dropped": 11,
    }
    assert index["thresholds"] == [record] and index["funnel"]["thresholds"] == [record]
    assert index["funnel"]["dropped"]["caption_words"] == 11
    assert read_index(out)["thresholds"] == [record]
    assert index["config"]["filters"][1]["min_percentile"] == 70.0

    # another percentile on the same output: the staged rows stand (the percentile is no part of their fingerprint),
    # only the corpus-wide half is redone. Top 50%: rank ceil(8.5) = 9 of the 17 is 10 words.
    chain = chain.replace("70", "50")
    with ImageServer({}) as srv:
        make_rows(srv)
        again = run_pipeline("pipelines/caption.yaml", inp, out, [*TINY, "clip.enabled=false", f"filters={chain}"])
        assert hits(srv) == 0
    assert again["thresholds"][0]["threshold"] == 10.0 and again["run_id"] == index["run_id"]
    assert shard_keys(out) == keys(range(9, 16))  # row 18 is row 10's URL again, and row 10 is kept now


def test_refilter_tighter(source, tmp_path):
    before = hits(source["srv"])
    new = str(tmp_path / "tight")
    chain = tmp_path / "chain.yaml"
    chain.write_text("- {name: caption_words, min: 8}\n- {name: image_min_side, min: 100}\n- {name: clip_score}\n")
    index = refilter(source["out"], str(chain), new)
    assert hits(source["srv"]) == before  # no download
    expect = {i: "caption_words" if i < 7 else "" for i in range(N_GOOD)}
    expect.update({16: "image_min_side", 17: "http_404", 18: "dup_url"})
    assert reasons(new) == expect
    assert shard_keys(new) == keys(range(7, 16))
    assert index["refiltered_from"]["output"] == source["out"]
    assert [c["name"] for c in index["config"]["filters"]] == ["caption_words", "image_min_side", "clip_score"]
    assert index["config"]["filters"][0]["min"] == 8
    # the same samples as the source's shards, byte for byte (the payload comes from the source's staging)
    old = {
        s["__key__"]: s
        for s in wds.WebDataset([os.path.join(source["out"], s["path"]) for s in read_index(source["out"])["shards"]])
    }
    for s in wds.WebDataset([os.path.join(new, x["path"]) for x in index["shards"]]):
        assert s["jpg"] == old[s["__key__"]]["jpg"] and s["txt"] == old[s["__key__"]]["txt"]
    assert not any(f.endswith(".parquet") and "image" in pq.read_schema(f).names for f in _files(new, "_staging/rows"))


def _files(root: str, sub: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, sub)) for f in fs]


def test_refilter_looser_brings_rows_back(source, tmp_path):
    """Rows the old chain dropped are decided again; the download failure stays; a row dropped before the CLIP
    scorer ran has no clip_score, so a chain that thresholds it gets not_scored."""
    before = hits(source["srv"])
    new = str(tmp_path / "loose")
    index = main_refilter(source["out"], "[{name: caption_words, min: 2}]", new)
    expect = {i: "" for i in range(N_GOOD)}
    expect.update({0: "caption_words", 16: "", 17: "http_404", 18: "dup_url"})
    assert reasons(new) == expect
    assert shard_keys(new) == keys([*range(1, 16), 16])
    assert index["funnel"]["kept"] == 16
    samples = list(wds.WebDataset([os.path.join(new, s["path"]) for s in index["shards"]]))
    from PIL import Image

    assert all(Image.open(io.BytesIO(s["jpg"])).size[0] > 0 for s in samples)
    assert json.loads(samples[0]["json"])["caption_words"] == 2

    scored = str(tmp_path / "loose_clip")
    refilter(source["out"], _chain(tmp_path, "[{name: caption_words, min: 2}, {name: clip_score, min: -1}]"), scored)
    expect.update({1: "not_scored", 2: "not_scored", 3: "not_scored", 16: "not_scored"})
    assert reasons(scored) == expect
    # a refiltered output is a source too: its not_scored rows are decided again (the payload stays the first's)
    again = str(tmp_path / "again")
    index = refilter(scored, _chain(tmp_path, "[{name: caption_words, min: 3}]"), again)
    assert index["refiltered_from"] == {
        "output": scored,
        "run_id": read_index(scored)["run_id"],
        "payload": source["out"],
    }
    assert shard_keys(again) == keys([*range(2, 16), 16])
    assert hits(source["srv"]) == before


def _chain(tmp_path, text: str) -> str:
    path = tmp_path / f"chain{abs(hash(text))}.yaml"
    path.write_text(text)
    return str(path)


def main_refilter(src: str, chain: str, new: str, *sets: str) -> dict:
    """Through the CLI, as a user runs it."""
    path = os.path.join(os.path.dirname(new), "chain.yaml")
    with open(path, "w") as f:
        f.write(chain)
    args = ["refilter", src, "--filters", path, "--output", new]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return read_index(new)


def test_refilter_clip_percentile(source, tmp_path):
    """clip_score top 50% over the rows the chain keeps before dedup: the threshold and the kept keys follow from the
    staged scores exactly."""
    new = str(tmp_path / "clip50")
    chain = "[{name: caption_words, min: 5}, {name: image_min_side, min: 100}, {name: clip_score, min_percentile: 50}]"
    no_dedup = ("dedup.url=false", "dedup.image_sha256=false", "dedup.near_image=false")  # row 18 copies row 10
    index = main_refilter(source["out"], chain, new, *no_dedup, "shards.samples_per_shard=100")
    meta = meta_by_row(source["out"])
    population = [*range(4, 16), 18]
    scores = np.array([meta[i]["clip_score"] for i in population], dtype=np.float32)
    t = exact_threshold(scores, 50, "min")
    kept = [i for i, s in zip(population, scores) if s >= np.float32(t)]
    assert len(kept) == 6  # 13 distinct random scores: rank ceil(6.5) = 7 is the lowest of the top 6
    assert index["thresholds"] == [
        {"filter": "clip_score", "min_percentile": 50.0, "threshold": t, "population": 13, "dropped": 7}
    ]
    assert shard_keys(new) == keys(kept)  # no dedup: row 18 (row 10's URL and image) stays if it passes
    assert len(index["shards"]) == 1


def test_refilter_refusals_and_rerun(source, tmp_path):
    chain = _chain(tmp_path, "[{name: caption_words, min: 6}]")
    with pytest.raises(ConfigError, match="must not be the source"):
        refilter(source["out"], chain, source["out"] + "/")
    with pytest.raises(ConfigError, match=r"dedup\.\* and shards\.\* keys .* got 'download.timeout_s'"):
        refilter(source["out"], chain, str(tmp_path / "x"), ["download.timeout_s=3"])
    with pytest.raises(ConfigError, match="no finished mm1data output"):
        refilter(str(tmp_path / "nothing"), chain, str(tmp_path / "y"))
    new = str(tmp_path / "again")
    first = refilter(source["out"], chain, new)
    tars = {s["path"]: os.stat(os.path.join(new, s["path"])).st_mtime_ns for s in first["shards"]}
    # a crash in the middle: the restage of the unit and index.json lost; the rerun finishes, keeping the shards
    os.remove(os.path.join(new, "index.json"))
    os.remove(os.path.join(new, "_staging", "staged.json"))
    for f in _files(new, "_staging/done"):
        os.remove(f)
    second = refilter(source["out"], chain, new)
    assert second["shards"] == first["shards"] and second["run_id"] == first["run_id"]
    assert {p: os.stat(os.path.join(new, p)).st_mtime_ns for p in tars} == tars  # committed shards not rewritten
    assert reasons(new)[4] == "caption_words" and reasons(new)[5] == ""  # 5 and 6 words
    with pytest.raises(ConfigError, match="different config"):
        refilter(source["out"], _chain(tmp_path, "[{name: caption_words, min: 7}]"), new)
    assert main(["refilter", source["out"], "--filters", chain, "--output", source["out"]]) == 2
    # a source whose run.json or index.json config is gone: a ConfigError naming it, before anything runs
    broken = tmp_path / "broken"
    shutil.copytree(source["out"], broken, ignore=shutil.ignore_patterns("*.tar", "rows"))
    os.remove(broken / "_staging" / "run.json")
    with pytest.raises(ConfigError, match=r"run\.json does not read"):
        refilter(str(broken), chain, str(tmp_path / "z"))
    (broken / "index.json").write_text(json.dumps({"kind": "caption"}))
    with pytest.raises(ConfigError, match="has no run config"):
        refilter(str(broken), chain, str(tmp_path / "z"))


def test_refilter_s3_round_trip(ray_session, s3_server, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="refilter")
    with ImageServer({}) as srv:
        rows = make_rows(srv)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        s3.put_object(Bucket="refilter", Key="in/in.parquet", Body=buf.getvalue())
        run_pipeline(
            "pipelines/caption.yaml",
            "s3://refilter/in/in.parquet",
            "s3://refilter/a",
            [*TINY, f"filters={SOURCE_CHAIN}"],
        )
        before = hits(srv)
        index = refilter("s3://refilter/a", _chain(tmp_path, "[{name: caption_words, min: 10}]"), "s3://refilter/b")
        assert hits(srv) == before
    stored = json.loads(s3.get_object(Bucket="refilter", Key="b/index.json")["Body"].read())
    assert stored == index and stored["refiltered_from"]["output"] == "s3://refilter/a"
    got = []
    for s in index["shards"]:
        path = tmp_path / s["path"]
        s3.download_file("refilter", f"b/{s['path']}", str(path))
        got += [x["__key__"] for x in wds.WebDataset([str(path)])]
    assert got == keys([*range(9, 16), 16])  # the 60 px image: no image_min_side in this chain


def test_refilter_text_kind(ray_session, tmp_path):
    """Text: rows brought back get their exact and MinHash hashes (the source hashed only the rows it kept), so the
    new output's dedup sees them; a filter the source did not run is computed from the staged text."""

    def doc(tag: str, n: int, last: str | None = None) -> str:
        w = [f"{tag}{j}" for j in range(n)]
        return " ".join(w[:-1] + [last or w[-1]]) + "."

    texts = [doc("alpha", 60), doc("beta", 40), doc("beta", 40), doc("beta", 40, "changed"), doc("gamma", 30)]
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    src, new = str(tmp_path / "src"), str(tmp_path / "new")
    run_pipeline("pipelines/text.yaml", str(inp), src, ["filters=[{name: gopher_words, min: 50}]"])
    assert list(reasons(src).values()) == ["", "gopher_words", "gopher_words", "gopher_words", "gopher_words"]

    chain = "[{name: gopher_words, min: 35}, {name: gopher_mean_word_length, max: 6.5}]"
    index = refilter(src, _chain(tmp_path, chain), new)
    meta = sorted(pq.read_table(os.path.join(new, "meta")).to_pylist(), key=lambda m: m["src_row"])
    assert [m["drop_reason"] for m in meta] == ["gopher_mean_word_length", "", "dup_text", "dup_near", "gopher_words"]
    assert meta[3]["dup_cluster"] == meta[1]["key"]  # the near copy's cluster is the document it copies
    assert meta[0]["gopher_mean_word_length"] == pytest.approx(6.8333, abs=1e-3)  # computed: not in the source
    samples = list(wds.WebDataset([os.path.join(new, s["path"]) for s in index["shards"]]))
    assert [s["txt"].decode() for s in samples] == [texts[1]]


def test_refilter_interleaved(ray_session, tmp_path):
    """Interleaved: document filters are decided again (a document brought back gets its finish: image set,
    repetition values, sizes); the position-level filters must stay as the source ran them."""
    with ImageServer() as srv:
        srv.routes["/a.jpg"] = Route(jpeg(200, 160, seed=1))
        srv.routes["/b.jpg"] = Route(jpeg(210, 160, seed=2))
        srv.routes["/small.jpg"] = Route(jpeg(60, 60, seed=3))
        u = srv.url
        rows = [
            {"url": "https://s.example/0", "texts": [words(10), None], "images": [None, u("/a.jpg")]},
            {"url": "https://s.example/1", "texts": [words(5), None], "images": [None, u("/b.jpg")]},
            {"url": "https://s.example/2", "texts": [words(10), None], "images": [None, u("/small.jpg")]},
        ]
        inp = write_input(rows, tmp_path / "docs.parquet")
        src = str(tmp_path / "src")
        pos = "{name: img_min_side, min: 100}"
        chain = f"[{pos}, {{name: doc_words, min: 8}}, {{name: doc_images, min: 1, max: 30}}]"
        overrides = ["download.allow_private_hosts=true", "clip.enabled=false", f"filters={chain}"]
        run_pipeline("pipelines/interleaved.yaml", inp, src, overrides)
        before = hits(srv)
        assert list(reasons(src).values()) == ["", "doc_words", "doc_images"]

        new = str(tmp_path / "new")
        chain = f"[{pos}, {{name: doc_words, min: 4}}, {{name: doc_images, min: 1, max: 30}}]"
        index = refilter(src, _chain(tmp_path, chain), new)
        assert list(reasons(new).values()) == ["", "", "doc_images"]
        meta = meta_by_row(new)
        assert meta[1]["images_kept"] == 1 and meta[1]["image_set"] != "" and meta[1]["doc_images"] == 1
        samples = list(wds.WebDataset([os.path.join(new, s["path"]) for s in index["shards"]]))
        assert [s["__key__"] for s in samples] == [make_key("docs.parquet", 0), make_key("docs.parquet", 1)]
        assert json.loads(samples[1]["json"])["segments"] == [{"text": words(5)}, {"image": 0}]
        assert samples[1]["0.jpg"][:2] == b"\xff\xd8"

        with pytest.raises(ConfigError, match="position-level filters .* img_min_side differs"):
            refilter(src, _chain(tmp_path, "[{name: img_min_side, min: 50}, {name: doc_images, min: 1}]"), new + "2")
        with pytest.raises(ConfigError, match="position-level filters .* img_min_side differs"):
            refilter(src, _chain(tmp_path, "[{name: doc_images, min: 1}]"), new + "3")
        assert hits(srv) == before


def test_redecide_reads_the_payload_only_for_a_filter_that_reads_it():
    # a part of 3 staged rows; its payload (the images) lives in the source's staging and costs a read per part
    from mm1data.filters import Filter, FilterConfig
    from mm1data.refilter import Plan, redecide
    from mm1data.registry import get_filter

    class ImageBytes(Filter):  # a filter that reads the payload
        name = "image_bytes"

        def score(self, batch):
            return np.array([len(b) for b in batch["image"]])

    part = pa.table({"key": ["a", "b", "c"], "caption": ["one two three", "one", "x y"], "drop_reason": ["", "", ""]})
    reads = []

    def payload() -> pa.Table:
        reads.append(1)
        return pa.table({"image": [b"A", b"B", b"C"]})

    def run(*filters) -> pa.Table:
        return redecide(part, Plan("src", "src", "new", ("image",), frozenset(), (), (), {}), list(filters), payload)

    t = run(get_filter("caption_words")(FilterConfig("caption_words", min=2)))  # captions only: no image is read
    assert reads == [] and t["drop_reason"].to_pylist() == ["", "caption_words", ""]
    assert "image" not in t.column_names and t["caption_words"].to_pylist() == [3, 1, 2]
    t = run(ImageBytes(FilterConfig("image_bytes", max=0)), get_filter("caption_words")(FilterConfig("caption_words")))
    assert reads == [1] and t["drop_reason"].to_pylist() == ["image_bytes"] * 3  # read once for the part
    assert "image" not in t.column_names
