"""`mm1data refilter`: a new output (shards, meta, index.json) from an existing output's staging with another filter
chain and other dedup / shard settings: no download and no model scoring again.

  plan      the source's index.json (kind, resolved config, run id); its units planned again from the input's
            listing and footers (no rows read), checked against the source's run.json; the new chain checked
  restage   a Ray task per unit: each source staging part -> a part of the same name under NEW/_staging/rows, its
            rows decided again by the new chain, without the payload columns (the shard writers read those from the
            source's parts: a part's rows keep their order, so `_part`/`_row` name the same row in both)
  finalize  split.finalize on NEW, as `mm1data run` ends: percentile thresholds, dedup, shards, meta, index.json

How a row is decided again:
- A row the source dropped before its filters (a download or read failure: a reason that is no filter name of the
  source's chain, nor `not_scored`) stays dropped with its reason. Every other row (kept, or dropped by a filter) is
  decided by the new chain, in the order a run applies it: filters that need no scorer, then those on each scorer's
  column, then late.
- A filter's score comes from its staged column; where the column is missing, or NaN on a row the source had dropped
  (a filter that skips dropped rows did not score it), it is computed from the staged row when the filter needs no
  scorer stage (text and image-size rules, lid.176 on the CPU). A scorer's column (clip_score, image_relevance) is
  never computed: a row the source dropped before its scorer ran has NaN there and gets drop_reason `not_scored` when
  the new chain would reach that filter with it; a scorer the source did not run is a ConfigError naming it.
- The kind's own stages placed after the filters that need no model (text: exact and MinHash hashes; interleaved:
  the document finish) run again on the rows kept now that the source had dropped, or on every kept row when their
  settings changed (e.g. dedup.minhash.*); a model stage there (recaption) does not: a row brought back has no
  synthetic caption.
- Interleaved: the position-level filters (img_*, para_*) write seg_reason, which decides the paragraphs that the
  document filters and the relevance scorer saw; a new chain must keep them exactly as the source ran them
  (ConfigError otherwise); document filters and doc_images are decided again.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mm1data import storage
from mm1data.config import ConfigError, apply_overrides, from_dict, parse_override, short, to_dict
from mm1data.filters import FilterConfig, parse_chain
from mm1data.filters.base import cached_chain
from mm1data.pipelines.runner import Capacity, unscored
from mm1data.read import units_digest
from mm1data.registry import get_filter
from mm1data.staging import COMMON_TYPES, mark_staged, pending_units, staging_uri, unit_dir, unit_parts

log = logging.getLogger(__name__)
NOT_SCORED = "not_scored"  # a row brought back that its source never scored with a model the new chain thresholds
SETTABLE = ("dedup.", "shards.")  # --set keys refilter takes; the rest was fixed when the source was staged


def resolved_chain(entries: Any) -> tuple[FilterConfig, ...]:
    """The chain as index.json's config holds it (to_dict of FilterConfigs) -> FilterConfigs."""
    out = []
    for e in entries or ():
        if not isinstance(e, dict) or "name" not in e:
            raise ConfigError(f"not a resolved filter chain entry: {short(e)}")
        out.append(FilterConfig(**{f.name: e[f.name] for f in dataclasses.fields(FilterConfig) if f.name in e}))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """What each restage task gets: the new chain in evaluation order, the source's filter names, the stages to run
    again on rows brought back."""

    source: str  # the output whose staging parts are read
    payload_from: str  # the output whose staging parts hold the payload columns (the source, or its own source)
    output: str
    payload: tuple[str, ...]
    old_names: frozenset[str]  # drop reasons the new chain decides again
    chain: tuple[FilterConfig, ...]  # scalar filters in the order a run applies them
    after: tuple[tuple[Any, Any, bool], ...]  # (function, its cfg, run on every kept row) of the no-model after stages
    types: dict[str, pa.DataType]


def refilter(
    source: str,
    filters: str,
    output: str,
    overrides: list[str] = (),
    address: str | None = None,
    search_dirs: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write NEW from SOURCE's staging with the chain `filters` (a file or preset name); returns NEW's index.json.
    Rerunning after a crash finishes it; another chain on the same NEW is refused, as `mm1data run` refuses."""
    from mm1data.lease import OutputLease
    from mm1data.pipelines import PIPELINES
    from mm1data.pipelines.runner import absolute, init_ray
    from mm1data.split import finalize
    from mm1data.staging import check_run

    source, output = (absolute(u.rstrip("/")) for u in (source, output))
    if source == output:
        raise ConfigError(f"refilter writes a new output: --output must not be the source ({source})")
    index = _source_index(source)
    if index.get("kind") not in PIPELINES:
        raise ConfigError(f"{source}/index.json: unknown corpus kind {short(index.get('kind'))}")
    kind = importlib.import_module(PIPELINES[index["kind"]]).KIND
    sets = [parse_override(o) for o in overrides]
    for key, _ in sets:
        if not key.startswith(SETTABLE):
            raise ConfigError(
                f"refilter --set takes dedup.* and shards.* keys (the rest was fixed when {source} was staged), "
                f"got {short(key)}"
            )
    raw = kind.upgrade(json.loads(json.dumps(index["config"])))
    old_cfg = from_dict(kind.config, raw)
    old_chain = resolved_chain(raw.get("filters"))
    cfg = from_dict(kind.config, apply_overrides(raw, sets))
    chain = parse_chain(filters, search_dirs)
    _check_chain(kind, old_cfg, old_chain, chain, source)
    kind.dedup(cfg)  # builds (and checks: dedup.reference) the dedup steps before Ray starts, as `run` does

    units = _units(source, old_cfg)
    prov = index.get("refiltered_from") or {}
    payload_from = prov.get("payload", source)
    cfg = dataclasses.replace(cfg, output=output, filters=tuple(to_dict(chain)))
    old_stages = {s.fn: s.cfg for s in kind.stages(old_cfg, Capacity()) if s.place == "after"}
    after = tuple(
        (s.fn, s.cfg, to_dict(s.cfg) != to_dict(old_stages.get(s.fn)))
        for s in kind.stages(cfg, Capacity())
        if s.place == "after" and not isinstance(s.fn, type)
    )
    plan = Plan(
        source=source,
        payload_from=payload_from,
        output=output,
        payload=kind.payload,
        old_names=frozenset([*(c.name for c in old_chain), NOT_SCORED]),  # a refiltered source's not_scored too
        chain=_evaluation_order(kind, cfg, chain),
        after=after,
        types={**COMMON_TYPES, **kind.columns},
    )
    fingerprint = {
        "source": source,
        "source_run_id": index.get("run_id"),
        "units": units_digest(units),  # as a run's run.json has it: a refilter of NEW checks it
        "filters": [c.per_row() for c in chain],  # the percentiles are decided in finalize, from NEW's staging
        "after": json.dumps([to_dict(c) for _, c, _ in after], default=str, sort_keys=True),
    }
    provenance = {"output": source, "run_id": index.get("run_id"), "payload": payload_from}
    lease = OutputLease(output)
    with lease:
        try:
            run_id = check_run(output, fingerprint, cfg.corpus)
        except ConfigError:
            lease.release_unused()
            raise
        init_ray(address)
        _restage(plan, units)
        lease.check()
        warnings = list(index.get("warnings", []))
        return finalize(
            kind, cfg, units, run_id, warnings, lease.check, payload_from=payload_from, provenance=provenance
        )


def _source_index(source: str) -> dict[str, Any]:
    try:
        index = json.loads(storage.read_bytes(storage.join(source, "index.json")))
    except Exception as e:
        raise ConfigError(f"{source} is no finished mm1data output (its index.json: {type(e).__name__}: {e})") from e
    if not storage.exists(staging_uri(source, "staged.json")):
        raise ConfigError(f"{source} has no complete staging (_staging/staged.json): refilter reads rows from there")
    if not isinstance(index, dict) or not isinstance(index.get("config"), dict):
        raise ConfigError(f"{source}/index.json has no run config: refilter decides again from the config it ran")
    return index


def _units(source: str, cfg: Any) -> list:
    """The source's units, planned again from its input (listing and footers) and checked against its run.json."""
    from mm1data.read import plan_units

    try:
        units = plan_units(cfg.input)
    except ConfigError as e:
        raise ConfigError(f"refilter plans {source}'s units from its input again (no rows are read): {e}") from e
    try:
        run = json.loads(storage.read_bytes(staging_uri(source, "run.json")))
    except Exception as e:  # removed or damaged: nothing says which input the rows were staged from
        raise ConfigError(f"{source}: its _staging/run.json does not read ({type(e).__name__}: {e})") from e
    if run.get("units") != units_digest(units):
        raise ConfigError(f"{cfg.input.path} is no longer the input {source} was staged from (its units differ)")
    return units


def _check_chain(kind: Any, cfg: Any, old: tuple[FilterConfig, ...], new: tuple[FilterConfig, ...], src: str) -> None:
    for name, missing, how in unscored(kind, cfg, new):
        raise ConfigError(
            f"filter {name} needs the model score {', '.join(missing)}, which {src} did not stage ({how}): "
            "refilter does not score; run `mm1data run` with it"
        )
    old_pos = [c for c in old if not get_filter(c.name).scalar]
    new_pos = [c for c in new if not get_filter(c.name).scalar]
    if old_pos != new_pos:
        differ = next((a.name for a, b in zip(old_pos, new_pos) if a != b), None)
        differ = differ or (old_pos[len(new_pos)].name if len(old_pos) > len(new_pos) else new_pos[len(old_pos)].name)
        raise ConfigError(
            f"refilter keeps the position-level filters (img_*, para_*) as {src} ran them, and {differ} differs: "
            "their seg_reason decided what the document filters and the relevance scorer saw; run `mm1data run`"
        )


def _evaluation_order(kind: Any, cfg: Any, chain: tuple[FilterConfig, ...]) -> tuple[FilterConfig, ...]:
    """The scalar filters in the order runner.build applies them: no scorer needed, then each scorer stage's, late."""
    scalar = [c for c in chain if get_filter(c.name).scalar]
    late = [c for c in scalar if get_filter(c.name).late]
    order = [c for c in scalar if not get_filter(c.name).needs and c not in late]
    for s in kind.stages(cfg, Capacity()):
        if s.place == "score":
            order += [c for c in scalar if set(get_filter(c.name).needs) & set(s.provides) and c not in late]
    return tuple(order + late)


# ---- restage (Ray tasks) ---------------------------------------------------------------------------------------


def _restage(plan: Plan, units: list) -> None:
    """Every unit NEW has not restaged yet, a Ray task each; then NEW's staged.json (its per-row half is done)."""
    import ray

    from mm1data.progress import Progress

    todo = pending_units(plan.output, units)
    log.info("refilter: %d units, %d to restage", len(units), len(todo))
    if todo:
        ds = ray.data.from_items([{"unit": u.id} for u in todo], override_num_blocks=max(1, min(len(todo), 1024)))
        bar = Progress("refilter: restage", len(todo), "units")
        for b in ds.map_batches(restage_units, batch_size=1, num_cpus=0.5, fn_kwargs={"plan": plan}).iter_batches(
            batch_size=None
        ):
            bar.update(len(b["rows"]))
        bar.close()
    mark_staged(plan.output, len(units))


def restage_units(batch: dict[str, np.ndarray], plan: Plan) -> dict[str, np.ndarray]:
    """Ray task: units -> their source parts decided again, written under NEW; then each unit's done marker."""
    filters = cached_chain(plan.chain).filters  # once per worker process: lang loads its model there
    rows = []
    for unit in batch["unit"].tolist():
        n = 0
        for uri in unit_parts(plan.source, unit):
            name = uri.rsplit("/", 1)[-1]
            with storage.open_seekable(uri) as f:
                pf = pq.ParquetFile(f)
                t = pf.read(columns=[c for c in pf.schema_arrow.names if c not in plan.payload])

            def payload(name: str = name, unit: str = unit) -> pa.Table:
                with storage.open_seekable(storage.join(unit_dir(plan.payload_from, unit), name)) as f:
                    return pq.ParquetFile(f).read(columns=list(plan.payload))

            t = redecide(t, plan, filters, payload)
            buf = io.BytesIO()
            pq.write_table(t, buf, compression="zstd")
            storage.write_bytes(storage.join(unit_dir(plan.output, unit), name), buf.getvalue())
            n += t.num_rows
        storage.write_bytes(staging_uri(plan.output, "done", unit), b"")
        rows.append(n)
    return {"rows": np.array(rows, dtype=np.int64)}


class Columns(dict):
    """A part's columns by name, its payload columns (image bytes, texts) read on first use, all at once, by `load`:
    a filter that reads only captions or sizes never reads the part's images."""

    def __init__(self, columns: dict[str, np.ndarray], lazy: tuple[str, ...], load: Any) -> None:
        super().__init__(columns)
        self.lazy, self._load = lazy, load

    def __missing__(self, key: str) -> np.ndarray:
        if key not in self.lazy or self._load is None:
            raise KeyError(key)
        load, self._load = self._load, None
        self.update(load())
        return self[key]

    def load(self) -> None:
        if self._load is not None and self.lazy:
            self.__missing__(self.lazy[0])


def redecide(t: pa.Table, plan: Plan, filters: list, payload: Any) -> pa.Table:
    """One staged part (no payload columns) -> the same rows decided again by the new chain's `filters` (see the
    module doc). `payload()` reads the part's payload columns, called only when a filter or a stage reads them."""
    old = t["drop_reason"].to_numpy(zero_copy_only=False).astype(object)
    redo = (old == "") | np.isin(old, list(plan.old_names))

    def read() -> dict[str, np.ndarray]:
        p = payload()
        return {c: p[c].to_numpy(zero_copy_only=False) for c in p.column_names}

    batch = Columns({c: _numpy(t[c]) for c in t.column_names}, plan.payload, read)
    initial = dict(batch)
    batch["drop_reason"] = np.where(redo, "", old).astype(object)

    for f in filters:
        alive = batch["drop_reason"] == ""
        if f.needs:  # a scorer's column: never computed here
            s = np.asarray(type(f).score(f, batch), dtype=np.float32)
            unscored = alive & np.isnan(s) & (old != "")
            batch["drop_reason"] = np.where(unscored, NOT_SCORED, batch["drop_reason"]).astype(object)
        else:
            staged = batch.get(f.name)
            s = np.full(len(old), np.nan, np.float32) if staged is None else staged.astype(np.float32)
            need = alive & ((np.isnan(s) & (old != "")) if staged is not None else True)
            if need.any():
                s = s.copy()
                s[need] = _on_rows(lambda sub, f=f: type(f).score(f, sub), batch, np.flatnonzero(need))
        f.score = lambda b, s=s: s  # this filter's own thresholds (and lang's top-1 rule) on these scores
        batch = f(batch)
        del f.score

    kept = batch["drop_reason"] == ""
    for fn, cfg, everywhere in plan.after:  # e.g. the hashes of the rows brought back
        rows = np.flatnonzero(kept if everywhere else kept & (old != ""))
        if len(rows):
            batch.load()  # a stage may read the payload by another route than batch[name] (iteration, .get)
            _on_rows(lambda sub, fn=fn, cfg=cfg: fn(sub, cfg=cfg), batch, rows)
        kept = batch["drop_reason"] == ""
    changed = [k for k, v in batch.items() if k not in plan.payload and (k not in initial or v is not initial[k])]
    for k in changed:
        t = _set_column(t, k, batch[k], plan.types.get(k))
    return t


def _numpy(col: pa.ChunkedArray) -> np.ndarray:
    """A staged column as numpy; an integer column with nulls (a pHash) or a list of integers (image_phash) as Python
    objects: to_numpy would make them float64, which cannot hold 64 bits (and cannot go back to int64 with NaNs)."""
    listed = pa.types.is_list(col.type) and pa.types.is_integer(col.type.value_type)
    if listed or (pa.types.is_integer(col.type) and col.null_count):
        out = np.empty(len(col), dtype=object)
        out[:] = col.to_pylist()
        return out
    return col.to_numpy(zero_copy_only=False)


def _on_rows(fn: Any, batch: dict[str, np.ndarray], rows: np.ndarray) -> Any:
    """fn on the sub-batch of `rows`; the columns it adds or replaces (lang's lang_id, a stage's hashes) are merged
    back into the batch at those rows. -> what fn returned."""
    lazy = tuple(k for k in getattr(batch, "lazy", ()) if k not in batch)  # payload not read yet: read on demand
    sub = Columns({k: v[rows] for k, v in batch.items()}, lazy, lambda: {k: batch[k][rows] for k in lazy})
    before = dict(sub)
    res = fn(sub)
    out = res if isinstance(res, dict) else sub
    _merge(batch, {k: v for k, v in out.items() if k not in lazy and (k not in before or v is not before[k])}, rows)
    return res


def _merge(batch: dict[str, np.ndarray], sub: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Write a sub-batch's columns back into the batch at `rows` (new columns get None elsewhere)."""
    n = len(batch["drop_reason"])
    for k, v in sub.items():
        v = np.asarray(v) if not isinstance(v, np.ndarray) else v
        if v.ndim == 2:  # equal-length lists (MinHash bands): one list per row
            rows_v = np.empty(len(v), dtype=object)
            rows_v[:] = [r.tolist() for r in v]
            v = rows_v
        cur = batch.get(k)
        if cur is None or cur.dtype == object or v.dtype == object or cur.dtype != v.dtype:
            out = np.empty(n, dtype=object)
            out[:] = list(cur) if cur is not None else [None] * n
            for j, r in enumerate(rows.tolist()):
                out[r] = v[j]
        else:
            out = cur.copy()
            out[rows] = v
        batch[k] = out


def _set_column(t: pa.Table, name: str, values: np.ndarray, declared: pa.DataType | None) -> pa.Table:
    """The column `name` of the part, replaced (or added) with `values`, in the part's type where it had one."""
    kind = t.schema.field(name).type if name in t.column_names else declared
    if values.dtype == object:
        values = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
    arr = pa.array(values, type=kind)
    if name in t.column_names:
        return t.set_column(t.column_names.index(name), name, arr)
    return t.append_column(name, arr)
