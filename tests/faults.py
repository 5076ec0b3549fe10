"""A fault-injecting HTTP proxy for S3 tests: 503 SlowDown and bodies cut mid-stream, for a seeded share of requests.

It sits on 127.0.0.1 in front of moto's server and is the endpoint every test reaches S3 through (conftest sets
AWS_ENDPOINT_URL to it before Ray starts, so Ray workers and DataLoader workers use it too). With both rates at 0,
the default, it only forwards. `with proxy.faults(rate_503=0.25, rate_cut=0.1):` turns faults on for the code
inside, in this process and in every worker (the proxy runs here, as threads, and decides per request).

A fault is one of:
- "503": answered here, without forwarding, with S3's 503 error body, SlowDown or another code (the request is not
  applied);
- "cut": forwarded, then the response goes back with its full Content-Length but only half of its body, and the
  connection drops (a response without a body: the connection drops before any response; the request was
  applied, its reply is lost).
The same request (method, path, Range) is never faulted more than `max_in_a_row` times in a row, so a client that
retries at least that many times always gets through: a test under faults can assert the same output, not a
probability.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{}</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
# hop-by-hop headers and those the proxy sets itself
_SKIP_REQUEST = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "content-length"}
_SKIP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rate_503 = self.rate_cut = 0.0
        self.code = "SlowDown"  # the 503's S3 error code
        self.max_in_a_row = 3
        self.counts: collections.Counter[str] = collections.Counter()  # requests, 503, cut
        self._rng = random.Random(0)
        self._streak: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @contextlib.contextmanager
    def faults(
        self, rate_503: float = 0.25, rate_cut: float = 0.1, seed: int = 0, code: str = "SlowDown"
    ) -> Iterator[FaultProxy]:
        """Faults on for the block (counts restart at 0), off after it. `code`: the 503's S3 error code; botocore
        backs off from SlowDown as from throttling (~1 s, doubling), from ServiceUnavailable 20 times less."""
        with self._lock:
            self.rate_503, self.rate_cut, self.code = rate_503, rate_cut, code
            self._rng, self._streak = random.Random(seed), {}
            self.counts.clear()
        try:
            yield self
        finally:
            with self._lock:
                self.rate_503 = self.rate_cut = 0.0

    def decide(self, method: str, path: str, byte_range: str | None) -> str:
        """ "" (forward), "503" or "cut" for one request."""
        key = (method, path, byte_range)
        with self._lock:
            self.counts["requests"] += 1
            if not (self.rate_503 or self.rate_cut):
                return ""
            draw = self._rng.random()
            fault = "503" if draw < self.rate_503 else "cut" if draw < self.rate_503 + self.rate_cut else ""
            if fault and self._streak.get(key, 0) >= self.max_in_a_row:
                fault = ""
            self._streak[key] = self._streak.get(key, 0) + 1 if fault else 0
            if fault:
                self.counts[fault] += 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 and botocore's connection pool expect

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(out)
                out.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self._body()
        fault = proxy.decide(self.command, self.path, self.headers.get("Range"))
        if fault == "503":
            error = ERROR_BODY.format(proxy.code).encode()
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(error)
            return
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _SKIP_REQUEST:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            headers = resp.getheaders()
        except (OSError, http.client.HTTPException):
            self.send_error(502)
            return
        finally:
            conn.close()
        if fault == "cut" and (not data or self.command == "HEAD"):
            self.close_connection = True  # the request was applied, the reply is lost
            return
        self.send_response_only(resp.status, resp.reason)
        for name, value in headers:
            if name.lower() not in _SKIP_RESPONSE or (self.command == "HEAD" and name.lower() == "content-length"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "cut":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy
