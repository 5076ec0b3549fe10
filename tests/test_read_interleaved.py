"""Reading interleaved documents: OBELICS and MMC4 forms, WARC and HTML pages, a reason per bad document."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm1data.config import ConfigError
from mm1data.read import DOC_COLUMNS, InterleavedInputConfig, plan_units, read_interleaved_unit
from mm1data.schema import make_key

PAGE = "https://news.example/2024/story.html"
OBELICS = {
    "url": PAGE,
    "texts": ["A cat sat on the warm mat.", None, "It slept until noon.", None, None],
    "images": [None, "cat.jpg", None, "//cdn.example/b.png", "data:image/png;base64,iVBOR"],
    "lang": "en",
}


def read_all(path, skip=(), **kw) -> dict:
    cfg = InterleavedInputConfig(path=str(path), **kw)
    out: dict = {}
    for u in plan_units(cfg):
        for batch in read_interleaved_unit(u, cfg, skip):
            assert set(batch) == set(DOC_COLUMNS)
            for k, v in batch.items():
                out.setdefault(k, []).extend(v.tolist())
    return out


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_obelics_document_positions_urls_and_extra(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [OBELICS, {k: v for k, v in OBELICS.items() if k != "url"}])
    out = read_all(tmp_path / "d.jsonl")
    assert out["drop_reason"] == ["", ""]
    assert out["texts"][0] == OBELICS["texts"]
    # relative resolved against the document URL, protocol-relative takes its scheme, data: kept verbatim
    assert out["images"][0] == [
        None,
        "https://news.example/2024/cat.jpg",
        None,
        "https://cdn.example/b.png",
        "data:image/png;base64,iVBOR",
    ]
    assert out["alts"][0] == [None] * 5 and out["seg_reason"][0] == [""] * 5
    assert out["url"] == [PAGE, ""] and json.loads(out["extra"][0]) == {"lang": "en"}
    # without a document URL a relative image cannot be resolved: recorded at its position, the document kept
    assert out["images"][1][1] == "cat.jpg" and out["seg_reason"][1] == ["", "image_relative_url", "", "", ""]
    assert out["src_row"] == [0, len(json.dumps(OBELICS)) + 1]  # jsonl: the byte where the line starts
    assert out["key"] == [make_key("d.jsonl", r) for r in out["src_row"]]


def test_obelics_bad_documents_get_reasons(tmp_path):
    docs = [
        {"texts": ["a", None], "images": [None, "http://x.example/1.jpg"]},  # good
        {"texts": ["a", None], "images": [None]},  # lists of different lengths
        {"texts": ["a", "b"], "images": [None, "http://x.example/1.jpg"]},  # a position with both set
        {"texts": ["a", None], "images": [None, None]},  # a position with neither set
        {"texts": "a text", "images": []},  # not a list
        {"texts": [3], "images": [None]},  # not a string
        {"texts": [], "images": []},  # empty
        {"texts": ["  ", "\u200b"], "images": [None, None]},  # nothing visible
        {"texts": [None] * 1000, "images": [f"http://x.example/{i}.jpg" for i in range(1000)]},
        {"text": "no such columns"},
        {"texts": ["x" * 60_000], "images": [None]},  # over max_bytes
        {"texts": ["b", None], "images": [None, "ftp://x.example/2.jpg"]},  # another scheme: kept, marked
    ]
    p = tmp_path / "bad.jsonl"
    p.write_bytes("".join(json.dumps(d) + "\n" for d in docs).encode() + b'{"texts": ["cut in the mid\n')
    out = read_all(p, max_bytes=50_000, max_images=256)
    assert out["drop_reason"] == [
        "",
        "bad_segments",
        "bad_segments",
        "bad_segments",
        "bad_segments",
        "bad_segments",
        "empty_document",
        "empty_document",
        "too_many_images",
        "bad_segments",
        "too_large",
        "",
        "malformed_row",
    ]
    assert all(out[c][i] == [] for c in ("texts", "images", "alts", "seg_reason") for i in range(1, 11))
    assert out["seg_reason"][11] == ["", "image_bad_url"]


def test_mmc4_positions_follow_matched_sentences(tmp_path):
    doc = {
        "url": "http://blog.example/post",
        "text_list": ["First sentence.", "Second sentence.", "Third."],
        "image_info": [
            {"raw_url": "http://img.example/b.jpg", "matched_text_index": 2, "matched_sim": 0.31},
            {"raw_url": "/a.jpg", "matched_text_index": 0, "matched_sim": 0.25, "image_name": "a.jpg"},
            {"raw_url": "http://img.example/c.jpg", "matched_text_index": 2, "matched_sim": 0.22},
        ],
        "similarity_matrix": [[0.1]],
    }
    bad = [
        {**doc, "image_info": [{"raw_url": "http://x.example/1.jpg", "matched_text_index": 3}]},  # out of range
        {**doc, "image_info": [{"matched_text_index": 0}]},  # no raw_url
        {**doc, "text_list": "one string"},
        {**doc, "image_info": [{"raw_url": "http://x.example/1.jpg", "matched_text_index": "0"}]},
    ]
    write_jsonl(tmp_path / "mmc4.jsonl", [doc, *bad, {"text_list": ["Only text."], "image_info": None}])
    out = read_all(tmp_path / "mmc4.jsonl")
    assert out["drop_reason"] == ["", "bad_segments", "bad_segments", "bad_segments", "bad_segments", ""]
    assert out["texts"][0] == ["First sentence.", None, "Second sentence.", "Third.", None, None]
    assert out["images"][0] == [
        None,
        "http://blog.example/a.jpg",
        None,
        None,
        "http://img.example/b.jpg",
        "http://img.example/c.jpg",
    ]
    extra = json.loads(out["extra"][0])
    assert extra == {
        "similarity_matrix": [[0.1]],
        "image_info": [{"matched_sim": 0.25, "image_name": "a.jpg"}, {"matched_sim": 0.31}, {"matched_sim": 0.22}],
    }
    assert out["texts"][5] == ["Only text."] and out["images"][5] == [None]


def test_forms_and_formats_agree(tmp_path):
    """The same OBELICS documents in parquet, jsonl and jsonl.gz read alike; a file of neither form is a config error
    naming the columns to set."""
    docs = [OBELICS, {**OBELICS, "url": "http://other.example/x/", "lang": "fr"}] * 3
    write_jsonl(tmp_path / "a.jsonl", docs)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "c.parquet", row_group_size=2)
    out = read_all(tmp_path, rows_per_unit=2, bytes_per_unit=300)
    assert out["src_file"] == ["a.jsonl"] * 6 + ["b.jsonl.gz"] * 6 + ["c.parquet"] * 6
    assert out["src_row"][6:] == list(range(6)) * 2
    assert out["images"][6:12] == out["images"][:6] == out["images"][12:]
    assert out["texts"][:6] == out["texts"][12:] and out["extra"][:6] == out["extra"][12:]
    assert out["images"][1][1] == "http://other.example/x/cat.jpg"
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ConfigError, match="neither OBELICS columns .'texts' \\+ 'images'. nor MMC4"):
        plan_units(InterleavedInputConfig(path=str(tmp_path / "d.jsonl")))
    with pytest.raises(ConfigError, match="neither"):
        plan_units(InterleavedInputConfig(path=str(tmp_path / "c.parquet"), form="mmc4"))


def test_skip_leaves_out_staged_rows(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [OBELICS] * 4)
    whole = read_all(tmp_path / "d.jsonl")
    rest = read_all(tmp_path / "d.jsonl", skip=whole["src_row"][:3])
    assert rest["key"] == whole["key"][3:] and rest["src_row"] == whole["src_row"][3:]


def test_s3_input_reads_like_local(s3_server, tmp_path):
    import boto3

    write_jsonl(tmp_path / "d.jsonl", [OBELICS] * 3)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="interleaved")
    s3.upload_file(str(tmp_path / "d.jsonl"), "interleaved", "docs/d.jsonl")
    remote = read_all("s3://interleaved/docs/")
    local = read_all(tmp_path / "d.jsonl")
    assert remote == local
