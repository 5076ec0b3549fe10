"""Image-caption pairs: read -> download -> filter -> clip score -> clip threshold -> stage, then dedup -> shards."""

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
from mm1data.dedup import mark_duplicates
from mm1data.download import DownloadConfig, ImageDownloader
from mm1data.filters import FilterConfig, apply_chain, parse_chain
from mm1data.read import InputConfig, Unit, plan_units, read_unit
from mm1data.registry import get_filter
from mm1data.schema import CaptionSample, count_tokens
from mm1data.scorers.clip import ClipConfig, ClipScorer
from mm1data.split import ShardConfig, finalize
from mm1data.staging import (
    read_pending,
    read_staged,
    rows_dir,
    unit_specs,
    write_staging,
)

log = logging.getLogger(__name__)
KIND = "caption"


@dataclass(frozen=True)
class DedupConfig:
    url: bool = True  # drop_reason dup_url: the same URL earlier in the input
    image_sha256: bool = True  # drop_reason dup_image: the same image bytes earlier in the input


@dataclass(frozen=True)
class Config:
    pipeline: str = KIND
    corpus: str = KIND  # shard name prefix: {corpus}-000000.tar
    output: str = ""  # corpus root, local or s3:// (the --output flag sets it)
    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    filters: str | tuple[dict, ...] = ()  # a chain file (path or preset name in filters/) or an inline list
    clip: ClipConfig = field(default_factory=ClipConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)


# staged columns that are not sample metadata (they are tar members, internal, or always empty when kept)
NOT_IN_JSON = {"image", "caption", "extra", "drop_reason", "image_ext", "download_error", "src_file", "src_row", "key"}


def build_sample(row: dict[str, Any]) -> tuple[dict[str, bytes], int]:
    """A staged row -> the tar members of one CaptionSample, and its text tokens.

    The json holds the input's extra columns, then mm1data's fields (url, sizes, scores, source, row), which
    win on a name clash: an input column called `source` or `width` must not break or fake them.
    """
    meta = json.loads(row["extra"] or "{}")
    meta.update((k, None if isinstance(v, float) and v != v else v) for k, v in row.items() if k not in NOT_IN_JSON)
    meta.update(source=row["src_file"], row=row["src_row"])
    sample = CaptionSample(row["key"], row["caption"], row["image"], row["image_ext"], meta)
    return sample.to_members(), count_tokens(row["caption"])


def dedup(table: pa.Table, reason: np.ndarray, cfg: DedupConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Later copies of a kept row's URL (dup_url) or image bytes (dup_image); the first in input order is kept."""
    if cfg.url:
        reason = mark_duplicates(table["url"].to_numpy(zero_copy_only=False).astype(object), reason, "dup_url")
    if cfg.image_sha256:
        reason = mark_duplicates(table["sha256"].to_numpy(zero_copy_only=False).astype(object), reason, "dup_image")
    return reason, {}


def _fingerprint(cfg: Config, chain: tuple[FilterConfig, ...], units: list[Unit]) -> dict[str, Any]:
    """What staged rows depend on; a rerun with a different one would mix incompatible rows."""
    rows = json.dumps([(u.source, u.start, u.stop) for u in units]).encode()
    return {
        "input": to_dict(cfg.input),
        "input_rows": hashlib.sha256(rows).hexdigest(),
        "download": to_dict(cfg.download),
        "filters": to_dict(chain),
        "clip": to_dict(cfg.clip),
    }


def run(cfg: Config, search_dirs: tuple[str, ...] = (), address: str | None = None) -> dict[str, Any]:
    """Run (or finish, after a crash) the caption job; returns the index.json it wrote."""
    from mm1data.pipelines import stage_units

    chain = parse_chain(cfg.filters, search_dirs)
    pre = tuple(c for c in chain if not get_filter(c.name).needs)
    post = tuple(c for c in chain if get_filter(c.name).needs)  # thresholds on scores the CLIP stage adds
    if post and not cfg.clip.enabled:
        raise ConfigError("filter clip_score needs clip.enabled: true")
    units = plan_units(cfg.input)
    stage_units(
        cfg.output,
        units,
        _fingerprint(cfg, chain, units),
        address,
        lambda todo, done: build(cfg, todo, done, pre, post),
    )

    t0 = time.perf_counter()
    warnings = []
    if cfg.clip.enabled and cfg.clip.pretrained is None:
        warnings.append(f"clip.pretrained is null: {cfg.clip.model} ran with random weights; clip_score is noise")
    index = finalize(
        cfg.output,
        KIND,
        cfg.corpus,
        read_staged(cfg.output),
        build_sample,
        cfg.shards,
        functools.partial(dedup, cfg=cfg.dedup),
        dataclasses.replace(cfg, filters=tuple(to_dict(chain))),  # resolved: the chain inline
        warnings,
    )
    log.info("dedup, %d shards, meta and index.json in %.1fs", len(index["shards"]), time.perf_counter() - t0)
    return index


def build(cfg: Config, units: list[Unit], done: dict, pre: tuple, post: tuple):
    """The per-row stage graph as a lazy ray.data.Dataset ending in the staging writer."""
    import ray
    from ray.data import ActorPoolStrategy

    d, c = cfg.download, cfg.clip
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    clip_gpus = (c.num_gpus if c.num_gpus is not None else float(ray.cluster_resources().get("GPU", 0) > 0)) or None
    # Actors hold their CPU share while idle, so leave one CPU for the tasks (read, repartition, filters,
    # staging) or the pipeline starves on a small machine. A CPU-only CLIP actor is counted at 0.5.
    clip_cpus = (1.0 if clip_gpus else 0.5) * c.workers if c.enabled else 0.0
    dl_workers = d.workers or max(1, cpus - (c.workers if c.enabled else 0))
    dl_cpus = min(0.5, max(0.05, (cpus - 1 - clip_cpus) / dl_workers))

    ds = ray.data.from_items(unit_specs(units), override_num_blocks=len(units))  # -> unit
    ds = ds.map_batches(  # -> key, src_file, src_row, url, caption, extra, drop_reason
        read_pending,
        batch_size=1,
        num_cpus=0.1,
        fn_kwargs={"reader": read_unit, "cfg": cfg.input, "done": [ray.put(done)]},
    )
    # a unit can be a whole parquet row group: cut it so every download actor gets work (streaming, no barrier)
    ds = ds.repartition(target_num_rows_per_block=d.batch_size)
    ds = ds.map_batches(  # -> + image, image_ext, width, height, orig_*, sha256, download_*
        ImageDownloader,
        fn_constructor_kwargs={"cfg": d},
        batch_size=d.batch_size,
        num_cpus=dl_cpus,
        compute=ActorPoolStrategy(size=dl_workers),
        zero_copy_batch=False,
    )
    if pre:  # -> + one score column per filter, drop_reason
        ds = ds.map_batches(apply_chain, fn_kwargs={"cfg": pre}, batch_size=d.batch_size, num_cpus=0.25)
    if c.enabled:  # -> + clip_score
        ds = ds.map_batches(
            ClipScorer,
            fn_constructor_kwargs={"cfg": c},
            batch_size=c.batch_size,
            num_cpus=1.0 if clip_gpus else 0.5,
            num_gpus=clip_gpus,
            compute=ActorPoolStrategy(size=c.workers),
            zero_copy_batch=False,
        )
    if post:  # -> drop_reason from thresholds on scorer columns
        ds = ds.map_batches(apply_chain, fn_kwargs={"cfg": post}, batch_size=d.batch_size, num_cpus=0.25)
    # -> rows (one count per committed staging part)
    return ds.map_batches(
        write_staging, fn_kwargs={"rows_dir": rows_dir(cfg.output)}, batch_size=d.batch_size, num_cpus=0.25
    )
