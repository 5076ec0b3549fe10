"""Text-only documents: read -> filter -> hash (exact + MinHash bands) -> stage, then exact and near-dup -> shards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mm1data.blocklist import blocklists
from mm1data.config import check, to_dict
from mm1data.decontam import DocumentMatch, TextReference
from mm1data.dedup import ExactDedup, MinHashConfig, NearDedup, check_references, minhash_bands, text_fingerprints
from mm1data.pipelines.runner import Capacity, Kind, RunConfig, Stage
from mm1data.read import TextInputConfig, read_text_unit
from mm1data.schema import TextDoc, count_tokens
from mm1data.stage import Batch


@dataclass(frozen=True)
class TextDedupConfig:
    exact: bool = True  # drop_reason dup_text: the same normalised text earlier in the input
    minhash: MinHashConfig = field(default_factory=MinHashConfig)  # drop_reason dup_near (MinHash-LSH)
    reference: tuple[str, ...] = ()
    # documents holding an eval text of a dedup.reference blocklist (13-gram overlap): drop_reason eval_contamination
    decontam: DocumentMatch = field(default_factory=DocumentMatch)


@dataclass(frozen=True)
class Config(RunConfig):
    pipeline: str = "text"
    corpus: str = "text"  # shard name prefix: {corpus}-000000.tar
    input: TextInputConfig = field(default_factory=TextInputConfig)
    dedup: TextDedupConfig = field(default_factory=TextDedupConfig)
    batch_size: int = 256  # documents per filter / hashing task

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "batch_size", ge=1)


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


def stages(cfg: Config, cap: Capacity) -> list[Stage]:
    # -> + text_hash, mh_bands (Ray tasks: they spread over whatever nodes the cluster has)
    return [Stage(hash_texts, cfg.dedup, "after", batch_size=cfg.batch_size, num_cpus=1)]


def dedup(cfg: Config) -> list:
    """Eval contamination (a dedup.reference blocklist's text in the document), then exact (dup_text), then near
    duplicates (dup_near) among the rows still kept; the first in input order stays.
    The score store gets dup_cluster: the key of the kept document of the row's near-duplicate cluster."""
    check_references(cfg.dedup.reference)  # a bad location fails before Ray (outputs: only a warning, see below)
    steps: list = []
    if evals := tuple(blocklists(cfg.dedup.reference)):  # first: every copy of an eval text is contamination
        steps.append(TextReference("text", evals, cfg.dedup.decontam))
    if cfg.dedup.exact:
        steps.append(ExactDedup("text_hash", "dup_text"))
    if cfg.dedup.minhash.enabled:
        steps.append(NearDedup("mh_bands", cfg.dedup.minhash))
    return steps


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


def warnings(cfg: Config) -> list[str]:
    """An mm1data output in dedup.reference is matched by its images (caption, interleaved); a text corpus has none
    and an output's texts are not read (eval texts come from blocklists): the run says so instead of ignoring it."""
    ref = cfg.dedup.reference
    return [
        f"dedup.reference {loc} is an mm1data output: the text kind matches only blocklists' eval texts, so it was "
        "not used"
        for loc in ref
        if loc not in blocklists(ref)
    ]


KIND = Kind(
    name="text",
    config=Config,
    columns={
        "text": pa.string(),
        "url": pa.string(),
        "id": pa.string(),
        "text_hash": pa.string(),
        "mh_bands": pa.uint64(),
    },
    payload=("text",),
    warnings=warnings,
    size_col="text_bytes",
    read=read_text_unit,
    stages=stages,
    sample=build_sample,
    dedup=dedup,
    fingerprint=lambda cfg: {"hashes": {"exact": cfg.dedup.exact, "minhash": to_dict(cfg.dedup.minhash)}},
    batch_size=lambda cfg: cfg.batch_size,
    read_cpus=0.5,
    filter_cpus=1.0,
)
