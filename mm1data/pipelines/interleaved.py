"""Interleaved image-text documents (OBELICS, MMC4, WARC or HTML pages): read -> download every image -> image,
paragraph and document filters -> CLIP relevance of each image to its document's paragraphs -> stage; then document
URL, image-set and frequent-image dedup -> shards of `KEY.json` (ordered segments) + `KEY.0.jpg`, `KEY.1.jpg`, ...

A row is a document of n positions, each a paragraph or an image (OBELICS' form). Nothing removes a position: a stage
or filter writes a reason at it in `seg_reason`, and only the shard writer leaves it out, so the score store keeps
every paragraph and image with its scores (meta/ a row per document, meta_images/ a row per image).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa

from mm1data.blocklist import blocklists
from mm1data.config import check, to_dict
from mm1data.decontam import DocumentMatch, TextReference
from mm1data.dedup import ExactDedup, FrequentValues, ReferenceImages, check_references, text_fingerprints
from mm1data.download import DownloadConfig, ImageDownloader
from mm1data.phash import to_hex
from mm1data.pipelines.runner import Capacity, Kind, RunConfig, Stage, download_pool, model_stage, null_weights
from mm1data.read import InterleavedInputConfig, read_interleaved_unit
from mm1data.schema import count_tokens
from mm1data.scorers.clip import DECODE_ERROR, ClipConfig, ClipScorer
from mm1data.stage import Batch, plain_lists

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RelevanceConfig:
    """MMC4's image-text relevance: each image against every kept paragraph of its document, by the CLIP scorer of
    the run config's `clip` section (its model, weights and workers, as in the caption kind)."""

    min: float = 0.15  # an image whose best similarity is lower is removed (MMC4: 0.15 with ViT-L/14)

    def __post_init__(self) -> None:
        check(self, "min", ge=-1, le=1)  # a cosine: -1 removes nothing; NaN would silently remove nothing too


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """The scorer's keys under `relevance` (relevance.model, .pretrained, .enabled, ...: the form before the scorer
    became the `clip` section) -> `clip`, over what `clip` has (they were written on purpose), with a warning."""
    rel = raw.get("relevance")
    moved = [k for k in rel if k in CLIP_KEYS] if isinstance(rel, dict) else []
    if moved:
        log.warning("relevance.%s is clip.%s now: read as such", ", relevance.".join(moved), ", clip.".join(moved))
        clip = raw.get("clip") if isinstance(raw.get("clip"), dict) else {}
        raw = {
            **raw,
            "clip": {**clip, **{k: rel[k] for k in moved}},
            "relevance": {k: rel[k] for k in rel if k not in moved},
        }
    return raw


CLIP_KEYS = {f.name for f in fields(ClipConfig)}


@dataclass(frozen=True)
class RelevanceScorerConfig(ClipConfig):
    """What the Relevance actors get: the `clip` section and relevance.min."""

    min: float = 0.15


@dataclass(frozen=True)
class InterleavedDedupConfig:
    url: bool = True  # dup_url: documents with the same URL keep the first (OBELICS)
    image_set: bool = True  # dup_image_set: documents with the same set of images keep the first (OBELICS)
    in_document: bool = True  # dup_image_in_doc: an image repeated in its document keeps its first position
    max_image_docs: int = 10  # dup_image_url: an image URL in more documents is removed everywhere; 0 = off
    max_domain_paragraph: int = 2  # dup_paragraph: a paragraph in more documents of one domain is removed from
    #                                all of them (OBELICS: repeated 3 times in a domain = boilerplate); 0 = off
    # mm1data outputs / blocklist parquets: their images leave these documents (duplicate_of_reference,
    # eval_contamination), and a document holding a blocklist's eval text is dropped (eval_contamination)
    reference: tuple[str, ...] = ()
    max_distance: int = 8  # pHash Hamming bits to a reference image (as the caption kind's dedup.max_distance)
    image_bands: int = 0  # LSH bands of the 64 bits; 0: max_distance + 1
    decontam: DocumentMatch = field(
        default_factory=DocumentMatch
    )  # how a document is matched to an eval text (13-grams)

    def __post_init__(self) -> None:
        check(self, "max_image_docs", ge=0)
        check(self, "max_domain_paragraph", ge=0)
        check(self, "max_distance", ge=0, le=32)
        check(self, "image_bands", ge=0, le=64)


@dataclass(frozen=True)
class Config(RunConfig):
    pipeline: str = "interleaved"
    corpus: str = "interleaved"  # shard name prefix: {corpus}-000000.tar
    input: InterleavedInputConfig = field(default_factory=InterleavedInputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)  # the scorer of image-text relevance (clip.enabled)
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)
    dedup: InterleavedDedupConfig = field(default_factory=InterleavedDedupConfig)
    batch_size: int = 32  # documents per download / filter / staging batch

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self, "batch_size", ge=1)


# ---- download ------------------------------------------------------------------------------------------------

# per-position columns the download stage adds (a value at every position; the empty value at paragraphs)
IMAGE_COLUMNS = {
    "image": (None, "image"),
    "image_ext": ("", "image_ext"),
    "image_format": ("", "orig_format"),
    "image_width": (0, "width"),
    "image_height": (0, "height"),
    "image_orig_width": (0, "orig_width"),
    "image_orig_height": (0, "orig_height"),
    "image_sha256": ("", "sha256"),
    "image_phash": ("", "phash"),  # hex between the stages, a nullable int64 in staging (staging.batch_to_table)
    "image_status": (0, "download_status"),
    "image_error": ("", "download_error"),
}


def _lists(column: np.ndarray) -> list[list]:
    return [list(v) if v is not None else [] for v in column]


def _obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class DocumentImages:
    """Fetches every kept image of a batch of documents with the caption corpus' downloader (the same guards, limits,
    retries and resizing), all URLs of the batch at once on its thread pool, each distinct URL once. A failed image
    gets its download error as its seg_reason; `data:` URLs are dropped (image_data_url: mostly lazy-load
    placeholders); an image URL or image bytes repeated in a document keep the first position (dup_image_in_doc)."""

    def __init__(self, cfg: tuple[DownloadConfig, bool]) -> None:
        self.download, self.in_document = ImageDownloader(cfg[0]), cfg[1]

    def __call__(self, batch: Batch) -> Batch:
        images, reasons = _lists(batch["images"]), _lists(batch["seg_reason"])
        urls: dict[str, int] = {}  # distinct URL -> its row in the fetch batch
        wanted = []  # (document, position, fetch row)
        for d, (doc_urls, seg) in enumerate(zip(images, reasons)):
            if batch["drop_reason"][d] != "":
                continue
            seen = set()
            for i, u in enumerate(doc_urls):
                if u is None or seg[i]:
                    continue
                if u.startswith("data:"):
                    seg[i] = "image_data_url"
                elif self.in_document and u in seen:
                    seg[i] = "dup_image_in_doc"
                else:
                    seen.add(u)
                    wanted.append((d, i, urls.setdefault(u, len(urls))))
        fetched = self.download({"url": _obj(list(urls)), "drop_reason": _obj([""] * len(urls))})
        out = {name: [[empty] * len(u) for u in images] for name, (empty, _) in IMAGE_COLUMNS.items()}
        for d, i, j in wanted:
            for name, (_, src) in IMAGE_COLUMNS.items():
                v = fetched[src][j]
                out[name][d][i] = (v or None) if name == "image" else (v.item() if hasattr(v, "item") else v)
            if fetched["download_error"][j]:
                reasons[d][i] = fetched["download_error"][j]
        if self.in_document:  # the same bytes under two URLs
            for shas, seg in zip(out["image_sha256"], reasons):
                seen = set()
                for i, h in enumerate(shas):
                    if h and not seg[i]:
                        if h in seen:
                            seg[i] = "dup_image_in_doc"
                        seen.add(h)
        for name, values in out.items():
            batch[name] = _obj(values)
        batch["seg_reason"] = _obj(reasons)
        return plain_lists(batch)


# ---- relevance -----------------------------------------------------------------------------------------------


def _kept(row_images: list, seg: list, image_bytes: list | None = None) -> tuple[list[int], list[int]]:
    """-> (kept image positions, kept paragraph positions) of a document."""
    imgs, paras = [], []
    for i, r in enumerate(seg):
        if r:
            continue
        if row_images[i] is not None and (image_bytes is None or image_bytes[i] is not None):
            imgs.append(i)
        elif row_images[i] is None:
            paras.append(i)
    return imgs, paras


class Relevance(ClipScorer):
    """Adds image_relevance (each kept image's best CLIP cosine against its document's kept paragraphs; NaN
    elsewhere) and image_best_segment (that paragraph's position; -1 elsewhere), as MMC4 scores images against
    sentences. An image under `min` gets seg_reason `relevance`, one that no decoder reads `decode_error`. A document
    without kept paragraphs is not scored.
    Paragraphs are cut to the model's context (77 tokens for CLIP), as MMC4's sentences are short."""

    SECTION, OUTPUT = "clip", "image_relevance"

    def __init__(self, cfg: RelevanceScorerConfig) -> None:
        super().__init__(cfg)
        self.min, self.chunk = cfg.min, cfg.batch_size

    def _embed(self, fn, items: list) -> Any:
        import torch

        if not items:
            return None
        return torch.cat([fn(items[a : a + self.chunk]) for a in range(0, len(items), self.chunk)])

    def _embed_images(self, items: list[bytes]) -> tuple[Any, np.ndarray]:
        """(an embedding per item, zeros where it does not decode; whether each decoded)."""
        import torch

        emb, decoded = None, np.zeros(len(items), dtype=bool)
        for a in range(0, len(items), self.chunk):
            part, ok = self.embed_decodable(items[a : a + self.chunk])
            if part is None:
                continue
            if emb is None:
                emb = torch.zeros((len(items), part.shape[1]), dtype=part.dtype, device=part.device)
            emb[torch.as_tensor(a + ok, device=part.device)] = part
            decoded[a + ok] = True
        return emb, decoded

    def __call__(self, batch: Batch) -> Batch:
        texts, images, reasons = _lists(batch["texts"]), _lists(batch["images"]), _lists(batch["seg_reason"])
        data = _lists(batch["image"])
        docs, img_items, txt_items = [], [], []
        for d in range(len(texts)):
            imgs, paras = _kept(images[d], reasons[d], data[d]) if batch["drop_reason"][d] == "" else ([], [])
            if imgs and paras:
                docs.append((d, imgs, paras, len(img_items), len(txt_items)))
                img_items += [data[d][i] for i in imgs]
                txt_items += [texts[d][i] for i in paras]
        img_emb, decoded = self._embed_images(img_items)
        txt_emb = self._embed(self.embed_texts, txt_items)
        relevance = [[float("nan")] * len(s) for s in reasons]
        best = [[-1] * len(s) for s in reasons]
        for d, imgs, paras, a, b in docs:
            sim = (
                None if img_emb is None else (img_emb[a : a + len(imgs)] @ txt_emb[b : b + len(paras)].T).cpu().numpy()
            )
            for k, i in enumerate(imgs):
                if not decoded[a + k]:  # no decoder reads it: the position's failure, not the job's
                    reasons[d][i] = DECODE_ERROR
                    continue
                relevance[d][i] = float(sim[k].max())
                best[d][i] = paras[int(sim[k].argmax())]
                if relevance[d][i] < self.min:
                    reasons[d][i] = "relevance"
        batch["image_relevance"], batch["image_best_segment"] = _obj(relevance), _obj(best)
        batch["seg_reason"] = _obj(reasons)
        return plain_lists(batch)


# ---- after every filter --------------------------------------------------------------------------------------


def finish_documents(batch: Batch, cfg: Any = None) -> Batch:
    """-> + para_hash (each kept paragraph's text_fingerprints in a kept document; "" elsewhere), repeats (what the
    corpus-wide repetition rules count: "img:" + each kept image's URL, "para:" + the document's domain and each kept
    paragraph's fingerprint), image_set (a hash of the kept images' sha256 set; "" without images), images_kept,
    paragraphs_kept, doc_bytes (the kept payload, for cutting shards by size). A document with nothing left gets
    drop_reason `empty_document`."""
    texts, images, reasons = _lists(batch["texts"]), _lists(batch["images"]), _lists(batch["seg_reason"])
    data, shas = _lists(batch["image"]), _lists(batch["image_sha256"])
    n = len(texts)
    urls, sets, hashes = np.empty(n, dtype=object), np.empty(n, dtype=object), np.empty(n, dtype=object)
    domains = [_domain(u) for u in batch["url"]]
    n_img, n_par, size = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int64)
    drop = batch["drop_reason"].copy()
    kept = [_kept(images[d], reasons[d], data[d]) for d in range(n)]
    # one fingerprint call for the whole batch (its per-call setup would cost more than a document's paragraphs);
    # a document already dropped takes no part in the repetition rules
    todo = [(d, i) for d in range(n) if drop[d] == "" for i in kept[d][1]]
    prints = iter(text_fingerprints([texts[d][i] for d, i in todo]).tolist())
    for d in range(n):
        hashes[d] = [""] * len(images[d])
    for d, i in todo:
        hashes[d][i] = next(prints)
    for d in range(n):
        imgs, paras = kept[d]
        urls[d] = [f"img:{u}" for u in dict.fromkeys(images[d][i] for i in imgs)]
        if domains[d] and drop[d] == "":
            urls[d] += [f"para:{domains[d]} {h}" for h in dict.fromkeys(hashes[d][i] for i in paras) if h]
        sets[d] = hashlib.sha256("\n".join(sorted({shas[d][i] for i in imgs})).encode()).hexdigest() if imgs else ""
        n_img[d], n_par[d] = len(imgs), len(paras)
        size[d] = sum(len(data[d][i]) for i in imgs) + sum(len(texts[d][i].encode("utf-8", "replace")) for i in paras)
        if drop[d] == "" and not imgs and not paras:
            drop[d] = "empty_document"
    batch.update(
        para_hash=hashes, repeats=urls, image_set=sets, images_kept=n_img, paragraphs_kept=n_par, doc_bytes=size
    )
    batch["drop_reason"] = drop
    return plain_lists(batch)


def stages(cfg: Config, cap: Capacity) -> list[Stage]:
    """Download on an elastic actor pool (threads inside), relevance on its own pool (a GPU each when configured or
    when the cluster can get GPUs), then the document finish after every filter."""
    d = cfg.download
    r = RelevanceScorerConfig(**{f.name: getattr(cfg.clip, f.name) for f in fields(cfg.clip)}, min=cfg.relevance.min)
    share, pool = download_pool(d.workers, (r,), cap)
    out = [
        Stage(  # -> + image, image_* per position
            DocumentImages,
            (d, cfg.dedup.in_document),
            "before",
            batch_size=cfg.batch_size,
            num_cpus=share,
            actors=pool,
        )
    ]
    if r.enabled:  # -> + image_relevance, image_best_segment
        out.append(model_stage(Relevance, r, "score", cfg.batch_size, cap, provides=("image_relevance",)))
    out.append(Stage(finish_documents, None, "after", batch_size=cfg.batch_size, num_cpus=0.25))
    return out


# ---- corpus-wide ---------------------------------------------------------------------------------------------


def _doc_images_bounds(cfg: Config) -> tuple[float, float]:
    """The chain's doc_images bounds (the rule the frequent-image removal must keep): (min, max)."""
    chain = cfg.filters if isinstance(cfg.filters, (list, tuple)) else ()
    for c in chain:
        if isinstance(c, dict) and c.get("name") == "doc_images":
            return float(c.get("min", 0)), float(c.get("max", np.inf))
    return 0.0, np.inf


def dedup(cfg: Config) -> list:
    """Documents holding an eval text of a dedup.reference blocklist (eval_contamination), then document URL
    (dup_url), then identical image sets (dup_image_set), then images of dedup.reference (duplicate_of_reference,
    eval_contamination: removed from their documents); then image URLs in more than
    dedup.max_image_docs documents (dup_image_url) and paragraphs in more than dedup.max_domain_paragraph documents
    of a domain (dup_paragraph) are removed everywhere; a document left under doc_images' min gets doc_images."""
    steps: list = []
    if evals := tuple(blocklists(cfg.dedup.reference)):  # first: a page holding an eval text goes whole
        steps.append(TextReference("texts", evals, cfg.dedup.decontam))
    if cfg.dedup.url:
        steps.append(ExactDedup("url", "dup_url"))
    if cfg.dedup.image_set:
        steps.append(ExactDedup("image_set", "dup_image_set"))
    refs = check_references(cfg.dedup.reference)
    if refs:  # images of the references leave their documents (removed_ref; a document under doc_images' min goes)
        d = cfg.dedup
        bands = d.image_bands or min(64, d.max_distance + 1)
        lo, _ = _doc_images_bounds(cfg)
        steps.append(ReferenceImages(refs, d.max_distance, bands, min_left=int(np.ceil(lo))))
    limits = (("img", cfg.dedup.max_image_docs), ("para", cfg.dedup.max_domain_paragraph))
    if any(n for _, n in limits):
        lo, _ = _doc_images_bounds(cfg)
        big = 1 << 62  # a family switched off (0) is never too frequent
        limits = tuple((f, n or big) for f, n in limits)
        steps.append(FrequentValues("repeats", limits, "img", int(np.ceil(lo)), "doc_images", "removed"))
    return steps


def _domain(url: Any) -> str:
    from urllib.parse import urlsplit

    try:
        return (urlsplit(url).hostname or "") if url else ""
    except ValueError:
        return ""


def apply_removed(t: pa.Table) -> pa.Table:
    """Decided rows: the images and paragraphs the repetition rules removed get seg_reason dup_image_url and
    dup_paragraph; the images of a reference (removed_ref) get theirs (duplicate_of_reference, eval_contamination)."""
    if "removed_ref" in t.column_names and any(t["removed_ref"].to_pylist()):
        reasons = t["seg_reason"].to_pylist()
        for d, r in enumerate(t["removed_ref"].to_pylist()):
            for i, why in json.loads(r) if r else ():
                if i < len(reasons[d]) and not reasons[d][i]:
                    reasons[d][i] = why
        t = t.set_column(t.column_names.index("seg_reason"), "seg_reason", pa.array(reasons, pa.list_(pa.string())))
    if "removed" not in t.column_names:
        return t
    removed = t["removed"].to_pylist()
    if not any(removed):
        return t
    hashes, images, reasons = t["para_hash"].to_pylist(), t["images"].to_pylist(), t["seg_reason"].to_pylist()
    urls = t["url"].to_pylist()
    for d, r in enumerate(removed):
        if not r:
            continue
        gone = set(json.loads(r))
        seg = reasons[d]
        for i, u in enumerate(images[d]):
            if not seg[i] and u is not None and f"img:{u}" in gone:
                seg[i] = "dup_image_url"
        paras = [i for i, u in enumerate(images[d]) if u is None and not seg[i]]
        if paras and any(v.startswith("para:") for v in gone):
            domain = _domain(urls[d])
            for i in paras:
                if f"para:{domain} {hashes[d][i]}" in gone:
                    seg[i] = "dup_paragraph"
    return t.set_column(t.column_names.index("seg_reason"), "seg_reason", pa.array(reasons, pa.list_(pa.string())))


# staged columns that are not document metadata: positions (in segments / image_info), payload, internals
NOT_IN_JSON = {
    "texts", "images", "alts", "seg_reason", "extra", "drop_reason", "src_file", "src_row", "key", "repeats",
    "para_hash", "image_set", "doc_bytes", "removed", "removed_ref",
}  # fmt: skip
IMAGE_INFO = {  # per kept image in the sample json: name -> per-position column
    "url": "images",
    "alt": "alts",
    "width": "image_width",
    "height": "image_height",
    "original_width": "image_orig_width",
    "original_height": "image_orig_height",
    "format": "image_format",
    "sha256": "image_sha256",
    "phash": "image_phash",
    "relevance": "image_relevance",
}


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and v != v else v


def build_sample(row: dict[str, Any]) -> tuple[dict[str, bytes], int]:
    """A staged document -> `KEY.json` (ordered segments, image_info, the document's scores) and `KEY.{i}.{ext}`
    for its kept images in document order, and its text tokens."""
    key = row["key"]
    members: dict[str, bytes] = {}
    segments: list[dict[str, Any]] = []
    info = []
    tokens = 0
    for i, (text, url, reason) in enumerate(zip(row["texts"], row["images"], row["seg_reason"])):
        if reason:
            continue
        if url is None:
            segments.append({"text": text})
            tokens += count_tokens(text)
        elif row["image"][i] is not None:
            n = len(info)
            members[f"{key}.{n}.{row['image_ext'][i]}"] = row["image"][i]
            segments.append({"image": n})
            one = {k: _clean(row[c][i]) if c in row else None for k, c in IMAGE_INFO.items()}
            if one["phash"] is not None:
                one["phash"] = to_hex(one["phash"])  # imagehash's str form, as the caption json has it
            info.append(one | {"position": i})
    meta = json.loads(row["extra"] or "{}")
    meta.update((k, _clean(v)) for k, v in row.items() if k not in NOT_IN_JSON and _scalar(v))
    meta.update(segments=segments, image_info=info, source=row["src_file"], row=row["src_row"], tokens=tokens)
    members[f"{key}.json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
    return members, tokens


def _scalar(v: Any) -> bool:
    return not isinstance(v, (list, tuple, dict, bytes, np.ndarray))


def funnel(t: pa.Table) -> dict[str, int]:
    """Paragraphs and images in, fetched, kept (in kept documents), and the reasons positions were removed."""
    out: dict[str, int] = {}
    kept_doc = [r == "" for r in t["drop_reason"].to_pylist()]
    images, reasons = t["images"].to_pylist(), t["seg_reason"].to_pylist()
    shas = t["image_sha256"].to_pylist() if "image_sha256" in t.column_names else [[]] * t.num_rows
    for keep, urls, seg, sha in zip(kept_doc, images, reasons, shas):
        for i, (u, r) in enumerate(zip(urls or (), seg or ())):
            what = "paragraphs" if u is None else "images"
            out[f"{what}.in"] = out.get(f"{what}.in", 0) + 1
            if u is not None and sha and sha[i]:
                out["images.downloaded"] = out.get("images.downloaded", 0) + 1
            if r:
                out[f"{what}_dropped.{r}"] = out.get(f"{what}_dropped.{r}", 0) + 1
            elif keep:
                out[f"{what}.kept"] = out.get(f"{what}.kept", 0) + 1
    return out


# the score store's row per image: the document's key, the image's position, and its per-position columns
ITEM_SKIP = {"texts", "seg_reason", "alts", "images", "image", "para_hash"}


def image_rows(t: pa.Table) -> pa.Table:
    """A meta part's documents -> a row per image position: key, position, image_index (its KEY.{i} in the shard,
    -1 if not there), url, alt, kept, drop_reason (its own reason, or the document's), shard, and every
    per-position column at that position (download status and error, sizes, sha256, format, relevance, filter
    scores)."""
    names = t.column_names
    per_pos = [c for c in names if c not in ITEM_SKIP and pa.types.is_list(t.schema.field(c).type) and c != "repeats"]
    cols: dict[str, list] = {
        k: [] for k in ("key", "position", "image_index", "url", "alt", "kept", "drop_reason", "shard", *per_pos)
    }
    wanted = ("key", "images", "alts", "seg_reason", "drop_reason", "shard", *per_pos)
    rows = t.select([c for c in wanted if c in names]).to_pylist()  # (a run with no rows has no list columns)
    for row in rows:
        n = 0
        alts = row.get("alts") or []
        for i, u in enumerate(row.get("images") or ()):
            if u is None:
                continue
            own = row["seg_reason"][i]
            kept = not own and row["drop_reason"] == ""
            cols["key"].append(row["key"])
            cols["position"].append(i)
            cols["image_index"].append(n if kept else -1)
            n += kept
            cols["url"].append(u)
            cols["alt"].append(alts[i] if i < len(alts) else None)
            cols["kept"].append(kept)
            cols["drop_reason"].append(own or row["drop_reason"])
            cols["shard"].append(row["shard"])
            for c in per_pos:
                v = row[c]
                cols[c].append(v[i] if v is not None and i < len(v) else None)
    # typed even when empty, so every part of meta_images/ has one schema (a dataset read takes the first file's)
    types = {"key": pa.string(), "position": pa.int32(), "image_index": pa.int32(), "url": pa.string(),
             "alt": pa.string(), "kept": pa.bool_(), "drop_reason": pa.string(), "shard": pa.string()}  # fmt: skip
    types.update((c, t.schema.field(c).type.value_type) for c in per_pos)
    # the image's pHash is `phash` here, as in the caption kind's meta/ and the blocklist (dedup.reference reads it)
    return pa.table({ITEM_NAMES.get(c, c): pa.array(v, types[c]) for c, v in cols.items()})


ITEM_NAMES = {"image_phash": "phash"}


STRINGS = pa.list_(pa.string())
INTS = pa.list_(pa.int64())
KIND = Kind(
    name="interleaved",
    config=Config,
    columns={
        "url": pa.string(),
        "texts": STRINGS,
        "images": STRINGS,
        "alts": STRINGS,
        "seg_reason": STRINGS,
        "image": pa.list_(pa.binary()),
        "image_ext": STRINGS,
        "image_format": STRINGS,
        "image_width": INTS,
        "image_height": INTS,
        "image_orig_width": INTS,
        "image_orig_height": INTS,
        "image_sha256": STRINGS,
        "image_phash": INTS,  # null at paragraphs and failed images
        "image_status": INTS,
        "image_error": STRINGS,
        "image_relevance": pa.list_(pa.float32()),
        "image_best_segment": INTS,
        "repeats": STRINGS,
        "para_hash": STRINGS,
        "image_set": pa.string(),
    },
    payload=("image", "texts"),  # the shard's members; the score store keeps positions, reasons and scores
    size_col="doc_bytes",
    read=read_interleaved_unit,
    stages=stages,
    sample=build_sample,
    dedup=dedup,
    fingerprint=lambda cfg: {
        "download": to_dict(cfg.download),
        "clip": to_dict(cfg.clip),
        "relevance": to_dict(cfg.relevance),
        "in_document": cfg.dedup.in_document,
    },
    batch_size=lambda cfg: cfg.batch_size,
    read_cpus=0.5,
    filter_cpus=0.5,
    funnel=funnel,
    enables={"image_relevance": "clip.enabled: true"},
    warnings=lambda cfg: null_weights("clip", cfg.clip, "image_relevance"),
    upgrade=upgrade,
    decided=apply_removed,
    decided_columns=("seg_reason",),
    items=("images", image_rows),
)
