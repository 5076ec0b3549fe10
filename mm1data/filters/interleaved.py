"""Filters of interleaved image-text documents (OBELICS, Laurençon et al. 2023) at three levels.

A document is n positions, each a paragraph (texts[i]) or an image (images[i]); seg_reason[i] == "" while position i
is kept. Filters only annotate, all positions of a batch at once:
- image filters (img_*) score every kept image position of every kept document; batch[name] is a list of n floats per
  document (NaN where not scored), and a failing position gets seg_reason[i] = name;
- paragraph filters (para_*) do the same over kept text positions;
- document filters (doc_*) score each kept document's kept paragraphs joined with "\\n\\n" (and doc_images its kept
  images); a failing document gets drop_reason = name.
Documents already dropped are not scored (lists of NaN / NaN), nor are positions removed by an earlier filter, and NaN
passes every threshold.

Measures are OBELICS' (obelics/processors/web_document_filtering.py, huggingface/OBELICS 0fca7ba), computed with
numpy over the whole batch (each measure once per batch, shared by the filters that read it). Where this differs:
- words: OBELICS splits at " ", "\\n", "\\t" after mapping its list of unicode spaces to " "; here at every whitespace
  character (\\s: also "\\r", "\\f", "\\v", "\\x1c"-"\\x1f", "\\x85"), so "a\\rb" is two words (one in OBELICS);
- OBELICS' special characters include the `emoji` package's emoji (emoji < 2, UNICODE_EMOJI["en"]); here the code
  points with Unicode's Emoji property (the `regex` module's \\p{Emoji}); only single code points ever matched there;
- character 10-grams and word 5-grams are compared by 40 bits of a 64-bit hash (a collision inside one text would
  merge two n-grams; odds ~ grams^2 / 2^41: 5e-5 for a 10,000-character text, and it moves the ratio by about
  1 / grams); at most 2^24 texts in a batch;
- OBELICS splits a text node at "\\n\\n" into paragraphs and filters those; here a text position is the paragraph;
- a paragraph (or document) with no words scores 0 on the word shares, as OBELICS; a share is never NaN.
The text measures are OBELICS' own, not gopher.py's (spaCy tokens, Gopher's 8 stop words): OBELICS' thresholds
(stop-word share >= 0.3 with its 301 stop words, ...) only mean what they meant with its word definition.
"""

from __future__ import annotations

import itertools
import operator
import re
import string
import weakref
from functools import cache, cached_property
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from mm1data.filters.base import Filter, FilterConfig
from mm1data.filters.c4 import load_words
from mm1data.filters.gopher import as_text
from mm1data.registry import register_filter
from mm1data.stage import Batch

# OBELICS' standardize_whitespace: these become " " before any text measure
OBELICS_SPACES = " \u2009\u200a\u202f\u2005\u3000\u2002 \u2008\u2003\ufffc\x84\xa0"
_SPACES = str.maketrans(dict.fromkeys(OBELICS_SPACES, " "))
_SPACES_RE = re.compile(
    f"[{''.join(sorted(set(OBELICS_SPACES) - {' '}))}]"
)  # all but " ": a text without any needs no translate (slow)
# OBELICS' SPECIAL_CHARACTERS (obelics/utils/filtering_utils.py): ASCII punctuation, digits, whitespace, these, emoji
OBELICS_OTHER_SPECIAL = (
    "\x92\u2009\x93\x97\u200a\x9d\x99\u202f\x96\u2005\x95\x91\x9c\u3000\u2002 \u2008\x98\x81\u2003\x82\ufffc\x83\x84"
    "\u2019\u201c\u201d\u2013\u30fc\u4e00\u25ac\u2026\u2726\ufffd\xad\xa3\u200b\u2022\u20ac\xab\xbb\xb0\xb7\u2550\xd7"
    "\u58eb\uff3e\u02d8\u21d3\u2193\u2191\u2190\u2192\uff08\uff09\xa7\u2033\u2032\xb4\xbf\u2212\xb1\u2208\ufeff\xa2"
    "\xf8\u201a\u201e\xbd\xbc\xbe\xb9\xb2\xb3\u2015\u2043\uff0c\u02cc\xb8\u2039\u203a\u02ba\u02c8\u02bb\xa6\u2010"
    "\u2800\u2030\x85\u2011\u2264\u2265\u2016\u25c6\u25cf\u25a0\u25ba\u25bc\u25b2\u25b4\u2206\u25bb\xa1\u2605\u2606"
    "\u2731\u02d0\xba\u3002\xaf\u02dc\xa5\u026a\u2248\u2020\u4e0a\u30f3\uff1a\u223c\u2044\u30fb\u2661\u2713\u2295"
    "\u2024\uff0e\u22c5\xf7\uff11\u201f\uff1b\u060c\u3001\xa8\u093e\u09be\u0940\u094d\u0947\u25e6\u02da\u309c\u02bc"
    "\u2256\xa4\u30c3\u30c4\u30b7\u2103\u221a\uff01\u3010\u3011\u203f\u221e\u27a4\uff5e\u03c0\u0647\u06e9\u261b\u20a8"
    "\u27a9\u263b\u0e51\u066a\u2665\u0131\u097d\u300a\u2018\xa9\ufd3f\u066c\uff1f\u25b7\u0413\u266b\u221f\u2122\xaa"
    "\u20aa\xae\u300c\u2014\u2756\u300d\ufd3e\u300b"
)
PUNCTUATION = ",;:?!."  # OBELICS' PUNCTUATION
URL_WORDS = ("logo", "button", "icon", "plugin", "widget")  # OBELICS paper; its code adds porn, xxx, sex
IMAGE_FORMATS = ("jpg", "jpeg", "png", "webp")
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multipliers of the character n-gram hash
_MIX_MUL = np.uint64(0xBF58476D1CE4E5B9)


@cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per code point: OBELICS special character?, [\\w'] (a punctuation-split word character)?, punctuation?,
    whitespace (str.split's)?"""
    import regex  # Unicode properties (\p{Emoji})

    everything = "".join(map(chr, range(0x110000)))
    special = np.zeros(0x110000, dtype=bool)
    for c in string.punctuation + string.digits + string.whitespace + OBELICS_OTHER_SPECIAL:
        special[ord(c)] = True
    special[[m.start() for m in regex.finditer(r"\p{Emoji}", everything)]] = True
    wordchar = np.zeros(0x110000, dtype=bool)
    wordchar[[m.start() for m in re.finditer(r"[\w']", everything)]] = True
    punct = np.zeros(0x110000, dtype=bool)
    punct[[ord(c) for c in PUNCTUATION]] = True
    space = np.zeros(0x110000, dtype=bool)
    space[[m.start() for m in re.finditer(r"\s", everything)]] = True
    return special, wordchar, punct, space


def _codes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code points of all texts end to end, row of each code point, characters per row)."""
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return codes, np.repeat(np.arange(len(texts)), lengths), lengths


def _ngram_keys(seq: np.ndarray, row: np.ndarray, end: np.ndarray, n: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-grams of `seq` (integers, each with its row and its row's end) that stay inside their row, as sorted keys
    (row, top 40 bits of a 64-bit hash): equal n-grams of a row are neighbours, rows in order. And n-grams per row.

    Two different n-grams of one row share a key with odds ~ grams^2 / 2^41 (5e-5 for 10,000 of them), which moves
    a ratio by about 1 / grams; at most 2^24 rows.
    """
    if rows >= 1 << 24:  # the row takes the key's top 24 bits
        raise ValueError(f"{rows} texts in one batch: at most {1 << 24} (use smaller batches)")
    m = len(seq) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(rows)
    with np.errstate(over="ignore"):
        # h[k] = sum_j seq[k + j] * MUL^(n - 1 - j) (mod 2^64), built by doubling: the hash of a 2g-gram is the
        # g-gram's times MUL^g plus the next g-gram's, so n = 10 takes 4 combinations instead of 9
        power = {1: (seq.astype(np.uint64), _HASH_MUL)}  # length -> (hashes of all n-grams of that length, MUL^len)
        g = 1
        while 2 * g <= n:
            hg, mg = power[g]
            power[2 * g] = (hg[: len(hg) - g] * mg + hg[g:], mg * mg)
            g *= 2
        h, done = None, 0
        for g in sorted(power, reverse=True):
            if done + g <= n:
                hg, mg = power[g]
                h = hg[done : done + m].copy() if h is None else h * mg + hg[done : done + m]
                done += g
        h ^= h >> np.uint64(29)  # splitmix64's finalizer: every element reaches the top bits
        h *= _MIX_MUL
        h ^= h >> np.uint64(32)
    valid = np.arange(m) + n <= end[:m]
    grow = row[:m][valid]
    key = np.sort((grow.astype(np.uint64) << np.uint64(40)) | (h[valid] >> np.uint64(24)))
    return key, np.bincount(grow, minlength=rows).astype(np.float64)


def _share(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (OBELICS returns 0 for a text without words or n-grams)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(num.shape), where=den != 0)


def _word_repetition(tok: np.ndarray, row: np.ndarray, words: np.ndarray, n: int) -> np.ndarray:
    """compute_word_repetition_ratio: word n-grams that occur more than once (every occurrence counted) over all word
    n-grams of the text (n-grams compared by hash). tok: word ids in text order, row: each word's row (ascending),
    words: words per row."""
    ends = np.cumsum(words).astype(np.int64)
    key, grams = _ngram_keys(tok, row, ends[row] if len(row) else row, n, len(words))
    same = np.flatnonzero(key[1:] == key[:-1])
    if not len(same):
        return np.zeros(len(words))
    key_row = (key[same] >> np.uint64(40)).astype(np.int64)
    runs = np.concatenate([[True], same[1:] != same[:-1] + 1])  # one per repeated n-gram
    # occurrences of repeated n-grams: per repeated n-gram, its count = (equal neighbours) + 1
    repeated = np.bincount(key_row, minlength=len(words)) + np.bincount(key_row[runs], minlength=len(words))
    return _share(repeated, grams)


def _punctuation_share(marks: np.ndarray, tokens: np.ndarray, min_tokens: int) -> np.ndarray:
    """compute_punctuation_ratio: the share of marks among the tokens, 1 when there are fewer than min_tokens of them
    (when min_tokens > 0), 0 without any."""
    out = _share(marks, tokens)
    if min_tokens > 0:
        out[(tokens > 0) & (tokens < min_tokens)] = 1.0
    return out


class ObelicsText:
    """OBELICS' text measures of a list of texts (paragraphs or documents), each computed once, on first use."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = [t.translate(_SPACES) if _SPACES_RE.search(t) else t for t in texts]
        self.n = len(texts)

    def _per_row(self, row: np.ndarray, weights: Any = None) -> np.ndarray:
        return np.bincount(row, weights=weights, minlength=self.n).astype(np.float64)

    @cached_property
    def _chars(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _codes(self.texts)

    @cached_property
    def _words(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(vocabulary, word ids, row of each word): OBELICS' get_words_from_text (lowercase, special characters
        stripped from both ends of each whitespace-separated run, empty runs dropped).

        Found with numpy over the code points of all texts (lowercased, each ended by "\\n"): a word runs from the
        first to the last character of a run that is neither whitespace nor special; only the words are sliced out.
        """
        special, _, _, space = _tables()
        lower = [t.lower() for t in self.texts]  # may change lengths ("İ" is 2 characters lowercased)
        big = "".join(t + "\n" for t in lower)
        codes = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        breaks = np.cumsum(np.fromiter(map(len, lower), dtype=np.int64, count=self.n) + 1) - 1  # closing "\n"s
        ws = np.concatenate([[True], space[codes], [True]])
        starts = np.flatnonzero(~ws[1:-1] & ws[:-2])  # the whitespace-separated runs: str.split's pieces
        ends = np.flatnonzero(~ws[1:-1] & ws[2:]) + 1
        core = np.flatnonzero(~(special[codes] | ws[1:-1]))  # neither whitespace nor special
        at = np.searchsorted(core, starts)
        first = core[np.minimum(at, len(core) - 1)] if len(core) else starts
        last = core[np.maximum(np.searchsorted(core, ends) - 1, 0)] + 1 if len(core) else ends
        has = (at < len(core)) & (first < ends)  # a run of special characters only is no word
        pieces = big.split()
        for i in np.flatnonzero(has & ((first != starts) | (last != ends))).tolist():
            pieces[i] = big[first[i] : last[i]]  # special characters stripped from the ends
        tok, vocab = pd.factorize(np.array(pieces, dtype=object)[has]) if len(pieces) else (np.zeros(0, int), [])
        return list(vocab), tok.astype(np.int64), np.searchsorted(breaks, starts[has])

    @cached_property
    def words(self) -> np.ndarray:
        return self._per_row(self._words[2])

    def word_hits(self, words: frozenset[str]) -> np.ndarray:
        """How many of each row's words are in `words`."""
        vocab, tok, row = self._words
        return self._per_row(row, np.fromiter((w in words for w in vocab), dtype=bool, count=len(vocab))[tok])

    def word_share(self, words: frozenset[str]) -> np.ndarray:
        """Share of the words that are in `words` (compute_stopword_ratio, _flagged_word_ratio, spam_word_ratio)."""
        return _share(self.word_hits(words), self.words)

    def word_repetition(self, n: int) -> np.ndarray:
        _, tok, row = self._words
        return _word_repetition(tok, row, self.words, n)

    def char_repetition(self, n: int) -> np.ndarray:
        """compute_character_repetition_ratio: over the text's character n-grams, counted once each, the counts of
        the floor(sqrt(distinct)) most frequent ones (fewer if fewer repeat) over all n-grams."""
        codes, row, lengths = self._chars
        key, grams = _ngram_keys(codes, row, np.cumsum(lengths)[row] if len(row) else row, n, self.n)
        same = np.flatnonzero(key[1:] == key[:-1])  # i: key[i + 1] repeats key[i] (never across rows)
        key_row = (key[same] >> np.uint64(40)).astype(np.int64)
        distinct = grams - np.bincount(key_row, minlength=self.n)
        # each repeated n-gram: a run of consecutive `same` indices; its count is the run's length + 1
        first = np.concatenate([[True], same[1:] != same[:-1] + 1]) if len(same) else np.zeros(0, dtype=bool)
        group = np.cumsum(first) - 1
        rep_count = np.bincount(group) + 1 if len(same) else np.zeros(0, dtype=np.int64)
        rep_row = key_row[first]
        top = np.minimum(np.floor(np.sqrt(distinct)), np.bincount(rep_row, minlength=self.n))
        # the most frequent `top` of each row's repeated n-grams
        order = np.lexsort((-rep_count, rep_row))
        sorted_row = rep_row[order]
        per_row = np.bincount(sorted_row, minlength=self.n)
        rank = np.arange(len(order)) - (np.cumsum(per_row) - per_row)[sorted_row]
        keep = rank < top[sorted_row]
        return _share(self._per_row(sorted_row[keep], rep_count[order][keep]), grams)

    @cached_property
    def lengths(self) -> np.ndarray:
        return self._chars[2].astype(np.float64)

    @cached_property
    def specials(self) -> np.ndarray:
        codes, row, _ = self._chars
        return self._per_row(row, _tables()[0][codes])

    def special_share(self) -> np.ndarray:
        """compute_special_character_ratio: OBELICS special characters over all characters."""
        return _share(self.specials, self.lengths)

    @cached_property
    def punctuation(self) -> tuple[np.ndarray, np.ndarray]:
        """(punctuation marks, tokens): the text split into [\\w']+ runs and single , ; : ? ! . marks."""
        codes, row, _ = self._chars
        _, wordchar, punct = _tables()[:3]
        w = wordchar[codes]
        starts = w.copy()
        starts[1:] &= ~w[:-1] | (row[1:] != row[:-1])
        marks = self._per_row(row, punct[codes])
        return marks, self._per_row(row, starts) + marks

    def punctuation_share(self, min_tokens: int) -> np.ndarray:
        return _punctuation_share(*self.punctuation, min_tokens)

    def lang(self, rows: np.ndarray, scorer: Any, languages: set[str]) -> np.ndarray:
        """compute_lang_id_pred_score: fasttext's top-1 probability on the lowercased text if the top-1 language is
        allowed, else 0 (OBELICS fails a text whose top-1 is not English or scores under the cutoff)."""
        labels, probs = scorer.predict([self.texts[i].lower() for i in rows], k=1)
        return np.array([p[0] if lab and lab[0] in languages else 0.0 for lab, p in zip(labels, probs)])


# ---- positions: a batch's kept positions, flattened ----


class DocText:
    """OBELICS' measures of documents, each its kept paragraphs joined with "\\n\\n" (empty ones skipped, as
    OBELICS' full_text). Words never span "\\n\\n", so word counts and shares, special characters (plus the 2 of
    each join) and punctuation are sums of the paragraphs' measures; n-gram repetition and language id are measured
    on the document (word n-grams on the paragraphs' word ids end to end, characters and language on the joined text).

    para: the paragraphs' measures; rows: the kept paragraphs' rows in it, ascending; doc: each one's document
    (0..docs-1, ascending).
    """

    def __init__(self, para: ObelicsText, rows: np.ndarray, doc: np.ndarray, docs: int) -> None:
        self.para, self.rows, self.doc, self.n = para, rows, doc, docs

    def _sum(self, per_paragraph: np.ndarray) -> np.ndarray:
        return np.bincount(self.doc, weights=per_paragraph[self.rows], minlength=self.n)

    @cached_property
    def words(self) -> np.ndarray:
        return self._sum(self.para.words)

    def word_share(self, words: frozenset[str]) -> np.ndarray:
        return _share(self._sum(self.para.word_hits(words)), self.words)

    def word_repetition(self, n: int) -> np.ndarray:
        _, tok, row = self.para._words
        doc_of = np.full(self.para.n, -1, dtype=np.int64)
        doc_of[self.rows] = self.doc
        kept = doc_of[row] >= 0
        return _word_repetition(tok[kept], doc_of[row[kept]], self.words, n)

    @cached_property
    def _joins(self) -> np.ndarray:  # characters the "\\n\\n" joins add per document
        nonempty = np.bincount(self.doc, weights=self.para.lengths[self.rows] > 0, minlength=self.n)
        return 2 * np.maximum(nonempty - 1, 0)

    def special_share(self) -> np.ndarray:
        return _share(self._sum(self.para.specials) + self._joins, self._sum(self.para.lengths) + self._joins)

    def punctuation_share(self, min_tokens: int) -> np.ndarray:
        marks, tokens = self.para.punctuation
        return _punctuation_share(self._sum(marks), self._sum(tokens), min_tokens)

    @cached_property
    def joined(self) -> ObelicsText:
        texts = self.para.texts
        parts: list[list[str]] = [[] for _ in range(self.n)]
        for r, d in zip(self.rows.tolist(), self.doc.tolist()):
            if texts[r]:
                parts[d].append(texts[r])
        return ObelicsText(["\n\n".join(p) for p in parts])

    def char_repetition(self, n: int) -> np.ndarray:
        return self.joined.char_repetition(n)

    def lang(self, rows: np.ndarray, scorer: Any, languages: set[str]) -> np.ndarray:
        return self.joined.lang(rows, scorer, languages)


def _seq(value: Any) -> Any:
    """A document's per-position list (a list or an array); a missing one (None) as no positions."""
    return () if value is None else value


class Positions:
    """The positions of a batch's kept documents end to end, and which of them a position filter scores: those with
    a value in `column` (not None) and seg_reason "" (not removed yet)."""

    def __init__(self, batch: Batch, column: str) -> None:
        self.rows = len(batch["drop_reason"])
        self.alive = np.flatnonzero(batch["drop_reason"] == "")
        values, seg = batch[column], batch["seg_reason"]
        self.lengths = np.fromiter((len(_seq(values[d])) for d in self.alive), dtype=np.int64, count=len(self.alive))
        total = int(self.lengths.sum())
        flat_values = itertools.chain.from_iterable(_seq(values[d]) for d in self.alive)
        present = np.fromiter(map(operator.is_not, flat_values, itertools.repeat(None)), dtype=bool, count=total)
        flat_seg = itertools.chain.from_iterable(_seq(seg[d]) for d in self.alive)
        kept = np.fromiter(map("".__eq__, flat_seg), dtype=bool, count=total)
        self.flat = np.flatnonzero(present & kept)  # the scored positions, in the flattened layout
        self.doc = np.repeat(self.alive, self.lengths)[self.flat]  # the batch row of each
        self.at = self.flat - np.repeat(np.cumsum(self.lengths) - self.lengths, self.lengths)[self.flat]

    def gather(self, batch: Batch, column: str) -> list[Any]:
        """The values of `column` at the scored positions."""
        col = batch[column]
        return [col[d][i] for d, i in zip(self.doc.tolist(), self.at.tolist())]

    def numbers(self, batch: Batch, column: str) -> np.ndarray:
        return np.array(self.gather(batch, column), dtype=np.float64).reshape(-1)

    def annotate(self, batch: Batch, name: str, scores: np.ndarray, lo: float, hi: float) -> Batch:
        """batch[name] = per-document lists of scores (NaN where not scored); failing positions get seg_reason."""
        full = np.full(int(self.lengths.sum()), np.nan)
        full[self.flat] = scores
        out = np.empty(self.rows, dtype=object)
        lengths = [len(_seq(s)) for s in batch["seg_reason"]]
        for d in range(self.rows):
            out[d] = [float("nan")] * lengths[d]
        for d, part in zip(self.alive, np.split(full, np.cumsum(self.lengths)[:-1])):
            out[d] = part.tolist()
        batch[name] = out
        failed = (scores < lo) | (scores > hi)
        if failed.any():
            seg = np.empty(self.rows, dtype=object)
            seg[:] = list(batch["seg_reason"])
            for d in np.unique(self.doc[failed]).tolist():
                seg[d] = list(seg[d])
            for d, i in zip(self.doc[failed].tolist(), self.at[failed].tolist()):
                seg[d][i] = name
            batch["seg_reason"] = seg
        return batch


class ImageFilter(Filter):
    """Scores each kept image position (images[i] not None, seg_reason[i] == "") of each kept document."""

    scalar = False

    def __call__(self, batch: Batch) -> Batch:
        pos = Positions(batch, "images")
        scores = np.asarray(self.score_images(batch, pos), dtype=np.float64).reshape(-1)
        return pos.annotate(batch, self.name, scores, self.min, self.max)

    def score_images(self, batch: Batch, pos: Positions) -> np.ndarray:
        raise NotImplementedError


def _sizes(batch: Batch, pos: Positions) -> tuple[np.ndarray, np.ndarray]:
    """Original width and height of each scored image, NaN where not known yet (0)."""
    w, h = pos.numbers(batch, "image_orig_width"), pos.numbers(batch, "image_orig_height")
    missing = (w <= 0) | (h <= 0)
    w[missing], h[missing] = np.nan, np.nan
    return w, h


@register_filter("img_format")
class ImageFormatFilter(ImageFilter):
    """1 if the image's original format is one of `formats` (OBELICS: jpg, jpeg, png, webp), else 0; NaN without a
    format. Keep with min: 1."""

    params = {"formats": list(IMAGE_FORMATS)}

    def score_images(self, batch: Batch, pos: Positions) -> np.ndarray:
        allowed = {str(f).lower() for f in self.p["formats"]}
        return np.array(
            [np.nan if not f else float(str(f).lower() in allowed) for f in pos.gather(batch, "image_format")]
        )


@register_filter("img_min_side")
class ImageMinSideFilter(ImageFilter):
    """Shorter side of the original image in px (OBELICS: width and height >= 150)."""

    def score_images(self, batch: Batch, pos: Positions) -> np.ndarray:
        return np.fmin(*_sizes(batch, pos))


@register_filter("img_max_side")
class ImageMaxSideFilter(ImageFilter):
    """Longer side of the original image in px (OBELICS: width and height <= 20,000)."""

    def score_images(self, batch: Batch, pos: Positions) -> np.ndarray:
        return np.fmax(*_sizes(batch, pos))


@register_filter("img_aspect")
class ImageAspectFilter(ImageFilter):
    """Original width over height (OBELICS: 1/2 to 2)."""

    def score_images(self, batch: Batch, pos: Positions) -> np.ndarray:
        w, h = _sizes(batch, pos)
        return w / h


@register_filter("img_url_words")
class ImageUrlWordsFilter(ImageFilter):
    """How many of `words` occur in the image URL, lowercased (OBELICS drops URLs containing any; keep with max: 0).
    OBELICS matches the URL as written (a URL with "Logo" passes there)."""

    params = {"words": list(URL_WORDS)}

    def score_images(self, batch: Batch, pos: Positions) -> np.ndarray:
        words = [str(w).lower() for w in self.p["words"]]
        return np.array([sum(w in str(u).lower() for w in words) for u in pos.gather(batch, "images")], dtype=float)


# ---- paragraphs and documents ----


class _Cache:
    """The ObelicsText of a batch's texts column, built once and shared by every filter of a chain; keyed by the
    column array's identity (held weakly, as gopher.ColumnCache) and by what it was built from."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any, ObelicsText]] = {}

    def get(self, column: Any, fits: Any, build: Any) -> tuple[Any, ObelicsText]:
        """(what it was built from, the ObelicsText) for `column`: the stored entry if fits(stored), else build()."""
        entry = self._entries.get(id(column))
        if entry is not None and entry[0]() is column and fits(entry[1]):
            return entry[1], entry[2]
        stored, text = build()
        try:
            self._entries[id(column)] = (weakref.ref(column, self._forget), stored, text)
        except TypeError:  # a plain list takes no weak reference: computed, not shared
            pass
        return stored, text

    def _forget(self, ref: weakref.ref) -> None:
        for k, (r, _, _) in list(self._entries.items()):
            if r is ref:
                del self._entries[k]


_PARAGRAPHS = _Cache()


class ParagraphFilter(Filter):
    """Scores each kept text position (texts[i] not None, seg_reason[i] == "") of each kept document.

    Every text position of the kept documents is measured once per batch (shared by the chain's paragraph filters);
    a filter reads the measures of the positions still kept.
    """

    scalar = False

    def __call__(self, batch: Batch) -> Batch:
        pos = Positions(batch, "texts")
        offsets, text = self._measured(batch, pos)
        rows = offsets[pos.doc] + pos.at
        scores = np.asarray(self.measure(text, rows), dtype=np.float64).reshape(-1)
        return pos.annotate(batch, self.name, scores, self.min, self.max)

    @staticmethod
    def _measured(batch: Batch, pos: Positions) -> tuple[np.ndarray, ObelicsText]:
        texts = batch["texts"]

        def build() -> tuple[np.ndarray, ObelicsText]:
            offsets = np.full(pos.rows, -1, dtype=np.int64)
            offsets[pos.alive] = np.cumsum(pos.lengths) - pos.lengths
            flat = itertools.chain.from_iterable(_seq(texts[d]) for d in pos.alive)
            return offsets, ObelicsText([as_text(t) for t in flat])

        def covers(offsets: np.ndarray) -> bool:  # every kept document measured (documents are only ever dropped)
            return bool((offsets[pos.alive] >= 0).all())

        return _PARAGRAPHS.get(texts, covers, build)

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        """Scores of text's rows `rows`."""
        raise NotImplementedError


class DocumentFilter(Filter):
    """Scores each kept document's kept paragraphs joined with "\\n\\n" (OBELICS' full_text: empty ones skipped)."""

    def score(self, batch: Batch) -> np.ndarray:
        pos = Positions(batch, "texts")
        offsets, para = ParagraphFilter._measured(batch, pos)
        text = DocText(para, offsets[pos.doc] + pos.at, np.searchsorted(pos.alive, pos.doc), len(pos.alive))
        out = np.full(pos.rows, np.nan)
        out[pos.alive] = self.measure(text, np.arange(len(pos.alive)))
        return out

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


# Each measure once, registered at both levels (para_X, doc_X) with the same definition.


class _Words:
    """Words: OBELICS' get_words_from_text (lowercase, whitespace-separated, special characters stripped from the
    ends, empty ones dropped)."""

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        return text.words[rows]


class _CharRepetition:
    """Character repetition ratio over character n-grams (OBELICS: n = 10): the counts of the floor(sqrt(distinct))
    most frequent n-grams (only repeated ones) over all n-grams; 0 without n-grams."""

    params: ClassVar[dict[str, Any]] = {"n": 10}

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        return text.char_repetition(int(self.p["n"]))[rows]  # type: ignore[attr-defined]


class _WordRepetition:
    """Word repetition ratio over word n-grams (OBELICS: n = 5): occurrences of n-grams seen more than once over
    all n-grams; 0 without n-grams."""

    params: ClassVar[dict[str, Any]] = {"n": 5}

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        return text.word_repetition(int(self.p["n"]))[rows]  # type: ignore[attr-defined]


class _Special:
    """Share of characters that are OBELICS special characters (ASCII punctuation, digits, whitespace, its list of
    other symbols, emoji); 0 on empty text."""

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        return text.special_share()[rows]


class _WordList:
    """Share of the words in a word list (words_file: one per line; default: OBELICS' list, data/<default>)."""

    default: ClassVar[str]
    params: ClassVar[dict[str, Any]] = {"words_file": None}

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)  # type: ignore[call-arg]
        self.words = frozenset(load_words(self.p["words_file"], default=self.default))  # type: ignore[attr-defined]

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        return text.word_share(self.words)[rows]


class _StopWords(_WordList):
    """Share of the words that are stop words (OBELICS' 301, data/obelics_stopwords_en.txt)."""

    default = "obelics_stopwords_en.txt"


class _FlaggedWords(_WordList):
    """Share of the words that are flagged (adult) words (OBELICS' 67, data/obelics_flagged_en.txt)."""

    default = "obelics_flagged_en.txt"


class _SpamWords(_WordList):
    """Share of the words that are spam words (OBELICS' 40: social media, sharing, cookies, ...,
    data/obelics_spam_en.txt). OBELICS keeps a paragraph when the share is < 0.12; here max 0.12 keeps 0.12 too."""

    default = "obelics_spam_en.txt"


class _Punctuation:
    """Share of punctuation marks (, ; : ? ! .) among the text's [\\w']+ runs and marks; 0 without either, and 1
    when there are fewer than min_tokens of them (OBELICS paragraphs: 12, documents: no minimum, 0)."""

    params: ClassVar[dict[str, Any]] = {"min_tokens": 0}

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        return text.punctuation_share(int(self.p["min_tokens"]))[rows]  # type: ignore[attr-defined]


class _Lang:
    """fasttext lid.176's top-1 probability on the lowercased text if its top-1 language is one of `languages`,
    else 0 (OBELICS: top-1 English with probability >= 0.8). Only the scored texts are predicted."""

    params: ClassVar[dict[str, Any]] = {"languages": ["en"], "model": None}

    def __init__(self, cfg: FilterConfig) -> None:
        from mm1data.scorers.lang import LangScorer

        super().__init__(cfg)  # type: ignore[call-arg]
        self.languages = set(self.p["languages"])  # type: ignore[attr-defined]
        self.scorer = LangScorer(self.p["model"])  # type: ignore[attr-defined]

    def measure(self, text: Any, rows: np.ndarray) -> np.ndarray:
        return text.lang(rows, self.scorer, self.languages)


_MEASURES: dict[str, type] = {
    "words": _Words,
    "char_rep": _CharRepetition,
    "word_rep": _WordRepetition,
    "special": _Special,
    "stop_words": _StopWords,
    "flagged_words": _FlaggedWords,
    "spam_words": _SpamWords,
    "punct": _Punctuation,
    "lang": _Lang,
}


def _register(prefix: str, base: type, what: str) -> None:
    for suffix, mixin in _MEASURES.items():
        cls = type(
            f"{prefix.title()}{mixin.__name__.strip('_')}Filter",
            (mixin, base),
            {
                "__doc__": f"{mixin.__doc__} Per {what}.",
                "__module__": __name__,
                "params": dict(getattr(mixin, "params", {})),
            },
        )
        globals()[cls.__name__] = register_filter(f"{prefix}_{suffix}")(cls)


_register("para", ParagraphFilter, "paragraph (text position)")
_register("doc", DocumentFilter, "document (kept paragraphs joined with a blank line)")


@register_filter("doc_images")
class DocImagesFilter(Filter):
    """Kept images of the document: positions with an image URL and seg_reason "" (OBELICS: 1 to 30).

    Late: the runner applies it after every scorer stage, since those remove images too (the CLIP relevance stage).
    """

    late = True

    def score(self, batch: Batch) -> np.ndarray:
        images, seg = batch["images"], batch["seg_reason"]
        alive = batch["drop_reason"] == ""
        return np.array(
            [
                sum(u is not None and s == "" for u, s in zip(_seq(images[d]), _seq(seg[d]))) if alive[d] else np.nan
                for d in range(len(alive))
            ],
            dtype=np.float64,
        )
