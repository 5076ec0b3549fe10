"""Text decontamination (dedup.reference blocklists' text rows): the matchers, then the text and caption kinds end
to end on Ray with planted eval questions and captions and near misses that must stay."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg

from mm1data.blocklist import BuildOptions, build
from mm1data.config import ConfigError
from mm1data.decontam import CaptionMatch, DocumentMatch, build_index, match_texts
from mm1data.demo import ImageServer, Route, make_document
from mm1data.pipelines import run_pipeline

QUESTIONS = [
    "What is the name of the tallest mountain in the world that is located in Nepal?",  # 16 words
    "Which animal in the picture is sleeping on the sofa?",  # 10 words: matched whole
    "How many dogs are there?",  # 5 words: too short to look for in a document
]
CAPTIONS = ["A man riding a wave on top of a surfboard.", "Two giraffes standing next to a tall tree."]


def blocklist(tmp_path, name: str, texts: list[str], col: str) -> str:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({col: t}) + "\n" for t in texts))
    out = str(tmp_path / f"{name}.parquet")
    build(str(src), out, BuildOptions(text_cols=(col,), workers=1))
    return out


def test_document_ngram_match(tmp_path):
    bl = blocklist(tmp_path, "vqa", QUESTIONS, "question")
    match = DocumentMatch()
    n, index = build_index([bl], match)
    assert index["lengths"] == [10, 13] and index["sources"].to_pylist() == [
        f"vqa.jsonl#{i}.question" for i in range(3)
    ]
    assert n == len(index["keys"]) == 16 - 13 + 1 + 1  # four 13-grams of the first, the second whole
    assert build_index([blocklist(tmp_path, "short", QUESTIONS[2:], "q")], match) == (0, None)  # nothing to look for
    q0 = QUESTIONS[0].split()
    docs = [
        "Some page text before. WHAT IS THE NAME of the tallest mountain in the world, that is located in NEPAL??",
        "A quiz: " + " ".join(q0[:12]) + " and then other words entirely.",  # 12 words of it: no 13-gram
        " ".join(q0[:8] + ["famous"] + q0[9:]),  # one word changed in the middle: every 13-window differs
        "intro which animal in the picture is sleeping on the sofa outro",  # the 10-word item, whole
        "which animal in the picture is sleeping on the couch",  # 9 of its 10 words
        "How many dogs are there? Three.",  # a 5-word item is not looked for
        "",
        None,
    ]
    assert match_texts(docs, index, match).tolist() == [0, -1, -1, 1, -1, -1, -1, -1]
    # min_words 3: the short question is looked for too, as a whole
    _, index3 = build_index([bl], DocumentMatch(min_words=3))
    assert match_texts(docs[5:6], index3, DocumentMatch(min_words=3)).tolist() == [2]


def test_caption_minhash_match(tmp_path):
    bl = blocklist(tmp_path, "coco", CAPTIONS, "caption")
    match = CaptionMatch()
    _, index = build_index([bl], match)
    captions = [
        "a man riding a wave on top of a surfboard",  # the same words
        "A man riding a wave on top of a red surfboard!",  # word-set Jaccard 8/9
        "Two giraffes standing next to a tree",  # 7/8
        "A man riding a horse on a beach",  # 4/10: a near miss
        "two tall giraffes",  # 3/8
        "",
    ]
    assert match_texts(captions, index, match).tolist() == [0, 0, 1, -1, -1, -1]
    strict = CaptionMatch(threshold=1.0)
    assert match_texts(captions, build_index([bl], strict)[1], strict).tolist() == [0, -1, -1, -1, -1, -1]
    with pytest.raises(ConfigError, match="threshold"):
        CaptionMatch(threshold=0)


def test_text_kind_drops_eval_questions(ray_session, tmp_path):
    bl = blocklist(tmp_path, "vqa", QUESTIONS, "question")
    rng = np.random.default_rng(4)
    docs = [make_document(rng, 8) for _ in range(10)]
    docs[2] += " Quiz time. " + QUESTIONS[0].upper()
    docs[4] += " Trivia: " + " ".join(QUESTIONS[0].split()[:12]) + "."  # a near miss: 12 words of it
    docs[6] = QUESTIONS[1].lower().replace("?", "!!") + " " + docs[6]
    docs[8] += " " + QUESTIONS[2]  # too short to count
    docs.append(docs[2])  # an exact copy of a contaminated page: contaminated too, not dup_text
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": d, "id": f"d{i}"}) + "\n" for i, d in enumerate(docs)))
    out = str(tmp_path / "out")
    sets = ["filters=[]", "input.id_col=id", f"dedup.reference=[{bl}]"]
    index = run_pipeline("pipelines/text.yaml", str(inp), out, sets)
    meta = {m["id"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    assert {k: (m["drop_reason"], m["contamination_source"]) for k, m in meta.items() if m["drop_reason"]} == {
        "d2": ("eval_contamination", "vqa.jsonl#0.question"),
        "d6": ("eval_contamination", "vqa.jsonl#1.question"),
        "d10": ("eval_contamination", "vqa.jsonl#0.question"),
    }
    assert index["funnel"]["dropped"] == {"eval_contamination": 3} and index["funnel"]["kept"] == 8
    assert all(m["contamination_source"] == "" for m in meta.values() if not m["drop_reason"])

    # the same run without the reference keeps them (only the copy goes, as dup_text): the corpus-wide half
    # reruns, nothing is restaged
    index = run_pipeline("pipelines/text.yaml", str(inp), out, sets[:2])
    assert index["funnel"]["dropped"] == {"dup_text": 1}

    # an mm1data output as a reference: the text kind has no images and reads no output's texts; said, not ignored
    index = run_pipeline(
        "pipelines/text.yaml", str(inp), str(tmp_path / "out3"), [*sets[:2], f"dedup.reference=[{bl},{out}]"]
    )
    assert index["funnel"]["dropped"] == {"eval_contamination": 3}
    assert [w for w in index["warnings"] if "dedup.reference" in w] == [
        f"dedup.reference {out} is an mm1data output: the text kind matches only blocklists' eval texts, so it was "
        "not used"
    ]

    # a bad reference fails before anything is written
    for bad, why in [(str(tmp_path / "nope.parquet"), "does not exist"), (str(tmp_path), "neither")]:
        with pytest.raises(ConfigError, match=why):
            run_pipeline(
                "pipelines/text.yaml", str(inp), str(tmp_path / "out2"), [*sets[:2], f"dedup.reference=[{bad}]"]
            )
        assert not os.path.exists(tmp_path / "out2")


def test_caption_kind_drops_eval_captions(ray_session, tmp_path):
    eval_images = tmp_path / "evalset"
    eval_images.mkdir()
    (eval_images / "x.jpg").write_bytes(jpeg(seed=900))
    pq.write_table(pa.table({"caption": [CAPTIONS]}), eval_images / "captions.parquet")
    bl = str(tmp_path / "coco.parquet")
    build(str(eval_images), bl, BuildOptions(text_cols=("caption",), workers=1))  # images and texts together
    captions = [
        "a photo of my garden",
        "A MAN riding a wave, on top of a surfboard",  # the eval caption
        "a man riding a horse on a beach",  # near miss
        "Two giraffes standing next to a tree",  # 7/8 of the words of the second
        "giraffes at the zoo next to a tree",  # near miss
        "a man riding a wave on top of a surfboard",  # the eval caption again (another image)
    ]
    with ImageServer({}) as server:
        rows = []
        for i, c in enumerate(captions):
            server.routes[f"/{i}.jpg"] = Route(jpeg(120, 110, seed=i))
            rows.append({"url": server.url(f"/{i}.jpg"), "caption": c})
        inp = tmp_path / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), inp)
        out = str(tmp_path / "out")
        sets = ["filters=[]", "clip.enabled=false", "download.allow_private_hosts=true", f"dedup.reference=[{bl}]"]
        index = run_pipeline("pipelines/caption.yaml", str(inp), out, sets)
    meta = {m["src_row"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    assert {r: (m["drop_reason"], m["contamination_source"]) for r, m in meta.items()} == {
        0: ("", ""),
        1: ("eval_contamination", "captions.parquet#0.caption[0]"),
        2: ("", ""),
        3: ("eval_contamination", "captions.parquet#0.caption[1]"),
        4: ("", ""),
        5: ("eval_contamination", "captions.parquet#0.caption[0]"),
    }
    assert index["funnel"]["kept"] == 3


def test_interleaved_kind_drops_documents_holding_eval_text(ray_session, tmp_path):
    bl = blocklist(tmp_path, "vqa", QUESTIONS, "question")
    q0 = QUESTIONS[0].split()
    paragraphs = [
        ["The market opened early on Sunday morning.", "Farmers sold apples and bread to travellers."],
        ["Our weekly quiz is here.", "Question one: " + QUESTIONS[0], "Answers next week."],  # contaminated
        ["Our weekly quiz is here.", "Question one: " + " ".join(q0[:12]) + " and so on."],  # near miss: 12 words
        ["Today we ask:", QUESTIONS[1].upper()],  # the 10-word question, whole
    ]
    with ImageServer({}) as server:
        rows = []
        for d, texts in enumerate(paragraphs):
            server.routes[f"/{d}.jpg"] = Route(jpeg(200, 150, seed=d))
            rows.append(
                {"url": f"https://site.example/{d}", "texts": [*texts, None],
                 "images": [None] * len(texts) + [server.url(f"/{d}.jpg")]}
            )  # fmt: skip
        inp = tmp_path / "docs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), inp)
        out = str(tmp_path / "out")
        sets = ["filters=[]", "clip.enabled=false", "download.allow_private_hosts=true", f"dedup.reference=[{bl}]"]
        index = run_pipeline("pipelines/interleaved.yaml", str(inp), out, sets)
    meta = {m["url"]: m for m in pq.read_table(os.path.join(out, "meta")).to_pylist()}
    assert {u[-1]: (m["drop_reason"], m["contamination_source"]) for u, m in meta.items()} == {
        "0": ("", ""),
        "1": ("eval_contamination", "vqa.jsonl#0.question"),
        "2": ("", ""),
        "3": ("eval_contamination", "vqa.jsonl#1.question"),
    }
    assert index["funnel"]["kept"] == 2
