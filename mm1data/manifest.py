"""Mixture manifest: sources and weights in a unit, index resolution, realised shares and `manifest check`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mm1data import storage
from mm1data.config import ConfigError, from_dict, read_yaml, to_dict
from mm1data.packing import SequenceConfig
from mm1data.schema import KINDS
from mm1data.shards import shard_uri

# What a weight counts -> the index.json `totals` entry that measures it. A source's draw probability is its
# weight divided by its mean units per sample, so the mixed stream delivers `unit` in the weights' ratio.
UNITS: dict[str, str] = {"samples": "samples", "tokens": "tokens", "images": "images"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
CAPTIONS = ("alt", "synthetic", "mix")  # which caption a caption source yields: KEY.txt, KEY.syn.txt, a seeded mix


@dataclass(frozen=True)
class Source:
    name: str  # appears as item["source"] in the loader
    index: str  # the corpus' index.json (or its folder): absolute, s3://, or relative to the manifest's folder
    weight: float  # relative; normalised across sources, counted in the manifest's unit
    sha256: str | None = None  # pin: sha256 of the index.json bytes; a different index is an error
    holdout: int = 0  # samples set aside (evenly spaced in index order), never trained on: held-out loss
    caption: str = "alt"  # caption sources: alt (KEY.txt) | synthetic (KEY.syn.txt) | mix (synthetic_prob of each)
    synthetic_prob: float = 0.5  # with caption: mix, the chance that a sample yields its synthetic caption

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a source needs a name")
        if self.caption not in CAPTIONS:
            raise ConfigError(
                f"source {self.name!r}: caption must be one of {', '.join(CAPTIONS)}, got {self.caption!r}"
            )
        p = self.synthetic_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p <= 1):
            raise ConfigError(f"source {self.name!r}: synthetic_prob must be a number in [0, 1], got {p!r}")
        if self.holdout < 0:
            raise ConfigError(f"source {self.name!r}: holdout must be >= 0, got {self.holdout}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"source {self.name!r}: weight must be a finite number >= 0, got {self.weight}")
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ConfigError(f"source {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @property
    def index_uri(self) -> str:
        return self.index if self.index.endswith(".json") else storage.join(self.index, "index.json")


@dataclass(frozen=True)
class Manifest:
    """A mixture: sources with relative weights in `unit`, the seed of the mix and the sequence shape."""

    name: str
    seed: int = 0  # >= 0; the loader's default seed
    unit: str = "samples"  # what the weights count: samples | tokens | images
    sources: tuple[Source, ...] = ()
    sequence: SequenceConfig = field(default_factory=SequenceConfig)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ConfigError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not self.sources:
            raise ConfigError(f"manifest {self.name!r} has no sources")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"duplicate source name {dup[0]!r}")
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("at least one source needs a weight > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest YAML (local or s3://). A relative index path is resolved against the manifest file's folder
    when it exists there, else against the working directory (DESIGN.md's `data/caption/index.json`, run from the
    repo root); when it is in neither, the error names both."""
    path = str(path)
    m = Manifest.from_dict(read_yaml(path))  # local or s3://; bounded (config.load_yaml)
    base = path.rsplit("/", 1)[0] if storage.is_s3(path) else os.path.dirname(os.path.abspath(path))
    return dataclasses.replace(m, sources=tuple(dataclasses.replace(s, index=_resolve(s, base)) for s in m.sources))


def _resolve(source: Source, base: str) -> str:
    index = source.index
    if storage.is_s3(index) or os.path.isabs(index):
        return index
    if storage.is_s3(base):
        return storage.join(base, index)
    beside, here = os.path.normpath(os.path.join(base, index)), os.path.abspath(index)
    for candidate in (beside, here):
        if _exists(candidate):
            return candidate
    raise ConfigError(f"source {source.name!r}: cannot read index {beside} (nor {here}): not found")


def _exists(index: str) -> bool:
    return os.path.exists(index if index.endswith(".json") else os.path.join(index, "index.json"))


@dataclass(frozen=True)
class ResolvedSource:
    """A source with its index.json read (and its pin checked)."""

    name: str
    weight: float
    index_uri: str
    index: dict[str, Any]
    holdout: int = 0  # held-out samples (Source.holdout), not in the training stream
    caption: str = "alt"  # Source.caption
    synthetic_prob: float = 0.5  # Source.synthetic_prob

    @property
    def synthetic_share(self) -> float:
        """The chance that a sample of this source yields its synthetic caption (when it has one)."""
        return {"alt": 0.0, "synthetic": 1.0, "mix": float(self.synthetic_prob)}[self.caption]

    @property
    def synthetic_samples(self) -> int:
        """Samples with a synthetic caption (KEY.syn.txt): the recaptioned kept rows of the corpus' funnel."""
        return int(self.index.get("funnel", {}).get("recaptioned", 0))

    @property
    def kind(self) -> str:
        return self.index["kind"]

    @property
    def root(self) -> str:
        """The folder that the index's shard paths are relative to."""
        return self.index_uri.rsplit("/", 1)[0] if storage.is_s3(self.index_uri) else os.path.dirname(self.index_uri)

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.index["shards"]

    def total(self, what: str) -> int:
        """samples | images | tokens | bytes, from the index totals (samples: the sum over listed shards)."""
        if what == "samples":
            return sum(int(s["num_samples"]) for s in self.shards)
        return int(self.index["totals"][what])


def resolve_sources(manifest: Manifest) -> list[ResolvedSource]:
    """Read every source's index.json (local or s3://); a missing or unreadable index or a pin mismatch is a
    ConfigError naming the source and the location."""
    out = []
    for s in manifest.sources:
        uri = s.index_uri
        try:
            data = storage.read_bytes(uri)
        except Exception as e:  # FileNotFoundError, NoSuchKey, NoSuchBucket, permissions: all name the index
            raise ConfigError(f"source {s.name!r}: cannot read index {uri}: {_reason(e)}") from e
        digest = hashlib.sha256(data).hexdigest()
        if s.sha256 is not None and digest != s.sha256:
            raise ConfigError(f"source {s.name!r}: index {uri} has sha256 {digest}, the manifest pins {s.sha256}")
        try:
            index = json.loads(data)
            kind, shards, totals = index["kind"], index["shards"], index["totals"]
            missing = [k for k in ("images", "tokens", "bytes") if k not in totals]
            if missing:
                raise KeyError(f"totals.{missing[0]}")
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"source {s.name!r}: {uri} is not a mm1data index.json ({_reason(e)})") from e
        if kind not in KINDS:
            raise ConfigError(f"source {s.name!r}: {uri} has unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if not isinstance(shards, list):
            raise ConfigError(f"source {s.name!r}: {uri}: shards must be a list")
        if s.holdout and s.holdout >= (n := sum(int(sh["num_samples"]) for sh in shards)):
            raise ConfigError(f"source {s.name!r}: holdout {s.holdout} leaves none of its {n} samples to train on")
        resolved = ResolvedSource(s.name, s.weight, uri, index, s.holdout, s.caption, s.synthetic_prob)
        if s.caption != "alt" and (kind != "caption" or resolved.synthetic_samples == 0):
            what = f"a {kind} corpus" if kind != "caption" else "a corpus without synthetic captions"
            raise ConfigError(
                f"source {s.name!r}: caption: {s.caption} needs synthetic captions, but {uri} is {what} "
                "(build it with --set recaption.enabled=true, or use caption: alt)"
            )
        out.append(resolved)
    return out


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def draw_probabilities(sources: list[ResolvedSource], unit: str) -> np.ndarray:
    """Probability that a position of the mixed stream comes from each source: weight / mean units per sample,
    normalised, so that the stream's `unit` (samples, tokens or images) follows the weights."""
    raw = np.zeros(len(sources))
    for i, s in enumerate(sources):
        if s.weight == 0:
            continue
        n = s.total("samples")
        if n == 0:
            raise ConfigError(f"source {s.name!r} has weight {s.weight} but no samples ({s.index_uri})")
        units = s.total(UNITS[unit])
        if units == 0:
            raise ConfigError(f"source {s.name!r} has no {unit}: it cannot take a weight counted in {unit}")
        raw[i] = s.weight / (units / n)
    return raw / raw.sum()


def realised_shares(sources: list[ResolvedSource], probs: np.ndarray) -> dict[str, np.ndarray]:
    """Share of samples, tokens and images that the mixed stream delivers from each source."""
    out = {}
    for what in ("samples", "tokens", "images"):
        per_sample = np.array([s.total(what) / max(s.total("samples"), 1) for s in sources])
        mass = probs * per_sample
        out[what] = mass / mass.sum() if mass.sum() > 0 else np.zeros(len(sources))
    return out


def check_shards(source: ResolvedSource) -> list[str]:
    """Problems with the listed shards: each tar must exist with the listed size, and its offsets sidecar
    (8 bytes per sample + 8) must exist with its size. Returns one message per problem, naming the file."""
    want = {}
    for sh in source.shards:
        want[shard_uri(source.root, sh["path"], source.index_uri)] = (int(sh["bytes"]), "index.json lists {}")
        idx = sh.get("offsets") or sh["path"][: -len(".tar")] + ".idx"
        want[shard_uri(source.root, idx, source.index_uri)] = (
            8 * (int(sh["num_samples"]) + 1),
            f"expected {{}} for {sh['num_samples']} samples",
        )
    sizes = _file_sizes(list(want))
    problems = []
    for uri, (size, says) in want.items():
        got = sizes.get(uri)
        if got is None:
            problems.append(f"{uri}: {'missing' if uri.endswith('.tar') else 'offsets sidecar missing'}")
        elif got != size:
            problems.append(f"{uri}: {got} bytes, {says.format(size)}")
    return problems


def _file_sizes(uris: list[str]) -> dict[str, int]:
    """{uri: size} of those of `uris` that exist: os.stat locally; on S3 one listing per folder (a HEAD per shard
    would be thousands of requests; storage.list_files gives names only)."""
    if not uris or not storage.is_s3(uris[0]):
        return {u: os.path.getsize(u) for u in uris if os.path.isfile(u)}
    out = {}
    for folder in sorted({u.rsplit("/", 1)[0] + "/" for u in uris}):
        try:
            out.update(storage.list_sizes(folder, recursive=False))
        except Exception as e:
            raise ConfigError(f"cannot list {folder}: {_reason(e)}") from e
    return out


def check_manifest(manifest: Manifest, budget_tokens: int | None = None) -> dict[str, Any]:
    """What `mm1data manifest check --json` prints: per source its totals, weight, realised shares by samples,
    tokens and images, and the epochs a budget of `budget_tokens` text tokens needs. Raises ConfigError naming
    every missing index or shard."""
    sources = resolve_sources(manifest)
    problems = [p for s in sources for p in check_shards(s)]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ConfigError(f"{len(problems)} shard problem(s): " + "; ".join(problems[:10]) + more)
    probs = draw_probabilities(sources, manifest.unit)
    shares = realised_shares(sources, probs)
    # Text tokens per position of the mixed stream: turns a token budget into positions, then per-source draws.
    tokens_per_draw = float(sum(p * s.total("tokens") / max(s.total("samples"), 1) for p, s in zip(probs, sources)))
    total_weight = sum(s.weight for s in sources)
    rows = []
    for i, s in enumerate(sources):
        n, p = s.total("samples"), float(probs[i])
        # Mixture text tokens after which this source has been read once (None if it is never drawn).
        per_epoch = n * tokens_per_draw / p if p > 0 and tokens_per_draw > 0 else None
        epochs = None
        if budget_tokens is not None and tokens_per_draw > 0:
            epochs = budget_tokens / tokens_per_draw * p / n if n else 0.0
        rows.append(
            {
                "name": s.name,
                "kind": s.kind,
                "index": s.index_uri,
                "shards": len(s.shards),
                "samples": n,
                "images": s.total("images"),
                "tokens": s.total("tokens"),
                "bytes": s.total("bytes"),
                "weight": s.weight,
                "holdout": s.holdout,
                "caption": s.caption,
                "synthetic_prob": s.synthetic_share,
                "synthetic_samples": s.synthetic_samples,
                "weight_share": s.weight / total_weight,
                "draw_probability": p,
                "share_samples": float(shares["samples"][i]),
                "share_tokens": float(shares["tokens"][i]),
                "share_images": float(shares["images"][i]),
                "epochs": epochs,
                "budget_per_epoch": per_epoch,
            }
        )
    totals = {k: sum(r[k] for r in rows) for k in ("shards", "samples", "images", "tokens", "bytes")}
    return {
        "name": manifest.name,
        "unit": manifest.unit,
        "seed": manifest.seed,
        "budget_tokens": budget_tokens,
        "tokens_per_sample": tokens_per_draw,
        "sources": rows,
        "totals": totals,
        "sequence": to_dict(manifest.sequence),
    }


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of check_manifest's report."""
    head = (
        "source",
        "kind",
        "samples",
        "images",
        "tokens",
        "weight",
        "sh.samples",
        "sh.tokens",
        "sh.images",
        "epochs",
        "caption",
    )
    lines = [f"manifest {report['name']}: weights count {report['unit']}, seed {report['seed']}"]
    fmt = "{:<14} {:<11} {:>12} {:>12} {:>15} {:>7} {:>10} {:>10} {:>10} {:>9}  {}"
    lines.append(fmt.format(*head))
    for r in report["sources"]:
        epochs = "-" if r["epochs"] is None else f"{r['epochs']:.3g}"
        lines.append(
            fmt.format(
                r["name"][:14],
                r["kind"],
                f"{r['samples']:,}",
                f"{r['images']:,}",
                f"{r['tokens']:,}",
                f"{r['weight']:g}",
                f"{r['share_samples']:.1%}",
                f"{r['share_tokens']:.1%}",
                f"{r['share_images']:.1%}",
                epochs,
                _caption_choice(r),
            )
        )
    t = report["totals"]
    lines.append(
        fmt.format("total", "", f"{t['samples']:,}", f"{t['images']:,}", f"{t['tokens']:,}", *[""] * 6).rstrip()
    )
    lines.append(f"{t['shards']:,} shards, {t['bytes'] / 1e6:,.1f} MB, all present with their listed sizes")
    drawn = [r for r in report["sources"] if r["budget_per_epoch"]]
    if report["budget_tokens"] is None and drawn:
        first = min(drawn, key=lambda r: r["budget_per_epoch"])
        lines.append(
            f"a budget of {first['budget_per_epoch']:,.0f} text tokens reads {first['name']} once "
            "(--budget-tokens N prints the epochs per source)"
        )
    elif report["budget_tokens"] is not None:
        lines.append(f"budget: {report['budget_tokens']:,} text tokens ({report['tokens_per_sample']:.1f} per sample)")
    return "\n".join(lines)


def _caption_choice(row: dict[str, Any]) -> str:
    """The caption column of the report: alt | synthetic | mix 30% synthetic, with how many samples have one."""
    if row["kind"] != "caption":
        return "-"
    choice = {"alt": "alt", "synthetic": "synthetic", "mix": f"mix {row['synthetic_prob']:.0%} synthetic"}
    have = row["synthetic_samples"]
    return f"{choice[row['caption']]} ({have:,} with a synthetic caption)" if have else choice[row["caption"]]
