"""C4 text rules (Raffel et al. 2020, T5; TFDS c4_utils) as annotate-only document filters."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cached_property
from importlib import resources
from typing import Any, ClassVar

import numpy as np

from mm1data import storage
from mm1data.filters import english
from mm1data.filters.base import Filter, FilterConfig
from mm1data.filters.gopher import ColumnCache, ratio
from mm1data.registry import register_filter
from mm1data.stage import Batch

# C4 removes lines and then drops pages; here nothing is removed: the line rules are evaluated per line and become
# document scores (how many lines and sentences C4 would keep, and the share of lines failing each rule), and the
# page rules become counts. Lines, NaN and empty text as in gopher.py: a line is the text between two "\n".
# Constants as TFDS c4_utils.py and datatrove's C4QualityFilter.
END_MARKS = (".", "?", "!", '"', "'")  # TFDS: . ? ! " ; datatrove adds '
ELLIPSIS = "..."
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")  # removed before a line is checked (TFDS)


class C4Batch:
    """Per-line C4 measurements of every document of a batch, the lines of all documents in flat arrays (row: the
    document of each line), each part computed on first use and shared by the c4_ filters."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    @cached_property
    def lower(self) -> list[str]:
        return [t.lower() for t in self.texts]

    @cached_property
    def _raw_lines(self) -> tuple[list[str], np.ndarray]:
        lines, counts = [], []
        for text in self.texts:
            mine = list(filter(None, map(str.strip, text.split("\n"))))  # the non-blank lines, stripped
            lines += mine
            counts.append(len(mine))
        return lines, np.repeat(np.arange(len(self.texts)), counts)

    @property
    def row(self) -> np.ndarray:  # the document of each line
        return self._raw_lines[1]

    @cached_property
    def lines(self) -> list[str]:  # the non-blank lines, stripped, citation markers removed (TFDS: before the checks)
        return [CITATION.sub("", line) if "[" in line else line for line in self._raw_lines[0]]

    @cached_property
    def per_line(self) -> dict[str, np.ndarray]:
        raw, lines = self._raw_lines[0], self.lines
        n = len(lines)
        # Words, longest word, last character and sentence-final characters of every line at once: the lines, each
        # ended by "\n", as one array of code points.
        text = "".join(line + "\n" for line in lines)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ends = np.flatnonzero(codes == 10)  # one "\n" per line
        ws = _WHITESPACE[np.minimum(codes, len(_WHITESPACE) - 1)]
        word = ~ws
        first = np.flatnonzero(word & np.concatenate([[True], ws[:-1]]))  # where each word starts...
        after = np.flatnonzero(word & np.concatenate([ws[1:], [True]])) + 1  # ...and ends
        words = np.bincount(np.searchsorted(ends, first), minlength=n)
        longest = np.zeros(n, dtype=np.int64)
        if len(first):
            has = words > 0
            longest[has] = np.maximum.reduceat(after - first, (np.cumsum(words) - words)[has])
        for i, (before, after_sub) in enumerate(zip(raw, lines)):
            if before is not after_sub:  # TFDS measures word lengths before citations go
                longest[i] = max(map(len, before.split()))
        last = codes[ends - 1]  # an empty line (all citations) reads the "\n" before it: no end mark
        length = np.diff(ends, prepend=-1) - 1
        dots = (length >= 3) & (last == 46) & (codes[ends - 2] == 46) & (codes[ends - 3] == 46)
        no_end = ~np.isin(last, _END_CODES) | dots
        javascript = self._lines_with(lambda low: "javascript" in low, lines)
        policy = self._lines_with(lambda low: any(phrase in low for phrase in POLICY), lines)
        candidate = ~no_end & ~javascript & ~policy  # kept, given enough words and no long word
        # one sentence unless a sentence-final character comes before the last one: only those lines are split
        marks = np.flatnonzero(english.sentence_end_mask(codes))
        inner = np.bincount(np.searchsorted(ends, marks[codes[marks + 1] != 10]), minlength=n) > 0
        sentences = candidate.astype(np.int64)
        for i in np.flatnonzero(candidate & inner):
            sentences[i] = english.sentence_count(lines[i])
        return {
            "words": words,
            "no_end": no_end,
            "javascript": javascript,
            "policy": policy,
            "candidate": candidate,
            "sentences": sentences,
            "longest": longest,
        }

    def _lines_with(self, test: Callable[[str], bool], lines: list[str]) -> np.ndarray:
        """Lines (citations removed) that pass `test` once lowercased, tested only on pages whose text passes it."""
        flags = np.zeros(len(lines), dtype=bool)
        pages = np.fromiter(map(test, self.lower_uncited), dtype=bool, count=len(self.texts))
        for i in np.flatnonzero(pages[self.row]):
            flags[i] = test(lines[i].lower())
        return flags

    @cached_property
    def lower_uncited(self) -> list[str]:
        # A line's lower() is a piece of its page's (citations never span lines), so a phrase absent from the page
        # is absent from every line.
        return [CITATION.sub("", low) if "[" in low else low for low in self.lower]

    @cached_property
    def n_lines(self) -> np.ndarray:
        return np.bincount(self.row, minlength=len(self.texts))

    def per_row(self, weights: np.ndarray) -> np.ndarray:
        return np.bincount(self.row, weights=weights, minlength=len(self.texts))

    def line_share(self, flags: np.ndarray) -> np.ndarray:
        return ratio(self.per_row(flags), self.n_lines)

    def kept(self, min_words: int, max_word_length: int) -> np.ndarray:
        """Lines that C4 keeps: end mark, not ellipsis, >= min_words words, no javascript, no policy phrase, no
        word longer than max_word_length."""
        x = self.per_line
        return x["candidate"] & (x["words"] >= min_words) & (x["longest"] <= max_word_length)

    @cached_property
    def longest_word(self) -> np.ndarray:  # per page
        out = np.zeros(len(self.texts))
        np.maximum.at(out, self.row, self.per_line["longest"])
        return out


# what str.split() splits at (all below U+3001), and END_MARKS, as code points
_WHITESPACE = np.array([chr(c).isspace() for c in range(0x3002)])
_END_CODES = np.array([ord(c) for c in END_MARKS])

_BATCHES: ColumnCache[C4Batch] = ColumnCache(C4Batch)


class _C4Filter(Filter):
    params: ClassVar[dict[str, Any]] = {"column": "text"}

    def score(self, batch: Batch) -> np.ndarray:
        return self.measure(_BATCHES.get(batch[self.p["column"]]))

    def measure(self, b: C4Batch) -> np.ndarray:
        raise NotImplementedError


class _LineShareFilter(_C4Filter):
    """Share of a document's lines that break one line rule (NaN without lines)."""

    rule: ClassVar[str]

    def measure(self, b: C4Batch) -> np.ndarray:
        return b.line_share(b.per_line[self.rule])


class _KeptLinesFilter(_C4Filter):
    params = {"column": "text", "min_words": 3, "max_word_length": 1000}  # datatrove's 3 words; T5 paper: 5


@register_filter("c4_lines")
class C4LinesFilter(_KeptLinesFilter):
    """Lines that pass every C4 line rule (the lines C4 would keep)."""

    def measure(self, b: C4Batch) -> np.ndarray:
        return b.per_row(b.kept(self.p["min_words"], self.p["max_word_length"]))


@register_filter("c4_sentences")
class C4SentencesFilter(_KeptLinesFilter):
    """Sentences in the lines that pass every C4 line rule, as spaCy's sentencizer counts them (datatrove's C4
    filter; C4 drops pages under 3). "Acme Inc. makes" is one sentence, "it works. then" two (english.py)."""

    def measure(self, b: C4Batch) -> np.ndarray:
        kept = b.kept(self.p["min_words"], self.p["max_word_length"])
        return b.per_row(b.per_line["sentences"] * kept)


@register_filter("c4_no_terminal_punct")
class C4NoTerminalPunctFilter(_LineShareFilter):
    """Share of lines that do not end in . ? ! " ' or that end in "..." (citation markers removed first)."""

    rule = "no_end"


@register_filter("c4_short_lines")
class C4ShortLinesFilter(_C4Filter):
    """Share of lines with fewer than min_words whitespace-separated words."""

    params = {"column": "text", "min_words": 3}

    def measure(self, b: C4Batch) -> np.ndarray:
        return b.line_share(b.per_line["words"] < self.p["min_words"])


@register_filter("c4_javascript")
class C4JavascriptFilter(_LineShareFilter):
    """Share of lines that mention "javascript" (any case)."""

    rule = "javascript"


@register_filter("c4_policy")
class C4PolicyFilter(_LineShareFilter):
    """Share of lines with a terms-of-use, privacy or cookie notice phrase (any case)."""

    rule = "policy"


@register_filter("c4_lorem_ipsum")
class C4LoremIpsumFilter(_C4Filter):
    """Occurrences of "lorem ipsum" (any case) in the page."""

    def measure(self, b: C4Batch) -> np.ndarray:
        return np.array([low.count("lorem ipsum") for low in b.lower], dtype=np.float64)


@register_filter("c4_curly_brace")
class C4CurlyBraceFilter(_C4Filter):
    """Occurrences of "{" in the page."""

    def measure(self, b: C4Batch) -> np.ndarray:
        return np.array([t.count("{") for t in b.texts], dtype=np.float64)


@register_filter("c4_long_word")
class C4LongWordFilter(_C4Filter):
    """Length of the page's longest whitespace-separated word."""

    def measure(self, b: C4Batch) -> np.ndarray:
        return b.longest_word


@register_filter("c4_badwords")
class C4BadWordsFilter(_KeptLinesFilter):
    """Bad-word occurrences in the lines C4 keeps (as c4_lines: same min_words and max_word_length), whole words,
    any case. TFDS and datatrove match the list against the cleaned page, the kept lines; a bad word on a menu line
    C4 removes anyway does not drop the page. Default list: LDNOOBW English (data/ldnoobw_en.txt)."""

    params = {**_KeptLinesFilter.params, "words_file": None}

    def __init__(self, cfg: FilterConfig) -> None:
        super().__init__(cfg)
        self.pattern = badwords_pattern(load_words(self.p["words_file"]))

    def measure(self, b: C4Batch) -> np.ndarray:
        lines, row = b.lines, b.row
        found = np.zeros(len(b.texts))
        for i in np.flatnonzero(b.kept(self.p["min_words"], self.p["max_word_length"])):
            found[row[i]] += len(self.pattern.findall(lines[i].lower()))
        return found


def load_words(uri: str | None = None, default: str = "ldnoobw_en.txt") -> list[str]:
    """A word list: one entry per line (a phrase may have spaces), '#' starts a comment line; local path or s3://.
    Without uri, the packaged list `default` (in mm1data/filters/data/)."""
    if uri is None:
        raw = resources.files("mm1data.filters").joinpath("data", default).read_bytes()
    else:
        raw = storage.read_bytes(uri)
    lines = (line.strip().lower() for line in raw.decode("utf-8").splitlines())
    return sorted({w for w in lines if w and not w.startswith("#")})


def badwords_pattern(words: list[str]) -> re.Pattern[str]:
    """Whole-word alternation of `words` (lowercase), built as a character trie.

    A flat alternation of ~400 literals runs ~25x slower in `re` (each is tried at every position) and `regex`'s
    named lists are no faster; a trie tries each character once. Matched against lowercased text, which is ~3x
    faster than re.IGNORECASE. Entries that start or end with a non-word character (an emoji) still match: the
    guards only forbid a word character right before or after.
    """
    trie: dict[str, dict] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def alternation(node: dict[str, dict]) -> str:
        branches = [re.escape(ch) + alternation(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and "" not in node else "(?:" + "|".join(branches) + ")"
        return body + ("?" if "" in node else "")

    if not words:
        return re.compile(r"(?!)")  # an empty list matches nothing
    return re.compile(rf"(?<!\w){alternation(trie)}(?!\w)")
