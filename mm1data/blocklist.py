"""Blocklists: the images (sha256 and pHash) and texts (questions, captions) of eval sets in one parquet, the form
`dedup.reference` takes to keep benchmarks out of the training mix.

    mm1data blocklist build SOURCE -o BLOCKLIST.parquet

SOURCE is a file, a folder (recursive) or a glob, local or s3://; each file is read by its extension: an image
(jpg, png, webp, gif, bmp, tiff), a webdataset tar shard (its image members), a parquet (an image column of bytes
or Hugging Face's {bytes, path} struct, and/or text columns) or a jsonl (text columns). One row per image or text:

    kind    "image" | "text"
    source  where it came from: a file relative to SOURCE, "shard.tar/member", "file.parquet#row.column[i]"
    sha256  hex of the image file's bytes (null for text)
    phash   int64 pHash of the decoded image (mm1data.phash.phash); null for text and for an undecodable image
    text    the text as it is in the eval set (null for images)

File-level parquet metadata key `mm1data` = {"blocklist": 1}. An image that does not decode keeps its sha256 row and
is counted in the summary; a null or empty text, a parquet row without image bytes and a file of another type are
counted too: nothing is left out unsaid.

Hashing runs on a local process pool, not Ray: an eval set is at most a few hundred thousand images (minutes on one
machine's cores), a pool needs no cluster and starts in a second, and at most 2 tasks per worker are in flight, each
returning rows without image bytes, so memory stays bounded whatever the set's size. Units of work: a batch of
image files, a tar shard, a parquet row group, a jsonl file.
"""

from __future__ import annotations

import concurrent.futures as cf
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mm1data import storage
from mm1data.config import ConfigError, clip

SCHEMA = pa.schema(
    [("kind", pa.string()), ("source", pa.string()), ("sha256", pa.string()), ("phash", pa.int64()),
     ("text", pa.string())]
)  # fmt: skip
META_KEY = b"mm1data"
META = {META_KEY: json.dumps({"blocklist": 1}).encode()}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif", ".jpe")
FILES_PER_TASK = 64  # image files hashed by one task
PARQUET_BATCH = 64  # rows of an image parquet read at a time (HF eval rows hold whole images)


@dataclass(frozen=True)
class BuildOptions:
    image_col: str | None = None  # parquet image column; None: "image" when the file has it
    text_cols: tuple[str, ...] = ()  # parquet/jsonl text columns (a string or a list of strings per row)
    workers: int = 0  # processes; 0: one per CPU; 1: in this process


@dataclass
class Summary:
    """What a build found: every input item is counted in one of these."""

    counts: Counter = field(default_factory=Counter)

    def line(self, output: str) -> str:
        c = self.counts
        parts = [f"{c['image']:,} images ({c['undecodable']:,} undecodable: sha256 only)", f"{c['text']:,} texts"]
        parts += [f"{c[k]:,} {what}" for k, what in _NOT_LISTED if c[k]]
        return "blocklist: " + ", ".join(parts) + f" -> {output}"


_NOT_LISTED = (
    ("empty_text", "null or empty texts (not listed)"),
    ("no_image", "parquet rows without image bytes (not listed)"),
    ("other_members", "tar members that are not images (not listed)"),
    ("other_files", "files of another type (not listed)"),
    ("blocklists", "mm1data blocklists in the source, e.g. an earlier build's output (not read)"),
)


# ---- building ---------------------------------------------------------------------------------------------------


def build(source: str, output: str, opts: BuildOptions = BuildOptions()) -> Summary:
    """Hash every image and text under `source` into the blocklist parquet `output` (written atomically)."""
    if not output.endswith(".parquet"):
        raise ConfigError(f"blocklist output {output!r} must end with .parquet (dedup.reference tells them by it)")
    tasks, summary = plan(source, opts)
    fd, tmp = storage.create_temp(storage.local_tmp_dir(output), suffix=".parquet")
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, SCHEMA.with_metadata(META), compression="zstd") as writer:
            for table, counts in _run(tasks, opts):
                summary.counts.update(counts)
                if table.num_rows:
                    writer.write_table(table)
        storage.put_file(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return summary


def plan(source: str, opts: BuildOptions) -> tuple[list[tuple], Summary]:
    """-> (tasks in source order, the summary with the files of other types counted). Parquet footers are read
    here (a task per row group) and their columns checked, so a wrong column name fails before any hashing."""
    from mm1data.read import input_root, source_name

    try:
        files = storage.list_sizes(source)
    except Exception as e:
        raise ConfigError(f"cannot read blocklist source {source!r}: {clip(e)}") from e
    files = [(f, n) for f, n in files if not os.path.basename(f).startswith((".", "_"))]
    if not files:
        raise ConfigError(f"no files found at blocklist source {source!r}")
    root = input_root(source, files)
    summary = Summary()
    tasks: list[tuple] = []
    images: list[tuple[str, str]] = []
    for uri, _ in files:
        rel = source_name(uri, root)
        low = uri.lower()
        if low.endswith(IMAGE_EXTS):
            images.append((uri, rel))
            if len(images) == FILES_PER_TASK:
                tasks.append(("images", images))
                images = []
            continue
        if images:  # keep source order: a batch of images ends where another file comes
            tasks.append(("images", images))
            images = []
        if low.endswith(".tar"):
            tasks.append(("tar", uri, rel))
        elif low.endswith(".parquet"):
            groups = _parquet_groups(uri, opts)
            if groups is None:
                summary.counts["blocklists"] += 1
            tasks += [("parquet", uri, rel, g, cols) for g, cols in groups or ()]
        elif low.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            if not opts.text_cols:
                raise ConfigError(f"{uri}: a jsonl source needs --text-col (which field holds the eval text)")
            tasks.append(("jsonl", uri, rel, opts.text_cols))
        else:
            summary.counts["other_files"] += 1
    if images:
        tasks.append(("images", images))
    if not tasks:
        raise ConfigError(f"no images, tar shards, parquet or jsonl files at blocklist source {source!r}")
    return tasks, summary


def _parquet_groups(uri: str, opts: BuildOptions) -> list[tuple[int, tuple[str | None, tuple[str, ...]]]] | None:
    """(row group, (image column, text columns)) of each row group; None for a blocklist this module wrote (an
    output kept beside its source is not an input of the next build)."""
    try:
        with storage.open_seekable(uri) as f:
            md = pq.ParquetFile(f).metadata
    except Exception as e:
        raise ConfigError(f"cannot read parquet {uri!r}: {clip(e)}") from e
    if META_KEY in (md.metadata or {}):
        return None
    names = md.schema.to_arrow_schema().names
    image = opts.image_col or ("image" if "image" in names else None)
    missing = [c for c in ([opts.image_col] if opts.image_col else []) + list(opts.text_cols) if c not in names]
    if missing:
        raise ConfigError(f"{uri}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})")
    if image is None and not opts.text_cols:
        raise ConfigError(f"{uri}: no image column (pass --image-col) and no --text-col (columns: {', '.join(names)})")
    return [(g, (image, opts.text_cols)) for g in range(md.num_row_groups)]


def _run(tasks: list[tuple], opts: BuildOptions) -> Iterator[tuple[pa.Table, Counter]]:
    """Each task's (rows, counts), in task order; at most 2 tasks per worker in flight."""
    workers = opts.workers or os.cpu_count() or 1
    if workers == 1 or len(tasks) == 1:
        yield from map(run_task, tasks)
        return
    # spawn: a forked child would inherit pyarrow's and boto3's threads and locks mid-use
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: list[cf.Future] = []
        it = iter(tasks)
        for t in it:
            pending.append(pool.submit(run_task, t))
            if len(pending) >= 2 * workers:
                break
        while pending:
            yield pending.pop(0).result()
            for t in it:
                pending.append(pool.submit(run_task, t))
                break


def run_task(task: tuple) -> tuple[pa.Table, Counter]:
    """One unit of work -> (its blocklist rows, its counts). A file that cannot be read at all is an error naming
    it: a blocklist with a silent hole would let an eval set through."""
    rows: dict[str, list] = {n: [] for n in SCHEMA.names}
    counts: Counter = Counter()
    uri = task[1][0][0] if task[0] == "images" else task[1]
    try:
        if task[0] == "images":
            for uri, rel in task[1]:
                with storage.open_read(uri) as f:
                    _image(rows, counts, rel, f.read())
        elif task[0] == "tar":
            _tar(rows, counts, task[1], task[2])
        elif task[0] == "parquet":
            _parquet(rows, counts, *task[1:])
        else:
            _jsonl(rows, counts, *task[1:])
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot read {uri!r}: {type(e).__name__}: {clip(e)}") from e
    return pa.table(rows, schema=SCHEMA), counts


def image_hashes(data: bytes) -> tuple[str, int | None]:
    """-> (sha256 hex of the bytes, pHash of the decoded image or None when it does not decode)."""
    from PIL import Image

    from mm1data.phash import phash

    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a truncated file fails here, not later; a decompression bomb is refused by Pillow
            return digest, int(phash(img))
    except Exception:  # anything Pillow refuses: the sha256 row stays, counted as undecodable
        return digest, None


def _image(rows: dict, counts: Counter, source: str, data: bytes) -> None:
    digest, ph = image_hashes(data)
    counts["image"] += 1
    counts["undecodable"] += ph is None
    for k, v in (("kind", "image"), ("source", source), ("sha256", digest), ("phash", ph), ("text", None)):
        rows[k].append(v)


def _text(rows: dict, counts: Counter, source: str, value) -> None:
    """A string, or a list of strings (COCO's five captions): a row each."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _text(rows, counts, f"{source}[{i}]", v)
        return
    if not isinstance(value, str) or not value.strip():
        counts["empty_text"] += 1
        return
    counts["text"] += 1
    for k, v in (("kind", "text"), ("source", source), ("sha256", None), ("phash", None), ("text", value)):
        rows[k].append(v)


def _tar(rows: dict, counts: Counter, uri: str, rel: str) -> None:
    with storage.open_read(uri) as f, tarfile.open(fileobj=f, mode="r|*") as tar:  # streamed, one member at a time
        for m in tar:
            if not m.isfile():
                continue
            if not m.name.lower().endswith(IMAGE_EXTS):
                counts["other_members"] += 1
                continue
            _image(rows, counts, f"{rel}/{m.name}", tar.extractfile(m).read())


def _parquet(rows: dict, counts: Counter, uri: str, rel: str, group: int, cols: tuple) -> None:
    image, texts = cols
    with storage.open_seekable(uri) as f:
        pf = pq.ParquetFile(f)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        want = ([image] if image else []) + [c for c in texts if c != image]
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=want):
            if image:
                col = batch.column(want.index(image))
                for i, v in enumerate(col.to_pylist()):
                    data, path = _image_value(v)
                    if data is None:
                        counts["no_image"] += 1
                        continue
                    _image(rows, counts, f"{rel}#{row + i}" + (f":{path}" if path else ""), data)
            for c in texts:
                for i, v in enumerate(batch.column(want.index(c)).to_pylist()):
                    _text(rows, counts, f"{rel}#{row + i}.{c}", v)
            row += batch.num_rows


def _image_value(v) -> tuple[bytes | None, str | None]:
    """A cell of an image column -> (bytes, HF path): bytes, or Hugging Face's {"bytes", "path"} struct."""
    if isinstance(v, dict):
        return v.get("bytes") or None, v.get("path") or None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v) or None, None
    return None, None


def _jsonl(rows: dict, counts: Counter, uri: str, rel: str, texts: tuple[str, ...]) -> None:
    with storage.open_read(uri) as raw:
        f = gzip.open(raw) if uri.lower().endswith(".gz") else raw
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{uri}: line {n + 1} is not JSON: {clip(e)}") from e
            for c in texts:
                _text(rows, counts, f"{rel}#{n}.{c}", obj.get(c) if isinstance(obj, dict) else None)


# ---- reading (dedup.reference) ------------------------------------------------------------------------------------


def is_blocklist(uri: str) -> bool:
    """Whether `uri` is a parquet this module wrote (its file metadata says so)."""
    with storage.open_seekable(uri) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    try:
        return json.loads(meta.get(META_KEY, b"{}")).get("blocklist") == 1
    except ValueError:
        return False


def blocklists(locations: tuple[str, ...] | list[str]) -> list[str]:
    """The blocklist parquets among `dedup.reference` locations (the rest are mm1data outputs)."""
    return [loc for loc in locations if loc.endswith(".parquet")]


def read_texts(locations: list[str]) -> tuple[list[str], list[str]]:
    """-> (texts, sources) of every kind == "text" row of the blocklists, in order."""
    import pyarrow.compute as pc

    texts: list[str] = []
    sources: list[str] = []
    for loc in locations:
        with storage.open_seekable(loc) as f:
            t = pq.ParquetFile(f).read(columns=["kind", "source", "text"])
        t = t.filter(pc.equal(t["kind"], "text"))
        texts += t["text"].to_pylist()
        sources += t["source"].to_pylist()
    return texts, sources
