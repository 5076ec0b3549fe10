"""The download stage without Ray: every bad input becomes an exact drop reason; good images are resized."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import bad_routes, jpeg
from PIL import Image

from mm1data.demo import Route
from mm1data.download import DownloadConfig, FetchError, ImageDownloader, decode_image, is_disallowed, resolve


def run_stage(urls: list[str], **cfg) -> dict:
    cfg = {
        "allow_private_hosts": True,
        "timeout_s": 1.0,
        "retries": 2,
        "backoff_s": 0.05,
        "max_bytes": 200_000,
        "image_size": 128,
        **cfg,
    }
    batch = {"url": np.array(urls, dtype=object), "drop_reason": np.array([""] * len(urls), dtype=object)}
    return ImageDownloader(DownloadConfig(**cfg))(batch)


def test_every_bad_input_gets_its_reason(server):
    server.routes.update(bad_routes())
    server.routes["/ok.jpg"] = Route(jpeg(400, 300))
    paths = [
        "/ok.jpg",
        "/missing.jpg",
        "/flaky.jpg",
        "/slow.jpg",
        "/loop",
        "/page.html",
        "/truncated.jpg",
        "/random.jpg",
        "/bomb.png",
        "/big.jpg",
        "/noai.jpg",
        "/forbidden.jpg",
    ]
    out = run_stage([server.url(p) for p in paths])
    assert list(out["drop_reason"]) == [
        "",
        "http_404",
        "",
        "timeout",
        "redirect_loop",
        "content_type",
        "decode_error",
        "decode_error",
        "decompression_bomb",
        "too_large",
        "robots_optout",
        "http_403",
    ]
    assert list(out["download_status"][:3]) == [200, 404, 200]
    assert out["download_attempts"][2] == 2  # one 500, then success
    assert server.routes["/flaky.jpg"].hits == 2
    assert server.routes["/forbidden.jpg"].hits == 1  # 4xx is never retried
    assert server.routes["/slow.jpg"].hits == 3  # timeouts are retried
    assert out["image"][0][:2] == b"\xff\xd8" and out["image"][1] == b""
    assert (out["width"][0], out["height"][0], out["orig_width"][0], out["orig_height"][0]) == (171, 128, 400, 300)
    assert out["download_bytes"][0] == len(server.routes["/ok.jpg"].body)
    # img2dataset's names beside ours
    assert (out["original_width"][0], out["original_height"][0]) == (400, 300)
    assert list(out["status"][:3]) == ["success", "failed_to_download", "success"]
    assert out["status"][6] == "failed_to_resize" and out["error_message"][6] == "decode_error"
    assert list(out["error_message"][:2]) == ["", "http_404"]


def test_private_addresses_refused_without_opt_in(server):
    server.routes["/ok.jpg"] = Route(jpeg())
    urls = [
        server.url("/ok.jpg"),
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:1/x.jpg",
        "http://10.0.0.1/x.jpg",
        "ftp://example.com/x.jpg",
    ]
    out = run_stage(urls, allow_private_hosts=False)
    assert list(out["drop_reason"]) == ["private_host"] * 4 + ["bad_url"]
    assert server.routes["/ok.jpg"].hits == 0  # refused before connecting


def test_redirect_to_private_host_refused(server, monkeypatch):
    import mm1data.download as dl

    real = dl.resolve
    # the test server counts as public here, every other address keeps the real check
    monkeypatch.setattr(dl, "resolve", lambda h, p, allow: "127.0.0.1" if h == "127.0.0.1" else real(h, p, allow))
    server.routes["/ok.jpg"] = Route(jpeg())
    server.routes["/hop"] = Route(b"", status=302, headers={"Location": "http://169.254.169.254/"})
    server.routes["/hop2"] = Route(b"", status=301, headers={"Location": "/ok.jpg"})
    out = run_stage([server.url("/hop"), server.url("/hop2")], allow_private_hosts=False)
    assert list(out["drop_reason"]) == ["private_host", ""]
    monkeypatch.setattr(dl, "resolve", real)
    with pytest.raises(FetchError, match="private_host"):
        resolve("127.0.0.1", 80, allow_private=False)
    assert resolve("127.0.0.1", 80, allow_private=True) == "127.0.0.1"


def test_rows_already_dropped_are_not_fetched(server):
    server.routes["/ok.jpg"] = Route(jpeg())
    batch = {
        "url": np.array([server.url("/ok.jpg")] * 2, dtype=object),
        "drop_reason": np.array(["", "empty_caption"], dtype=object),
    }
    out = ImageDownloader(DownloadConfig(allow_private_hosts=True))(batch)
    assert list(out["drop_reason"]) == ["", "empty_caption"]
    assert server.routes["/ok.jpg"].hits == 1 and out["image"][1] == b""


def test_x_robots_tag_parsing_matches_img2dataset():
    d = ("noai", "noimageai", "noindex", "noimageindex")
    assert is_disallowed(["noai"], d)
    assert is_disallowed(["index, NoImageAI"], d)
    assert is_disallowed(["mm1data: noai"], d)
    assert not is_disallowed(["otherbot: noai"], d)
    assert not is_disallowed(["index, follow"], d)


@pytest.mark.parametrize(
    "mode,size,expected",
    [
        ("keep_ratio", 100, (133, 100)),
        ("keep_ratio_largest", 100, (100, 75)),
        ("center_crop", 100, (100, 100)),
        ("border", 100, (100, 100)),
        ("no", 100, (400, 300)),
        ("keep_ratio", 1000, (400, 300)),
        ("center_crop", 1000, (400, 300)),  # not resized, so not cropped or padded (img2dataset's rule)
        ("border", 1000, (400, 300)),
    ],
)
def test_resize_modes(mode, size, expected):
    d = decode_image(jpeg(400, 300), DownloadConfig(resize_mode=mode, image_size=size))
    assert (d.width, d.height) == expected
    assert Image.open(io.BytesIO(d.data)).size == expected
    assert (d.orig_width, d.orig_height) == (400, 300)


def test_border_pads_with_white_like_img2dataset():
    d = decode_image(jpeg(400, 200, color=(10, 10, 10)), DownloadConfig(resize_mode="border", image_size=100))
    im = Image.open(io.BytesIO(d.data)).convert("RGB")
    assert im.size == (100, 100) and min(im.getpixel((50, 2))) > 240 and max(im.getpixel((50, 50))) < 60


def test_unchanged_image_keeps_original_bytes_and_alpha_goes_on_white():
    body = jpeg(100, 80)
    assert decode_image(body, DownloadConfig(image_size=512)).data == body
    rgba = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    d = decode_image(buf.getvalue(), DownloadConfig(image_size=100))
    assert d.ext == "jpg" and Image.open(io.BytesIO(d.data)).getpixel((50, 50))[0] > 240


def test_keep_alive_connections_are_reused_without_failures(server):
    """With no retries, every fetch over a reused connection must succeed (a half-read response used to
    leave the connection unusable, failing every second request)."""
    for i in range(20):
        server.routes[f"/k{i}.jpg"] = Route(jpeg(150, 120, seed=i))
    out = run_stage([server.url(f"/k{i}.jpg") for i in range(20)], retries=0, threads=1)
    assert list(out["drop_reason"]) == [""] * 20 and list(out["download_attempts"]) == [1] * 20


def test_non_ascii_paths_are_fetched_and_surprises_stay_per_row(server, monkeypatch):
    server.routes["/caf%C3%A9.jpg"] = Route(jpeg())
    out = run_stage([server.url("/café.jpg"), server.url("/café.jpg?x=ü")], retries=0)
    assert list(out["drop_reason"]) == ["", ""]

    import mm1data.download as dl

    def boom(body, cfg):
        raise RuntimeError("a bug in a decoder")

    monkeypatch.setattr(dl, "decode_image", boom)
    out = run_stage([server.url("/café.jpg")], retries=0)
    assert list(out["drop_reason"]) == ["fetch_error"]


@pytest.fixture
def tls_cert(tmp_path):
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed: HTTPS not tested")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_verifies_certificates_on_the_pinned_connection(tls_cert):
    import ssl

    from mm1data.demo import ImageServer
    from mm1data.download import Fetcher

    with ImageServer({"/a.jpg": Route(jpeg())}, tls=tls_cert) as srv:
        assert srv.url("/a.jpg").startswith("https://")
        out = run_stage([srv.url("/a.jpg")], retries=0)
        assert list(out["drop_reason"]) == ["ssl"]  # self-signed: refused by the default trust store
        fetcher = Fetcher(DownloadConfig(allow_private_hosts=True, retries=0))
        fetcher._ssl = ssl.create_default_context(cafile=tls_cert[0])  # trust this test CA only
        body, status, attempts = fetcher.fetch(srv.url("/a.jpg"))
        assert (status, attempts) == (200, 1) and body == srv.routes["/a.jpg"].body


# Every address here reaches a private, loopback, link-local or metadata IPv4 address, directly or embedded in IPv6.
REFUSED = [
    "127.0.0.1",
    "169.254.169.254",  # AWS, GCP, Azure metadata
    "100.100.100.200",  # Alibaba metadata (CGNAT range)
    "192.0.0.192",  # Oracle Cloud metadata (IETF protocol assignments)
    "10.1.2.3",
    "0.0.0.0",
    "224.0.0.1",
    "::1",
    "::",
    "fe80::1%eth0",
    "fd00:ec2::254",  # AWS metadata over IPv6
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible (deprecated)
    "::a9fe:a9fe",  # ::169.254.169.254
    "::ffff:0:127.0.0.1",  # IPv4-translated (SIIT)
    "::ffff:0:a00:1",  # ::ffff:0:10.0.0.1
    "64:ff9b::7f00:1",  # NAT64 well-known prefix -> 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 -> 169.254.169.254
    "64:ff9b::c0a8:101",  # NAT64 -> 192.168.1.1
    "64:ff9b::6464:64c8",  # NAT64 -> 100.100.100.200
    "64:ff9b:1::808:808",  # local-use NAT64 (RFC 8215): not globally reachable whatever it embeds
    "64:ff9b:1:ab00::7f00:1",
    "2002:7f00:1::",  # 6to4 -> 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 -> 169.254.169.254
    "2002:a00:1:1::1",  # 6to4 -> 10.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, obfuscated client 127.0.0.1
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",  # Teredo server 10.0.0.1, client 8.8.8.8
    "2607:f8b0:4004:800::5efe:a00:1",  # ISATAP interface id -> 10.0.0.1
    "2607:f8b0:4004:800:200:5efe:7f00:1",  # ISATAP, u bit set -> 127.0.0.1
]
ALLOWED = [
    "8.8.8.8",
    "93.184.216.34",
    "2001:4860:4860::8888",
    "2a00:1450:4001:82b::200e",
    "64:ff9b::808:808",  # NAT64 to a public address: how a DNS64 network reaches IPv4-only hosts
    "::ffff:8.8.8.8",
    "2002:808:808::1",  # 6to4 of a public address
    "2607:f8b0:4004:800::5efe:808:808",  # ISATAP of a public address
    "2607:f8b0:4004:800:1234:5efe:7f00:1",  # not an ISATAP interface id
]


@pytest.mark.parametrize("address", REFUSED)
def test_guard_refuses_private_addresses_also_when_embedded_in_ipv6(address, monkeypatch):
    import mm1data.download as dl

    assert not dl.is_public_address(address)
    monkeypatch.setattr(dl, "_lookup", lambda host, port: [address])
    with pytest.raises(FetchError, match="private_host"):
        resolve("images.example", 80, allow_private=False)
    assert resolve("images.example", 80, allow_private=True) == address
    # one bad address in an answer is enough: the next lookup could pick it
    monkeypatch.setattr(dl, "_lookup", lambda host, port: ["8.8.8.8", address])
    with pytest.raises(FetchError, match="private_host"):
        resolve("images.example", 80, allow_private=False)


@pytest.mark.parametrize("address", ALLOWED)
def test_guard_allows_public_addresses(address, monkeypatch):
    import mm1data.download as dl

    assert dl.is_public_address(address)
    monkeypatch.setattr(dl, "_lookup", lambda host, port: [address])
    assert resolve("images.example", 80, allow_private=False) == address


def test_embedded_ipv4_of_each_form():
    from ipaddress import ip_address

    from mm1data.download import embedded_ipv4

    def got(a):
        return [str(x) for x in embedded_ipv4(ip_address(a))]

    assert got("::ffff:1.2.3.4") == ["1.2.3.4"]
    assert got("::1.2.3.4") == ["1.2.3.4"]
    assert got("64:ff9b::1.2.3.4") == ["1.2.3.4"]
    assert got("2002:102:304::") == ["1.2.3.4"]
    assert got("2001:0:4136:e378:8000:63bf:fefd:fcfb") == ["65.54.227.120", "1.2.3.4"]  # server, de-obfuscated client
    assert got("2001:db8::5efe:102:304") == ["1.2.3.4"]
    assert got("2001:4860:4860::8888") == []


def test_download_stage_refuses_hosts_that_resolve_to_embedded_private_addresses(server, monkeypatch):
    import mm1data.download as dl

    server.routes["/ok.jpg"] = Route(jpeg())
    answers = {
        "nat64.example": "64:ff9b::7f00:1",
        "sixtofour.example": "2002:7f00:1::",
        "mapped.example": "::ffff:7f00:1",
    }
    real = dl._lookup
    monkeypatch.setattr(dl, "_lookup", lambda host, port: [answers[host]] if host in answers else real(host, port))
    port = server.url("/ok.jpg").split(":")[2].split("/")[0]
    urls = [f"http://{host}:{port}/ok.jpg" for host in answers]
    out = run_stage(urls, allow_private_hosts=False)
    assert list(out["drop_reason"]) == ["private_host"] * 3
    assert server.routes["/ok.jpg"].hits == 0  # refused before connecting


def test_resize_uses_img2dataset_interpolations():
    """Downscaling averages the source pixels (img2dataset's default "area", Pillow's BOX) after the reduced JPEG
    decode; another interpolation can be chosen, and an unknown name is a config error."""
    from mm1data.config import ConfigError
    from mm1data.pipelines import load_run_config

    body = jpeg(900, 600, seed=3)
    out = {}
    for mode in ("area", "nearest"):
        d = decode_image(body, DownloadConfig(image_size=256, downscale_interpolation=mode, encode_format="png"))
        out[mode] = Image.open(io.BytesIO(d.data)).convert("RGB")
    ref = Image.open(io.BytesIO(body))
    ref.draft("RGB", (384, 256))
    ref = ref.convert("RGB").resize((384, 256), Image.Resampling.BOX)
    assert out["area"].size == (384, 256) and out["area"].tobytes() == ref.tobytes()
    assert out["nearest"].tobytes() != out["area"].tobytes()
    with pytest.raises(ConfigError, match="downscale_interpolation"):
        load_run_config("pipelines/caption.yaml", ["download.downscale_interpolation=bicubic"])


def test_user_agent_names_the_project(server):
    import mm1data

    server.routes["/ok.jpg"] = Route(jpeg())
    run_stage([server.url("/ok.jpg")])
    agent = server.routes["/ok.jpg"].request_headers["User-Agent"]
    assert f"mm1data/{mm1data.__version__}" in agent and "github.com/mm1data" not in agent
