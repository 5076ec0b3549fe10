"""Staging: every processed row (payload and every score) committed in atomic parquet parts, one folder per work unit:
OUTPUT/_staging/rows/{unit id}/part-{hash of its keys}.parquet. This is the crash boundary of the per-row half.

A rerun skips units marked done (_staging/done/{unit id}, or all of them once _staging/staged.json exists); a unit's
reading task lists its own folder and leaves out the rows already staged there. No set of rows is built on the
driver. Column types come from the corpus kind; nothing here names a kind's columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm1data import storage
from mm1data.config import ConfigError
from mm1data.read import Unit
from mm1data.stage import Batch

UNIT_COL = "_unit"  # the unit id of each row on its way to staging (not stored)
# the columns every kind stages: stable key, input position, drop reason, the input's extra columns as JSON
COMMON_TYPES = {
    "key": pa.string(),
    "src_file": pa.string(),
    "src_row": pa.int64(),
    "drop_reason": pa.string(),
    "extra": pa.string(),
}


def staging_uri(output: str, *parts: str) -> str:
    return storage.join(output, "_staging", *parts)


def unit_dir(output: str, unit_id: str) -> str:
    return staging_uri(output, "rows", unit_id)


def batch_to_table(batch: Batch, types: dict[str, pa.DataType]) -> pa.Table:
    """Numpy batch -> Arrow table, with the declared type of each column; other object columns are inferred
    (str, bytes, lists, structs) and a 2-D array is a fixed-size list per row (e.g. MinHash band hashes)."""
    cols = {}
    for name, values in batch.items():
        t = types.get(name)
        if t is not None and values.dtype == object and t in (pa.int64(), pa.list_(pa.int64())):
            values = _hex_ints(values, t)
        if values.ndim == 2 and t is not None and pa.types.is_list(t):  # equal-length lists, as Ray hands them
            cols[name] = pa.array(values.tolist(), type=t)
        elif values.ndim == 2:
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), type=t), values.shape[1])
        else:
            cols[name] = pa.array(values.tolist() if values.dtype == object else values, type=t)
    return pa.table(cols)


def _hex_ints(values: np.ndarray, t: pa.DataType) -> np.ndarray:
    """A declared int64 (or list<int64>) column that came as 16-hex strings -> signed ints, "" or None -> null.

    A nullable 64-bit integer (a pHash) travels between Ray stages as hex: Ray Data turns an integer column with
    nulls into float64, which cannot hold 64 bits."""
    from mm1data.phash import from_hex

    def one(v):
        return (from_hex(v) if v else None) if isinstance(v, str) else v

    out = np.empty(len(values), dtype=object)
    if pa.types.is_list(t):
        out[:] = [None if v is None else [one(x) for x in v] for v in values]
    else:
        out[:] = [one(v) for v in values]
    return out


def payload_bytes(values: np.ndarray) -> np.ndarray:
    """Byte size of each value of a payload column: bytes, str (UTF-8) or a list of them (a document's images)."""

    def size(v: Any) -> int:
        if v is None:
            return 0
        if isinstance(v, (bytes, bytearray)):
            return len(v)
        if isinstance(v, str):
            return len(v) if v.isascii() else len(v.encode("utf-8", "surrogatepass"))
        return sum(size(x) for x in v)

    return np.fromiter((size(v) for v in values), dtype=np.int64, count=len(values))


def write_staging(
    batch: Batch, output: str, types: dict[str, pa.DataType], size_col: str, payload: tuple[str, ...]
) -> Batch:
    """Commits a batch as one parquet part per unit it holds, named by the hash of the part's keys (a retried task
    overwrites instead of duplicating); returns {"rows": [n], "kept": [rows not dropped]}. Adds `size_col` (the
    payload's bytes, for cutting shards by size) when the kind's stages did not."""
    units = batch.pop(UNIT_COL)
    if len(units) and size_col not in batch:
        batch[size_col] = sum(payload_bytes(batch[c]) for c in payload)
    for unit in dict.fromkeys(units.tolist()):  # units in order of first appearance
        idx = np.flatnonzero(units == unit)
        part = {k: v[idx] for k, v in batch.items()}
        name = hashlib.sha256("\n".join(part["key"].tolist()).encode()).hexdigest()[:20]
        table = batch_to_table(part, {**COMMON_TYPES, **types})
        buf = io.BytesIO()
        # image bytes do not compress: spend zstd only on the other columns
        codecs = {c: "none" if c in payload else "zstd" for c in table.column_names}
        pq.write_table(table, buf, compression=codecs)
        storage.write_bytes(storage.join(unit_dir(output, unit), f"part-{name}.parquet"), buf.getvalue())
    return {"rows": np.array([len(units)]), "kept": np.array([int(np.sum(batch["drop_reason"] == ""))])}


def unit_parts(output: str, unit_id: str) -> list[str]:
    """The committed parts of a unit, sorted (temporary files of a killed write are not parts)."""
    return [
        f
        for f in storage.list_files(unit_dir(output, unit_id))
        if f.endswith(".parquet") and f.rsplit("/", 1)[-1].startswith("part-")
    ]


def read_unit_staged(output: str, unit_id: str, exclude: tuple[str, ...] = (), columns: list[str] | None = None):
    """A unit's staged rows in input order (src_row), without the `exclude` columns (or only `columns`), plus
    _part (the part's file name) and _row (the row in that part). A row staged twice (a retried task cut into other
    batches) keeps the copy of the first part. None if nothing is staged."""
    tables = []
    for f in unit_parts(output, unit_id):
        with storage.open_seekable(f) as fh:  # column reads: the payload bytes are never fetched
            pf = pq.ParquetFile(fh)
            names = [c for c in pf.schema_arrow.names if c not in exclude and (columns is None or c in columns)]
            t = pf.read(columns=names)
        t = t.append_column("_part", pa.array([f.rsplit("/", 1)[-1]] * t.num_rows, pa.string()))
        tables.append(t.append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int32))))
    if not tables:
        return None
    t = pa.concat_tables(tables, promote_options="default")
    t = t.take(np.lexsort((np.arange(t.num_rows), t["src_row"].to_numpy())))
    rows = t["src_row"].to_numpy()
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return t if first.all() else t.filter(pa.array(first))


def staged_src_rows(output: str, unit_id: str) -> np.ndarray:
    t = read_unit_staged(output, unit_id, columns=["src_row"])
    return np.zeros(0, dtype=np.int64) if t is None else t["src_row"].to_numpy()


def read_pending(batch: Batch, reader: Callable[..., Iterator[Batch]], cfg: Any, output: str) -> Iterator[Batch]:
    """Ray task: one unit (a JSON row) -> its input rows not staged yet, in batches, each row tagged with its unit.
    A unit with nothing left to stage is marked done, so the next run does not even read it."""
    for spec in batch["unit"]:
        unit = Unit(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec).items()})
        n = 0
        for b in reader(unit, cfg, staged_src_rows(output, unit.id)):
            if len(b["key"]):
                n += len(b["key"])
                b[UNIT_COL] = np.full(len(b["key"]), unit.id, dtype=object)
                yield b
        if n == 0:
            storage.write_bytes(staging_uri(output, "done", unit.id), b"")


def pending_units(output: str, units: list[Unit]) -> list[Unit]:
    """Units not known to be completely staged (O(units) on the driver: one listing of the markers)."""
    if storage.exists(staging_uri(output, "staged.json")):
        return []
    done = {f.rsplit("/", 1)[-1] for f in storage.list_files(staging_uri(output, "done"))}
    return [u for u in units if u.id not in done]


def mark_staged(output: str, units: int) -> None:
    """Every planned unit is staged: the next run goes straight to the corpus-wide half."""
    storage.write_bytes(staging_uri(output, "staged.json"), json.dumps({"units": units}).encode())


def unit_specs(units: list[Unit]) -> list[dict[str, str]]:
    """Units as JSON rows for ray.data.from_items (one block each)."""
    return [{"unit": json.dumps(dataclasses.asdict(u))} for u in units]


# Settings of how fast a stage runs, not of what it makes (a section's actors, threads, rows per call): a rerun after
# a crash may change them (a bigger cluster, more actors) and still resume the rows staged before
SPEED_KEYS = frozenset({"workers", "threads", "batch_size"})


def per_row(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint without SPEED_KEYS in its sections (download.workers, clip.batch_size, ...)."""
    return {
        k: {kk: vv for kk, vv in v.items() if kk not in SPEED_KEYS} if isinstance(v, dict) else v
        for k, v in fingerprint.items()
    }


def check_run(output: str, fingerprint: dict[str, Any], corpus: str) -> str:
    """Claim the output for this run config, or refuse it; returns the output's run id (also in index.json).

    Refused: rows staged with a different per-row config (they would not mix; SPEED_KEYS may differ), and files this
    project did not write (an index.json of another run, files named like our shards, meta parts) in an output we
    have not claimed.
    Call it holding the output's lease. Fails fast when the output location cannot be written."""
    uri = staging_uri(output, "run.json")
    fp = per_row(json.loads(json.dumps(fingerprint, default=str)))
    index = storage.join(output, "index.json")
    if storage.exists(uri):
        old = json.loads(storage.read_bytes(uri))
        old = per_row(old)  # an older mm1data stored the speed keys too
        diff = sorted(k for k in fp if fp[k] != old.get(k))
        if diff:
            raise ConfigError(
                f"{output} holds rows staged with a different config ({', '.join(diff)} differ); "
                "rerun with the same config or use another --output"
            )
        run_id = old.get("run_id")
        if run_id and storage.exists(index) and json.loads(storage.read_bytes(index)).get("run_id") != run_id:
            raise ConfigError(f"{index} was not written by the run that staged {output}; refusing to overwrite it")
        if not run_id:  # staged by an older mm1data: adopt it
            run_id = uuid.uuid4().hex
            storage.write_bytes(uri, json.dumps({**old, "run_id": run_id}, indent=1).encode())
        return run_id
    names = [f.rsplit("/", 1)[-1] for f in storage.list_files(output, recursive=False)]
    foreign = [n for n in names if n == "index.json" or n.startswith(f"{corpus}-")]
    foreign += [f"meta/{n}" for n in _names(storage.join(output, "meta")) if n.startswith("part-")]
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"{output} already holds files this run did not write ({shown}); mm1data will not overwrite or delete "
            "them: use another --output, or remove them"
        )
    run_id = uuid.uuid4().hex
    try:
        storage.write_bytes(uri, json.dumps({**fp, "run_id": run_id}, indent=1).encode())
    except Exception as e:
        raise ConfigError(f"cannot write to output location {output!r}: {type(e).__name__}: {e}") from e
    return run_id


def _names(uri: str) -> list[str]:
    return [f.rsplit("/", 1)[-1] for f in storage.list_files(uri, recursive=False)]
