"""Manifest: parsing and validation, index resolution and sha256 pins, `mm1data manifest check` numbers and errors."""

from __future__ import annotations

import hashlib
import json
import os

import boto3
import corpora
import pytest

from mm1data.cli import main
from mm1data.config import ConfigError, read_yaml
from mm1data.manifest import Manifest, Source, check_manifest, load_manifest
from mm1data.packing import SequenceConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [
    {"name": "interleaved", "index": "interleaved/index.json", "weight": 0.45},
    {"name": "caption", "index": "caption/index.json", "weight": 0.45},
    {"name": "text", "index": "text/index.json", "weight": 0.10},
]


@pytest.fixture
def mix(tmp_path):
    """caption 40 samples / 40 images / 640 tokens, interleaved 30 / 60 / 4,500, text 20 / 0 / 4,000."""
    corpora.write_mix(str(tmp_path), {"caption": 40, "interleaved": 30, "text": 20}, per_shard=10)
    return tmp_path


def check_json(capsys, *args: str) -> dict:
    assert main(["manifest", "check", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mm1_yaml_is_the_45_45_10_mix_with_mm1_sequences():
    m = Manifest.from_dict(read_yaml(os.path.join(REPO, "manifests", "mm1.yaml")))
    assert (m.name, m.seed, m.unit) == ("mm1", 0, "samples")
    assert [(s.name, s.weight) for s in m.sources] == [("interleaved", 0.45), ("caption", 0.45), ("text", 0.10)]
    assert [s.index for s in m.sources] == [f"data/{k}/index.json" for k in ("interleaved", "caption", "text")]
    assert m.sequence == SequenceConfig() == SequenceConfig(4096, 16, 144, 378)
    assert Manifest.from_dict(m.to_dict()) == m


def test_round_trip_and_validation():
    m = Manifest.from_dict(
        {"name": "x", "seed": 3, "unit": "tokens", "sources": SOURCES, "sequence": {"max_images": 4}}
    )
    assert m.sources[2] == Source("text", "text/index.json", 0.1) and m.sequence.max_images == 4
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    bad = {
        "weights": "unknown config key 'weights'",
        "sources": "unknown config key 'sources[1].wieght'",
        "unit": "unit must be one of samples, tokens, images",
        "dup": "duplicate source name 'text'",
        "neg": "weight must be a finite number >= 0",
        "pin": "sha256 must be 64 lowercase hex digits",
        "zero": "at least one source needs a weight > 0",
        "seq": "unknown config key 'sequence.tokens'",
    }
    cases = {
        "weights": {"weights": [1]},
        "sources": {"sources": [SOURCES[0], {"name": "c", "index": "i", "wieght": 1}]},
        "unit": {"unit": "bytes"},
        "dup": {"sources": [SOURCES[2], SOURCES[2]]},
        "neg": {"sources": [{**SOURCES[0], "weight": -1}]},
        "pin": {"sources": [{**SOURCES[0], "sha256": "abc"}]},
        "zero": {"sources": [{**SOURCES[0], "weight": 0}]},
        "seq": {"sequence": {"tokens": 5}},
    }
    for case, change in cases.items():
        with pytest.raises(ConfigError, match=bad[case].replace("[", r"\[").replace("]", r"\]")):
            Manifest.from_dict({"name": "x", "sources": SOURCES, **change})


def test_relative_indexes_resolve_against_the_manifest_folder(mix, tmp_path, monkeypatch):
    path = corpora.write_manifest(str(mix / "m.yaml"), SOURCES)
    monkeypatch.chdir(tmp_path.parent)  # not the manifest's folder
    m = load_manifest(os.path.relpath(path))
    assert [s.index for s in m.sources] == [str(mix / k / "index.json") for k in ("interleaved", "caption", "text")]
    folder = corpora.write_manifest(str(mix / "sub" / "m.yaml"), [{"name": "t", "index": "../text", "weight": 1}])
    assert check_manifest(load_manifest(folder))["sources"][0]["samples"] == 20  # a folder means its index.json
    # not beside the manifest: the working directory, as DESIGN.md's `data/caption/index.json` from the repo root
    elsewhere = corpora.write_manifest(str(tmp_path / "manifests" / "m.yaml"), SOURCES)
    monkeypatch.chdir(mix)
    assert [s.index for s in load_manifest(elsewhere).sources] == [
        str(mix / k / "index.json") for k in ("interleaved", "caption", "text")
    ]


def test_check_json_exact_numbers(mix, capsys):
    path = corpora.write_manifest(str(mix / "m.yaml"), SOURCES)
    report = check_json(capsys, path, "--budget-tokens", "947000")
    rows = {r["name"]: r for r in report["sources"]}
    assert [r["name"] for r in report["sources"]] == ["interleaved", "caption", "text"]
    for name, kind, shards, samples, images, tokens in [
        ("interleaved", "interleaved", 3, 30, 60, 4500),
        ("caption", "caption", 4, 40, 40, 640),
        ("text", "text", 2, 20, 0, 4000),
    ]:
        r = rows[name]
        assert (r["kind"], r["shards"], r["samples"], r["images"], r["tokens"]) == (
            kind,
            shards,
            samples,
            images,
            tokens,
        )
        assert r["index"] == str(mix / name / "index.json")
    assert [rows[n]["weight"] for n in rows] == [0.45, 0.45, 0.1]
    approx = pytest.approx
    # by samples the draws follow the weights; tokens per sample 150, 16, 200; images per sample 2, 1, 0
    assert [rows[n]["share_samples"] for n in rows] == approx([0.45, 0.45, 0.10])
    assert [rows[n]["share_tokens"] for n in rows] == approx([67.5 / 94.7, 7.2 / 94.7, 20 / 94.7])
    assert [rows[n]["share_images"] for n in rows] == approx([2 / 3, 1 / 3, 0])
    assert report["tokens_per_sample"] == approx(94.7)
    # 947,000 tokens = 10,000 draws: 4,500 of 30 interleaved docs, 4,500 of 40 captions, 1,000 of 20 texts
    assert [rows[n]["epochs"] for n in rows] == approx([150, 112.5, 50])
    assert [rows[n]["budget_per_epoch"] for n in rows] == approx([30 / 0.45 * 94.7, 40 / 0.45 * 94.7, 20 / 0.1 * 94.7])
    assert report["totals"] == {
        "shards": 9,
        "samples": 90,
        "images": 100,
        "tokens": 9140,
        "bytes": report["totals"]["bytes"],
    }
    assert report["totals"]["bytes"] == sum(
        os.path.getsize(mix / k / f) for k in rows for f in os.listdir(mix / k) if f.endswith(".tar")
    )
    assert (report["unit"], report["budget_tokens"], report["sequence"]["max_tokens"]) == ("samples", 947000, 4096)


def test_check_by_tokens_and_images(mix, capsys):
    rows = check_json(capsys, corpora.write_manifest(str(mix / "t.yaml"), SOURCES, unit="tokens"))["sources"]
    assert [r["share_tokens"] for r in rows] == pytest.approx([0.45, 0.45, 0.10])
    probs = [0.45 / 150, 0.45 / 16, 0.10 / 200]
    assert [r["share_samples"] for r in rows] == pytest.approx([p / sum(probs) for p in probs])
    assert all(r["epochs"] is None for r in rows)
    two = SOURCES[:2]
    rows = check_json(capsys, corpora.write_manifest(str(mix / "i.yaml"), two, unit="images"))["sources"]
    assert [r["share_images"] for r in rows] == pytest.approx([0.5, 0.5])
    assert [r["share_samples"] for r in rows] == pytest.approx([1 / 3, 2 / 3])  # 2 images per doc, 1 per caption
    path = corpora.write_manifest(str(mix / "bad.yaml"), SOURCES, unit="images")
    assert main(["manifest", "check", path]) == 2
    assert "source 'text' has no images" in capsys.readouterr().err


def test_check_table(mix, capsys):
    assert (
        main(["manifest", "check", corpora.write_manifest(str(mix / "m.yaml"), SOURCES), "--budget-tokens", "1e6"])
        == 0
    )
    out = capsys.readouterr().out
    assert "manifest test: weights count samples, seed 0" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("interleaved"))
    assert line.split() == [
        "interleaved",
        "interleaved",
        "30",
        "60",
        "4,500",
        "0.45",
        "45.0%",
        "71.3%",
        "66.7%",
        "158",
        "-",  # caption choice: only caption sources have one
    ]
    assert "budget: 1,000,000 text tokens" in out


def test_sha256_pin(mix, capsys):
    digest = hashlib.sha256((mix / "text" / "index.json").read_bytes()).hexdigest()
    good = corpora.write_manifest(str(mix / "g.yaml"), [{**SOURCES[2], "sha256": digest}])
    assert check_json(capsys, good)["sources"][0]["samples"] == 20
    bad = corpora.write_manifest(str(mix / "b.yaml"), [{**SOURCES[2], "sha256": "0" * 64}])
    assert main(["manifest", "check", bad]) == 2
    err = capsys.readouterr().err
    assert (
        f"source 'text': index {mix / 'text' / 'index.json'} has sha256 {digest}, the manifest pins {'0' * 64}" in err
    )


def test_missing_index_shard_sidecar_and_wrong_size_are_named(mix, capsys):
    path = corpora.write_manifest(str(mix / "m.yaml"), SOURCES)
    os.unlink(mix / "caption" / "caption-000002.tar")
    os.unlink(mix / "text" / "text-000001.idx")
    with open(mix / "interleaved" / "interleaved-000000.tar", "ab") as f:
        f.write(b"\0" * 512)
    assert main(["manifest", "check", path]) == 2
    err = capsys.readouterr().err
    assert "3 shard problem(s)" in err
    assert f"{mix / 'caption' / 'caption-000002.tar'}: missing" in err
    assert f"{mix / 'text' / 'text-000001.idx'}: offsets sidecar missing" in err
    size = os.path.getsize(mix / "interleaved" / "interleaved-000000.tar")
    assert f"{mix / 'interleaved' / 'interleaved-000000.tar'}: {size} bytes, index.json lists {size - 512}" in err
    os.unlink(mix / "text" / "index.json")
    assert main(["manifest", "check", path]) == 2
    assert f"source 'text': cannot read index {mix / 'text' / 'index.json'}" in capsys.readouterr().err
    assert main(["manifest", "check", str(mix / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_mm1_manifest_without_data_names_the_index(capsys):
    assert main(["manifest", "check", os.path.join(REPO, "manifests", "mm1.yaml")]) == 2
    assert os.path.join(REPO, "data", "interleaved", "index.json") in capsys.readouterr().err


def test_check_on_s3(mix, s3_server, capsys, tmp_path):
    boto3.client("s3").create_bucket(Bucket="manifestbucket")
    corpora.write_mix("s3://manifestbucket/c", {"caption": 40, "interleaved": 30, "text": 20}, per_shard=10)
    remote = [{**s, "index": "s3://manifestbucket/c/" + s["index"]} for s in SOURCES]
    s3_report = check_json(capsys, corpora.write_manifest(str(tmp_path / "s3.yaml"), remote))
    local = check_json(capsys, corpora.write_manifest(str(mix / "m.yaml"), SOURCES))
    strip = [{k: v for k, v in r.items() if k != "index"} for r in local["sources"]]
    assert [{k: v for k, v in r.items() if k != "index"} for r in s3_report["sources"]] == strip
    boto3.client("s3").delete_object(Bucket="manifestbucket", Key="c/caption/caption-000001.tar")
    assert main(["manifest", "check", str(tmp_path / "s3.yaml")]) == 2
    assert "s3://manifestbucket/c/caption/caption-000001.tar: missing" in capsys.readouterr().err
    gone = corpora.write_manifest(
        str(tmp_path / "g.yaml"), [{**remote[0], "index": "s3://manifestbucket/none/index.json"}]
    )
    assert main(["manifest", "check", gone]) == 2
    assert "s3://manifestbucket/none/index.json" in capsys.readouterr().err
