"""Image-caption pairs: read -> download -> filter -> clip score -> threshold -> [recaption] -> stage, then URL and
image dedup."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mm1data.blocklist import blocklists
from mm1data.config import check, to_dict
from mm1data.decontam import CaptionMatch, TextReference
from mm1data.dedup import ExactDedup, NearImageDedup, check_references
from mm1data.download import DownloadConfig, ImageDownloader
from mm1data.phash import to_hex
from mm1data.pipelines.runner import Capacity, Kind, RunConfig, Stage, download_pool, model_stage, null_weights
from mm1data.read import InputConfig, read_unit
from mm1data.recaption import CocaCaptioner, RecaptionConfig
from mm1data.schema import CaptionSample, count_tokens
from mm1data.scorers.clip import ClipConfig, ClipScorer


@dataclass(frozen=True)
class DedupConfig:
    url: bool = True  # drop_reason dup_url: the same URL earlier in the input
    image_sha256: bool = True  # drop_reason dup_image: the same image bytes earlier in the input
    near_image: bool = True  # dup_near_image: pHash within max_distance bits of a kept image with a higher clip_score
    max_distance: int = 8  # Hamming bits of the 64 (bench/phash.py's precision/recall table chose it)
    image_bands: int = 0  # LSH bands of the 64 bits; 0: max_distance + 1 (every pair within max_distance shares one)
    # mm1data outputs / blocklist parquets: their images are removed from this run (duplicate_of_reference,
    # eval_contamination), and a blocklist's eval texts drop the captions near them (eval_contamination)
    reference: tuple[str, ...] = ()
    decontam: CaptionMatch = field(default_factory=CaptionMatch)  # how a caption is matched to an eval text

    def __post_init__(self) -> None:
        check(self, "max_distance", ge=0, le=32)
        check(self, "image_bands", ge=0, le=64)


@dataclass(frozen=True)
class Config(RunConfig):
    pipeline: str = "caption"
    corpus: str = "caption"  # shard name prefix: {corpus}-000000.tar
    input: InputConfig = field(default_factory=InputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)  # synthetic captions (KEY.syn.txt)


def stages(cfg: Config, cap: Capacity) -> list[Stage]:
    """Download on an elastic actor pool (threads inside), then CLIP on its own pool, then (after every filter)
    recaptioning on its own pool; the model pools take a GPU per actor when configured or when the cluster can get
    GPUs (runner.model_gpus)."""
    d, c, r = cfg.download, cfg.clip, cfg.recaption
    share, pool = download_pool(d.workers, (c, r), cap)
    out = [
        Stage(  # -> + image, image_ext, width, height, orig_*, sha256, download_*, original_*, status, error_message
            ImageDownloader, d, "before", batch_size=d.batch_size, num_cpus=share, actors=pool
        )
    ]
    if c.enabled:  # -> + clip_score (NaN on rows already dropped)
        out.append(model_stage(ClipScorer, c, "score", c.batch_size, cap, provides=("clip_score",)))
    if r.enabled:  # -> + syn_caption ("" on rows dropped by a filter; dedup comes later, in split)
        out.append(model_stage(CocaCaptioner, r, "after", r.batch_size, cap))
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
    if meta.get("phash") is not None:
        meta["phash"] = to_hex(meta["phash"])  # imagehash's str form: 16 hex digits
    if "error_message" in meta:
        meta["error_message"] = meta["error_message"] or None  # img2dataset's null on success
    sample = CaptionSample(
        row["key"], row["caption"], row["image"], row["image_ext"], meta, row.get("syn_caption") or ""
    )
    return sample.to_members(), count_tokens(row["caption"])


def dedup(cfg: Config) -> list:
    """Captions near an eval text of a dedup.reference blocklist (eval_contamination: every copy, so first), then later
    copies of a kept row's URL (dup_url), then of its image bytes (dup_image); the first in input order stays. Then
    images of dedup.reference (duplicate_of_reference, eval_contamination) and pHash near-duplicates (dup_near_image:
    the highest clip_score stays, then the first in input order). Checks the references (a ConfigError names a bad
    one)."""
    d = cfg.dedup
    steps: list = []
    if evals := tuple(
        blocklists(d.reference)
    ):  # first: every copy of an eval caption is contamination, not a duplicate
        steps.append(TextReference("caption", evals, d.decontam))
    if d.url:
        steps.append(ExactDedup("url", "dup_url"))
    if d.image_sha256:
        steps.append(ExactDedup("sha256", "dup_image"))
    refs = check_references(d.reference)
    if d.near_image or refs:
        bands = d.image_bands or min(64, d.max_distance + 1)
        steps.append(NearImageDedup(max_distance=d.max_distance, bands=bands, within=d.near_image, references=refs))
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
        "phash": pa.int64(),  # null without an image (it travels between the stages as hex: staging.batch_to_table)
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
