"""The corpus-wide end of a run: dedup, split kept rows into tar shards, every row into meta/*.parquet,
then index.json. It reads only staging, is deterministic and skips shards already committed."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm1data import __version__, storage
from mm1data.config import check, to_dict
from mm1data.schema import IMAGE_EXTS
from mm1data.shards import ShardInfo, TarShardWriter, build_index, plan_shards, shard_name, write_index
from mm1data.staging import staged_files

META_ROWS = 1_000_000  # rows per meta parquet part
INTERNAL = ("_part", "_row")


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 10_000  # img2dataset's default
    bytes_per_shard: int = 1_000_000_000  # a shard closes before exceeding this
    workers: int = 0  # parallel shard writers; 0 = one per cluster CPU

    def __post_init__(self) -> None:
        check(self, "samples_per_shard", ge=1)
        check(self, "bytes_per_shard", ge=1)
        check(self, "workers", ge=0)


# A dedup step marks rows of the table (sorted into input order) given their drop reasons; it returns the new
# reasons and any columns to add to the score store.
DedupStep = Callable[[pa.Table, np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]

# A sample builder turns one staged row (a dict of column values, image included) into tar members.
SampleBuilder = Callable[[dict[str, Any]], tuple[dict[str, bytes], int]]


def _record_uri(output: str, name: str) -> str:
    return storage.join(output, "_staging", "shards", name + ".json")


def write_shard(
    output: str, name: str, parts: list[str], rows: list[tuple[int, int]], build: SampleBuilder, fingerprint: str
) -> dict[str, Any]:
    """Write one shard from staged rows [(part index, row in part)] in order; commit it and its record."""
    needed: dict[int, list[int]] = {}
    for p, r in rows:
        needed.setdefault(p, []).append(r)
    staged: dict[tuple[int, int], dict[str, Any]] = {}  # (part, row) -> the staged row, image included
    for p, rs in needed.items():
        src = io.BytesIO(storage.read_bytes(parts[p])) if storage.is_s3(parts[p]) else parts[p]
        staged.update(zip(((p, r) for r in rs), pq.read_table(src).take(rs).to_pylist()))
    writer = TarShardWriter(storage.join(output, name))
    tokens = 0
    try:
        for key in rows:
            members, n_tokens = build(staged[key])
            writer.write(members, num_images=sum(1 for m in members if m.rsplit(".", 1)[-1] in IMAGE_EXTS))
            tokens += n_tokens
    except BaseException:
        writer.abort()
        raise
    info = writer.close()
    record = {"fingerprint": fingerprint, "tokens": tokens, "shard": asdict(info)}
    storage.write_bytes(_record_uri(output, name), json.dumps(record).encode())
    return record


def finalize(
    output: str,
    kind: str,
    corpus: str,
    table: pa.Table,
    build: SampleBuilder,
    shard_cfg: ShardConfig,
    dedup: DedupStep,
    config: Any,
    warnings: list[str],
    size_col: str = "image_bytes",
) -> dict[str, Any]:
    """Dedup, shard, meta, index.json (last). `table` is read_staged(): every row, without heavy columns.

    `config` (the resolved run config) and `warnings` go into index.json; `size_col` holds each row's payload
    bytes, for cutting shards by size."""
    import ray

    parts = staged_files(output)
    # input order; a key staged twice (a retried task) keeps its first copy
    table = table.sort_by([("src_file", "ascending"), ("src_row", "ascending"), ("_part", "ascending")])
    keys = table["key"].to_numpy(zero_copy_only=False)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    table, keys = table.filter(pa.array(first)), keys[first]

    reason, added = dedup(table, table["drop_reason"].to_numpy(zero_copy_only=False).astype(object))
    table = table.set_column(table.column_names.index("drop_reason"), "drop_reason", pa.array(reason.tolist()))
    for name, values in added.items():  # e.g. the near-duplicate cluster of each row, into the score store
        table = table.append_column(name, pa.array(values))

    kept = np.flatnonzero(reason == "")
    nbytes = table[size_col].to_numpy()[kept] if size_col in table.column_names else np.zeros(len(kept))
    ranges = plan_shards(nbytes.tolist(), shard_cfg.samples_per_shard, shard_cfg.bytes_per_shard)
    part_col, row_col = table["_part"].to_numpy(), table["_row"].to_numpy()

    shard_of = np.full(table.num_rows, "", dtype=object)
    jobs, records = [], {}
    for i, (a, b) in enumerate(ranges):
        name = shard_name(corpus, i)
        idx = kept[a:b]
        shard_of[idx] = name
        rows = list(zip(part_col[idx].tolist(), row_col[idx].tolist()))
        fingerprint = hashlib.sha256("\n".join(keys[idx].tolist()).encode()).hexdigest()
        rec_uri = _record_uri(output, name)
        if storage.exists(rec_uri):
            rec = json.loads(storage.read_bytes(rec_uri))
            if rec["fingerprint"] == fingerprint and storage.exists(storage.join(output, name)):
                records[name] = rec  # committed by an earlier run: not redone
                continue
        jobs.append((name, rows, fingerprint))

    if jobs:
        workers = shard_cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=3)(write_shard)
        parts_ref, build_ref = ray.put(parts), ray.put(build)
        pending = []
        for name, rows, fp in jobs:
            if len(pending) >= workers:
                done, pending = ray.wait(pending, num_returns=1)
                for rec in ray.get(done):
                    records[rec["shard"]["path"]] = rec
            pending.append(remote.remote(output, name, parts_ref, rows, build_ref, fp))
        for rec in ray.get(pending):
            records[rec["shard"]["path"]] = rec

    shards = [ShardInfo(**records[shard_name(corpus, i)]["shard"]) for i in range(len(ranges))]
    _remove_stale(output, corpus, {s.path for s in shards})

    meta = table.drop_columns([c for c in INTERNAL if c in table.column_names]).append_column(
        "shard", pa.array(shard_of.tolist(), type=pa.string())
    )
    n_meta = max(1, -(-meta.num_rows // META_ROWS))
    for j in range(n_meta):
        buf = io.BytesIO()
        pq.write_table(meta.slice(j * META_ROWS, META_ROWS), buf, compression="zstd")
        storage.write_bytes(storage.join(output, "meta", f"part-{j:06d}.parquet"), buf.getvalue())
    written = {f"part-{j:06d}.parquet" for j in range(n_meta)}
    for f in storage.list_files(storage.join(output, "meta")):
        name = f.rsplit("/", 1)[-1]
        if name.startswith("part-") and name not in written:  # parts of an earlier, larger run
            storage.delete(f)

    status = table["download_error"].to_numpy(zero_copy_only=False) if "download_error" in table.column_names else None
    dropped = Counter(r for r in reason.tolist() if r)
    funnel = {"rows_in": table.num_rows}
    if status is not None:
        attempted = table["download_attempts"].to_numpy() > 0
        funnel["downloaded"] = int(np.sum(attempted & (status == "")))
    funnel["dropped"] = dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))
    funnel["kept"] = int(len(kept))
    tokens = sum(records[s.path]["tokens"] for s in shards)
    index = build_index(
        kind,
        corpus,
        shards,
        tokens,
        funnel=funnel,
        config=json.loads(json.dumps(to_dict(config), default=str)),  # the resolved run config, as plain JSON
        warnings=warnings,
        mm1data_version=__version__,
    )
    write_index(output, index)  # last: the run is complete when this exists
    return index


def _remove_stale(output: str, corpus: str, keep: set[str]) -> None:
    """Shards of an earlier, different plan are not in the index, and temp files of a killed run are
    partial: remove both so a directory listing (e.g. read_webdataset(dir)) sees only real shards."""
    for d in (output, storage.join(output, "meta")):
        for f in storage.list_files(d, recursive=False):
            name = f.rsplit("/", 1)[-1]
            stale = (
                name.startswith(f"{corpus}-") and name.endswith((".tar", ".idx")) and name[:-4] + ".tar" not in keep
            )
            if stale or name.startswith(".tmp-"):
                storage.delete(f)
