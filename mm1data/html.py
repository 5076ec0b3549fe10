"""HTML -> a document in OBELICS form: the main content as ordered paragraphs and images (selectolax/lexbor)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")


def resolve_image_url(src: str, base: str) -> str:
    """An image reference -> an absolute URL: http(s) kept; protocol-relative (`//host/x`) takes the base's scheme
    (https without a base); relative ones are joined to an http(s) base and kept verbatim without one (the reader
    then marks them image_relative_url); `data:` URLs are kept verbatim (the download stage drops them)."""
    src = src.strip()
    scheme = _scheme(src)
    if scheme:  # absolute (http, data or another scheme): as it is
        return src
    base_scheme = _scheme(base)
    if src.startswith("//"):
        return f"{base_scheme if base_scheme in ('http', 'https') else 'https'}:{src}"
    if base_scheme in ("http", "https"):
        try:
            return urljoin(base, src)
        except ValueError:  # e.g. a malformed IPv6 host in the base
            return src
    return src


def image_url_reason(url: str) -> str:
    """The seg_reason an image URL gets at reading: "" for http(s) URLs with a host and data: URLs (the download
    stage decides on those), image_relative_url for one that could not be resolved, image_bad_url otherwise."""
    scheme = _scheme(url)
    if scheme in ("http", "https"):
        host = url[len(scheme) + 3 : len(scheme) + 4]  # the first character after "://"
        return "" if url[len(scheme) : len(scheme) + 3] == "://" and host and host not in "/?#" else "image_bad_url"
    if scheme == "data":
        return ""
    return "image_relative_url" if not scheme and url.strip() else "image_bad_url"


def _scheme(url: str) -> str:
    """The URL's scheme, lowercased ("" for a relative URL). A Windows drive letter is no scheme we fetch."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


# Elements whose whole subtree is never main content.
DROP_TAGS = (
    "script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "button", "select",
    "textarea", "input", "label", "iframe", "object", "embed", "svg", "canvas", "video", "audio", "map", "dialog",
    "menu", "head", "title", "meta", "link",
)  # fmt: skip
# ARIA landmarks of the same parts, for sites that build them of divs
DROP_ROLES = frozenset(("navigation", "banner", "contentinfo", "complementary", "search", "dialog", "alert", "menu"))
# a class/id word that names a boilerplate block (cookie banners, menus, share bars, ...): whole words of the
# class or id split at -, _ and spaces, so "navigation" matches but "canvas" or "headline" do not
BOILER_WORDS = frozenset(
    "cookie cookies consent gdpr banner nav navbar navigation menu breadcrumb breadcrumbs sidebar footer header "
    "masthead social share sharing newsletter subscribe signup advert advertisement ads ad sponsor sponsored promo "
    "popup modal overlay related recommended comments comment disqus skip toolbar pagination pager".split()
)
# never dropped by a class/id word: the page's frame, and text-level elements (a heading's <a class="header"> is
# its permalink, not a page header)
KEEP_TAGS = frozenset("html body main article a h1 h2 h3 h4 h5 h6 p img picture figure b i em strong code".split())
BLOCK_TAGS = frozenset(
    "p div h1 h2 h3 h4 h5 h6 li ul ol dl dt dd section article main blockquote pre table thead tbody tfoot tr td th "
    "figure figcaption caption address details summary hr br center body".split()
)
MAX_LINK_SHARE = 0.5  # a paragraph with more of its characters inside links is boilerplate (menus, tag lists)
# a short paragraph saying one of these is a consent notice left without a telling class (OBELICS drops them too)
BOILER_TEXT = re.compile(
    r"\b(we use cookies|(this|our) (web)?site uses cookies|accept (all )?cookies|cookie (policy|settings)|"
    r"javascript (is )?(disabled|required)|enable javascript|subscribe to our newsletter|all rights reserved)\b",
    re.I,
)
BOILER_TEXT_MAX = 400  # characters: a longer paragraph that mentions cookies is content
MIN_MAIN_CHARS = 200  # a lone <main>/<article> with this much text is the content root (else the whole body)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # invisible control characters (a NUL, a BEL)
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
PLACEHOLDER = re.compile(r"^data:|blank|spacer|placeholder|pixel|transparent|lazy|loading", re.I)
_WORD_SPLIT = re.compile(r"[\s_\-]+")
_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.I)


@dataclass
class Page:
    """A page's main content in OBELICS form; url is the page URL used to resolve images (the one given, else the
    page's <link rel=canonical> or absolute <base href>, else "")."""

    url: str
    texts: list[str | None] = field(default_factory=list)
    images: list[str | None] = field(default_factory=list)
    alts: list[str | None] = field(default_factory=list)


def extract(html: bytes | str, page_url: str = "") -> tuple[list[str | None], list[str | None], list[str | None]]:
    """HTML -> (texts, images, alts) in OBELICS form: the main content as ordered paragraphs and images, without
    navigation, headers, footers, asides, scripts, styles, forms and boilerplate (cookie banners, link-dense blocks).

    Image URLs are resolved against <base href> / page_url (see resolve_image_url); an img's largest srcset
    candidate wins over its src, and a lazy-load data-src over a placeholder src. alts[i] is the img's alt text
    (None without one). Bytes are decoded with `encoding`, else the BOM, else the <meta> charset, else UTF-8, else
    cp1252, bad bytes replaced: malformed or mis-encoded HTML gives what can be read, never an exception."""
    page = extract_page(html, page_url)
    return page.texts, page.images, page.alts


def extract_page(html: bytes | str, page_url: str = "", encoding: str | None = None) -> Page:
    """extract() plus the page URL found in the page; `encoding` is the HTTP header's charset, if any."""
    from selectolax.lexbor import LexborHTMLParser

    text = html if isinstance(html, str) else decode_html(html, encoding)
    tree = LexborHTMLParser(text)
    url = page_url or _declared_url(tree)
    base = tree.css_first("base[href]")
    base_url = url
    if base is not None:
        href = (base.attributes.get("href") or "").strip()
        base_url = resolve_image_url(href, url) if href else url
        if _scheme(base_url) not in ("http", "https"):
            base_url = url
    root = tree.body
    page = Page(url)
    if root is None:
        return page
    _remove_boilerplate(root)
    _walk(_content_root(root), page, base_url)
    return page


def _content_root(body: Any) -> Any:
    """The page's lone <main>, else its lone <article>, when it holds real text (the publisher's own mark of the
    content: what lies outside it, related posts and teasers, is not); else the body."""
    for tag in ("main", "article"):
        nodes = body.css(tag)
        if len(nodes) == 1 and len(nodes[0].text(separator=" ", strip=True)) >= MIN_MAIN_CHARS:
            return nodes[0]
    return body


def decode_html(data: bytes, encoding: str | None = None) -> str:
    """Bytes -> text with the declared or sniffed charset; undecodable bytes become U+FFFD."""
    for enc in (encoding, _bom(data), _meta_charset(data)):
        if enc:
            try:
                return data.decode(enc, "replace")
            except LookupError:  # an unknown charset name
                continue
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")  # what browsers assume for undeclared legacy pages


def _bom(data: bytes) -> str | None:
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            return enc
    return None


def _meta_charset(data: bytes) -> str | None:
    m = _CHARSET.search(data, 0, 4096)
    return m.group(1).decode("ascii") if m else None


def _declared_url(tree: Any) -> str:
    for sel in ('link[rel="canonical"]', "base[href]"):
        node = tree.css_first(sel)
        href = (node.attributes.get("href") or "").strip() if node is not None else ""
        if href.startswith("//"):
            href = "https:" + href
        if _scheme(href) in ("http", "https"):
            return href
    return ""


def _remove_boilerplate(root: Any) -> None:
    for node in root.css(", ".join(DROP_TAGS)):
        node.decompose()
    for node in root.css("[role], [class], [id], [aria-hidden], [hidden], [style]"):
        attrs = node.attributes
        if "hidden" in attrs or attrs.get("aria-hidden") == "true" or _HIDDEN_STYLE.search(attrs.get("style") or ""):
            node.decompose()
            continue
        if (attrs.get("role") or "").lower() in DROP_ROLES:
            node.decompose()
            continue
        if node.tag in KEEP_TAGS:
            continue
        words = _WORD_SPLIT.split(f"{attrs.get('class') or ''} {attrs.get('id') or ''}".lower())
        if BOILER_WORDS.intersection(words):
            node.decompose()


def _walk(root: Any, page: Page, base: str) -> None:
    """Depth-first over the body with an explicit stack (a page may nest thousands of elements): inline text
    gathers into the current paragraph; a block element's start and end close it; an img closes it and follows."""
    parts: list[str] = []
    link_chars = [0]

    def flush() -> None:
        text = " ".join(_CONTROL.sub("", "".join(parts)).split())  # (inline elements add no space: <b>a</b>b is ab)
        linked = link_chars[0]
        parts.clear()
        link_chars[0] = 0
        if not text or linked > MAX_LINK_SHARE * len(text):
            return
        if len(text) <= BOILER_TEXT_MAX and BOILER_TEXT.search(text):
            return
        page.texts.append(text), page.images.append(None), page.alts.append(None)

    stack: list[tuple[Any, bool, int]] = [(root, False, 0)]  # (node, exiting, links open)
    while stack:
        node, exiting, in_link = stack.pop()
        tag = node.tag
        if exiting:
            flush()
            continue
        if tag == "-text":
            value = node.text_content or ""
            if value.strip():
                parts.append(value)
                if in_link:
                    link_chars[0] += len(" ".join(value.split()))
            continue
        if tag == "img":
            src, alt = _image_src(node.attributes, base, _picture_srcset(node)), node.attributes.get("alt")
            if src:
                flush()
                page.texts.append(None), page.images.append(src), page.alts.append(alt.strip() if alt else alt)
            continue
        if tag.startswith("-"):  # comments, doctype
            continue
        block = tag in BLOCK_TAGS
        if block:
            flush()
            stack.append((node, True, in_link))
        # an in-page anchor (a heading's permalink, a footnote) is no link away from the content
        links = in_link + (tag == "a" and not (node.attributes.get("href") or "").startswith("#"))
        stack.extend((child, False, links) for child in reversed(list(node.iter(include_text=True))))
    flush()


def _picture_srcset(img: Any) -> str:
    """The srcset of the <source> elements of the <picture> an <img> is in (all their candidates: the largest
    wins), "" if none."""
    parent = img.parent
    if parent is None or parent.tag != "picture":
        return ""
    sets = [n.attributes.get("srcset") or n.attributes.get("data-srcset") or "" for n in parent.css("source")]
    return ", ".join(s for s in sets if s.strip())


def _image_src(attrs: dict[str, str | None], base: str, picture: str = "") -> str:
    """The image URL of an <img>: its largest srcset candidate (with its <picture>'s sources), else data-src when
    src is missing or a placeholder (lazy loading), else src."""
    src = (attrs.get("src") or "").strip()
    placeholder = not src or bool(PLACEHOLDER.search(src))
    srcset = attrs.get("srcset") or (attrs.get("data-srcset") if placeholder else None)
    srcset = ", ".join(s for s in (srcset, picture) if s)
    best = _largest(srcset) if srcset else ""
    if not best and placeholder:
        best = next((v.strip() for k in LAZY_ATTRS if (v := attrs.get(k)) and v.strip()), "")
    best = best or src
    return resolve_image_url(best, base) if best else ""


LAZY_ATTRS = ("data-src", "data-lazy-src", "data-original", "data-url")


def _largest(srcset: str) -> str:
    """The candidate of a srcset with the largest width (w) or density (x) descriptor; the first on a tie."""
    best, best_size = "", -1.0
    for cand in re.split(r",\s+|,(?=\S+\s)", srcset.strip()):
        bits = cand.split()
        if not bits:
            continue
        size = 1.0
        if len(bits) > 1 and bits[1][-1:] in ("w", "x"):
            try:
                size = float(bits[1][:-1]) * (1.0 if bits[1][-1] == "w" else 1000.0)
            except ValueError:
                size = 1.0
        if size > best_size:
            best, best_size = bits[0], size
    return best
