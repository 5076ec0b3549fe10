"""`mm1data train`: the MM1-shaped model trained straight from a manifest's shards, on one CPU or under torchrun.

Top to bottom: the config; setup (processes, data streams, model, optimiser, resume); the loop (gradient
accumulation, held-out loss per source, metrics, checkpoints); helpers (streams, evaluation, checkpoints, metrics).

Data: `streams` independent packed streams (MixtureDataset rank s of `streams`, SequencePacker, collate), each
giving batch_size / streams sequences a step; process r of N runs streams r*S/N .. (r+1)*S/N - 1. The global
batch of a step is therefore the same at any world size that divides `streams`, which is what makes a resume at
another world size, and a 1-process run against a DDP run, give the same losses. The loss is the mean over every
text target of the global batch (not a mean of per-micro-batch means), so accumulation and world size don't
change it either.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mm1data import storage
from mm1data.config import ConfigError, load_config, to_dict
from mm1data.loader import MixtureDataset, PackedLoader
from mm1data.manifest import Manifest, load_manifest, resolve_sources
from mm1data.packing import SequenceConfig, SequencePacker, Tokenizer, collate, load_tokenizer
from mm1data.train.model import MM1, ModelConfig

log = logging.getLogger(__name__)
CONFIGS = os.path.join(os.path.dirname(__file__), "configs")  # tiny.yaml, small.yaml, mm1_3b.yaml
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak
    min_lr: float = 3e-5  # where the cosine ends
    warmup_steps: int = 100
    decay_steps: int = 10_000  # warm-up + cosine length; --steps only says where a run stops, so a resume keeps it
    weight_decay: float = 0.1  # AdamW, on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max gradient norm; 0 = off

    def __post_init__(self) -> None:
        if self.decay_steps < 1 or self.warmup_steps < 0:
            raise ValueError("decay_steps must be >= 1 and warmup_steps >= 0")


@dataclass(frozen=True)
class DataConfig:
    streams: int | None = None  # packed data streams; default the first launch's world size (a resume keeps it)
    num_workers: int = 2  # DataLoader workers per stream (reading and decoding)
    loader_batch: int = 16  # samples per worker batch
    io_threads: int = 4  # reading threads per worker
    shuffle_buffer: int = 65536  # samples permuted together within a source
    tokenizer: str | None = None  # tokenizer.json, local or s3://; default the byte-level tokenizer


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 8  # sequences per optimiser step, all processes together
    micro_batch: int = 1  # sequences per forward pass in one process (accumulation makes up the rest)
    seed: int = 0  # model init (the data order is the manifest's seed)
    eval_every: int = 100  # steps between held-out losses (sources with `holdout: N`); 0 = only at the end
    log_every: int = 10  # steps between progress lines when stderr is not a terminal
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    checkpoint: str | None = None  # checkpoint folder, local or s3://; default OUT/checkpoint
    precision: str = "auto"  # PRECISION: auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool | None = None  # torch.compile the model; default: on CUDA
    device: str = "auto"  # auto (cuda when visible) | cpu | cuda
    peak_flops: float | None = None  # per device, for MFU; default from the GPU's name (dense bf16)
    record_keys: bool = False  # write each step's sample keys to OUT/keys.jsonl (what the model saw)

    def __post_init__(self) -> None:
        if self.precision not in PRECISION:
            raise ValueError(f"precision must be one of {', '.join(PRECISION)}, got {self.precision!r}")
        if min(self.batch_size, self.micro_batch) < 1:
            raise ValueError("batch_size and micro_batch must be >= 1")


PRECISION = {"auto": None, "fp32": None, "bf16": torch.bfloat16}
# Dense bf16 peak FLOP/s by GPU name (vendor datasheets), for MFU; peak_flops overrides.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
# Config keys a resume may change: they don't touch the model, the optimiser or the data order.
RESUMABLE = {"eval_every", "log_every", "checkpoint_every", "checkpoint", "data.num_workers", "data.loader_batch",
             "data.io_threads", "compile", "device", "peak_flops", "record_keys"}  # fmt: skip


def load_train_config(name_or_path: str, overrides: list[str] = ()) -> TrainConfig:
    """A bundled config by name (tiny, small, mm1_3b) or a YAML path, then `--set KEY=VALUE` overrides."""
    bundled = os.path.join(CONFIGS, f"{name_or_path}.yaml")
    path = bundled if os.path.isfile(bundled) else name_or_path
    if not os.path.isfile(path):
        names = sorted(f[: -len(".yaml")] for f in os.listdir(CONFIGS) if f.endswith(".yaml"))
        raise ConfigError(f"no train config {name_or_path!r}: not a file, nor one of {', '.join(names)}")
    return load_config(TrainConfig, path, list(overrides))


def train(
    manifest_path: str,
    config: str | TrainConfig,
    steps: int,
    out: str,
    *,
    resume: bool = False,
    force: bool = False,
    overrides: list[str] = (),
    batches: Iterable[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train until global step `steps`; returns a summary (losses at the first and last step, held-out losses).
    `batches` (collated, this process's share of each step) replaces the manifest's streams: benchmarks feed random
    tensors through it to show what the loader costs."""
    cfg = config if isinstance(config, TrainConfig) else load_train_config(config, overrides)
    # ---- processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; alone, this is rank 0 of 1
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    ours = world > 1 and not dist.is_initialized()
    if ours:
        dist.init_process_group("nccl" if cuda else "gloo")
    main = rank == 0
    autocast = PRECISION[cfg.precision] or (torch.bfloat16 if cuda and cfg.precision == "auto" else None)

    # ---- the manifest, the checkpoint to resume, the data streams
    manifest = load_manifest(manifest_path)
    fingerprint = manifest_fingerprint(manifest)
    ckpt_uri = storage.join(cfg.checkpoint or storage.join(out, "checkpoint"), "ckpt.pt")
    ckpt = read_checkpoint(ckpt_uri) if resume else None
    if ckpt is None and storage.exists(ckpt_uri):
        raise ConfigError(f"{ckpt_uri} exists: pass --resume to continue it, or choose another --out")
    if ckpt is not None:
        check_resume(ckpt, cfg, fingerprint, force)
    streams = ckpt["streams"] if ckpt else cfg.data.streams or world
    local_seqs = cfg.batch_size // world
    if streams % world or cfg.batch_size % streams or local_seqs % cfg.micro_batch:
        raise ConfigError(
            f"batch_size {cfg.batch_size} must split into {streams} streams, the streams over {world} processes, "
            f"and each process's {local_seqs} sequences into micro-batches of {cfg.micro_batch}"
        )
    tok = load_tokenizer(cfg.data.tokenizer)
    mine = range(rank * streams // world, (rank + 1) * streams // world)
    loaders = [] if batches is not None else [make_stream(manifest, cfg, s, streams, tok, cuda) for s in mine]
    heldout = [s.name for s in manifest.sources if s.holdout]
    if heldout:
        evalset = MixtureDataset(manifest, image_size=manifest.sequence.image_size, io_threads=cfg.data.io_threads)

    # ---- model and optimiser (every process builds the same init; DDP checks it)
    torch.manual_seed(cfg.seed)
    raw = MM1(cfg.model, manifest.sequence, tok.vocab_size, tok.image_id).to(device)
    if cuda and cfg.model.attention == "auto":
        raw.set_attention("flex")
    params = [p for p in raw.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, cfg.optim))
    step = 0
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])  # every process seeds alike and draws alike: rank 0's states
        if cuda and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        if ckpt["fingerprint"] == fingerprint:
            for s, loader in zip(mine, loaders):
                loader.load_state_dict(ckpt["data"][s])
        else:
            log.warning("resuming with another manifest (forced): the data streams start afresh")
    compiled = torch.compile(raw) if (cfg.compile if cfg.compile is not None else cuda) else raw
    model = compiled
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(compiled, device_ids=[local] if cuda else None)

    # metrics, keys and plots are appended to files in `work`: `out` itself, or for an s3:// --out a local folder
    # copied to it after every checkpoint and at the end (S3 objects cannot be appended to)
    work, own = run_folder(out, resume, rank), [f"keys-{rank}.jsonl" if world > 1 else "keys.jsonl"]
    if main:
        own += ["config.json", "metrics.jsonl", "loss.png"]
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump({"train": to_dict(cfg), "manifest": manifest.to_dict(), "streams": streams}, f, indent=1)
        for name in ("metrics.jsonl", "keys.jsonl", *(f"keys-{r}.jsonl" for r in range(world))):
            keep_rows(os.path.join(work, name), step)
        log.info(
            "model: %.2fM parameters (%.2fM image encoder, %.2fM connector); %d process(es), %d stream(s), "
            "%d micro-batches of %d per step",
            raw.num_params() / 1e6, raw.num_params("encoder.") / 1e6, raw.num_params("connector.") / 1e6, world,
            streams, local_seqs // cfg.micro_batch, cfg.micro_batch,
        )  # fmt: skip
    peak = cfg.peak_flops or (peak_flops(device) if cuda else None)
    flops_token, flops_image = raw.flops(manifest.sequence.max_tokens)
    bar = Progress(step, steps, cfg.log_every) if main else None
    iters = [iter(loader) for loader in loaders] if batches is None else [iter(batches)]
    summary: dict[str, Any] = {"out": out, "start_step": step}

    # ---- the loop
    while step < steps:
        t0 = time.perf_counter()
        batch = concat([next(it) for it in iters])
        targets = batch["loss_mask"][:, 1:] & (batch["document_ids"][:, 1:] == batch["document_ids"][:, :-1])
        replaced = sum(sum(loader.errors.values()) for loader in loaders)  # unreadable samples so far
        counts = torch.tensor([targets.sum(), batch["attention_mask"].sum(), batch["num_images"].sum(), replaced])
        n_targets, n_tokens, n_images, n_replaced = all_sum(counts.double(), device, world).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=device)
        micros = local_seqs // cfg.micro_batch
        for i in range(micros):
            micro = {k: v[i * cfg.micro_batch : (i + 1) * cfg.micro_batch].to(device, non_blocking=True)
                     for k, v in batch.items() if isinstance(v, torch.Tensor)}  # fmt: skip
            if world > 1:
                model.require_backward_grad_sync = i == micros - 1  # all-reduce once, after the last micro-batch
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss, _, aux = model(micro)
                total = loss.sum()
            # d(sum of this process's target losses / all targets) * world: DDP's gradient average becomes the sum
            objective = total * (world / max(n_targets, 1)) + cfg.model.moe_aux_weight * aux / micros
            objective.backward()
            loss_sum += total.detach().double()
            aux_sum += aux.detach().double()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # ---- metrics (the loss over every target of the global batch), held-out losses, checkpoints
        loss_total, aux_total = all_sum(torch.stack([loss_sum, aux_sum / micros]), device, world).tolist()
        dt = time.perf_counter() - t0
        row = {
            "step": step,
            "loss": loss_total / max(n_targets, 1),
            "lr": lr,
            "tokens": int(n_tokens),
            "images": int(n_images),
            "tokens_per_s": n_tokens / dt,
            "images_per_s": n_images / dt,
            "step_s": dt,
            "replaced": int(n_replaced),
        }
        if cfg.model.moe_experts:
            row["moe_aux"] = aux_total / world
        if peak:  # every position is computed, padding included
            flops = flops_token * cfg.batch_size * manifest.sequence.max_tokens + flops_image * n_images
            row["mfu"] = flops / dt / (peak * world)
        if heldout and (step == steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            row["heldout"] = evaluate(compiled, evalset, heldout, manifest.sequence, tok, cfg, device, autocast, world)
        if cfg.record_keys:
            record_keys(work, step, batch["keys"], rank, world)
        if main:  # before the checkpoint: a resume from it finds this step's row
            with open(os.path.join(work, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(row)
        if step == steps or step % cfg.checkpoint_every == 0:
            states = [loader.state_dict() for loader in loaders]
            if world > 1:
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, states)
                states = [s for part in gathered for s in part]
            if main:
                write_checkpoint(ckpt_uri, raw, opt, sched, step, cfg, manifest, fingerprint, streams, states)
            copy_out(work, out, own)
        summary.setdefault("first", row)
        summary["last"] = row
        if "heldout" in row:
            summary["heldout"] = row["heldout"]

    if main:
        bar.close()
        plot_losses(os.path.join(work, "metrics.jsonl"), os.path.join(work, "loss.png"))
    copy_out(work, out, own)
    for it in iters:
        if hasattr(it, "close"):
            it.close()
    if world > 1:
        dist.barrier()
    if ours:
        dist.destroy_process_group()
    summary["steps"] = step
    return summary


# ------------------------------------------------------------------------------------------------------- helpers


def lr_factor(cfg: OptimConfig, step: int) -> float:
    """Linear warm-up to lr, cosine decay to min_lr at decay_steps, then min_lr (nanoGPT's get_lr, as a factor)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.decay_steps:
        return cfg.min_lr / cfg.lr
    progress = (step - cfg.warmup_steps) / max(cfg.decay_steps - cfg.warmup_steps, 1)
    return (cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)) / cfg.lr


def make_stream(
    manifest: Manifest, cfg: TrainConfig, stream: int, streams: int, tok: Tokenizer, pin: bool
) -> PackedLoader:
    """Data stream `stream` of `streams`: its share of the mixture, packed, batch_size / streams sequences a step."""
    seq = manifest.sequence
    ds = MixtureDataset(
        manifest, rank=stream, world_size=streams, shuffle_buffer=cfg.data.shuffle_buffer,
        batch_size=cfg.data.loader_batch, io_threads=cfg.data.io_threads, image_size=seq.image_size,
    )  # fmt: skip
    collate_fn = functools.partial(collate_step, seq=seq, pad_id=tok.pad_id, pin=pin)
    packer = SequencePacker(seq, tok)
    return PackedLoader(ds, packer, cfg.batch_size // streams, collate_fn, num_workers=cfg.data.num_workers)


def collate_step(seqs: list[dict[str, Any]], seq: Any, pad_id: int, pin: bool) -> dict[str, Any]:
    """collate() with uint8 images (normalised on the device), pinned for an async copy; plus the sample keys."""
    batch: dict[str, Any] = collate(seqs, seq, pad_id=pad_id, normalize=False)
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    batch["keys"] = [list(s["keys"]) for s in seqs]
    return batch


def all_sum(x: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """Sum over processes (on the device: NCCL reduces CUDA tensors only), back on the CPU."""
    if world == 1:
        return x.cpu()
    x = x.to(device)
    dist.all_reduce(x)
    return x.cpu()


def concat(batches: list[dict[str, Any]]) -> dict[str, Any]:
    if len(batches) == 1:
        return batches[0]
    return {k: torch.cat([b[k] for b in batches]) if isinstance(batches[0][k], torch.Tensor)
            else [x for b in batches for x in b[k]] for k in batches[0]}  # fmt: skip


@torch.no_grad()
def evaluate(
    model: MM1,
    ds: MixtureDataset,
    sources: list[str],
    seq: SequenceConfig,
    tok: Tokenizer,
    cfg: TrainConfig,
    device: torch.device,
    autocast: torch.dtype | None,
    world: int,
) -> dict[str, float]:
    """Mean next-token loss on each source's held-out slice, packed alone (the same sequences every time and at
    every world size; process r takes sequences r, r + N, ...)."""
    was_training, rank = model.training, dist.get_rank() if world > 1 else 0
    model.eval()
    sums = torch.zeros(len(sources), 2, dtype=torch.float64)
    for j, name in enumerate(sources):
        seqs = list(SequencePacker(seq, tok).pack(ds.holdout_items(name)))[rank::world]
        for i in range(0, len(seqs), cfg.micro_batch):
            b = collate(seqs[i : i + cfg.micro_batch], seq, pad_id=tok.pad_id, normalize=False)
            b = {k: v.to(device) for k, v in b.items()}
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss, targets, _ = model(b)
            sums[j] += torch.stack([loss.sum().double().cpu(), targets.sum().double().cpu()])
    sums = all_sum(sums, device, world)
    model.train(was_training)
    return {name: (sums[j, 0] / sums[j, 1]).item() if sums[j, 1] else float("nan") for j, name in enumerate(sources)}


def manifest_fingerprint(manifest: Manifest) -> str:
    """sha256 of what decides the data stream: seed, unit, sequence shape, and per source its name, weight,
    holdout, caption choice and the bytes of its index.json (the corpus' shards; a moved corpus keeps its
    fingerprint). The caption choice enters only when it is not the alt-text, so older checkpoints still match."""
    sources = []
    for s, r in zip(manifest.sources, resolve_sources(manifest)):
        digest = hashlib.sha256(storage.read_bytes(r.index_uri)).hexdigest()
        sources.append({"name": s.name, "weight": s.weight, "holdout": s.holdout, "index_sha256": digest})
        if r.synthetic_share:
            sources[-1]["synthetic"] = r.synthetic_share
    doc = {"seed": manifest.seed, "unit": manifest.unit, "sequence": to_dict(manifest.sequence), "sources": sources}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def check_resume(ckpt: dict[str, Any], cfg: TrainConfig, fingerprint: str, force: bool) -> None:
    """A resume must continue the same run: same manifest (data) and same config, except RESUMABLE keys."""
    if ckpt["fingerprint"] != fingerprint and not force:
        raise ConfigError(
            "the checkpoint was trained on another manifest (its sources, weights, holdouts, sequence shape or "
            "corpora differ): resuming would not continue the same data; pass --force to resume anyway"
        )
    mine, theirs = flat(to_dict(cfg)), flat(ckpt["config"])
    changed = sorted(k for k in set(mine) | set(theirs) if k not in RESUMABLE and mine.get(k) != theirs.get(k))
    if any(k.startswith("model.") for k in changed):
        model = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed if k.startswith("model."))
        raise ConfigError(f"the checkpoint's model differs from the config's: {model}")
    if changed and not force:
        raise ConfigError(f"the config differs from the checkpoint's in {', '.join(changed)}: pass --force to resume")


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}"""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def write_checkpoint(
    uri: str,
    model: MM1,
    opt: torch.optim.Optimizer,
    sched: Any,
    step: int,
    cfg: TrainConfig,
    manifest: Manifest,
    fingerprint: str,
    streams: int,
    data: list[dict[str, Any]],
) -> None:
    """Model, optimiser, scheduler, step, RNG, every stream's loader + packer state, config and manifest hash, as
    one file written whole (a temporary name renamed locally; one upload on S3)."""
    state = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        "config": to_dict(cfg),
        "manifest": manifest.to_dict(),
        "fingerprint": fingerprint,
        "streams": streams,
        "data": data,
    }
    tmp = os.path.join(storage.local_tmp_dir(uri), f".ckpt-{os.getpid()}.pt")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    torch.save(state, tmp)
    storage.put_file(tmp, uri)


def read_checkpoint(uri: str) -> dict[str, Any]:
    """The checkpoint at `uri` (local or s3://); a missing, unreadable or foreign file is a ConfigError naming it."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise ConfigError(f"--resume: no checkpoint at {uri}") from e
    except Exception as e:
        raise ConfigError(f"--resume: cannot read checkpoint {uri}: {type(e).__name__}: {e}") from e
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--resume: {uri} is not a readable checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(f"--resume: {uri} is not an mm1data checkpoint (version {CHECKPOINT_VERSION})")
    return ckpt


def run_folder(out: str, resume: bool, rank: int = 0) -> str:
    """The local folder the run appends its files to: `out`, or for s3:// a folder under the system's temporary
    directory named by the URI and the rank, holding what `out` holds (--resume) or nothing (a new run)."""
    if not storage.is_s3(out):
        os.makedirs(out, exist_ok=True)
        return out
    work = os.path.join(
        tempfile.gettempdir(), "mm1data-runs", f"{hashlib.sha256(out.encode()).hexdigest()[:16]}-{rank}"
    )
    shutil.rmtree(work, ignore_errors=True)  # a mirror left by an earlier run on this host may be stale
    os.makedirs(work)
    if resume:
        for uri in storage.list_files(out, recursive=False):
            if uri.endswith(".jsonl"):
                with open(os.path.join(work, uri.rsplit("/", 1)[1]), "wb") as f:
                    f.write(storage.read_bytes(uri))
    return work


def copy_out(work: str, out: str, names: list[str]) -> None:
    """For an s3:// --out: upload the named files of `work` that exist (each whole, replacing the last copy)."""
    if work == out:
        return
    for name in names:
        path = os.path.join(work, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                storage.write_bytes(storage.join(out, name), f.read())


def keep_rows(path: str, step: int) -> None:
    """Drop JSON-lines rows after `step` (a run that crashed after its last checkpoint logged steps it will redo)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def record_keys(out: str, step: int, keys: list[list[str]], rank: int, world: int) -> None:
    with open(os.path.join(out, f"keys-{rank}.jsonl" if world > 1 else "keys.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def peak_flops(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Progress:
    """A tqdm bar on a terminal; otherwise a line every log_every steps (logs of batch jobs stay readable)."""

    def __init__(self, start: int, total: int, every: int = 10) -> None:
        self.bar, self.every = None, every
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        held = " ".join(f"{k} {v:.3f}" for k, v in row.get("heldout", {}).items())
        text = f"loss {row['loss']:.4f} {row['tokens_per_s']:,.0f} tok/s" + (f" held-out: {held}" if held else "")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif row["step"] % self.every == 0 or held:
            print(f"step {row['step']}: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_losses(metrics: str, png: str) -> bool:
    """loss.png: the training loss and each source's held-out loss against the step. Skipped (logged) without
    matplotlib (pip install 'mm1data[train]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install 'mm1data[train]'): no %s", png)
        return False
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    for name in sorted({k for r in rows for k in r.get("heldout", {})}):
        pts = [(r["step"], r["heldout"][name]) for r in rows if name in r.get("heldout", {})]
        ax.plot(*zip(*pts), marker="o", label=f"held-out {name}")
    ax.set(xlabel="step", ylabel="loss (nats per text token)", title=os.path.basename(os.path.dirname(png)) or "loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
