"""Interleaved-document filters: exact per-position and per-document scores and reasons on hand-made documents,
OBELICS' definitions on generated text, the OBELICS preset."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from mm1data.filters import FilterChain, FilterConfig, parse_chain
from mm1data.filters.c4 import load_words
from mm1data.filters.interleaved import ObelicsText, _tables
from mm1data.registry import get_filter

NAN = float("nan")


def obj(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def docs(*documents: list, drop: list[str] | None = None, arrays: bool = False) -> dict:
    """A batch as the reader and the download stage leave it. A position is a paragraph (str), an image
    (url, format, width, height) or a removed image (url, seg_reason)."""
    cols: dict[str, list] = {k: [] for k in ("texts", "images", "seg_reason", "image_format", "w", "h")}
    for doc in documents:
        row = {k: [] for k in cols}
        for p in doc:
            text = p if isinstance(p, str) else None
            image = p[0] if isinstance(p, tuple) else None
            reason = p[1] if isinstance(p, tuple) and len(p) == 2 else ""
            fmt, w, h = p[1:] if isinstance(p, tuple) and len(p) == 4 else ("", 0, 0)
            for k, v in zip(cols, (text, image, reason, fmt, w, h)):
                row[k].append(v)
        for k in cols:
            cols[k].append(np.array(row[k], dtype=object) if arrays else row[k])
    batch = {k: obj(v) for k, v in cols.items()}
    batch["image_orig_width"], batch["image_orig_height"] = batch.pop("w"), batch.pop("h")
    batch["drop_reason"] = np.array(drop or [""] * len(documents), dtype=object)
    return batch


def run(batch: dict, *filters: FilterConfig) -> dict:
    return FilterChain(tuple(filters))(batch)


def same(got: list, want: list) -> bool:
    """Lists of floats equal, NaN equal to NaN."""
    return len(got) == len(want) and all(
        (np.isnan(a) and np.isnan(b)) if np.isnan(b) else a == pytest.approx(b) for a, b in zip(got, want)
    )


# ---- images ----


def test_image_filters_score_kept_images_and_mark_failing_positions():
    b = docs(
        [
            "A paragraph.",
            ("https://x.org/a.jpg", "jpeg", 800, 600),  # passes all
            ("https://x.org/b.gif", "gif", 300, 300),  # format
            ("https://x.org/c.png", "png", 100, 120),  # min side
            ("https://x.org/d.webp", "webp", 900, 300),  # aspect 3
            ("https://x.org/Site-LOGO_icon.png", "png", 200, 200),  # 2 URL words
            ("https://x.org/gone.jpg", "http_404"),  # removed by the download stage: not scored
            ("https://x.org/later.jpg", "", 0, 0),  # no size or format yet: NaN, passes
        ],
        ["Only text here."],
        [("https://x.org/e.jpg", "jpeg", 10, 10)],
        drop=["", "", "html_error"],
    )
    original = b["seg_reason"][0]
    out = run(
        b,
        FilterConfig("img_format", min=1),
        FilterConfig("img_min_side", min=150),
        FilterConfig("img_max_side", max=20000),
        FilterConfig("img_aspect", min=0.5, max=2),
        FilterConfig("img_url_words", max=0),
    )
    assert list(out["seg_reason"][0]) == ["", "", "img_format", "img_min_side", "img_aspect", "img_url_words"] + [
        "http_404",
        "",
    ]
    assert same(out["img_format"][0], [NAN, 1, 0, 1, 1, 1, NAN, NAN])
    # a position removed by an earlier filter is not scored again
    assert same(out["img_min_side"][0], [NAN, 600, NAN, 100, 300, 200, NAN, NAN])
    assert same(out["img_max_side"][0], [NAN, 800, NAN, NAN, 900, 200, NAN, NAN])
    assert same(out["img_aspect"][0], [NAN, 800 / 600, NAN, NAN, 3, 1, NAN, NAN])
    assert same(out["img_url_words"][0], [NAN, 0, NAN, NAN, NAN, 2, NAN, 0])  # a URL needs no size
    # a document without images, and a dropped document: lists of NaN, nothing marked
    assert same(out["img_format"][1], [NAN]) and same(out["img_format"][2], [NAN])
    assert list(out["seg_reason"][2]) == [""] and list(out["drop_reason"]) == ["", "", "html_error"]
    # the input's lists are not edited in place
    assert list(original) == ["", "", "", "", "", "", "http_404", ""]


def test_image_filters_read_params():
    b = docs([("https://x.org/widget/a.gif", "gif", 300, 300), ("https://x.org/b.bmp", "BMP", 300, 300)])
    out = run(
        b,
        FilterConfig("img_format", min=1, params={"formats": ["GIF"]}),
        FilterConfig("img_url_words", max=0, params={"words": ["bmp"]}),
    )
    assert same(out["img_format"][0], [1, 0]) and same(out["img_url_words"][0], [0, NAN])
    assert list(out["seg_reason"][0]) == ["", "img_format"]


# ---- paragraph measures (OBELICS' definitions) ----

# 11 words: the cat sat on the mat and the dog sat too; stop words (OBELICS' list): the x3, on, and, too = 6;
# 44 characters, 12 special (10 spaces, "," and "."); tokens for punctuation: 11 word runs + 2 marks.
CAT = "The cat sat on the mat, and the dog sat too."
# 6 words, all spam; 35 characters, 5 special (spaces); word 5-grams: 2, the same one; character 10-grams: 26, 6
# distinct (period 6), counts 5 5 4 4 4 4: the top floor(sqrt(6)) = 2 hold 10 of 26
SHARE = "share share share share share share"


def test_paragraph_measures_exact():
    b = docs([CAT, ("https://x.org/a.jpg", "jpeg", 300, 300), SHARE, "— 42 %%% —", "", "porn porn is a bad word here"])
    names = ["words", "char_rep", "word_rep", "special", "stop_words", "flagged_words", "spam_words", "punct"]
    out = run(b, *(FilterConfig(f"para_{n}") for n in names))
    assert list(out["seg_reason"][0]) == [""] * 6  # no thresholds: nothing fails
    s = {n: out[f"para_{n}"][0] for n in names}
    assert same(s["words"], [11, NAN, 6, 0, 0, 7])
    assert same(s["stop_words"], [6 / 11, NAN, 0, 0, 0, 2 / 7])  # is, a
    assert same(s["spam_words"], [0, NAN, 1, 0, 0, 0])
    assert same(s["flagged_words"], [0, NAN, 0, 0, 0, 2 / 7])
    assert same(s["special"], [12 / 44, NAN, 5 / 35, 1, 0, 6 / 28])  # "—" is an OBELICS special character
    assert same(s["punct"], [2 / 13, NAN, 0, 0, 0, 0])
    assert same(s["word_rep"], [0, NAN, 1, 0, 0, 0])
    assert same(s["char_rep"], [0, NAN, 10 / 26, 0, 0, 0])


def test_punctuation_minimum_tokens_and_char_repetition_takes_only_repeated_grams():
    b = docs(["Short one.", "no marks at all in this rather long line of plain words here"])
    out = run(b, FilterConfig("para_punct", params={"min_tokens": 12}))
    # 3 tokens < 12: 1 (OBELICS does not judge short paragraphs by punctuation); 13 tokens, no mark: 0
    assert same(out["para_punct"][0], [1, 0])
    # 12 character 10-grams, "abcdefghij" twice, 10 other distinct ones: floor(sqrt(11)) = 3 but only 1 repeats
    text = ObelicsText(["abcdefghij abcdefghij"])
    assert text.char_repetition(10)[0] == pytest.approx(2 / 12)


def test_words_strip_special_characters_and_lowercase():
    text = ObelicsText(["“Hello,” she said — it's 10 o'clock!! 😀 naïve… Résumé"])
    vocab, tok, _ = text._words
    assert [vocab[i] for i in tok] == ["hello", "she", "said", "it's", "o'clock", "naïve", "résumé"]
    assert _tables()[0][ord("😀")] and not _tables()[0][ord("é")]


# ---- chain semantics ----


def test_removed_paragraph_not_rescored_and_not_in_document_text():
    b = docs(
        ["Too short.", ("https://x.org/a.jpg", "jpeg", 300, 300), CAT, "The dog and the cat were friends."],
        [CAT, "and the"],
    )
    out = run(
        b,
        FilterConfig("para_words", min=4),
        FilterConfig("para_stop_words", min=0.3),
        FilterConfig("doc_words", min=12),
        FilterConfig("doc_stop_words"),
    )
    assert list(out["seg_reason"][0]) == ["para_words", "", "", ""]
    assert list(out["seg_reason"][1]) == ["", "para_words"]
    assert same(out["para_words"][0], [2, NAN, 11, 7])
    assert same(out["para_stop_words"][0], [NAN, NAN, 6 / 11, 4 / 7])  # the, and, the, were
    # document text: the kept paragraphs only; document 2 keeps CAT alone (11 words) and fails doc_words
    assert list(out["doc_words"]) == [18, 11]
    assert list(out["drop_reason"]) == ["", "doc_words"]
    assert out["doc_stop_words"][0] == pytest.approx(10 / 18) and np.isnan(out["doc_stop_words"][1])


def test_dropped_document_not_scored():
    b = docs([CAT, "x"], [CAT, "y"], drop=["http_404", ""])
    out = run(b, FilterConfig("para_words", min=4), FilterConfig("doc_words"), FilterConfig("doc_special"))
    assert same(out["para_words"][0], [NAN, NAN]) and same(out["para_words"][1], [11, 1])
    assert list(out["seg_reason"][0]) == ["", ""] and list(out["seg_reason"][1]) == ["", "para_words"]
    assert np.isnan(out["doc_words"][0]) and out["doc_words"][1] == 11
    assert np.isnan(out["doc_special"][0]) and out["doc_special"][1] == pytest.approx(12 / 44)
    assert list(out["drop_reason"]) == ["http_404", ""]


def test_document_text_joins_kept_paragraphs_with_a_blank_line():
    # "abcdefghij" in two paragraphs: the joined text repeats the 10-gram (a document-level repetition)
    b = docs(["abcdefghij", ("https://x.org/a.jpg", "jpeg", 300, 300), "abcdefghij"])
    out = run(b, FilterConfig("doc_char_rep"), FilterConfig("doc_special"), FilterConfig("para_char_rep"))
    assert same(out["para_char_rep"][0], [0, NAN, 0])
    # "abcdefghij\n\nabcdefghij": 13 10-grams, 12 distinct, one twice: floor(sqrt(12)) = 3, 1 repeats -> 2 / 13
    assert out["doc_char_rep"][0] == pytest.approx(2 / 13)
    assert out["doc_special"][0] == pytest.approx(2 / 22)


def test_doc_images_counts_kept_images_and_is_late():
    b = docs(
        [
            CAT,
            ("https://x.org/a.jpg", "jpeg", 300, 300),
            ("https://x.org/b.jpg", "http_404"),
            ("https://x.org/c.jpg",),
        ],
        [CAT],
        [("https://x.org/d.jpg", "jpeg", 300, 300)],
        drop=["", "", "lang"],
    )
    out = run(b, FilterConfig("doc_images", min=1, max=30))
    assert get_filter("doc_images").late and not get_filter("para_words").late and not get_filter("img_aspect").late
    assert list(out["doc_images"][:2]) == [2, 0] and np.isnan(out["doc_images"][2])
    assert list(out["drop_reason"]) == ["", "doc_images", "lang"]


def test_columns_as_ray_gives_them_numpy_arrays_per_document():
    b = docs([CAT, ("https://x.org/a.jpg", "png", 100, 300), "x y"], arrays=True)
    out = run(b, FilterConfig("img_min_side", min=150), FilterConfig("para_words", min=4), FilterConfig("doc_words"))
    assert list(out["seg_reason"][0]) == ["", "img_min_side", "para_words"]
    assert same(out["para_words"][0], [11, NAN, 2]) and out["doc_words"][0] == 11


def test_document_without_position_lists_scores_nothing():
    b = docs([CAT], [CAT], drop=["", "html_error"])
    for col in ("texts", "images", "seg_reason"):
        b[col][1] = None
    out = run(b, FilterConfig("img_aspect"), FilterConfig("para_words"), FilterConfig("doc_words"))
    out = run(out, FilterConfig("doc_images"))
    assert out["para_words"][1] == [] and out["img_aspect"][1] == [] and np.isnan(out["doc_words"][1])
    assert same(out["para_words"][0], [11]) and out["doc_images"][0] == 0


def test_batches_do_not_share_measures():
    first = run(docs([CAT]), FilterConfig("para_words"), FilterConfig("doc_words"))
    second = run(docs([SHARE]), FilterConfig("para_words"), FilterConfig("doc_words"))
    assert same(first["para_words"][0], [11]) and same(second["para_words"][0], [6])
    assert first["doc_words"][0] == 11 and second["doc_words"][0] == 6


def test_language_id_top1_probability_if_allowed():
    en = "The museum opened a new exhibition about the history of printing and the people who made books."
    de = "Das Museum hat eine neue Ausstellung über die Geschichte des Buchdrucks eröffnet."
    b = docs([en, ("https://x.org/a.jpg", "jpeg", 300, 300), de], [de])
    out = run(b, FilterConfig("para_lang", min=0.8))
    p = out["para_lang"][0]
    assert p[0] > 0.8 and np.isnan(p[1]) and p[2] == 0 and out["para_lang"][1] == [0]
    assert list(out["seg_reason"][0]) == ["", "", "para_lang"]
    out = run(
        docs([en], [de], [("https://x.org/a.jpg",), en]),
        FilterConfig("doc_lang", min=0.8, params={"languages": ["en", "fr"]}),
    )
    assert out["doc_lang"][0] > 0.8 and out["doc_lang"][1] == 0  # top-1 German: 0, whatever its probability
    assert list(out["drop_reason"]) == ["", "doc_lang", ""]
    assert out["doc_lang"][2] == out["doc_lang"][0]  # the same text, scored in the same batch


# ---- OBELICS' definitions, on generated text ----


def _obelics_words(text: str, special: set[str]) -> list[str]:
    """OBELICS' get_words_from_text (web_document_filtering.py), transcribed."""
    words = [w.lower() for w in re.split(" |\n|\t", text) if w]
    out = []
    for w in words:
        i, j = 0, len(w)
        while i < j and w[i] in special:
            i += 1
        while j > i and w[j - 1] in special:
            j -= 1
        if w[i:j]:
            out.append(w[i:j])
    return out


def _obelics_char_rep(text: str, n: int) -> float:
    freq = sorted(Counter(text[i : i + n] for i in range(len(text) - n + 1)).values(), reverse=True)
    if not freq:
        return 0
    top = min(int(np.sqrt(len(freq))), len(freq) - sum(f == 1 for f in freq))
    return sum(freq[:top]) / sum(freq)


def _obelics_word_rep(words: list[str], n: int) -> float:
    freq = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return sum(f for f in freq.values() if f > 1) / sum(freq.values()) if freq else 0


def _obelics_punct(text: str, min_nb_words: int) -> float:
    tokens = re.findall(r"[\w']+|[,;:?!.]", text)
    if not tokens:
        return 0
    if min_nb_words > 0 and len(tokens) < min_nb_words:
        return 1.0
    return sum(t in ",;:?!." for t in tokens) / len(tokens)


def test_measures_match_obelics_definitions_on_generated_text():
    rng = random.Random(0)
    pieces = ["the", "cat", "Sat", "on", "a", "mat.", "Hello,", "world!", "it's", "10", "—", "“quoted”", "(x)", "$5"]
    pieces += ["and", "click", "share", "porn", "e-mail", "😀", "ok?", "...", "a.k.a", "b/c", "…", "naïve", "–"]
    texts = []
    for _ in range(400):
        n = rng.randint(0, 30)
        texts.append("".join(rng.choice(pieces) + rng.choice([" ", "  ", "\n", "\t", "\n\n"]) for _ in range(n)))
    texts += ["a" * 30, "abc" * 9 + " xyz", ""]
    special_table = _tables()[0]
    special = {chr(c) for c in np.flatnonzero(special_table)}
    stop = frozenset(load_words(default="obelics_stopwords_en.txt"))
    ours = ObelicsText(texts)
    words = [_obelics_words(t, special) for t in texts]
    share = [sum(w in stop for w in ws) / len(ws) if ws else 0 for ws in words]
    np.testing.assert_allclose(ours.words, [len(ws) for ws in words])
    np.testing.assert_allclose(ours.word_share(stop), share)
    np.testing.assert_allclose(ours.word_repetition(5), [_obelics_word_rep(ws, 5) for ws in words])
    np.testing.assert_allclose(ours.char_repetition(10), [_obelics_char_rep(t, 10) for t in texts])
    np.testing.assert_allclose(
        ours.special_share(), [sum(c in special for c in t) / len(t) if t else 0 for t in texts]
    )
    np.testing.assert_allclose(ours.punctuation_share(12), [_obelics_punct(t, 12) for t in texts])
    np.testing.assert_allclose(ours.punctuation_share(0), [_obelics_punct(t, -1) for t in texts])


# ---- the preset ----


def test_obelics_preset_in_chain_order_and_keeps_a_clean_document():
    chain = parse_chain("interleaved_obelics")
    names = [c.name for c in chain]
    levels = [n.split("_")[0] for n in names]
    assert levels == sorted(levels, key=["img", "para", "doc"].index) and names[-1] == "doc_images"
    by = {c.name: c for c in chain}
    assert (by["img_min_side"].min, by["img_max_side"].max, by["img_aspect"].min, by["img_aspect"].max) == (
        150,
        20000,
        0.5,
        2,
    )
    assert (by["para_words"].min, by["para_words"].max, by["doc_words"].min, by["doc_words"].max) == (
        4,
        1000,
        10,
        2000,
    )
    assert (by["para_word_rep"].max, by["doc_word_rep"].max, by["doc_special"].max) == (0.1, 0.2, 0.275)
    assert (by["para_stop_words"].min, by["doc_stop_words"].min, by["doc_punct"].min) == (0.3, 0.35, 0.03)
    assert (by["doc_images"].min, by["doc_images"].max) == (1, 30)
    clean = (
        "The museum opened a new exhibition about the history of printing, and it shows how the first books "
        "were made by hand in small workshops."
    )
    second = "Visitors can see old presses, and they can also try to set a line of type by themselves in the hall."
    b = docs(
        [clean, ("https://x.org/press.jpg", "jpeg", 800, 600), second, "Home | About", ("https://x.org/logo.png",)],
        ["Buy now"],
    )
    out = FilterChain(chain)(b)
    assert list(out["seg_reason"][0]) == ["", "", "", "para_words", "img_url_words"]
    assert list(out["drop_reason"]) == ["", "doc_words"]


def test_document_measures_summed_from_paragraphs_equal_the_joined_text():
    rng = random.Random(1)
    pieces = ["The", "cat,", "sat", "on", "mat.", "share", "“x”", "10", "—", "ok?", "a", "porn", "\n", "😀", "and"]
    documents, joined = [], []
    for _ in range(60):
        doc, kept = [], []
        for _ in range(rng.randint(0, 6)):
            if rng.random() < 0.2:
                doc.append(("https://x.org/a.jpg", "jpeg", 300, 300))
                continue
            text = " ".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            removed = rng.random() < 0.3
            doc.append((text, "gone") if removed else text)
            if not removed and text:
                kept.append(text)
        documents.append(doc)
        joined.append("\n\n".join(kept))
    b = docs(*[[p if isinstance(p, str) or p[0].startswith("https") else p[0] for p in d] for d in documents])
    for d, doc in enumerate(documents):  # mark the removed paragraphs
        for i, p in enumerate(doc):
            if isinstance(p, tuple) and p[1] == "gone":
                b["seg_reason"][d][i] = "para_test"
    names = ["words", "char_rep", "word_rep", "special", "stop_words", "flagged_words", "spam_words", "punct"]
    out = run(b, *(FilterConfig(f"doc_{n}") for n in names))
    ref = ObelicsText(joined)
    stop = frozenset(load_words(default="obelics_stopwords_en.txt"))
    flagged = frozenset(load_words(default="obelics_flagged_en.txt"))
    spam = frozenset(load_words(default="obelics_spam_en.txt"))
    want = {
        "words": ref.words,
        "char_rep": ref.char_repetition(10),
        "word_rep": ref.word_repetition(5),
        "special": ref.special_share(),
        "stop_words": ref.word_share(stop),
        "flagged_words": ref.word_share(flagged),
        "spam_words": ref.word_share(spam),
        "punct": ref.punctuation_share(0),
    }
    for n in names:
        np.testing.assert_allclose(out[f"doc_{n}"], want[n], rtol=1e-6, err_msg=n)
