"""MixtureDataset: every kind round trip, shares per unit, rank/worker splits, exact resume, S3, bad shards."""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import os
import subprocess
import sys

import boto3
import corpora
import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from mm1data.config import ConfigError
from mm1data.loader import MixtureDataset, MixtureLoader
from mm1data.manifest import Manifest, load_manifest
from mm1data.schema import make_key
from mm1data.shards import read_offsets

WEIGHTS = {"interleaved": 0.45, "caption": 0.45, "text": 0.10}


def manifest_over(root: str, weights: dict[str, float] = WEIGHTS, unit: str = "samples", seed: int = 0):
    srcs = [{"name": k, "index": f"{root}/{k}/index.json" if "://" in root else f"{k}/index.json", "weight": w}
            for k, w in weights.items()]  # fmt: skip
    path = os.path.join(root if "://" not in root else "/tmp", f"m-{unit}-{seed}.yaml")
    return load_manifest(corpora.write_manifest(path, srcs, unit=unit, seed=seed))


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """caption 40 (4 shards), interleaved 30 (3 shards), text 20 (2 shards)."""
    root = str(tmp_path_factory.mktemp("mix"))
    corpora.write_mix(root, {"caption": 40, "interleaved": 30, "text": 20}, per_shard=10)
    return root


def ids(items) -> list[tuple[int, str, str]]:
    return [(it["position"], it["source"], it["key"]) for it in items]


def run_ranks(m, world: int, **kw) -> list[list[tuple[int, str, str]]]:
    return [ids(MixtureDataset(m, rank=r, world_size=world, decode_images=False, **kw)) for r in range(world)]


def test_single_source_round_trip_every_kind_in_order(mix):
    for kind, n in (("caption", 40), ("interleaved", 30), ("text", 20)):
        m = manifest_over(mix, {kind: 1.0})
        items = list(MixtureDataset(m, shuffle=False))
        assert [it["key"] for it in items] == [make_key(kind, i) for i in range(n)]
        assert [it["position"] for it in items] == list(range(n))
        for i, it in enumerate(items):
            members, n_images, _ = corpora.SAMPLES[kind](i)
            key = make_key(kind, i)
            assert it["source"] == kind and it["kind"] == kind and it["json"]["i"] == i
            assert len(it["images"]) == n_images
            want_images = (
                [members[f"{key}.jpg"]] if kind == "caption" else [members[f"{key}.{j}.jpg"] for j in range(n_images)]
            )
            for img, raw in zip(it["images"], want_images):
                assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(raw))))
            if kind == "interleaved":
                assert it["text"] == json.loads(members[f"{key}.json"])["segments"]
                assert [s["image"] for s in it["text"] if "image" in s] == list(range(n_images))
            else:
                assert it["text"] == members[f"{key}.txt"].decode()


def test_undecoded_images_are_the_member_bytes(mix):
    m = manifest_over(mix, {"interleaved": 1.0})
    it = next(iter(MixtureDataset(m, shuffle=False, decode_images=False)))
    key = make_key("interleaved", 0)
    assert it["images"] == [corpora.interleaved_sample(0)[0][f"{key}.0.jpg"]]


def test_same_seed_same_order_other_seed_or_epoch_another(mix):
    m = manifest_over(mix)
    a = ids(MixtureDataset(m, decode_images=False, shuffle_buffer=8))
    assert a == ids(MixtureDataset(m, decode_images=False, shuffle_buffer=8))
    assert len(a) == 90 and sorted(p for p, _, _ in a) == list(range(90))
    assert a != ids(MixtureDataset(m, decode_images=False, shuffle_buffer=8, seed=1))
    ds = MixtureDataset(m, decode_images=False, shuffle_buffer=8)
    ds.set_epoch(1)
    e1 = ids(ds)
    assert e1 != a and e1 == ids(ds)  # iterating again without set_epoch repeats the epoch (DistributedSampler)
    ds.set_epoch(0)
    assert ids(ds) == a
    # the shard order changes per epoch and per seed, but within a source every sample comes once per pass
    m1 = manifest_over(mix, {"text": 1.0})
    for seed in (0, 1):
        keys = [k for _, _, k in ids(MixtureDataset(m1, seed=seed, decode_images=False))]
        assert sorted(keys) == sorted(make_key("text", i) for i in range(20))


def test_exact_source_order_for_seed_0(mix):
    """A guard on the stream itself: resuming a run needs the same order from the same code and seed."""
    m = manifest_over(mix)
    got = "".join(s[0] for _, s, _ in ids(MixtureDataset(m, decode_images=False))[:40])
    assert got == GOLDEN_SEED0


GOLDEN_SEED0 = "icitcctiiciiccicciciciiicticcttcciiiccci"


@pytest.mark.parametrize("unit", ["samples", "tokens", "images"])
def test_mixture_shares_follow_the_weights_in_their_unit(tmp_path, unit):
    """20,000 draws: the share of `unit` per source is the weight within 0.005 (stratified blocks of 1,024)."""
    corpora.write_mix(str(tmp_path), {"caption": 300, "interleaved": 300, "text": 300}, per_shard=50)
    weights = WEIGHTS if unit != "images" else {"interleaved": 0.3, "caption": 0.7}  # text has no images
    m = manifest_over(str(tmp_path), weights, unit=unit)
    got = dict.fromkeys(weights, 0)
    count = 0
    for it in MixtureDataset(m, samples_per_epoch=20_000, decode_images=False, shuffle_buffer=100):
        count += 1
        if unit == "samples":
            got[it["source"]] += 1
        elif unit == "images":
            got[it["source"]] += len(it["images"])
        else:
            text = it["text"]
            got[it["source"]] += (
                sum(len(s["text"]) for s in text if "text" in s) if it["kind"] == "interleaved" else len(text)
            )
    assert count == 20_000
    total = sum(got.values())
    for name, w in weights.items():
        assert abs(got[name] / total - w) < 0.005, (name, got[name] / total, w)
    if unit == "tokens":  # text docs are 12.5x longer than captions, so they are drawn far less often per token
        assert got["text"] / 200 < got["caption"] / 16 / 4


def test_block_quotas_are_exact_and_never_negative():
    """C_s(b) in closed form: counts sum to b*B, never decrease, and stay within one draw of b*B*p_s."""
    from mm1data.loader import _Mixture

    rng = np.random.default_rng(0)
    for n_sources in (1, 2, 3, 7, 40):
        w = rng.random(n_sources) ** 6  # some weights are tiny next to the others
        p = w / w.sum()
        mix = _Mixture(p, [np.array([10])] * n_sources, seed=0, shuffle=True, buffer=4)
        counts = np.array([mix.drawn_before(b) for b in range(0, 3000)])
        blocks = np.arange(3000)[:, None] * mix.block_size
        assert (counts.sum(1) == blocks[:, 0]).all() and (np.diff(counts, axis=0) >= 0).all()
        assert np.abs(counts - blocks * p).max() <= n_sources
        src, draw = mix.block(0, 5)
        assert sorted(src) == sorted(np.repeat(np.arange(n_sources), counts[6] - counts[5]))
        for s in range(n_sources):  # the draws of each source in a block continue where the last block stopped
            assert list(draw[src == s]) == list(range(counts[5][s], counts[6][s]))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resume_at_many_points_equals_the_uninterrupted_run(mix, world):
    m = manifest_over(mix)
    kw = {"samples_per_epoch": 203, "shuffle_buffer": 8}  # > one pass of each source, not a multiple of world
    full = run_ranks(m, world, **kw)
    assert len({len(f) for f in full}) == 1 and len(full[0]) == 203 // world
    assert sorted(p for f in full for p, _, _ in f) == list(range(203 // world * world))
    for cut in (0, 1, 7, 16, len(full[0]) - 1, len(full[0])):
        first, states = [], []
        for r in range(world):
            ds = MixtureDataset(m, rank=r, world_size=world, decode_images=False, **kw)
            first.append(ids(itertools.islice(iter(ds), cut)))
            states.append(json.loads(json.dumps(ds.state_dict())))  # JSON round trip
        assert all(s == states[0] for s in states) and states[0]["position"] == cut * world
        for r in range(world):
            ds = MixtureDataset(m, rank=r, world_size=world, decode_images=False, **kw)
            ds.load_state_dict(states[r])
            assert first[r] + ids(ds) == full[r], (world, cut, r)


def test_resume_after_world_size_changes_from_2_to_4(mix):
    m = manifest_over(mix)
    kw = {"samples_per_epoch": 200, "shuffle_buffer": 8}
    single = {p: (s, k) for p, s, k in run_ranks(m, 1, **kw)[0]}  # the global stream
    cut = 13
    before, state = [], None
    for r in range(2):
        ds = MixtureDataset(m, rank=r, world_size=2, decode_images=False, **kw)
        before += ids(itertools.islice(iter(ds), cut))
        state = ds.state_dict()
    after = []
    for r in range(4):
        ds = MixtureDataset(m, rank=r, world_size=4, decode_images=False, **kw)
        ds.load_state_dict(state)
        assert len(ds) == (200 - 2 * cut) // 4
        after.append(ids(ds))
    assert len({len(a) for a in after}) == 1
    got = before + [x for a in after for x in a]
    assert sorted(p for p, _, _ in got) == list(range(2 * cut + len(after[0]) * 4))  # no gap, no repeat
    assert all(single[p] == (s, k) for p, s, k in got)  # every position holds the sample the stream puts there


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than CPUs here
def test_dataloader_workers_keep_the_rank_order_and_resume_exactly(mix):
    m = manifest_over(mix)
    kw = {"samples_per_epoch": 150, "shuffle_buffer": 8, "decode_images": False}
    ref = ids(MixtureDataset(m, rank=1, world_size=2, **kw))
    # plain DataLoader, one item at a time: the round-robin over workers gives the rank's order
    plain = torch.utils.data.DataLoader(
        MixtureDataset(m, rank=1, world_size=2, **kw), batch_size=None, num_workers=2, collate_fn=lambda x: x
    )
    assert ids(plain) == ref
    # MixtureLoader with batches: the same order, and a state taken mid-epoch resumes at another worker count
    ds = MixtureDataset(m, rank=1, world_size=2, batch_size=4, **kw)
    loader = MixtureLoader(ds, batch_size=4, num_workers=2)
    assert [x for b in loader for x in ids(b)] == ref
    first = []
    for b in loader:
        first += ids(b)
        if len(first) == 12:
            break
    state = loader.state_dict()
    assert state["position"] == 24
    ds2 = MixtureDataset(m, rank=1, world_size=2, batch_size=3, **kw)
    loader2 = MixtureLoader(ds2, batch_size=3, num_workers=3)
    loader2.load_state_dict(json.loads(json.dumps(state)))
    assert first + [x for b in loader2 for x in ids(b)] == ref
    with pytest.raises(ValueError, match="batch_size"):
        MixtureLoader(ds, batch_size=8)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_worker_images_travel_in_reused_shared_buffers_and_stay_intact(mix):
    """Images from workers view shared buffers that a worker reuses only once no image holds them: images kept
    across many batches (more than the slots), and images dropped at once, both equal the in-process decode."""
    import gc

    m = manifest_over(mix, {"caption": 0.5, "interleaved": 0.5})
    kw = {"samples_per_epoch": 120, "shuffle_buffer": 8, "batch_size": 2}
    want = {(it["position"]): [np.asarray(im).copy() for im in it["images"]] for it in MixtureDataset(m, **kw)}
    loader = MixtureLoader(MixtureDataset(m, **kw), batch_size=2, num_workers=2)
    kept = []
    for i, batch in enumerate(loader):
        kept += batch
        if i % 8 == 0:
            gc.collect()
    assert len(kept) == 120 and all(isinstance(im, Image.Image) for it in kept for im in it["images"])
    assert all(
        all(np.array_equal(np.asarray(im), w) for im, w in zip(it["images"], want[it["position"]])) for it in kept
    )
    for batch in loader:  # dropped at once: slots are reused, and what arrives is still right
        for it in batch:
            assert all(np.array_equal(np.asarray(im), w) for im, w in zip(it["images"], want[it["position"]]))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than CPUs here
def test_every_rank_yields_the_same_count_with_fewer_shards_than_workers(tmp_path):
    corpora.write_corpus(str(tmp_path / "text"), "text", 5, per_shard=5)  # one shard
    m = manifest_over(str(tmp_path), {"text": 1.0})
    counts = []
    for r in range(3):
        ds = MixtureDataset(m, rank=r, world_size=3, samples_per_epoch=23, decode_images=False)
        loader = MixtureLoader(ds, num_workers=4)  # 4 workers, 1 shard: no worker waits on a shard
        counts.append(len(list(loader)))
    assert counts == [7, 7, 7]


def test_reads_s3_through_moto(mix, s3_server, tmp_path):
    boto3.client("s3").create_bucket(Bucket="mixbucket")
    corpora.write_mix("s3://mixbucket/corpora", {"caption": 40, "interleaved": 30, "text": 20}, per_shard=10)
    local = manifest_over(mix)
    remote = manifest_over("s3://mixbucket/corpora")
    assert remote.sources[0].index == "s3://mixbucket/corpora/interleaved/index.json"
    kw = {"samples_per_epoch": 120, "shuffle_buffer": 8}
    got = list(MixtureDataset(remote, **kw))
    assert ids(got) == ids(MixtureDataset(local, **kw))
    assert got[0]["shard"].startswith("s3://mixbucket/corpora/")
    assert all(img.size == (8, 8) for it in got for img in it["images"])
    # forked DataLoader workers each make their own boto3 client (an inherited one would share its connections)
    loader = MixtureLoader(MixtureDataset(remote, decode_images=False, batch_size=5, **kw), 5, num_workers=2)
    assert [x for b in loader for x in ids(b)] == ids(got)
    ds = MixtureDataset(remote, **kw)  # resume on S3 as well
    first = ids(itertools.islice(iter(ds), 50))
    ds2 = MixtureDataset(remote, **kw)
    ds2.load_state_dict(ds.state_dict())
    assert first + ids(ds2) == ids(got)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.levelname + " " + record.getMessage())


@pytest.fixture
def loader_log():
    handler = _Records()
    logger = logging.getLogger("mm1data.loader")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.DEBUG
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def source_draws(m, **kw) -> tuple[list[dict], dict[str, list[str]]]:
    """(the stream, and a longer run's keys of each source in draw order): read before damaging a corpus."""
    clean = list(MixtureDataset(m, **kw))
    draws: dict[str, list[str]] = {}
    for it in MixtureDataset(m, **{**kw, "samples_per_epoch": 10 * len(clean)}):
        draws.setdefault(it["source"], []).append(it["key"])
    return clean, draws


def replaced_stream(clean: list[dict], draws: dict[str, list[str]], lost: set[str]) -> list[tuple[int, str, str]]:
    """What the stream yields when the `lost` samples cannot be read: each lost draw is replaced by its source's
    next draw that is not lost (the draws of a source come in position order)."""
    seen: dict[str, int] = {}
    out = []
    for it in clean:
        k = seen[it["source"]] = seen.get(it["source"], -1) + 1
        while draws[it["source"]][k] in lost:
            k += 1
        out.append((it["position"], it["source"], draws[it["source"]][k]))
    return out


def test_truncated_shard_replaces_its_missing_samples_with_the_next_readable_draw(tmp_path, loader_log):
    corpora.write_mix(str(tmp_path), {"caption": 40, "interleaved": 30, "text": 20}, per_shard=10)
    m = manifest_over(str(tmp_path))
    kw = {"samples_per_epoch": 150, "shuffle_buffer": 8, "decode_images": False}
    clean, draws = source_draws(m, **kw)
    bad = str(tmp_path / "caption" / "caption-000001.tar")
    offsets = read_offsets(bad[: -len(".tar")] + ".idx")
    with open(bad, "r+b") as f:
        f.truncate(offsets[6] + 100)  # samples 0-5 intact, 6 cut in the middle, 7-9 gone
    lost = {make_key("caption", 10 + i) for i in range(6, 10)}
    ds = MixtureDataset(m, **kw)
    got = list(ds)
    assert len(got) == 150  # every position yields: no rank runs short
    assert ids(got) == replaced_stream(clean, draws, lost)
    n_lost = sum(it["key"] in lost for it in clean)
    assert n_lost > 0 and set(ds.errors) == {bad} and ds.errors[bad] >= n_lost
    assert sum(bool(it["replaced"]) for it in got) == n_lost
    assert all(r[0] == bad and r[1] >= 6 for it in got for r in it["replaced"])
    assert any(msg.startswith("WARNING") and bad in msg and "truncated" in msg for msg in loader_log)
    assert sum(bad in msg for msg in loader_log) == ds.errors[bad]  # the rest at DEBUG level, still naming the shard


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_corrupt_header_and_missing_shard_are_replaced_named_and_counted_through_workers(tmp_path, loader_log):
    corpora.write_mix(str(tmp_path), {"text": 30}, per_shard=10)
    m = manifest_over(str(tmp_path), {"text": 1.0})
    clean, draws = source_draws(m, decode_images=False, samples_per_epoch=60)
    bad = str(tmp_path / "text" / "text-000000.tar")
    offsets = read_offsets(bad[: -len(".tar")] + ".idx")
    with open(bad, "r+b") as f:
        f.seek(offsets[3] + 10)  # inside the first header of sample 3: its checksum fails
        f.write(b"garbage")
    missing = str(tmp_path / "text" / "text-000002.tar")
    os.unlink(missing)
    lost = {make_key("text", 3)} | {make_key("text", i) for i in range(20, 30)}
    ds = MixtureDataset(m, decode_images=False, samples_per_epoch=60)
    got = list(ds)
    assert ids(got) == replaced_stream(clean, draws, lost)
    assert set(ds.errors) == {bad, missing}
    assert any("checksum" in msg and bad in msg for msg in loader_log)
    assert any(msg.startswith("WARNING") and missing in msg for msg in loader_log)
    # two ranks with two workers each: the same count on both; the main process counts what the workers replaced
    counts, errors = [], collections.Counter()
    for r in range(2):
        ds = MixtureDataset(m, rank=r, world_size=2, decode_images=False, samples_per_epoch=60, batch_size=4)
        loader = MixtureLoader(ds, batch_size=4, num_workers=2)
        counts.append(sum(len(b) for b in loader))
        errors += loader.errors
    assert counts == [30, 30] and set(errors) == {bad, missing}


def test_a_source_with_nothing_readable_raises_naming_it(tmp_path):
    corpora.write_mix(str(tmp_path), {"text": 10, "caption": 10}, per_shard=10)
    m = manifest_over(str(tmp_path), {"text": 0.5, "caption": 0.5})
    os.unlink(str(tmp_path / "text" / "text-000000.tar"))
    with pytest.raises(RuntimeError, match="source 'text': no readable sample"):
        list(MixtureDataset(m, decode_images=False))


def test_holdout_index_mapping_matches_a_plain_set_difference():
    from mm1data.loader import _SourceFiles

    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = [int(x) for x in rng.integers(1, 12, rng.integers(1, 6))]
        n = sum(sizes)
        holdout = int(rng.integers(0, n))
        shards = [{"path": f"s-{i}.tar", "num_samples": k} for i, k in enumerate(sizes)]
        src = _SourceFiles("s", "text", "/x", shards, "index.json", holdout)
        held = sorted({j * n // holdout for j in range(holdout)}) if holdout else []
        assert len(held) == holdout
        starts = np.concatenate([[0], np.cumsum(sizes)])
        assert [int(starts[sh]) + i for sh, i in src.held_out()] == held
        for sh in range(len(sizes)):
            train = [g - starts[sh] for g in range(starts[sh], starts[sh + 1]) if g not in set(held)]
            assert src.train_sizes[sh] == len(train)
            assert [src.sample(sh, t) for t in range(len(train))] == train


def test_holdout_samples_are_never_drawn_and_read_back_in_order(tmp_path):
    corpora.write_mix(str(tmp_path), {"text": 30, "caption": 20}, per_shard=7)
    path = corpora.write_manifest(
        str(tmp_path / "m.yaml"),
        [{"name": "text", "index": "text/index.json", "weight": 1, "holdout": 4},
         {"name": "caption", "index": "caption/index.json", "weight": 1, "holdout": 3}],
    )  # fmt: skip
    m = load_manifest(path)
    ds = MixtureDataset(m, decode_images=False, shuffle_buffer=5, samples_per_epoch=600)
    drawn = {it["key"] for it in ds}
    held = {
        "text": [make_key("text", i) for i in (0, 7, 15, 22)],  # floor(j * 30 / 4)
        "caption": [make_key("caption", i) for i in (0, 6, 13)],  # floor(j * 20 / 3)
    }
    for name, keys in held.items():
        assert [it["key"] for it in ds.holdout_items(name)] == keys
        assert not drawn & set(keys)
    assert len(drawn) == 30 + 20 - 7  # every other sample is drawn
    assert MixtureDataset(m).samples_per_epoch == 43
    state = ds.state_dict()
    assert state["holdout"] == [4, 3]
    other = MixtureDataset(manifest_over(str(tmp_path), {"text": 1, "caption": 1}), samples_per_epoch=600)
    with pytest.raises(ValueError, match="holdout"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="holdout 20 leaves none"):
        MixtureDataset(Manifest.from_dict({**m.to_dict(), "sources": [{**m.sources[1].__dict__, "holdout": 20}]}))


def test_read_positions_gives_what_the_stream_yields(mix):
    m = manifest_over(mix)
    ds = MixtureDataset(m, samples_per_epoch=120, shuffle_buffer=8, decode_images=False)
    ds.set_epoch(2)
    full = list(ds)
    picks = [5, 0, 77, 119, 5]
    assert ids(ds.read_positions(2, picks)) == [ids(full)[p] for p in picks]


def test_state_checks_and_length(mix):
    m = manifest_over(mix)
    ds = MixtureDataset(m, world_size=4, rank=3, samples_per_epoch=100)
    assert len(ds) == 25
    state = ds.state_dict(consumed=5)
    assert state["position"] == 20 and state["epoch"] == 0
    other = MixtureDataset(m, seed=7, samples_per_epoch=100)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "holdout"}  # a state saved before holdouts existed still loads
    MixtureDataset(m, world_size=4, rank=3, samples_per_epoch=100).load_state_dict(old)
    ds.set_epoch(3)
    ds.load_state_dict({**state, "epoch": 3})
    ds.set_epoch(3)  # the loaded epoch keeps its position
    assert ds.position == 20 and len(ds) == 20
    ds.set_epoch(4)
    assert ds.position == 0
    with pytest.raises(ValueError, match="rank"):
        MixtureDataset(m, rank=2, world_size=2)


def test_loader_manifest_packing_and_trainer_do_not_import_ray():
    code = (
        "import sys, mm1data.loader, mm1data.manifest, mm1data.packing, mm1data.train.model, mm1data.train.train; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


HOSTILE_PATHS = {
    "absolute, outside": lambda root, outside: f"{outside}/text-000000.tar",
    "parent": lambda root, outside: f"../{os.path.basename(outside)}/text-000000.tar",
    "deep parent": lambda root, outside: "x/../../" + os.path.basename(outside) + "/text-000000.tar",
    "system file": lambda root, outside: "/etc/passwd",
    "s3 elsewhere": lambda root, outside: "s3://other-bucket/text-000000.tar",
    "file uri": lambda root, outside: f"file://{outside}/text-000000.tar",
    "backslashes": lambda root, outside: "..\\..\\text-000000.tar",
    "empty": lambda root, outside: "",
    "not a string": lambda root, outside: 7,
}


@pytest.mark.parametrize("field", ["path", "offsets"])
@pytest.mark.parametrize("case", list(HOSTILE_PATHS))
def test_shard_paths_must_stay_inside_the_corpus(tmp_path, case, field, capsys):
    """A shard (or sidecar) path in index.json that leaves the corpus folder is an error naming it, in the loader
    and in `manifest check`; samples from elsewhere are never served."""
    from mm1data.cli import main
    from mm1data.config import ConfigError

    outside = str(tmp_path / "elsewhere")
    corpora.write_corpus(outside, "text", 10)  # real shards a hostile index could point at
    corpora.write_corpus(str(tmp_path / "text"), "text", 10)
    index_path = tmp_path / "text" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0][field] = HOSTILE_PATHS[case](str(tmp_path / "text"), outside)
    index_path.write_text(json.dumps(index))
    m = manifest_over(str(tmp_path), {"text": 1.0})
    if field == "offsets" and case == "empty":  # no sidecar named: the default beside the tar
        assert MixtureDataset(m).sources[0].idxs[0] == str(tmp_path / "text" / "text-000000.idx")
        return
    with pytest.raises(ConfigError, match="not a plain relative path") as e:
        MixtureDataset(m)
    assert str(index_path) in str(e.value)
    assert main(["manifest", "check", os.path.join(str(tmp_path), "m-samples-0.yaml")]) == 2
    err = capsys.readouterr().err
    assert "not a plain relative path" in err and str(index_path) in err


@pytest.mark.parametrize("claimed", [11, 9, 1, 1_000_000_000])
def test_a_sidecar_that_disagrees_with_the_index_is_an_error_not_a_stall(tmp_path, claimed):
    """index.json claiming another count than the .idx holds: an error at the first read of that shard naming the
    shard, instead of skipping (for a billion claimed samples: spinning through) every position it planned."""
    from mm1data.config import ConfigError

    corpora.write_corpus(str(tmp_path / "text"), "text", 20, per_shard=10)
    index_path = tmp_path / "text" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][1]["num_samples"] = claimed
    index_path.write_text(json.dumps(index))
    m = manifest_over(str(tmp_path), {"text": 1.0})
    ds = MixtureDataset(m, shuffle=False, decode_images=False, samples_per_epoch=50)
    got = []
    with pytest.raises(
        ConfigError, match=f"text-000001.tar: its offsets sidecar .* holds 11 offsets .* {claimed} samples"
    ):
        for item in ds:
            got.append(item["key"])
    assert got == [make_key("text", i) for i in range(len(got))] and len(got) <= 10  # only the honest shard's


def test_offsets_that_go_backwards_or_a_negative_count_are_errors(tmp_path):
    import struct

    from mm1data.config import ConfigError

    corpora.write_corpus(str(tmp_path / "text"), "text", 10)
    idx = tmp_path / "text" / "text-000000.idx"
    offsets = read_offsets(str(idx))
    idx.write_bytes(struct.pack(f"<{len(offsets)}Q", *offsets[:5], offsets[3], *offsets[6:]))
    m = manifest_over(str(tmp_path), {"text": 1.0})
    with pytest.raises(ConfigError, match="go backwards"):
        list(MixtureDataset(m, decode_images=False))
    index_path = tmp_path / "text" / "index.json"
    index = json.loads(index_path.read_text())
    for bad in (-1, 2.5, "10", None):
        index["shards"][0]["num_samples"] = bad
        index_path.write_text(json.dumps(index))
        with pytest.raises(ConfigError, match="num_samples must be an integer >= 0"):
            MixtureDataset(manifest_over(str(tmp_path), {"text": 1.0}))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"world_size": 0}, "world_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"io_threads": 0}, "io_threads"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
        ({"shuffle_buffer": -5}, "shuffle_buffer"),
        ({"seed": -1}, "seed"),
        ({"samples_per_epoch": 0}, "samples_per_epoch"),
        ({"samples_per_epoch": -10}, "samples_per_epoch"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"rank": -1}, "rank"),
        ({"rank": 1, "world_size": 1}, "rank"),
    ],
)
def test_loader_arguments_out_of_range_are_refused(mix, kwargs, name):
    with pytest.raises(ValueError, match=name):
        MixtureDataset(manifest_over(mix), **kwargs)
