"""`mm1data train` end to end on CPU: exact resume (also with loader workers), DDP equals one process, held-out
slices never trained on, unreadable samples replaced, clear errors for bad checkpoints and other manifests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import corpora
import pytest
import yaml

from mm1data.config import ConfigError
from mm1data.schema import make_key
from mm1data.shards import read_offsets
from mm1data.train.train import load_train_config, plot_losses, train

pytestmark = [
    pytest.mark.filterwarnings("ignore:vision.pretrained is null"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create"),
]
HOLDOUT = {"interleaved": 3, "caption": 4, "text": 2}
SEQUENCE = {"max_tokens": 192, "max_images": 3, "image_tokens": 4, "image_size": 32}
FAST = ["eval_every=4", "checkpoint_every=100"]


def write_manifest(root: str, name: str = "m.yaml", **change) -> str:
    sources = [{"name": k, "index": f"{k}/index.json", "weight": w, "holdout": HOLDOUT[k]}
               for k, w in {"interleaved": 0.45, "caption": 0.45, "text": 0.1, **change}.items()]  # fmt: skip
    doc = {"name": "t", "seed": 0, "unit": "samples", "sources": sources, "sequence": SEQUENCE}
    path = os.path.join(root, name)
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("train"))
    corpora.write_mix(root, {"caption": 40, "interleaved": 30, "text": 20}, per_shard=10)
    write_manifest(root)
    return root


def losses(out: str) -> list[tuple[int, float, dict]]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r.get("heldout", {})) for r in map(json.loads, f)]


@pytest.mark.parametrize("workers", [0, 2])
def test_k_steps_then_resume_gives_the_losses_of_one_run(corpus, tmp_path, workers):
    over = [*FAST, f"data.num_workers={workers}"]
    manifest = os.path.join(corpus, "m.yaml")
    full = train(manifest, "tiny", 10, str(tmp_path / "full"), overrides=over)
    train(manifest, "tiny", 3, str(tmp_path / "cut"), overrides=over)
    resumed = train(manifest, "tiny", 10, str(tmp_path / "cut"), resume=True, overrides=over)
    assert resumed["start_step"] == 3
    cut, one = losses(tmp_path / "cut"), losses(tmp_path / "full")
    assert [r[:2] for r in cut] == [r[:2] for r in one]  # exactly: same data, same arithmetic
    assert [s for s, _, h in one if h] == [4, 8, 10] and [s for s, _, h in cut if h] == [3, 4, 8, 10]
    assert all(h == one[s - 1][2] for s, _, h in cut if h and s != 3)  # held-out losses too
    assert set(full["heldout"]) == set(HOLDOUT) and full["last"]["loss"] < full["first"]["loss"]
    for name in ("metrics.jsonl", "config.json", "loss.png", "checkpoint/ckpt.pt"):
        assert os.path.exists(tmp_path / "full" / name)
    again = train(manifest, "tiny", 10, str(tmp_path / "cut"), resume=True, overrides=over)
    assert again["start_step"] == 10 and "last" not in again  # nothing left to do


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_give_the_losses_of_one_process(corpus, tmp_path):
    """gloo on CPU, 2 processes of 1 stream each, against 1 process running both streams: the same global batch,
    so the same losses (to float summation order)."""
    manifest = os.path.join(corpus, "m.yaml")
    over = [*FAST, "data.streams=2"]
    one = train(manifest, "tiny", 6, str(tmp_path / "one"), overrides=over)
    sets = [a for o in over for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--master_addr=127.0.0.1", "-m", "mm1data.cli", "train", "--manifest", manifest, "--config", "tiny",
           "--steps", "6", "--out", str(tmp_path / "ddp"), *sets]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got, want = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, 7))
    for (_, a, ha), (_, b, hb) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5) and ha.keys() == hb.keys()
        assert all(ha[k] == pytest.approx(hb[k], rel=1e-5) for k in ha)
    assert one["last"]["tokens"] == json.loads(open(tmp_path / "ddp" / "metrics.jsonl").readlines()[-1])["tokens"]


def test_held_out_samples_never_reach_a_training_batch(corpus, tmp_path):
    manifest = os.path.join(corpus, "m.yaml")
    # 40 steps of 4 sequences read every training sample at least once (the rarest source, text, twice)
    train(manifest, "tiny", 40, str(tmp_path / "o"), overrides=[*FAST, "record_keys=true", "eval_every=0"])
    with open(tmp_path / "o" / "keys.jsonl") as f:
        seen = {k for row in map(json.loads, f) for seq in row["keys"] for k in seq}
    sizes = {"caption": 40, "interleaved": 30, "text": 20}
    held = {make_key(k, j * n // HOLDOUT[k]) for k, n in sizes.items() for j in range(HOLDOUT[k])}
    everything = {make_key(k, i) for k, n in sizes.items() for i in range(n)}
    assert not seen & held
    assert seen == everything - held


def test_unreadable_samples_are_replaced_and_counted(tmp_path):
    corpora.write_mix(str(tmp_path), {"caption": 40, "interleaved": 30, "text": 20}, per_shard=10)
    manifest = write_manifest(str(tmp_path))
    bad = str(tmp_path / "caption" / "caption-000002.tar")
    with open(bad, "r+b") as f:
        f.truncate(read_offsets(bad[: -len(".tar")] + ".idx")[2] + 10)
    out = train(manifest, "tiny", 8, str(tmp_path / "o"), overrides=FAST)
    assert out["steps"] == 8 and out["last"]["replaced"] > 0


def test_resume_errors_name_the_problem(corpus, tmp_path):
    manifest = os.path.join(corpus, "m.yaml")
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match="no checkpoint at .*ckpt.pt"):
        train(manifest, "tiny", 2, out, resume=True)
    train(manifest, "tiny", 2, out, overrides=FAST)
    with pytest.raises(ConfigError, match="exists: pass --resume"):
        train(manifest, "tiny", 4, out, overrides=FAST)
    other = write_manifest(str(corpus), "other.yaml", text=0.3)
    with pytest.raises(ConfigError, match="another manifest.*--force"):
        train(other, "tiny", 4, out, resume=True, overrides=FAST)
    with pytest.raises(ConfigError, match="config differs .* in optim.lr"):
        train(manifest, "tiny", 4, out, resume=True, overrides=[*FAST, "optim.lr=0.1"])
    forced = train(other, "tiny", 3, out, resume=True, force=True, overrides=FAST)
    assert forced["start_step"] == 2 and forced["steps"] == 3
    with open(os.path.join(out, "checkpoint", "ckpt.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        train(manifest, "tiny", 4, out, resume=True, overrides=FAST)


def test_checkpoints_on_s3(corpus, tmp_path, s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="ckpts")
    manifest = os.path.join(corpus, "m.yaml")
    over = [*FAST, "checkpoint=s3://ckpts/run1"]
    train(manifest, "tiny", 2, str(tmp_path / "a"), overrides=over)
    assert boto3.client("s3").head_object(Bucket="ckpts", Key="run1/ckpt.pt")["ContentLength"] > 0
    assert train(manifest, "tiny", 3, str(tmp_path / "a"), resume=True, overrides=over)["start_step"] == 2


def test_cli_exit_code_and_message_for_a_missing_checkpoint(corpus, tmp_path):
    cmd = [sys.executable, "-m", "mm1data.cli", "train", "--manifest", os.path.join(corpus, "m.yaml"), "--config",
           "tiny", "--steps", "2", "--out", str(tmp_path / "x"), "--resume"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no checkpoint at" in run.stderr


def test_the_plot_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0, "heldout": {"text": 2.5}}) + "\n")
    assert plot_losses(str(metrics), str(tmp_path / "loss.png")) and (tmp_path / "loss.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with caplog.at_level("INFO", logger="mm1data.train.train"):
        assert not plot_losses(str(metrics), str(tmp_path / "other.png"))
    assert "pip install 'mm1data[train]'" in caplog.text and not (tmp_path / "other.png").exists()


def test_batch_that_does_not_split_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(ConfigError, match="batch_size 5 must split"):
        train(os.path.join(corpus, "m.yaml"), load_train_config("tiny", ["batch_size=5"]), 1, str(tmp_path / "o"))


def test_the_demo_training_step_prints_where_the_curve_is(corpus, tmp_path, capsys):
    from mm1data.demo import train_demo

    summary = train_demo(write_manifest(corpus, "demo.yaml"), str(tmp_path / "train"), steps=3)
    out = capsys.readouterr().out
    assert "$ mm1data train --manifest" in out and "training loss" in out
    assert "held-out loss per source at step 3: interleaved" in out and set(summary["heldout"]) == set(HOLDOUT)
    assert os.path.exists(tmp_path / "train" / "loss.png")
