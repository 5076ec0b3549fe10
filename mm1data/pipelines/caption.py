"""Image-caption pairs: read -> download -> filter -> clip score -> threshold -> [recaption] -> stage, then URL and
image dedup."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mm1data.blocklist import blocklists
from mm1data.config import to_dict
from mm1data.decontam import CaptionMatch, TextReference
from mm1data.dedup import ExactDedup
from mm1data.download import DownloadConfig, ImageDownloader
from mm1data.pipelines.runner import Kind, RunConfig, Stage, model_cpus, model_stage, null_weights
from mm1data.read import InputConfig, read_unit
from mm1data.recaption import CocaCaptioner, RecaptionConfig
from mm1data.schema import CaptionSample, count_tokens
from mm1data.scorers.clip import ClipConfig, ClipScorer


@dataclass(frozen=True)
class DedupConfig:
    url: bool = True  # drop_reason dup_url: the same URL earlier in the input
    image_sha256: bool = True  # drop_reason dup_image: the same image bytes earlier in the input
    reference: tuple[str, ...] = ()
    # captions near an eval text of a dedup.reference blocklist: drop_reason eval_contamination
    decontam: CaptionMatch = field(default_factory=CaptionMatch)


@dataclass(frozen=True)
class Config(RunConfig):
    pipeline: str = "caption"
    corpus: str = "caption"  # shard name prefix: {corpus}-000000.tar
    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)  # synthetic captions (KEY.syn.txt)


def stages(cfg: Config, cpus: int) -> list[Stage]:
    """Download on an actor pool (threads inside), then CLIP on its own pool, then (after every filter) recaptioning
    on its own pool; the model pools take a GPU per actor when the cluster has GPUs."""
    d, c, r = cfg.download, cfg.clip, cfg.recaption
    # Actors hold their CPU share while idle, so leave one CPU for the tasks (read, repartition, filters, staging)
    # or the pipeline starves on a small machine.
    model_cpu = model_cpus(c) + model_cpus(r)
    dl_workers = d.workers or max(1, cpus - (c.workers if c.enabled else 0) - (r.workers if r.enabled else 0))
    out = [
        Stage(  # -> + image, image_ext, width, height, orig_*, sha256, download_*, original_*, status, error_message
            ImageDownloader,
            d,
            "before",
            batch_size=d.batch_size,
            num_cpus=min(0.5, max(0.05, (cpus - 1 - model_cpu) / dl_workers)),
            actors=(dl_workers, dl_workers),
        )
    ]
    if c.enabled:  # -> + clip_score (NaN on rows already dropped)
        out.append(model_stage(ClipScorer, c, "score", c.batch_size, provides=("clip_score",)))
    if r.enabled:  # -> + syn_caption ("" on rows dropped by a filter; dedup comes later, in split)
        out.append(model_stage(CocaCaptioner, r, "after", r.batch_size))
    return out


# staged columns that are not sample metadata (tar members, internal, or always empty when kept)
NOT_IN_JSON = {"image", "caption", "extra", "drop_reason", "image_ext", "download_error", "src_file", "src_row", "key"}
NOT_IN_JSON.add("syn_caption")  # a tar member of its own (KEY.syn.txt)


def build_sample(row: dict[str, Any]) -> tuple[dict[str, bytes], int]:
    """A staged row -> the tar members of one CaptionSample, and its text tokens.

    The json holds the input's extra columns, then mm1data's fields (url, sizes, scores, source, row), which win on
    a name clash: an input column called `source` or `width` must not break or fake them.
    """
    meta = json.loads(row["extra"] or "{}")
    meta.update((k, None if isinstance(v, float) and v != v else v) for k, v in row.items() if k not in NOT_IN_JSON)
    meta.update(source=row["src_file"], row=row["src_row"])
    if "error_message" in meta:
        meta["error_message"] = meta["error_message"] or None  # img2dataset's null on success
    sample = CaptionSample(
        row["key"], row["caption"], row["image"], row["image_ext"], meta, row.get("syn_caption") or ""
    )
    return sample.to_members(), count_tokens(row["caption"])


def dedup(cfg: Config) -> list:
    """Captions containing an eval text of a dedup.reference blocklist (eval_contamination), then later copies of a
    kept row's URL (dup_url), then of its image bytes (dup_image); the first in input order stays."""
    steps: list = []
    if blocklists(cfg.dedup.reference):  # first: every copy of an eval caption is contamination, not a duplicate
        steps.append(TextReference("caption", tuple(blocklists(cfg.dedup.reference)), cfg.dedup.decontam))
    if cfg.dedup.url:
        steps.append(ExactDedup("url", "dup_url"))
    if cfg.dedup.image_sha256:
        steps.append(ExactDedup("sha256", "dup_image"))
    return steps


def funnel(t: pa.Table) -> dict[str, int]:
    attempted = t["download_attempts"].to_numpy() > 0
    ok = t["download_error"].to_numpy(zero_copy_only=False) == ""
    out = {"downloaded": int(np.sum(attempted & ok))}
    if "syn_caption" in t.column_names:  # kept samples with a synthetic caption (what `caption: synthetic` reads)
        kept = t["drop_reason"].to_numpy(zero_copy_only=False) == ""
        out["recaptioned"] = int(np.sum(kept & (t["syn_caption"].to_numpy(zero_copy_only=False) != "")))
    return out


def warnings(cfg: Config) -> list[str]:
    return null_weights("clip", cfg.clip, "clip_score") + null_weights("recaption", cfg.recaption, "syn_caption")


KIND = Kind(
    name="caption",
    config=Config,
    columns={
        "url": pa.string(),
        "caption": pa.string(),
        "image": pa.binary(),
        "image_ext": pa.string(),
        "sha256": pa.string(),
        "download_error": pa.string(),
        "status": pa.string(),  # img2dataset's status and error_message (download.img2dataset_columns)
        "error_message": pa.string(),
        "syn_caption": pa.string(),  # only with recaption.enabled
    },
    payload=("image",),
    size_col="image_bytes",
    read=read_unit,
    stages=stages,
    sample=build_sample,
    dedup=dedup,
    fingerprint=lambda cfg: {
        "download": to_dict(cfg.download),
        "clip": to_dict(cfg.clip),
        # None when off, so outputs staged before recaptioning existed still resume; on <-> off is a difference
        "recaption": to_dict(cfg.recaption) if cfg.recaption.enabled else None,
    },
    batch_size=lambda cfg: cfg.download.batch_size,
    read_cpus=0.1,
    funnel=funnel,
    warnings=warnings,
    enables={"clip_score": "clip.enabled: true"},
)
