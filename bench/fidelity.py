"""Fidelity of the text_gopher and text_c4 presets to datatrove's Gopher and C4 filters, and their speed.

The corpus is real English that every machine with Python has, plus planted bad documents:
  real     every docstring of at least 200 characters in the standard library (modules, classes, functions;
           ast.get_docstring, cleaned) and, per module, its comments (the text after "#", blocks of consecutive
           comment lines as paragraphs) when they hold at least 200 characters; test packages left out
  planted  --planted documents (default 500), the same number of each kind, built with np.random.default_rng(0)
           from the real documents' sentences and words: link lists with e-mail addresses, command-line option
           lists, rst headings with ^^^ underlines, keyword spam whose only stop word is "and", lowercase spam
           sentences, lines with abbreviations (Inc., Jan., Dr.), and one kind per Gopher and C4 rule (too short,
           hashtags, bullets, ellipses, number tables, no stop words, repeated lines, paragraphs, phrases and passages,
           long words, lorem ipsum, code with "{", JavaScript and cookie notices, menus, a bad word)
Both sides run the same rules with the papers' thresholds: mm1data's presets (filters/text_gopher.yaml,
filters/text_c4.yaml) without their `lang` step, in batches of --batch documents; datatrove 0.10's
GopherRepetitionFilter + GopherQualityFilter (defaults: Gopher's table A1 and appendix A) and
C4QualityFilter(min_num_sentences=3, min_words_per_line=5) + C4BadWordsFilter, as a pipeline runs them (a document
dropped by the first filter never reaches the second; C4BadWordsFilter sees the lines C4QualityFilter kept). Neither
side's language filter runs (datatrove's downloads its model). C4BadWordsFilter downloads its LDNOOBW list from
GitHub; here it reads mm1data's copy of the LDNOOBW English list instead, so both sides match the same words.

Printed: whole-document agreement (drop or keep) on the real, the planted and all documents, with each side's drop
rate; then per rule, on the real documents, how often the two sides agree on that rule alone (each datatrove rule
run alone: the others disabled) and how many documents each side fails; then the disagreements by (mm1data's first
failing rule, datatrove's reason). Each difference is labelled with the deliberate choice behind it (DELIBERATE,
listed in README.md) or NOT EXPLAINED. Last, speed on all documents: docs per CPU second of this one process
(time.process_time, so that other load on the machine counts less), the best of --repeat runs after an untimed
warm-up; mm1data's chunk caches are emptied before each run, and datatrove's filters run through their run()
generators, one step feeding the next, as in a datatrove pipeline.

    .venv/bin/python bench/fidelity.py [--planted 500] [--batch 256] [--repeat 3] [--show N]
    .venv/bin/python bench/fidelity.py --export-spacy-rules    # rewrite mm1data/filters/data/spacy_en.txt

Needs datatrove and spaCy (`pip install -c constraints.txt -e '.[bench]'`); spaCy's blank("en") needs no model.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import sys
import sysconfig
import tempfile
import time
import tokenize
import warnings
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np

from mm1data.filters import FilterChain, FilterConfig, english, parse_chain
from mm1data.filters.c4 import load_words

RULES_FILE = Path(__file__).resolve().parents[1] / "mm1data" / "filters" / "data" / "spacy_en.txt"
MIN_CHARS = 200  # a real document holds at least this many characters


# --- spaCy's rules, exported for mm1data.filters.english ------------------------------------------------------


def export_spacy_rules(path: Path = RULES_FILE) -> None:
    """Writes spaCy's English tokenizer rules and sentence-final characters for mm1data.filters.english."""
    import spacy
    from spacy.pipeline.sentencizer import Sentencizer
    from spacy.symbols import ORTH

    nlp = spacy.blank("en")
    tok = nlp.tokenizer
    lines = [
        f"# spaCy {spacy.__version__}: the rules of spacy.blank('en')'s tokenizer and the sentencizer's",
        "# sentence-final characters, which datatrove uses to split English: the prefix, suffix and infix patterns",
        "# (one piece per line, in spaCy's order), the URL pattern, and the tokenizer exceptions (the string, then",
        "# its tokens). spaCy is MIT-licensed: Copyright (C) 2016-2024 ExplosionAI GmbH, 2016 spaCy GmbH, 2015",
        "# Matthew Honnibal. Fields are tab-separated. Written by `python bench/fidelity.py --export-spacy-rules`;",
        "# do not edit by hand.",
    ]
    for kind, pieces, fn in (
        ("prefix", nlp.Defaults.prefixes, tok.prefix_search),
        ("suffix", nlp.Defaults.suffixes, tok.suffix_search),
        ("infix", nlp.Defaults.infixes, tok.infix_finditer),
    ):
        pieces = [p for p in pieces if p.strip()]  # as spacy.util.compile_*_regex
        joined = {"prefix": "|".join("^" + p for p in pieces), "suffix": "|".join(p + "$" for p in pieces)}
        assert fn.__self__.pattern == joined.get(kind, "|".join(pieces)), kind  # the pieces are what spaCy runs
        lines += [f"{kind}\t{p}" for p in pieces]
    lines.append(f"url\t{tok.url_match.__self__.pattern}")
    assert tok.token_match is None
    assert not any("\t" in ln[ln.index("\t") + 1 :] or "\n" in ln for ln in lines if not ln.startswith("#"))
    lines.append("sentence_ends\t" + "\t".join(sorted(Sentencizer.default_punct_chars)))
    for orth, tokens in sorted(tok.rules.items()):
        if any(c.isspace() for c in orth):  # whitespace never reaches the chunk tokenizer
            continue
        lines.append("\t".join(["special", orth, *(t[ORTH] for t in tokens)]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(lines)} lines)")


# --- the corpus ---------------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        files += [Path(d) / n for n in sorted(names) if n.endswith(".py")]
    return files


def comments(source: str) -> str:
    """A module's comments, the text after "#"; consecutive comment lines make a paragraph."""
    blocks, last = [], -2
    try:
        for t in tokenize.generate_tokens(io.StringIO(source).readline):
            if t.type != tokenize.COMMENT:
                continue
            text = t.string.lstrip("#").strip()
            if t.start[0] != last + 1 or not blocks:
                blocks.append([])
            blocks[-1].append(text)
            last = t.start[0]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    return "\n\n".join("\n".join(b) for b in blocks)


def real_documents() -> list[str]:
    docs = []
    for path in stdlib_files():
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    docs.append(doc)
        text = comments(source)
        if len(text) >= MIN_CHARS:
            docs.append(text)
    return docs


BAD_WORD = "bastard"
LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt."
COOKIES = [
    "This site uses cookies to improve your experience.",
    "By continuing you accept our Privacy Policy and Terms of Use.",
    "Read our cookie policy for details.",
]
JAVASCRIPT = ["Please enable JavaScript to view this page.", "JavaScript is required for the comments to load."]
ABBREVIATIONS = ["Inc.", "Corp.", "Ltd.", "Jan.", "Feb.", "Dr.", "Mr.", "Mrs.", "e.g.", "i.e.", "etc.", "vs."]


class Planter:
    """Bad documents of each kind (the methods named kind_*), from the real documents' sentences and words."""

    def __init__(self, real: list[str], seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        lines = [ln.strip() for d in real for ln in d.split("\n")]
        self.sentences = [s for s in lines if s.endswith(".") and len(s.split()) >= 6 and "{" not in s]
        vocab = Counter(w.lower() for d in real for w in d.split() if w.isalpha() and len(w) >= 3)
        stop = {"the", "be", "to", "of", "and", "that", "have", "with"}
        self.vocab = sorted(w for w, c in vocab.items() if c >= 3 and w not in stop and w != BAD_WORD)

    def documents(self, n: int) -> list[tuple[str, str]]:
        """n documents, (kind, text), the kinds in turn."""
        kinds = sorted(k for k in dir(self) if k.startswith("kind_"))
        return [(kinds[i % len(kinds)][5:], getattr(self, kinds[i % len(kinds)])()) for i in range(n)]

    def n(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi))

    def word(self) -> str:
        return self.vocab[self.n(0, len(self.vocab))]

    def words(self, k: int) -> str:
        return " ".join(self.word() for _ in range(k))

    def sentence(self) -> str:
        return self.sentences[self.n(0, len(self.sentences))]

    def prose(self, sentences: int, per_line: int = 3) -> str:
        s = [self.sentence() for _ in range(sentences)]
        return "\n".join(" ".join(s[i : i + per_line]) for i in range(0, len(s), per_line))

    # where the old word splitting went wrong: URLs, e-mail addresses, options, rst underlines, stop words, sentences
    def kind_urls(self) -> str:
        w = self.word
        links = (
            f"{w()}: https://www.{w()}.org/{w()}/{w()}.html?id={self.n(0, 99)} or {w()}.{w()}@{w()}.com"
            for _ in range(self.n(8, 20))
        )
        return "Links:\n" + "\n".join(links)

    def kind_cli_options(self) -> str:
        options = (
            f"  --{self.word()}-{self.word()}=FILE, -{self.word()[0]}  {self.sentence()}" for _ in range(self.n(6, 15))
        )
        return "OPTIONS\n" + "\n".join(options)

    def kind_rst_underlines(self) -> str:
        titles = [f"{self.word().capitalize()} {self.word()}" for _ in range(self.n(3, 7))]
        return "\n\n".join(f"{t}\n{'^' * len(t)}\n\n{self.prose(1)}" for t in titles)

    def kind_and_spam(self) -> str:  # "and" is its only stop word
        lines = (
            " and ".join(self.word().capitalize() for _ in range(self.n(6, 14))) + "." for _ in range(self.n(4, 10))
        )
        return "\n".join(lines)

    def kind_lowercase_spam(self) -> str:
        line = lambda: " ".join(self.words(self.n(2, 5)) + "." for _ in range(self.n(3, 12)))  # noqa: E731
        return "\n".join(line() for _ in range(self.n(1, 3)))

    def kind_abbreviations(self) -> str:
        abbr = lambda: ABBREVIATIONS[self.n(0, len(ABBREVIATIONS))]  # noqa: E731
        w = self.word
        lines = (
            f"{w().capitalize()} {abbr()} {w()} {w()} {abbr()} {w().capitalize()} {w()} {w()}."
            for _ in range(self.n(1, 3))
        )
        return "\n".join(lines)

    # one kind per Gopher rule
    def kind_short(self) -> str:
        return self.prose(self.n(1, 3))

    def kind_hashtags(self) -> str:
        return self.prose(3) + "\n" + " ".join("#" + self.word() for _ in range(self.n(10, 30)))

    def kind_bullets(self) -> str:
        return "\n".join(f"• {self.words(3)}" for _ in range(self.n(20, 40)))

    def kind_ellipses(self) -> str:
        return "\n".join(" ".join(self.sentence().split()[:6]) + "..." for _ in range(15))

    def kind_numbers(self) -> str:
        rows = (" ".join(f"{x:.2f}" for x in self.rng.random(8) * 100) for _ in range(self.n(10, 20)))
        return self.prose(1) + "\n" + "\n".join(rows)

    def kind_no_stop_words(self) -> str:
        return "\n".join(self.words(12).capitalize() + "." for _ in range(self.n(6, 12)))

    def kind_repeated_lines(self) -> str:
        return "\n".join([self.sentence()] * 8 + [self.sentence() for _ in range(6)])

    def kind_repeated_paragraphs(self) -> str:
        return "\n\n".join([self.prose(3)] * 3 + [self.prose(3)])

    def kind_repeated_phrase(self) -> str:
        return " ".join("click here" if self.rng.random() < 0.3 else self.word() for _ in range(self.n(80, 150)))

    def kind_repeated_passage(self) -> str:
        return "\n".join([self.prose(4, 4)] * 2 + [self.prose(2)])

    def kind_long_words(self) -> str:
        return " ".join(self.word() + self.word() + self.word() for _ in range(self.n(60, 100))) + "."

    # one kind per C4 rule
    def kind_lorem_ipsum(self) -> str:
        return self.prose(9) + "\n" + LOREM

    def kind_curly_bracket(self) -> str:  # code on a line of its own (C4 drops that line first) or in a sentence
        code = (
            f"function {self.word()}(x) {{ return x; }}"
            if self.rng.random() < 0.5
            else f"Write {{{self.word()}}} in the file."
        )
        return self.prose(9) + "\n" + code

    def kind_javascript(self) -> str:
        return "\n".join([*JAVASCRIPT, self.prose(2, 1)])

    def kind_cookies(self) -> str:
        return "\n".join([*COOKIES, self.prose(2, 1)])

    def kind_menus(self) -> str:
        return "\n".join(" ".join(self.word().capitalize() for _ in range(self.n(1, 4))) for _ in range(30))

    def kind_bad_word(self) -> str:
        return self.prose(9) + f"\nThe referee was called a {BAD_WORD} by the angry crowd."


# --- mm1data -------------------------------------------------------------------------------------------------------


def preset(name: str) -> tuple[FilterConfig, ...]:
    return tuple(c for c in parse_chain(name) if c.name != "lang")


def run_mm1data(chain: tuple[FilterConfig, ...], docs: list[str], batch: int) -> dict[str, np.ndarray]:
    """drop_reason and every score, one FilterChain call per batch."""
    f = FilterChain(chain)
    parts = []
    for i in range(0, len(docs), batch):
        texts = np.array(docs[i : i + batch], dtype=object)
        parts.append(f({"text": texts, "drop_reason": np.full(len(texts), "", dtype=object)}))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "text"}


def rule_fails(chain: tuple[FilterConfig, ...], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per thresholded rule: does the document fail it (whatever failed before)?"""
    return {
        c.name: (out[c.name] < c.min) | (out[c.name] > c.max)
        for c in chain
        if np.isfinite(c.min) or np.isfinite(c.max)
    }


# --- datatrove -----------------------------------------------------------------------------------------------------

GOPHER_QUALITY_OFF = dict(
    min_doc_words=None,
    max_doc_words=None,
    min_avg_word_length=None,
    max_avg_word_length=None,
    max_symbol_word_ratio=None,
    max_bullet_lines_ratio=None,
    max_ellipsis_lines_ratio=None,
    max_non_alpha_words_ratio=None,
    min_stop_words=None,
)
GOPHER_REPETITION_OFF = dict(
    dup_line_frac=None,
    dup_para_frac=None,
    dup_line_char_frac=None,
    dup_para_char_frac=None,
    top_n_grams=(),
    dup_n_grams=(),
)
C4_PAGE_RULES_OFF = dict(
    min_num_sentences=-1, min_words_per_line=5, filter_lorem_ipsum=False, filter_curly_bracket=False
)


def datatrove_filters(badwords_file: str) -> tuple[dict, dict]:
    """(whole pipelines, single-rule pipelines) per preset; each pipeline is a list of filters."""
    from datatrove.pipeline.filters import c4_filters
    from datatrove.pipeline.filters.c4_filters import C4BadWordsFilter, C4QualityFilter
    from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
    from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

    c4_filters.cached_asset_path_or_download = lambda *a, **k: badwords_file  # no download: mm1data's list

    def quality(**on):
        return [GopherQualityFilter(**{**GOPHER_QUALITY_OFF, **on})]

    def repetition(**on):
        return [GopherRepetitionFilter(**{**GOPHER_REPETITION_OFF, **on})]

    whole = {
        "text_gopher": [GopherRepetitionFilter(), GopherQualityFilter()],
        "text_c4": [C4QualityFilter(min_num_sentences=3, min_words_per_line=5), C4BadWordsFilter()],
    }
    single = {
        "gopher_words": quality(min_doc_words=50, max_doc_words=100_000),
        "gopher_mean_word_length": quality(min_avg_word_length=3, max_avg_word_length=10),
        "gopher_symbol_ratio": quality(max_symbol_word_ratio=0.1),
        "gopher_bullet_lines": quality(max_bullet_lines_ratio=0.9),
        "gopher_ellipsis_lines": quality(max_ellipsis_lines_ratio=0.3),
        "gopher_alpha_words": quality(max_non_alpha_words_ratio=0.8),
        "gopher_stop_words": quality(min_stop_words=2),
        "gopher_dup_line_frac": repetition(dup_line_frac=0.3),
        "gopher_dup_para_frac": repetition(dup_para_frac=0.3),
        "gopher_dup_line_chars": repetition(dup_line_char_frac=0.2),
        "gopher_dup_para_chars": repetition(dup_para_char_frac=0.2),
        **{f"gopher_top_{n}gram": repetition(top_n_grams=((n, t),)) for n, t in ((2, 0.2), (3, 0.18), (4, 0.16))},
        **{f"gopher_dup_{n}gram": repetition(dup_n_grams=((n, 0.15 - 0.01 * (n - 5)),)) for n in range(5, 11)},
        "c4_lorem_ipsum": [C4QualityFilter(**{**C4_PAGE_RULES_OFF, "filter_lorem_ipsum": True})],
        "c4_curly_brace": [C4QualityFilter(**{**C4_PAGE_RULES_OFF, "filter_curly_bracket": True})],
        "c4_long_word": [],  # datatrove removes the line, never the page
        "c4_badwords": [C4QualityFilter(**C4_PAGE_RULES_OFF), C4BadWordsFilter()],
        "c4_sentences": [C4QualityFilter(**{**C4_PAGE_RULES_OFF, "min_num_sentences": 3})],
    }
    return whole, single


def run_datatrove(pipeline: list, docs: list[str]) -> np.ndarray:
    """Per document "" (kept) or the reason of the first filter that drops it (each filter's filter() in turn)."""
    from datatrove.data import Document

    reasons = []
    for i, text in enumerate(docs):
        doc, reason = Document(text=text, id=str(i)), ""
        for f in pipeline:
            try:
                verdict = f.filter(doc)
            except ZeroDivisionError:  # a rule run alone on a document without words or lines: no verdict, kept
                verdict = True
            if verdict is not True:
                reason = verdict[1] if isinstance(verdict, tuple) else f.name
                break
        reasons.append(reason)
    return np.array(reasons, dtype=object)


def time_datatrove(pipeline: list, docs: list[str]) -> float:
    """CPU seconds of the pipeline as datatrove runs it: each step's run() over the previous step's output."""
    from datatrove.data import Document

    stream = [Document(text=t, id=str(i)) for i, t in enumerate(docs)]
    t0 = time.process_time()
    for step in pipeline:
        stream = step.run(stream)
    for _ in stream:
        pass
    return time.process_time() - t0


def time_mm1data(chain: tuple[FilterConfig, ...], docs: list[str], batch: int) -> float:
    english.clear_caches()  # a cold start: no chunk tokenized yet
    t0 = time.process_time()
    run_mm1data(chain, docs, batch)
    return time.process_time() - t0


# --- report --------------------------------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


# The choices where mm1data differs from datatrove on purpose (README.md, "Text rules"), by the rule they touch.
DELIBERATE = {
    "gopher_words": "a token of symbols only (bullet, box drawing, emoji) is no word",
    "gopher_mean_word_length": "a token of symbols only (bullet, box drawing, emoji) is no word",
    "gopher_symbol_ratio": "over words, not all tokens; the larger of # and ellipses",
    "gopher_bullet_lines": "over non-blank lines; more bullet glyphs",
    "gopher_ellipsis_lines": "over non-blank lines",
    "gopher_stop_words": 'any case: "The" is "the"',
    "gopher_dup_line_frac": "lines compared stripped; blank lines are no lines",
    "gopher_dup_line_chars": "lines compared stripped; blank lines are no lines",
    "gopher_dup_para_frac": "paragraphs compared stripped; blank lines may hold spaces",
    "gopher_dup_para_chars": "paragraphs compared stripped; blank lines may hold spaces",
    **{f"gopher_top_{n}gram": "an n-gram seen once is no repetition" for n in (2, 3, 4)},
    **{f"gopher_dup_{n}gram": "repeated n-grams' characters counted once, overlaps too" for n in range(5, 11)},
    "c4_lorem_ipsum": "anywhere in the page (T5 paper), not only in kept lines",
    "c4_curly_brace": "anywhere in the page (T5 paper), not only in kept lines",
    "c4_long_word": "a page rule (REFERENCE.md); datatrove removes the line",
    "c4_sentences": "words counted after citation markers go (TFDS)",
    "c4_badwords": "words counted after citation markers go (TFDS)",
}
DATATROVE_REASONS = {  # datatrove's drop reason -> the mm1data rule
    "gopher_short_doc": "gopher_words",
    "gopher_long_doc": "gopher_words",
    "gopher_below_avg_threshold": "gopher_mean_word_length",
    "gopher_above_avg_threshold": "gopher_mean_word_length",
    "gopher_too_many_hashes": "gopher_symbol_ratio",
    "gopher_too_many_ellipsis": "gopher_symbol_ratio",
    "gopher_too_many_bullets": "gopher_bullet_lines",
    "gopher_too_many_end_ellipsis": "gopher_ellipsis_lines",
    "gopher_below_alpha_threshold": "gopher_alpha_words",
    "gopher_enough_stop_words": "gopher_stop_words",
    "dup_line_frac": "gopher_dup_line_frac",
    "dup_para_frac": "gopher_dup_para_frac",
    "dup_line_char_frac": "gopher_dup_line_chars",
    "dup_para_char_frac": "gopher_dup_para_chars",
    **{f"top_{n}_gram": f"gopher_top_{n}gram" for n in (2, 3, 4)},
    **{f"duplicated_{n}_n_grams": f"gopher_dup_{n}gram" for n in range(5, 11)},
    "lorem_ipsum": "c4_lorem_ipsum",
    "curly_bracket": "c4_curly_brace",
    "too_few_sentences": "c4_sentences",
    "document_removed_with_badwords": "c4_badwords",
}


def note(rule: str) -> str:
    return DELIBERATE.get(rule, "NOT EXPLAINED")


def report(name: str, out: dict, dt_reason: np.ndarray, chain: tuple, single: dict, docs: list, real: int, show: int):
    is_real = np.arange(len(docs)) < real
    mm_drop, dt_drop = out["drop_reason"] != "", dt_reason != ""
    print(f"\n== {name}: whole document (drop or keep)")
    print(f"{'documents':<10} {'n':>5} {'agree':>7} {'mm1data drops':>14} {'datatrove drops':>16}")
    for label, sel in (("real", is_real), ("planted", ~is_real), ("all", np.ones_like(is_real))):
        agree = (mm_drop == dt_drop)[sel].mean()
        print(
            f"{label:<10} {sel.sum():>5} {pct(agree):>7} {pct(mm_drop[sel].mean()):>14} {pct(dt_drop[sel].mean()):>16}"
        )

    print(f"\n{name}: each rule alone on the real documents (datatrove: only that check enabled)")
    header = ("rule", "agree", "mm1data fails", "datatrove fails", "only mm1data", "only datatrove", "why they differ")
    print("{:<24} {:>7} {:>14} {:>16} {:>13} {:>15}  {}".format(*header))
    for rule, mm_fail in rule_fails(chain, out).items():
        dt_fail = run_datatrove(single[rule], docs[:real]) != ""
        mm_fail = mm_fail[:real]
        print(
            f"{rule:<24} {pct((mm_fail == dt_fail).mean()):>7} {mm_fail.sum():>14} {dt_fail.sum():>16}"
            f" {(mm_fail & ~dt_fail).sum():>13} {(dt_fail & ~mm_fail).sum():>15}"
            f"  {note(rule) if (mm_fail != dt_fail).any() else ''}"
        )

    print(f"\n{name}: disagreements by (mm1data's first failing rule -> datatrove's reason)")
    pairs = Counter(
        (out["drop_reason"][i] or "kept", dt_reason[i] or "kept", "real" if is_real[i] else "planted")
        for i in np.flatnonzero(mm_drop != dt_drop)
    )
    for (mm, dt, where), c in sorted(pairs.items(), key=lambda x: (x[0][2], -x[1])):
        rule = mm if mm != "kept" else DATATROVE_REASONS.get(dt, dt)
        print(f"  {c:>4}  {where:<8} {mm:<24} -> {dt:<24} {note(rule)}")
    for i in np.flatnonzero((mm_drop != dt_drop) & is_real)[:show]:
        print(
            f"\n--- real document {i}: mm1data {out['drop_reason'][i] or 'kept'}, datatrove {dt_reason[i] or 'kept'}"
        )
        print(docs[i][:1500])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planted", type=int, default=500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side; the fastest counts")
    ap.add_argument("--show", type=int, default=0, help="print this many disagreeing real documents per preset")
    ap.add_argument("--export-spacy-rules", action="store_true")
    args = ap.parse_args()
    if args.export_spacy_rules:
        export_spacy_rules()
        return
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # datatrove's np.mean([]) on a rule run alone

    real = real_documents()
    planted = Planter(real).documents(args.planted)
    docs = real + [t for _, t in planted]
    kinds = Counter(k for k, _ in planted)
    print(
        f"Python {sys.version.split()[0]}, datatrove {version('datatrove')}, spaCy {version('spacy')}: "
        f"{len(real)} real documents (standard library docstrings and comments, {np.mean([len(d) for d in real]):.0f}"
        f" characters on average) and {len(planted)} planted ({len(kinds)} kinds, {min(kinds.values())} or more each)"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(load_words()) + "\n")
    whole, single = datatrove_filters(f.name)

    speed = {}
    for name in ("text_gopher", "text_c4"):
        chain = preset(name)
        out = run_mm1data(chain, docs, args.batch)
        report(name, out, run_datatrove(whole[name], docs), chain, single, docs, len(real), args.show)
        time_mm1data(chain, docs[:50], args.batch)  # warm-up: imports, rules, compiled patterns
        time_datatrove(whole[name], docs[:50])
        mm = min(time_mm1data(chain, docs, args.batch) for _ in range(args.repeat))
        dt = min(time_datatrove(whole[name], docs) for _ in range(args.repeat))
        speed[name] = (len(docs) / mm, len(docs) / dt)

    print(
        f"\nSpeed on all {len(docs)} documents: docs per CPU second (one process, one thread), best of {args.repeat}"
    )
    print(f"{'preset':<12} {'mm1data':>9} {'datatrove':>10} {'ratio':>7}")
    for name, (mm, dt) in speed.items():
        print(f"{name:<12} {mm:>9.0f} {dt:>10.0f} {mm / dt:>6.1f}x")


if __name__ == "__main__":
    main()
