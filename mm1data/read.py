"""Input reading: list input files, cut them into work units, read a unit as batches of rows.

Planning reads metadata only, so the driver holds O(files + units), never O(rows): a parquet file's footer (units of
whole row groups), a plain jsonl file's size (byte ranges: the reading task finds the line boundaries, a line belongs
to the unit where it starts) and the first 64 KB of a line file (its columns; whether a .json file is one JSON array).
A gzip, CSV/TSV, JSON-array or WARC file is one unit whose task counts its records as it reads them.

Every record has a stable position in its file, `src_row`: its row number (parquet, CSV, gzip, JSON array, WARC) or
the byte offset where its line starts (plain jsonl, which is cut by bytes). Its key is sha256(source # src_row)[:16],
so keys stay the same across reruns, unit sizes and cluster sizes. Per-row problems become drop reasons here:
malformed_row (bad JSON line or CSV record), too_large (a record over MAX_RECORD_BYTES, never held whole),
missing_url, caption_type (a list, object, number or bool where the caption should be), caption_utf8
(invalid UTF-8), empty_caption (nothing visible: empty, whitespace, or only control and format characters such as
NUL); for text documents text_utf8, empty_text, binary_text, too_large, not_text (a WARC record that holds no
text). A line of ASCII blanks is not a record; any other line is one.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import gzip
import hashlib
import io
import json
import math
import os
import re
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from mm1data import storage
from mm1data.config import ConfigError, check
from mm1data.html import extract_page, image_url_reason, resolve_image_url
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
    ".html": "html",  # interleaved input only: a directory of web pages
    ".htm": "html",
}
HEAD_BYTES = 64 << 10  # read at planning: the first record's columns, and whether a .json file is an array
MAX_RECORD_BYTES = 64 << 20  # a longer line or record is a row with too_large, consumed without being held whole
MAX_ARRAY_BYTES = 1 << 30  # a .json file holding one JSON array is parsed whole, so it has a cap
READ_BATCH = 4096  # rows per batch a reading task yields (a whole-file unit streams in batches)
BLANK = b" \t\r\n"  # a line of only these (spaces, tabs, CR) is not a record
TOO_LARGE = object()  # stands for a record over MAX_RECORD_BYTES


@dataclass(frozen=True)
class InputConfig:
    path: str = ""  # file, directory or glob, local or s3:// (the --input flag sets it)
    format: str = "auto"  # auto (by extension) | parquet | jsonl | jsonl.gz | csv | tsv
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: tuple[str, ...] | None = None  # kept in the sample json; None = every other column
    rows_per_unit: int = 2000  # parquet rows per work unit (whole row groups; a Ray read task)
    bytes_per_unit: int = 32 << 20  # plain jsonl bytes per work unit (gzip, CSV and WARC files are one unit each)

    def __post_init__(self) -> None:
        check(self, "rows_per_unit", ge=1)
        check(self, "bytes_per_unit", ge=1)
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
    rows_per_unit: int = 2000  # parquet rows per work unit (whole row groups; a Ray read task)
    bytes_per_unit: int = 32 << 20  # plain jsonl bytes per work unit (gzip and WARC files are one unit each)
    max_bytes: int = 10_000_000  # a longer document is dropped as too_large (its text is not kept)
    html: bool = True  # WARC text/html responses: extract the main text with trafilatura (else not_text)

    def __post_init__(self) -> None:
        check(self, "rows_per_unit", ge=1)
        check(self, "bytes_per_unit", ge=1)
        check(self, "max_bytes", ge=1)
        check(self, "format", choices=("auto", "parquet", "jsonl", "jsonl.gz", "warc"))

    def required_cols(self) -> tuple[str, ...]:
        return (self.text_col,)


@dataclass(frozen=True)
class InterleavedInputConfig:
    path: str = ""  # file, directory or glob, local or s3:// (the --input flag sets it)
    format: str = "auto"  # auto (by extension) | parquet | jsonl | jsonl.gz | warc | html
    form: str = "auto"  # auto (by the columns present) | obelics (texts + images) | mmc4 (text_list + image_info)
    texts_col: str = "texts"  # OBELICS: list of str | null
    images_col: str = "images"  # OBELICS: list of url | null, the same length
    url_col: str = "url"  # the document's URL (optional column)
    text_list_col: str = "text_list"  # MMC4: list of sentences
    image_info_col: str = "image_info"  # MMC4: list of {raw_url, matched_text_index, ...}
    extra_cols: tuple[str, ...] | None = None  # kept in the sample json; None = every other column
    rows_per_unit: int = 2000  # parquet rows per work unit (whole row groups; a Ray read task)
    bytes_per_unit: int = 32 << 20  # plain jsonl bytes per work unit (gzip and WARC files are one unit each)
    files_per_unit: int = 256  # HTML files per work unit
    max_bytes: int = 10_000_000  # a longer document (record, or HTML body) is dropped as too_large, never held whole
    max_images: int = 256  # a document with more images is dropped as too_many_images (none of them downloaded)

    def __post_init__(self) -> None:
        for name in ("rows_per_unit", "bytes_per_unit", "files_per_unit", "max_bytes", "max_images"):
            check(self, name, ge=1)
        check(self, "format", choices=("auto", "parquet", "jsonl", "jsonl.gz", "warc", "html"))
        check(self, "form", choices=("auto", "obelics", "mmc4"))

    def required_cols(self) -> tuple[str, ...]:
        return ()  # either form's columns: see form_of

    def form_of(self, columns: Iterable[str]) -> str | None:
        """The form of a record (or file) with these columns, or None when it has neither form's columns."""
        cols = set(columns)
        obelics = self.texts_col in cols and self.images_col in cols
        mmc4 = self.text_list_col in cols and self.image_info_col in cols
        if self.form == "obelics" or (self.form == "auto" and obelics):
            return "obelics" if obelics else None
        return "mmc4" if mmc4 else None


@dataclass(frozen=True)
class Unit:
    """A deterministic slice of one input file: parquet rows [start, stop), jsonl bytes [start, stop), or (stop 0)
    the whole file. `size` is the file's size at planning: a file that changes during the run is an error."""

    uri: str
    source: str  # the file's path relative to the input root: the namespace of its keys
    fmt: str
    start: int = 0
    stop: int = 0
    size: int = 0
    row_groups: tuple[int, ...] = ()  # parquet
    files: tuple[str, ...] = ()  # html: the unit's files (uri is then the input root; start/stop their positions)

    @property
    def id(self) -> str:
        """16 hex, stable across reruns: names the unit's staging folder."""
        return make_key(f"{self.source}#{self.fmt}", self.start * (1 << 40) + self.stop)


def detect_format(uri: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = uri.lower()
    for ext in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return FORMATS[ext]
    return None


AnyInputConfig = InputConfig | TextInputConfig | InterleavedInputConfig


def list_inputs(cfg: AnyInputConfig) -> list[tuple[str, str, str, int]]:
    """-> [(uri, source, fmt, size)] sorted; fails fast with a message naming the location."""
    if not cfg.path:
        raise ConfigError("no input: pass --input URI (or set input.path)")
    try:
        files = storage.list_sizes(cfg.path)
    except Exception as e:
        raise ConfigError(f"cannot read input location {cfg.path!r}: {e}") from e
    root = input_root(cfg.path, files)
    out = []
    for f, size in files:
        fmt = detect_format(f, cfg.format)
        if fmt is None or os.path.basename(f).startswith((".", "_")):
            continue  # _SUCCESS, .crc and other non-data files in a dataset directory
        if fmt == "html" and not isinstance(cfg, InterleavedInputConfig):
            continue  # web pages are documents of the interleaved kind only
        out.append((f, source_name(f, root), fmt, size))
    if not out:
        raise ConfigError(
            f"no input files found at {cfg.path!r} (parquet, jsonl[.gz], csv, tsv, warc[.gz], wet[.gz], html)"
        )
    return out


def input_root(path: str, files: list[tuple[str, int]]) -> str:
    """The folder that sources (the key namespaces) are relative to."""
    root = path
    if any(c in root for c in "*?["):
        root = root[: min(root.index(c) for c in "*?[" if c in root)]
        root = root.rsplit("/", 1)[0]
    elif len(files) == 1 and files[0][0] == path:
        root = path.rsplit("/", 1)[0] if "/" in path else ""
    return root


def source_name(uri: str, root: str) -> str:
    """A file's name as rows cite it (`source`): its path under the input root, else its base name."""
    return uri[len(root) :].lstrip("/") if root and uri.startswith(root) else os.path.basename(uri)


def units_digest(units: list[Unit]) -> str:
    """What the run's fingerprint (run.json) keeps of its units: their ids, hashed in order."""
    return hashlib.sha256("\n".join(u.id for u in units).encode()).hexdigest()


# ---- planning: metadata only ---------------------------------------------------------------------------------


def plan_units(cfg: AnyInputConfig) -> list[Unit]:
    """Cut every input file into units; checks that the required columns exist. Footers and heads are read in
    parallel threads (a crawl has tens of thousands of files). HTML files (interleaved input) are grouped
    `files_per_unit` to a unit in listing order; their bytes are not read at planning."""
    inputs = list_inputs(cfg)
    pages = [f for f in inputs if f[2] == "html"]
    with ThreadPoolExecutor(16) as pool:
        planned = list(pool.map(lambda f: _plan_file(*f, cfg), [f for f in inputs if f[2] != "html"]))
    units = [u for units in planned for u in units]
    if pages:
        root = input_root(cfg.path, [(f[0], f[3]) for f in pages])
        step = cfg.files_per_unit
        for a in range(0, len(pages), step):
            group = pages[a : a + step]
            units.append(Unit(root, group[0][1], "html", a, a + len(group), files=tuple(f[0] for f in group)))
    return units


def _plan_file(uri: str, source: str, fmt: str, size: int, cfg: AnyInputConfig) -> list[Unit]:
    try:
        return _plan(uri, source, fmt, size, cfg)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot read input file {uri!r}: {type(e).__name__}: {e}") from e


def _plan(uri: str, source: str, fmt: str, size: int, cfg: AnyInputConfig) -> list[Unit]:
    if size == 0:
        return []
    if fmt == "warc":
        if isinstance(cfg, InputConfig):
            raise ConfigError(f"{uri}: WARC input is for text and interleaved documents")
        return [Unit(uri, source, fmt, size=size)]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with storage.open_seekable(uri) as f:
            md = pq.ParquetFile(f).metadata
        _require(md.schema.to_arrow_schema().names, cfg, uri)
        units, group, rows, start = [], [], 0, 0
        for g in range(md.num_row_groups):
            group.append(g)
            rows += md.row_group(g).num_rows
            if rows - start >= cfg.rows_per_unit or g == md.num_row_groups - 1:
                units.append(Unit(uri, source, fmt, start, rows, size, tuple(group)))
                group, start = [], rows
        return [u for u in units if u.stop > u.start]
    head = _head(uri, fmt)
    if fmt.startswith("jsonl") and uri.lower().endswith((".json", ".json.gz")) and head.lstrip()[:1] == b"[":
        if size > MAX_ARRAY_BYTES:
            raise ConfigError(f"{uri}: a JSON array file over {MAX_ARRAY_BYTES >> 20} MB; write it as jsonl")
        return [Unit(uri, source, "json_array", size=size)]
    if fmt in ("csv", "tsv"):
        first = next(csv.reader(io.StringIO(head.decode("utf-8", "replace")), delimiter=_DELIM[fmt]), [])
        _require(first, cfg, uri)
        return [Unit(uri, source, fmt, size=size)]
    line = head.split(b"\n", 1)[0]
    if len(line) < len(head) or len(head) < HEAD_BYTES:  # a whole first line: check its columns
        _check_json_columns(line, cfg, uri)
    if fmt == "jsonl.gz":
        return [Unit(uri, source, fmt, size=size)]
    step = cfg.bytes_per_unit
    return [Unit(uri, source, fmt, a, min(a + step, size), size) for a in range(0, size, step)]


def _head(uri: str, fmt: str) -> bytes:
    """The first HEAD_BYTES of a file's content (decompressed for .gz), without a UTF-8 BOM."""
    data = storage.read_range(uri, 0, HEAD_BYTES)
    if fmt.endswith(".gz") or uri.lower().endswith(".gz"):
        data = zlib.decompressobj(wbits=47).decompress(data, HEAD_BYTES)  # 47: gzip or zlib header
    return data.removeprefix(b"\xef\xbb\xbf")


_DELIM = {"csv": ",", "tsv": "\t"}


def _require(columns: list[str], cfg: AnyInputConfig, uri: str) -> None:
    if isinstance(cfg, InterleavedInputConfig) and cfg.form_of(columns) is None:
        raise ConfigError(
            f"{uri} has neither OBELICS columns ({cfg.texts_col!r} + {cfg.images_col!r}) nor MMC4 columns "
            f"({cfg.text_list_col!r} + {cfg.image_info_col!r}) for input.form {cfg.form!r} (columns: "
            f"{', '.join(map(str, columns))[:500]}); set input.texts_col / input.images_col or input.text_list_col / "
            "input.image_info_col"
        )
    for col in cfg.required_cols():
        if col not in columns:
            names = " / ".join(f"input.{f.name}" for f in fields(cfg) if getattr(cfg, f.name) == col)
            raise ConfigError(
                f"input column {col!r} not found in {uri} (columns: {', '.join(map(str, columns))[:500]}); set {names}"
            )


def _check_json_columns(line: bytes, cfg: AnyInputConfig, uri: str) -> None:
    """The first record names the columns; a file whose first record lacks a required one is a config error."""
    rec = _json_record(line)
    if isinstance(rec, dict):  # a malformed first line is a per-row problem (malformed_row), not a config error
        _require(list(rec), cfg, uri)


# ---- records -------------------------------------------------------------------------------------------------


def _lines(
    f: io.BufferedIOBase, pos: int = 0, stop: int | None = None, limit: int | None = None
) -> Iterator[tuple[int, bytes | None]]:
    """(offset, line) for every line of a binary stream that starts before `stop`; the line is None when it is over
    `limit` bytes (default MAX_RECORD_BYTES; then it is consumed in pieces, never held whole)."""
    limit = limit or MAX_RECORD_BYTES
    while stop is None or pos < stop:
        line = f.readline(limit + 1)
        if not line:
            return
        n = len(line)
        if n > limit and not line.endswith(b"\n"):
            line = None
            while piece := f.readline(1 << 20):
                n += len(piece)
                if piece.endswith(b"\n"):
                    break
        yield pos, line
        pos += n


def _json_record(line: bytes) -> dict[str, Any] | None:
    """A JSON line -> its object, or None (not JSON, or not an object). A leading BOM or RFC 7464 record separator
    is allowed."""
    text = line.decode("utf-8", "surrogateescape").lstrip("\ufeff\x1e")
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _unchanged(unit: Unit) -> None:
    if unit.size and storage.size(unit.uri) != unit.size:
        raise RuntimeError(f"{unit.uri} changed since the run was planned (size {unit.size}); keys would shift")


def _records(
    unit: Unit, skip: Iterable[int] = (), html: bool = False, max_bytes: int = 0, line_limit: int | None = None
) -> Iterator[tuple]:
    """(src_row, record) for every record of the unit whose src_row is not in `skip`: record is a dict, None (a row
    that cannot be parsed) or TOO_LARGE (a line over `line_limit`). WARC records are dicts with `text` (or
    `_reason`), `url` and `id`."""
    skip = set(skip)
    if unit.fmt == "parquet":
        yield from ((i, r) for i, r in _parquet_records(unit) if i not in skip)
        return
    _unchanged(unit)
    if unit.fmt == "warc":
        yield from _warc_records(unit.uri, html, max_bytes, skip)
        return
    if unit.fmt == "jsonl":  # a byte range: the lines that start in it
        with storage.open_seekable(unit.uri, 8 << 20) as f:
            pos = unit.start
            if pos > 0:
                f.seek(pos - 1)
                if f.read(1) != b"\n":  # the range starts inside a line that belongs to the unit before
                    while piece := f.readline(1 << 20):
                        pos += len(piece)
                        if piece.endswith(b"\n"):
                            break
            for off, line in _lines(f, pos, unit.stop, line_limit):
                if off in skip or (line is not None and not line.strip(BLANK)):
                    continue
                yield off, TOO_LARGE if line is None else _json_record(line)
        return
    with storage.open_read(unit.uri) as raw:
        gz = unit.fmt == "jsonl.gz" or unit.uri.lower().endswith(".gz")
        f = gzip.GzipFile(fileobj=raw) if gz else raw
        if unit.fmt == "json_array":
            yield from ((i, r) for i, r in _array_records(unit.uri, f) if i not in skip)
        elif unit.fmt == "jsonl.gz":
            lines = (line for _, line in _lines(f, limit=line_limit) if line is None or line.strip(BLANK))  # in order
            for i, line in enumerate(lines):
                if i not in skip:
                    yield i, TOO_LARGE if line is None else _json_record(line)
        else:
            yield from ((i, r) for i, r in _csv_records(unit, (line for _, line in _lines(f))) if i not in skip)


def _parquet_records(unit: Unit) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_seekable(unit.uri) as f:
        table = pq.ParquetFile(f).read_row_groups(list(unit.row_groups))
    if table.num_rows != unit.stop - unit.start:
        raise RuntimeError(f"{unit.uri} changed since the run was planned (row groups {unit.row_groups})")
    # strings as raw bytes, so invalid UTF-8 becomes a drop reason instead of an exception
    cols = {
        name: (
            col.cast(pa.large_binary()) if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) else col
        ).to_pylist()
        for name, col in zip(table.column_names, table.columns)
    }
    for i in range(table.num_rows):
        yield unit.start + i, {name: values[i] for name, values in cols.items()}


def _array_records(uri: str, f: io.BufferedIOBase) -> Iterator[tuple[int, Any]]:
    data = f.read(MAX_ARRAY_BYTES + 1)
    if len(data) > MAX_ARRAY_BYTES:
        raise ValueError(f"{uri}: a JSON array over {MAX_ARRAY_BYTES >> 20} MB once decompressed; write it as jsonl")
    try:
        items = json.loads(data.decode("utf-8", "surrogateescape").lstrip("\ufeff"))
    except ValueError:
        items = None
    if not isinstance(items, list):  # a broken file: one malformed row stands for it (its records cannot be told)
        yield 0, None
        return
    for i, item in enumerate(items):
        yield i, item if isinstance(item, dict) else None


def _csv_records(unit: Unit, lines: Iterator[bytes | None]) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """CSV/TSV rows of a whole file (quoted fields may hold newlines); the first record is the header."""
    csv.field_size_limit(MAX_RECORD_BYTES)
    text = (("\n" if line is None else line.decode("utf-8", "surrogateescape")) for line in lines)
    reader = csv.reader(text, delimiter=_DELIM[unit.fmt])
    header: list[str] | None = None
    i = 0
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error:  # e.g. a NUL byte or an unterminated quote: this record only
            rec = None
        if rec == []:  # a blank line between records
            continue
        if header is None:
            header = [h.lstrip("\ufeff") for h in rec or []]
            continue
        yield i, dict(zip(header, rec)) if rec is not None and len(rec) == len(header) else None
        i += 1


def _batches(records: Iterator[tuple], size: int = READ_BATCH) -> Iterator[list[tuple]]:
    chunk: list[tuple] = []
    for r in records:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- rows ----------------------------------------------------------------------------------------------------


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


def read_unit(unit: Unit, cfg: InputConfig, skip: Iterable[int] = ()) -> Iterator[Batch]:
    """Batches of -> key, src_file, src_row, url, caption, extra (JSON of the kept extra columns), drop_reason;
    rows whose src_row is in `skip` (already staged) are left out."""
    for chunk in _batches(_records(unit, skip)):
        keys, urls, caps, extras, reasons = [], [], [], [], []
        for row, rec in chunk:
            keys.append(make_key(unit.source, row))
            if rec is None or rec is TOO_LARGE:
                urls.append(""), caps.append(""), extras.append("{}")
                reasons.append("malformed_row" if rec is None else "too_large")
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
        yield {
            "key": _obj(keys),
            "src_file": _obj([unit.source] * len(keys)),
            "src_row": np.array([row for row, _ in chunk], dtype=np.int64),
            "url": _obj(urls),
            "caption": _obj(caps),
            "extra": _obj(extras),
            "drop_reason": _obj(reasons),
        }


def _obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


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


def _warc_records(uri: str, html: bool, max_bytes: int, skip: set[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(record number, record) for the content records of a WARC/WET file (warcio): WET `conversion` text,
    `response`/`resource` bodies. Request, metadata and warcinfo records are not documents and are not numbered.

    An HTML body becomes its main text (trafilatura, as datatrove's extractor) when `html`; any other non-text body
    is a row with reason not_text. A skipped record's body is neither read nor extracted (a rerun's cheap path).
    """
    from warcio.archiveiterator import ArchiveIterator

    with storage.open_read(uri) as f:
        i = -1
        for rec in ArchiveIterator(f):
            if rec.rec_type not in ("conversion", "response", "resource"):
                continue
            i += 1
            if i in skip:
                continue
            out: dict[str, Any] = {
                "url": rec.rec_headers.get_header("WARC-Target-URI") or "",
                "id": rec.rec_headers.get_header("WARC-Record-ID") or "",
            }
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
            yield i, out


def _extract_html(body: bytes) -> str:
    try:
        import trafilatura
    except ImportError as e:
        raise ImportError("WARC HTML extraction needs trafilatura: pip install 'mm1data[html]'") from e
    return trafilatura.extract(body, favor_precision=True, include_comments=False, deduplicate=True) or ""


def read_text_unit(unit: Unit, cfg: TextInputConfig, skip: Iterable[int] = ()) -> Iterator[Batch]:
    """Batches of -> key, src_file, src_row, text, text_bytes, url, id, extra, drop_reason (a row per document).

    Bad documents stay rows with a reason: text_utf8 (invalid UTF-8), empty_text (null, empty or whitespace),
    binary_text, too_large (over input.max_bytes; its text is not kept, so memory stays bounded), not_text.
    """
    for chunk in _batches(_records(unit, skip, cfg.html, cfg.max_bytes)):
        cols: dict[str, list] = {k: [] for k in ("key", "text", "text_bytes", "url", "id", "extra", "drop_reason")}
        for row, rec in chunk:
            cols["key"].append(make_key(unit.source, row))
            if rec is None or rec is TOO_LARGE:
                rec = {"_reason": "malformed_row" if rec is None else "too_large"}
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
        out = {k: _obj(v) for k, v in cols.items()}
        out["text_bytes"] = np.array(cols["text_bytes"], dtype=np.int64)
        out["src_file"] = _obj([unit.source] * len(chunk))
        out["src_row"] = np.array([row for row, _ in chunk], dtype=np.int64)
        yield out


# ---- interleaved documents ---------------------------------------------------------------------------------

INTERLEAVED_BATCH = 256  # documents per batch (a document can hold max_bytes of text: batches stay small)
INTERLEAVED_BATCH_BYTES = 64 << 20  # ... and a batch is cut once its documents hold this many bytes
DOC_COLUMNS = ("key", "src_file", "src_row", "url", "texts", "images", "alts", "seg_reason", "extra", "drop_reason")


class _BadSegments(ValueError):
    """A document whose positions cannot be read (lists of different lengths, a position with both or neither
    set, a value of the wrong type): the whole document is dropped as bad_segments."""


def read_interleaved_unit(unit: Unit, cfg: InterleavedInputConfig, skip: Iterable[int] = ()) -> Iterator[Batch]:
    """Batches of -> key, src_file, src_row, url, texts, images, alts, seg_reason, extra, drop_reason: a row per
    document, its n positions in OBELICS form (texts[i] or images[i] set, the other None; alts[i] the alt text at
    an image; seg_reason[i] "" or why the position is out; see the interleaved contract).

    Image URLs are resolved against the document's URL (data: URLs kept verbatim); one that cannot be resolved
    gets seg_reason image_relative_url, one of another scheme image_bad_url. Bad documents stay rows with a reason
    and empty lists: malformed_row, too_large (over input.max_bytes; never held whole), bad_segments,
    empty_document (no image and no visible text), too_many_images (over input.max_images), not_html (a WARC
    response of another content type), truncated_warc (a WARC file cut or corrupt at this record; the records
    before it are kept).
    """
    skip = set(skip)
    if unit.fmt == "warc":
        _unchanged(unit)
        records: Iterator[tuple] = _warc_pages(unit.uri, unit.size, cfg.max_bytes, skip)
    elif unit.fmt == "html":
        records = _html_pages(unit, cfg.max_bytes, skip)
    else:
        records = _records(unit, skip, line_limit=cfg.max_bytes)
    cols: dict[str, list] = {k: [] for k in DOC_COLUMNS}
    held = 0
    for row, rec in records:
        src = rec.source or unit.source if isinstance(rec, _WebPage) else unit.source
        cols["key"].append(make_key(src, 0 if unit.fmt == "html" else row))  # a page's key: its file alone
        cols["src_file"].append(src)
        cols["src_row"].append(row)
        url, texts, images, alts, extra, reason = _document(rec, cfg)
        seg = [""] * len(texts)
        if not reason:
            n_images = 0
            for i, u in enumerate(images):
                if u is not None:
                    seg[i] = image_url_reason(u)
                    n_images += 1
            if n_images > cfg.max_images:
                reason = "too_many_images"
            elif not n_images and all(t is None or _blank(t) for t in texts):
                reason = "empty_document"
        if reason:
            texts, images, alts, seg = [], [], [], []
        cols["url"].append(url)
        cols["texts"].append(texts)
        cols["images"].append(images)
        cols["alts"].append(alts)
        cols["seg_reason"].append(seg)
        cols["extra"].append(json.dumps(extra, ensure_ascii=False))
        cols["drop_reason"].append(reason)
        held += sum(map(len, filter(None, texts))) + sum(map(len, filter(None, images)))
        if len(cols["key"]) >= INTERLEAVED_BATCH or held >= INTERLEAVED_BATCH_BYTES:
            yield _doc_batch(cols)
            cols, held = {k: [] for k in DOC_COLUMNS}, 0
    if cols["key"]:
        yield _doc_batch(cols)


def _doc_batch(cols: dict[str, list]) -> Batch:
    out = {k: _obj(v) for k, v in cols.items()}
    out["src_row"] = np.array(cols["src_row"], dtype=np.int64)
    return out


def _document(rec: Any, cfg: InterleavedInputConfig) -> tuple[str, list, list, list, dict, str]:
    """A record -> (url, texts, images, alts, extra, drop_reason); image URLs resolved against the url."""
    if rec is None or rec is TOO_LARGE:
        return "", [], [], [], {}, "malformed_row" if rec is None else "too_large"
    if isinstance(rec, _WebPage):  # already extracted (or its reason)
        return rec.url, rec.texts, rec.images, rec.alts, rec.extra, rec.reason
    url = _text(rec.get(cfg.url_col))[0].strip() if isinstance(rec.get(cfg.url_col), (str, bytes)) else ""
    form = cfg.form_of(rec)
    own = {cfg.url_col} | ({cfg.texts_col, cfg.images_col} if form == "obelics" else set())
    own |= {cfg.text_list_col, cfg.image_info_col} if form == "mmc4" else set()
    names = cfg.extra_cols if cfg.extra_cols is not None else [k for k in rec if k not in own]
    extra = {k: _jsonable(rec.get(k)) for k in names if k not in own}
    try:
        if form is None:
            raise _BadSegments
        if _doc_bytes(rec, cfg, form) > cfg.max_bytes:
            return url, [], [], [], extra, "too_large"
        if form == "obelics":
            texts, images = _obelics(rec.get(cfg.texts_col), rec.get(cfg.images_col))
        else:
            texts, images, info = _mmc4(rec.get(cfg.text_list_col), rec.get(cfg.image_info_col))
            if cfg.extra_cols is None or cfg.image_info_col in cfg.extra_cols:
                extra[cfg.image_info_col] = info
    except _BadSegments:
        return url, [], [], [], extra, "bad_segments"
    images = [None if u is None else resolve_image_url(u, url) for u in images]
    return url, texts, images, [None] * len(texts), extra, ""


def _doc_bytes(rec: dict, cfg: InterleavedInputConfig, form: str) -> int:
    """About the bytes of a document's text and URLs (a parquet row is read whole, so its cap is checked here;
    a jsonl line over max_bytes never gets this far)."""
    lists = (cfg.texts_col, cfg.images_col) if form == "obelics" else (cfg.text_list_col,)
    n = sum(len(v) for c in lists if isinstance(rec.get(c), list) for v in rec[c] if isinstance(v, (str, bytes)))
    if form == "mmc4" and isinstance(rec.get(cfg.image_info_col), list):
        n += sum(len(str(e.get("raw_url", ""))) for e in rec[cfg.image_info_col] if isinstance(e, dict))
    return n


def _segment(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, bytes)):
        raise _BadSegments
    return _text(value)[0]  # invalid UTF-8 becomes U+FFFD


def _obelics(texts: Any, images: Any) -> tuple[list, list]:
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise _BadSegments
    texts, images = [_segment(t) for t in texts], [_segment(u) for u in images]
    if any((t is None) == (u is None) for t, u in zip(texts, images)):  # both or neither set
        raise _BadSegments
    return texts, images


def _mmc4(text_list: Any, image_info: Any) -> tuple[list, list, list]:
    """MMC4 -> OBELICS positions: each sentence, then the images matched to it (in image_info order). Returns the
    image entries' other fields (matched_sim, image_name, ...) too, in the document's image order."""
    if image_info is None:
        image_info = []
    if not isinstance(text_list, list) or not isinstance(image_info, list):
        raise _BadSegments
    sentences = [_segment(t) for t in text_list]
    if any(t is None for t in sentences):
        raise _BadSegments
    matched: list[list[tuple[str, dict]]] = [[] for _ in sentences]
    for e in image_info:
        i = e.get("matched_text_index") if isinstance(e, dict) else None
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(sentences):
            raise _BadSegments
        raw = _segment(e.get("raw_url"))
        if raw is None:
            raise _BadSegments
        matched[i].append((raw, {k: _jsonable(v) for k, v in e.items() if k not in ("raw_url", "matched_text_index")}))
    texts: list[str | None] = []
    images: list[str | None] = []
    info: list[dict] = []
    for sentence, imgs in zip(sentences, matched):
        texts.append(sentence), images.append(None)
        for raw, other in imgs:
            texts.append(None), images.append(raw), info.append(other)
    return texts, images, info


@dataclass(slots=True)
class _WebPage:
    """A web page read from a WARC record or an HTML file: its extracted positions, or the reason it has none."""

    url: str = ""
    texts: list = field(default_factory=list)
    images: list = field(default_factory=list)
    alts: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    reason: str = ""
    source: str = ""  # the HTML file's source ("" for a WARC record: the unit's)


def _page(body: bytes, url: str, encoding: str | None, max_bytes: int, **kw: Any) -> _WebPage:
    if len(body) > max_bytes:
        return _WebPage(url, reason="too_large", **kw)
    p = extract_page(body, url, encoding)
    return _WebPage(p.url, p.texts, p.images, p.alts, **kw)


def _warc_pages(uri: str, size: int, max_bytes: int, skip: set[int]) -> Iterator[tuple[int, _WebPage]]:
    """(record number, page) for the response/resource records of a WARC file; the target URI is the page URL.

    FastWARC rather than warcio (the text reader's): its C++ record parsing costs a few percent of the extraction
    where warcio's Python parsing cost a third. A body over max_bytes is never read whole (the rest is consumed
    in the library). A file cut or corrupt at a record ends with a row truncated_warc after the records read before
    it: FastWARC, like warcio, hands a cut record over as if whole, so every record's bytes are counted against its
    Content-Length, and a gzipped file's last member is checked to end cleanly."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    docs = WarcRecordType.response | WarcRecordType.resource
    i, last = -1, -1
    with storage.open_seekable(uri, 8 << 20) as f:  # (FastWARC seeks its stream; on S3: ranged GETs of 8 MB)
        records = iter(ArchiveIterator(f, parse_http=True, auto_decode="none", fsspec_args=False))
        while True:
            page, number = None, i + 1  # the number this record gets if it is a document
            try:
                rec = next(records)
                last = rec.stream_pos
                length = (rec.headers.get("Content-Length") or "").strip()
                if rec.record_type in (WarcRecordType.unknown, WarcRecordType.no_type) or not length.isdigit():
                    raise ValueError("a record header without WARC-Type or Content-Length")
                if rec.record_type & docs:
                    i += 1
                    if i not in skip:
                        page = _warc_page(rec, max_bytes)
                got = rec.reader.consume()  # the rest of the body (all of it for a record not read)
                if page is not None:
                    got += page.extra.pop("_read")
                if got < rec.content_length:
                    raise ValueError(f"the file ends {rec.content_length - got} bytes before the record's end")
            except StopIteration:
                break
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # a cut or corrupt record: FastWARC raises OSError on a header it cannot
                # parse, and its Rust core's panics are BaseExceptions (pyo3's PanicException)
                yield number, _WebPage(extra={"error": f"{type(e).__name__}: {e}"[:300]}, reason="truncated_warc")
                return
            if page is not None:
                yield i, page
    if uri.lower().endswith(".gz") and not _gzip_ends_cleanly(uri, max(last, 0)):
        # a gzip member cut too short to hold a record header: FastWARC ends quietly before it
        yield i + 1, _WebPage(extra={"error": "a cut gzip member after the last record"}, reason="truncated_warc")


def _gzip_ends_cleanly(uri: str, pos: int) -> bool:
    """True when the gzip members from `pos` (the last record's) to the end of the file are all whole. Streams the
    tail in pieces (the last record may be large) and keeps no output."""
    with storage.open_seekable(uri) as f:
        f.seek(pos)
        d, fed, pending = zlib.decompressobj(wbits=31), False, b""
        while True:
            if d.eof:  # a whole member: what follows it starts the next one
                d, fed, pending = zlib.decompressobj(wbits=31), False, d.unused_data
            data = d.unconsumed_tail or pending or f.read(1 << 20)
            pending = b""
            if not data:
                return d.eof or not fed
            fed = True
            try:
                d.decompress(data, 1 << 20)
            except zlib.error:  # not gzip data
                return False


def _warc_page(rec: Any, max_bytes: int) -> _WebPage:
    """A response/resource record -> its page (extra["_read"]: the raw body bytes read, for the length check)."""
    url = (rec.headers.get("WARC-Target-URI") or "").strip()
    extra: dict[str, Any] = {"warc_record_id": rec.record_id or "", "_read": 0}
    http = rec.http_headers if rec.is_http else None
    ctype = (http.get("Content-Type") if http is not None else rec.headers.get("Content-Type")) or ""
    if "html" not in ctype.lower():
        return _WebPage(url, extra=extra, reason="not_html")
    body = rec.reader.read(max_bytes + 1)
    extra["_read"] = len(body)
    encoding = ((http.get("Content-Encoding") if http is not None else "") or "").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate") and len(body) <= max_bytes:
        d = zlib.decompressobj(wbits=47)  # gzip or zlib header
        try:
            body = d.decompress(body, max_bytes + 1)
        except zlib.error:
            return _WebPage(url, extra=extra, reason="bad_encoding")
    m = _CHARSET_PARAM.search(ctype)
    return _page(body, url, m.group(1) if m else None, max_bytes, extra=extra)


_CHARSET_PARAM = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:\-]+)", re.I)


def _html_pages(unit: Unit, max_bytes: int, skip: set[int]) -> Iterator[tuple[int, _WebPage]]:
    """(position in the listing, page) for a unit's HTML files; the page URL is the page's canonical link or
    absolute <base href>, else "" (a local file has no web URL: its relative image URLs cannot be resolved)."""
    for i, f in enumerate(unit.files):
        if unit.start + i in skip:
            continue
        source = source_name(f, unit.uri)
        with storage.open_read(f) as fh:
            body = fh.read(max_bytes + 1)
        yield unit.start + i, _page(body, "", None, max_bytes, source=source)
