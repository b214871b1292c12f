"""img2dataset's downloader with two bounds per response: its size (--max-image-mb) and its whole duration.

img2dataset's client reads a body with one `r.read()`, and urllib's timeout bounds each wait for bytes, not the
response: a body that never ends (chunked, or no Content-Length) grows in the worker's memory until it is killed,
and a server that drips a byte now and then holds the thread, and its shard, forever. Here the body is read in
chunks: past the size cap the row fails for good ("too large", permanent), past WHOLE_RESPONSE_TIMEOUTS times
--timeout it fails as "timed out" (retryable, like any timeout). A body sent with Content-Encoding gzip or deflate
is decoded before it is saved (urllib does not), under the same size cap; one that does not decode fails for good.

It hooks in by subclassing img2dataset's Downloader (which its download() builds and hands to every worker): in
the worker, the call swaps img2dataset.downloader.download_image, the function its retry loop calls, for the
bounded one below. Only that one function is replaced; the shard loop, the writer and the retries stay its own.
Given a download_workers.WorkerErrors, the call also makes it img2dataset.downloader's `traceback`: the tracebacks
img2dataset prints for a failed sample or shard go to a log file instead of the terminal.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import http.client
import importlib
import io
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from img2dataset import downloader as i2d

from . import locks

WHOLE_RESPONSE_TIMEOUTS = 3  # a whole response may take this many --timeout (each wait for bytes: one)
CHUNK = 1 << 16


class BoundedDownloader(i2d.Downloader):
    """img2dataset's Downloader; its rows are fetched by bounded_download_image (max_bytes per response)."""

    def __init__(self, *args, max_bytes: int, errors=None, shard_lock: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes
        self.errors = errors  # a download_workers.WorkerErrors, or None: img2dataset prints its tracebacks
        self.shard_lock = shard_lock  # data_layout.WORKERS_LOCK, held shared while on a shard
        self.parent = os.getpid()  # built in the run's process, the parent of img2dataset's pool workers

    def __call__(self, row):
        max_bytes = self.max_bytes

        def fetch(row, timeout, user_agent_token, disallowed_header_directives):
            return bounded_download_image(row, timeout, user_agent_token, disallowed_header_directives, max_bytes)

        i2d.download_image = fetch  # this worker process's img2dataset; each call sets its own bound again
        if self.errors is not None:
            i2d.traceback = self.errors  # its print_exc() calls (the module's only use of traceback)
        if self.shard_lock is None:
            return super().__call__(row)
        # A run killed alone (kill -9, the OOM killer) leaves its pool workers running a while: each finished its
        # shard in place (download_data.py's now exit within a second: download_workers.exit_with_parent; a run
        # started from Python has no such watch). A rerun took the free download.lock and wrote the same shard's
        # files at once. Held while on the shard, this lock turns a rerun away (download.check_no_workers_left);
        # taken before the parent is asked, so that a worker past the question had a live run then, and a rerun
        # can only start after it took it.
        fd = locks.open_lock(Path(self.shard_lock))
        try:
            locks.flock(fd, fcntl.LOCK_SH)
            if os.getppid() != self.parent:  # reparented: its run is gone, a rerun does the shard
                return False, row
            return super().__call__(row)
        finally:
            os.close(fd)


@contextlib.contextmanager
def bounded_downloads(max_bytes: int, distributor: str = "multiprocessing", errors=None,
                      shard_lock: str | None = None):
    """While inside, img2dataset's download() builds a BoundedDownloader (pickled to its workers) that sends their
    tracebacks to `errors` (a download_workers.WorkerErrors) when given, and holds `shard_lock` while on a shard.
    Only with the multiprocessing distributor: Spark and Ray executors unpickle it where only img2dataset need be
    installed (not this package), so they keep img2dataset's own client, without these bounds."""
    if distributor != "multiprocessing":
        yield
        return
    main = importlib.import_module("img2dataset.main")  # `from img2dataset import main` is its main() function
    original = main.Downloader

    def build(*args, **kwargs):
        return BoundedDownloader(*args, max_bytes=max_bytes, errors=errors, shard_lock=shard_lock, **kwargs)

    main.Downloader = build
    try:
        yield
    finally:
        main.Downloader = original


# The sockets this thread's request opened (redirects open more): a timer shuts them at the deadline, since the
# body loop's check cannot end a status line or headers dripped a byte per --timeout (http.client reads up to
# 100 header lines of 64 KiB each: days).
_opened = threading.local()


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        _opened.sockets.append(self.sock)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        _opened.sockets.append(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect to ftp:// too: only http(s) URLs are fetched (download_source.FETCHED_URL_RE), so
    a redirect elsewhere is the row's permanent failure (an FTP server down was a retryable "connection refused"
    on every rerun; one up was read as if the image were downloaded)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(target, code, f"{msg} - Redirection to url '{target[:200]}' is not allowed "
                                         "(only http(s) URLs are fetched)", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@functools.cache
def _opener() -> urllib.request.OpenerDirector:
    """Built at the first request, not at import (build_opener reads the proxy settings of the environment)."""
    return urllib.request.build_opener(_HTTPHandler, _HTTPSHandler, _RedirectHandler)


def bounded_download_image(row, timeout, user_agent_token, disallowed_header_directives, max_bytes: int):
    """img2dataset.downloader.download_image with the body read in chunks under both bounds; same results:
    (key, BytesIO, None) or (key, None, the error message)."""
    key, url = row
    user_agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
    if user_agent_token:
        user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    deadline = time.monotonic() + WHOLE_RESPONSE_TIMEOUTS * timeout
    sockets = _opened.sockets = []
    expired = threading.Event()

    def expire():
        expired.set()
        for sock in list(sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(WHOLE_RESPONSE_TIMEOUTS * timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
        with _opener().open(request, timeout=timeout) as r:
            if disallowed_header_directives and i2d.is_disallowed(r.headers, user_agent_token,
                                                                  disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            length = r.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                return key, None, too_large(max_bytes, f"Content-Length {length}")
            body = bytearray()
            while chunk := r.read1(CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    return key, None, too_large(max_bytes, "the body")
                if time.monotonic() > deadline:
                    return key, None, _timed_out(timeout, f"{len(body)} bytes so far")
            if expired.is_set():  # the timer shut the socket: the body ended there
                return key, None, _timed_out(timeout, f"{len(body)} bytes so far")
            if r.length:  # read1 ends quietly where read() raised: the connection closed before Content-Length
                raise http.client.IncompleteRead(bytes(body), r.length)
            encoding = r.headers.get("Content-Encoding", "")
        # urllib hands the body over as sent: a gzip one saved as is was then recorded "not an image"
        decoded, error = decode_body(bytes(body), encoding, max_bytes)
        if error is not None:
            return key, None, error
        return key, io.BytesIO(decoded), None
    except Exception as err:  # noqa: BLE001 (img2dataset's contract: any failure is the row's error message)
        if expired.is_set():  # what the shut socket made of it ("Remote end closed connection ...") misleads
            return key, None, _timed_out(timeout, "status line and headers included")
        return key, None, str(err)
    finally:
        timer.cancel()


def decode_body(body: bytes, content_encoding: str, max_bytes: int) -> tuple[bytes, str | None]:
    """The body with its Content-Encoding (gzip, deflate; several: in the order applied) undone, or the
    reason it cannot be: an unknown coding, a corrupt stream, or more than max_bytes once decoded (a small
    compressed body can expand to gigabytes). A body that does not decode but is an image as sent (a server
    that labels plain images gzip: saved as they were before decoding was added) is kept as it is."""
    decoded, error = _undo_codings(body, content_encoding, max_bytes)
    if error is not None and not error.startswith("too large") and _is_image(body):
        return body, None
    return decoded, error


def _is_image(body: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(body)):  # the header only: no decode
            return True
    except Image.DecompressionBombError:  # an image, too big for Pillow's own check: validation decides (images.py)
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):  # (Pillow's parsers raise these)
        return False


def _undo_codings(body: bytes, content_encoding: str, max_bytes: int) -> tuple[bytes, str | None]:
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding not in _ZLIB_WBITS:
            return b"", f"unsupported Content-Encoding {coding!r}: the body cannot be decoded"
        try:
            body = _inflate(body, coding, max_bytes)
        except zlib.error as err:
            return b"", f"undecodable body: Content-Encoding {coding} does not decompress ({err})"
        if len(body) > max_bytes:
            return b"", too_large(max_bytes, f"the body decompressed ({coding})")
    return body, None


# zlib's window bits per HTTP coding: gzip framing; deflate is zlib-wrapped by the RFC, raw from some servers
_ZLIB_WBITS = {"gzip": (16 + zlib.MAX_WBITS,), "x-gzip": (16 + zlib.MAX_WBITS,),
               "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS)}


def _inflate(body: bytes, coding: str, max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes of the decompressed body (more says "too large"); zlib.error when the
    stream is corrupt or ends early."""
    error = None
    for wbits in _ZLIB_WBITS[coding]:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, max_bytes + 1)
        except zlib.error as err:
            error = err
            continue
        if len(out) > max_bytes or inflater.eof:
            return out
        error = zlib.error("the compressed stream ends early")
    raise error


def _timed_out(timeout: int, detail: str) -> str:
    return f"timed out: the whole response took over {WHOLE_RESPONSE_TIMEOUTS * timeout} s ({detail})"


def too_large(max_bytes: int, what: str) -> str:
    return f"too large: {what} is over the {max_bytes // (1 << 20)} MB cap (--max-image-mb)"
