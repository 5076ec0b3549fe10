"""The corpus-wide half of a run, on Ray; the driver holds O(units + shards), never O(rows).

  candidates  every unit's kept rows: pos (input order) and each dedup step's keys    a Ray task per unit
  percentile  filters with a percentile threshold, exact, before dedup (percentile.py)  histogram passes
  dedup       each step on the rows the earlier steps kept -> marks (pos, reason, ...)   hash shuffles (dedup.py)
  decide      a unit's staged rows + its marks -> _staging/decided/{unit}.parquet       grouped by unit
  plan        kept counts per unit -> shards (split further where the byte cap binds)  driver: O(units + shards)
  shards      tar + .idx + a record per shard; a committed shard is not rewritten       Ray tasks
  meta        meta/part-NNNNNN.parquet: every row, with its shard                       Ray tasks
  index.json  from the per-shard records, last: the run is complete when it exists
It reads only staging and is deterministic, so a crash here costs a rerun of this half, never a lost or doubled row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mm1data import __version__, storage
from mm1data.config import check, to_dict
from mm1data.dedup import task_shuffles
from mm1data.percentile import percentile_steps
from mm1data.progress import Progress, StageSummary
from mm1data.schema import IMAGE_EXTS
from mm1data.shards import ShardInfo, TarShardWriter, build_index, plan_shards, shard_name, write_index
from mm1data.staging import read_unit_staged, staging_uri, unit_dir

if TYPE_CHECKING:
    from mm1data.pipelines.runner import Kind
    from mm1data.read import Unit

log = logging.getLogger(__name__)
META_ROWS = 1_000_000  # rows per meta parquet part (its task holds one unit's rows at a time, and the compressed part)
POS_BITS = 40  # pos = unit index << POS_BITS | offset of the row in its unit (a row number or a byte offset)
ITEM_SLICE = 8192  # rows of a unit turned into item rows at a time (meta_images: a row per image)
INTERNAL = ("_part", "_row")  # where a row lies in staging: in decided files, not in meta
CPU_RECHECK_S = 5.0  # how often shard writing reads the cluster's CPUs again (nodes join, the autoscaler adds)


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 10_000  # img2dataset's default
    bytes_per_shard: int = 1_000_000_000  # a shard closes before exceeding this
    workers: int = 0  # parallel shard writers; 0 = one per cluster CPU (as it grows; at least the CPUs reachable)

    def __post_init__(self) -> None:
        check(self, "samples_per_shard", ge=1)
        check(self, "bytes_per_shard", ge=1)
        check(self, "workers", ge=0)


# A sample builder turns one staged row (a dict of column values, payload included) into tar members and tokens.
SampleBuilder = Callable[[dict[str, Any]], tuple[dict[str, bytes], int]]


class Positions:
    """Input order as one int64 per row (unit index << POS_BITS | offset in the unit), and back to the row's key."""

    def __init__(self, units: list[Unit]) -> None:
        self.ids = [u.id for u in units]
        self.sources = np.array([u.source for u in units], dtype=object)
        self.starts = np.array([u.start for u in units], dtype=np.int64)

    def encode(self, u: int, src_row: np.ndarray) -> np.ndarray:
        return (np.int64(u) << np.int64(POS_BITS)) | (np.asarray(src_row, dtype=np.int64) - self.starts[u])

    def keys(self, pos: np.ndarray) -> np.ndarray:
        from mm1data.schema import make_key

        u = (pos >> POS_BITS).astype(np.int64)
        rows = self.starts[u] + (pos & ((1 << POS_BITS) - 1))
        out = np.empty(len(pos), dtype=object)
        out[:] = [make_key(s, int(r)) for s, r in zip(self.sources[u], rows)]
        return out


def decided_uri(output: str, unit_id: str) -> str:
    return staging_uri(output, "decided", f"{unit_id}.parquet")


def finalize(
    kind: Kind,
    cfg: Any,
    units: list[Unit],
    run_id: str,
    warnings: list[str],
    check: Callable[[], None] = lambda: None,
    stages: list[StageSummary] | None = None,
    payload_from: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Percentile thresholds, dedup, decide, shard, meta, index.json (last); returns the index. `cfg` is the resolved
    run config (it goes into index.json); `check` raises if this process no longer holds the output (called before
    index.json); `stages` gets a summary line per step. `payload_from`: the output whose staging holds the payload
    columns (refilter stages rows without them); `provenance` goes into index.json as `refiltered_from`."""
    from mm1data.pipelines.runner import cluster_capacity  # (runner imports this module)

    out = cfg.output
    pos = Positions(units)
    thresholds = percentile_steps(cfg.filters)  # over the rows every per-row stage kept, before dedup
    steps = [*thresholds, *kind.dedup(cfg)]
    added = {k: v for s in steps for k, v in s.added.items()}  # score-store columns the steps add, with defaults
    t0 = time.perf_counter()
    with task_shuffles():
        marks = _dedup(out, pos, steps, added)
        summaries = _decide(kind, out, pos, marks, added)
    t1 = time.perf_counter()

    kept = np.array([s["kept"] for s in summaries], dtype=np.int64)
    kept_before = np.r_[0, np.cumsum(kept)]
    ranges = _plan(out, pos, kind.size_col, cfg.shards, kept_before, np.array([s["kept_bytes"] for s in summaries]))
    names = [shard_name(cfg.corpus, i) for i in range(len(ranges))]
    jobs = [(name, _segments(kept_before, a, b)) for name, (a, b) in zip(names, ranges)]
    payload = (payload_from, kind.payload) if payload_from else None
    reach = cluster_capacity(cfg).max_cpus if not cfg.shards.workers else 0  # shard writers in flight, at least
    records = _write_shards(out, pos.ids, jobs, kind.sample, cfg.shards.workers, kind.decided_columns, payload, reach)
    shards = [ShardInfo(**records[n]["shard"]) for n in names]
    t3 = time.perf_counter()
    starts = np.array([a for a, _ in ranges], dtype=np.int64)
    _write_meta(out, pos.ids, summaries, kept_before, starts, names, kind.items)
    _remove_stale(out, cfg.corpus, set(names))
    if stages is not None:
        rows_in = int(sum(s["rows"] for s in summaries))
        n_bytes = sum(s.bytes for s in shards)
        stages += [
            StageSummary("dedup, decide", rows_in, int(kept.sum()), t1 - t0, note=f"{len(steps)} dedup steps"),
            StageSummary("plan, shards", int(kept.sum()), len(names), t3 - t1, "shards", f"{n_bytes / 1e6:,.1f} MB"),
            StageSummary("meta", rows_in, rows_in, time.perf_counter() - t3, "rows"),
        ]

    counts: Counter[str] = Counter()
    funnel_counts: Counter[str] = Counter()
    for s in summaries:
        counts.update(s["reasons"])
        funnel_counts.update(s["funnel"])
    funnel: dict[str, Any] = {"rows_in": int(sum(s["rows"] for s in summaries))}
    for k, v in sorted(funnel_counts.items()):  # "images.kept": n -> funnel["images"]["kept"] = n
        top, _, sub = k.partition(".")
        if sub:
            funnel.setdefault(top, {})[sub] = v
        else:
            funnel[k] = v
    funnel["dropped"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    funnel["kept"] = int(kept.sum())
    if thresholds:
        funnel["thresholds"] = [t.result for t in thresholds]
    extra = {"thresholds": funnel["thresholds"]} if thresholds else {}
    if provenance:
        extra["refiltered_from"] = provenance
    index = build_index(
        kind.name,
        cfg.corpus,
        shards,
        sum(records[n]["tokens"] for n in names),
        funnel=funnel,
        config=json.loads(json.dumps(to_dict(cfg), default=str)),  # the resolved run config, as plain JSON
        warnings=warnings,
        mm1data_version=__version__,
        run_id=run_id,
        **extra,
    )
    check()
    write_index(out, index)  # last: the run is complete when this exists
    return index


# ---- dedup ---------------------------------------------------------------------------------------------------


def _unit_blocks(n: int) -> int:
    return max(1, min(n, 1024))


def _candidates(batch: dict[str, np.ndarray], output: str, pos: Positions, steps: list) -> dict[str, np.ndarray]:
    """Ray task: units -> their kept rows' pos and each step's key columns (prefix _s{i}_)."""
    parts: list[dict[str, np.ndarray]] = []
    for u in batch["u"].tolist():
        cols = list(
            dict.fromkeys(["src_row", "drop_reason", *(c for s in steps for c in getattr(s, "columns", (s.column,)))])
        )  # a column read once
        t = read_unit_staged(output, pos.ids[u], columns=cols)
        if t is None:
            continue
        t = t.filter(pc.equal(t["drop_reason"], ""))
        part = {"pos": pos.encode(u, t["src_row"].to_numpy())}
        for i, s in enumerate(steps):
            part.update(s.candidates(t, f"_s{i}_"))
        parts.append(part)
    if not parts:  # still a batch with every column, so that all blocks share a schema
        empty = pa.table({"src_row": pa.array([], pa.int64())})
        part = {"pos": np.zeros(0, dtype=np.int64)}
        for i, s in enumerate(steps):
            part.update(s.candidates(empty, f"_s{i}_"))
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _dedup(output: str, pos: Positions, steps: list, added: dict[str, str]):
    """-> Dataset of marks (unit, pos, reason, *added) from every step, or None when the kind has no steps."""
    import ray

    if not steps:
        return None
    # a step with a side to build first (decontam.TextReference: the eval texts' index, in a Ray task)
    steps = [s.prepare() if hasattr(s, "prepare") else s for s in steps]
    cands = ray.data.from_items(
        [{"u": i} for i in range(len(pos.ids))], override_num_blocks=_unit_blocks(len(pos.ids))
    )
    cands = cands.map_batches(
        _candidates, batch_size=1, num_cpus=0.5, fn_kwargs={"output": output, "pos": pos, "steps": steps}
    ).materialize()
    n = cands.count()
    marks = []
    for i, step in enumerate(steps):
        if n == 0:
            break
        kept, m = step.apply(cands, f"_s{i}_", n, pos.keys)
        marks.append(m.map_batches(_complete_marks, fn_kwargs={"added": added}, batch_format="numpy"))
        if kept is None:
            if i != len(steps) - 1:
                raise ValueError(f"dedup step {step} must be the last (it does not pass on the rows it keeps)")
            break
        cands = kept.materialize()
        n = cands.count()
    if not marks:
        return None
    return marks[0].union(*marks[1:]) if len(marks) > 1 else marks[0]


def _complete_marks(b: dict[str, np.ndarray], added: dict[str, str]) -> pa.Table:
    """Every step's marks, and the one row per unit that makes every unit a group, in one schema: unit, pos,
    reason, and each added column (its default where not set)."""
    n = len(b["pos"])
    pos = np.asarray(b["pos"], dtype=np.int64)
    cols = {"unit": (pos >> POS_BITS) if "unit" not in b else np.asarray(b["unit"], dtype=np.int64), "pos": pos}
    table = pa.table({k: pa.array(v, pa.int64()) for k, v in cols.items()})
    table = table.append_column("reason", pa.array(np.asarray(b["reason"], dtype=object).tolist(), pa.string()))
    for col, default in added.items():
        values = b[col].tolist() if col in b else [default] * n
        table = table.append_column(col, pa.array(values, pa.string()))
    return table


# ---- decide --------------------------------------------------------------------------------------------------


LOCAL_MARKS = 4_000_000  # up to this many dedup marks (~100 MB) reach the decide tasks whole, without a shuffle


def _decide(kind: Kind, output: str, pos: Positions, marks, added: dict[str, str]) -> list[dict[str, Any]]:
    """Every unit's rows get their final drop reasons (and the added columns) in a decided file; -> a summary per
    unit, in unit order: rows, kept, kept_bytes, reasons, funnel.

    The marks go to their units by a shuffle grouped by unit; up to LOCAL_MARKS of them (a constant bound) are
    instead sorted by one task and handed whole to tasks over ranges of units: a shuffle costs seconds of fixed
    start-up, which would dominate a small run."""
    import ray

    n_units = len(pos.ids)
    if n_units == 0:
        return []
    fn_kwargs = {"kind": kind, "output": output, "pos": pos, "added": added}
    marks = marks.materialize() if marks is not None else None
    if marks is None or marks.count() <= LOCAL_MARKS:
        refs = []  # the marks, sorted by unit in one block (or more, if Ray cuts it by size)
        if marks is not None:
            sort = marks.repartition(1).map_batches(_sort_marks, batch_size=None, batch_format="pyarrow")
            refs = sort.materialize().to_arrow_refs()
        units = ray.data.from_items([{"unit": i} for i in range(n_units)], override_num_blocks=_unit_blocks(n_units))
        summaries = units.map_batches(_decide_units, batch_size=None, fn_kwargs={**fn_kwargs, "marks": refs})
    else:
        rows = ray.data.from_items(
            [{"unit": i, "pos": -1, "reason": ""} for i in range(n_units)], override_num_blocks=_unit_blocks(n_units)
        ).map_batches(_complete_marks, fn_kwargs={"added": added}, batch_format="numpy")
        groups = rows.union(marks).groupby("unit", num_partitions=max(1, min(n_units, 256)))
        summaries = groups.map_groups(_decide_group, batch_format="numpy", fn_kwargs=fn_kwargs)
    out = [json.loads(s) for b in summaries.iter_batches(batch_size=None) for s in b["summary"]]
    return sorted(out, key=lambda s: s["unit"])


def _sort_marks(t: pa.Table) -> pa.Table:
    return t.sort_by([("unit", "ascending"), ("pos", "ascending")])


def _decide_units(batch: dict[str, np.ndarray], marks: list, **kw: Any) -> dict[str, np.ndarray]:
    """Ray task: a range of units, with all the marks (few: sorted by unit) -> a summary per unit."""
    import ray

    tables = [t for t in ray.get(marks) if t.num_rows]  # (a step that marked nothing leaves a block without columns)
    table = pa.concat_tables(tables) if tables else None
    units = table["unit"].to_numpy() if table is not None else np.zeros(0, dtype=np.int64)
    out = []
    for u in batch["unit"].tolist():
        a, b = np.searchsorted(units, [u, u + 1])
        group = (
            {c: table[c].slice(a, b - a).to_numpy(zero_copy_only=False) for c in table.column_names} if b > a else {}
        )
        out.append(_decide_unit(u, group, **kw))
    return {"summary": np.array(out, dtype=object)}


def _decide_group(group: dict[str, np.ndarray], **kw: Any) -> dict[str, np.ndarray]:
    """One unit's group of the shuffle (its marks, and the row with pos -1 that every unit has) -> its summary."""
    m = group["pos"] >= 0
    return {"summary": np.array([_decide_unit(int(group["unit"][0]), {c: v[m] for c, v in group.items()}, **kw)])}


def _decide_unit(
    u: int, marks: dict[str, np.ndarray], kind: Kind, output: str, pos: Positions, added: dict[str, str]
) -> str:
    """Applies a unit's marks (pos, reason, added columns; {} for none) to its staged rows, writes its decided file;
    -> its summary as JSON."""
    summary = {"unit": u, "rows": 0, "kept": 0, "kept_bytes": 0, "reasons": {}, "funnel": {}}
    t = read_unit_staged(output, pos.ids[u], exclude=kind.payload)
    if t is not None:
        row_pos = pos.encode(u, t["src_row"].to_numpy())  # ascending: staged rows come sorted by src_row
        reason = t["drop_reason"].to_numpy(zero_copy_only=False).astype(object)
        extra = {col: np.full(t.num_rows, default, dtype=object) for col, default in added.items()}
        if marks:
            at = np.searchsorted(row_pos, marks["pos"])
            if at.max() >= len(row_pos) or not np.array_equal(row_pos[at], marks["pos"]):
                raise RuntimeError(f"unit {pos.ids[u]}: a dedup mark names a row that is not staged")
            new = marks["reason"].astype(object)
            set_reason = (new != "") & (reason[at] == "")
            reason[at[set_reason]] = new[set_reason]
            for col, default in added.items():  # another step's mark of the row leaves this column alone
                own = marks[col] != default
                extra[col][at[own]] = marks[col][own]
        t = t.set_column(t.column_names.index("drop_reason"), "drop_reason", pa.array(reason.tolist(), pa.string()))
        for col, values in extra.items():
            t = t.append_column(col, pa.array(values.tolist(), pa.string()))
        if kind.decided is not None:
            t = kind.decided(t)
            reason = t["drop_reason"].to_numpy(zero_copy_only=False).astype(object)
        _write_parquet(decided_uri(output, pos.ids[u]), t)
        kept = reason == ""
        sizes = t[kind.size_col].to_numpy() if kind.size_col in t.column_names else np.zeros(t.num_rows, np.int64)
        summary.update(
            rows=t.num_rows,
            kept=int(kept.sum()),
            kept_bytes=int(sizes[kept].sum()),
            reasons=dict(Counter(r for r in reason.tolist() if r)),
            funnel=kind.funnel(t),
        )
    return json.dumps(summary)


def _write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue())


def _read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_seekable(uri) as f:
        return pq.ParquetFile(f).read(columns=columns)


# ---- plan ----------------------------------------------------------------------------------------------------


def _segments(kept_before: np.ndarray, a: int, b: int) -> list[tuple[int, int, int]]:
    """Kept ranks [a, b) of the whole run -> [(unit, first, stop)] ranges of kept rows inside units."""
    out = []
    u = int(np.searchsorted(kept_before, a, side="right")) - 1
    while a < b:
        hi = min(b, int(kept_before[u + 1]))
        if hi > a:
            out.append((u, a - int(kept_before[u]), hi - int(kept_before[u])))
        a, u = hi, u + 1
    return out


def _plan(
    output: str, pos: Positions, size_col: str, cfg: ShardConfig, kept_before: np.ndarray, kept_bytes: np.ndarray
) -> list[tuple[int, int]]:
    """Shards as ranges of kept ranks in input order: every samples_per_shard samples, and where a slot of that many
    may hold more than bytes_per_shard (judged from whole units' bytes), cut further by a Ray task that reads the
    slot's sample sizes (a single larger sample gets a shard of its own)."""
    import ray

    total, step = int(kept_before[-1]), cfg.samples_per_shard
    bytes_before = np.r_[0, np.cumsum(kept_bytes, dtype=np.int64)]
    slots = [(a, min(a + step, total)) for a in range(0, total, step)]
    out: list[tuple[int, int]] = []
    pending = {}
    for i, (a, b) in enumerate(slots):
        lo = int(np.searchsorted(kept_before, a, side="right")) - 1
        hi = int(np.searchsorted(kept_before, b - 1, side="right")) - 1
        if bytes_before[hi + 1] - bytes_before[lo] > cfg.bytes_per_shard:
            cut = ray.remote(num_cpus=0.25)(_byte_cuts)
            pending[i] = cut.remote(output, pos.ids, _segments(kept_before, a, b), size_col, cfg)
    cuts = dict(zip(pending, ray.get(list(pending.values()))))
    for i, (a, b) in enumerate(slots):
        out += [(a + x, a + y) for x, y in cuts.get(i, [(0, b - a)])]
    return out


def _byte_cuts(
    output: str, ids: list[str], segments: list[tuple[int, int, int]], size_col: str, cfg: ShardConfig
) -> list[tuple[int, int]]:
    sizes = []
    for u, lo, hi in segments:
        t = _read_parquet(decided_uri(output, ids[u]), [size_col, "drop_reason"])
        kept = t[size_col].to_numpy()[t["drop_reason"].to_numpy(zero_copy_only=False) == ""]
        sizes.append(kept[lo:hi])
    return plan_shards(np.concatenate(sizes).tolist(), cfg.samples_per_shard, cfg.bytes_per_shard)


# ---- shards and meta ------------------------------------------------------------------------------------------


def _record_uri(output: str, name: str) -> str:
    return staging_uri(output, "shards", name + ".json")


def write_shard(
    output: str,
    name: str,
    ids: list[str],
    segments: list[tuple[int, int, int]],
    build: SampleBuilder,
    decided_cols: tuple[str, ...] = (),
    payload: tuple[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Ray task: one shard from kept rows [(unit, first, stop)], in order. A shard committed earlier with the same
    samples is kept as it is; otherwise it is written whole, then its record. `decided_cols` are taken from the
    decided rows, not from staging (the columns a kind's `decided` hook changes). `payload` (output, columns): read
    those columns from that output's staging parts of the same names (a refiltered output stages no payload)."""
    rows = []  # (unit id, part, row in part), in order
    keys: list[str] = []
    decided: dict[tuple[str, str, int], dict[str, Any]] = {}
    for u, lo, hi in segments:
        t = _read_parquet(decided_uri(output, ids[u]), ["key", "drop_reason", *INTERNAL, *decided_cols])
        t = t.filter(pc.equal(t["drop_reason"], "")).slice(lo, hi - lo)
        keys += t["key"].to_pylist()
        here = list(zip([ids[u]] * t.num_rows, t["_part"].to_pylist(), t["_row"].to_pylist()))
        rows += here
        if decided_cols:
            decided.update(zip(here, t.select(list(decided_cols)).to_pylist()))
    fingerprint = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    rec_uri = _record_uri(output, name)
    if storage.exists(rec_uri):
        rec = json.loads(storage.read_bytes(rec_uri))
        if rec["fingerprint"] == fingerprint and storage.exists(storage.join(output, name)):
            return rec  # committed by an earlier run: not redone
    needed: dict[tuple[str, str], list[int]] = {}
    for unit, part, r in rows:
        needed.setdefault((unit, part), []).append(r)
    staged: dict[tuple[str, str, int], dict[str, Any]] = {}  # the staged rows, payload included
    for (unit, part), rs in needed.items():
        table = _read_parquet(storage.join(unit_dir(output, unit), part)).take(rs)
        if payload is not None:  # the same rows in the same order: refilter writes a part per source part
            src = _read_parquet(storage.join(unit_dir(payload[0], unit), part), list(payload[1])).take(rs)
            for c in src.column_names:
                table = table.append_column(c, src[c])
        staged.update(zip(((unit, part, r) for r in rs), table.to_pylist()))
    writer = TarShardWriter(storage.join(output, name))
    tokens = 0
    try:
        for row in rows:
            members, n_tokens = build({**staged[row], **decided[row]} if decided_cols else staged[row])
            writer.write(members, num_images=sum(1 for m in members if m.rsplit(".", 1)[-1] in IMAGE_EXTS))
            tokens += n_tokens
    except BaseException:
        writer.abort()
        raise
    info = writer.close()
    record = {"fingerprint": fingerprint, "tokens": tokens, "shard": asdict(info)}
    storage.write_bytes(rec_uri, json.dumps(record).encode())
    return record


def _write_shards(
    output: str,
    ids: list[str],
    jobs: list,
    build: SampleBuilder,
    workers: int,
    decided_cols: tuple[str, ...] = (),
    payload: tuple[str, tuple[str, ...]] | None = None,
    reach: int = 0,
) -> dict[str, dict[str, Any]]:
    """Runs write_shard for every job, at most `workers` at a time; -> {name: record}. `workers` 0: one per CPU the
    cluster has, read again every few seconds (nodes that join mid-run get shards too), and at least `reach` (the
    CPUs it can grow to: tasks queued beyond the CPUs there are are what makes the autoscaler add workers)."""
    import ray

    records: dict[str, dict[str, Any]] = {}
    if not jobs:
        return records
    live, n, checked = workers == 0, workers, -float("inf")

    def limit() -> int:
        nonlocal n, checked
        if live and time.monotonic() - checked > CPU_RECHECK_S:
            n, checked = max(1, reach, int(ray.cluster_resources().get("CPU", 1))), time.monotonic()
        return n

    remote = ray.remote(num_cpus=1, max_retries=3)(write_shard)
    ids_ref, build_ref = ray.put(ids), ray.put(build)
    pending = []
    bar = Progress("shards", len(jobs), "shards")

    def collect(done: list) -> None:
        for rec in ray.get(done):
            records[rec["shard"]["path"]] = rec
            bar.update(1)

    for name, segments in jobs:
        if len(pending) >= limit():
            done, pending = ray.wait(pending, num_returns=1)
            collect(done)
        pending.append(remote.remote(output, name, ids_ref, segments, build_ref, decided_cols, payload))
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        collect(done)
    bar.close()
    return records


def write_meta_part(
    output: str,
    j: int,
    ids: list[str],
    units: list[tuple[int, int]],
    shard_starts: np.ndarray,
    names: list[str],
    items: tuple[str, Callable[[pa.Table], pa.Table]] | None = None,
) -> None:
    """Ray task: meta/part-{j}.parquet from the decided files of `units` [(unit, its first kept rank)], each kept row
    with its shard's name. Units are written one at a time (a row group each): the task holds one unit's rows."""
    uris = [decided_uri(output, ids[u]) for u, _ in units]
    schemas = []
    for uri in uris:
        with storage.open_seekable(uri) as f:
            schemas.append(pq.ParquetFile(f).schema_arrow)
    empty = pa.schema([(c, pa.string()) for c in ("key", "src_file", "drop_reason")])  # a run with no rows at all
    schema = pa.unify_schemas(schemas) if schemas else empty
    schema = pa.schema([f for f in schema if f.name not in INTERNAL]).append(pa.field("shard", pa.string()))
    buf, item_buf = io.BytesIO(), io.BytesIO()
    # the item rows (e.g. an interleaved part's images) stream into their own part beside, a unit at a time: every
    # unit's rows have the unified schema, so its item rows all have the empty table's
    item_schema = items[1](schema.empty_table()).schema if items is not None else None
    item_writer = pq.ParquetWriter(item_buf, item_schema, compression="zstd") if items is not None else None
    with pq.ParquetWriter(buf, schema, compression="zstd") as writer:
        for uri, (_, first_rank) in zip(uris, units):
            t = _read_parquet(uri)
            kept = t["drop_reason"].to_numpy(zero_copy_only=False) == ""
            shard = np.full(t.num_rows, "", dtype=object)
            ranks = first_rank + np.arange(int(kept.sum()))
            shard[kept] = np.asarray(names, dtype=object)[np.searchsorted(shard_starts, ranks, side="right") - 1]
            t = t.drop_columns(list(INTERNAL)).append_column("shard", pa.array(shard.tolist(), pa.string()))
            t = pa.table({f.name: _column(t, f) for f in schema}, schema=schema)
            writer.write_table(t)
            if item_writer is not None:  # in slices: an item builder may hold its rows as Python objects
                for a in range(0, t.num_rows, ITEM_SLICE):
                    item_writer.write_table(items[1](t.slice(a, ITEM_SLICE)).cast(item_schema))
    if item_writer is not None:  # the item rows first: a part exists only once its items do
        item_writer.close()
        storage.write_bytes(storage.join(output, f"meta_{items[0]}", f"part-{j:06d}.parquet"), item_buf.getvalue())
    storage.write_bytes(storage.join(output, "meta", f"part-{j:06d}.parquet"), buf.getvalue())


def _column(t: pa.Table, field: pa.Field) -> pa.Array:
    """t's column as `field` says, or nulls where this unit's table lacks it."""
    if field.name not in t.column_names:
        return pa.nulls(t.num_rows, field.type)
    return t[field.name].cast(field.type)


def _write_meta(
    output: str,
    ids: list[str],
    summaries: list[dict],
    kept_before: np.ndarray,
    starts: np.ndarray,
    names: list[str],
    items: tuple[str, Callable[[pa.Table], pa.Table]] | None = None,
) -> None:
    """Meta parts of about META_ROWS rows each, from consecutive units; stale parts of an earlier, larger run go."""
    import ray

    groups: list[list[tuple[int, int]]] = [[]]
    rows = 0
    for s in summaries:
        if not s["rows"]:
            continue
        if rows and rows + s["rows"] > META_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append((s["unit"], int(kept_before[s["unit"]])))
        rows += s["rows"]
    remote = ray.remote(num_cpus=0.5, max_retries=3)(write_meta_part)
    ids_ref, starts_ref, names_ref = ray.put(ids), ray.put(starts), ray.put(names)
    pending = [remote.remote(output, j, ids_ref, g, starts_ref, names_ref, items) for j, g in enumerate(groups)]
    bar = Progress("meta", len(pending), "parts")
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
        bar.update(1)
    bar.close()
    written = {f"part-{j:06d}.parquet" for j in range(len(groups))}
    for folder in ["meta"] + ([f"meta_{items[0]}"] if items else []):
        for f in storage.list_files(storage.join(output, folder), recursive=False):
            name = f.rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".parquet") and name not in written:
                storage.delete(f)


def _remove_stale(output: str, corpus: str, keep: set[str]) -> None:
    """Shards an earlier, different plan of this output wrote (they have a record) and temporary files of a killed
    run: remove both, so a directory listing (e.g. read_webdataset(dir)) sees only real shards. Files this project
    did not write are left alone."""
    records = storage.list_files(staging_uri(output, "shards"))
    ours = {f.rsplit("/", 1)[-1][: -len(".json")] for f in records if f.endswith(".json")}
    for f in storage.list_files(output, recursive=False):
        name = f.rsplit("/", 1)[-1]
        tar = name[: -len(".idx")] + ".tar" if name.endswith(".idx") else name
        if name.startswith(storage.TMP_PREFIX) or (tar in ours and tar not in keep and name.startswith(f"{corpus}-")):
            storage.delete(f)
    for f in storage.list_files(storage.join(output, "meta"), recursive=False):
        if f.rsplit("/", 1)[-1].startswith(storage.TMP_PREFIX):
            storage.delete(f)
    for name in ours - keep:
        storage.delete(_record_uri(output, name))
