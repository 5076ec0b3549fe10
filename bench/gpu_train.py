"""Training speed: `mm1data train` on one GPU (the `small` config; `tiny` on CPU), fed by the loader and then by
random tensors laid out like the loader's batches, so that the loader's cost shows as a ratio.

Writes, under --dir (default: a temp dir), bench/loader.py's shards (captions with 20-50 KB JPEGs, interleaved
documents of 1-3 images, 1-4 KB texts) and a manifest of MM1's 45/45/10 mix with MM1's sequence block (4096
tokens, 16 images of 144 tokens at 378 px). Then, in this process:

  loader   mm1data.train.train.train(manifest, config, warmup + steps): MixtureDataset with DataLoader workers ->
           SequencePacker -> collate (uint8 images, pinned) -> the model (bf16 autocast, torch.compile, FlexAttention
           on CUDA)
  random   the same config and steps, fed from batches of random token ids and pixels with the layout (documents,
           images, padding) of the loader's first batches, made before timing: the same model FLOPs without loading

Prints the medians over the steps after --warmup (compilation, first reads) of tokens/s (non-padding positions),
images/s, step time and MFU (GPU: PaLM's 6N + attention count over all positions against the GPU's dense bf16 peak;
`--peak-flops` for GPUs not in mm1data.train.train.PEAK_FLOPS), and loader / random. Goals (ISSUE 9): MFU >= 40%
on an H100-class GPU; the loader under 5% of step time.

    .venv/bin/python bench/gpu_train.py [--config small|tiny] [--steps 30] [--warmup 10] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from loader import MIX, write_corpora  # noqa: E402  (bench/loader.py: the same shards as the loader benchmark)

from mm1data.manifest import load_manifest  # noqa: E402
from mm1data.packing import load_tokenizer  # noqa: E402
from mm1data.train.train import load_train_config, make_stream, train  # noqa: E402

MM1_SEQUENCE = {"max_tokens": 4096, "max_images": 16, "image_tokens": 144, "image_size": 378}  # REFERENCE.md


def write_manifest(root: str, sequence: dict[str, int]) -> str:
    path = os.path.join(root, "mm1-bench.yaml")
    sources = [{"name": k, "index": f"{k}/index.json", "weight": w} for k, w in MIX.items()]
    with open(path, "w") as f:
        yaml.safe_dump({"name": "bench", "seed": 0, "unit": "samples", "sources": sources, "sequence": sequence}, f)
    return path


def random_batches(manifest_path: str, cfg: Any, n: int) -> list[dict[str, Any]]:
    """n batches with the layout of the loader's first n (one process's share of a step), random ids and pixels."""
    manifest = load_manifest(manifest_path)
    tok = load_tokenizer(cfg.data.tokenizer)
    stream = iter(make_stream(manifest, cfg, 0, 1, tok, torch.cuda.is_available()))
    g = torch.Generator().manual_seed(0)
    out = []
    for batch in itertools.islice(stream, n):
        ids = batch["input_ids"]
        text = batch["attention_mask"] & (ids != tok.image_id)
        batch["input_ids"] = torch.where(text, torch.randint(0, 256, ids.shape, generator=g), ids)
        batch["images"] = torch.randint(0, 256, batch["images"].shape, generator=g, dtype=torch.uint8)
        if torch.cuda.is_available():
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out.append(batch)
    stream.close()
    return out


def medians(out: str, warmup: int) -> dict[str, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["step"] > warmup]
    keys = ("tokens_per_s", "images_per_s", "step_s", "mfu", "loss")
    return {k: statistics.median(r[k] for r in rows) for k in keys if k in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="train config (default: small on CUDA, tiny on CPU)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed first steps (compilation, first reads)")
    p.add_argument("--dir", help="where to write shards and runs (default: a temp dir)")
    p.add_argument("--captions", type=int, default=3000)
    p.add_argument("--docs", type=int, default=1000)
    p.add_argument("--texts", type=int, default=3000)
    p.add_argument("--peak-flops", type=float, help="the GPU's dense bf16 peak, FLOP/s (for MFU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train config override")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    name = args.config or ("small" if cuda else "tiny")
    overrides = [*args.set, "eval_every=0", "checkpoint_every=100000", "log_every=10"]
    if args.peak_flops:
        overrides.append(f"peak_flops={args.peak_flops}")
    cfg = load_train_config(name, overrides)

    root = args.dir or tempfile.mkdtemp(prefix="mm1data-bench-train-")
    t0 = time.perf_counter()
    write_corpora(root, {"caption": args.captions, "interleaved": args.docs, "text": args.texts}, 200)
    manifest = write_manifest(root, MM1_SEQUENCE)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, load average {load})"
    print(f"shards and manifest under {root} ({time.perf_counter() - t0:.0f} s); torch {torch.__version__}, {device}")
    shape = f"batch {cfg.batch_size} x {MM1_SEQUENCE['max_tokens']} tokens, micro-batch {cfg.micro_batch}"
    steps = f"{args.warmup} warm-up + {args.steps} timed steps"
    print(f"config {name}: {shape}, {cfg.data.num_workers} loader workers per stream; {steps}")

    total = args.warmup + args.steps
    train(manifest, cfg, total, os.path.join(root, "run-loader"))
    fake = random_batches(manifest, cfg, 4)
    train(manifest, cfg, total, os.path.join(root, "run-random"), batches=itertools.cycle(fake))
    rows = {"loader": medians(os.path.join(root, "run-loader"), args.warmup)}
    rows["random"] = medians(os.path.join(root, "run-random"), args.warmup)

    print(f"\n{'feed':<8} {'tokens/s':>10} {'images/s':>9} {'step s':>8} {'MFU':>6}")
    for feed, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(f"{feed:<8} {r['tokens_per_s']:>10,.0f} {r['images_per_s']:>9,.1f} {r['step_s']:>8.3f} {mfu:>6}")
    ratio = rows["random"]["step_s"] / rows["loader"]["step_s"]
    print(f"loader / random speed: {ratio:.3f} (the loader costs {1 - ratio:.1%} of step time; goal < 5%)")
    if not cuda:
        print("no GPU here: MFU is not measured; run this on a GPU machine for the small config's figures")


if __name__ == "__main__":
    main()
