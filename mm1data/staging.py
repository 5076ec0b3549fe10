"""Staging: every processed row (image bytes and every score) committed in atomic parquet parts under
OUTPUT/_staging/rows/. A rerun skips rows whose key is staged, so a crash loses at most uncommitted batches."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm1data import storage
from mm1data.config import ConfigError
from mm1data.read import Unit
from mm1data.stage import Batch


def rows_dir(output: str) -> str:
    return storage.join(output, "_staging", "rows")


def batch_to_table(batch: Batch) -> pa.Table:
    cols = {}
    for name, values in batch.items():
        if values.dtype == object:
            cols[name] = pa.array(values.tolist(), type=pa.binary() if name == "image" else pa.string())
        elif values.ndim == 2:  # a fixed-width vector per row (e.g. MinHash band hashes)
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
        else:
            cols[name] = pa.array(values)
    return pa.table(cols)


def write_staging(batch: Batch, rows_dir: str) -> Batch:
    """Writes a batch as one parquet part named by the hash of its keys; returns {"rows": [n]}."""
    n = len(batch["key"])
    if n:
        if "image" in batch:  # shard planning needs sizes without reading image bytes back
            batch["image_bytes"] = np.array([len(b) for b in batch["image"]], dtype=np.int64)
        name = hashlib.sha256("\n".join(batch["key"].tolist()).encode()).hexdigest()[:20]
        buf = io.BytesIO()
        table = batch_to_table(batch)
        # JPEG/PNG/WebP bytes do not compress: spend zstd only on the other columns
        codecs = {c: "none" if c == "image" else "zstd" for c in table.column_names}
        pq.write_table(table, buf, compression=codecs)
        # same rows -> same name, so a retried task overwrites rather than duplicates
        storage.write_bytes(storage.join(rows_dir, f"part-{name}.parquet"), buf.getvalue())
    return {"rows": np.array([n])}


def staged_files(output: str) -> list[str]:
    return [
        f
        for f in storage.list_files(rows_dir(output))
        if f.endswith(".parquet") and "/.tmp-" not in f and not f.rsplit("/", 1)[-1].startswith(".")
    ]


def read_staged(output: str, columns_exclude: tuple[str, ...] = ("image",)) -> pa.Table:
    """All staged rows (minus heavy columns), with _part (file index) and _row (row in that part) added."""
    tables = []
    for i, f in enumerate(staged_files(output)):
        with storage.open_seekable(f) as fh:  # column reads: the image bytes are never fetched
            pf = pq.ParquetFile(fh)
            t = pf.read(columns=[c for c in pf.schema_arrow.names if c not in columns_exclude])
        t = t.append_column("_part", pa.array(np.full(t.num_rows, i, dtype=np.int32)))
        tables.append(t.append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int32))))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def staged_rows(output: str) -> dict[str, np.ndarray]:
    """{input source: sorted input rows already staged}: a rerun skips whole units, or these rows of a unit."""
    done: dict[str, list[np.ndarray]] = {}
    for f in staged_files(output):
        with storage.open_seekable(f) as fh:
            t = pq.read_table(fh, columns=["src_file", "src_row"])
        files, rows = t["src_file"].to_numpy(zero_copy_only=False), t["src_row"].to_numpy()
        for name in np.unique(files):
            done.setdefault(name, []).append(rows[files == name])
    return {k: np.unique(np.concatenate(v)) for k, v in done.items()}


def check_run(output: str, fingerprint: dict[str, Any]) -> None:
    """Refuse to add rows to an output staged with a different per-row config (the rows would not mix);
    record the fingerprint on a first run. Fails fast when the output location cannot be written."""
    uri = storage.join(output, "_staging", "run.json")
    fp = json.loads(json.dumps(fingerprint, default=str))
    if storage.exists(uri):
        old = json.loads(storage.read_bytes(uri))
        diff = sorted(k for k in fp if fp[k] != old.get(k))
        if diff:
            raise ConfigError(
                f"{output} holds rows staged with a different config ({', '.join(diff)} differ); "
                "rerun with the same config or use another --output"
            )
    else:
        try:
            storage.write_bytes(uri, json.dumps(fp, indent=1).encode())
        except Exception as e:
            raise ConfigError(f"cannot write to output location {output!r}: {type(e).__name__}: {e}") from e


def pending_units(units: list[Unit], done: dict[str, np.ndarray]) -> list[Unit]:
    """Units with at least one row not staged yet."""
    return [
        u
        for u in units
        if len(done.get(u.source, ())) == 0
        or np.count_nonzero((done[u.source] >= u.start) & (done[u.source] < u.stop)) < u.stop - u.start
    ]


def read_pending(batch: Batch, reader: Callable[[Unit, Any], Batch], cfg: Any, done: list) -> Batch:
    """Ray task: one row per unit (JSON) -> the unit's input rows, minus rows an earlier run already staged.

    `done` is [ObjectRef of staged_rows()], put once by the driver and shared by every task."""
    import ray

    done_rows = ray.get(done[0])
    out = []
    for spec in batch["unit"]:
        unit = Unit(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec).items()})
        b = reader(unit, cfg)
        if unit.source in done_rows:
            keep = ~np.isin(b["src_row"], done_rows[unit.source])
            b = {k: v[keep] for k, v in b.items()}
        out.append(b)
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def unit_specs(units: list[Unit]) -> list[dict[str, str]]:
    """Units as JSON rows for ray.data.from_items (one block each)."""
    return [{"unit": json.dumps(dataclasses.asdict(u))} for u in units]
