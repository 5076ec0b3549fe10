"""C4 and Gopher text filters: exact scores and drop reasons on hand-written documents, presets, bad input."""

from __future__ import annotations

import gc
import re
from collections import Counter

import numpy as np
import pytest

from mm1data.filters import FilterChain, FilterConfig, english, parse_chain
from mm1data.filters import gopher as gopher_module
from mm1data.filters.gopher import GopherBatch

# 65 words, 7 different stop words, 9 punctuation tokens, 4 lines in 2 paragraphs, no repeated 2-gram: passes
# every C4 and Gopher rule.
CLEAN = (
    "The history of science shows that careful observation and patient work have changed how people understand "
    "nature.\n"
    "Early astronomers recorded planets with simple tools, yet their tables guided sailors across dangerous oceans.\n"
    "\n"
    "Later, chemists tested ideas in laboratories to measure gases, metals and living cells with growing precision.\n"
    "Modern researchers share data openly, so students everywhere can repeat experiments, question results and build "
    "better theories."
)
CLEAN_MEAN_WORD = sum(len(w) for w in re.findall(r"[A-Za-z]+", CLEAN)) / 65  # every word is plain letters

GERMAN = (
    "Die Geschichte der Wissenschaft zeigt, dass sorgfältige Beobachtung die Welt verändert hat.\n"
    "Frühe Astronomen zeichneten die Planeten mit einfachen Werkzeugen auf."
)

# Line rules: 10 non-blank lines. Kept with min_words 3: 1, 2, 7 (citation removed), 8 (closing quote), 10.
C4_DOC = (
    "This line has enough words and ends well.\n"  # 1 kept
    "Too short here.\n"  # 2 three words: kept with min_words 3, not 5
    "No terminal punctuation at the end of this line\n"  # 3 no end mark; 'punctuation' is the longest word (11)
    "Please enable JavaScript to view this page properly.\n"  # 4 javascript
    "Read our Privacy Policy before you continue reading.\n"  # 5 policy phrase
    "It trails off into an ellipsis like this...\n"  # 6 ellipsis: no end mark
    "A cited claim that is well known to be true.[1]\n"  # 7 kept: the citation goes before the end check
    '"Quoted speech ends with a closing quote mark."\n'  # 8 kept
    "\n   \n"  # blank: not lines
    "Menu\n"  # 9 one word, no end mark
    "Dr. Smith arrived. He said hello! Then he left? Yes.\n"  # 10 kept, 4 sentences ("Dr." ends none)
)


def run(names: list[str] | tuple[FilterConfig, ...], docs: list, drop: list[str] | None = None, **params) -> dict:
    if isinstance(names, tuple):
        cfg = names
    else:
        cfg = tuple(FilterConfig(n, params=params) for n in names)
    batch = {
        "text": np.array(docs, dtype=object),
        "drop_reason": np.array(drop or [""] * len(docs), dtype=object),
    }
    return FilterChain(cfg)(batch)


def preset(name: str) -> tuple[FilterConfig, ...]:
    """A preset without its lang entry (tested apart, in test_lang_reads_multiline_text_column)."""
    return tuple(c for c in parse_chain(name) if c.name != "lang")


def rule(preset_name: str, filter_name: str) -> tuple[FilterConfig, ...]:
    return tuple(c for c in parse_chain(preset_name) if c.name == filter_name)


def f32(*values: float) -> list[np.float32]:
    return [np.float32(v) for v in values]


# ---- English words and sentences: datatrove's, that is spaCy's blank("en") tokenizer and sentencizer ----

# text -> tokens, each list checked against spaCy 3.8.18 (datatrove 0.10.1's split_into_words)
WORDS = {
    "See https://docs.python.org/3/library/os.html, or mail bugs@python.org.": [
        "See", "https://docs.python.org/3/library/os.html", ",", "or", "mail", "bugs@python.org", ".",
    ],
    "Run pip install --upgrade --no-cache-dir pkg (-v for more).": [
        "Run", "pip", "install", "--upgrade", "--no", "-", "cache", "-", "dir", "pkg", "(", "-v", "for", "more", ")",
        ".",
    ],
    "Don't stop; it's John's, e.g. Acme Inc. (Jan. 5th) can't.": [
        "Do", "n't", "stop", ";", "it", "'s", "John", "'s", ",", "e.g.", "Acme", "Inc.", "(", "Jan.", "5th", ")", "ca",
        "n't", ".",
    ],
    "well-known state-of-the-art 3.14 1,000 U.S.A. 10km $5 50%": [
        "well", "-", "known", "state", "-", "of", "-", "the", "-", "art", "3.14", "1,000", "U.S.A.", "10", "km", "$",
        "5", "50", "%",
    ],
    "Usage\n^^^^^\n\tCannot dont gonna": ["Usage", "^^^^^", "Can", "not", "do", "nt", "gon", "na"],
    "see/e.g. this": ["see", "/", "e.g.", "this"],  # "e.g" + "." out of the infix split, joined by the matcher
}  # fmt: skip


def test_words_split_as_spacy_does():
    for text, tokens in WORDS.items():
        assert english.words(text) == tokens, text
    assert english.words("x" * (english.MAX_CHUNK + 1) + ".") == ["x" * (english.MAX_CHUNK + 1) + "."]  # one token
    # the known difference (english.py): spaCy's matcher looks for "[:" across the space and so keeps ":)" apart
    assert english.words("a[ :)x") == ["a", "[", ":)", "x"]  # spaCy: "a", "[", ":", ")", "x"


def test_sentences_split_as_spacys_sentencizer():
    # each count checked against spaCy 3.8.18 (datatrove 0.10.1's split_into_sentences)
    cases = {
        "buy now. best price. click here.": 3,  # lowercase starts still start sentences
        "Acme Inc. makes widgets. Dr. Smith agrees.": 2,  # "Inc." and "Dr." end no sentence
        "It costs 3.14 dollars. e.g. this one.": 2,
        "Wait... what? yes.": 2,  # "..." is no sentence-final character; "?" is
        "see os.path.Join for it": 2,  # "." split off between a lowercase and an uppercase letter ends one
        "One.\tTwo": 2,
        "It ends here.": 1,
        "   ": 0,
    }
    for line, n in cases.items():
        assert english.sentence_count(line) == n, line


def test_suffix_search_finds_what_spacys_pattern_finds():
    """The merged suffix pattern and its pre-checks give what spaCy's "piece$|piece$|..." gives."""
    r = english.rules()
    spacy_suffix = re.compile("|".join(p + "$" for p in r.pieces["suffix"]))
    rng = np.random.default_rng(3)
    alphabet = list("aZ09.,;:!?'\"()[]{}-+%$°FkmsS’…") + ["km", "US$", "'s", "²", "€", "Ab", "AB"]
    for _ in range(20_000):
        s = "".join(rng.choice(alphabet, rng.integers(1, 12))) + "." * int(
            rng.integers(0, 40) if rng.random() < 0.1 else 0
        )
        m = spacy_suffix.search(s)
        assert english._suffix_len(r, s) == (m.end() - m.start() if m else 0), s


def test_words_and_sentences_match_spacy():
    spacy = pytest.importorskip("spacy")  # a bench dependency: skipped where it is not installed
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    rng = np.random.default_rng(5)
    pieces = ["word", "Word", "WORD", "3", "3.14", "1,000", ".", ",", ";", ":", "!", "?", "...", "…", "'", '"', "(",
              ")", "-", "--", "/", "'s", "n't", "e.g.", "Inc.", "Jan.", "https://x.org/a?b=1", "a@b.com", "°C", "km",
              "$", "%", "#", "•", "─", "é", "中", "😀", "C++", "U.S.", "\t", "  ", " ", " ", " ", "\n"]  # fmt: skip
    texts = list(WORDS) + ["".join(rng.choice(pieces, rng.integers(1, 30))) for _ in range(3000)]
    for text in texts:
        assert english.words(text) == [t.text for t in nlp.tokenizer(text) if t.text.strip()], text
        for line in text.split("\n"):
            if line.strip():
                assert english.sentence_count(line) == len(list(nlp(line.strip()).sents)), line


# ---- Gopher ----


def test_gopher_quality_scores():
    docs = [
        CLEAN,
        "The cat's toy, a well-known ball... #1 of 3.14!",
        "• first item\n  - second item...\n* third …\nplain line\n\n   \n",
        "Tags: #art #music … and more...",
    ]
    names = [
        "gopher_words",
        "gopher_mean_word_length",
        "gopher_symbol_ratio",
        "gopher_bullet_lines",
        "gopher_ellipsis_lines",
        "gopher_alpha_words",
        "gopher_stop_words",
    ]
    out = run(names, docs)
    # Tokens are spaCy's English tokens, as datatrove's (checked against datatrove 0.10.1's split_into_words):
    # doc 1: The cat 's toy , a well - known ball ... # 1 of 3.14 ! -> 16 tokens, 9 with a letter, 11 words (tokens
    #   with a letter or digit) of 32 characters; "#" once, one ellipsis
    # doc 2: • first item - second item ... * third … plain line -> 12 tokens; 7 words of 33 characters (datatrove:
    #   8, "•" being outside its punctuation list); two "..." or "…"
    # doc 3: Tags : # art # music … and more ... -> 10 tokens, 5 words of 19 characters; two "#", two ellipses
    assert list(out["gopher_words"]) == [65, 11, 7, 5]
    assert list(out["gopher_mean_word_length"]) == f32(CLEAN_MEAN_WORD, 32 / 11, 33 / 7, 19 / 5)
    assert list(out["gopher_symbol_ratio"]) == f32(0, 1 / 11, 2 / 7, 2 / 5)  # over words (datatrove: all tokens)
    assert list(out["gopher_bullet_lines"]) == f32(0, 0, 3 / 4, 0)  # •, - and * lines; blank lines do not count
    assert list(out["gopher_ellipsis_lines"]) == f32(0, 0, 2 / 4, 1)
    assert list(out["gopher_alpha_words"]) == f32(65 / 74, 9 / 16, 7 / 12, 5 / 10)  # as datatrove
    # distinct stop words: CLEAN holds the (as "The"), of, that, and, have, with, to; doc 1 "The" and "of"
    # (datatrove, case-sensitive: 6 and 1)
    assert list(out["gopher_stop_words"]) == [7, 2, 0, 1]


def test_gopher_scores_where_word_splitting_matters():
    """URLs, e-mail addresses, command-line options, rst underlines and contractions, as datatrove splits them. The
    expected values are datatrove 0.10.1's too (split_into_words, its non-symbol words, find_top_duplicate) unless a
    comment says otherwise."""
    docs = [
        "Docs: https://docs.python.org/3/library/os.html and https://peps.python.org/pep-0008/\n"
        "Mail bugs@python.org or security@python.org with the details.",
        "  --verbose, -v    print more\n  --no-cache-dir   do not cache\n  --output=FILE    write to FILE",
        "Reading\n^^^^^^^\n\nOpen the file and read the file.\n\n"
        "Writing\n^^^^^^^\n\nOpen the file and write the file.",
        "Don't panic: it's John's towel, and we can't lose it.",
    ]
    names = ["gopher_words", "gopher_mean_word_length", "gopher_alpha_words", "gopher_stop_words", "gopher_top_2gram"]
    out = run(names, docs)
    # 1: Docs : URL and URL Mail ADDRESS or ADDRESS with the details . -> 13 tokens, 11 words of 135 characters
    # 2: --verbose , -v print more --no - cache - dir do not cache --output = FILE write to FILE -> 19 tokens, 15
    #    words of 65 characters
    # 3: each underline is one token (not a word): 20 tokens, 16 words of 65 characters; "the file" 4 times is the
    #    top 2-gram: 4 x 8 of 101 characters (one "^" per token would make "^ ^" the top 2-gram, 12 times)
    # 4: Do n't panic : it 's John 's towel , and we ca n't lose it . -> 17 tokens, 14 words of 41 characters
    assert list(out["gopher_words"]) == [11, 15, 16, 14]
    assert list(out["gopher_mean_word_length"]) == f32(135 / 11, 65 / 15, 65 / 16, 41 / 14)
    assert list(out["gopher_alpha_words"]) == f32(11 / 13, 15 / 19, 16 / 20, 14 / 17)
    assert list(out["gopher_stop_words"]) == [3, 1, 2, 1]  # with, the, and / to / the, and / and
    # In 1, 2 and 4 no 2-gram repeats: 0. datatrove takes its most frequent 2-gram even when it occurs once (0.041,
    # 0.117, 0.113 here), which on a short text reads as repetition.
    assert list(out["gopher_top_2gram"]) == f32(0, 0, 4 * 8 / 101, 0)


def test_gopher_repetition_scores():
    ten = "one two three four five six seven eight nine ten"
    docs = [
        CLEAN,
        "alpha beta\ngamma delta\nalpha beta\n  alpha beta  \nepsilon",  # 56 chars; lines compared stripped
        "one two\n\nthree four\n\none two",  # 28 chars
        "xx y z xx y z",  # 13 chars; 2-grams "xx y" and "y z" tie at 2: the one seen first wins
        f"{ten} {ten}",  # 97 chars; the words of one copy: 39 chars
        "a b c d e f a b c d e g",  # 23 chars; one repeated 5-gram
    ]
    names = [
        "gopher_dup_line_frac",
        "gopher_dup_line_chars",
        "gopher_dup_para_frac",
        "gopher_dup_para_chars",
        "gopher_top_2gram",
        "gopher_top_3gram",
        "gopher_top_4gram",
        "gopher_dup_5gram",
        "gopher_dup_6gram",
        "gopher_dup_10gram",
    ]
    out = run(names, docs)
    assert list(out["gopher_dup_line_frac"]) == f32(0, 2 / 5, 1 / 3, 0, 0, 0)
    assert list(out["gopher_dup_line_chars"]) == f32(0, 20 / 56, 7 / 28, 0, 0, 0)
    assert list(out["gopher_dup_para_frac"]) == f32(0, 0, 1 / 3, 0, 0, 0)
    assert list(out["gopher_dup_para_chars"]) == f32(0, 0, 7 / 28, 0, 0, 0)
    assert list(out["gopher_top_2gram"]) == f32(0, 3 * 10 / 56, 2 * 7 / 28, 2 * 4 / 13, 2 * 7 / 97, 2 * 3 / 23)
    assert list(out["gopher_top_3gram"]) == f32(0, 0, 0, 2 * 6 / 13, 2 * 13 / 97, 2 * 5 / 23)
    assert list(out["gopher_top_4gram"]) == f32(0, 0, 0, 0, 2 * 18 / 97, 2 * 7 / 23)
    assert list(out["gopher_dup_5gram"]) == f32(0, 0, 0, 0, 39 / 97, 5 / 23)
    assert list(out["gopher_dup_6gram"]) == f32(0, 0, 0, 0, 39 / 97, 0)
    assert list(out["gopher_dup_10gram"]) == f32(0, 0, 0, 0, 39 / 97, 0)


def _reference_ngram_shares(text: str, n: int) -> tuple[float, float]:
    """The definitions written plainly: datatrove's top n-gram (0 when nothing repeats) and the characters of the
    tokens covered by a repeated occurrence."""
    if not text:
        return np.nan, np.nan
    words = english.words(text)
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    top = 0.0
    if grams:
        gram, count = Counter(grams).most_common(1)[0]
        top = len(gram) * count / len(text) if count > 1 else 0.0
    seen, covered = set(), [False] * len(words)
    for i, g in enumerate(grams):
        if g in seen:
            covered[i : i + n] = [True] * n
        seen.add(g)
    return top, sum(len(w) for w, c in zip(words, covered) if c) / len(text)


def test_ngram_shares_match_a_plain_implementation_across_a_batch():
    rng = np.random.default_rng(7)
    words = "the cat sat on a mat and dog ran to it , .".split()
    for trial in range(40):
        texts = [" ".join(rng.choice(words[: rng.integers(2, len(words))], rng.integers(0, 40))) for _ in range(5)]
        b = GopherBatch(texts)
        orders = list(range(2, 11)) if trial % 2 else [int(n) for n in rng.permutation(np.arange(2, 11))]
        for n in orders:  # any order: asking for a lower n after a higher one starts again from tokens
            top, dup = b.ngram_shares(n)
            expected = np.array([_reference_ngram_shares(t, n) for t in texts])
            np.testing.assert_allclose(np.c_[top, dup], expected, rtol=1e-12)


def test_each_gopher_rule_trips_with_its_preset_threshold():
    trips = {
        "gopher_words": "The cat sat with the dog.",
        "gopher_mean_word_length": "to be or not to be",
        "gopher_symbol_ratio": "Tags: #art #music … and more...",
        "gopher_bullet_lines": "• apples\n\n• pears\n  - plums\n* figs\n",
        "gopher_ellipsis_lines": "Wait for it...\nAnd then …  \nNothing happened.",
        "gopher_alpha_words": "Call 555 1234 or 555 9876 now!",
        "gopher_stop_words": "Cats chase mice.",
        "gopher_dup_line_frac": "alpha beta\ngamma delta\nalpha beta\n  alpha beta  \nepsilon",
        "gopher_dup_line_chars": "a long repeated line here\nshort\na long repeated line here",
        "gopher_dup_para_frac": "one two\n\nthree four\n\none two",
        "gopher_dup_para_chars": "one two\n\nthree four\n\none two",
        "gopher_top_2gram": "of the cat of the dog",
        "gopher_top_3gram": "xx y z xx y z",
        "gopher_top_4gram": "one two three four five six seven eight nine ten one two three four five",
    }
    trips |= {
        f"gopher_dup_{n}gram": " ".join(["one two three four five six seven eight nine ten"] * 2) for n in range(5, 11)
    }
    expected_score = {
        "gopher_words": 6,
        "gopher_mean_word_length": 13 / 6,
        "gopher_symbol_ratio": 2 / 5,
        "gopher_bullet_lines": 1,
        "gopher_ellipsis_lines": 2 / 3,
        "gopher_alpha_words": 3 / 8,
        "gopher_stop_words": 0,
        "gopher_dup_line_frac": 2 / 5,
        "gopher_dup_line_chars": 25 / 57,
        "gopher_dup_para_frac": 1 / 3,
        "gopher_dup_para_chars": 7 / 28,
        "gopher_top_2gram": 2 * 6 / 21,
        "gopher_top_3gram": 2 * 6 / 13,
        "gopher_top_4gram": 2 * 18 / 72,
    } | {f"gopher_dup_{n}gram": 39 / 97 for n in range(5, 11)}
    chain = preset("text_gopher")
    assert sorted(c.name for c in chain) == sorted(trips)  # every rule of the preset is tripped below
    for cfg in chain:
        out = run((cfg,), [CLEAN, trips[cfg.name]])
        assert list(out["drop_reason"]) == ["", cfg.name], cfg.name
        assert out[cfg.name][1] == np.float32(expected_score[cfg.name]), cfg.name


def test_gopher_preset_keeps_clean_and_marks_first_failure():
    docs = [CLEAN, "The cat sat with the dog.", CLEAN, "to be or not to be " * 10]
    out = run(preset("text_gopher"), docs, drop=["", "", "http_404", ""])
    assert list(out["drop_reason"]) == ["", "gopher_words", "http_404", "gopher_mean_word_length"]
    assert out["gopher_words"][3] == 60 and out["gopher_dup_10gram"][3] > 0.1  # later rules still scored


def test_params_bullets_and_stop_words():
    doc = "+ one\n+ two\nthe end"
    out = run(["gopher_bullet_lines"], [doc], bullets=["+"])
    assert out["gopher_bullet_lines"][0] == np.float32(2 / 3)
    out = run(["gopher_stop_words"], ["One TWO two three"], stop_words=["two", "Three"])
    assert out["gopher_stop_words"][0] == 2  # "two" (twice) and "three"


# ---- C4 ----


def test_c4_line_scores():
    out = run(
        ["c4_lines", "c4_sentences", "c4_no_terminal_punct", "c4_short_lines", "c4_javascript", "c4_policy"],
        [C4_DOC, CLEAN],
    )
    assert list(out["c4_lines"]) == [5, 4]
    assert list(out["c4_sentences"]) == [8, 4]
    assert list(out["c4_no_terminal_punct"]) == f32(3 / 10, 0)
    assert list(out["c4_short_lines"]) == f32(1 / 10, 0)
    assert list(out["c4_javascript"]) == f32(1 / 10, 0)
    assert list(out["c4_policy"]) == f32(1 / 10, 0)
    five = run(["c4_lines", "c4_sentences", "c4_short_lines"], [C4_DOC], min_words=5)  # the T5 paper's 5 words
    assert (five["c4_lines"][0], five["c4_sentences"][0], five["c4_short_lines"][0]) == (4, 7, np.float32(2 / 10))
    long = run(["c4_lines"], ["A line with a long word " + "x" * 20 + " in it."], max_word_length=10)
    assert long["c4_lines"][0] == 0


def test_c4_sentences_where_sentence_splitting_matters():
    # Both values are datatrove 0.10.1's sentence counts (C4QualityFilter, min_words_per_line=5): one lowercase spam
    # line holds 4 sentences (kept: 3 or more), two lines whose abbreviations end no sentence hold 2 (dropped).
    docs = [
        "buy cheap pills now. best price online today. click the link below. order more now.",
        "Jan. 5 was a cold day in the city.\nDr. Who met Mr. Smith at Acme Inc. today.",
    ]
    out = run(rule("text_c4", "c4_sentences"), docs)
    assert list(out["c4_sentences"]) == [4, 2]
    assert list(out["drop_reason"]) == ["", "c4_sentences"]


def test_c4_page_scores():
    docs = [
        C4_DOC,
        "Lorem ipsum dolor sit amet. LOREM IPSUM again.",
        "var x = {a: {b: 1}};",
        "short " + "x" * 1001 + " word",
        "What a Bastard! A classic assessment, no match in it.",
    ]
    out = run(["c4_lorem_ipsum", "c4_curly_brace", "c4_long_word", "c4_badwords"], docs)
    assert list(out["c4_lorem_ipsum"]) == [0, 2, 0, 0, 0]
    assert list(out["c4_curly_brace"]) == [0, 0, 2, 0, 0]
    assert list(out["c4_long_word"]) == [11, 6, 4, 1001, 11]
    assert list(out["c4_badwords"]) == [0, 0, 0, 0, 1]  # whole words, any case: "classic" does not hold a match


def test_badwords_from_a_file(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# my list\nspam\neggs and ham\n\nS&P\n")
    docs = [
        "SPAM, spam and more spam!",
        "Green eggs and ham.",
        "Spammer eggs and more.",
        "The S&P index fell.",
        "",
        "spam spam spam\nThis line holds none of them.",  # the first line has no end mark: C4 removes it first
    ]
    out = run(["c4_badwords"], docs, words_file=str(words))
    assert list(out["c4_badwords"]) == [3, 1, 0, 1, 0, 0]


def test_each_c4_rule_trips_with_its_preset_threshold():
    trips = {
        "c4_lorem_ipsum": CLEAN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "c4_curly_brace": CLEAN + "\nThe template writes {name} in place of the name.",
        "c4_long_word": CLEAN + "\nThe next word is long: " + "y" * 1001 + " indeed.",
        "c4_badwords": CLEAN + "\nThe referee was called a bastard by the angry crowd.",
        "c4_sentences": "Only one sentence here, and it is fine.\nMenu\nHome",
    }
    scores = {"c4_lorem_ipsum": 1, "c4_curly_brace": 1, "c4_long_word": 1001, "c4_badwords": 1, "c4_sentences": 1}
    thresholded = [c for c in preset("text_c4") if np.isfinite(c.min) or np.isfinite(c.max)]
    assert sorted(c.name for c in thresholded) == sorted(trips)
    for cfg in thresholded:
        out = run((cfg,), [CLEAN, trips[cfg.name]])
        assert list(out["drop_reason"]) == ["", cfg.name], cfg.name
        assert out[cfg.name][1] == scores[cfg.name]
    # the whole preset (lang aside): the first failing rule is the reason; C4_DOC keeps 7 sentences (lines of 5+ words)
    names = list(trips)
    out = run(preset("text_c4"), [CLEAN, C4_DOC] + [trips[n] for n in names])
    assert list(out["drop_reason"]) == ["", ""] + names
    assert out["c4_sentences"][1] == 7 and out["c4_lines"][1] == 4


# ---- presets, language id, sharing ----


def test_presets_parse():
    gopher = parse_chain("text_gopher")
    assert [c.name for c in gopher][:3] == ["lang", "gopher_words", "gopher_mean_word_length"]
    assert gopher[0].params == {"languages": ["en"], "column": "text"}
    by_name = {c.name: c for c in gopher}
    assert (by_name["gopher_words"].min, by_name["gopher_words"].max) == (50, 100_000)
    assert [by_name[f"gopher_dup_{n}gram"].max for n in range(5, 11)] == [0.15, 0.14, 0.13, 0.12, 0.11, 0.1]
    assert [by_name[f"gopher_top_{n}gram"].max for n in (2, 3, 4)] == [0.2, 0.18, 0.16]
    c4 = parse_chain("text_c4")
    assert c4[0].params == {"languages": ["en"], "column": "text"}
    by_name = {c.name: c for c in c4}
    assert by_name["c4_sentences"].min == 3 and by_name["c4_sentences"].params == {
        "min_words": 5,
        "max_word_length": 1000,
    }
    assert by_name["c4_badwords"].max == 0 and by_name["c4_long_word"].max == 1000
    assert by_name["c4_badwords"].params == {"min_words": 5}  # the lines c4_sentences keeps


def test_lang_reads_multiline_text_column():
    out = run(rule("text_c4", "lang"), [CLEAN, GERMAN])
    assert list(out["lang_id"]) == ["en", "de"]
    assert list(out["drop_reason"]) == ["", "lang"]


def test_one_tokenization_per_batch_shared_by_filters(monkeypatch):
    built = []
    real = gopher_module._BATCHES.build
    monkeypatch.setattr(gopher_module._BATCHES, "build", lambda texts: built.append(len(texts)) or real(texts))
    chain = FilterChain(preset("text_gopher"))
    batch = {"text": np.array([CLEAN, "x"], dtype=object), "drop_reason": np.array(["", ""], dtype=object)}
    chain(batch)
    assert built == [2]  # 20 filters, one analysis
    chain({"text": np.array([CLEAN], dtype=object), "drop_reason": np.array([""], dtype=object)})
    assert built == [2, 1]  # a new batch is analysed anew
    del batch
    gc.collect()
    assert gopher_module._BATCHES._entries == {}  # each entry went with its column: no text outlives its batch


# ---- bad input ----


def test_empty_missing_and_garbage_text_get_defined_scores():
    garbage = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    docs = ["", "  \n\t \n", None, np.nan, garbage.decode("utf-8", errors="replace"), "lone \ud800 surrogate", garbage]
    out = run(preset("text_gopher") + preset("text_c4"), docs)
    for i in range(4):  # empty, whitespace, None, NaN: all read as no text
        assert out["gopher_words"][i] == 0 and out["gopher_stop_words"][i] == 0
        assert out["c4_sentences"][i] == 0 and out["c4_lines"][i] == 0 and out["c4_long_word"][i] == 0
        for share in ("gopher_mean_word_length", "gopher_alpha_words", "gopher_bullet_lines", "c4_policy"):
            assert np.isnan(out[share][i]), share  # no words or no lines: NaN, which passes its threshold
        assert out["drop_reason"][i] == "gopher_words"
    assert np.isnan(out["gopher_dup_5gram"][0]) and out["gopher_dup_5gram"][1] == 0  # share of 0 characters: NaN
    assert out["gopher_words"][5] == 2 and out["c4_long_word"][5] == 9  # the surrogate is a punctuation token
    for i in (4, 6):  # garbage: dropped, by a rule; raw bytes read as UTF-8 with replacement
        assert out["drop_reason"][i] != ""
    for name in out:
        if name.startswith(("gopher_", "c4_")):
            assert out[name][4] == out[name][6] or np.isnan(out[name][4]), name
    only_empty = run(preset("text_gopher") + preset("text_c4"), ["", " \n "])  # a batch without a single line
    assert list(only_empty["drop_reason"]) == ["gopher_words", "gopher_words"]
    assert list(only_empty["c4_lines"]) == [0, 0] and np.isnan(only_empty["c4_short_lines"]).all()


def test_a_3mb_document():
    rng = np.random.default_rng(1)
    letters = np.array(list("bcdfghjklmnpqrsvwxz"))  # no vowels, so no stop word and no bad word
    vocab = np.array(["".join(rng.choice(letters, k)) for k in rng.integers(3, 9, 5000)])
    words = vocab[rng.integers(0, len(vocab), 500_000)]
    lines = [" ".join(words[i : i + 50]) + "." for i in range(0, len(words), 50)]
    text = "\n".join(lines)
    assert len(text) > 3_000_000
    out = run(preset("text_gopher") + preset("text_c4"), [text, CLEAN])
    assert out["gopher_words"][0] == 500_000
    assert out["gopher_mean_word_length"][0] == np.float32(sum(map(len, words)) / 500_000)
    assert out["gopher_stop_words"][0] == 0 and out["c4_badwords"][0] == 0
    assert out["c4_lines"][0] == 10_000 and out["c4_long_word"][0] == max(len(w) for w in text.split())
    assert list(out["drop_reason"]) == ["gopher_words", ""]  # over 100,000 words
