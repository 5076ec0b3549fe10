"""mm1data.html.extract: the main content of a page as ordered paragraphs and images, exact outputs."""

from __future__ import annotations

from mm1data.html import decode_html, extract, extract_page, image_url_reason, resolve_image_url

PAGE = "https://www.example.org/blog/2024/post.html"
ARTICLE = (
    "<html><head><title>T</title><style>p {color: red}</style><script>var a = '<p>no</p>';</script></head><body>"
    '<header><img src="/logo.png" alt="Logo"><h1>Example Blog</h1></header>'
    '<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About</a></li></ul></nav>'
    '<div class="cookie-banner">We use cookies. <button>Accept</button></div>'
    "<main><h1>A walk by the sea</h1>"
    "<p>The <b>tide</b> was low and the sand was <a href='/wet'>wet</a> under our feet all morning.</p>"
    '<img src="img/shore.jpg" alt="The shore at dawn">'
    "<p>Birds flew over the dunes.<br>Then the rain came.</p>"
    '<figure><img src="//cdn.example.net/gull.png" srcset="//cdn.example.net/gull-320.png 320w, '
    '//cdn.example.net/gull-1280.png 1280w, //cdn.example.net/gull-640.png 640w">'
    "<figcaption>A gull on a post.</figcaption></figure>"
    '<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="../lazy/boat.jpg" alt="">'
    '<img src="data:image/png;base64,iVBORw0KGgo=" alt="inline">'
    '<p><a href="/a">Tags</a> <a href="/b">Sea</a> <a href="/c">Sand</a></p>'
    "<form><input name=q><label>Search</label></form>"
    "</main><aside><h3>Related</h3><p>Another post about something else entirely.</p></aside>"
    "<footer><p>Copyright 2024 Example Blog, all rights reserved.</p></footer>"
    "<script>track();</script></body></html>"
)


def test_article_order_resolution_and_boilerplate():
    texts, images, alts = extract(ARTICLE, PAGE)
    assert texts == [
        "A walk by the sea",
        "The tide was low and the sand was wet under our feet all morning.",
        None,
        "Birds flew over the dunes.",
        "Then the rain came.",
        None,
        "A gull on a post.",
        None,
        None,
    ]
    assert images == [
        None,
        None,
        "https://www.example.org/blog/2024/img/shore.jpg",  # relative
        None,
        None,
        "https://cdn.example.net/gull-1280.png",  # protocol-relative, the largest srcset candidate
        None,
        "https://www.example.org/blog/lazy/boat.jpg",  # lazy data-src behind a placeholder src
        "data:image/png;base64,iVBORw0KGgo=",  # kept verbatim: the download stage drops it with a reason
    ]
    assert alts == [None, None, "The shore at dawn", None, None, None, None, "", "inline"]


def test_base_href_and_canonical_url():
    html = (
        '<html><head><base href="https://static.example.com/assets/">'
        '<link rel="canonical" href="https://news.example.com/story"></head>'
        '<body><p>Story text here.</p><img src="p.jpg"></body></html>'
    )
    page = extract_page(html)
    assert page.url == "https://news.example.com/story"  # no page URL given: the canonical link
    assert page.images == [None, "https://static.example.com/assets/p.jpg"]  # <base href> wins for resolution
    assert extract_page(html, "http://given.example/x").url == "http://given.example/x"
    no_url = extract_page("<p>Words.</p><img src='/rel.png'><img src='//cdn.example/a.png'>")
    assert no_url.url == "" and no_url.images == [None, "/rel.png", "https://cdn.example/a.png"]
    assert [image_url_reason(u) for u in ["/rel.png", "https://cdn.example/a.png", "data:,x", "ftp://h/a", ""]] == [
        "image_relative_url",
        "",
        "",
        "image_bad_url",
        "image_bad_url",
    ]


def test_boilerplate_by_role_class_and_hidden():
    html = (
        "<body><div role='navigation'><p>Menu text that is long enough to count.</p></div>"
        "<div id='main-sidebar'><p>Sidebar words here.</p></div>"
        "<div class='social-share'><p>Share this page with friends.</p></div>"
        "<div class='navigation-wrapper'><p>Next and previous.</p></div>"
        "<div class='headline'><p>A headline is content.</p></div>"
        "<div style='display: none'><p>Hidden text.</p></div><p hidden>Also hidden.</p>"
        "<p>This site uses cookies to improve your experience.</p>"
        "<div class='canvas'><p>Canvas is not nav.</p></div>"
        "<p><a href='/1'>One</a>, <a href='/2'>Two</a>, <a href='/3'>Three</a></p>"  # link-dense
        "<p>Read <a href='/x'>this</a> before the long sentence that follows it here.</p>"
        "<h2><a class='header' href='#usage'>Usage</a></h2></body>"  # a permalink anchor is not a link away
    )
    texts, images, _ = extract(html, PAGE)
    assert texts == [
        "A headline is content.",
        "Canvas is not nav.",
        "Read this before the long sentence that follows it here.",
        "Usage",
    ]
    assert images == [None] * 4


def test_lone_article_is_the_content_root():
    body = "<p>" + "Long article sentence with words. " * 10 + "</p>"
    html = f"<body><div><p>Teaser for another story.</p></div><article>{body}</article><p>After.</p></body>"
    assert extract(html, PAGE)[0] == [" ".join(body[3:-4].split())]
    two = f"<body><article>{body}</article><article><p>Second.</p></article></body>"  # a listing: no single root
    assert extract(two, PAGE)[0][-1] == "Second."


def test_picture_sources_and_srcset_density():
    html = (
        "<p>Intro.</p><picture><source srcset='/a.webp 1x, /a@2x.webp 2x' type='image/webp'>"
        "<img src='/a.jpg' alt='A'></picture><img srcset='/b.jpg, /b@3x.jpg 3x'>"
    )
    assert extract(html, PAGE)[1] == [None, "https://www.example.org/a@2x.webp", "https://www.example.org/b@3x.jpg"]


def test_malformed_and_non_utf8_html_never_raises():
    cases = {
        b"<p>Caf\xe9 au lait</p>": ["Caf\xe9 au lait"],  # undeclared, not UTF-8: cp1252
        b'<meta charset="iso-8859-7"><p>\xe1\xe2\xe3</p>': ["\u03b1\u03b2\u03b3"],  # declared charset
        b'<meta charset="no-such-charset"><p>ok \xff</p>': ["ok \xff"],  # unknown name: sniffing goes on
        b"\xef\xbb\xbf<p>bom \xc3\xa9</p>": ["bom \xe9"],
        b"<p>unclosed <b>bold <i>italic<p>next": ["unclosed bold italic", "next"],
        b"<div><p>a</div></p></span>text<<>>": ["a", "text<<>>"],
        b"\x00\x01<p>nul\x00 byte\x07</p>": ["nul byte"],  # control characters are not text
        b"": [],
        b"<html><body></body></html>": [],
        b"just text": ["just text"],
    }
    for raw, expected in cases.items():
        assert extract(raw, PAGE)[0] == expected, raw
    deep = "<div>" * 5000 + "<p>deep</p>" + "</div>" * 5000
    assert extract(deep, PAGE)[0] == ["deep"]  # no recursion limit
    assert decode_html(b"caf\xc3\xa9", "utf-8") == "caf\xe9" and decode_html(b"\xe9", "bogus") == "\xe9"


def test_resolve_image_url():
    assert resolve_image_url(" img/a.png ", "https://h.example/d/p.html") == "https://h.example/d/img/a.png"
    assert resolve_image_url("//c.example/a.png", "http://h.example/") == "http://c.example/a.png"
    assert resolve_image_url("//c.example/a.png", "") == "https://c.example/a.png"
    assert resolve_image_url("/a.png", "") == "/a.png"
    assert resolve_image_url("DATA:image/png;base64,AA", PAGE) == "DATA:image/png;base64,AA"
    assert resolve_image_url("https://x.example/a.png", PAGE) == "https://x.example/a.png"
