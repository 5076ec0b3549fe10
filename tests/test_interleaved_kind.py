"""The interleaved kind's own stages, without the runner: per-position download, relevance, document finish, the
sample builder, the frequent-image rule and the score store's image rows."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from conftest import jpeg

from mm1data.dedup import text_fingerprints
from mm1data.demo import ImageServer, Route
from mm1data.download import DownloadConfig
from mm1data.pipelines.interleaved import (
    KIND,
    DocumentImages,
    Relevance,
    RelevanceScorerConfig,
    apply_removed,
    build_sample,
    finish_documents,
    funnel,
    image_rows,
)
from mm1data.staging import COMMON_TYPES, batch_to_table


def obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def doc_batch(docs: list[tuple[list, list]], drop: list[str] | None = None) -> dict[str, np.ndarray]:
    """docs: (texts, images) per document, OBELICS form."""
    n = len(docs)
    return {
        "key": obj([f"{i:016x}" for i in range(n)]),
        "drop_reason": obj(drop or [""] * n),
        "texts": obj([t for t, _ in docs]),
        "images": obj([im for _, im in docs]),
        "alts": obj([[None] * len(t) for t, _ in docs]),
        "seg_reason": obj([[""] * len(t) for t, _ in docs]),
    }


@pytest.fixture
def site():
    routes = {
        "/a.jpg": Route(jpeg(300, 200, seed=1), headers={"Content-Type": "image/jpeg"}),
        "/b.png": Route(_png(), headers={"Content-Type": "image/png"}),
        "/a-copy.jpg": Route(jpeg(300, 200, seed=1), headers={"Content-Type": "image/jpeg"}),
        "/broken.jpg": Route(b"not an image", headers={"Content-Type": "image/jpeg"}),
    }
    with ImageServer(routes) as srv:
        yield srv


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (160, 120), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def download(batch, in_document=True):
    cfg = DownloadConfig(allow_private_hosts=True, retries=0, timeout_s=5, image_size=256)
    return DocumentImages((cfg, in_document))(batch)


def test_download_fills_positions_and_records_reasons(site):
    u = site.url
    batch = doc_batch(
        [
            (["p1", None, None, "p2", None, None, None], [None, u("/a.jpg"), u("/b.png"), None, u("/missing.jpg"),
                                                         u("/a.jpg"), u("/a-copy.jpg")]),
            ([None, "q"], ["data:image/gif;base64,R0lGODlhAQABAAAAACw=", None]),
            ([None], [u("/broken.jpg")]),
            ([None], [u("/a.jpg")]),
        ],
        drop=["", "", "", "too_large"],
    )  # fmt: skip
    out = download(batch)
    seg = out["seg_reason"]
    assert list(seg[0]) == ["", "", "", "", "http_404", "dup_image_in_doc", "dup_image_in_doc"]
    assert list(seg[1]) == ["image_data_url", ""]
    assert list(seg[2]) == ["decode_error"]
    assert list(seg[3]) == [""]  # a dropped document is not fetched
    assert out["image"][3] == [None]
    assert out["image_format"][0][1:3] == ["jpeg", "png"]
    assert (out["image_orig_width"][0][1], out["image_orig_height"][0][1]) == (300, 200)
    assert out["image_status"][0][4] == 404 and out["image_error"][0][4] == "http_404"
    assert out["image"][0][0] is None and out["image"][0][1].startswith(b"\xff\xd8")
    assert out["image_sha256"][0][6] == out["image_sha256"][0][1]  # same bytes under another URL
    assert site.routes["/a.jpg"].hits == 1  # a URL repeated in the batch is fetched once


def test_relevance_scores_images_against_kept_paragraphs(site):
    u = site.url
    batch = download(
        doc_batch(
            [
                (["first paragraph", None, "second paragraph", None], [None, u("/a.jpg"), None, u("/b.png")]),
                ([None], [u("/a.jpg")]),  # no paragraph: not scored
            ]
        )
    )
    batch["seg_reason"][0][2] = "para_words"  # a removed paragraph is not a candidate
    cfg = RelevanceScorerConfig(model="mm1data-tiny-clip", pretrained=None, min=-1.0, device="cpu")
    with pytest.warns(UserWarning, match="random weights"):
        scorer = Relevance(cfg)
    out = scorer(batch)
    rel, best = out["image_relevance"], out["image_best_segment"]
    assert math.isnan(rel[0][0]) and math.isnan(rel[0][2]) and -1 <= rel[0][1] <= 1
    assert best[0] == [-1, 0, -1, 0]  # the only kept paragraph
    assert math.isnan(rel[1][0]) and best[1] == [-1]
    a = scorer.embed_images([out["image"][0][1]])
    t = scorer.embed_texts(["first paragraph"])
    assert rel[0][1] == pytest.approx(float((a * t).sum()), abs=1e-5)
    strict = Relevance(RelevanceScorerConfig(model="mm1data-tiny-clip", pretrained=None, min=1.5, device="cpu"))
    batch["seg_reason"][0][1] = batch["seg_reason"][0][3] = ""
    assert list(strict(batch)["seg_reason"][0]) == ["", "relevance", "para_words", "relevance"]


def test_relevance_marks_an_image_no_decoder_reads(site):
    """Bytes that stopped decoding after the download (a damaged stage file, a decoder the download did not use)
    are the position's failure (decode_error, NaN relevance), not the job's; the other images are scored."""
    u = site.url
    batch = download(doc_batch([(["a paragraph", None, None], [None, u("/a.jpg"), u("/b.png")])]))
    batch["image"][0][2] = b"\x89PNG\r\n\x1a\n damaged"
    cfg = RelevanceScorerConfig(model="mm1data-tiny-clip", pretrained=None, min=-1.0, device="cpu")
    with pytest.warns(UserWarning, match="random weights"):
        out = Relevance(cfg)(batch)
    assert list(out["seg_reason"][0]) == ["", "", "decode_error"]
    assert -1 <= out["image_relevance"][0][1] <= 1 and math.isnan(out["image_relevance"][0][2])
    batch["image"][0][1] = b"\xff\xd8\xff broken too"  # every image of the batch: nothing to embed, no crash
    out = Relevance(cfg)(batch)
    assert list(out["seg_reason"][0]) == ["", "decode_error", "decode_error"]


def test_finish_documents_and_sample(site):
    u = site.url
    batch = download(
        doc_batch(
            [
                (["intro", None, "middle", None, "end"], [None, u("/a.jpg"), None, u("/missing.jpg"), None]),
                ([None], [u("/missing.jpg")]),
            ]
        )
    )
    batch["src_file"], batch["src_row"], batch["extra"] = (
        obj(["in.parquet"] * 2),
        np.array([0, 1]),
        obj(['{"x": 1}'] * 2),
    )
    batch["url"] = obj(["https://example.com/page", ""])
    out = finish_documents(batch)
    assert list(out["drop_reason"]) == ["", "empty_document"]
    assert out["images_kept"].tolist() == [1, 0] and out["paragraphs_kept"].tolist() == [3, 0]
    prints = text_fingerprints(["intro", "middle", "end"])
    assert out["repeats"][0] == [f"img:{u('/a.jpg')}"] + [f"para:example.com {h}" for h in prints]
    assert out["image_set"][1] == "" and out["repeats"][1] == []
    assert out["doc_bytes"][0] == len(out["image"][0][1]) + len("intro") + len("middle") + len("end")
    row = batch_to_table(out, {**COMMON_TYPES, **KIND.columns}).to_pylist()[0]  # as the shard writer reads it
    members, tokens = build_sample(row)
    key = row["key"]
    assert sorted(members) == [f"{key}.0.jpg", f"{key}.json"]
    meta = json.loads(members[f"{key}.json"])
    assert meta["segments"] == [{"text": "intro"}, {"image": 0}, {"text": "middle"}, {"text": "end"}]
    assert tokens == meta["tokens"] == len("intromiddleend")
    assert meta["image_info"][0]["url"] == u("/a.jpg") and meta["image_info"][0]["position"] == 1
    assert meta["x"] == 1 and meta["url"] == "https://example.com/page" and meta["images_kept"] == 1


def test_apply_removed_and_image_rows():
    t = pa.table(
        {
            "key": ["k0", "k1"],
            "drop_reason": ["", "doc_images"],
            "images": [[None, "u1", "u2"], ["u1"]],
            "alts": [[None, "a1", None], [None]],
            "seg_reason": [["", "", ""], [""]],
            "url": ["https://a.example/x", "https://b.example/y"],
            "para_hash": [[text_fingerprints(["boiler plate"])[0], "", ""], [""]],
            "removed": [
                json.dumps(["img:u1", "para:a.example " + text_fingerprints(["Boiler  plate!"])[0]]),
                '["img:u1"]',
            ],
            "image_width": [[0, 10, 20], [10]],
            "shard": ["s-0.tar", ""],
        }
    )
    t = apply_removed(t)
    assert t["seg_reason"].to_pylist() == [["dup_paragraph", "dup_image_url", ""], ["dup_image_url"]]
    rows = image_rows(t).to_pylist()
    assert [(r["key"], r["position"], r["image_index"], r["kept"], r["drop_reason"]) for r in rows] == [
        ("k0", 1, -1, False, "dup_image_url"),
        ("k0", 2, 0, True, ""),
        ("k1", 0, -1, False, "dup_image_url"),
    ]
    assert rows[0]["alt"] == "a1" and rows[1]["image_width"] == 20 and rows[1]["shard"] == "s-0.tar"
    f = funnel(t.append_column("image_sha256", pa.array([["", "h1", "h2"], ["h1"]])))
    assert f == {
        "paragraphs.in": 1,
        "paragraphs_dropped.dup_paragraph": 1,
        "images.in": 3,
        "images.downloaded": 3,
        "images_dropped.dup_image_url": 2,
        "images.kept": 1,
    }


@pytest.mark.parametrize("group_rows", [1_000_000, 3])  # one group (a single task), or hash shuffles of many
def test_frequent_values_on_ray(ray_session, monkeypatch, group_rows):
    """A value in more rows than its family's limit goes from every row; a row left under min_left values of the
    counted family is dropped."""
    import ray

    from mm1data import dedup
    from mm1data.dedup import FrequentValues

    monkeypatch.setattr(dedup, "VALUE_ROWS_PER_GROUP", group_rows)

    lists = [["img:logo", "img:a", "para:x"], ["img:logo", "para:x"], ["img:logo", "img:b", "para:x"], ["img:c"],
             ["img:c", "img:d"], []]  # fmt: skip
    items = [{"pos": i, "_s0_values": json.dumps(v), "_s0_n": len(v)} for i, v in enumerate(lists)]
    ds = ray.data.from_items(items, override_num_blocks=3)
    step = FrequentValues("repeats", (("img", 2), ("para", 3)), "img", 1, "doc_images", "removed")
    kept, marks = step.apply(ds, "_s0_", len(lists), keys=None)
    assert kept is None and step.added == {"removed": ""}
    got = sorted((int(m["pos"]), m["reason"], m["removed"]) for m in marks.take_all())
    assert got == [(0, "", '["img:logo"]'), (1, "doc_images", '["img:logo"]'), (2, "", '["img:logo"]')]
    step = FrequentValues("repeats", (("img", 5), ("para", 2)), "img", 1, "doc_images", "removed")
    got = sorted((int(m["pos"]), m["reason"], m["removed"]) for m in step.apply(ds, "_s0_", 6, None)[1].take_all())
    assert got == [(0, "", '["para:x"]'), (1, "", '["para:x"]'), (2, "", '["para:x"]')]  # images left: kept
    cands = step.candidates(pa.table({"repeats": [["x", "x", "y\nz"], None]}), "_s0_")  # a newline is no separator
    assert [json.loads(v) for v in cands["_s0_values"]] == [["x", "y\nz"], []] and cands["_s0_n"].tolist() == [2, 0]


def test_the_scorer_keys_under_relevance_still_read_as_clip(caplog):
    # relevance.model / .pretrained / .enabled was the scorer's form before it became the clip section: a config (or
    # an older output's index.json, read by refilter) written so still runs, with a warning; clip.* as today's form
    from mm1data.config import ConfigError
    from mm1data.pipelines import load_run_config

    sets = [
        "relevance.model=mm1data-tiny-clip",
        "relevance.pretrained=null",
        "relevance.workers=2",
        "relevance.min=0.2",
    ]
    _, cfg = load_run_config("interleaved", sets)
    assert (cfg.clip.model, cfg.clip.pretrained, cfg.clip.workers) == ("mm1data-tiny-clip", None, 2)
    assert cfg.relevance.min == 0.2 and "relevance.model" in caplog.text
    _, cfg = load_run_config("interleaved", ["relevance.enabled=false"])
    assert (
        not cfg.clip.enabled and cfg.clip.model == "ViT-B-32"
    )  # the rest of clip as pipelines/interleaved.yaml has it
    with pytest.raises(ConfigError, match="relevance.bogus"):
        load_run_config("interleaved", ["relevance.bogus=1"])
