"""Gopher quality and repetition rules (Rae et al. 2021, MassiveText) as annotate-only document filters."""

from __future__ import annotations

import itertools
import re
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import pandas as pd

from mm1data.filters import english
from mm1data.filters.base import Filter, FilterConfig
from mm1data.registry import register_filter
from mm1data.stage import Batch

# Conventions shared by the text filters (this module and c4.py):
# - a line is the text between two "\n" (so "\r\n" works: "\r" is stripped); blank lines are not lines;
# - a count is 0 on empty text; a share is NaN exactly when its denominator is 0 (no lines, no words, empty text),
#   and NaN passes every threshold, so an empty document is dropped by the count rules (gopher_words, c4_sentences);
# - None, NaN or a missing value in the column reads as "", bytes as UTF-8 with replacement characters.
# - tokens and sentences are datatrove's for English, spaCy's blank("en") tokenizer and sentencizer (english.py).


def as_text(value: Any) -> str:
    """One cell of a text column as str."""
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def ratio(num: Any, den: Any) -> np.ndarray:
    """num / den per row, NaN where den is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    return np.divide(num, den, out=out, where=den != 0)


R = TypeVar("R")


class ColumnCache(Generic[R]):
    """An analysis of a batch's text column, built once and shared by every filter that reads that column.

    Keyed by the column array's identity, held weakly: filters never edit text, so while the array lives its texts
    are the same, and the entry goes away with the array (nothing outlives its batch).
    """

    def __init__(self, build: Callable[[list[str]], R]) -> None:
        self.build = build
        self._entries: dict[int, tuple[weakref.ref, R]] = {}

    def get(self, column: Any) -> R:
        entry = self._entries.get(id(column))
        if entry is not None and entry[0]() is column:
            return entry[1]
        value = self.build([as_text(v) for v in column])
        try:
            ref = weakref.ref(column, self._forget)
        except TypeError:  # a plain list takes no weak reference: computed, not shared
            return value
        self._entries[id(column)] = (ref, value)
        return value

    def _forget(self, ref: weakref.ref) -> None:
        for key, (r, _) in list(self._entries.items()):
            if r is ref:
                del self._entries[key]


def line_count(text: str) -> int:
    return len(_NONBLANK_LINE.findall(text))


# Zero-width patterns: findall returns one shared "" per match, so counting lines costs 8 bytes a line.
_NONBLANK_LINE = re.compile(r"(?m)^(?=[^\S\n]*\S)")
_ELLIPSIS_LINE = re.compile(r"(?m)(?=(?:\.\.\.|…)[^\S\n]*$)")
# Words are datatrove's: spaCy's English tokens (mm1data/filters/english.py), whitespace dropped. A URL, an e-mail
# address or "--option" is one token, "don't" is "do" + "n't", "(see" is "(" + "see". Punctuation tokens are tokens
# (they count in gopher_alpha_words' denominator and in n-grams) but not words.
_SPACE = re.compile(r"\s")
_WORD = re.compile(r"[^\W_]")  # a word holds a letter or a digit; a token of only punctuation or symbols is no word
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")  # datatrove: \n{2,}; here blank lines may hold spaces
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher, appendix A
BULLETS = ("•", "‣", "◦", "⁃", "▪", "●", "-", "*")  # datatrove: • and -; plus other bullet glyphs and markdown's *
CHUNK = 1 << 18  # characters tokenized at a time: bounds the list of token strings on a huge document


def _chunks(text: str) -> Iterator[str]:
    """Pieces of about CHUNK characters cut at whitespace, so no token is split (unless there is no whitespace for
    CHUNK characters: such text is garbage and is cut anyway, to keep memory bounded)."""
    start = 0
    while start < len(text):
        m = _SPACE.search(text, start + CHUNK, start + 2 * CHUNK)
        end = m.start() if m else min(start + CHUNK, len(text))
        yield text[start:end]
        start = end


def _dups(items: list[str]) -> tuple[int, int, int]:
    """(items, repeated items, characters in repeated items); an item is repeated from its second occurrence on."""
    distinct = set(items)
    return len(items), len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


class GopherBatch:
    """What the Gopher rules measure, for every document of a batch at once, each part computed on first use.

    Tokens become integer ids (a dict from each distinct token to its id, filled at C speed through map) and the
    statistics are numpy over all the batch's tokens. An n-gram's id is the dense id of the pair (its (n-1)-gram's
    id, its last token's id), exact (no hashing), given in order of first appearance by pandas.factorize (a hash
    table: linear time); 1-gram ids include the row, so equal n-grams in two documents never share an id.
    """

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.chars = np.array([len(t) for t in texts], dtype=np.float64)
        self._ngram_n, self._ngram_pos, self._ngram_ids = 0, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self._ngram_shares: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @cached_property
    def _tokens(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(vocabulary, token ids, tokens per row); vocab[i] has id i.

        The texts are cut at whitespace into chunks (str.split, which cuts where spaCy does), chunks become ids, and
        each distinct chunk's tokens (english.chunk_tokens, cached per process) are laid end to end once; the token
        sequence is that table gathered along the chunk sequence.
        """
        chunk_ids: defaultdict[str, int] = defaultdict(itertools.count().__next__)
        parts, chunks_per_row = [np.zeros(0, dtype=np.int64)], []
        for text in self.texts:
            chunks_per_row.append(0)
            for piece in _chunks(text):
                chunks = piece.split()
                parts.append(np.fromiter(map(chunk_ids.__getitem__, chunks), dtype=np.int64, count=len(chunks)))
                chunks_per_row[-1] += len(chunks)
        seq = np.concatenate(parts)  # chunk ids in text order
        per_chunk = list(map(english.chunk_tokens, chunk_ids))  # in id order
        ids: defaultdict[str, int] = defaultdict(itertools.count().__next__)
        table = np.fromiter(map(ids.__getitem__, itertools.chain.from_iterable(per_chunk)), dtype=np.int64)
        size = np.fromiter(map(len, per_chunk), dtype=np.int64, count=len(per_chunk))
        first = np.cumsum(size) - size  # where each distinct chunk's tokens start in the table
        n = size[seq]  # tokens of each chunk occurrence
        ends = np.cumsum(n)
        # token j of the text is token (j - start of its occurrence) of its chunk
        tok = table[np.arange(ends[-1] if len(ends) else 0) + np.repeat(first[seq] - (ends - n), n)]
        row_ends = np.concatenate([[0], ends])[np.cumsum(chunks_per_row, dtype=np.int64)]
        return list(ids), tok, np.diff(row_ends, prepend=0)

    @cached_property
    def _row(self) -> np.ndarray:  # the row of each token
        return np.repeat(np.arange(len(self.texts), dtype=np.int32), self._tokens[2])

    @cached_property
    def _row_end(self) -> np.ndarray:  # per row: one past its last token
        return np.cumsum(self._tokens[2])

    @cached_property
    def _token_lengths(self) -> np.ndarray:
        vocab, tok, _ = self._tokens
        return np.fromiter(map(len, vocab), dtype=np.int32, count=len(vocab))[tok]

    def _vocab_mask(self, test: Callable[[str], Any]) -> np.ndarray:
        vocab = self._tokens[0]
        return np.fromiter(map(bool, map(test, vocab)), dtype=bool, count=len(vocab))

    def _per_row(self, weights: np.ndarray) -> np.ndarray:
        return np.bincount(self._row, weights=weights, minlength=len(self.texts))

    @property
    def n_tokens(self) -> np.ndarray:  # per row
        return self._tokens[2]

    @cached_property
    def _is_word(self) -> np.ndarray:  # per token
        return self._vocab_mask(_WORD.search)[self._tokens[1]]

    @cached_property
    def words(self) -> np.ndarray:
        return self._per_row(self._is_word)

    def mean_word_length(self) -> np.ndarray:
        return ratio(self._per_row(self._token_lengths * self._is_word), self.words)

    def alpha_share(self) -> np.ndarray:
        # datatrove: tokens with a letter (str.isalpha) / all tokens, punctuation tokens included
        has_letter = self._vocab_mask(lambda t: t.isalpha() or any(map(str.isalpha, t)))
        return ratio(self._per_row(has_letter[self._tokens[1]]), self.n_tokens)

    def stop_words(self, stop: tuple[str, ...]) -> np.ndarray:
        """How many of the (lowercase) stop words occur in each row, any case; each counts once."""
        vocab, tok, _ = self._tokens
        index = {w: i for i, w in enumerate(stop)}
        which = np.fromiter((index.get(v.lower(), -1) for v in vocab), dtype=np.int64, count=len(vocab))[tok]
        hit = which >= 0
        present = np.unique(self._row[hit].astype(np.int64) * len(stop) + which[hit])  # distinct (row, stop word)
        return np.bincount(present // max(len(stop), 1), minlength=len(self.texts)).astype(np.float64)

    @cached_property
    def lines(self) -> np.ndarray:
        return np.array([line_count(t) for t in self.texts], dtype=np.float64)

    @cached_property
    def dup_lines(self) -> np.ndarray:  # rows x (lines, repeated lines, characters in repeated lines)
        return np.array([_dups(list(filter(None, map(str.strip, t.split("\n"))))) for t in self.texts]).reshape(-1, 3)

    @cached_property
    def dup_paragraphs(self) -> np.ndarray:
        rows = [_dups(list(filter(None, map(str.strip, _PARAGRAPH_BREAK.split(t))))) for t in self.texts]
        return np.array(rows).reshape(-1, 3)

    def ngram_shares(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(top n-gram share, duplicated n-gram share) of each document's characters."""
        if n not in self._ngram_shares:
            self._ngram_shares[n] = self._compute_ngram_shares(n)
        return self._ngram_shares[n]

    def _repeated(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the n-grams that occur twice or more in their document start (ascending), and their ids.

        Only an n-gram whose (n-1)-gram prefix repeats can repeat, so each order works on the previous order's
        survivors: on prose the candidates shrink fast with n.
        """
        vocab, tok, _ = self._tokens
        v = max(len(vocab), 1)
        if self._ngram_n == 0 or self._ngram_n > n:  # filters usually ask for n = 2, 3, ... in turn
            # the row is part of a 1-gram's id, so documents never share an n-gram id
            ids = pd.factorize(self._row.astype(np.int64) * v + tok)[0]
            keep = np.bincount(ids)[ids] >= 2
            self._ngram_n, self._ngram_pos, self._ngram_ids = 1, np.flatnonzero(keep), ids[keep]
        while self._ngram_n < n:
            k, pos, ids = self._ngram_n + 1, self._ngram_pos, self._ngram_ids
            inside = pos + k <= self._row_end[self._row[pos]]  # the k-gram ends in its own document
            pos, ids = pos[inside], ids[inside]
            ids = pd.factorize(ids * v + tok[pos + k - 1])[0]  # < tokens * vocab: fits int64 for any text
            keep = np.bincount(ids)[ids] >= 2
            self._ngram_n, self._ngram_pos, self._ngram_ids = k, pos[keep], ids[keep]
        return self._ngram_pos, self._ngram_ids

    def _compute_ngram_shares(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pos, ids = self._repeated(n)
        rows = len(self.texts)
        row = self._row[pos]

        # Top n-gram: datatrove's find_top_duplicate: count x len(" ".join(n-gram)) / len(text); ties go to the
        # n-gram seen first, as Counter.most_common. An n-gram seen once is no repetition: 0 (datatrove would count
        # it, which fails short texts that repeat nothing).
        top = np.zeros(rows)
        if len(pos):
            count = np.bincount(ids)[ids]
            present, starts = np.unique(row, return_index=True)  # row is ascending: each row's part is contiguous
            best = np.maximum.reduceat(count, starts)
            tied = count == np.repeat(best, np.diff(np.append(starts, len(pos))))
            # ids come in order of first appearance, so the first tied position holds the n-gram seen first
            at = pos[np.minimum.reduceat(np.where(tied, np.arange(len(pos)), len(pos)), starts)]
            chars = sum(self._token_lengths[at + j].astype(np.int64) for j in range(n)) + n - 1
            top[present] = best * chars / self.chars[present]
        top[self.chars == 0] = np.nan

        # Duplicated n-grams: characters of the tokens covered by a repeated occurrence (its first occurrence not
        # counted), each token once, over len(text). datatrove's find_all_duplicate walks the same repeats greedily,
        # skipping n tokens after each, and so misses up to n - 1 tokens at the end of a repeated run.
        new = np.ones(len(ids), dtype=bool)
        new[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]  # a first appearance exceeds every id before it
        starts = pos[~new]
        covered = np.zeros(len(self._row), dtype=bool)
        for j in range(n):
            covered[starts + j] = True
        dup = np.bincount(self._row[covered], weights=self._token_lengths[covered], minlength=rows)
        return top, ratio(dup, self.chars)


_BATCHES: ColumnCache[GopherBatch] = ColumnCache(GopherBatch)


class _GopherFilter(Filter):
    params: ClassVar[dict[str, Any]] = {"column": "text"}

    def score(self, batch: Batch) -> np.ndarray:
        return self.measure(_BATCHES.get(batch[self.p["column"]]))

    def measure(self, b: GopherBatch) -> np.ndarray:
        raise NotImplementedError


# ---- quality (Gopher appendix A; datatrove GopherQualityFilter) ----


@register_filter("gopher_words")
class GopherWordsFilter(_GopherFilter):
    """Words: tokens with a letter or a digit. datatrove's "non-symbol words" are the tokens with a character outside
    its punctuation list, so it also counts tokens of other symbols (box drawing, bullets, arrows, emoji) as words."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return b.words


@register_filter("gopher_mean_word_length")
class GopherMeanWordLengthFilter(_GopherFilter):
    """Mean length of the words in characters (NaN without words)."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return b.mean_word_length()


@register_filter("gopher_symbol_ratio")
class GopherSymbolRatioFilter(_GopherFilter):
    """max(count of "#", count of "..." and "…") / words.

    Gopher's "symbol-to-word ratio greater than 0.1 for either the hash symbol or the ellipsis" as one score
    (datatrove checks the two apart and divides by all tokens; the paper says words).
    """

    def measure(self, b: GopherBatch) -> np.ndarray:
        symbols = [max(t.count("#"), t.count("...") + t.count("…")) for t in b.texts]
        return ratio(symbols, b.words)


@register_filter("gopher_bullet_lines")
class GopherBulletLinesFilter(_GopherFilter):
    """Share of lines that start with a bullet (after leading spaces)."""

    params = {"column": "text", "bullets": list(BULLETS)}

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)
        bullets = "|".join(map(re.escape, self.p["bullets"]))
        self.pattern = re.compile(rf"(?m)^(?=[^\S\n]*(?:{bullets}))")

    def measure(self, b: GopherBatch) -> np.ndarray:
        return ratio([len(self.pattern.findall(t)) for t in b.texts], b.lines)


@register_filter("gopher_ellipsis_lines")
class GopherEllipsisLinesFilter(_GopherFilter):
    """Share of lines that end with "..." or "…" (before trailing spaces)."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return ratio([len(_ELLIPSIS_LINE.findall(t)) for t in b.texts], b.lines)


@register_filter("gopher_alpha_words")
class GopherAlphaWordsFilter(_GopherFilter):
    """Share of tokens (words and punctuation tokens, as datatrove) that contain a letter."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return b.alpha_share()


@register_filter("gopher_stop_words")
class GopherStopWordsFilter(_GopherFilter):
    """How many different stop words the document holds ("at least two of the following words", Gopher appendix A;
    datatrove counts distinct words too). Any case: "The" is "the" (datatrove matches case)."""

    params = {"column": "text", "stop_words": list(STOP_WORDS)}

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)
        self.stop = tuple(dict.fromkeys(w.lower() for w in self.p["stop_words"]))

    def measure(self, b: GopherBatch) -> np.ndarray:
        return b.stop_words(self.stop)


# ---- repetition (Gopher table A1; datatrove GopherRepetitionFilter) ----


@register_filter("gopher_dup_line_frac")
class GopherDupLineFracFilter(_GopherFilter):
    """Share of lines that repeat an earlier line (lines compared with surrounding spaces stripped)."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return ratio(b.dup_lines[:, 1], b.dup_lines[:, 0])


@register_filter("gopher_dup_line_chars")
class GopherDupLineCharsFilter(_GopherFilter):
    """Characters in repeated lines / characters in the document."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return ratio(b.dup_lines[:, 2], b.chars)


@register_filter("gopher_dup_para_frac")
class GopherDupParaFracFilter(_GopherFilter):
    """Share of paragraphs (split at blank lines) that repeat an earlier paragraph."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return ratio(b.dup_paragraphs[:, 1], b.dup_paragraphs[:, 0])


@register_filter("gopher_dup_para_chars")
class GopherDupParaCharsFilter(_GopherFilter):
    """Characters in repeated paragraphs / characters in the document."""

    def measure(self, b: GopherBatch) -> np.ndarray:
        return ratio(b.dup_paragraphs[:, 2], b.chars)


class _TopNGramFilter(_GopherFilter):
    """Characters in the most frequent n-gram (times its count) / characters in the document."""

    n: ClassVar[int]

    def measure(self, b: GopherBatch) -> np.ndarray:
        return b.ngram_shares(self.n)[0]


class _DupNGramFilter(_GopherFilter):
    """Characters of the words inside repeated n-grams / characters in the document."""

    n: ClassVar[int]

    def measure(self, b: GopherBatch) -> np.ndarray:
        return b.ngram_shares(self.n)[1]


@register_filter("gopher_top_2gram")
class GopherTop2GramFilter(_TopNGramFilter):
    n = 2


@register_filter("gopher_top_3gram")
class GopherTop3GramFilter(_TopNGramFilter):
    n = 3


@register_filter("gopher_top_4gram")
class GopherTop4GramFilter(_TopNGramFilter):
    n = 4


@register_filter("gopher_dup_5gram")
class GopherDup5GramFilter(_DupNGramFilter):
    n = 5


@register_filter("gopher_dup_6gram")
class GopherDup6GramFilter(_DupNGramFilter):
    n = 6


@register_filter("gopher_dup_7gram")
class GopherDup7GramFilter(_DupNGramFilter):
    n = 7


@register_filter("gopher_dup_8gram")
class GopherDup8GramFilter(_DupNGramFilter):
    n = 8


@register_filter("gopher_dup_9gram")
class GopherDup9GramFilter(_DupNGramFilter):
    n = 9


@register_filter("gopher_dup_10gram")
class GopherDup10GramFilter(_DupNGramFilter):
    n = 10
