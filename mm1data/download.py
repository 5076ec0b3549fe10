"""Image fetching stage: many concurrent HTTP(S) fetches per worker, guarded, retried, decoded and resized.

Hand-written on http.client rather than urllib/requests because the connection must go to the exact
address that passed the private-host check (no second DNS lookup an attacker could rebind), every
redirect hop is checked again, and keep-alive connections are reused per thread.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import numpy as np
from PIL import Image

from mm1data import __version__
from mm1data.config import check
from mm1data.phash import phash, to_hex
from mm1data.stage import Batch

log = logging.getLogger(__name__)
USER_AGENT_TOKEN = "mm1data"
# The project and its version, in the form crawlers use; no contact URL is invented: a large crawl should set
# download.user_agent to one naming its operator (e.g. "... ; +https://your.site/crawler").
USER_AGENT = f"Mozilla/5.0 (compatible; {USER_AGENT_TOKEN}/{__version__}; image-text pre-training data; python)"
REDIRECTS = (301, 302, 303, 307, 308)
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
# img2dataset's interpolation names -> Pillow's filters. "area" (cv2.INTER_AREA, img2dataset's downscale default)
# averages the source pixels under each target pixel, which is what Pillow's BOX filter computes.
INTERPOLATION = {
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
    "cubic": Image.Resampling.BICUBIC,
    "linear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
PIL_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # kept as fetched when unchanged
URL_SAFE = "/?#[]@!$&'()*+,;=:%~"  # reserved characters and existing escapes stay; non-ASCII is percent-encoded
MAX_CONNECTIONS = 8  # keep-alive connections kept per thread (web lists are mostly distinct hosts)
DNS_TTL_S = 300.0
IDLE_REUSE_S = 4.0  # reconnect rather than reuse a connection idle this long (common keep-alive timeout: 5 s)


@dataclass(frozen=True)
class DownloadConfig:
    threads: int = 32  # concurrent fetches per worker
    workers: int = 0  # download actors; 0 = elastic: one per CPU at the start up to one per CPU it can reach
    batch_size: int = 256  # rows per map_batches call
    timeout_s: float = 10.0  # per attempt, connect + whole body (img2dataset: 10)
    retries: int = 2  # extra attempts for timeouts, connection errors, 429 and 5xx; never for other 4xx
    backoff_s: float = 0.5  # first retry waits this, then doubles (Retry-After honoured up to max_backoff_s)
    max_backoff_s: float = 10.0
    max_bytes: int = 20_000_000  # body cap
    max_redirects: int = 5
    max_pixels: int = 89_478_485  # decompression-bomb guard, checked on the header before decoding (PIL's limit)
    image_size: int = 512  # target side in px for the resize mode
    resize_mode: str = "keep_ratio"  # no | keep_ratio | keep_ratio_largest | center_crop | border (img2dataset's)
    resize_only_if_bigger: bool = True  # never upscale
    downscale_interpolation: str = "area"  # area | lanczos | cubic | linear | nearest (img2dataset's default: area)
    upscale_interpolation: str = "lanczos"  # the same choices (img2dataset's default: lanczos)
    encode_format: str = "jpg"  # jpg | png | webp for resized images (unchanged jpg/png/webp keep their bytes)
    encode_quality: int = 95
    allow_private_hosts: bool = False  # fetch from private/loopback/link-local/metadata addresses (tests, demo)
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    user_agent: str = USER_AGENT

    def __post_init__(self) -> None:
        for key in ("threads", "batch_size", "max_bytes", "max_pixels", "image_size"):
            check(self, key, ge=1)
        for key in ("workers", "retries", "max_redirects", "backoff_s", "max_backoff_s"):
            check(self, key, ge=0)
        check(self, "timeout_s", gt=0)
        check(self, "encode_quality", ge=0, le=100)
        check(self, "resize_mode", choices=RESIZE_MODES)
        check(self, "encode_format", choices=("jpg", "png", "webp"))
        check(self, "downscale_interpolation", choices=tuple(INTERPOLATION))
        check(self, "upscale_interpolation", choices=tuple(INTERPOLATION))


class FetchError(Exception):
    """A per-URL failure; `reason` becomes the row's download_error and drop_reason."""

    def __init__(self, reason: str, status: int = 0, retryable: bool = False, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason, self.status, self.retryable, self.retry_after = reason, status, retryable, retry_after


# ---- address guard ---------------------------------------------------------------------------------------


_DNS: dict[tuple[str, int], tuple[float, list[str]]] = {}


def _lookup(host: str, port: int) -> list[str]:
    """getaddrinfo with a small per-process cache (a TTL, since workers live for hours)."""
    now = time.monotonic()
    hit = _DNS.get((host, port))
    if hit and now - hit[0] < DNS_TTL_S:
        return hit[1]
    try:
        addrs = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except (OSError, UnicodeError) as e:
        raise FetchError("dns") from e
    if len(_DNS) > 10_000:
        _DNS.clear()
    _DNS[(host, port)] = (now, addrs)
    return addrs


# IPv6 ranges whose low 32 bits are an IPv4 address that the route delivers to: IPv4-compatible (::a.b.c.d,
# deprecated), SIIT's IPv4-translated (::ffff:0:a.b.c.d), and the well-known NAT64 prefix (RFC 6052), through which
# a DNS64 network reaches any IPv4 address, 127.0.0.1 and 169.254.169.254 included. (IPv4-mapped ::ffff:a.b.c.d,
# 6to4 and Teredo have ipaddress properties.)
_LOW32_V4 = tuple(ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
# Not globally reachable per IANA although Python 3.11's is_global says otherwise (later Pythons agree): IETF
# protocol assignments (Oracle Cloud's metadata service is 192.0.0.192) and local-use NAT64 (RFC 8215; its IPv4
# address sits at an offset the operator chose, so it cannot be checked by position).
_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in ("192.0.0.0/24", "64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses that an IPv6 address carries and that a route may deliver to: IPv4-mapped,
    IPv4-compatible, IPv4-translated, NAT64 64:ff9b::/96, 6to4 (2002::/16), Teredo (2001::/32: the server and the
    de-obfuscated client) and an ISATAP interface id (::0:5efe:a.b.c.d, u/g bits ignored)."""
    out = []
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if any(ip in net for net in _LOW32_V4):
        out.append(low)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if (int(ip) >> 32) & 0xFCFFFFFF == 0x00005EFE:  # ISATAP: IID 00-00-5E-FE + IPv4 (RFC 5214)
        out.append(low)
    return out


def is_public_address(address: str) -> bool:
    """True for an address a fetch may go to: globally reachable, not multicast, and every IPv4 address embedded
    in an IPv6 one (embedded_ipv4) likewise. is_global is False for private, loopback, link-local
    (169.254.169.254), CGNAT (100.64/10, Alibaba's 100.100.100.200), unique-local (fd00:ec2::254), reserved and
    documentation ranges."""
    ip = ipaddress.ip_address(address.split("%")[0])
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        found += embedded_ipv4(ip)
    return all(a.is_global and not a.is_multicast and not any(a in net for net in _NOT_GLOBAL) for a in found)


def resolve(host: str, port: int, allow_private: bool) -> str:
    """Resolve `host` and return one address; refuse non-public addresses (is_public_address) unless allowed.
    Every address of the answer is checked, not only the one used: the next lookup could pick another."""
    addrs = _lookup(host, port)
    if not allow_private and not all(is_public_address(a) for a in addrs):
        raise FetchError("private_host")
    return addrs[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to a pre-resolved address while sending the real Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


# ---- fetching ----------------------------------------------------------------------------------------------


def is_disallowed(values: list[str], directives: tuple[str, ...]) -> bool:
    """X-Robots-Tag opt-out, parsed as img2dataset does: `noai`, or `mm1data: noai` for our token only."""
    for value in values:
        token, sep, rest = value.partition(":")
        ua, items = (token.strip().lower(), rest) if sep else (None, value)
        if (ua is None or ua == USER_AGENT_TOKEN) and any(d.strip().lower() in directives for d in items.split(",")):
            return True
    return False


class Fetcher:
    """Fetches URLs with per-thread keep-alive connections; thread-safe."""

    def __init__(self, cfg: DownloadConfig) -> None:
        self.cfg = cfg
        self._local = threading.local()
        self._ssl = ssl.create_default_context()

    def _conn(self, scheme: str, host: str, port: int, ip: str, timeout: float) -> http.client.HTTPConnection:
        pool = self._local.__dict__.setdefault("pool", OrderedDict())
        key = (scheme, host, port, ip)
        conn = pool.get(key)
        if conn is None:
            if scheme == "https":
                conn = _PinnedHTTPS(host, port, ip, timeout, self._ssl)
            else:
                conn = _PinnedHTTP(host, port, ip, timeout)
            conn.last_used = time.monotonic()
            pool[key] = conn
            if len(pool) > MAX_CONNECTIONS:  # least recently used goes, so sockets stay bounded
                pool.popitem(last=False)[1].close()
        elif time.monotonic() - conn.last_used > IDLE_REUSE_S:  # the server has likely closed it
            conn.close()
        pool.move_to_end(key)
        conn.last_used = time.monotonic()
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        pool = self._local.__dict__.get("pool", {})
        for k, v in list(pool.items()):
            if v is conn:
                del pool[k]

    def fetch(self, url: str) -> tuple[bytes, int, int]:
        """-> (body, http status, attempts). Raises FetchError after the allowed retries."""
        cfg = self.cfg
        for attempt in range(cfg.retries + 1):
            try:
                body, status = self._fetch_once(url)
                return body, status, attempt + 1
            except FetchError as e:
                if not e.retryable or attempt == cfg.retries:
                    e.attempts = attempt + 1
                    raise
                wait = min(cfg.max_backoff_s, max(cfg.backoff_s * 2**attempt, e.retry_after))
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _fetch_once(self, url: str) -> tuple[bytes, int]:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.timeout_s
        seen = set()
        for _ in range(cfg.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchError("bad_url")
            if url in seen:
                raise FetchError("redirect_loop")
            seen.add(url)
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError as e:
                raise FetchError("bad_url") from e
            ip = resolve(parts.hostname, port, cfg.allow_private_hosts)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", retryable=True)
            conn = self._conn(parts.scheme, parts.hostname, port, ip, remaining)
            path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=URL_SAFE)
            try:
                conn.request("GET", path, headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"})
                resp = conn.getresponse()
                status = resp.status
                if status in REDIRECTS:
                    location = resp.getheader("Location")
                    resp.read(65536)
                    if resp.will_close or not resp.isclosed():
                        self._drop(conn)
                    if not location:
                        raise FetchError(f"http_{status}", status)
                    url = urljoin(url, location)
                    continue
                if not 200 <= status < 300:
                    retry_after = _retry_after(resp.getheader("Retry-After"))
                    raise FetchError(f"http_{status}", status, status == 429 or status >= 500, retry_after)
                if cfg.disallowed_header_directives and is_disallowed(
                    resp.headers.get_all("X-Robots-Tag") or [], cfg.disallowed_header_directives
                ):
                    raise FetchError("robots_optout", status)
                ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
                if ctype and not (
                    ctype.startswith("image/") or ctype in ("application/octet-stream", "binary/octet-stream")
                ):
                    raise FetchError("content_type", status)
                length = resp.getheader("Content-Length")
                if length and length.isdigit() and int(length) > cfg.max_bytes:
                    raise FetchError("too_large", status)
                body = self._read_body(resp, deadline)
                if resp.will_close:
                    self._drop(conn)
                return body, status
            except FetchError:
                self._drop(conn)  # the response was not read to its end: the connection cannot be reused
                raise
            except TimeoutError as e:
                self._drop(conn)
                raise FetchError("timeout", retryable=True) from e
            except ssl.SSLError as e:
                self._drop(conn)
                raise FetchError("ssl") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop(conn)
                raise FetchError("connection", retryable=True) from e
        raise FetchError("too_many_redirects")

    def _read_body(self, resp: http.client.HTTPResponse, deadline: float) -> bytes:
        chunks, n = [], 0
        while True:
            if time.monotonic() > deadline:  # a server trickling bytes must not hold a thread forever
                raise TimeoutError("body deadline")
            chunk = resp.read(65536)  # read(), not read1(): it marks the response done for keep-alive
            if not chunk:
                break
            n += len(chunk)
            if n > self.cfg.max_bytes:
                raise FetchError("too_large", resp.status)
            chunks.append(chunk)
        return b"".join(chunks)


def _retry_after(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


# ---- decode and resize -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    data: bytes
    ext: str
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str  # the fetched image's format, lowercased PIL name: jpeg, png, webp, gif, ...
    phash: int  # pHash (mm1data.phash, as imagehash.phash) of the stored pixels: after the resize, before encoding


def target_size(w: int, h: int, cfg: DownloadConfig) -> tuple[int, int]:
    """Size to scale (w, h) to before any crop or border, as img2dataset's resize modes define it."""
    s = cfg.image_size
    if cfg.resize_mode == "no":
        return w, h
    side = min(w, h) if cfg.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
    if cfg.resize_only_if_bigger and side <= s:
        return w, h
    scale = s / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def decode_image(body: bytes, cfg: DownloadConfig) -> Decoded:
    """Decode with a pixel-count guard on the header, reduced JPEG decode, resize, re-encode when changed."""
    try:
        im = Image.open(io.BytesIO(body))  # lazy: reads the header only
        fmt = im.format
        w, h = im.size
    except Image.DecompressionBombError as e:
        raise FetchError("decompression_bomb") from e
    except Exception as e:
        raise FetchError("decode_error") from e
    if w * h > cfg.max_pixels or w <= 0 or h <= 0:
        raise FetchError("decompression_bomb")
    tw, th = target_size(w, h, cfg)
    resize = (tw, th) != (w, h)
    try:
        if fmt in ("JPEG", "MPO") and resize:
            im.draft("RGB", (tw, th))  # DCT-domain downscale by 1/2, 1/4 or 1/8: the main speed-up
        im.load()  # a full decode even when unchanged: truncated or corrupt data fails here, not in training
        if not resize and fmt in PIL_FORMATS and im.mode in ("RGB", "L"):
            # unchanged: keep the original bytes
            return Decoded(body, PIL_FORMATS[fmt], w, h, w, h, fmt.lower(), phash(im))
        im = _to_rgb(im)
        if resize:  # as img2dataset: crop and border apply only when the image is resized
            up = tw > im.size[0]
            mode = cfg.upscale_interpolation if up else cfg.downscale_interpolation
            im = im.resize((tw, th), INTERPOLATION[mode])
            if cfg.resize_mode == "center_crop":
                s = min(im.size)
                left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
                im = im.crop((left, top, left + s, top + s))
            elif cfg.resize_mode == "border":  # padded with white, as img2dataset does
                canvas = Image.new("RGB", (cfg.image_size, cfg.image_size), (255, 255, 255))
                canvas.paste(im, ((cfg.image_size - im.size[0]) // 2, (cfg.image_size - im.size[1]) // 2))
                im = canvas
        # hashed here, where the pixels are decoded (no second decode): the stored image, before its lossy encoding
        ph = phash(im)
        out = io.BytesIO()
        ext = cfg.encode_format
        if ext == "jpg":
            im.save(out, "JPEG", quality=cfg.encode_quality)
        elif ext == "webp":
            im.save(out, "WEBP", quality=cfg.encode_quality)
        else:
            im.save(out, "PNG")
    except Image.DecompressionBombError as e:
        raise FetchError("decompression_bomb") from e
    except Exception as e:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError, ...
        raise FetchError("decode_error") from e
    return Decoded(out.getvalue(), ext, im.size[0], im.size[1], w, h, (fmt or "").lower(), ph)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent pixels on white, as a browser shows them
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")


# ---- the stage ---------------------------------------------------------------------------------------------


OUT_COLUMNS = (
    "image",
    "image_ext",
    "width",
    "height",
    "orig_width",
    "orig_height",
    "sha256",
    "download_status",
    "download_error",
    "download_bytes",
    "download_time_s",
    "download_attempts",
    "orig_format",
    "phash",
)


def _failed(status: int, reason: str, nbytes: int, seconds: float, attempts: int) -> tuple:
    """An OUT_COLUMNS row without an image: a failed fetch or decode (reason), or a row not fetched (reason "")."""
    return (b"", "", 0, 0, 0, 0, "", status, reason, nbytes, seconds, attempts, "", "")


class ImageDownloader:
    """Fetches batch["url"] for rows not yet dropped.

    Adds: image (bytes, b"" on failure), image_ext, width, height (after resize), orig_width, orig_height,
    sha256 (of the fetched bytes), phash (16 hex digits of the stored image's pHash, "" on failure: hex because Ray
    Data turns a nullable integer column into float64, which cannot hold 64 bits; staging stores it as a nullable
    int64), download_status (HTTP code, 0 if none), download_error ("" or a reason),
    download_bytes, download_time_s, download_attempts, and img2dataset's names (img2dataset_columns). Failed rows
    get drop_reason = download_error.
    """

    def __init__(self, cfg: DownloadConfig) -> None:
        self.cfg = cfg
        self.fetcher = Fetcher(cfg)
        self.pool = ThreadPoolExecutor(cfg.threads)

    def _one(self, url: str) -> tuple:
        t0 = time.monotonic()
        status, nbytes, attempts = 0, 0, 0
        try:
            body, status, attempts = self.fetcher.fetch(url)
            nbytes = len(body)
            img = decode_image(body, self.cfg)
            sha = hashlib.sha256(body).hexdigest()
            return (
                img.data,
                img.ext,
                img.width,
                img.height,
                img.orig_width,
                img.orig_height,
                sha,
                status,
                "",
                nbytes,
                time.monotonic() - t0,
                attempts,
                img.orig_format,
                to_hex(img.phash),
            )
        except FetchError as e:
            return _failed(
                e.status or status, e.reason, nbytes, time.monotonic() - t0, getattr(e, "attempts", attempts or 1)
            )
        except Exception:  # a per-URL surprise must not fail the batch: record it as data and go on
            log.warning("unexpected error fetching %r", url, exc_info=True)
            return _failed(status, "fetch_error", nbytes, time.monotonic() - t0, attempts or 1)

    def __call__(self, batch: Batch) -> Batch:
        todo = batch["drop_reason"] == ""
        skipped = _failed(0, "", 0, 0.0, 0)
        futures = [self.pool.submit(self._one, str(u)) if t else None for u, t in zip(batch["url"], todo)]
        rows = [f.result() if f is not None else skipped for f in futures]
        cols = list(zip(*rows)) if rows else [()] * len(OUT_COLUMNS)
        dtypes = (
            object,
            object,
            np.int32,
            np.int32,
            np.int32,
            np.int32,
            object,
            np.int32,
            object,
            np.int64,
            np.float32,
            np.int32,
            object,
            object,
        )
        for name, values, dt in zip(OUT_COLUMNS, cols, dtypes):
            arr = np.empty(len(values), dtype=object) if dt is object else np.asarray(values, dtype=dt)
            if dt is object:
                arr[:] = values
            batch[name] = arr
        failed = (batch["download_error"] != "") & (batch["drop_reason"] == "")
        batch["drop_reason"] = np.where(failed, batch["download_error"], batch["drop_reason"]).astype(object)
        batch.update(img2dataset_columns(batch, todo))
        return batch


def img2dataset_columns(batch: Batch, attempted: np.ndarray) -> Batch:
    """img2dataset's field names beside ours, so tools written for its output read ours: original_width,
    original_height, status (success | failed_to_download | failed_to_resize, as img2dataset sets it: a decode
    failure is its resize step failing) and error_message. A row dropped before its download (e.g. an unreadable
    input row) is failed_to_download with its drop reason as the message. error_message is "" on success here and in
    meta (a column that is None in a whole batch would get another Arrow type than in the next one, which Ray Data
    cannot merge); the sample json has img2dataset's null (build_sample)."""
    error = np.where(attempted, batch["download_error"], batch["drop_reason"]).astype(object)
    ok = error == ""
    status = np.where(ok, "success", np.where(error == "decode_error", "failed_to_resize", "failed_to_download"))
    return {
        "original_width": batch["orig_width"].copy(),
        "original_height": batch["orig_height"].copy(),
        "status": status.astype(object),
        "error_message": error,
    }
