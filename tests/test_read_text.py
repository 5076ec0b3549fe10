"""Reading text documents: jsonl/parquet/WARC/WET, stable keys, and a drop reason for every bad document."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm1data.config import ConfigError
from mm1data.read import TextInputConfig, plan_units, read_text_unit
from mm1data.schema import make_key

GOOD = "The river carried the old boat past the quiet village and the people watched it go."
ARTICLE = ["A garden of tall green trees grew behind the library.", "Every morning the painter walked to the harbor."]


def read_all(path, **kw) -> dict:
    cfg = TextInputConfig(path=str(path), **kw)
    out: dict = {}
    for u in plan_units(cfg):
        for batch in read_text_unit(u, cfg):
            for k, v in batch.items():
                out.setdefault(k, []).extend(v.tolist())
    return out


def test_jsonl_bad_documents_get_reasons_and_the_file_goes_on(tmp_path):
    p = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"text": GOOD, "id": "a", "lang": "en"}),
        json.dumps({"text": "   \n\t "}),
        json.dumps({"text": None}),
        "null",
        '{"text": "cut in the mid',
        json.dumps({"text": "".join(chr(i % 32) for i in range(500))}),
        '{"text": "a lone surrogate \\ud800 here"}',
        json.dumps({"text": "x" * 2000}),
        json.dumps({"text": 42}),
        json.dumps({"text": GOOD + " Again."}),
    ]
    p.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff\xfe bytes"}\n')
    out = read_all(p, id_col="id", max_bytes=1000, bytes_per_unit=200)
    assert out["drop_reason"] == [
        "",
        "empty_text",
        "empty_text",
        "malformed_row",
        "malformed_row",
        "binary_text",
        "text_utf8",
        "too_large",
        "not_text",
        "",
        "text_utf8",
    ]
    assert out["text"][0] == GOOD and out["text"][7] == "" and out["text_bytes"][7] == 2000
    assert out["id"][0] == "a" and json.loads(out["extra"][0]) == {"lang": "en"}
    starts = np.r_[0, np.cumsum([len(line.encode()) + 1 for line in lines])].tolist()
    assert out["src_row"] == starts  # the byte where each line starts
    assert out["key"] == [make_key("docs.jsonl", r) for r in starts]


def test_parquet_and_gz_and_missing_column(tmp_path):
    rows = [{"body": GOOD, "u": "http://x/1"}, {"body": "", "u": "http://x/2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    out = read_all(tmp_path / "a.parquet", text_col="body", url_col="u")
    assert out["drop_reason"] == ["", "empty_text"] and out["url"] == ["http://x/1", "http://x/2"]
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello there"}\n'))
    assert read_all(tmp_path / "b.jsonl.gz")["text"] == ["hello there"]
    with pytest.raises(ConfigError, match="input column 'text' not found.*input.text_col"):
        plan_units(TextInputConfig(path=str(tmp_path / "a.parquet")))


def test_a_large_document_reads_with_bounded_copies(tmp_path):
    big = ("word " * 1_000_000).strip()  # 5 MB
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": big}) + "\n")
    out = read_all(tmp_path / "big.jsonl")
    assert out["drop_reason"] == [""] and out["text_bytes"] == [len(big)]
    out = read_all(tmp_path / "big.jsonl", max_bytes=1_000_000)
    assert out["drop_reason"] == ["too_large"] and out["text"] == [""]


def test_a_50_mb_document_is_dropped_with_memory_a_small_multiple_of_it(tmp_path):
    import tracemalloc

    (tmp_path / "huge.jsonl").write_text(
        json.dumps({"text": "word " * 10_000_000}) + "\n" + json.dumps({"text": GOOD})
    )
    tracemalloc.start()
    try:
        out = read_all(tmp_path / "huge.jsonl")  # default input.max_bytes: 10 MB
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out["drop_reason"] == ["too_large", ""] and out["text_bytes"] == [50_000_000, len(GOOD)]
    assert out["text"] == ["", GOOD]  # the huge text is not carried on to staging
    assert peak < 5 * 50_000_000  # the read range, its decoded text, the line and the parsed string


def write_warc(path, gz: bool = True) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    w.write_record(w.create_warcinfo_record("x.warc", {"software": "test"}))
    w.write_record(w.create_warc_record("http://a.example/1", "conversion", payload=io.BytesIO(GOOD.encode())))
    paras = "".join(f"<p>{p}</p>" for p in ARTICLE)
    html = f"<html><body><nav>Home</nav><article>{paras}</article></body></html>".encode()
    http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
    w.write_record(w.create_warc_record("http://a.example/2", "response", payload=io.BytesIO(html), http_headers=http))
    img = StatusAndHeaders("200 OK", [("Content-Type", "image/jpeg")], protocol="HTTP/1.1")
    w.write_record(
        w.create_warc_record("http://a.example/3.jpg", "response", payload=io.BytesIO(b"\xff\xd8"), http_headers=img)
    )
    w.write_record(
        w.create_warc_record("http://a.example/4", "request", payload=io.BytesIO(b"GET / HTTP/1.1\r\n\r\n"))
    )
    w.write_record(w.create_warc_record("http://a.example/5", "conversion", payload=io.BytesIO(b"")))
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("name", ["crawl.warc.gz", "crawl.wet"])
def test_warc_and_wet_records(tmp_path, name):
    write_warc(tmp_path / name, gz=name.endswith(".gz"))
    out = read_all(tmp_path / name)
    # warcinfo and request records are not documents; the image response is a row that holds no text
    assert out["url"] == ["http://a.example/1", "http://a.example/2", "http://a.example/3.jpg", "http://a.example/5"]
    assert out["drop_reason"] == ["", "", "not_text", "empty_text"]
    assert out["text"][0] == GOOD
    assert out["text"][1] == "\n".join(ARTICLE)  # trafilatura kept the article only
    assert all(i.startswith("<urn:uuid:") for i in out["id"])
    without_html = read_all(tmp_path / name, html=False)
    assert without_html["drop_reason"][1] == "not_text"


def test_text_units_are_byte_ranges_planned_without_reading(tmp_path, monkeypatch):
    p = tmp_path / "d.jsonl"
    texts = [f"document number {i} " + "é" * i for i in range(25)]
    p.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    size = p.stat().st_size
    units = plan_units(TextInputConfig(path=str(p), bytes_per_unit=300))
    assert [(u.start, u.stop) for u in units] == [(a, min(a + 300, size)) for a in range(0, size, 300)]
    got = read_all(p, bytes_per_unit=300)
    assert got["text"] == texts
    starts = np.r_[0, np.cumsum([len((json.dumps({"text": t}, ensure_ascii=False) + "\n").encode()) for t in texts])]
    assert got["src_row"] == starts[:-1].tolist()  # each document's position: the byte where its line starts

    # gzip and WARC files are one unit each, planned from the listing (no read beyond the first 64 KB)
    import mm1data.storage as storage

    write_warc(tmp_path / "c.warc.gz")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(p.read_bytes()))
    reads = []
    real = storage.read_range
    monkeypatch.setattr(storage, "open_read", lambda *a: reads.append(a) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(storage, "read_range", lambda uri, a, b: reads.append((uri, a, b)) or real(uri, a, b))
    units = plan_units(TextInputConfig(path=str(tmp_path / "*.gz")))
    assert [(u.fmt, u.start, u.stop) for u in units] == [("warc", 0, 0), ("jsonl.gz", 0, 0)]
    assert all(b <= 65536 for _, _, b in reads)
