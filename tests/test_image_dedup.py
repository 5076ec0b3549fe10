"""pHash near-duplicate images and reference matching (mm1data.dedup's image half), without a pipeline."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm1data import dedup
from mm1data.config import ConfigError
from mm1data.dedup import NearImageDedup, ReferenceImages, _band_masks, _image_matches, check_references
from mm1data.phash import hamming

BASE = np.array([0x0123456789ABCDEF, 0x7EDCBA9876543210, 0x0F0F0F0F0F0F0F0F, 0x3333CCCC5555AAAA], dtype=np.int64)


def flip(h: int, bits: list[int]) -> int:
    v = int(h) & 0xFFFFFFFFFFFFFFFF
    for b in bits:
        v ^= 1 << b
    return v - (1 << 64) if v >= 1 << 63 else v


def keys_fn():
    """pos -> a key, as Positions.keys (made inside a test: Ray workers cannot import this module)."""

    def keys(pos: np.ndarray) -> np.ndarray:
        out = np.empty(len(pos), dtype=object)
        out[:] = [f"k{int(p)}" for p in pos]
        return out

    return keys


def test_band_masks_cover_the_64_bits_once() -> None:
    for bands in (1, 5, 9, 11, 64):
        masks = _band_masks(bands)
        assert len(masks) == bands
        total = 0
        for m in masks:
            assert total & m == 0
            total |= m
        assert total == (1 << 64) - 1


def _group(ph: list[int], ids: list[int], bands: int, ref: list[int] | None = None, score=None) -> dict:
    """Band rows of some images, as _ImageBandRows makes them (one group: parts=1)."""
    n = len(ph)
    items = {
        "id": np.array(ids, dtype=np.int64),
        "sub": np.full(n, -1, dtype=np.int32),
        "phash": np.array(ph, dtype=np.int64),
        "shahi": np.zeros(n, dtype=np.uint64),
        "shalo": np.zeros(n, dtype=np.uint64),
        "score": np.zeros(n) if score is None else np.array(score, dtype=float),
        "n": np.zeros(n, dtype=np.int32),
        "ref": np.zeros(n, dtype=np.int8) if ref is None else np.array(ref, dtype=np.int8),
        "has_phash": np.ones(n, dtype=bool),
    }
    return dedup._ImageBandRows(bands, 1, False)(items)


def _edges(out: dict) -> set[tuple[int, int]]:
    e = out["ref"] == 0
    return {tuple(sorted(p)) for p in zip(out["a"][e].tolist(), out["b"][e].tolist())}


@pytest.mark.parametrize("cap", [4096, 2])
def test_pairs_within_k_are_found_and_verified(cap: int) -> None:
    rng = np.random.default_rng(3)
    ph = [int(BASE[0]), flip(BASE[0], [1, 20, 40]), flip(BASE[0], [0, 9, 18, 27, 36, 45, 54, 63]), int(BASE[1])]
    ph += [int(x) for x in rng.integers(-(1 << 63), (1 << 63) - 1, 40, dtype=np.int64)]  # far from everything
    ids = list(range(100, 100 + len(ph)))
    out = _image_matches(_group(ph, ids, bands=9), k=8, bands=9, cap=cap)
    want = {
        (a, b)
        for i, a in enumerate(ids)
        for j, b in enumerate(ids)
        if i < j and hamming(np.int64(ph[i]), np.int64(ph[j])) <= 8
    }
    assert want >= {(100, 101), (100, 102)} and (101, 102) not in want  # 3 + 8 bits apart
    if cap > 100:  # pigeonhole: 9 bands, pairs within 8 bits always share a band
        assert _edges(out) == want
    else:  # tiny buckets are cut by the next bands: only verified pairs, some pairs may be missed
        assert _edges(out) <= want


def test_identical_hashes_beyond_the_cap_are_linked_without_pairs() -> None:
    ph = [int(BASE[2])] * 50 + [int(BASE[3])]
    out = _image_matches(_group(ph, list(range(51)), bands=4), k=4, bands=4, cap=8)
    from mm1data.dedup import join_clusters

    e = out["ref"] == 0
    ids, root = join_clusters(out["a"][e], out["b"][e])
    assert ids.tolist() == list(range(50)) and set(root.tolist()) == {0}


def test_hits_on_references_by_phash_and_by_sha256() -> None:
    n = 4
    items = {
        "id": np.array([1, 2, -1, 3], dtype=np.int64),
        "sub": np.array([-1, -1, -1, -1], dtype=np.int32),
        "phash": np.array([int(BASE[0]), int(BASE[1]), flip(BASE[0], [5, 6]), int(BASE[2])], dtype=np.int64),
        "shahi": np.array([0, 0, 7, 7], dtype=np.uint64),
        "shalo": np.array([0, 0, 9, 9], dtype=np.uint64),
        "score": np.zeros(n),
        "n": np.zeros(n, dtype=np.int32),
        "ref": np.array([0, 0, 2, 0], dtype=np.int8),
        "has_phash": np.array([True, True, True, False]),  # id 3: no pHash, the reference's bytes
    }
    out = _image_matches(dedup._ImageBandRows(9, 1, True)(items), k=4, bands=9, cap=4096)
    hits = sorted(set(zip(out["a"][out["ref"] > 0].tolist(), out["ref"][out["ref"] > 0].tolist())))
    assert hits == [(1, 2), (3, 2)]
    assert _edges(out) == set()


def _blocklist(path, rows: list[dict]) -> str:
    t = pa.table(
        {
            "kind": pa.array([r.get("kind", "image") for r in rows], pa.string()),
            "source": pa.array([r.get("source", "x") for r in rows], pa.string()),
            "sha256": pa.array([r.get("sha256") for r in rows], pa.string()),
            "phash": pa.array([r.get("phash") for r in rows], pa.int64()),
            "text": pa.array([r.get("text") for r in rows], pa.string()),
        }
    )
    t = t.replace_schema_metadata({"mm1data": json.dumps({"blocklist": 1})})
    pq.write_table(t, str(path))
    return str(path)


def test_check_references_names_a_bad_location(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nowhere"):
        check_references([str(tmp_path / "nowhere")])
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), str(plain))
    with pytest.raises(ConfigError, match="plain.parquet is not a blocklist"):
        check_references([str(plain)])
    with pytest.raises(ConfigError, match="gone.parquet does not exist"):
        check_references([str(tmp_path / "gone.parquet")])
    bl = _blocklist(tmp_path / "bl.parquet", [{"phash": 5}])
    (ref,) = check_references([bl])
    assert (ref.flag, ref.files) == (2, (bl,))  # 2: a blocklist (REF_REASONS: eval_contamination)


def test_near_image_dedup_on_ray_keeps_the_best_score_then_input_order(ray_session, tmp_path) -> None:
    import ray

    a, b = int(BASE[0]), int(BASE[1])
    # pos: 10 20 30 form a cluster (scores 0.2, 0.5, 0.5: 20 stays, the first of the best); 40 50 another (NaN
    # scores: 40, the first); 60 alone; 70 within 3 bits of a blocklist image; 80 has a reference's sha256
    rows = [
        (10, a, 0.2, None),
        (20, flip(a, [3]), 0.5, None),
        (30, flip(a, [3, 33, 60]), 0.5, None),
        (40, b, None, None),
        (50, flip(b, [0, 1, 2, 3, 4, 5]), None, None),
        (60, int(BASE[3]), 0.9, None),
        (70, flip(BASE[2], [1, 2, 3]), 0.9, None),
        (80, None, 0.9, "ab" * 32),
    ]
    bl = _blocklist(tmp_path / "bl.parquet", [{"phash": int(BASE[2])}, {"sha256": "ab" * 32}, {"kind": "text"}])
    t = pa.table(
        {
            "phash": pa.array([r[1] for r in rows], pa.int64()),
            "sha256": pa.array([r[3] for r in rows], pa.string()),
            "clip_score": pa.array([r[2] for r in rows], pa.float32()),
        }
    )
    step = NearImageDedup(max_distance=8, bands=9, references=check_references([bl]))
    cands = {"pos": np.array([r[0] for r in rows], dtype=np.int64), **step.candidates(t, "_s0_")}
    ds = ray.data.from_arrow(pa.table(cands)).repartition(3)
    kept, marks = step.apply(ds, "_s0_", len(rows), keys_fn())
    assert kept is None
    got = {r["pos"]: (r["reason"], r["dup_image_cluster"]) for r in marks.take_all()}
    assert got == {
        10: ("dup_near_image", "k20"),
        20: ("", "k20"),
        30: ("dup_near_image", "k20"),
        40: ("", "k40"),
        50: ("dup_near_image", "k40"),
        70: ("eval_contamination", ""),
        80: ("eval_contamination", ""),
    }


def test_reference_images_remove_positions_and_count_what_is_left(ray_session, tmp_path) -> None:
    import ray

    bl = _blocklist(tmp_path / "bl.parquet", [{"phash": int(BASE[0])}, {"sha256": "cd" * 32}])
    docs = pa.table(
        {
            "images": [["u1", None, "u2", "u3"], ["u4", "u5"], [None]],
            "seg_reason": [["", "", "", "relevance"], ["", ""], [""]],
            "image_phash": pa.array(
                [[flip(BASE[0], [7]), None, int(BASE[1]), int(BASE[0])], [int(BASE[2]), None], [None]],
                pa.list_(pa.int64()),
            ),
            "image_sha256": [["", "", "", ""], ["ee" * 32, "cd" * 32], [""]],
        }
    )
    step = ReferenceImages(check_references([bl]), max_distance=4, bands=5, min_left=2)
    cands = {"pos": np.array([1, 2, 3], dtype=np.int64), **step.candidates(docs, "_s0_")}
    ds = ray.data.from_arrow(pa.table(cands))
    kept, marks = step.apply(ds, "_s0_", 3, keys_fn())
    assert kept is ds
    got = {r["pos"]: (r["reason"], json.loads(r["removed_ref"])) for r in marks.take_all()}
    # doc 1: position 0 is 1 bit from the blocklist image (position 3 equals it but was removed already, so it is no
    # candidate): 1 of its 2 kept images left, under min_left 2; doc 2: position 1 has the blocklist's bytes
    assert got == {
        1: ("doc_images", [[0, "eval_contamination"]]),
        2: ("doc_images", [[1, "eval_contamination"]]),
    }


def test_a_bucket_over_the_small_size_is_compared_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedup, "_SMALL_BUCKET", 4)  # row blocks of 32: several per bucket
    rng = np.random.default_rng(5)
    high = rng.integers(0, 1 << 31, 150, dtype=np.int64) << 32  # one low half: one bucket of band 0
    ph = (high | 0x1234).tolist() + [flip(int(high[7] | 0x1234), [40]), flip(int(high[9] | 0x1234), [35, 50])]
    ids = list(range(len(ph)))
    out = _image_matches(_group(ph, ids, bands=2), k=2, bands=2, cap=4096)
    arr = np.array(ph, dtype=np.int64)
    d = hamming(arr[:, None], arr[None, :])
    want = {(i, j) for i in ids for j in ids if i < j and d[i, j] <= 2}
    assert {(7, 150), (9, 151)} <= want and _edges(out) == want


def test_foreign_reference_content_is_no_match_not_a_crash(tmp_path):
    # a reference whose score store has no image hashes (a text corpus's meta/): no item rows
    got = dedup._reference_items(pa.table({"drop_reason": ["", "x"]}), 1)
    assert {k: len(v) for k, v in got.items()} == dict.fromkeys(got, 0)
    # a sha256 that is not hex: nothing to match by, where it stands; the others still read
    hi, lo = dedup.sha_halves(["z" * 64, "ab" * 32, None])
    assert hi.tolist()[0::2] == [0, 0] and lo.tolist()[0::2] == [0, 0] and hi[1] != 0
    # an index.json that is not JSON: a ConfigError naming it, before anything runs
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="index.json is not an mm1data index"):
        check_references([str(tmp_path / "out")])
