"""`mm1data blocklist build`: every source form (image folder, tar shards, parquet of bytes incl. Hugging Face's
struct form, text parquet/jsonl, S3), undecodable images, and dedup.reference checks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg, png_bomb
from PIL import Image

from mm1data.blocklist import SCHEMA, BuildOptions, build, is_blocklist
from mm1data.cli import main
from mm1data.config import ConfigError
from mm1data.dedup import check_references
from mm1data.phash import phash


def encoded(fmt: str, seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    img = Image.open(io.BytesIO(jpeg(*size, color=(30 * seed % 255, 90, 160), seed=seed)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def expected(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), phash(Image.open(io.BytesIO(data)))


def rows(path: str) -> list[dict]:
    t = pq.read_table(path)
    assert t.schema.remove_metadata() == SCHEMA
    assert json.loads(pq.read_schema(path).metadata[b"mm1data"]) == {"blocklist": 1}
    return t.to_pylist()


CORRUPT = jpeg(seed=5)[:300]  # a truncated JPEG: sha256 yes, pHash no


def test_folder_of_images(tmp_path):
    src = tmp_path / "val"
    files = {
        "a.jpg": jpeg(seed=1),
        "sub/b.png": encoded("PNG", 2),
        "sub/deeper/c.webp": encoded("WEBP", 3),
        "d.GIF": encoded("GIF", 4),
        "e.bmp": encoded("BMP", 6),
        "zz_bad.jpg": CORRUPT,
        "zz_bomb.png": png_bomb(),  # 10^10 pixels claimed: Pillow refuses it, the sha256 row stays
        "notes.txt": b"not an image",
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    out = str(tmp_path / "bl.parquet")
    summary = build(str(src), out, BuildOptions(workers=2))  # the process pool
    got = {r["source"]: r for r in rows(out)}
    images = [n for n in files if n != "notes.txt"]
    assert set(got) == set(images)
    for name in images:
        r = got[name]
        assert r["kind"] == "image" and r["text"] is None
        if name.startswith("zz_"):
            assert (r["sha256"], r["phash"]) == (hashlib.sha256(files[name]).hexdigest(), None)
        else:
            assert (r["sha256"], r["phash"]) == expected(files[name])
    assert (summary.counts["image"], summary.counts["undecodable"], summary.counts["other_files"]) == (7, 2, 1)
    line = summary.line(out)
    assert "7 images (2 undecodable: sha256 only)" in line and "1 files of another type" in line
    assert is_blocklist(out)


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_tar_shards_as_file_folder_and_glob(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    one = {"s0.jpg": jpeg(seed=11), "s0.txt": b"a caption", "s0.json": b"{}", "s1.png": encoded("PNG", 12)}
    two = {"s2.jpg": jpeg(seed=13), "s2.txt": b"x", "s3.jpg": CORRUPT}
    write_tar(shards / "e-000000.tar", one)
    write_tar(shards / "e-000001.tar", two)
    for source in (str(shards), str(shards / "e-*.tar")):
        out = str(tmp_path / "bl.parquet")
        summary = build(source, out, BuildOptions(workers=1))
        got = [(r["source"], r["sha256"], r["phash"]) for r in rows(out)]
        assert got == [
            ("e-000000.tar/s0.jpg", *expected(one["s0.jpg"])),
            ("e-000000.tar/s1.png", *expected(one["s1.png"])),
            ("e-000001.tar/s2.jpg", *expected(two["s2.jpg"])),
            ("e-000001.tar/s3.jpg", hashlib.sha256(CORRUPT).hexdigest(), None),
        ]
        assert dict(summary.counts) == {"image": 4, "undecodable": 1, "other_members": 3}
    build(str(shards / "e-000001.tar"), out)  # a single shard
    assert [r["source"] for r in rows(out)] == ["e-000001.tar/s2.jpg", "e-000001.tar/s3.jpg"]


def test_parquet_of_image_bytes_and_questions(tmp_path):
    imgs = [jpeg(seed=20 + i) for i in range(5)]
    # Hugging Face datasets' Image feature: struct<bytes: binary, path: string>
    hf = pa.table(
        {
            "image": [{"bytes": imgs[0], "path": "COCO_val_0.jpg"}, {"bytes": CORRUPT, "path": None},
                      {"bytes": None, "path": "only/a/path.jpg"}, {"bytes": imgs[1], "path": None}],
            "question": ["What colour is the bus?", None, "How many dogs?", "   "],
            "answers": [["red", "dark red"], [], ["2"], None],
        }
    )  # fmt: skip
    pq.write_table(hf, tmp_path / "vqa.parquet", row_group_size=2)
    out = str(tmp_path / "bl.parquet")
    summary = build(str(tmp_path / "vqa.parquet"), out, BuildOptions(text_cols=("question", "answers")))
    got = [(r["kind"], r["source"], r["sha256"], r["phash"], r["text"]) for r in rows(out)]
    sha_bad = hashlib.sha256(CORRUPT).hexdigest()
    assert got == [
        ("image", "vqa.parquet#0:COCO_val_0.jpg", *expected(imgs[0]), None),
        ("image", "vqa.parquet#1", sha_bad, None, None),
        ("text", "vqa.parquet#0.question", None, None, "What colour is the bus?"),
        ("text", "vqa.parquet#0.answers[0]", None, None, "red"),
        ("text", "vqa.parquet#0.answers[1]", None, None, "dark red"),
        ("image", "vqa.parquet#3", *expected(imgs[1]), None),
        ("text", "vqa.parquet#2.question", None, None, "How many dogs?"),
        ("text", "vqa.parquet#2.answers[0]", None, None, "2"),
    ]
    assert dict(summary.counts) == {"image": 3, "undecodable": 1, "no_image": 1, "text": 5, "empty_text": 3}

    # a plain binary column under another name
    pq.write_table(pa.table({"img": imgs[2:], "id": [1, 2, 3]}), tmp_path / "plain.parquet")
    build(str(tmp_path / "plain.parquet"), out, BuildOptions(image_col="img"))
    assert [(r["source"], r["sha256"]) for r in rows(out)] == [
        (f"plain.parquet#{i}", hashlib.sha256(b).hexdigest()) for i, b in enumerate(imgs[2:])
    ]
    with pytest.raises(ConfigError, match="no image column .*columns: img, id"):
        build(str(tmp_path / "plain.parquet"), out)
    with pytest.raises(ConfigError, match="no column 'caption'"):
        build(str(tmp_path / "plain.parquet"), out, BuildOptions(image_col="img", text_cols=("caption",)))


def test_text_jsonl_and_cli(tmp_path, capsys):
    lines = [{"captions": ["A man rides a horse.", "A horse and rider."]}, {"captions": []}, {"other": 1}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = str(tmp_path / "caps.parquet")
    assert main(["blocklist", "build", str(tmp_path / "caps.jsonl"), "--text-col", "captions", "-o", out]) == 0
    assert capsys.readouterr().out.strip() == (
        f"blocklist: 0 images (0 undecodable: sha256 only), 2 texts, 1 null or empty texts (not listed) -> {out}"
    )
    assert [(r["kind"], r["source"], r["text"]) for r in rows(out)] == [
        ("text", "caps.jsonl#0.captions[0]", "A man rides a horse."),
        ("text", "caps.jsonl#0.captions[1]", "A horse and rider."),
    ]
    with pytest.raises(SystemExit) as e:
        main(["blocklist", "build", "--help"])
    usage = capsys.readouterr().out
    assert e.value.code == 0 and "--text-col" in usage and "--image-col" in usage and "eval_contamination" in usage
    # bad invocations are one clear line, exit code 2
    assert main(["blocklist", "build", str(tmp_path / "caps.jsonl"), "-o", out]) == 2
    assert "needs --text-col" in capsys.readouterr().err
    assert main(["blocklist", "build", str(tmp_path / "nowhere"), "-o", out]) == 2
    assert "blocklist source" in capsys.readouterr().err
    assert main(["blocklist", "build", str(tmp_path / "caps.jsonl"), "--text-col", "captions", "-o", "x.csv"]) == 2
    assert "must end with .parquet" in capsys.readouterr().err


def test_s3_source_and_output(s3_server, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="evals")
    a, b = jpeg(seed=31), encoded("PNG", 32)
    s3.put_object(Bucket="evals", Key="nocaps/img/a.jpg", Body=a)
    s3.put_object(Bucket="evals", Key="nocaps/img/b.png", Body=b)
    buf = io.BytesIO()
    pq.write_table(pa.table({"caption": ["Two cats on a sofa."]}), buf)
    s3.put_object(Bucket="evals", Key="nocaps/caps.parquet", Body=buf.getvalue())
    summary = build("s3://evals/nocaps", "s3://evals/bl/nocaps.parquet", BuildOptions(text_cols=("caption",)))
    got = pq.read_table(io.BytesIO(s3.get_object(Bucket="evals", Key="bl/nocaps.parquet")["Body"].read()))
    assert [(r["kind"], r["source"], r["sha256"], r["phash"], r["text"]) for r in got.to_pylist()] == [
        ("text", "caps.parquet#0.caption", None, None, "Two cats on a sofa."),
        ("image", "img/a.jpg", *expected(a), None),
        ("image", "img/b.png", *expected(b), None),
    ]
    assert (summary.counts["image"], summary.counts["text"]) == (2, 1)
    check_references(["s3://evals/bl/nocaps.parquet"])  # a blocklist on S3 is a valid reference


def test_check_references(tmp_path):
    bl = str(tmp_path / "bl.parquet")
    (tmp_path / "q.jsonl").write_text('{"q": "What is it?"}\n')
    build(str(tmp_path / "q.jsonl"), bl, BuildOptions(text_cols=("q",)))
    out = tmp_path / "output"
    out.mkdir()
    (out / "index.json").write_text("{}")
    check_references([bl, str(out)])
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    for bad, why in [
        (str(tmp_path / "missing.parquet"), "does not exist"),
        (str(tmp_path / "other.parquet"), "not a blocklist"),
        (str(tmp_path), "neither a blocklist parquet nor an mm1data output"),
    ]:
        with pytest.raises(ConfigError, match=why) as e:
            check_references([bl, bad])
        assert bad in str(e.value)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-mm1data-")]  # the build left no temp file


def test_a_blocklist_written_into_its_source_is_not_read_by_the_next_build(tmp_path):
    # `blocklist build vqa/ -o vqa/bl.parquet`, twice: the second build reads the source, not the first's output
    src = tmp_path / "vqa"
    src.mkdir()
    pq.write_table(pa.table({"image": [jpeg(seed=40)], "question": ["What is on the table?"]}), src / "q.parquet")
    out = str(src / "bl.parquet")
    build(str(src), out, BuildOptions(text_cols=("question",)))
    first = rows(out)
    summary = build(str(src), out, BuildOptions(text_cols=("question",)))
    assert rows(out) == first and len(first) == 2
    assert summary.counts["blocklists"] == 1
