"""Recaptioning: the greedy CoCa loop, the stage on kept rows only, weights from a path or s3://, KEY.syn.txt, and the
manifest's per-source caption choice (alt | synthetic | mix) in `manifest check` and the loader."""

from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
import warnings

import boto3
import corpora
import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import jpeg

from mm1data.cli import main
from mm1data.config import ConfigError, load_config
from mm1data.loader import MixtureDataset
from mm1data.manifest import Manifest, load_manifest
from mm1data.pipelines.caption import Config
from mm1data.recaption import CocaCaptioner, RecaptionConfig, generate
from mm1data.schema import CaptionSample, count_tokens, make_key
from mm1data.shards import TarShardWriter, build_index, shard_name, write_index
from mm1data.train.train import manifest_fingerprint

SOT, EOT, VOCAB = 1, 2, 50
TINY = {"enabled": True, "model": "mm1data-tiny-coca", "pretrained": None}


class StubCoca(torch.nn.Module):
    """CoCa's calling convention with known outputs: image i (its pixels hold i) says token 10 + i at each step and
    wants to end after 2 + i % 4 tokens; the end token's logit is the largest from then on."""

    def _encode_image(self, pixels):
        i = pixels[:, 0, 0, 0]
        return i[:, None], i[:, None, None]

    def forward(self, image, text, image_latent=None, image_embs=None, output_labels=True):
        assert image is None and len(text) == len(image_latent) == len(image_embs)
        b, t = text.shape
        i = image_latent[:, 0].long()
        logits = torch.zeros(b, t, VOCAB)
        logits[torch.arange(b), -1, 11 + i] = 4.0  # the runner-up, which a repetition penalty promotes
        logits[torch.arange(b), -1, 10 + i] = 5.0
        logits[:, -1, EOT] = torch.where(t - 1 >= 2 + i % 4, 9.0, -1.0)
        return {"logits": logits}


def test_greedy_loop_lengths_and_order():
    pixels = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 3, 4, 4).clone()
    out = generate(StubCoca(), pixels, SOT, EOT, max_tokens=30, min_tokens=1)
    assert out == [[10 + i] * (2 + i % 4) for i in range(6)]  # rows leave the batch as they end, order kept
    out = generate(StubCoca(), pixels, SOT, EOT, max_tokens=4, min_tokens=1)
    assert out == [[10 + i] * min(2 + i % 4, 2) for i in range(6)]  # cut: 4 tokens with start and end
    out = generate(StubCoca(), pixels, SOT, EOT, max_tokens=30, min_tokens=6)
    assert [len(ids) for ids in out] == [5] * 6  # the end is refused before 6 tokens (start included)
    out = generate(StubCoca(), pixels[:1], SOT, EOT, max_tokens=30, min_tokens=1, repetition_penalty=2.0)
    assert out == [[10, 11]]  # 5 / 2 < 4: the repeated token loses to the runner-up


def kept_batch() -> dict:
    images = [jpeg(96, 80, color=(40 * i, 90, 200 - 30 * i), seed=i) for i in range(4)] + [b"not an image"]
    return {
        "image": np.array(images, dtype=object),
        "caption": np.array([f"alt {i}" for i in range(5)], dtype=object),
        "drop_reason": np.array(["", "caption_words", "", "", ""], dtype=object),
    }


def test_stage_captions_kept_rows_only_and_warns_on_random_weights():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="recaption.pretrained is null: mm1data-tiny-coca has random weights"):
        stage = CocaCaptioner(RecaptionConfig(**TINY, max_tokens=8))
    assert stage.model.text_decoder.text_projection.std() > 0  # initialised, not whatever memory held
    out = stage(kept_batch())
    syn = list(out["syn_caption"])
    assert [bool(s) for s in syn] == [True, False, True, True, False]  # dropped row, undecodable image: none
    assert list(out["caption"]) == [f"alt {i}" for i in range(5)]  # the alt-text is never touched
    assert list(out["drop_reason"]) == ["", "caption_words", "", "", ""]  # not a filter
    pixels, ok = stage.images([out["image"][0], out["image"][2]])
    ids = stage.generate(pixels)
    assert [len(i) for i in ids] == [6, 6]  # random weights (seeded) do not pick the end token: max_tokens - 2
    assert syn[0] == stage.tokenizer.decode(ids[0]).strip()


def test_not_a_coca_model_is_refused():
    with pytest.raises(ValueError, match="not a CoCa model"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CocaCaptioner(RecaptionConfig(enabled=True, model="mm1data-tiny-clip", pretrained=None))


def test_weights_from_a_local_path_and_s3(tmp_path, s3_server):
    import open_clip

    open_clip.add_model_config(os.path.join(os.path.dirname(__file__), "..", "mm1data", "scorers", "model_configs"))
    torch.manual_seed(0)
    model = open_clip.create_model("mm1data-tiny-coca", pretrained=None)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # far from open_clip's init, so these weights caption differently from random ones
    path = tmp_path / "coca.pt"
    torch.save(model.state_dict(), path)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="weights")
    s3.upload_file(str(path), "weights", "coca.pt")
    cfg = {**TINY, "max_tokens": 10, "repetition_penalty": 1.5}
    local = CocaCaptioner(RecaptionConfig(**{**cfg, "pretrained": str(path)}))(kept_batch())["syn_caption"]
    remote = CocaCaptioner(RecaptionConfig(**{**cfg, "pretrained": "s3://weights/coca.pt"}))(kept_batch())
    with pytest.warns(UserWarning):
        rand = CocaCaptioner(RecaptionConfig(**cfg))(kept_batch())["syn_caption"]
    assert list(local) == list(remote["syn_caption"]) and local[0]
    assert list(local) != list(rand)


def test_same_as_open_clip_generate_top1():
    """Our greedy loop against open_clip's own top-1 sampling (which needs transformers: skipped without it)."""
    from open_clip import coca_model

    if not coca_model._has_transformers:  # open_clip imports it for generate(); 4.56 to 4.57 break that import
        pytest.skip("open_clip's CoCa.generate needs transformers (< 4.56 with open_clip 3.3)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stage = CocaCaptioner(RecaptionConfig(**TINY, max_tokens=12, repetition_penalty=1.3))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in stage.model.parameters():
            p.normal_(0, 0.5)  # open_clip's init leaves the logits all 0, where top-1 sampling is a random pick
    pixels, _ = stage.images(list(kept_batch()["image"][:4]))
    ours = stage.generate(pixels)
    with torch.no_grad():
        ref = stage.model.generate(
            pixels, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=5, repetition_penalty=1.3
        )

    def cut(ids: list[int]) -> list[int]:  # open_clip ends a caption at the pad token (0) too
        return ids[: ids.index(0)] if 0 in ids else ids

    eot = stage.tokenizer.eot_token_id
    assert [cut(ids) for ids in ours] == [cut(row[1 : row.index(eot)]) for row in ref.tolist()]
    assert len({tuple(ids) for ids in ours}) > 1


def test_config_section_and_cli_spelling(tmp_path):
    cfg = load_config(
        Config,
        "pipelines/caption.yaml",
        ["recaption.enabled=true", "recaption.model=coca_ViT-B-32", "recaption.pretrained=null"],
    )
    assert cfg.recaption == RecaptionConfig(enabled=True, model="coca_ViT-B-32", pretrained=None)
    assert load_config(Config, "pipelines/caption.yaml", []).recaption.enabled is False
    with pytest.raises(ConfigError, match="recaption.max_tokens"):
        load_config(Config, "pipelines/caption.yaml", ["recaption.max_tokens=200"])


# ---------------------------------------------------------------------------------------------- shards and loader


def syn_text(i: int) -> str:
    return f"a synthetic caption {i:04d}"


def write_recaptioned(root: str, n: int, per_shard: int = 10, every: int = 4) -> dict:
    """Caption samples whose sample i has KEY.syn.txt unless i % every == every - 1; index.json as a run writes it."""
    infos, tokens, recaptioned = [], 0, 0
    for s, start in enumerate(range(0, n, per_shard)):
        w = TarShardWriter(os.path.join(root, shard_name("caption", s)))
        for i in range(start, min(start + per_shard, n)):
            syn = syn_text(i) if i % every != every - 1 else ""
            recaptioned += bool(syn)
            sample = CaptionSample(
                make_key("caption", i), f"caption {i:08d}", corpora.tiny_jpeg(i), "jpg", {"i": i}, syn
            )
            w.write(sample.to_members(), num_images=1)
            tokens += count_tokens(sample.caption)
        infos.append(w.close())
    index = build_index("caption", "caption", infos, tokens, funnel={"kept": n, "recaptioned": recaptioned})
    write_index(root, index)
    return index


def test_syn_txt_reads_back_as_member_of_its_sample(tmp_path):
    index = write_recaptioned(str(tmp_path), 8, per_shard=8)
    path = os.path.join(tmp_path, index["shards"][0]["path"])
    samples = list(wds.WebDataset([path], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [make_key("caption", i) for i in range(8)]  # syn.txt makes no sample
    assert samples[0]["syn.txt"] == syn_text(0).encode() and samples[0]["txt"] == b"caption 00000000"
    assert "syn.txt" not in samples[3]
    with tarfile.open(path) as t:
        names = t.getnames()
    key = make_key("caption", 0)
    assert names[:4] == [f"{key}.jpg", f"{key}.json", f"{key}.syn.txt", f"{key}.txt"]
    back = CaptionSample.from_members(key, {n.split(".", 1)[1]: b for n, b in _members(path, key).items()})
    assert (back.synthetic, back.caption) == (syn_text(0), "caption 00000000")


def _members(path: str, key: str) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.name.startswith(key)}


@pytest.fixture
def corpus(tmp_path):
    write_recaptioned(str(tmp_path / "caption"), 200, per_shard=25)
    corpora.write_corpus(str(tmp_path / "plain"), "caption", 20)
    corpora.write_corpus(str(tmp_path / "text"), "text", 20)
    return tmp_path


def manifest(root, caption: str | None = None, prob: float | None = None, seed: int = 0) -> Manifest:
    src = {"name": "cap", "index": "caption/index.json", "weight": 1.0}
    if caption is not None:
        src["caption"] = caption
    if prob is not None:
        src["synthetic_prob"] = prob
    return load_manifest(corpora.write_manifest(str(root / "m.yaml"), [src], seed=seed))


def texts(ds) -> list[tuple[str, str, str]]:
    return [(it["key"], it["caption"], it["text"]) for it in ds]


def test_loader_yields_the_chosen_caption(corpus):
    alt = texts(MixtureDataset(manifest(corpus)))  # no key: the alt-text, as before
    assert len(alt) == 200 and all(c == "alt" and t.startswith("caption ") for _, c, t in alt)
    syn = texts(MixtureDataset(manifest(corpus, "synthetic")))
    assert [k for k, _, _ in syn] == [k for k, _, _ in alt]  # the same samples, in the same order
    for key, choice, text in syn:
        i = int(next(t for k, _, t in alt if k == key).split()[1])
        # a sample without a synthetic caption falls back to its alt-text
        assert (choice, text) == (("alt", f"caption {i:08d}") if i % 4 == 3 else ("synthetic", syn_text(i)))


def test_mix_is_seeded_per_sample_same_on_every_rank_and_after_resume(corpus):
    m = manifest(corpus, "mix", 0.3)
    whole = texts(MixtureDataset(m))
    share = sum(c == "synthetic" for _, c, _ in whole) / 150  # 150 of the 200 samples have a synthetic caption
    assert 0.2 < share < 0.4
    assert whole == texts(MixtureDataset(m))  # deterministic
    ranks = [texts(MixtureDataset(m, rank=r, world_size=2)) for r in range(2)]
    assert [x for pair in zip(*ranks) for x in pair] == whole  # rank r takes positions r, r + 2, ...
    ds = MixtureDataset(m)
    it = iter(ds)
    head = [(x["key"], x["caption"], x["text"]) for x in itertools.islice(it, 70)]
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = MixtureDataset(m, world_size=2, rank=1)
    resumed.load_state_dict(state)  # another world size: rank 1 takes positions 71, 73, ...
    assert texts(resumed) == whole[71::2] and head == whole[:70]
    ds.set_epoch(1)
    assert sorted(texts(ds)) != sorted(whole)  # each epoch tosses its own coins
    other = texts(MixtureDataset(manifest(corpus, "mix", 0.3, seed=1)))
    assert {(k, c) for k, c, _ in other} != {(k, c) for k, c, _ in whole}
    assert manifest_fingerprint(m) != manifest_fingerprint(manifest(corpus, "mix", 0.5))
    assert manifest_fingerprint(manifest(corpus)) == manifest_fingerprint(manifest(corpus, "alt", 0.9))


def test_manifest_check_shows_the_choice(corpus, capsys):
    path = corpora.write_manifest(
        str(corpus / "m.yaml"),
        [
            {"name": "alt", "index": "caption/index.json", "weight": 1.0},
            {"name": "mixed", "index": "caption/index.json", "weight": 1.0, "caption": "mix", "synthetic_prob": 0.25},
            {"name": "text", "index": "text/index.json", "weight": 1.0},
        ],
    )
    assert main(["manifest", "check", path, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["sources"]
    assert [(r["caption"], r["synthetic_prob"], r["synthetic_samples"]) for r in rows] == [
        ("alt", 0.0, 150),
        ("mix", 0.25, 150),
        ("alt", 0.0, 0),
    ]
    assert main(["manifest", "check", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(ln for ln in lines if ln.startswith("mixed")).endswith(
        "mix 25% synthetic (150 with a synthetic caption)"
    )
    assert next(ln for ln in lines if ln.startswith("alt ")).endswith("alt (150 with a synthetic caption)")
    assert next(ln for ln in lines if ln.startswith("text")).endswith(" -")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"index": "plain/index.json", "caption": "synthetic"}, "is a corpus without synthetic captions"),
        ({"index": "text/index.json", "caption": "mix"}, "is a text corpus"),
        ({"index": "caption/index.json", "caption": "vecap"}, "caption must be one of alt, synthetic, mix"),
        (
            {"index": "caption/index.json", "caption": "mix", "synthetic_prob": 1.5},
            r"synthetic_prob must be .* \[0, 1\]",
        ),
    ],
)
def test_bad_caption_choice_is_a_clear_error(corpus, capsys, source, message):
    path = corpora.write_manifest(str(corpus / "bad.yaml"), [{"name": "s", "weight": 1.0, **source}])
    assert main(["manifest", "check", path]) == 2
    err = capsys.readouterr().err
    assert "source 's'" in err and re.search(message, err)
    if "synthetic_prob" not in message and "must be one of" not in message:
        with pytest.raises(ConfigError, match=message):
            MixtureDataset(load_manifest(path))


def test_old_manifests_and_samples_without_syn_txt_still_read(corpus):
    m = load_manifest(corpora.write_manifest(str(corpus / "p.yaml"), [{"name": "p", "index": "plain/index.json",
                                                                         "weight": 1}]))  # fmt: skip
    items = list(MixtureDataset(m))
    assert len(items) == 20 and all(it["caption"] == "alt" and "synthetic" not in it for it in items)
    assert Manifest.from_dict(m.to_dict()) == m
