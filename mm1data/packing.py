"""MM1 sequence packing: samples -> sequences of at most max_tokens tokens and max_images images."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mm1data import storage
from mm1data.config import BadValue, check

if TYPE_CHECKING:
    import torch
    from PIL import Image

# open_clip's OPENAI_DATASET_MEAN/STD, written out so that packing does not import open_clip.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class SequenceConfig:
    """The manifest's `sequence:` block (MM1: 4096 tokens, 16 images of 144 tokens at 378 px)."""

    max_tokens: int = 4096  # tokens per sequence, image positions included
    max_images: int = 16  # images per sequence
    image_tokens: int = 144  # positions one image takes (C-Abstractor output)
    image_size: int = 378  # px, square, images are resized to this for the encoder

    def __post_init__(self) -> None:
        # max_images >= 1 and image_tokens + 2 <= max_tokens are what SequencePacker needs (bos + one image + eos must
        # fit a sequence, or an image document could never be placed): refused when the manifest loads, not mid-run
        for key in ("max_tokens", "max_images", "image_tokens", "image_size"):
            check(self, key, ge=1)
        if self.image_tokens + 2 > self.max_tokens:
            raise BadValue("image_tokens", self.image_tokens, f"<= max_tokens - 2 = {self.max_tokens - 2}")


# ---------------------------------------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the packer needs from a tokenizer: text <-> ids and four special ids."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    image_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """The default tokenizer, no download: ids 0..255 are UTF-8 bytes, then pad, bos, eos and image placeholder.

    Its token count is `schema.count_tokens` (index.json totals use the same rule).
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    image_id = 259
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids are skipped, a byte sequence cut mid-character decodes with U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# tokenizer.json has no notion of roles (that lives in tokenizer_config.json), so roles are found by the usual
# token spellings; the first name of each role is added as a special token when none is in the vocabulary.
SPECIAL_TOKENS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>"),
    "image": ("<image>", "<|image|>", "<img>", "<|image_pad|>"),
}


class JsonTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json behind the ByteTokenizer interface.

    encode() adds no special tokens (the packer adds bos/eos itself) and tokenizes a special token's spelling in the
    text as plain text; padding and truncation set in the file are turned off. Special ids come from SPECIAL_TOKENS
    (added to the vocabulary when absent).
    """

    def __init__(self, tok: Any) -> None:
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True  # text that spells "<image>" or "</s>" stays text, never a control id
        ids = {}
        for role, names in SPECIAL_TOKENS.items():
            name = next((n for n in names if tok.token_to_id(n) is not None), None)
            if name is None:
                name = names[0]
                tok.add_special_tokens([name])
            ids[role] = tok.token_to_id(name)
        self.tok = tok
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids["pad"], ids["bos"], ids["eos"], ids["image"]
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """None -> ByteTokenizer; otherwise a tokenizer.json file (local path or s3://) read with `tokenizers`."""
    if path is None:
        return ByteTokenizer()
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise ImportError(f"loading {path} needs the tokenizers package: pip install 'mm1data[tokenizer]'") from e
    return JsonTokenizer(HFTokenizer.from_str(storage.read_bytes(path).decode("utf-8")))


# ------------------------------------------------------------------------------------------------------------ packing

PACKER_STATE_VERSION = 1


@dataclass(slots=True, eq=False)
class _Atom:
    """A unit of a document: a run of text ids, or one image (ids is None) taking image_tokens positions."""

    ids: list[int] | None
    image: Any = None
    glue: bool = False  # no cut right before this atom (bos + first atom, image + its caption, last atom + eos)
    split: bool = False  # cuts inside this text run (at token boundaries) are allowed


@dataclass(slots=True, eq=False)
class _Doc:
    """One sample on its way into sequences; (atom, offset) is where its next piece starts."""

    source: str
    key: str
    atoms: list[_Atom]
    tokens: int  # tokens not yet placed
    images: int  # images not yet placed
    born: int  # index of the sequence being built when the document entered the buffer
    ref: list[Any]  # [epoch, position] of the loader item it came from: how a resumed packer reads it again
    atom: int = 0
    offset: int = 0


def _caption_atoms(item: dict[str, Any], tok: Tokenizer) -> list[_Atom]:
    # MM1 puts the image first; the caption is glued to the (last) image so a pair is never split between them.
    atoms = [_Atom(None, im) for im in item["images"]]
    return [*atoms, _Atom(tok.encode(item["text"]), glue=bool(atoms))]


def _interleaved_atoms(item: dict[str, Any], tok: Tokenizer) -> list[_Atom]:
    images, atoms = item["images"], []
    for seg in item["text"]:
        if seg.get("text") is not None:
            atoms.append(_Atom(tok.encode(seg["text"])))
        elif seg.get("image") is not None:
            i = seg["image"]
            if not 0 <= i < len(images):
                raise ValueError(f"interleaved sample {item.get('key')!r}: segment image {i} of {len(images)} images")
            atoms.append(_Atom(None, images[i]))
        else:
            raise ValueError(f"interleaved sample {item.get('key')!r}: segment {seg!r} has neither text nor image")
    return atoms


def _text_atoms(item: dict[str, Any], tok: Tokenizer) -> list[_Atom]:
    # Text is cut at any token boundary (concat-and-chunk, as LM pre-training does), so it can fill any gap.
    return [_Atom(tok.encode(item["text"]), split=True)]


# kind -> the document's atoms, before bos/eos; the loader's `kind` field picks the entry.
DOC_BUILDERS: dict[str, Callable[[dict[str, Any], Tokenizer], list[_Atom]]] = {
    "caption": _caption_atoms,
    "interleaved": _interleaved_atoms,
    "text": _text_atoms,
}


class _Seq:
    """A sequence being built."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.images: list[Image.Image] = []
        self.positions: list[int] = []
        self.sources: list[str] = []
        self.keys: list[str] = []
        self.spans: list[tuple[int, int]] = []

    def to_dict(self, cfg: SequenceConfig) -> dict[str, Any]:
        return {
            "input_ids": self.ids,
            "loss_mask": self.mask,
            "images": self.images,
            "image_positions": self.positions,
            "sources": self.sources,
            "keys": self.keys,
            "spans": self.spans,
            "num_padding": cfg.max_tokens - len(self.ids),
        }


class SequencePacker:
    """Packs loader items into MM1 sequences (at most max_tokens tokens, max_images images of image_tokens each).

    Every item becomes a document `bos, content, eos` with each image as image_tokens copies of image_id. A document
    is cut only where its kind allows: text anywhere between tokens; interleaved at segment boundaries (a text segment
    that could not fit one sequence is also cut between tokens); a caption pair never, unless its caption alone is
    too long. An image never straddles sequences. Nothing is dropped or truncated: each document's pieces, in the
    order the sequences are yielded, concatenate to the whole document.

    Each sequence is filled as: the rest of every document cut earlier and not finished (at most `max_open`), in
    the order they were cut; then, if it has waited `max_delay` sequences, the oldest pending document; then every
    pending document that fits whole, first-fit in arrival order over a buffer of `lookahead` documents; then, if
    fewer than max_open documents are open, the pending document whose longest piece fills the most of what is left
    (ties: one too big for a sequence, which is cut anyway; then the oldest) is cut there. So a document never goes
    out of its own order, but may be placed before documents that arrived earlier (within the buffer's span, and an
    overdue one is forced in); lookahead=1 keeps arrival order. Memory: lookahead + max_open documents.

    Yields dicts: input_ids (unpadded), loss_mask (1 on text tokens incl. bos/eos, 0 on image positions), images,
    image_positions (first position of each image's block), and per document piece, in order: sources, keys and
    spans ([start, stop) in input_ids); num_padding is what collate() adds.
    """

    def __init__(
        self,
        cfg: SequenceConfig,
        tokenizer: Tokenizer | None = None,
        *,
        lookahead: int = 32,
        max_delay: int = 8,
        max_open: int = 2,
    ) -> None:
        if cfg.max_images < 1 or cfg.image_tokens < 1:
            raise ValueError(f"max_images and image_tokens must be >= 1, got {cfg}")
        if cfg.image_tokens + 2 > cfg.max_tokens:
            # bos + image + eos (an image-only document) must fit one sequence, or it could never be placed.
            raise ValueError(f"image_tokens + 2 = {cfg.image_tokens + 2} exceeds max_tokens = {cfg.max_tokens}")
        if min(lookahead, max_delay, max_open) < 1:
            raise ValueError(
                f"lookahead, max_delay and max_open must be >= 1, got {lookahead}, {max_delay}, {max_open}"
            )
        self.cfg = cfg
        self.tok = tokenizer if tokenizer is not None else ByteTokenizer()
        self.lookahead = (
            lookahead  # pending documents to fill from (demo-like mix: 0.935 efficiency at 1, 0.988 at 32)
        )
        self.max_delay = max_delay  # sequences a document may wait before it is forced in
        self.max_open = (
            max_open  # documents cut, not yet finished (demo-like mix: 0.963 at 1, 0.988 at 2, 9% more cuts)
        )
        self._buffer: list[_Doc] = []  # the live pack()'s state, for state_dict()
        self._opened: list[_Doc] = []
        self._n = 0
        self._restored: tuple[list[_Doc], list[_Doc], int] | None = None

    def _document(self, item: dict[str, Any], born: int = 0) -> _Doc:
        """The item as a document: bos, its kind's atoms, eos; oversize unbreakable runs made splittable."""
        kind = item["kind"]
        if kind not in DOC_BUILDERS:
            raise ValueError(f"unknown sample kind {kind!r} (known: {', '.join(DOC_BUILDERS)})")
        body = [a for a in DOC_BUILDERS[kind](item, self.tok) if a.ids is None or a.ids]
        atoms = [_Atom([self.tok.bos_id]), *body, _Atom([self.tok.eos_id], glue=True)]
        if len(atoms) > 1:
            atoms[1].glue = True  # a piece is never a lone bos
        # A run of glued atoms that cannot fit an empty sequence gets token cuts in its text; the constructor's
        # check guarantees every run has text unless it is bos/image/eos, which fits.
        cfg, start = self.cfg, 0
        for end in range(1, len(atoms) + 1):
            if end == len(atoms) or not atoms[end].glue:
                run = atoms[start:end]
                if sum(self._len(a) for a in run) > cfg.max_tokens:
                    for a in run:
                        a.split = a.split or a.ids is not None
                start = end
        tokens = sum(self._len(a) for a in atoms)
        images = sum(a.ids is None for a in atoms)
        ref = [item.get("epoch"), item.get("position")]
        return _Doc(str(item.get("source", "")), str(item.get("key", "")), atoms, tokens, images, born, ref)

    def _len(self, atom: _Atom) -> int:
        return self.cfg.image_tokens if atom.ids is None else len(atom.ids)

    def _fit(self, doc: _Doc, room: int, slots: int) -> tuple[int, int, int, int] | None:
        """The longest next piece of `doc` within room tokens and slots images that ends at an allowed cut:
        (end atom, end offset, tokens, images), or None when no cut fits."""
        best, used, imgs = None, 0, 0
        for i in range(doc.atom, len(doc.atoms)):
            atom = doc.atoms[i]
            if i > doc.atom and not atom.glue:
                best = (i, 0, used, imgs)
            if atom.ids is None:
                if used + self.cfg.image_tokens > room or imgs + 1 > slots:
                    return best
                used, imgs = used + self.cfg.image_tokens, imgs + 1
                continue
            start = doc.offset if i == doc.atom else 0
            n = len(atom.ids) - start
            k = min(n, room - used)
            if atom.split and min(k, n - 1) >= 1:  # a cut strictly inside the run
                best = (i, start + min(k, n - 1), used + min(k, n - 1), imgs)
            if k < n:
                return best
            used += n
        return len(doc.atoms), 0, used, imgs

    def _place(self, seq: _Seq, doc: _Doc, cut: tuple[int, int, int, int]) -> None:
        end_atom, end_offset, tokens, images = cut
        first = len(seq.ids)
        for i in range(doc.atom, min(end_atom + 1, len(doc.atoms))):
            atom = doc.atoms[i]
            if atom.ids is None:
                if i == end_atom:
                    break
                seq.positions.append(len(seq.ids))
                seq.images.append(atom.image)
                seq.ids.extend([self.tok.image_id] * self.cfg.image_tokens)
                seq.mask.extend([0] * self.cfg.image_tokens)
                continue
            start = doc.offset if i == doc.atom else 0
            stop = end_offset if i == end_atom else len(atom.ids)
            seq.ids.extend(atom.ids[start:stop])
            seq.mask.extend([1] * (stop - start))
        seq.sources.append(doc.source)
        seq.keys.append(doc.key)
        seq.spans.append((first, len(seq.ids)))
        doc.atom, doc.offset = end_atom, end_offset
        doc.tokens -= tokens
        doc.images -= images

    def pack(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Lazily packs `samples` into sequences; see the class docstring. Starts empty, or where a state given to
        load_state_dict() left off (then `samples` must continue where that state's loader stopped)."""
        cfg, it = self.cfg, iter(samples)
        buffer, opened, self._n = self._restored or ([], [], 0)
        self._restored = None
        self._buffer = buffer  # pending documents, in arrival order
        self._opened = opened  # documents cut at the end of an earlier sequence, in the order they were cut

        def refill() -> None:
            while len(buffer) < self.lookahead:
                item = next(it, None)
                if item is None:
                    return
                buffer.append(self._document(item, self._n))

        def put(seq: _Seq, doc: _Doc) -> None:
            """Places the longest piece of doc that fits; a doc left unfinished is opened."""
            cut = self._fit(doc, cfg.max_tokens - len(seq.ids), cfg.max_images - len(seq.images))
            if cut is not None:
                self._place(seq, doc, cut)
            if doc.atom < len(doc.atoms) and doc not in opened:
                opened.append(doc)

        def room(seq: _Seq) -> tuple[int, int]:
            return cfg.max_tokens - len(seq.ids), cfg.max_images - len(seq.images)

        refill()
        while buffer or opened:
            seq = _Seq()
            for doc in list(opened):
                put(seq, doc)
                if doc.atom == len(doc.atoms):
                    opened.remove(doc)
            if len(opened) < self.max_open and buffer and self._n - buffer[0].born >= self.max_delay:
                if self._fit(buffer[0], *room(seq)) is not None:
                    put(seq, buffer.pop(0))
                    refill()
            i = 0
            while i < len(buffer):  # first-fit of whole documents; refilled ones join the scan
                tokens, images = room(seq)
                if buffer[i].tokens <= tokens and buffer[i].images <= images:
                    put(seq, buffer.pop(i))
                    refill()
                else:
                    i += 1
            if len(opened) < self.max_open and buffer:
                fits = [(self._fit(d, *room(seq)), d.tokens > cfg.max_tokens, -j) for j, d in enumerate(buffer)]
                cut, _, j = max(fits, key=lambda f: (f[0][2] if f[0] else 0, f[1], f[2]))
                if cut is not None:
                    doc = buffer.pop(-j)
                    self._place(seq, doc, cut)
                    opened.append(doc)  # it did not fit whole, so it is unfinished
                    refill()
            if not seq.ids:
                raise RuntimeError("packing made no progress (a bug: every document has a piece that fits)")
            self._n += 1  # before the yield: a state taken while the consumer holds this sequence is exact
            yield seq.to_dict(cfg)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the documents the packer holds, as their loader items' [epoch, position], and where
        each opened one was cut. Taken between two sequences of pack(); with the loader state after the last item
        pack() pulled, it resumes the exact sequence stream."""
        return {
            "version": PACKER_STATE_VERSION,
            "sequences": self._n,
            "buffer": [[*d.ref, d.born] for d in self._buffer],
            "opened": [[*d.ref, d.born, d.atom, d.offset] for d in self._opened],
        }

    def load_state_dict(self, state: dict[str, Any], fetch: Callable[[list[list[Any]]], list[dict[str, Any]]]) -> None:
        """Restore held documents for the next pack(): fetch([[epoch, position], ...]) must return those items
        (MixtureDataset.read_positions gives them)."""
        if state.get("version") != PACKER_STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')!r}, expected {PACKER_STATE_VERSION}")
        rows = state["buffer"] + state["opened"]
        items = fetch([r[:2] for r in rows]) if rows else []
        docs = [self._document(item, r[2]) for item, r in zip(items, rows)]
        buffer, opened = docs[: len(state["buffer"])], docs[len(state["buffer"]) :]
        for doc, (_, _, _, atom, offset) in zip(opened, state["opened"]):
            doc.atom, doc.offset = atom, offset
            doc.tokens = sum(self._len(a) for a in doc.atoms[atom:]) - offset
            doc.images = sum(a.ids is None for a in doc.atoms[atom:])
        self._restored = (buffer, opened, int(state["sequences"]))


def efficiency(seqs: Iterable[dict[str, Any]]) -> float:
    """Share of non-padding positions over packed sequences (their input_ids and num_padding)."""
    used = padded = 0
    for s in seqs:
        used += len(s["input_ids"])
        padded += len(s["input_ids"]) + s["num_padding"]
    return used / padded if padded else 0.0


# ------------------------------------------------------------------------------------------------------------ collate


@functools.lru_cache(maxsize=8)
def image_transform(
    image_size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's eval transform: RGB, bicubic resize of the short side, center crop, ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            lambda im: im.convert("RGB"),  # first, so palette and 1-bit images are resized bicubic too
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """The geometry of image_transform: bicubic resize of the short side to `size`, then a center crop (the same
    arithmetic as torchvision's Resize and CenterCrop, so image_transform leaves the result as it is)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        long = int(size * long / short)
        img = img.resize((size, long) if w <= h else (long, size), resample=3)  # 3 = bicubic
    w, h = img.size
    if (w, h) == (size, size):
        return img
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def rgbx_pixels(img: Image.Image) -> Any:
    """An RGB image's own pixel memory as a flat uint8 numpy array, 4 bytes a pixel (RGBX, as Pillow stores it),
    through Pillow's Arrow export: no copy. (Arrow's to_numpy would import pyarrow.compute: 0.2 s a process.)"""
    import numpy as np
    import pyarrow as pa

    values = pa.array(img).values
    return np.frombuffer(values.buffers()[1], dtype=np.uint8, count=len(values), offset=values.offset)


def _write_uint8(img: Image.Image, size: int, out: torch.Tensor) -> None:
    """out [3, size, size] uint8 <- resize_crop(img), through Pillow's Arrow export when it has one (no repack)."""
    import numpy as np

    img = resize_crop(img if img.mode == "RGB" else img.convert("RGB"), size)  # convert() would copy an RGB image
    if hasattr(img, "__arrow_c_array__"):
        pixels = rgbx_pixels(img).reshape(size, size, 4)[..., :3]
    else:
        pixels = np.asarray(img)
    out.numpy()[...] = pixels.transpose(2, 0, 1)


def collate(
    seqs: Sequence[dict[str, Any]],
    cfg: SequenceConfig,
    *,
    pad_id: int = ByteTokenizer.pad_id,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """Packed sequences -> a batch of B = len(seqs), T = max_tokens, N = max_images, S = image_size:

    input_ids [B, T] int64 (pad_id after the sequence; pass the tokenizer's), loss_mask [B, T] bool,
    attention_mask [B, T] bool (False on padding), document_ids [B, T] int64 (index of the document piece, -1 on
    padding: for block-diagonal attention), images [B, N, 3, S, S] float32 (zeros where none), image_positions
    [B, N] int64 (-1 where none), num_images [B] int64. Use functools.partial for a DataLoader collate_fn.
    normalize=False gives images as uint8 pixels (resize and crop only; 4x fewer bytes to move, normalise on the
    accelerator).
    """
    import torch

    B, T, N, S = len(seqs), cfg.max_tokens, cfg.max_images, cfg.image_size
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros((B, T), dtype=torch.bool),
        "attention_mask": torch.zeros((B, T), dtype=torch.bool),
        "document_ids": torch.full((B, T), -1, dtype=torch.long),
        "images": torch.zeros((B, N, 3, S, S), dtype=torch.float32 if normalize else torch.uint8),
        "image_positions": torch.full((B, N), -1, dtype=torch.long),
        "num_images": torch.zeros(B, dtype=torch.long),
    }
    transform = image_transform(S, tuple(mean), tuple(std))
    for b, s in enumerate(seqs):
        n, k = len(s["input_ids"]), len(s["images"])
        if n > T or k > N:
            raise ValueError(f"sequence {b} has {n} tokens and {k} images; the caps are {T} and {N}")
        out["input_ids"][b, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
        out["loss_mask"][b, :n] = torch.tensor(s["loss_mask"], dtype=torch.bool)
        out["attention_mask"][b, :n] = True
        for d, (start, stop) in enumerate(s["spans"]):
            out["document_ids"][b, start:stop] = d
        for j, im in enumerate(s["images"]):
            if normalize:
                out["images"][b, j] = transform(im)
            else:
                _write_uint8(im, S, out["images"][b, j])
        out["image_positions"][b, :k] = torch.tensor(s["image_positions"], dtype=torch.long)
        out["num_images"][b] = k
    return out
