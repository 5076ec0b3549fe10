"""Input reading: formats, units, stable keys, per-row drop reasons and clear errors for bad locations."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm1data.config import ConfigError
from mm1data.read import InputConfig, plan_units, read_unit
from mm1data.schema import make_key

ROWS = [{"url": f"http://h/{i}.jpg", "caption": f"caption {i}", "id": i} for i in range(7)]


def read_all(path, **kw) -> dict:
    cfg = InputConfig(path=str(path), **kw)
    out: dict = {}
    for u in plan_units(cfg):
        for batch in read_unit(u, cfg):
            for k, v in batch.items():
                out.setdefault(k, []).extend(v.tolist())
    return out


def write(tmp_path, fmt: str, rows=ROWS):
    p = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=3)
    elif fmt in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        p.write_bytes(gzip.compress(data) if fmt.endswith("gz") else data)
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        p.write_text("\n".join(lines) + "\n")
    return p


def line_offsets(path) -> list[int]:
    """Where each line of a file starts: a plain jsonl row's src_row."""
    data = open(path, "rb").read()
    return [0] + [i + 1 for i, c in enumerate(data[:-1]) if c == ord("\n")]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "jsonl.gz", "csv", "tsv"])
def test_formats_read_the_same_rows_with_stable_keys(tmp_path, fmt):
    p = write(tmp_path, fmt)
    whole = read_all(p)
    units = plan_units(InputConfig(path=str(p), rows_per_unit=2, bytes_per_unit=50))
    assert len(units) == {"parquet": 3, "jsonl": 9}.get(fmt, 1)  # row groups; byte ranges cut inside lines
    split = read_all(p, rows_per_unit=2, bytes_per_unit=50)
    assert whole["url"] == split["url"] == [r["url"] for r in ROWS]
    assert whole["caption"] == [r["caption"] for r in ROWS]
    assert whole["key"] == split["key"] and len(set(whole["key"])) == 7
    assert all(len(k) == 16 and all(c in "0123456789abcdef" for c in k) for k in whole["key"])
    assert whole["src_row"] == (line_offsets(p) if fmt == "jsonl" else list(range(7)))
    assert whole["key"] == [make_key(f"in.{fmt}", r) for r in whole["src_row"]]
    assert json.loads(whole["extra"][3])["id"] in (3, "3")
    assert whole["drop_reason"] == [""] * 7


@pytest.mark.parametrize("step", [1, 7, 50, 59, 60, 61, 1000])
def test_byte_ranges_give_every_line_to_exactly_one_unit(tmp_path, step):
    """Whatever the cut (inside a line, on a newline, right after one), each line is read once, by the unit where
    it starts, with the same key."""
    p = write(tmp_path, "jsonl")
    got = read_all(p, bytes_per_unit=step)
    assert got["url"] == [r["url"] for r in ROWS] and got["src_row"] == line_offsets(p)


def test_rows_already_staged_are_skipped_by_position(tmp_path):
    for fmt in ("parquet", "jsonl", "jsonl.gz", "csv"):
        p = write(tmp_path, fmt)
        cfg = InputConfig(path=str(p))
        rows = read_all(p)["src_row"]
        skip = rows[1::2]
        left = [r for u in plan_units(cfg) for b in read_unit(u, cfg, skip) for r in b["src_row"].tolist()]
        assert left == rows[0::2], fmt


def test_csv_quoted_newlines_split_exactly(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('url,caption\nhttp://a/1,"two\nlines"\nhttp://a/2,plain\nhttp://a/3,"x, y"\n')
    out = read_all(p, rows_per_unit=1)
    assert out["caption"] == ["two\nlines", "plain", "x, y"]


def test_row_problems_become_drop_reasons(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(
        b'{"url": "http://a/1", "caption": "fine"}\n'
        b'{"url": "http://a/2", "caption": "bad \xff\xfe bytes"}\n'
        b'{"url": "http://a/3", "caption": "   "}\n'
        b'{"url": "http://a/4", "caption": null}\n'
        b'{"url": "http://a/5", "caption": "no close"\n'
        b'{"caption": "no url"}\n'
        b'{"url": "http://a/7", "caption": "last"}\n'
    )
    out = read_all(p)
    assert out["drop_reason"] == [
        "",
        "caption_utf8",
        "empty_caption",
        "empty_caption",
        "malformed_row",
        "missing_url",
        "",
    ]
    assert "\ufffd" in out["caption"][1]  # kept for inspection in the score store, never written to a shard


def test_invalid_utf8_in_parquet_binary_column(tmp_path):
    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"url": ["http://a/1", "http://a/2"], "caption": pa.array([b"ok", b"\xc3\x28"])}), p)
    assert read_all(p)["drop_reason"] == ["", "caption_utf8"]


def test_missing_column_is_a_clear_error(tmp_path):
    p = write(tmp_path, "parquet", [{"link": "http://a", "caption": "x"}])
    with pytest.raises(ConfigError, match="input column 'url' not found.*link"):
        plan_units(InputConfig(path=str(p)))
    assert read_all(p, url_col="link")["url"] == ["http://a"]


def test_unreadable_locations_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no input files found at"):
        plan_units(InputConfig(path=str(tmp_path / "nope")))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read input file"):
        plan_units(InputConfig(path=str(tmp_path / "x.parquet")))


def test_directory_and_glob_keys_use_relative_paths(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a", "b"):
        write(tmp_path / "d", "jsonl").rename(tmp_path / "d" / f"{name}.jsonl")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    by_dir, by_glob = read_all(tmp_path / "d"), read_all(str(tmp_path / "d" / "*.jsonl"))
    assert by_dir["src_file"][0] == "a.jsonl" and by_dir["src_file"][-1] == "b.jsonl"
    assert by_dir["key"] == by_glob["key"] and len(set(by_dir["key"])) == 14


def test_s3_inputs_of_every_format(s3_server, tmp_path):
    """jsonl, jsonl.gz, csv and parquet on S3 (moto's server, real boto3) read exactly like local files."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="inputs")
    for fmt in ("jsonl", "jsonl.gz", "csv", "parquet"):
        s3.upload_file(str(write(tmp_path, fmt)), "inputs", f"many/in.{fmt}")
    got = read_all("s3://inputs/many/", rows_per_unit=3, bytes_per_unit=100)
    assert got["src_file"][:: len(ROWS)] == ["in.csv", "in.jsonl", "in.jsonl.gz", "in.parquet"]
    assert got["url"] == [r["url"] for r in ROWS] * 4 and got["drop_reason"] == [""] * 28
    with pytest.raises(ConfigError, match="cannot read input location 's3://missing-bucket/x'"):
        plan_units(InputConfig(path="s3://missing-bucket/x"))


def test_every_input_record_is_read_or_counted(tmp_path):
    """A UTF-8 BOM, a .json file holding a JSON array, lines of separator characters, an RFC 7464 record separator:
    each record becomes a row (with a reason when it cannot be read); only lines of ASCII blanks are not records."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS[:3]).encode())
    assert read_all(bom)["drop_reason"] == ["", "", ""]
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbfurl,caption\nhttp://a/1,one\n")
    assert read_all(csv_bom)["url"] == ["http://a/1"]  # the BOM did not hide the column name

    arr = tmp_path / "list.json"
    arr.write_text(json.dumps(ROWS[:4] + [17, {"caption": "no url"}]))
    got = read_all(arr)
    assert got["url"][:4] == [r["url"] for r in ROWS[:4]] and got["src_row"] == list(range(6))
    assert got["drop_reason"] == ["", "", "", "", "malformed_row", "missing_url"]
    gz_arr = tmp_path / "list.json.gz"
    gz_arr.write_bytes(gzip.compress(json.dumps(ROWS[:2]).encode()))
    assert read_all(gz_arr)["url"] == [r["url"] for r in ROWS[:2]]

    odd = tmp_path / "odd.jsonl"
    lines = [json.dumps(ROWS[0]), "\x1e", "\x1c\x1d", "\u2028", "   \t", "", "\x1e" + json.dumps(ROWS[1]), "\x0c"]
    odd.write_text("\n".join(lines) + "\n")
    got = read_all(odd)
    # lines of separators are rows (malformed), the blank ones are not records, a json-seq record reads
    assert got["drop_reason"] == ["", "malformed_row", "malformed_row", "malformed_row", "", "malformed_row"]
    assert got["url"][4] == ROWS[1]["url"]


def test_a_huge_line_is_a_row_not_a_memory_blowup(tmp_path, monkeypatch):
    import mm1data.read as read

    monkeypatch.setattr(read, "MAX_RECORD_BYTES", 1000)
    big = json.dumps({"url": "http://a/big", "caption": "x" * 5000})
    for name, data in [("big.jsonl", None), ("big.jsonl.gz", "gz")]:
        body = (json.dumps(ROWS[0]) + "\n" + big + "\n" + json.dumps(ROWS[1]) + "\n").encode()
        (tmp_path / name).write_bytes(gzip.compress(body) if data else body)
        got = read_all(tmp_path / name, bytes_per_unit=64)
        assert got["drop_reason"] == ["", "too_large", ""] and got["url"][2] == ROWS[1]["url"], name


def test_captions_that_are_not_text_or_show_nothing_get_a_reason(tmp_path):
    rows = [
        ("fine caption", ""),
        (["a", "list"], "caption_type"),
        ({"text": "an object"}, "caption_type"),
        (42, "caption_type"),
        (3.5, "caption_type"),
        (True, "caption_type"),
        (False, "caption_type"),
        ([], "caption_type"),
        ("\x00", "empty_caption"),
        ("\x00\x00\x00", "empty_caption"),
        ("\x07\x08\x1b\x7f", "empty_caption"),
        (" \t\n\r\x0b\x0c ", "empty_caption"),
        ("\u200b\ufeff\u00ad", "empty_caption"),  # zero-width space, BOM, soft hyphen
        ("\u2028\u00a0\u3000", "empty_caption"),  # line separator, no-break and ideographic spaces
        ("\x85\x9f", "empty_caption"),  # C1 controls
        ("a\x00b", ""),  # controls inside text: the text is still there
        ("\x00 ok", ""),
        ("\U0001faea", ""),  # unassigned in this Unicode database (a newer emoji): visible
        ("\ue000", ""),  # private use: visible
    ]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"url": f"http://a/{i}", "caption": c}) + "\n" for i, (c, _) in enumerate(rows)))
    out = read_all(p)
    assert out["drop_reason"] == [r for _, r in rows]
    assert out["caption"][1] == "" and out["caption"][15] == "a\x00b"
    # the same from parquet: a number or a list column where the caption should be
    q = tmp_path / "c.parquet"
    pq.write_table(pa.table({"url": ["http://a/1", "http://a/2"], "caption": [[1, 2], [3]]}), q)
    assert read_all(q)["drop_reason"] == ["caption_type", "caption_type"]
    pq.write_table(pa.table({"url": ["http://a/1"], "caption": pa.array([7], pa.int64())}), q)
    assert read_all(q)["drop_reason"] == ["caption_type"]


def test_every_column_type_becomes_json(tmp_path):
    """Input columns of types the json writer does not know become JSON values instead of aborting the job:
    Decimal -> exact string, durations -> seconds, times and dates -> ISO 8601, maps -> [key, value] pairs."""
    import datetime
    import decimal

    import numpy as np

    from mm1data.read import TextInputConfig, _jsonable, read_text_unit

    n = 2
    cols = {
        "url": pa.array(["http://a/1", "http://a/2"]),
        "caption": pa.array(["one", "two"]),
        "dec": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(10, 2)),
        "dec256": pa.array([decimal.Decimal("-12345678901234567890.5"), decimal.Decimal("0")], pa.decimal256(40, 1)),
        "dur_s": pa.array([5, -3], pa.duration("s")),
        "dur_ns": pa.array([1500, None], pa.duration("ns")),
        "time": pa.array([3723000000, 0], pa.time64("us")),
        "time_ns": pa.array([3723000000001, 1], pa.time64("ns")),
        "date": pa.array([datetime.date(2020, 1, 2), None]),
        "ts": pa.array([1, 2], pa.timestamp("ns", tz="UTC")),
        "ts_ms": pa.array([0, 86_400_000], pa.timestamp("ms")),
        "struct": pa.array([{"x": 1, "y": "z"}, {"x": None, "y": "w"}]),
        "nested": pa.array(
            [{"s": {"d": decimal.Decimal("2.5")}}, None], pa.struct([("s", pa.struct([("d", pa.decimal128(4, 1))]))])
        ),
        "map": pa.array([[("a", 1), ("b", 2)], []], pa.map_(pa.string(), pa.int64())),
        "map_bin": pa.array([[(b"\xff", 1.5)], None], pa.map_(pa.binary(), pa.float64())),
        "list_struct": pa.array([[{"k": 1}, {"k": 2}], []]),
        "large_bin": pa.array([b"\x00\xff bytes", b"ok"], pa.large_binary()),
        "list_bin": pa.array([[b"a", b"\xc3\x28"], None], pa.list_(pa.binary())),
        "fixed": pa.array([b"ab", b"cd"], pa.binary(2)),
        "f16": pa.array([np.float16(1.5), np.float16("nan")], pa.float16()),
        "floats": pa.array([float("inf"), float("nan")]),
        "null": pa.array([None, None], pa.null()),
        "dict": pa.array(["a", "b"]).dictionary_encode(),
        "u64": pa.array([2**64 - 1, 0], pa.uint64()),
    }
    p = tmp_path / "types.parquet"
    pq.write_table(pa.table(cols), p)
    out = read_all(p)
    assert out["drop_reason"] == ["", ""]
    extra = [json.loads(e) for e in out["extra"]]
    for e in out["extra"]:
        json.loads(e, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    first, second = extra
    assert first["dec"] == "1.50" and second["dec"] is None and first["dec256"] == "-12345678901234567890.5"
    assert (first["dur_s"], second["dur_s"], first["dur_ns"]) == (5.0, -3.0, 1.5e-06)
    assert first["time"] == "01:02:03" and first["date"] == "2020-01-02" and second["date"] is None
    assert first["ts"].startswith("1970-01-01") and second["ts_ms"].startswith("1970-01-02")
    assert first["struct"] == {"x": 1, "y": "z"} and first["nested"] == {"s": {"d": "2.5"}}
    assert first["map"] == [["a", 1], ["b", 2]] and second["map"] == [] and first["map_bin"] == [["\ufffd", 1.5]]
    assert first["list_struct"] == [{"k": 1}, {"k": 2}]
    assert first["large_bin"] == "\x00\ufffd bytes" and first["list_bin"] == ["a", "\ufffd("]
    assert first["fixed"] == "ab" and first["f16"] == 1.5 and second["f16"] is None
    assert first["floats"] is None and second["floats"] is None
    assert first["null"] is None and first["dict"] == "a"
    assert first["u64"] == 2**64 - 1
    assert len(extra) == n
    # the text reader shares the conversion
    t = tmp_path / "docs.parquet"
    pq.write_table(
        pa.table({"text": ["a document"], "dec": pa.array([decimal.Decimal("3.14")], pa.decimal128(5, 2))}), t
    )
    cfg = TextInputConfig(path=str(t))
    batch = next(read_text_unit(plan_units(cfg)[0], cfg))
    assert json.loads(batch["extra"][0]) == {"dec": "3.14"}
    # values no input format produces still become JSON
    odd = [np.int64(3), np.float32(0.5), np.bool_(True), np.array([1, 2]), {1, 2}, complex(1, 2), object, b"\xff"]
    assert json.loads(json.dumps(_jsonable(odd))) == [
        3,
        0.5,
        True,
        [1, 2],
        [1, 2],
        "(1+2j)",
        "<class 'object'>",
        "\ufffd",
    ]
    keyed = _jsonable({b"k": 1, 2: "\udc80"})  # a lone surrogate (not UTF-8 input) must not break the UTF-8 json
    assert list(keyed) == ["k", "2"] and json.dumps(keyed, ensure_ascii=False).encode("utf-8")
