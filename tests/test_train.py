"""The MM1 model on tiny inputs: shapes, loss targets, document-local attention, image placement, connectors, MoE."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from mm1data.packing import ByteTokenizer, SequenceConfig, SequencePacker, collate
from mm1data.train.model import IMAGE_BUCKET, MM1, CAbstractor, ModelConfig, MoE, VisionConfig
from mm1data.train.train import OptimConfig, load_train_config, lr_factor

SEQ = SequenceConfig(max_tokens=96, max_images=3, image_tokens=4, image_size=32)
TOK = ByteTokenizer()
pytestmark = pytest.mark.filterwarnings("ignore:vision.pretrained is null")


def tiny(**kw) -> ModelConfig:
    base = {"vision": VisionConfig(model="mm1data-tiny-clip"), "d_model": 32, "n_layers": 2, "n_heads": 2,
            "connector_depth": 1}  # fmt: skip
    return ModelConfig(**{**base, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> MM1:
    torch.manual_seed(seed)
    return MM1(cfg, SEQ, TOK.vocab_size, TOK.image_id).eval()


def image(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (40, 30), color)


def items(caption_text: str = "a red square", color=(255, 0, 0), text: str = "plain text document here") -> list:
    return [
        {"source": "caption", "kind": "caption", "key": "c", "text": caption_text, "images": [image(color)]},
        {"source": "text", "kind": "text", "key": "t", "text": text, "images": []},
        {"source": "interleaved", "kind": "interleaved", "key": "i", "images": [image((0, 0, 255))],
         "text": [{"text": "before"}, {"image": 0}, {"text": "after the image"}]},
    ]  # fmt: skip


def batch(docs: list) -> dict:
    seqs = list(SequencePacker(SEQ, lookahead=1).pack(docs))
    assert len(seqs) == 1, "the tests want all three documents in one sequence"
    return collate(seqs, SEQ, normalize=False), seqs[0]


@pytest.mark.parametrize("connector", ["c_abstractor", "avg_pool", "attn_pool"])
@pytest.mark.parametrize("experts", [0, 4])
def test_shapes_targets_and_every_parameter_gets_a_gradient(connector, experts):
    model = build(tiny(connector=connector, moe_experts=experts, moe_every=1))
    b, s = batch(items())
    loss, targets, aux = model(b)
    T = SEQ.max_tokens
    assert loss.shape == targets.shape == (1, T - 1) and aux.shape == ()
    # targets: next token is text (bos/eos included) of the same document piece; never an image or padding
    want = [
        s["loss_mask"][t + 1] == 1 and any(a <= t < t + 1 < e for a, e in s["spans"])
        for t in range(len(s["input_ids"]) - 1)
    ]
    assert targets[0, : len(want)].tolist() == want and not targets[0, len(want) :].any()
    assert (loss[~targets] == 0).all() and (loss[targets] > 0).all()
    model.train()
    (loss.sum() / targets.sum() + aux).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP needs every parameter in the graph
    if experts:
        assert 0.9 < aux.item() < 1.5  # near 1 for a near-uniform router


def test_attention_stays_inside_each_document_and_is_causal():
    model = build(tiny())
    base, s = batch(items())
    loss0, targets, _ = model(base)
    (c0, c1), (t0, t1), (i0, i1) = s["spans"]
    # another caption (same length) and another image in the first document: only its own positions change
    other, _ = batch(items(caption_text="a blu squarx", color=(0, 255, 0)))
    loss1, _, _ = model(other)
    assert not torch.equal(loss0[0, c0 : c1 - 1], loss1[0, c0 : c1 - 1])
    assert torch.equal(loss0[0, c1 - 1 :], loss1[0, c1 - 1 :])
    # a change late in the text document leaves its earlier positions (causal) and the other documents alone
    late, _ = batch(items(text="plain text document herX"))
    loss2, _, _ = model(late)
    assert torch.equal(loss0[0, : t1 - 3], loss2[0, : t1 - 3]) and torch.equal(loss0[0, t1:], loss2[0, t1:])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_the_dense_mask():
    model = build(tiny())
    b, _ = batch(items())
    with torch.no_grad():  # FlexAttention has no backward on CPU (train.py picks it on CUDA only)
        dense, _, _ = model(b)
        model.set_attention("flex")
        flex, _, _ = model(b)
    assert torch.allclose(dense, flex, atol=1e-5)


def test_image_tokens_replace_the_placeholders_in_document_order():
    model = build(tiny())
    b, s = batch(items())
    seen = {}
    model.connector.register_forward_hook(lambda mod, inp, out: seen.update(tokens=out))
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    model(b)
    tokens, x = seen["tokens"], seen["x"]
    # two real images, then blanks up to IMAGE_BUCKET (the padded third slot of the batch is not one of them)
    assert tokens.shape == (IMAGE_BUCKET, SEQ.image_tokens, 32)
    for j, p in enumerate(s["image_positions"]):
        assert torch.equal(x[0, p : p + SEQ.image_tokens], tokens[j])
    text = [t for t, i in enumerate(s["input_ids"]) if i != TOK.image_id]
    assert torch.equal(x[0, text], model.embed(b["input_ids"][0, text]))


def test_a_text_only_batch_still_uses_every_parameter():
    model = build(tiny()).train()
    b, _ = batch([items()[1]])
    loss, targets, _ = model(b)
    (loss.sum() / targets.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad.abs().sum() == 0 for p in model.connector.parameters())


def test_frozen_encoder_has_no_gradients_and_stays_in_eval_mode():
    model = build(tiny(vision=VisionConfig(model="mm1data-tiny-clip", freeze=True))).train()
    b, _ = batch(items())
    loss, targets, _ = model(b)
    (loss.sum() / targets.sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.connector.parameters()) and not model.encoder.tower.training


def test_connectors_give_image_tokens_tokens_and_c_abstractor_needs_a_square():
    feats = torch.randn(3, 16, 5, 7)  # 3 images, 16 channels, a 5x7 patch grid
    for name in ("c_abstractor", "avg_pool", "attn_pool"):
        from mm1data.train.model import CONNECTORS

        assert CONNECTORS[name](16, tiny(), 9)(feats).shape == (3, 9, 32)
    assert CONNECTORS["attn_pool"](16, tiny(), 10)(feats).shape == (3, 10, 32)
    with pytest.raises(ValueError, match="not a square"):
        CAbstractor(16, tiny(), 10)


def test_moe_is_top2_weighted_and_balanced_routing_gives_aux_1():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4)
    x = torch.randn(2, 5, 8)
    out, aux = moe(x)
    probs = moe.router(x.view(-1, 8)).softmax(-1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    by_hand = torch.stack(
        [sum(w[t, k] * moe.experts[int(idx[t, k])](x.view(-1, 8)[t]) for k in range(2)) for t in range(10)]
    )
    assert torch.allclose(out.view(-1, 8), by_hand, atol=1e-6)
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities: aux = sum of token shares = 1
    assert math.isclose(moe(x)[1].item(), 1.0, rel_tol=1e-6)


def test_lr_warms_up_then_follows_the_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    f = [lr_factor(cfg, s) for s in range(130)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_bundled_configs_load_and_unknown_keys_are_errors():
    from mm1data.config import ConfigError

    for name in ("tiny", "small", "mm1_3b"):
        cfg = load_train_config(name)
        assert cfg.model.connector == "c_abstractor"
    assert load_train_config("mm1_3b").model.vision.model == "ViT-H-14-378-quickgelu"
    assert load_train_config("tiny", ["model.moe_experts=4"]).model.moe_experts == 4
    with pytest.raises(ConfigError, match="model.nope"):
        load_train_config("tiny", ["model.nope=1"])
    with pytest.raises(ConfigError, match="no train config 'huge'"):
        load_train_config("huge")
