"""Loading an image safely: fully decoded RGB (EXIF orientation, modes flattened), big JPEGs decoded at a
reduced scale that still covers the model's input, decompression bombs refused with their reason.

The pixel limit (MAX_IMAGE_PIXELS) is on what is decoded: a baseline JPEG decodes at 1/2 to 1/8 scale
(`Image.draft`), so a 400 MP museum scan that decodes at ~6 MP is an image, not a bomb. Pillow's own check in
`Image.open` refuses anything declaring over 2 x Image.MAX_IMAGE_PIXELS before a draft can be asked for: for a
JPEG only, `open_checked` opens it again with the JPEG plugin alone (no process-wide setting changes; every
other format and every other Pillow path keeps Pillow's check) and decides by its own.
"""
from __future__ import annotations

import functools
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

# Pixel count above which an image is refused before decoding (a decompression bomb): the size it declares, or for
# a baseline JPEG the size it decodes at after its draft. Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 2 * 89_478_485
_JPEG_MAGIC = b"\xff\xd8\xff"
# Gemma 3's image side (its SigLIP tower's input): what images are decoded for when the engine does not say.
MODEL_IMAGE_SIZE = 896
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
IMAGE_STAGES = ("load", "decode")  # failures of the image itself; "generate" is the model's (retryable)


class ImageLoadError(Exception):
    """An image that cannot be used; `stage` is load (file) or decode (bytes)."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


# A JPEG decoded at 1/2 scale whose result is only just larger than the target differs from the
# processor's output on the full image by more than the 0.01 budget (mean |diff| on [-1, 1]): 1985x1991
# -> 993x996 gave 0.0115, 2479x2000 -> 1240x1000 gave 0.0084 for 896; the DCT scaling is a different
# filter and almost no resize is left to smooth it. With >= 25 % left to resize on both sides every
# measured image stayed under 0.003. So for 896 the draft fires from 2240 px on both sides
# (4000x3000 -> 2000x1500); 3000x2000 decodes at full size.
DRAFT_MARGIN = 1.25


def draft_box(target: int | tuple[int, int]) -> tuple[int, int]:
    """The box to pass to `Image.draft` for a model input of `target` (side or (width, height)).

    Pillow decodes at 1/2, 1/4 or 1/8 scale, the largest whose result still covers the box on both
    sides: for 896 px, 4000x3000 -> 2000x1500, 8000x6000 -> 2000x1500, 3000x2000 stays full size. The
    resize that follows never upsamples a side the original had pixels for.
    """
    width, height = (target, target) if isinstance(target, int) else target
    return round(DRAFT_MARGIN * int(width)), round(DRAFT_MARGIN * int(height))


def load_image(path: Path | None, target_size: int = MODEL_IMAGE_SIZE) -> Image.Image:
    """Open an image fully decoded as RGB, or raise ImageLoadError(stage, reason)."""
    if path is None:
        raise ImageLoadError("load", "no safe image path for this key (outside the data dir or malformed key)")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # open() of a FIFO blocked for ever: the whole run hung
            raise ImageLoadError("load", f"{path.name} is not a regular file")
        f = open(path, "rb")
    except OSError as e:
        raise ImageLoadError("load", f"cannot open {path.name}: {e.strerror or e}") from None
    with f:
        try:
            img, _ = open_checked(f, target_size)
            img.load()
            return to_rgb(img)
        except ImageLoadError:
            raise
        except UnidentifiedImageError:  # PIL's own message names a file object, not the problem
            raise ImageLoadError("decode", f"{path.name}: not a recognised image format") from None
        except Exception as e:  # noqa: BLE001  PIL's plugins raise more (NotImplementedError from a DDS, ...): the
            # row fails with its reason, where one odd file used to stop the run at the same image on every relaunch
            raise ImageLoadError("decode", f"{type(e).__name__}: {e}") from None


def open_checked(f: BinaryIO, target_size: int | tuple[int, int] = MODEL_IMAGE_SIZE,
                 draft: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """(the image opened, not decoded yet; the size it declares): a JPEG drafted for `target_size` (always, or
    with draft=False only when its full size is over the limit), anything over MAX_IMAGE_PIXELS as it will
    decode refused with ImageLoadError("decode", reason). Pillow's own errors pass through."""
    _quiet_decompression_bomb_warnings()
    try:
        img = Image.open(f)
    except Image.DecompressionBombError as e:
        f.seek(0)
        if f.read(len(_JPEG_MAGIC)) != _JPEG_MAGIC:
            raise ImageLoadError("decode", f"decompression bomb: {e}") from None
        f.seek(0)
        img = JpegImagePlugin.jpeg_factory(f)  # Image.open's plugin for it, without its size check: ours below
    w, h = img.size
    over = w * h > MAX_IMAGE_PIXELS
    # A smaller decode (DRAFT_MARGIN); MPO: what Pillow names a camera JPEG carrying a preview (MPF). A progressive
    # JPEG holds every pixel's coefficients in memory whatever the scale: over the limit, it is refused.
    draftable = img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "CMYK", "YCbCr")
    if draftable and (draft or over) and not (over and img.info.get("progressive")):
        img.draft(img.mode if img.mode != "YCbCr" else "RGB", draft_box(target_size))
    dw, dh = img.size
    if dw * dh > MAX_IMAGE_PIXELS:
        at = f" (decoded at {dw}x{dh})" if (dw, dh) != (w, h) else ""
        kind = " progressive JPEG" if img.format in ("JPEG", "MPO") and img.info.get("progressive") else ""
        raise ImageLoadError("decode", f"image{kind} declares {w}x{h} pixels{at}, over the {MAX_IMAGE_PIXELS} limit")
    return img, (w, h)


@functools.cache
def _quiet_decompression_bomb_warnings() -> None:
    """Big art scans are fine (MAX_IMAGE_PIXELS is the limit): one process-wide filter, installed once, as
    catch_warnings() around every image is not thread-safe (loader threads could drop each other's filter)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's table).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(img: Image.Image) -> Image.Image:
    """`img` as it is shown (EXIF or XMP orientation applied): `img` itself when no turn is needed, so most images
    are not copied (~1 ms at 2.7 MP). Not ImageOps.exif_transpose: it also writes the EXIF bytes back, which
    raised on a tag whose type differs from the one Pillow knows (struct.error), failing an image that decodes."""
    transpose = _ORIENTATION_TRANSPOSE.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    if transpose is None:
        return img
    turned = img.transpose(transpose)
    del turned.getexif()[ExifTags.Base.Orientation]  # upright now: exif_transpose or upright again leaves it as is
    return turned


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied (`upright`); palette, alpha, CMYK and 16-bit modes flattened to 8-bit RGB."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = upright(img)
    if "transparency" in img.info and not img.mode.startswith("I"):
        # A palette's or a colour key's transparency (PNG tRNS on P, L or RGB; GIF): the keyed pixels get the white
        # background below, as the model's image processor gives them (an RGB key was kept: a black key stayed black).
        img = img.convert("RGBA")
    if img.mode == "P":
        img = img.convert("RGB")
    if img.mode.startswith("I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")
