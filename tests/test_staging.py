"""Staging without Ray: parts per unit, a unit's task finds its own committed rows, done markers, typed columns."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

from mm1data import staging
from mm1data.config import ConfigError
from mm1data.read import InputConfig, plan_units, read_unit


def caption_file(tmp_path, n: int = 10):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"url": f"http://h/{i}.jpg", "caption": f"c {i}"}) + "\n" for i in range(n)))
    return InputConfig(path=str(p), bytes_per_unit=200)


def spec(unit) -> dict[str, np.ndarray]:
    return {"unit": np.array([json.dumps(dataclasses.asdict(unit))], dtype=object)}


def stage(out: str, batch: dict) -> None:
    staging.write_staging(batch, out, {"url": pa.string(), "caption": pa.string()}, "size", ("caption",))


def test_a_unit_task_skips_what_it_staged_and_marks_itself_done(tmp_path):
    cfg = caption_file(tmp_path)
    out = str(tmp_path / "out")
    units = plan_units(cfg)
    assert len(units) > 2
    unit = units[1]
    first = list(staging.read_pending(spec(unit), read_unit, cfg, out))
    rows = np.concatenate([b["src_row"] for b in first])
    assert all((b[staging.UNIT_COL] == unit.id).all() for b in first)
    # commit half of the unit's rows (as a crashed run would have), in two parts
    batch = {k: np.concatenate([b[k] for b in first]) for k in first[0]}
    half = {k: v[: len(rows) // 2] for k, v in batch.items()}
    stage(out, {k: v[:1] for k, v in half.items()})
    stage(out, {k: v[1:] for k, v in half.items()})
    assert len(staging.unit_parts(out, unit.id)) == 2
    again = list(staging.read_pending(spec(unit), read_unit, cfg, out))
    assert np.concatenate([b["src_row"] for b in again]).tolist() == rows[len(rows) // 2 :].tolist()
    assert staging.pending_units(out, units) == units  # not done: it still had rows to stage
    stage(out, {k: v[len(rows) // 2 :] for k, v in batch.items()})
    assert list(staging.read_pending(spec(unit), read_unit, cfg, out)) == []
    assert staging.pending_units(out, units) == [u for u in units if u is not unit]
    staging.mark_staged(out, len(units))
    assert staging.pending_units(out, units) == []


def test_a_row_staged_twice_keeps_one_copy_and_parts_have_the_declared_types(tmp_path):
    cfg = caption_file(tmp_path)
    out = str(tmp_path / "out")
    unit = plan_units(cfg)[0]
    batch = next(iter(staging.read_pending(spec(unit), read_unit, cfg, out)))
    stage(out, dict(batch))
    stage(out, {k: v[::-1].copy() for k, v in batch.items()})  # a retried task cut the rows otherwise
    t = staging.read_unit_staged(out, unit.id)
    assert t["src_row"].to_pylist() == sorted(batch["src_row"].tolist())
    assert t.schema.field("url").type == pa.string() and t.schema.field("size").type == pa.int64()
    assert t["size"].to_pylist() == [len(c) for c in batch["caption"]]


def test_list_of_binary_and_list_of_struct_columns_stage(tmp_path):
    """What an interleaved kind stages: a document's images and its segments."""
    out = str(tmp_path / "out")
    images = np.empty(2, dtype=object)
    images[:] = [[b"\xff\xd8a", b"\xff\xd8bc"], []]
    segments = np.empty(2, dtype=object)
    segments[:] = [[{"text": "hi", "image": None}, {"text": None, "image": 0}], [{"text": "only text", "image": None}]]
    batch = {
        "key": np.array(["a" * 16, "b" * 16], dtype=object),
        "src_file": np.array(["x", "x"], dtype=object),
        "src_row": np.array([0, 1]),
        "drop_reason": np.array(["", ""], dtype=object),
        "extra": np.array(["{}", "{}"], dtype=object),
        "images": images,
        "segments": segments,
        staging.UNIT_COL: np.array(["u" * 16, "u" * 16], dtype=object),
    }
    seg = pa.list_(pa.struct([("text", pa.string()), ("image", pa.int32())]))
    staging.write_staging(batch, out, {"images": pa.list_(pa.binary()), "segments": seg}, "bytes", ("images",))
    t = staging.read_unit_staged(out, "u" * 16)
    assert t["images"].to_pylist() == [[b"\xff\xd8a", b"\xff\xd8bc"], []] and t["bytes"].to_pylist() == [7, 0]
    assert t.schema.field("segments").type == seg and t["segments"].to_pylist()[1] == [
        {"text": "only text", "image": None}
    ]


def test_hex_phash_columns_become_nullable_int64() -> None:
    """A pHash travels between Ray stages as hex (a nullable int column would turn into float64 there)."""
    import numpy as np
    import pyarrow as pa

    from mm1data.staging import batch_to_table

    one = np.empty(3, dtype=object)
    one[:] = ["ffffffffffffffff", "", "0000000000000005"]
    lists = np.empty(3, dtype=object)
    lists[:] = [["", "8000000000000000"], None, [7]]
    t = batch_to_table(
        {"phash": one, "image_phash": lists}, {"phash": pa.int64(), "image_phash": pa.list_(pa.int64())}
    )
    assert t["phash"].to_pylist() == [-1, None, 5] and t["phash"].type == pa.int64()
    assert t["image_phash"].to_pylist() == [[None, -(1 << 63)], None, [7]]  # ints as they came


def test_a_rerun_may_change_how_fast_but_not_what(tmp_path):
    out = str(tmp_path / "out")
    fp = {"download": {"workers": 0, "threads": 32, "batch_size": 256, "image_size": 512}, "clip": {"workers": 1}}
    run_id = staging.check_run(out, fp, "c")
    faster = {"download": {"workers": 64, "threads": 8, "batch_size": 64, "image_size": 512}}
    faster["clip"] = {"workers": [1, 8]}
    assert staging.check_run(out, faster, "c") == run_id  # more actors on a bigger cluster: the staged rows resume
    with pytest.raises(ConfigError, match=r"different config \(download differ"):
        staging.check_run(out, {**fp, "download": {**fp["download"], "image_size": 256}}, "c")
    # run.json written by an mm1data that kept the speed keys: still resumes, and is still checked
    uri = staging.staging_uri(out, "run.json")
    with open(uri, "w") as f:
        json.dump({**fp, "download": {**fp["download"], "threads": 4}, "run_id": run_id}, f)
    assert staging.check_run(out, faster, "c") == run_id
    with pytest.raises(ConfigError, match=r"different config \(clip differ"):
        staging.check_run(out, {**faster, "clip": {"workers": 1, "model": "other"}}, "c")
