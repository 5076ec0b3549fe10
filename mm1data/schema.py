"""Sample kinds and their tar members (webdataset layout: `{key}.{ext}`, key = 16 hex chars, no dots)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("caption", "interleaved", "text")
IMAGE_EXTS = ("jpg", "png", "webp")


def make_key(source: str, row: int) -> str:
    """Stable 16-hex key of input row `row` of input file `source` (its path relative to the input root)."""
    return hashlib.sha256(f"{source}#{row}".encode()).hexdigest()[:16]


def count_tokens(text: str) -> int:
    """Text tokens by the project's default tokenizer: byte-level, one token per UTF-8 byte."""
    return len(text.encode("utf-8"))


@dataclass(slots=True)
class CaptionSample:
    """One image-caption pair; to_members() gives {key}.jpg (or .png/.webp), {key}.txt (the alt-text), {key}.json and,
    when there is a synthetic caption, {key}.syn.txt (webdataset member `syn.txt` of sample {key}: a key ends at its
    first dot)."""

    key: str  # 16 hex chars, no dots
    caption: str  # the alt-text, as in the input
    image: bytes
    image_ext: str = "jpg"
    meta: dict[str, Any] = field(default_factory=dict)  # url, width, height, sha256, clip_score, source, ...
    synthetic: str = ""  # a model's caption of the image (recaption stage); "" = none, no member

    def to_members(self) -> dict[str, bytes]:
        members = {
            f"{self.key}.{self.image_ext}": self.image,
            f"{self.key}.json": json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode(),
        }
        if self.synthetic:
            members[f"{self.key}.syn.txt"] = self.synthetic.encode("utf-8")
        members[f"{self.key}.txt"] = self.caption.encode("utf-8")
        return members

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> CaptionSample:
        ext = next(e for e in IMAGE_EXTS if e in members)
        synthetic = members["syn.txt"].decode("utf-8") if "syn.txt" in members else ""
        return cls(key, members["txt"].decode("utf-8"), members[ext], ext, json.loads(members["json"]), synthetic)


@dataclass(slots=True)
class TextDoc:
    """One text-only document; to_members() gives {key}.txt and {key}.json."""

    key: str  # 16 hex chars, no dots
    text: str
    meta: dict[str, Any] = field(default_factory=dict)  # id, url, scores, source, row, tokens, ...

    def to_members(self) -> dict[str, bytes]:
        return {
            f"{self.key}.json": json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode(),
            f"{self.key}.txt": self.text.encode("utf-8"),
        }

    @classmethod
    def from_members(cls, key: str, members: dict[str, bytes]) -> TextDoc:
        return cls(key, members["txt"].decode("utf-8"), json.loads(members["json"]))
