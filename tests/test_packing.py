"""Sequence packing: caps, document round trips, loss mask, collate, tokenizers and packing efficiency."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mm1data.packing import (
    CLIP_MEAN,
    CLIP_STD,
    ByteTokenizer,
    SequenceConfig,
    SequencePacker,
    collate,
    efficiency,
    image_transform,
    load_tokenizer,
    resize_crop,
)

SMALL = SequenceConfig(max_tokens=256, max_images=4, image_tokens=16, image_size=16)
TINY = SequenceConfig(max_tokens=16, max_images=2, image_tokens=4, image_size=8)
BOS, EOS, IMG, PAD = ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.image_id, ByteTokenizer.pad_id
WORDS = "the a cat sat on mat héllo wörld 日本語 🙂 data image of and".split()


def image(i: int) -> Image.Image:
    return Image.new("RGB", (4 + i % 3, 4), (i % 256, 0, 0))


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


def caption(key: str, text: str) -> dict:
    return {"source": "caption", "kind": "caption", "key": key, "text": text, "images": [image(0)]}


def text_doc(key: str, text: str) -> dict:
    return {"source": "text", "kind": "text", "key": key, "text": text, "images": []}


def interleaved(key: str, segments: list[dict], n_images: int) -> dict:
    images = [image(i) for i in range(n_images)]
    return {"source": "interleaved", "kind": "interleaved", "key": key, "text": segments, "images": images}


def random_item(rng: np.random.Generator, i: int, text_words: tuple[int, int] = (40, 600)) -> dict:
    r = rng.random()
    if r < 0.45:
        k, segs = int(rng.integers(0, 7)), []
        for _ in range(int(rng.integers(1, 8))):
            segs.append({"text": words(rng, int(rng.integers(1, 120)))})
        for _ in range(k):  # images at random segment boundaries, numbered in document order
            segs.insert(int(rng.integers(0, len(segs) + 1)), {"image": None})
        for j, s in enumerate(s for s in segs if "image" in s):
            s["image"] = j
        return interleaved(f"i{i}", segs, k)
    if r < 0.9:
        return caption(f"c{i}", words(rng, int(rng.integers(1, 30))))
    return text_doc(f"t{i}", words(rng, int(rng.integers(*text_words))))


def random_mix(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = [random_item(rng, i) for i in range(n)]
    big = [{"text": words(rng, 5)}]
    for j in range(40):  # an interleaved document with 40 images, more than any sequence holds
        big += [{"image": j}, {"text": words(rng, int(rng.integers(1, 40)))}]
    items.insert(n // 3, interleaved("big40", big, 40))
    long_text = "".join(rng.choice(list("abcdé日🙂 "), 20_000))  # 20,000 characters, multi-byte ones too
    items.insert(n // 2, text_doc("long20k", long_text))
    items.insert(2 * n // 3, caption("longcap", long_text[:3000]))  # a caption longer than a small sequence
    return items


def stream(item: dict, tok: ByteTokenizer, image_tokens: int) -> tuple[list[int], list[Image.Image]]:
    """The whole document as the packer must lay it out, and its images in order."""
    ids, images = [tok.bos_id], []
    if item["kind"] == "interleaved":
        segments = item["text"]
    elif item["kind"] == "caption":
        segments = [{"image": 0}, {"text": item["text"]}]
    else:
        segments = [{"text": item["text"]}]
    for seg in segments:
        if "image" in seg:
            ids += [tok.image_id] * image_tokens
            images.append(item["images"][seg["image"]])
        else:
            ids += tok.encode(seg["text"])
    return [*ids, tok.eos_id], images


def check_sequences(seqs: list[dict], items: list[dict], cfg: SequenceConfig, tok=None) -> None:
    """Caps, loss mask, image blocks, spans, and every document rebuilt exactly from its pieces."""
    tok = tok or ByteTokenizer()
    pieces: dict[str, tuple[list[int], list]] = {}
    for s in seqs:
        ids, mask, pos = s["input_ids"], s["loss_mask"], s["image_positions"]
        assert 0 < len(ids) <= cfg.max_tokens and len(s["images"]) == len(pos) <= cfg.max_images
        assert s["num_padding"] == cfg.max_tokens - len(ids) and len(mask) == len(ids)
        in_image = np.zeros(len(ids), bool)
        for p in pos:
            assert not in_image[p : p + cfg.image_tokens].any() and p + cfg.image_tokens <= len(ids)
            in_image[p : p + cfg.image_tokens] = True
        assert (np.array(ids) == tok.image_id).tolist() == in_image.tolist()  # placeholders exactly at the blocks
        assert (np.array(mask) == 0).tolist() == in_image.tolist()  # no loss exactly on image positions
        assert [a for a, _ in s["spans"]] == [0] + [b for _, b in s["spans"][:-1]] and s["spans"][-1][1] == len(ids)
        assert len(s["keys"]) == len(s["sources"]) == len(s["spans"])
        for key, (a, b) in zip(s["keys"], s["spans"]):
            got_ids, got_images = pieces.setdefault(key, ([], []))
            got_ids += ids[a:b]
            got_images += [im for p, im in zip(pos, s["images"]) if a <= p < b]
    assert set(pieces) == {it["key"] for it in items}  # nothing dropped
    for it in items:
        want_ids, want_images = stream(it, tok, cfg.image_tokens)
        got_ids, got_images = pieces[it["key"]]
        assert got_ids == want_ids, it["key"]
        assert len(got_images) == len(want_images) and all(a is b for a, b in zip(got_images, want_images))


@pytest.mark.parametrize("cfg", [SMALL, SequenceConfig()], ids=["small", "mm1"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_mixes_respect_caps_and_rebuild_every_document(cfg, seed):
    items = random_mix(seed, 300)
    seqs = list(SequencePacker(cfg).pack(items))
    check_sequences(seqs, items, cfg)
    big = [s for s in seqs if "big40" in s["keys"]]
    assert len(big) >= 40 // cfg.max_images  # 40 images span several sequences
    assert sum(s["sources"].count("text") for s in seqs) >= len([i for i in items if i["kind"] == "text"])


def test_byte_text_splits_rejoin_across_multibyte_characters():
    tok = ByteTokenizer()
    text = "日本語🙂é" * 30  # every cut at 16 tokens lands inside some character
    seqs = list(SequencePacker(TINY).pack([text_doc("k", text)]))
    check_sequences(seqs, [text_doc("k", text)], TINY)
    body = [i for s in seqs for i in s["input_ids"] if i < 256]
    assert tok.decode(body) == text


def test_exact_layout_of_captions_text_and_interleaved():
    packer = SequencePacker(TINY)
    seqs = list(packer.pack([caption("a", "ab"), caption("b", "cd"), caption("c", "e")]))
    assert seqs[0]["input_ids"] == [BOS, *[IMG] * 4, 97, 98, EOS, BOS, *[IMG] * 4, 99, 100, EOS]
    assert seqs[0]["image_positions"] == [1, 9] and seqs[0]["spans"] == [(0, 8), (8, 16)]
    assert seqs[0]["loss_mask"] == [1, 0, 0, 0, 0, 1, 1, 1] * 2
    assert seqs[1]["input_ids"] == [BOS, *[IMG] * 4, 101, EOS] and seqs[1]["num_padding"] == 9

    # a text document longer than a sequence is cut into chunks: 1 + 40 + 1 tokens -> 16, 16, 10
    seqs = list(packer.pack([text_doc("t", "x" * 40)]))
    assert [s["input_ids"] for s in seqs] == [[BOS] + [120] * 15, [120] * 16, [120] * 9 + [EOS]]

    # an interleaved document is cut at a segment boundary: bos aaaa <img> | bbbbbbbb eos (18 tokens)
    doc = interleaved("i", [{"text": "aaaa"}, {"image": 0}, {"text": "bbbbbbbb"}], 1)
    seqs = list(packer.pack([doc]))
    assert [s["input_ids"] for s in seqs] == [[BOS, *[97] * 4, *[IMG] * 4], [*[98] * 8, EOS]]
    assert seqs[0]["images"][0] is doc["images"][0] and seqs[1]["images"] == []


def test_caption_pairs_fill_to_the_image_cap():
    cfg = SequenceConfig(max_tokens=4096, max_images=16, image_tokens=144, image_size=32)
    seqs = list(SequencePacker(cfg).pack([caption(f"{i}", "a cat") for i in range(40)]))
    assert [len(s["images"]) for s in seqs] == [16, 16, 8]
    assert [len(s["input_ids"]) for s in seqs] == [16 * 151, 16 * 151, 8 * 151]  # bos + 144 + "a cat" + eos


def test_lookahead_one_keeps_arrival_order_and_first_fit_fills_gaps():
    items = random_mix(3, 120)
    keys = [it["key"] for it in items]
    first_seen = list(dict.fromkeys(k for s in SequencePacker(SMALL, lookahead=1).pack(items) for k in s["keys"]))
    assert first_seen == keys
    packed = list(SequencePacker(SMALL, lookahead=1).pack(items))
    packed32 = list(SequencePacker(SMALL, lookahead=32).pack(items))
    assert len(packed32) < len(packed)


def test_pack_is_lazy_and_holds_lookahead_documents():
    consumed = 0

    def endless():
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield caption(f"{i}", "x" * (i % 7))

    gen = SequencePacker(TINY, lookahead=4).pack(endless())
    seqs = list(itertools.islice(gen, 3))
    placed = {k for s in seqs for k in s["keys"]}
    assert consumed == len(placed) + 4


def test_invalid_configs_and_samples_raise():
    with pytest.raises(ValueError, match="image_tokens"):
        SequencePacker(SequenceConfig(max_tokens=100, image_tokens=144))
    with pytest.raises(ValueError, match="image_tokens"):
        SequencePacker(SequenceConfig(max_tokens=145, image_tokens=144))  # bos + image + eos is 146
    with pytest.raises(ValueError, match="max_images"):
        SequencePacker(SequenceConfig(max_images=0))
    with pytest.raises(ValueError, match="lookahead"):
        SequencePacker(SMALL, lookahead=0)
    packer = SequencePacker(SMALL)
    with pytest.raises(ValueError, match="unknown sample kind 'video'"):
        list(packer.pack([{"kind": "video", "key": "k", "text": "", "images": []}]))
    with pytest.raises(ValueError, match="segment image 2 of 1 images"):
        list(packer.pack([interleaved("k", [{"image": 2}], 1)]))
    with pytest.raises(ValueError, match="neither text nor image"):
        list(packer.pack([interleaved("k", [{"html": "x"}], 0)]))


def test_collate_shapes_dtypes_padding_and_images():
    red = Image.new("RGB", (20, 10), (255, 0, 0))  # not square: resized and center-cropped
    gray = Image.new("L", (8, 30), 128)  # not RGB: converted
    rgba = Image.new("RGBA", (9, 9), (0, 0, 255, 10))
    items = [
        {"source": "caption", "kind": "caption", "key": "a", "text": "ab", "images": [red]},
        interleaved("b", [{"text": "hi"}, {"image": 0}, {"image": 1}], 2) | {"images": [gray, rgba]},
        text_doc("c", "x" * 20),
    ]
    cfg = SequenceConfig(max_tokens=32, max_images=3, image_tokens=4, image_size=8)
    seqs = list(SequencePacker(cfg).pack(items))
    batch = collate(seqs, cfg)
    B = len(seqs)
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "input_ids": ((B, 32), torch.long),
        "loss_mask": ((B, 32), torch.bool),
        "attention_mask": ((B, 32), torch.bool),
        "document_ids": ((B, 32), torch.long),
        "images": ((B, 3, 3, 8, 8), torch.float32),
        "image_positions": ((B, 3), torch.long),
        "num_images": ((B,), torch.long),
    }
    for b, s in enumerate(seqs):
        n, k = len(s["input_ids"]), len(s["images"])
        assert batch["input_ids"][b, :n].tolist() == s["input_ids"]
        assert (batch["input_ids"][b, n:] == PAD).all() and not batch["loss_mask"][b, n:].any()
        assert batch["attention_mask"][b].tolist() == [True] * n + [False] * (32 - n)
        assert batch["document_ids"][b].tolist() == [
            next((d for d, (a, e) in enumerate(s["spans"]) if a <= t < e), -1) for t in range(32)
        ]
        assert batch["num_images"][b] == k and batch["image_positions"][b].tolist() == s["image_positions"] + [-1] * (
            3 - k
        )
        for p in s["image_positions"]:
            assert (batch["input_ids"][b, p : p + 4] == IMG).all() and not batch["loss_mask"][b, p : p + 4].any()
        assert (batch["images"][b, k:] == 0).all()
        assert batch["loss_mask"][b].sum() == n - 4 * k
    b, j = next((b, s["images"].index(red)) for b, s in enumerate(seqs) if red in s["images"])
    want = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    assert torch.allclose(batch["images"][b, j], torch.tensor(want).view(3, 1, 1).expand(3, 8, 8), atol=1e-5)
    raw = collate(seqs, cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert torch.allclose(raw["images"][b, j, 0], torch.ones(8, 8)) and (raw["images"][b, j, 1:] == 0).all()
    with pytest.raises(ValueError, match="caps"):
        collate(seqs, SequenceConfig(max_tokens=8, max_images=3, image_tokens=4, image_size=8))


def test_uint8_collate_and_resize_crop_match_the_float_transform():
    """resize_crop is image_transform's geometry (the loader applies it in its threads): the float transform of
    the cropped image equals that of the original, and uint8 pixels / 255, normalised, are the float images."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((37, 20), (16, 41), (16, 16))
    ]
    cfg = SequenceConfig(max_tokens=64, max_images=3, image_tokens=4, image_size=16)
    transform = image_transform(16)
    for im in images:
        assert resize_crop(im, 16).size == (16, 16)
        assert torch.equal(transform(resize_crop(im, 16)), transform(im))
    seqs = list(
        SequencePacker(cfg).pack(
            [interleaved("a", [{"image": 0}, {"image": 1}, {"image": 2}], 3) | {"images": images}]
        )
    )
    floats, uint8 = collate(seqs, cfg), collate(seqs, cfg, normalize=False)
    assert uint8["images"].dtype == torch.uint8
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose((uint8["images"][0, :3].float() / 255 - mean) / std, floats["images"][0, :3], atol=1e-5)
    assert {k: v for k, v in uint8.items() if k != "images"}.keys() == {k for k in floats if k != "images"}


def indexed(items: list[dict]) -> list[dict]:
    """Items as the loader yields them: with (epoch, position), so a packer state can name them."""
    return [it | {"epoch": 0, "position": i} for i, it in enumerate(items)]


@pytest.mark.parametrize("cfg", [SMALL, TINY], ids=["small", "tiny"])
def test_packer_state_resumes_the_exact_sequence_stream(cfg):
    """Cut after k sequences: a new packer loaded with the state (its held documents read again by position) and
    fed the items after the last one pulled yields the rest of the uninterrupted stream, cut points included."""
    items = indexed(random_mix(3, 120))
    full = list(SequencePacker(cfg, lookahead=8).pack(items))
    for k in (0, 1, 5, len(full) // 2, len(full) - 1):
        pulled = 0

        def counted():
            nonlocal pulled
            for it in items:
                pulled += 1
                yield it

        packer = SequencePacker(cfg, lookahead=8)
        seqs = packer.pack(counted())
        first = [next(seqs) for _ in range(k)]
        state, taken = json.loads(json.dumps(packer.state_dict())), pulled
        assert state["sequences"] == k and len(state["buffer"]) <= 8 and len(state["opened"]) <= packer.max_open
        fetched = []
        again = SequencePacker(cfg, lookahead=8)
        again.load_state_dict(state, lambda refs, out=fetched: out.extend(refs) or [items[p] for _, p in refs])
        rest = list(again.pack(items[taken:]))
        assert [s["input_ids"] for s in first + rest] == [s["input_ids"] for s in full], k
        assert [s["keys"] for s in first + rest] == [s["keys"] for s in full]
        assert len(fetched) == len(state["buffer"]) + len(state["opened"])
    with pytest.raises(ValueError, match="packer state version"):
        SequencePacker(cfg).load_state_dict({"version": 99}, lambda refs: [])


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer(None)
    text = "Grüße, 日本語 and emoji 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.image_id]) == text
    assert {tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id} == {256, 257, 258, 259} and tok.vocab_size == 260


def word_level_json(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "</s>": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_tokenizers_json_file_loads_with_specials(tmp_path):
    tok = load_tokenizer(word_level_json(tmp_path / "tokenizer.json"))
    assert tok.encode("the cat sat") == [1, 2, 3] and tok.decode([1, 2, 3]) == "the cat sat"
    # </s> was in the vocabulary and is reused; the other roles are added in SPECIAL_TOKENS order
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.image_id, tok.vocab_size) == (4, 5, 6, 7, 8)
    assert tok.encode("the <image> </s>") == [1, 0, 0, 0, 0, 0, 0]  # spelled specials stay text
    cfg = SequenceConfig(max_tokens=64, max_images=2, image_tokens=4, image_size=8)
    (seq,) = SequencePacker(cfg, tok).pack([caption("k", "the cat")])
    assert seq["input_ids"] == [6, 7, 7, 7, 7, 1, 2, 4] and seq["image_positions"] == [1]
    assert collate([seq], cfg, pad_id=tok.pad_id)["input_ids"][0, 8:].eq(5).all()


def test_trained_bpe_tokenizer_packs_and_round_trips(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(["the cat sat on the mat"] * 20 + ["héllo wörld 日本"], trainer)
    bpe.save(str(tmp_path / "bpe.json"))
    tok = load_tokenizer(str(tmp_path / "bpe.json"))
    text = "the cat héllo 日本 🙂"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the cat sat")) < len("the cat sat")  # merges were learned
    items = [caption("c", "the cat sat"), text_doc("t", text * 20)]
    cfg = SequenceConfig(max_tokens=64, max_images=2, image_tokens=8, image_size=8)
    seqs = list(SequencePacker(cfg, tok).pack(items))
    check_sequences(seqs, items, cfg, tok)


def test_tokenizer_from_s3(s3_server, tmp_path):
    import boto3

    from mm1data import storage

    boto3.client("s3").create_bucket(Bucket="tok")
    local = word_level_json(tmp_path / "tokenizer.json")
    storage.write_bytes("s3://tok/models/tokenizer.json", open(local, "rb").read())
    assert load_tokenizer("s3://tok/models/tokenizer.json").encode("cat the") == [2, 1]


def test_missing_tokenizers_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install 'mm1data\[tokenizer\]'"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def demo_mix(seed: int, n: int):
    """MM1's mix by samples: 45% interleaved (OBELICS-like: 1-6 images, 2-8 paragraphs), 45% captions, 10% text."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        r = rng.random()
        if r < 0.45:
            k, segs = int(rng.integers(1, 7)), []
            for _ in range(int(rng.integers(2, 9))):
                segs.append({"text": words(rng, int(rng.integers(20, 250)))})
            for j, at in enumerate(sorted(rng.integers(0, len(segs) + 1, k))):
                segs.insert(int(at) + j, {"image": j})
            yield interleaved(f"i{i}", segs, k)
        elif r < 0.9:
            yield caption(f"c{i}", words(rng, int(rng.integers(3, 25))))
        else:
            yield text_doc(f"t{i}", words(rng, int(rng.integers(80, 1500))))


def test_efficiency_on_a_demo_like_mix():
    cfg = SequenceConfig()
    seqs = list(SequencePacker(cfg).pack(demo_mix(0, 1000)))
    assert efficiency(seqs) == pytest.approx(0.98795, abs=5e-5)  # measured: 544 sequences, 1,675 pieces
    # the lookahead is what earns it: in arrival order the same samples pack to 575 sequences
    in_order = list(SequencePacker(cfg, lookahead=1).pack(demo_mix(0, 1000)))
    assert efficiency(in_order) == pytest.approx(0.93469, abs=5e-5)
    assert efficiency([]) == 0.0
