"""Reading interleaved documents: OBELICS and MMC4 forms, WARC and HTML pages, a reason per bad document."""

from __future__ import annotations

import gzip
import io
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
    big = [{"texts": ["x" * 5000, None], "images": [None, "http://a.example/1.jpg"]}, OBELICS]
    pq.write_table(pa.Table.from_pylist(big), tmp_path / "big.parquet")  # a parquet row is read whole: capped after
    assert read_all(tmp_path / "big.parquet", max_bytes=4000)["drop_reason"] == ["too_large", ""]
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
    write_warc(tmp_path / "e.warc.gz")
    (tmp_path / "f.html").write_text('<base href="http://f.example/"><p>A page.</p><img src="a.png">')
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="interleaved")
    for name in ("d.jsonl", "e.warc.gz", "f.html"):
        s3.upload_file(str(tmp_path / name), "interleaved", f"docs/{name}")
    remote = read_all("s3://interleaved/docs/")
    local = read_all(tmp_path)
    assert remote == local and local["src_file"] == ["d.jsonl"] * 3 + ["e.warc.gz"] * 3 + ["f.html"]
    assert local["images"][-1] == [None, "http://f.example/a.png"]


def write_warc(path, gz: bool = True) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    def http(ctype: str) -> StatusAndHeaders:
        return StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")

    latin = "<html><body><nav><a href='/'>Home</a></nav><p>Caf\xe9 cr\xe8me on the terrace.</p>"
    latin += "<img src='img/cup.jpg' alt='A cup'></body></html>"
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    w.write_record(w.create_warcinfo_record("x.warc", {"software": "test"}))
    w.write_record(
        w.create_warc_record("http://a.example/q", "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n"))
    )
    w.write_record(
        w.create_warc_record(
            "http://a.example/fr/page",
            "response",
            payload=io.BytesIO(latin.encode("latin-1")),
            http_headers=http("text/html; charset=ISO-8859-1"),
        )
    )
    w.write_record(
        w.create_warc_record(
            "http://a.example/x.jpg", "response", payload=io.BytesIO(b"\xff\xd8\xff"), http_headers=http("image/jpeg")
        )
    )
    page = b"<p>Second page with text.</p><img srcset='//cdn.example/s.jpg 1x, //cdn.example/l.jpg 2x'>"
    w.write_record(
        w.create_warc_record(
            "https://b.example/", "response", payload=io.BytesIO(page), http_headers=http("text/html")
        )
    )
    data = buf.getvalue()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("name", ["crawl.warc.gz", "crawl.warc"])
def test_warc_pages(tmp_path, name):
    write_warc(tmp_path / name, gz=name.endswith(".gz"))
    out = read_all(tmp_path / name)
    assert out["src_row"] == [0, 1, 2]  # response/resource records are numbered; warcinfo and request are not
    assert out["drop_reason"] == ["", "not_html", ""]
    assert out["url"] == ["http://a.example/fr/page", "http://a.example/x.jpg", "https://b.example/"]
    assert out["texts"][0] == ["Caf\xe9 cr\xe8me on the terrace.", None]  # the header's charset, the nav removed
    assert out["images"][0] == [None, "http://a.example/fr/img/cup.jpg"] and out["alts"][0] == [None, "A cup"]
    assert out["images"][2] == [None, "https://cdn.example/l.jpg"]
    assert json.loads(out["extra"][0])["warc_record_id"].startswith("<urn:uuid:")
    assert out["key"] == [make_key(name, r) for r in range(3)]
    assert read_all(tmp_path / name, skip=[0, 1])["key"] == out["key"][2:]


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_warc_keeps_the_records_before(tmp_path, gz):
    from warcio.archiveiterator import ArchiveIterator

    data = write_warc(tmp_path / "whole.warc", gz=gz)
    archive = ArchiveIterator(io.BytesIO(data))
    last = [archive.get_record_offset() for _ in archive][-1]
    seen = set()
    for cut in range(last + 1, len(data) - 12, 7):  # cuts inside the last record (before a gzip member's footer)
        p = tmp_path / ("cut.warc.gz" if gz else "cut.warc")
        p.write_bytes(data[:cut])
        out = read_all(p)
        assert out["drop_reason"] == ["", "not_html", "truncated_warc"], cut
        assert out["texts"][0] == ["Caf\xe9 cr\xe8me on the terrace.", None] and out["src_row"] == [0, 1, 2]
        seen.add(json.loads(out["extra"][2])["error"].split()[0])
    assert seen  # the reason records what was wrong


def test_html_directory(tmp_path):
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "a.html").write_text(
        '<html><head><link rel="canonical" href="https://blog.example/posts/a"></head><body>'
        "<header><h1>Blog</h1></header><main><h2>A day out</h2><p>We walked along the river.</p>"
        '<img src="../pics/river.jpg" alt="River"><img data-src="/lazy.jpg" src="data:image/gif;base64,R0lG">'
        "</main><footer>(c) Blog</footer></body></html>"
    )
    (site / "b.htm").write_bytes(
        b'<html><head><meta charset="windows-1252"></head><body><p>Na\xefve \x93quotes\x94 here.</p>'
        b'<img src="rel/x.png"><img src="https://img.example/y.png"><p>Unclosed <b>bold <i>text</body>'
    )
    (site / "sub" / "empty.html").write_text("<html><body><nav>Only a menu</nav><script>x()</script></body></html>")
    (site / "notes.txt").write_text("not a page")
    out = read_all(site, files_per_unit=2)
    assert out["src_file"] == ["a.html", "b.htm", "sub/empty.html"] and out["src_row"] == [0, 1, 2]
    assert out["key"] == [make_key(s, 0) for s in out["src_file"]]
    assert out["drop_reason"] == ["", "", "empty_document"]
    assert out["url"] == ["https://blog.example/posts/a", "", ""]
    assert out["texts"][0] == ["A day out", "We walked along the river.", None, None]
    assert out["images"][0] == [None, None, "https://blog.example/pics/river.jpg", "https://blog.example/lazy.jpg"]
    assert out["alts"][0] == [None, None, "River", None]
    # no page URL: a relative image cannot be resolved and is marked; an absolute one is kept
    assert out["texts"][1] == ["Na\xefve \u201cquotes\u201d here.", None, None, "Unclosed bold text"]
    assert out["images"][1] == [None, "rel/x.png", "https://img.example/y.png", None]
    assert out["seg_reason"][1] == ["", "image_relative_url", "", ""]
    assert [u.fmt for u in plan_units(InterleavedInputConfig(path=str(site), files_per_unit=2))] == ["html", "html"]
    assert read_all(site, skip=[1], files_per_unit=2)["src_file"] == ["a.html", "sub/empty.html"]


def test_a_50mb_document_is_dropped_with_bounded_memory(tmp_path):
    """A 50 MB document in jsonl, in a WARC and as an HTML file is too_large (default max_bytes 10 MB), read in
    bounded pieces: the reading never holds a copy of it."""
    import tracemalloc

    big = "word " * 10_000_000
    (tmp_path / "j").mkdir()
    write_jsonl(tmp_path / "j" / "d.jsonl", [{"texts": [big], "images": [None]}, OBELICS])
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "big.html").write_text(f"<html><body><p>{big}</p></body></html>")
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(tmp_path / "big.warc.gz", "wb") as f:
        w = WARCWriter(f, gzip=True)
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        body = io.BytesIO(f"<p>{big}</p>".encode())
        w.write_record(w.create_warc_record("http://big.example/", "response", payload=body, http_headers=http))
    del big, body
    for path, reasons in (
        (tmp_path / "j", ["too_large", ""]),
        (tmp_path / "h", ["too_large"]),
        (tmp_path / "big.warc.gz", ["too_large"]),
    ):
        tracemalloc.start()
        out = read_all(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out["drop_reason"] == reasons
        assert peak < 40 << 20, (path, peak)  # under the document: max_bytes (10 MB) read at most, plus buffers
