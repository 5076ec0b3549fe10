"""English words and sentences as datatrove splits them: spaCy's blank("en") tokenizer and sentencizer, without spaCy.

datatrove (0.10) splits English with `spacy.blank("en")` and spaCy's rule-based sentencizer (its
tokenizer_assignment.csv gives English to SpaCyTokenizer; no NLTK, whose punkt model TFDS's C4 used): words for the
Gopher rules, sentences per kept line for the C4 rule. This module runs spaCy's algorithm on spaCy's rules: the prefix,
suffix, infix and URL patterns, the tokenizer exceptions ("don't" -> "do", "n't"; "Inc." and "Jan." stay whole) and
the sentencizer's sentence-final characters, exported from spaCy into data/spacy_en.txt by
`bench/fidelity.py --export-spacy-rules`. The tokens are spaCy's (tests/test_text_filters.py compares them where
spaCy is installed), but for two bounds:
- a run of more than MAX_CHUNK characters without whitespace is one token (spaCy's affix loop is quadratic in it);
- spaCy's special-case matcher also matches an exception across one space (the emoticon "[:" in "a[ :)x"), and
  such a match, though it changes nothing itself, can block an overlapping one: spaCy splits "a[ :)x" into "a", "[",
  ":", ")", "x", this module into "a", "[", ":)", "x". Only runs of emoticon punctuation meet this.

Speed: text is cut at whitespace (str.split: whitespace never joins a token), each distinct whitespace-free chunk is
tokenized once per process and cached (as spaCy's tokenizer does), and cheap exact pre-checks (can this character
start a prefix, end a suffix, start an infix?) skip most regex searches.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from re import _parser  # parse trees of spaCy's patterns, to derive the pre-checks
from typing import Any

import numpy as np

MAX_CHUNK = 2000  # characters: a longer whitespace-free run is one token
CACHE_SIZE = 100_000  # distinct chunks remembered per process (spaCy: 10,000)
_SUFFIX_WINDOW = 32  # characters searched for a suffix, more than any bounded suffix piece; see _suffix_len


@dataclass(frozen=True)
class SpacyRules:
    """spaCy's English tokenizer rules and the sentencizer's sentence-final characters, compiled for speed."""

    pieces: dict[str, tuple[str, ...]]  # "prefix", "suffix", "infix": spaCy's pattern pieces, in its order
    prefix: re.Pattern[str]  # as spaCy: "^piece|^piece|..." (order matters: the first piece that matches wins)
    suffix: re.Pattern[str]  # spaCy's "piece$|piece$|..." with its one-character pieces merged into one class
    infix: re.Pattern[str]  # as spaCy: "piece|piece|..."
    url: re.Pattern[str]
    prefix_first: frozenset[str] | None  # every prefix starts with one of these (None: no pre-check)
    suffix_last: frozenset[str] | None  # every suffix ends with one of these, or with suffix_last_after_digit...
    suffix_last_after_digit: frozenset[str]  # ...when the pieces that follow a digit (units, currencies) may match
    digit: re.Pattern[str]  # the characters those pieces need before them
    infix_first: re.Pattern[str] | None  # every infix starts with one of these
    specials: dict[str, tuple[str, ...]]  # tokenizer exceptions: chunk -> its tokens
    sentence_ends: frozenset[str]  # a token equal to one of these ends a sentence
    sentence_end_char: re.Pattern[str]  # any of them
    sentence_end_chunk: re.Pattern[str]  # a whitespace-free run holding one of them
    # spaCy's special-case matcher: a run of tokens that spells an exception containing an affix ("e.g." inside
    # "see/e.g." comes out of the infix split as "e.g", ".") is replaced by the exception's tokens
    affix_specials: dict[tuple[str, ...], tuple[str, ...]]
    affix_special_pairs: frozenset[tuple[str, str]]  # the first two tokens of those runs
    longest_affix_special: int
    one_char_suffixes: frozenset[str]  # the suffix pieces that are one character, whatever precedes it


@cache
def rules() -> SpacyRules:
    raw = resources.files("mm1data.filters").joinpath("data/spacy_en.txt").read_text(encoding="utf-8")
    pieces: dict[str, list[str]] = {"prefix": [], "suffix": [], "infix": []}
    url, specials, ends = "", {}, frozenset()
    for line in raw.split("\n"):
        if not line or line.startswith("#"):
            continue
        kind, *fields = line.split("\t")
        if kind == "special":
            specials[fields[0]] = tuple(fields[1:])
        elif kind == "sentence_ends":
            ends = frozenset(fields)
        elif kind == "url":
            url = fields[0]
        else:
            pieces[kind].append(fields[0])
    suffix = [list(_parser.parse(p)) for p in pieces["suffix"]]
    # Every suffix piece is anchored at the end, so a match from a given start is the whole rest of the string and
    # the pieces' order cannot change the result (re.search returns the leftmost start): the one-character pieces
    # (70 of 82) become one character class, which re tries in one step instead of 70.
    one_char = [p for p, tree in zip(pieces["suffix"], suffix) if len(tree) == 1 and _charset(*tree[0]) is not None]
    merged = set().union(*(_charset(*_parser.parse(p)[0]) for p in one_char))
    others = [f"(?:{p})" for p in pieces["suffix"] if p not in one_char]
    after_digit = [_after_digits(tree) for tree in suffix]
    digits = set().union(*(d for d in after_digit if d))
    free = SpacyRules(
        pieces={k: tuple(v) for k, v in pieces.items()},
        prefix=re.compile("|".join("^" + p for p in pieces["prefix"])),
        suffix=re.compile("(?:" + "|".join([_class(merged), *others]) + ")$"),
        infix=re.compile("|".join(pieces["infix"])),
        url=re.compile(url),
        prefix_first=_edges(pieces["prefix"], last=False),
        suffix_last=_edges([p for p, d in zip(pieces["suffix"], after_digit) if not d], last=True),
        suffix_last_after_digit=_edges([p for p, d in zip(pieces["suffix"], after_digit) if d], last=True)
        or frozenset(),
        digit=re.compile(_class(digits) if digits else "(?!)"),
        infix_first=re.compile(_class(chars)) if (chars := _edges(pieces["infix"], last=False)) else None,
        specials=specials,
        sentence_ends=ends,
        sentence_end_char=re.compile(_class(ends)),
        sentence_end_chunk=re.compile(rf"((?<!\S)\S*?{_class(ends)}\S*)"),  # tried at chunk starts only
        affix_specials={},
        affix_special_pairs=frozenset(),
        longest_affix_special=0,
        one_char_suffixes=frozenset(merged),
    )
    # As spaCy's Tokenizer.add_special_case (faster_heuristics): only exceptions with an affix are matched in runs,
    # the runs being what tokenizing the exception without exceptions gives (hence the rules without them first).
    runs = {
        _split(free, orth, with_specials=False): tokens
        for orth, tokens in specials.items()
        if _prefix_len(free, orth) or _suffix_len(free, orth) or free.infix.search(orth)
    }
    # A one-token run that stays itself ("'" -> "'") changes nothing and, matched last (shortest), blocks nothing.
    runs = {run: tokens for run, tokens in runs.items() if run != tokens}
    if any(len(run) < 2 for run in runs):
        raise ValueError("spacy_en.txt: an exception that rewrites a single token")
    return replace(
        free,
        affix_specials=runs,
        affix_special_pairs=frozenset(run[:2] for run in runs),
        longest_affix_special=max(map(len, runs), default=0),
    )


# ---- what a pattern can start or end with, from its parse tree ----


def _charset(op: Any, av: Any) -> set[str] | None:
    """The characters one element matches, if it is a literal or a class of literals and ranges; else None."""
    if op is _parser.LITERAL:
        return {chr(av)}
    if op is _parser.IN and all(o in (_parser.LITERAL, _parser.RANGE) for o, _ in av):
        out: set[str] = set()
        for o, a in av:
            out.update(chr(a) if o is _parser.LITERAL else map(chr, range(a[0], a[1] + 1)))
        return out
    return None


def _edge(seq: Any, last: bool) -> set[str] | None:
    """The characters a match of a parsed sequence can start (or end) with; None when unknown or possibly empty."""
    seq = list(seq)
    while seq and seq[-1 if last else 0][0] in (_parser.AT, _parser.ASSERT, _parser.ASSERT_NOT):  # zero-width
        seq.pop(-1 if last else 0)
    if not seq:
        return None
    op, av = seq[-1 if last else 0]
    if op in (_parser.MAX_REPEAT, _parser.MIN_REPEAT):
        return _edge(av[2], last) if av[0] >= 1 else None
    if op is _parser.SUBPATTERN:
        return _edge(av[3], last)
    if op is _parser.BRANCH:
        sets = [_edge(alt, last) for alt in av[1]]
        return None if None in sets else set().union(*sets)
    return _charset(op, av)


def _edges(pieces: list[str], last: bool) -> frozenset[str] | None:
    sets = [_edge(_parser.parse(p), last) for p in pieces]
    return None if None in sets else frozenset().union(*sets)


def _after_digits(tree: list) -> set[str] | None:
    """The characters a piece's leading lookbehind requires, when that is a class of digits ("(?<=[0-9])km")."""
    if tree and tree[0][0] is _parser.ASSERT and tree[0][1][0] == -1 and len(tree[0][1][1]) == 1:
        chars = _charset(*tree[0][1][1][0])
        if chars and all(c.isdigit() for c in chars):
            return chars
    return None


def _class(chars: set[str] | frozenset[str]) -> str:
    """A regex character class of exactly these characters, consecutive code points as ranges."""
    points, parts = sorted(map(ord, chars)), []
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        a, b = re.escape(chr(points[i])), re.escape(chr(points[j]))
        parts.append(a if i == j else f"{a}-{b}")
        i = j + 1
    return "[" + "".join(parts) + "]"


# ---- spaCy's tokenizer on one whitespace-free chunk ----


def _prefix_len(r: SpacyRules, s: str) -> int:
    if r.prefix_first is not None and s[:1] not in r.prefix_first:
        return 0
    m = r.prefix.match(s)  # every alternative starts with ^: match is search here
    return m.end() if m else 0


def _suffix_len(r: SpacyRules, s: str) -> int:
    if r.suffix_last is not None and s and s[-1] not in r.suffix_last:
        if s[-1] not in r.suffix_last_after_digit or not r.digit.search(s):
            return 0
    # Every alternative ends with $, so re.search tries them at every position: on a long string search only its
    # tail (lookbehinds still see the characters before it). Only a piece like "\.\.+" can be longer than the
    # window, and then it matches from the window's start: search the whole string again.
    start = len(s) - _SUFFIX_WINDOW
    if start > 0:
        m = r.suffix.search(s, start)
        if m is None or m.start() > start:
            return m.end() - m.start() if m else 0
    m = r.suffix.search(s)
    return m.end() - m.start() if m else 0


def _split(r: SpacyRules, chunk: str, with_specials: bool = True) -> tuple[str, ...]:
    """spaCy's Tokenizer._tokenize: peel prefixes and suffixes off until an exception or nothing is left, then the
    rest is an exception, a URL or split at its infixes; then the special-case matcher."""
    specials = r.specials if with_specials else {}
    if chunk in specials:
        return specials[chunk]
    if chunk.isalpha():  # letters only: no prefix, suffix, infix or URL matches (a third of distinct chunks)
        return (chunk,)
    core, tail = chunk[:-1], chunk[-1:]
    if with_specials and core.isalpha() and (tail in r.one_char_suffixes or (tail == "." and "a" <= core[-1] <= "z")):
        # letters then "," ";" ")" ... or a dot after a lowercase letter ("(?<=[a-z...])\." in spaCy's suffixes): the
        # only affix is that last character (a fifth of distinct chunks)
        return _matched(r, [*specials.get(core, (core,)), tail])
    prefixes: list[str] = []
    suffixes: list[str] = []
    s, last = chunk, -1
    while s and len(s) != last:
        if s in specials:
            break
        last = len(s)
        pre = _prefix_len(r, s)
        if pre and s[pre:] in specials:
            prefixes.append(s[:pre])
            s = s[pre:]
            break
        suf = _suffix_len(r, s[pre:])
        if suf and s[:-suf] in specials:
            suffixes.append(s[-suf:])
            s = s[:-suf]
            break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
    tokens = prefixes
    if s in specials:
        tokens.extend(specials[s])
    elif s and "." in s and r.url.match(s):  # a URL has a dot before its top-level domain
        tokens.append(s)
    elif s and (r.infix_first is None or r.infix_first.search(s)):
        start = 0
        for m in r.infix.finditer(s):
            if m.start() == 0:  # an infix at the very start splits nothing
                continue
            if m.start() != start:
                tokens.append(s[start : m.start()])
            if m.end() != m.start():
                tokens.append(m.group())
            start = m.end()
        if s[start:]:
            tokens.append(s[start:])
    elif s:
        tokens.append(s)
    tokens.extend(reversed(suffixes))
    return _matched(r, tokens) if with_specials else tuple(tokens)


def _matched(r: SpacyRules, tokens: list[str]) -> tuple[str, ...]:
    """spaCy's special-case matcher over a chunk's tokens."""
    if len(tokens) < 2 or r.affix_special_pairs.isdisjoint(zip(tokens, tokens[1:])):
        return tuple(tokens)
    n = len(tokens)
    found = [
        (i, i + k)
        for i in range(n - 1)
        if (tokens[i], tokens[i + 1]) in r.affix_special_pairs
        for k in range(2, min(r.longest_affix_special, n - i) + 1)
        if tuple(tokens[i : i + k]) in r.affix_specials
    ]
    if not found:
        return tuple(tokens)
    # spaCy's _filter_special_spans: longest first, then leftmost; a run whose first or last token is taken is dropped
    found.sort(key=lambda m: (m[1] - m[0], -m[0]))
    kept, taken = [], set()
    for a, b in reversed(found):
        if a not in taken and b - 1 not in taken:
            kept.append((a, b))
        taken.update(range(a, b))
    out, i = [], 0
    for a, b in sorted(kept):
        out += tokens[i:a]
        out += r.affix_specials[tuple(tokens[a:b])]
        i = b
    return tuple(out + tokens[i:])


_CACHE: dict[str, tuple[str, ...]] = {}  # chunk -> its tokens
_STEPS: dict[str, tuple[int, bool, int, bool]] = {}  # chunk -> what the sentencizer does over it (_sentence_step)


def chunk_tokens(chunk: str) -> tuple[str, ...]:
    """spaCy's tokens of a whitespace-free string (cached per process)."""
    tokens = _CACHE.get(chunk)
    if tokens is None:
        tokens = (chunk,) if len(chunk) > MAX_CHUNK else _split(rules(), chunk)
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.clear()
        _CACHE[chunk] = tokens
    return tokens


def clear_caches() -> None:
    """Forgets every chunk tokenized so far (benchmarks time a cold start with it)."""
    _CACHE.clear()
    _STEPS.clear()


def words(text: str) -> list[str]:
    """The tokens of a text, whitespace dropped: datatrove's split_into_words(text, "en")."""
    return [t for chunk in text.split() for t in chunk_tokens(chunk)]


# ---- spaCy's sentencizer ----

_WHITESPACE_TOKEN = re.compile(r"\s\s|[^\S ]")  # whitespace but one space between words is a token of its own


def _is_punct(token: str) -> bool:  # spaCy's Token.is_punct: every character in a Unicode P* category
    return all(unicodedata.category(c).startswith("P") for c in token)


def sentence_end_mask(codes: np.ndarray) -> np.ndarray:
    """Which of these code points are sentence-final characters."""
    table, astral = _sentence_end_table()
    out = table[np.minimum(codes, len(table) - 1)]
    beyond = np.flatnonzero(codes >= len(table) - 1)
    if len(beyond):
        out[beyond] = np.isin(codes[beyond], astral)
    return out


@cache
def _sentence_end_table() -> tuple[np.ndarray, np.ndarray]:
    ends = np.array(sorted(map(ord, rules().sentence_ends)))
    table = np.zeros(0x10001, dtype=bool)  # the last entry stands for every code point above U+FFFF
    table[ends[ends < 0x10000]] = True
    return table, ends[ends >= 0x10000]


def _sentence_step(chunk: str) -> tuple[int, bool, int, bool]:
    """The sentencizer over the tokens of a chunk, entered without and with a sentence end pending: (sentences
    started, end pending after) for each (cached per process)."""
    step = _STEPS.get(chunk)
    if step is None:
        ends = rules().sentence_ends
        out: list[Any] = []
        for seen_end in (False, True):
            started = 0
            for t in chunk_tokens(chunk):
                if t in ends:
                    seen_end = True
                elif seen_end and not _is_punct(t):
                    started, seen_end = started + 1, False
            out += [started, seen_end]
        step = (out[0], out[1], out[2], out[3])
        if len(_STEPS) >= CACHE_SIZE:
            _STEPS.clear()
        _STEPS[chunk] = step
    return step


def sentence_count(line: str) -> int:
    """Sentences in one line as spaCy's sentencizer cuts them (what datatrove's C4 filter counts per kept line).

    A sentence ends at a token that is a sentence-final character (. ! ? and other scripts' marks; "..." and "e.g."
    are not) and the next one starts at the first token after it that is neither punctuation nor sentence-final, so
    "it works. then" is two sentences and "Acme Inc. makes" is one. Whitespace other than one space between words is
    a token too (spaCy keeps it), so it can start a sentence. A non-empty line is at least one sentence.
    """
    r = rules()
    line = line.strip()
    if not r.sentence_end_char.search(line, 0, len(line) - 1):  # none before the last character: one sentence
        return 1 if line else 0
    # Only chunks with a sentence-final character are tokenized; between them, any token that is not punctuation
    # starts the pending sentence.
    count, seen_end = 1, False
    for i, part in enumerate(r.sentence_end_chunk.split(line)):  # between, chunk, between, ..., chunk, between
        if i % 2:
            step = _sentence_step(part)
            count, seen_end = (count + step[2], step[3]) if seen_end else (count + step[0], step[1])
        elif seen_end and (_WHITESPACE_TOKEN.search(part) or not all(map(_is_punct, part.split()))):
            count, seen_end = count + 1, False
    return count
