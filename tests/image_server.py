"""A tiny threaded HTTP server on 127.0.0.1 for download tests.

It serves a fixed table of responses, path -> Route(status, content_type, body, delay_seconds, and ways to
misbehave), on a random free port, and counts the requests each path received, so a test can check that a rerun
fetched nothing. Paths not in the table answer 404 the way `python -m http.server` does.

    with ImageServer({"/img/0.jpg": Route(body=jpeg_bytes)}) as server:
        url = server.url("/img/0.jpg")
        ...
        assert server.request_count() == 1
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    delay_seconds: float = 0.0  # sleep before answering (a response slower than the client's timeout)
    drip_seconds: float = 0.0  # sleep before each byte of the body (each wait shorter than the client's timeout)
    endless: bool = False  # after the body, zero bytes without end (no Content-Length: ends when the client goes)
    advertised_length: int | None = None  # Content-Length sent instead of the body's (more: cut short)
    content_encoding: str | None = None  # sent as Content-Encoding (the body given is already encoded)
    location: str | None = None  # sent as Location (a redirect, with status 301/302/307)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        self.server.count(path)
        route = self.server.routes.get(path)
        if route is None:
            # Same reason phrase as http.server, so urllib reports "HTTP Error 404: File not found".
            self.send_error(404, "File not found")
            return
        if route.delay_seconds:
            time.sleep(route.delay_seconds)
        try:
            if route.status >= 400:
                self.send_error(route.status)
                return
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            if route.location:
                self.send_header("Location", route.location)
            if route.content_encoding:
                self.send_header("Content-Encoding", route.content_encoding)
            if not route.endless:
                self.send_header("Content-Length", str(route.advertised_length or len(route.body)))
            self.end_headers()
            if route.drip_seconds:
                for i in range(len(route.body)):
                    self.wfile.write(route.body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(route.drip_seconds)
            else:
                self.wfile.write(route.body)
            while route.endless:
                self.wfile.write(bytes(1 << 16))
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout passed): expected for slow routes.
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature of the base class)
        """Keep test output quiet."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow route must not hold up shutdown

    def __init__(self, routes: dict[str, Route]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = dict(routes)
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.open_connections, self.last_accept = 0, time.monotonic()

    def count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def process_request(self, request, client_address) -> None:  # (at accept: before its thread starts)
        with self._lock:
            self.open_connections += 1
            self.last_accept = time.monotonic()
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.open_connections -= 1

    def handle_error(self, request, client_address) -> None:
        """Connections the client dropped are expected here; stay quiet."""


class ImageServer:
    """Context manager: starts the server in a background thread, stops it on exit."""

    def __init__(self, routes: dict[str, Route]):
        self._server = _Server(routes)
        self._thread = threading.Thread(target=self._server.serve_forever, name="image-server", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def replace_routes(self, routes: dict[str, Route]) -> None:
        """Serve these routes from now on (the same bodies without a delay, once a slow phase is over)."""
        self._server.routes = dict(routes)

    def request_count(self, path: str | None = None) -> int:
        """Requests received so far, for one path or in total."""
        with self._server._lock:
            if path is not None:
                return self._server.requests[path]
            return sum(self._server.requests.values())

    def wait_idle(self, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
        """Return once no connection is open and none was accepted for `quiet_s`: a client killed with requests
        in flight had sent them, and the server counts them when it reads them, after the kill."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._server._lock:
                idle = not self._server.open_connections and time.monotonic() - self._server.last_accept >= quiet_s
            if idle:
                return
            assert time.monotonic() < deadline, "the image server never went idle"
            time.sleep(0.05)

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
