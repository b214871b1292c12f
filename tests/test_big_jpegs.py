"""JPEGs over the pixel limit that decode at a reduced scale (Image.draft) under it are images, not bombs: every
stage (download validation, the loader, the download client) decides the same way; other formats over it are
still refused with their reason."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, JpegImagePlugin
from test_image_prep import bomb_png  # a PNG header declaring any size

from vlm_caption import images, validate
from vlm_caption.download_client import _is_image
from vlm_caption.images import MAX_IMAGE_PIXELS, ImageLoadError, load_image

SIDE = 13_500  # 182 MP: over the 179 MP limit (and over Pillow's own check in Image.open)


@pytest.fixture(scope="session")
def museum_scan(tmp_path_factory) -> Path:
    """A baseline greyscale JPEG of 13500x13500, one solid colour (~2 MB; ~190 MB of memory while encoded)."""
    assert SIDE * SIDE > MAX_IMAGE_PIXELS
    path = tmp_path_factory.mktemp("big") / "scan.jpg"
    Image.new("L", (SIDE, SIDE), 140).save(path, "JPEG", quality=50)
    return path


def test_a_jpeg_over_the_limit_that_drafts_under_it_is_loaded_at_the_reduced_scale(museum_scan):
    """It was refused ("DecompressionBombError: Image size (182250000 pixels) exceeds limit ..."), though the
    loader decodes it at 1/8 scale: 1688x1688, under 3 MP."""
    img = load_image(museum_scan, 896)
    assert img.mode == "RGB" and img.size == ((SIDE + 7) // 8, (SIDE + 7) // 8)
    assert img.getpixel((800, 800)) == (140, 140, 140)


def test_download_validation_keeps_it_with_its_full_size(museum_scan):
    """Validation recorded it as a decompression bomb (an invalid image, never captioned)."""
    assert validate.check_image(str(museum_scan)) == (SIDE, SIDE, "JPEG", None)


def test_the_download_client_takes_its_bytes_for_an_image(museum_scan):
    """A body that did not decode as its Content-Encoding said is kept when it is an image as sent: a JPEG over
    Pillow's check escaped as DecompressionBombError."""
    assert _is_image(museum_scan.read_bytes())
    assert _is_image(bomb_png(SIDE, SIDE))


def test_a_png_over_the_limit_is_still_refused_with_its_reason(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(SIDE, SIDE))
    with pytest.raises(ImageLoadError) as e:
        load_image(path)
    assert e.value.stage == "decode" and str(e.value).startswith("decompression bomb: ") and "pixels" in str(e.value)
    width, _, _, error = validate.check_image(str(path))
    assert width is None and error == str(e.value)  # the same reason in both stages


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_whose_draft_is_still_over_the_limit_is_refused(tmp_path, monkeypatch, progressive):
    """Under a 2 MP limit a 4800x4800 baseline JPEG decodes at 1/4 (1200x1200, 1.44 MP) and is loaded; under a
    1 MP limit that draft is still over it: refused, its decoded size named. A progressive JPEG holds every
    pixel's coefficients in memory at any scale: over the limit it is refused whatever its draft."""
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 2_000_000)
    path = tmp_path / "p.jpg"
    Image.new("L", (4800, 4800), 90).save(path, "JPEG", quality=50, progressive=progressive)
    if progressive:
        with pytest.raises(ImageLoadError, match=r"^image progressive JPEG declares 4800x4800 pixels, over the 2000"):
            load_image(path)
        assert validate.check_image(str(path))[3].startswith("image progressive JPEG declares 4800x4800 pixels")
    else:
        assert load_image(path).size == (1200, 1200)
        assert validate.check_image(str(path)) == (4800, 4800, "JPEG", None)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1_000_000)
    if not progressive:
        with pytest.raises(ImageLoadError, match=r"declares 4800x4800 pixels \(decoded at 1200x1200\), over the"):
            load_image(path)
        assert "(decoded at 1200x1200)" in validate.check_image(str(path))[3]


def test_a_jpeg_under_the_limit_is_validated_at_full_size(tmp_path, monkeypatch):
    """Validation decodes every pixel of an image under the limit (a draft would skip part of the decoder's work)."""
    path = tmp_path / "small.jpg"
    Image.new("RGB", (3000, 2500), (10, 20, 30)).save(path, "JPEG")
    seen = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, *a: seen.append(a))
    assert validate.check_image(str(path)) == (3000, 2500, "JPEG", None) and seen == []
