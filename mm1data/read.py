"""Input reading: list input files, cut them into work units (file + row range), read a unit into a batch.

Units are small and deterministic, so reading parallelises on Ray and every row has a stable key derived
from (input file relative to the input root, row number). Per-row problems become drop reasons here:
malformed_row (bad JSON line or CSV record), missing_url, caption_type (a list, object, number or bool where the
caption should be), caption_utf8 (invalid UTF-8), empty_caption (nothing visible: empty, whitespace, or only
control and format characters such as NUL); for text documents text_utf8, empty_text, binary_text, too_large,
not_text (a WARC record that holds no text).
"""

from __future__ import annotations

import csv
import datetime
import decimal
import gzip
import io
import json
import math
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from mm1data import storage
from mm1data.config import ConfigError, check
from mm1data.schema import make_key
from mm1data.stage import Batch

FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".csv": "csv",
    ".tsv": "tsv",
    ".warc": "warc",
    ".warc.gz": "warc",
    ".wet": "warc",
    ".wet.gz": "warc",
}


@dataclass(frozen=True)
class InputConfig:
    path: str = ""  # file, directory or glob, local or s3:// (the --input flag sets it)
    format: str = "auto"  # auto (by extension) | parquet | jsonl | jsonl.gz | csv | tsv
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: tuple[str, ...] | None = None  # kept in the sample json; None = every other column
    rows_per_unit: int = 2000  # rows per work unit (a Ray read task and its staging granularity)

    def __post_init__(self) -> None:
        check(self, "rows_per_unit", ge=1)
        check(self, "format", choices=("auto", "parquet", "jsonl", "jsonl.gz", "csv", "tsv"))

    def required_cols(self) -> tuple[str, ...]:
        return (self.url_col, self.caption_col)


@dataclass(frozen=True)
class TextInputConfig:
    path: str = ""  # file, directory or glob, local or s3:// (the --input flag sets it)
    format: str = "auto"  # auto (by extension) | parquet | jsonl | jsonl.gz | warc (.warc/.wet, optionally .gz)
    text_col: str = "text"
    id_col: str | None = None  # optional document id, kept in the sample json as `id`
    url_col: str | None = None  # optional source URL, kept as `url`
    extra_cols: tuple[str, ...] | None = None  # kept in the sample json; None = every other column
    rows_per_unit: int = 2000  # rows per work unit (a Ray read task and its staging granularity)
    max_bytes: int = 10_000_000  # a longer document is dropped as too_large (its text is not kept)
    html: bool = True  # WARC text/html responses: extract the main text with trafilatura (else not_text)

    def __post_init__(self) -> None:
        check(self, "rows_per_unit", ge=1)
        check(self, "max_bytes", ge=1)
        check(self, "format", choices=("auto", "parquet", "jsonl", "jsonl.gz", "warc"))

    def required_cols(self) -> tuple[str, ...]:
        return (self.text_col,)


@dataclass(frozen=True)
class Unit:
    """A deterministic slice of one input file: rows [start, stop), at bytes [byte_start, byte_stop) for text."""

    uri: str
    source: str  # the file's path relative to the input root: the namespace of its keys
    fmt: str
    start: int
    stop: int
    byte_start: int = 0
    byte_stop: int = 0
    row_groups: tuple[int, ...] = ()  # parquet
    header: tuple[str, ...] = ()  # csv/tsv


def detect_format(uri: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = uri.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext]
    return None


def list_inputs(cfg: InputConfig) -> list[tuple[str, str, str]]:
    """-> [(uri, source, fmt)] sorted; fails fast with a message naming the location."""
    if not cfg.path:
        raise ConfigError("no input: pass --input URI (or set input.path)")
    try:
        files = storage.list_files(cfg.path)
    except Exception as e:
        raise ConfigError(f"cannot read input location {cfg.path!r}: {e}") from e
    root = cfg.path
    if any(c in root for c in "*?["):
        root = root[: min(root.index(c) for c in "*?[" if c in root)]
        root = root.rsplit("/", 1)[0]
    elif len(files) == 1 and files[0] == cfg.path:
        root = cfg.path.rsplit("/", 1)[0] if "/" in cfg.path else ""
    out = []
    for f in files:
        fmt = detect_format(f, cfg.format)
        if fmt is None or os.path.basename(f).startswith((".", "_")):
            continue  # _SUCCESS, .crc and other non-data files in a dataset directory
        source = f[len(root) :].lstrip("/") if root and f.startswith(root) else os.path.basename(f)
        out.append((f, source, fmt))
    if not out:
        raise ConfigError(f"no input files found at {cfg.path!r} (parquet, jsonl[.gz], csv, tsv, warc[.gz], wet[.gz])")
    return out


# ---- planning ----------------------------------------------------------------------------------------------


class _Lines:
    """Line iterator over a binary stream that tracks the byte position (for exact unit boundaries)."""

    def __init__(self, f: io.BufferedIOBase) -> None:
        self.f, self.pos = f, 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = self.f.readline()
        if not line:
            raise StopIteration
        self.pos += len(line)
        return line.decode("utf-8", "surrogateescape")


def plan_units(cfg: InputConfig | TextInputConfig) -> list[Unit]:
    """Cut every input file into units of about cfg.rows_per_unit rows; checks the required columns exist."""
    units: list[Unit] = []
    for uri, source, fmt in list_inputs(cfg):
        try:
            units += _plan_file(uri, source, fmt, cfg)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"cannot read input file {uri!r}: {type(e).__name__}: {e}") from e
    return units


def _require(columns: list[str], cfg: InputConfig | TextInputConfig, uri: str) -> None:
    for col in cfg.required_cols():
        if col not in columns:
            names = " / ".join(f"input.{f.name}" for f in fields(cfg) if getattr(cfg, f.name) == col)
            raise ConfigError(
                f"input column {col!r} not found in {uri} (columns: {', '.join(map(str, columns))}); set {names}"
            )


def _plan_file(uri: str, source: str, fmt: str, cfg: InputConfig | TextInputConfig) -> list[Unit]:
    n = cfg.rows_per_unit
    if fmt == "warc":  # gzip members cannot be found without reading: the whole file is one unit
        if not isinstance(cfg, TextInputConfig):
            raise ConfigError(f"{uri}: WARC input is for text documents")
        count = sum(1 for _ in _warc_records(uri, html=False))
        return [Unit(uri, source, fmt, 0, count)] if count else []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with storage.open_seekable(uri) as f:
            md = pq.ParquetFile(f).metadata
            _require(md.schema.to_arrow_schema().names, cfg, uri)
            units, group, rows, start = [], [], 0, 0
            for g in range(md.num_row_groups):
                group.append(g)
                rows += md.row_group(g).num_rows
                if rows - start >= n or g == md.num_row_groups - 1:
                    units.append(Unit(uri, source, fmt, start, rows, row_groups=tuple(group)))
                    group, start = [], rows
            return [u for u in units if u.stop > u.start]
    if fmt == "jsonl.gz":  # gzip cannot seek: the whole file is one unit
        with gzip.open(storage.open_read(uri)) as f:
            count, first = 0, None
            for line in f:
                if line.strip():
                    first = first or line
                    count += 1
        _check_jsonl_first(first, cfg, uri)
        return [Unit(uri, source, fmt, 0, count)] if count else []
    with storage.open_read(uri) as raw:
        lines = _Lines(raw)
        header: tuple[str, ...] = ()
        if fmt in ("csv", "tsv"):
            reader = csv.reader(lines, delimiter="," if fmt == "csv" else "\t")
            header = tuple(next(reader, []))
            _require(list(header), cfg, uri)
            records: Iterator[Any] = reader
        else:
            records = (line for line in lines if line.strip())
        units, start, byte_start, row, first = [], 0, lines.pos, 0, None
        for rec in records:
            if first is None and fmt == "jsonl":
                first = rec
            row += 1
            if row - start >= n:
                units.append(Unit(uri, source, fmt, start, row, byte_start, lines.pos, header=header))
                start, byte_start = row, lines.pos
        if row > start:
            units.append(Unit(uri, source, fmt, start, row, byte_start, lines.pos, header=header))
    if fmt == "jsonl":
        _check_jsonl_first(first, cfg, uri)
    return units


def _check_jsonl_first(line: Any, cfg: InputConfig | TextInputConfig, uri: str) -> None:
    """The first record names the columns; a file whose first record lacks url or caption is a config error."""
    if line is None:
        return
    try:
        rec = json.loads(line)
    except ValueError:
        return  # a malformed first line is a per-row problem (malformed_row), not a config error
    if isinstance(rec, dict):
        _require(list(rec), cfg, uri)


# ---- reading -----------------------------------------------------------------------------------------------


def _text(value: Any) -> tuple[str, bool]:
    """-> (text, valid_utf8). bytes are decoded strictly; invalid bytes become U+FFFD and valid is False."""
    if value is None:
        return "", True
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), True
        except UnicodeDecodeError:
            return value.decode("utf-8", "replace"), False
    if not isinstance(value, str):
        return str(value), True
    try:
        value.encode("utf-8")
        return value, True
    except UnicodeEncodeError:  # lone surrogates from surrogateescape: the input bytes were not UTF-8
        # (surrogatepass: a JSON "\ud800" escape is a lone surrogate that surrogateescape cannot encode)
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), False


def _records(unit: Unit, html: bool = False) -> Iterator[dict[str, Any] | None]:
    """Yield one dict per input row of the unit (None for a row that cannot be parsed)."""
    if unit.fmt == "warc":
        yield from _warc_records(unit.uri, html)
        return
    if unit.fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with storage.open_seekable(unit.uri) as f:
            table = pq.ParquetFile(f).read_row_groups(list(unit.row_groups))
        # strings as raw bytes, so invalid UTF-8 becomes a drop reason instead of an exception
        cols = {
            name: (
                col.cast(pa.large_binary())
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                else col
            ).to_pylist()
            for name, col in zip(table.column_names, table.columns)
        }
        for i in range(table.num_rows):
            yield {name: values[i] for name, values in cols.items()}
        return
    if unit.fmt == "jsonl.gz":
        with gzip.open(storage.open_read(unit.uri)) as f:
            lines = (line.decode("utf-8", "surrogateescape") for line in f if line.strip())
            yield from (_json_record(line) for line in lines)
        return
    data = storage.read_range(unit.uri, unit.byte_start, unit.byte_stop)
    text = data.decode("utf-8", "surrogateescape")
    if unit.fmt == "jsonl":
        yield from (_json_record(line) for line in text.split("\n") if line.strip())
        return
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if unit.fmt == "csv" else "\t")
    for rec in reader:
        yield dict(zip(unit.header, rec)) if len(rec) == len(unit.header) else None


def _json_record(line: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read_unit(unit: Unit, cfg: InputConfig) -> Batch:
    """-> key, src_file, src_row, url, caption, extra (JSON of the kept extra columns), drop_reason."""
    keys, urls, caps, extras, reasons = [], [], [], [], []
    for i, rec in enumerate(_records(unit)):
        row = unit.start + i
        keys.append(make_key(unit.source, row))
        if rec is None:
            urls.append(""), caps.append(""), extras.append("{}"), reasons.append("malformed_row")
            continue
        url, url_ok = _text(rec.get(cfg.url_col))
        raw_cap = rec.get(cfg.caption_col)
        cap_type_ok = raw_cap is None or isinstance(raw_cap, (str, bytes))  # not a list, dict, number or bool
        cap, cap_ok = _text(raw_cap) if cap_type_ok else ("", True)
        extra_names = (
            cfg.extra_cols
            if cfg.extra_cols is not None
            else [k for k in rec if k not in (cfg.url_col, cfg.caption_col)]
        )
        extra = {k: _jsonable(rec.get(k)) for k in extra_names}
        reason = ""
        if not url.strip() or not url_ok:
            reason = "missing_url"
        elif not cap_type_ok:
            reason = "caption_type"
        elif not cap_ok:
            reason = "caption_utf8"
        elif _blank(cap):
            reason = "empty_caption"
        urls.append(url.strip()), caps.append(cap), extras.append(json.dumps(extra, ensure_ascii=False))
        reasons.append(reason)
    n = len(keys)
    if unit.stop - unit.start != n:  # the file changed since planning: keys would no longer be stable
        raise RuntimeError(
            f"{unit.uri}: expected {unit.stop - unit.start} rows at {unit.start}, read {n}; "
            "did the input change during the run?"
        )
    obj = lambda xs: np.array(xs, dtype=object) if xs else np.empty(0, dtype=object)  # noqa: E731
    return {
        "key": obj(keys),
        "src_file": obj([unit.source] * n),
        "src_row": np.arange(unit.start, unit.stop),
        "url": obj(urls),
        "caption": obj(caps),
        "extra": obj(extras),
        "drop_reason": obj(reasons),
    }


_INVISIBLE = frozenset(("Cc", "Cf", "Zs", "Zl", "Zp"))  # controls (NUL included), format characters, separators


def _blank(text: str) -> bool:
    """True when a caption has nothing visible: empty, whitespace, or only control/format characters (NUL, BEL,
    zero-width space, BOM...). Unassigned and private-use characters count as visible (a newer emoji is
    unassigned in an older Unicode database)."""
    if text.isprintable():  # the common case: printable means no C* or Z* character except the ASCII space
        return not text.strip()
    return all(unicodedata.category(c) in _INVISIBLE for c in text)


def _jsonable(v: Any) -> Any:
    """Any input value -> plain JSON data (json.dumps never fails on it, and writes no NaN or Infinity).

    str/bytes -> text (invalid UTF-8 as U+FFFD); NaN and infinities -> null; Decimal -> its exact string;
    timedelta (pyarrow durations) -> total seconds as a float; dates, times and timestamps -> ISO 8601; numpy
    scalars and arrays -> their Python values; maps (pyarrow gives lists of (key, value) pairs) -> lists of
    [key, value]; structs -> objects with string keys; sets -> lists; anything else -> str(v).
    """
    if v is None or isinstance(v, (bool, int, str, bytes)):
        return _text(v)[0] if isinstance(v, (str, bytes)) else v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {_text(k)[0] if isinstance(k, (str, bytes)) else str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, datetime.timedelta):  # before isoformat: pandas' Timedelta has one (an ISO 8601 duration)
        return v.total_seconds()
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (np.generic, np.ndarray)):
        return _jsonable(v.tolist())
    return str(v)


# ---- text documents ----------------------------------------------------------------------------------------

# control characters (not tab/newline/CR) and U+FFFD: a "document" made mostly of them is binary data
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
BINARY_SHARE = 0.1  # more than this share of such characters -> binary_text


def _warc_records(uri: str, html: bool, max_bytes: int = 0) -> Iterator[dict[str, Any]]:
    """Content records of a WARC/WET file (warcio): WET `conversion` text, `response`/`resource` bodies.

    Request, metadata and warcinfo records are not documents and are not rows. An HTML body becomes its main text
    (trafilatura, as datatrove's extractor) when `html`; any other non-text body is a row with reason not_text.
    """
    from warcio.archiveiterator import ArchiveIterator

    with storage.open_read(uri) as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type not in ("conversion", "response", "resource"):
                continue
            out: dict[str, Any] = {
                "url": rec.rec_headers.get_header("WARC-Target-URI") or "",
                "id": rec.rec_headers.get_header("WARC-Record-ID") or "",
            }
            if not html and not max_bytes:  # planning: count records only
                yield out
                continue
            ctype = (
                rec.http_headers.get_header("Content-Type") if rec.http_headers else rec.content_type
            ) or "text/plain"
            body = rec.content_stream().read(max_bytes + 1 if max_bytes else -1)
            if max_bytes and len(body) > max_bytes:
                out["_reason"] = "too_large"
            elif "html" in ctype.lower():
                out["text"] = _extract_html(body) if html else None
                out["_reason"] = "" if html else "not_text"
            elif ctype.lower().startswith("text/") or rec.rec_type == "conversion":
                out["text"] = body
            else:
                out["_reason"] = "not_text"
            yield out


def _extract_html(body: bytes) -> str:
    try:
        import trafilatura
    except ImportError as e:
        raise ImportError("WARC HTML extraction needs trafilatura: pip install 'mm1data[html]'") from e
    return trafilatura.extract(body, favor_precision=True, include_comments=False, deduplicate=True) or ""


def read_text_unit(unit: Unit, cfg: TextInputConfig) -> Batch:
    """-> key, src_file, src_row, text, text_bytes, url, id, extra, drop_reason (one row per document).

    Bad documents stay rows with a reason: text_utf8 (invalid UTF-8), empty_text (null, empty or whitespace),
    binary_text, too_large (over input.max_bytes; its text is not kept, so memory stays bounded), not_text.
    """
    cols: dict[str, list] = {k: [] for k in ("key", "text", "text_bytes", "url", "id", "extra", "drop_reason")}
    records = _warc_records(unit.uri, cfg.html, cfg.max_bytes) if unit.fmt == "warc" else _records(unit)
    for i, rec in enumerate(records):
        cols["key"].append(make_key(unit.source, unit.start + i))
        if rec is None:
            rec = {"_reason": "malformed_row"}
        raw = rec.get(cfg.text_col if unit.fmt != "warc" else "text")
        reason = rec.get("_reason", "")
        if raw is not None and not isinstance(raw, (str, bytes)):
            raw, reason = None, reason or "not_text"  # a number, list or object where the text should be
        if isinstance(raw, str):  # (no encoded copy of a long ASCII document just to measure it)
            size = len(raw) if raw.isascii() else len(raw.encode("utf-8", "surrogatepass"))
        else:
            size = len(raw or b"")
        text, ok = ("", True) if reason or size > cfg.max_bytes else _text(raw)
        if reason:
            pass
        elif size > cfg.max_bytes:
            reason = "too_large"
        elif not ok:
            reason, text = "text_utf8", ""
        elif not text.strip():
            reason = "empty_text"
        elif len(_BINARY.findall(text)) > BINARY_SHARE * len(text):
            reason, text = "binary_text", ""
        if unit.fmt == "warc":
            url, doc_id, extra = rec.get("url", ""), rec.get("id", ""), {}
        else:
            url = _text(rec.get(cfg.url_col))[0] if cfg.url_col else ""
            doc_id = _text(rec.get(cfg.id_col))[0] if cfg.id_col else ""
            own = {cfg.text_col, cfg.url_col, cfg.id_col}
            names = cfg.extra_cols if cfg.extra_cols is not None else [k for k in rec if k not in own]
            extra = {k: _jsonable(rec.get(k)) for k in names if not k.startswith("_")}
        cols["text"].append(text)
        cols["text_bytes"].append(size)
        cols["url"].append(url.strip())
        cols["id"].append(doc_id)
        cols["extra"].append(json.dumps(extra, ensure_ascii=False))
        cols["drop_reason"].append(reason)
    n = len(cols["key"])
    if unit.stop - unit.start != n:
        raise RuntimeError(
            f"{unit.uri}: expected {unit.stop - unit.start} rows at {unit.start}, read {n}; "
            "did the input change during the run?"
        )
    out = {k: np.array(v, dtype=object) if n else np.empty(0, dtype=object) for k, v in cols.items()}
    out["text_bytes"] = np.array(cols["text_bytes"], dtype=np.int64)
    out["src_file"] = np.array([unit.source] * n, dtype=object) if n else np.empty(0, dtype=object)
    out["src_row"] = np.arange(unit.start, unit.stop)
    return out
