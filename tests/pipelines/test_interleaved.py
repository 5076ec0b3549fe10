"""The interleaved pipeline end to end on Ray: OBELICS parquet and MMC4 jsonl with a local image server, the demo
web site crawled to a WARC on S3; shards read back with webdataset, tarfile and MixtureDataset."""

from __future__ import annotations

import io
import json
import os
import tarfile

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import jpeg

from mm1data.demo import FRENCH, ImageServer, Route, crawl_to_warc, make_web_site
from mm1data.loader import MixtureDataset
from mm1data.manifest import load_manifest
from mm1data.pipelines import run_pipeline
from mm1data.report import write_report
from mm1data.schema import count_tokens, make_key

TINY = [
    "download.allow_private_hosts=true",
    "download.image_size=128",
    "clip.model=mm1data-tiny-clip",
    "clip.pretrained=null",
]


def members_of(path: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.mark.slow
def test_obelics_end_to_end(ray_session, tmp_path):
    """Every document's fate is planted: kept, an image 404 (removed, document kept), a logo in > 10 documents
    (removed everywhere), a document whose only image is that logo (dropped by doc_images), an image twice in a
    document, the same URL twice, the same image set twice, lists of different lengths, 1,000 images, a document
    whose only image is a 404 (dropped by the doc_images filter, which runs after relevance)."""
    with ImageServer() as srv:
        for i in range(20):
            srv.routes[f"/i{i}.jpg"] = Route(jpeg(320, 240, seed=i))
        srv.routes["/logo.jpg"] = Route(jpeg(300, 300, seed=77))
        u = srv.url
        rows = []
        for d in range(12):  # 12 documents with the logo: more than max_image_docs (10)
            rows.append(
                {
                    "url": f"https://site.example/{d}",
                    "texts": [f"Paragraph one of document {d}.", None, f"Paragraph two of document {d}.", None],
                    "images": [None, u(f"/i{d}.jpg"), None, u("/logo.jpg")],
                    "lang": "en",
                }
            )
        rows[1]["images"][3] = u("/missing.jpg")  # a 404: the image goes, the document stays
        rows[2]["texts"] += [None]
        rows[2]["images"] += [u("/i2.jpg")]  # the same image twice in a document: the first position stays
        rows.append({"url": "https://site.example/logo-only", "texts": ["Only a logo here.", None],
                     "images": [None, u("/logo.jpg")]})  # fmt: skip
        rows.append(dict(rows[0]))  # the same URL again: dup_url
        rows.append({**rows[3], "url": "https://site.example/copy-of-3"})  # the same images: dup_image_set
        rows.append({"url": "https://bad/1", "texts": ["a", None], "images": [None]})  # lengths differ
        rows.append({"url": "https://bad/2", "texts": [None] * 1000, "images": [u(f"/x{i}.jpg") for i in range(1000)]})
        rows.append({"url": "https://site.example/dead", "texts": ["Its only image is gone.", None],
                     "images": [None, u("/gone.jpg")]})  # fmt: skip
        inp = tmp_path / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), inp, row_group_size=5)
        out = str(tmp_path / "out")
        overrides = [*TINY, "relevance.min=-1", "filters=[{name: doc_images, min: 1, max: 30}]",
                     "shards.samples_per_shard=4", "input.rows_per_unit=5"]  # fmt: skip
        index = run_pipeline("pipelines/interleaved.yaml", str(inp), out, overrides)
        assert srv.routes["/logo.jpg"].hits <= 4  # once per download batch holding it, not once per document

    meta = {m["src_row"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    reasons = {r: m["drop_reason"] for r, m in meta.items()}
    assert reasons == {**{r: "" for r in range(12)}, 12: "doc_images", 13: "dup_url", 14: "dup_image_set",
                       15: "bad_segments", 16: "too_many_images", 17: "doc_images"}  # fmt: skip
    assert meta[17]["seg_reason"] == ["", "http_404"] and meta[17]["doc_images"] == 0  # the late filter's score
    assert meta[1]["seg_reason"] == ["", "", "", "http_404"]
    assert meta[0]["seg_reason"] == ["", "", "", "dup_image_url"]
    assert meta[2]["seg_reason"] == ["", "", "", "dup_image_url", "dup_image_in_doc"]
    assert json.loads(meta[0]["removed"]) == [f"img:{u('/logo.jpg')}"]

    images = pq.read_table(os.path.join(out, "meta_images")).to_pylist()
    doc0 = [
        (r["position"], r["image_index"], r["kept"], r["drop_reason"]) for r in images if r["key"] == meta[0]["key"]
    ]
    assert doc0 == [(1, 0, True, ""), (3, -1, False, "dup_image_url")]
    assert {r["drop_reason"] for r in images if r["key"] == meta[13]["key"]} == {"dup_url"}
    assert sum(r["kept"] for r in images) == 12 == index["totals"]["images"]
    assert index["funnel"]["images"]["kept"] == 12 and index["funnel"]["images_dropped"]["http_404"] == 2
    assert index["funnel"]["paragraphs"]["kept"] == 24 and index["totals"]["samples"] == 12

    paths = [os.path.join(out, s["path"]) for s in index["shards"]]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [make_key("docs.parquet", r) for r in range(12)]  # input order
    for r, s in enumerate(samples):
        doc = json.loads(s["json"])
        assert doc["segments"] == [{"text": f"Paragraph one of document {r}."}, {"image": 0},
                                   {"text": f"Paragraph two of document {r}."}]  # fmt: skip
        assert sorted(k for k in s if not k.startswith("__")) == ["0.jpg", "json"]
        assert doc["image_info"][0]["position"] == 1 and doc["url"] == f"https://site.example/{r}"
        assert doc["lang"] == "en" and doc["tokens"] == sum(count_tokens(x["text"]) for x in doc["segments"][::2])
    for p in paths:  # plain tarfile: every {"image": i} names a member KEY.i.jpg
        for m in members_of(p).values():
            n = sum(1 for seg in json.loads(m["json"])["segments"] if "image" in seg)
            assert sorted(e for e in m if e != "json") == [f"{i}.jpg" for i in range(n)]
    assert index["totals"]["tokens"] == sum(json.loads(s["json"])["tokens"] for s in samples)

    # the loader yields the documents with their images in segment order
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: web\nsources:\n  - {{name: web, index: {out}/index.json, weight: 1}}\n")
    items = [it for _, it in zip(range(12), MixtureDataset(load_manifest(str(manifest)), seed=0, shuffle=False))]
    assert {it["kind"] for it in items} == {"interleaved"} and all(len(it["images"]) == 1 for it in items)
    assert items[0]["text"][1] == {"image": 0} and items[0]["images"][0].size == (
        171,
        128,
    )  # keep_ratio: the shorter side to 128

    # the report shows the images and paragraphs of the documents, from the funnel and meta_images/
    page = open(write_report(out)).read()
    assert "<h2>Images and paragraphs</h2>" in page and "kept (in kept documents)" in page
    assert "<h3>Images (grey" in page  # histograms of meta_images/: relevance and sizes
    assert page.count("data:image/png") >= 6  # funnel, reasons, relevance, 2 sizes x 2, image errors, domains

    # the same command again changes nothing
    assert run_pipeline("pipelines/interleaved.yaml", str(inp), out, overrides)["shards"] == index["shards"]


@pytest.mark.slow
def test_mmc4_and_obelics_preset(ray_session, tmp_path):
    """MMC4 form through the OBELICS preset: images placed after their matched sentence, a small image and a logo
    URL removed by the image rules, a short and a French paragraph removed by the paragraph rules."""
    text = (
        "The old river carried the heavy boats past the quiet village and the people watched them from the "
        "bridge while the children counted every boat that went by in the warm evening light of summer."
    )
    other = (
        "In winter the market moved into the station hall, where farmers sold apples and bread to travellers who "
        "were waiting for the morning train to the city on the other side of the mountains."
    )
    with ImageServer() as srv:
        srv.routes["/big.jpg"] = Route(jpeg(400, 300, seed=1))
        srv.routes["/small.jpg"] = Route(jpeg(100, 100, seed=2))
        srv.routes["/site-logo.jpg"] = Route(jpeg(300, 300, seed=3))
        doc = {
            "url": "https://mmc4.example/a",
            "text_list": [text, "Too short.", other, FRENCH],
            "image_info": [
                {"raw_url": srv.url("/big.jpg"), "matched_text_index": 2, "matched_sim": 0.3},
                {"raw_url": srv.url("/small.jpg"), "matched_text_index": 0},
                {"raw_url": srv.url("/site-logo.jpg"), "matched_text_index": 0},
            ],
        }
        inp = tmp_path / "docs.jsonl"
        inp.write_text(json.dumps(doc) + "\n")
        out = str(tmp_path / "out")
        index = run_pipeline("pipelines/interleaved.yaml", str(inp), out, [*TINY, "relevance.min=-1"])
    (m,) = pq.read_table(os.path.join(out, "meta")).to_pylist()
    assert m["drop_reason"] == "", m
    assert [u is None for u in m["images"]] == [True, False, False, True, True, False, True]  # paragraphs at None
    assert "texts" not in m  # the text is the shards' payload; the score store keeps positions and scores
    assert m["seg_reason"][6] == "para_lang"  # a French paragraph in an English document
    assert m["seg_reason"][1] == "img_min_side" and m["seg_reason"][2] == "img_url_words"
    assert m["seg_reason"][3].startswith("para_")
    (sample,) = members_of(os.path.join(out, index["shards"][0]["path"])).values()
    assert json.loads(sample["json"])["segments"] == [{"text": text}, {"text": other},
                                                       {"image": 0}]  # fmt: skip


@pytest.mark.slow
def test_web_site_warc_on_s3(ray_session, tmp_path):
    """The demo's web site crawled to a WARC on S3, output on S3: boilerplate gone, lazy, srcset and relative images
    fetched, the logo and advert on every page removed, the mirrored page dropped as the same image set."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="web")
    with ImageServer() as srv:
        pages = make_web_site(srv, 14, seed=5)
        warc = tmp_path / "crawl.warc.gz"
        crawl_to_warc(pages, str(warc))
        s3.upload_file(str(warc), "web", "crawl/crawl.warc.gz")
        index = run_pipeline("pipelines/interleaved.yaml", "s3://web/crawl/", "s3://web/out",
                             [*TINY, "relevance.min=-1"])  # fmt: skip
    body = s3.get_object(Bucket="web", Key=f"out/{index['shards'][0]['path']}")["Body"].read()
    docs = [json.loads(v) for k, v in members_of_bytes(body).items() if k.endswith(".json")]
    assert index["funnel"]["dropped"].get("dup_image_set") == 1  # the mirror of page 0
    # the newsletter blurb, on every page, goes from every document kept
    assert index["funnel"]["paragraphs_dropped"]["dup_paragraph"] == index["funnel"]["kept"]
    assert len(docs) == index["totals"]["samples"] >= 10
    for doc in docs:
        text = " ".join(s["text"] for s in doc["segments"] if "text" in s)
        assert "cookie" not in text.lower() and "Copyright" not in text and "Privacy policy" not in text
        assert "newsletter" not in text
        urls = [i["url"] for i in doc["image_info"]]
        assert not any("logo" in x or "banner-ad" in x or "data:" in x or "-small" in x for x in urls), urls
        assert all("/img/" in x for x in urls) and doc["segments"][0].get("text")


def members_of_bytes(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.slow
def test_reference_images_leave_their_documents(ray_session, tmp_path):
    """dedup.reference=[a caption output, a blocklist]: images near the caption corpus' images or in the blocklist
    leave their documents (seg_reason duplicate_of_reference / eval_contamination); a document left without
    images then goes by its doc_images rule."""
    import hashlib

    from conftest import encode, near_copies, photo
    from test_caption import blocklist

    from mm1data.phash import phash, to_hex

    pics = {s: photo(s) for s in (3, 6, 7, 9, 10)}
    with ImageServer() as srv:
        srv.routes["/c3.jpg"] = Route(encode(pics[3]))
        srv.routes["/c9.jpg"] = Route(encode(pics[9]))
        caption_in = tmp_path / "captions.parquet"
        caption_rows = [{"url": srv.url(f"/c{s}.jpg"), "caption": f"a caption {s}"} for s in (3, 9)]
        pq.write_table(pa.Table.from_pylist(caption_rows), caption_in)
        captions = str(tmp_path / "captions")
        run_pipeline("pipelines/caption.yaml", str(caption_in), captions,
                     [*TINY, "download.image_size=96", "filters=[]"])  # fmt: skip
        p7 = encode(pics[7])
        bl = blocklist(
            tmp_path / "eval.parquet", [{"phash": phash(pics[6])}, {"sha256": hashlib.sha256(p7).hexdigest()}]
        )
        srv.routes["/d3.jpg"] = Route(near_copies(pics[3])["q60"])  # near a caption image
        srv.routes["/d6.jpg"] = Route(near_copies(pics[6])["resized"])  # near a blocklist image
        srv.routes["/d7.jpg"] = Route(p7)  # a blocklist image's bytes
        srv.routes["/d10.jpg"] = Route(encode(pics[10]))
        u = srv.url
        docs = [
            {"url": "https://a.example/0", "texts": ["Para zero.", None, "More.", None],
             "images": [None, u("/d3.jpg"), None, u("/d10.jpg")]},
            {"url": "https://a.example/1", "texts": ["Para one.", None], "images": [None, u("/d6.jpg")]},
            {"url": "https://a.example/2", "texts": ["Para two.", None], "images": [None, u("/d7.jpg")]},
        ]  # fmt: skip
        inp = tmp_path / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(docs), inp)
        out = str(tmp_path / "out")
        overrides = [*TINY, "relevance.min=-1", "filters=[{name: doc_images, min: 1, max: 30}]",
                     f"dedup.reference=[{captions}, {bl}]"]  # fmt: skip
        index = run_pipeline("pipelines/interleaved.yaml", str(inp), out, overrides)

    meta = {m["src_row"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    assert {r: m["drop_reason"] for r, m in meta.items()} == {0: "", 1: "doc_images", 2: "doc_images"}
    assert meta[0]["seg_reason"] == ["", "duplicate_of_reference", "", ""]
    assert meta[1]["seg_reason"] == ["", "eval_contamination"]
    assert meta[2]["seg_reason"] == ["", "eval_contamination"]
    images = pq.read_table(os.path.join(out, "meta_images")).to_pylist()
    assert [(r["position"], r["kept"], r["drop_reason"]) for r in images if r["key"] == meta[0]["key"]] == [
        (1, False, "duplicate_of_reference"),
        (3, True, ""),
    ]
    assert all(isinstance(r["phash"], int) for r in images)
    assert meta[0]["image_phash"][0] is None and meta[0]["image_phash"][1] is not None  # null at paragraphs
    (sample,) = wds.WebDataset([os.path.join(out, s["path"]) for s in index["shards"]], shardshuffle=False)
    doc = json.loads(sample["json"])
    assert doc["segments"] == [{"text": "Para zero."}, {"text": "More."}, {"image": 0}]
    assert doc["image_info"][0]["phash"] == to_hex(meta[0]["image_phash"][3])
    assert index["funnel"]["images_dropped"]["eval_contamination"] == 2
