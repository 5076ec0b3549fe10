"""Text-only documents: read -> filter -> hash (exact + MinHash bands) -> stage, then exact and near-dup -> shards."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mm1data.config import ConfigError, to_dict
from mm1data.dedup import MinHashConfig, mark_duplicates, minhash_bands, near_duplicates, text_fingerprints
from mm1data.filters import FilterConfig, apply_chain, parse_chain
from mm1data.read import TextInputConfig, Unit, plan_units, read_text_unit
from mm1data.registry import get_filter
from mm1data.schema import TextDoc, count_tokens
from mm1data.split import ShardConfig, finalize
from mm1data.stage import Batch
from mm1data.staging import (
    read_pending,
    read_staged,
    rows_dir,
    unit_specs,
    write_staging,
)

log = logging.getLogger(__name__)
KIND = "text"


@dataclass(frozen=True)
class TextDedupConfig:
    exact: bool = True  # drop_reason dup_text: the same normalised text earlier in the input
    minhash: MinHashConfig = field(default_factory=MinHashConfig)  # drop_reason dup_near (MinHash-LSH)


@dataclass(frozen=True)
class Config:
    pipeline: str = KIND
    corpus: str = KIND  # shard name prefix: {corpus}-000000.tar
    output: str = ""  # corpus root, local or s3:// (the --output flag sets it)
    input: TextInputConfig = field(default_factory=TextInputConfig)
    filters: str | tuple[dict, ...] = ()  # a chain file (path or preset name in filters/) or an inline list
    dedup: TextDedupConfig = field(default_factory=TextDedupConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    batch_size: int = 256  # documents per filter / hashing task


def hash_texts(batch: Batch, cfg: TextDedupConfig) -> Batch:
    """-> + text_hash (exact-dup key of the normalised text), mh_bands (LSH band hashes; zeros if not hashed).

    Only kept rows are MinHashed: a document a filter dropped never takes part in near-dup removal."""
    texts = batch["text"]
    kept = np.flatnonzero(batch["drop_reason"] == "")
    batch["text_hash"] = text_fingerprints(texts.tolist()) if cfg.exact else np.full(len(texts), "", dtype=object)
    if cfg.minhash.enabled:
        bands = np.zeros((len(texts), cfg.minhash.bands), dtype=np.uint64)
        if len(kept):
            bands[kept] = minhash_bands(texts[kept].tolist(), cfg.minhash)
        batch["mh_bands"] = bands
    return batch


def dedup(table: pa.Table, reason: np.ndarray, cfg: TextDedupConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Exact (dup_text), then near duplicates (dup_near) among the rows still kept; the first in input order stays.

    Adds dup_cluster: for a row in a near-duplicate cluster, the key of the cluster's kept document ("" otherwise).
    """
    import ray

    if cfg.exact:
        reason = mark_duplicates(table["text_hash"].to_numpy(zero_copy_only=False).astype(object), reason, "dup_text")
    cluster_key = np.full(table.num_rows, "", dtype=object)
    if cfg.minhash.enabled:
        pos = np.flatnonzero(reason == "")
        ds = ray.data.from_arrow(pa.table({"pos": pa.array(pos, pa.int64()), "mh_bands": table["mh_bands"].take(pos)}))
        members, clusters = near_duplicates(ds, cfg.minhash, id_col="pos", bands_col="mh_bands")
        keys = table["key"].to_numpy(zero_copy_only=False)
        cluster_key[members] = keys[clusters]
        reason = reason.copy()
        reason[members[members != clusters]] = "dup_near"  # every member but the cluster's first document
    return reason, {"dup_cluster": cluster_key}


# staged columns that are not sample metadata (tar members, internal, dedup hashes)
NOT_IN_JSON = {"text", "extra", "drop_reason", "src_file", "src_row", "key", "mh_bands", "text_hash"}


def build_sample(row: dict[str, Any]) -> tuple[dict[str, bytes], int]:
    """A staged row -> the tar members of one TextDoc ({key}.txt, {key}.json) and its tokens.

    The json holds the input's extra columns, then mm1data's fields (id, url, scores, source, row), which win."""
    meta = json.loads(row["extra"] or "{}")
    meta.update((k, None if isinstance(v, float) and v != v else v) for k, v in row.items() if k not in NOT_IN_JSON)
    tokens = count_tokens(row["text"])
    meta.update(source=row["src_file"], row=row["src_row"], tokens=tokens)
    return TextDoc(row["key"], row["text"], meta).to_members(), tokens


def _fingerprint(cfg: Config, chain: tuple[FilterConfig, ...], units: list[Unit]) -> dict[str, Any]:
    """What staged rows depend on; a rerun with a different one would mix incompatible rows."""
    rows = json.dumps([(u.source, u.start, u.stop) for u in units]).encode()
    return {
        "input": to_dict(cfg.input),
        "input_rows": hashlib.sha256(rows).hexdigest(),
        "filters": to_dict(chain),
        "hashes": {"exact": cfg.dedup.exact, "minhash": to_dict(cfg.dedup.minhash)},
    }


def run(cfg: Config, search_dirs: tuple[str, ...] = (), address: str | None = None) -> dict[str, Any]:
    """Run (or finish, after a crash) the text job; returns the index.json it wrote."""
    from mm1data.pipelines import stage_units

    chain = parse_chain(cfg.filters, search_dirs)
    needs = sorted({n for c in chain for n in get_filter(c.name).needs})
    if needs:
        raise ConfigError(f"the text pipeline has no scorer for {', '.join(needs)} (filters need it)")
    units = plan_units(cfg.input)
    stage_units(
        cfg.output, units, _fingerprint(cfg, chain, units), address, lambda todo, done: build(cfg, todo, done, chain)
    )

    t0 = time.perf_counter()
    index = finalize(
        cfg.output,
        KIND,
        cfg.corpus,
        read_staged(cfg.output, columns_exclude=("text",)),  # the corpus-wide step never holds the texts
        build_sample,
        cfg.shards,
        functools.partial(dedup, cfg=cfg.dedup),
        dataclasses.replace(cfg, filters=tuple(to_dict(chain))),  # resolved: the chain inline
        [],
        size_col="text_bytes",
    )
    log.info("dedup, %d shards, meta and index.json in %.1fs", len(index["shards"]), time.perf_counter() - t0)
    return index


def build(cfg: Config, units: list[Unit], done: dict, chain: tuple[FilterConfig, ...]):
    """The per-row stage graph as a lazy ray.data.Dataset ending in the staging writer (tasks only, no actors)."""
    import ray

    ds = ray.data.from_items(unit_specs(units), override_num_blocks=len(units))  # -> unit
    ds = ds.map_batches(  # -> key, src_file, src_row, text, text_bytes, url, id, extra, drop_reason
        read_pending,
        batch_size=1,
        num_cpus=0.5,  # WARC HTML extraction is CPU work; plain jsonl/parquet reading is mostly I/O
        fn_kwargs={"reader": read_text_unit, "cfg": cfg.input, "done": [ray.put(done)]},
    )
    if chain:  # -> + one score column per filter, drop_reason
        ds = ds.map_batches(apply_chain, fn_kwargs={"cfg": chain}, batch_size=cfg.batch_size, num_cpus=1)
    # -> + text_hash, mh_bands
    ds = ds.map_batches(hash_texts, fn_kwargs={"cfg": cfg.dedup}, batch_size=cfg.batch_size, num_cpus=1)
    # -> rows (one count per committed staging part)
    return ds.map_batches(
        write_staging, fn_kwargs={"rows_dir": rows_dir(cfg.output)}, batch_size=cfg.batch_size, num_cpus=0.25
    )
