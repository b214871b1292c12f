"""A body sent with Content-Encoding gzip or deflate is decoded before it is saved: urllib hands it over as
sent, and the compressed bytes were saved, then recorded as "not an image". Real server on 127.0.0.1."""
from __future__ import annotations

import gzip
import io
import zlib

import pytest
from PIL import Image

from tests.image_server import ImageServer, Route
from vlm_caption.download_client import bounded_download_image
from vlm_caption.download_summary import is_retryable

MAX_BYTES = 1 << 20


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (10, 100, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


JPEG = _jpeg()
GOOD = {"/gzip.jpg": Route(gzip.compress(JPEG), content_encoding="gzip"),
        "/zlib.jpg": Route(zlib.compress(JPEG), content_encoding="deflate"),
        "/raw-deflate.jpg": Route(_raw_deflate(JPEG), content_encoding="deflate"),
        "/twice.jpg": Route(gzip.compress(zlib.compress(JPEG)), content_encoding="deflate, gzip"),
        "/identity.jpg": Route(JPEG, content_encoding="identity"),
        "/labelled-gzip.jpg": Route(JPEG, content_encoding="gzip")}  # a plain image labelled gzip: kept as sent
BAD = {"/corrupt.jpg": (Route(b"\x1f\x8b" + bytes(40), content_encoding="gzip"), "undecodable body: "),
       "/cut.jpg": (Route(gzip.compress(JPEG)[:-30], content_encoding="gzip"), "undecodable body: "),
       "/bomb.jpg": (Route(gzip.compress(bytes(2 * MAX_BYTES)), content_encoding="gzip"), "too large: "),
       "/brotli.jpg": (Route(bytes(range(256)) * 4, content_encoding="br"), "unsupported Content-Encoding 'br'")}


@pytest.fixture(scope="module")
def server():
    with ImageServer({**GOOD, **{path: route for path, (route, _) in BAD.items()}}) as srv:
        yield srv


def _fetch(server: ImageServer, path: str):
    _, body, error = bounded_download_image((0, server.url(path)), 5, None, None, MAX_BYTES)
    return body, error


@pytest.mark.parametrize("path", list(GOOD))
def test_an_encoded_body_is_saved_decoded(server, path):
    body, error = _fetch(server, path)
    assert error is None and body.getvalue() == JPEG
    Image.open(body).verify()


@pytest.mark.parametrize("path", list(BAD))
def test_a_body_that_does_not_decode_is_a_permanent_failure_with_its_reason(server, path):
    body, error = _fetch(server, path)
    assert body is None and error.startswith(BAD[path][1]), error
    assert not is_retryable(error)


def test_download_data_saves_a_gzip_image_as_an_image(server, tmp_path):
    """End to end: the gzip image is valid, not an invalid (undecodable) file; the corrupt one is a failure."""
    import json

    from tests.test_download_exit_codes import _download, _source

    result = _download(_source(tmp_path, server, ["/gzip.jpg", "/corrupt.jpg"]), tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "download_summary.json").read_text())
    assert summary["valid"] == 1 and summary["invalid"] == 0 and summary["failed"] == 1, result.stderr


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/x.jpg", "FTP://127.0.0.1/x.jpg", "file:///etc/hostname"])
def test_a_redirect_to_another_scheme_is_a_permanent_failure_never_followed(target):
    """urllib follows a redirect to ftp://: an FTP server down was 'Connection refused' (retryable: exit 3 on every
    rerun), one up was read as the image though only http(s) URLs are fetched."""
    routes = {"/away.jpg": Route(status=302, location=target), "/here.jpg": Route(status=301, location="/ok.jpg"),
              "/ok.jpg": Route(b"\xff\xd8 an image")}
    with ImageServer(routes) as server:
        _, body, error = bounded_download_image((0, server.url("/away.jpg")), 5, None, None, MAX_BYTES)
        assert body is None and "is not allowed" in error and not is_retryable(error), error
        _, body, error = bounded_download_image((0, server.url("/here.jpg")), 5, None, None, MAX_BYTES)
        assert error is None and body.read() == b"\xff\xd8 an image"
