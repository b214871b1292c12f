"""The loader's fast path from a decoded image to Gemma 3 pixel values.

Gemma 3's image processor resizes to a fixed square (bilinear, no aspect keep), rescales by 1/255 and
normalises with mean = std = 0.5. Its PIL backend does that with Pillow's scalar resampler and NumPy
float arithmetic: ~3x the CPU of decoding the JPEG. `ImagePrep` does the same steps in C:

- the JPEG is decoded at a reduced scale when it is at least twice the target (+25 %) on both sides
  (`images.load_image` passes `draft_box(target)` to `Image.draft`);
- the resize is torch's antialiased uint8 kernel (SIMD; a port of Pillow's convolution, so it matches the
  processor's output to about 1/255), measured against Pillow (`reducing_gap` too) and OpenCV in BENCHMARKS.md;
- rescale + normalise is one fused multiply-add in torch, straight to the model dtype.

On a GPU the loader threads stop after the decode: `host_pixels` hands Pillow's RGBX pixels over and
`to_device` copies them (through pinned memory, asynchronously), then resizes and normalises each image on
the card while the batch is assembled (float antialiased kernel, rounded to uint8 levels as the processor's
resize is). The CPU then spends per image the JPEG decode and one copy into pinned memory (BENCHMARKS.md §5).

Settings (size, resample, rescale factor, mean, std) are read from the Hugging Face image processor;
`ImagePrep.from_processor` returns None for a configuration it does not reproduce and the caller keeps
using the processor.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

# Pillow's resample ids (also PILImageResampling's values) with an antialiased uint8 kernel in torch.
_TORCH_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
_TORCH_MODE_NAMES = {"bilinear", "bicubic"}  # torchvision's InterpolationMode values (the torchvision backend)


def _resample_mode(resample: Any) -> str | None:
    value = getattr(resample, "value", resample)  # PILImageResampling / InterpolationMode enums
    if isinstance(value, str):
        return value if value in _TORCH_MODE_NAMES else None
    try:
        return _TORCH_MODES.get(Image.Resampling(int(value)))
    except (TypeError, ValueError):
        return None


def _per_channel(value: Any, name: str) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values, got {values}")
    return values


def unsupported_reason(image_processor: Any) -> str | None:
    """Why `ImagePrep` cannot stand in for this image processor, or None when it can."""
    name = type(image_processor).__name__
    if not name.startswith("Gemma3ImageProcessor"):
        # Other processors may crop, pad or keep the aspect ratio: only Gemma 3's steps are reproduced.
        return f"{name} is not a Gemma 3 image processor"
    if getattr(image_processor, "do_pan_and_scan", None):
        # Pan and scan adds a variable number of crops per image (each its own 256 tokens and its own
        # prompt markers); the pipeline's one-image-per-row batches and the processor handle that together.
        return "do_pan_and_scan is on"
    if not getattr(image_processor, "do_resize", True):
        return "do_resize is off (images would keep their own sizes)"
    size = getattr(image_processor, "size", None) or {}
    if not (size.get("height") and size.get("width")):
        return f"size {dict(size)} is not a fixed height x width"
    if _resample_mode(getattr(image_processor, "resample", Image.Resampling.BILINEAR)) is None:
        return f"resample {getattr(image_processor, 'resample', None)!r} has no fast kernel (bilinear and bicubic do)"
    try:
        _per_channel(getattr(image_processor, "image_mean", 0.0), "image_mean")
        _per_channel(getattr(image_processor, "image_std", 1.0), "image_std")
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    from .dataset import to_rgb  # imported here: dataset needs pyarrow, this module does not

    return to_rgb(image)


# Pillow allocates a big image in blocks of this many bytes; one block per image lets `_pixel_memory` hand out
# Pillow's own memory (64 MiB: 16 MP at 4 bytes a pixel). Only the block size changes, not what is allocated.
PILLOW_BLOCK_BYTES = 64 * 2**20


def use_single_block_images() -> None:
    """Raise Pillow's allocation block size (process-wide, never lowered) so decoded images are one block."""
    core = Image.core
    if core.get_block_size() < PILLOW_BLOCK_BYTES:
        core.set_block_size(PILLOW_BLOCK_BYTES)


def _pixel_memory(image: Image.Image) -> "bytes | memoryview":
    """The image's pixels at 4 bytes each (Pillow stores RGB as RGBX): Pillow's own memory, read only, where
    it can export it (Arrow: Pillow >= 11.2, the image in one block), else one copy (~2 ms at 2.7 MP)."""
    if hasattr(image, "__arrow_c_array__"):
        try:
            import pyarrow as pa

            return memoryview(pa.array(image).values.buffers()[1])[: image.width * image.height * 4]
        except (ImportError, ValueError):  # ValueError: rows in several blocks (an image over the block size)
            pass
    return image.tobytes("raw", "RGBX")


_readonly_warning_seen = False


def _rgbx_tensor(image: Image.Image) -> torch.Tensor:
    """(1, 4, H, W) uint8, channels-last, over the pixels Pillow holds (`_pixel_memory`).

    Pillow keeps RGB as 4 bytes a pixel: RGBX is its memory as it is (RGB would be packed, and the uint8
    resize kernel works on 4 channels anyway). The memory is read only; the tensor over it is only read
    (by the resize or the copy to the GPU), never written.
    """
    global _readonly_warning_seen
    w, h = image.size
    data = _pixel_memory(image)
    if not _readonly_warning_seen:
        # torch warns once per process that a tensor over read-only memory must not be written to; take
        # that one warning here, on purpose, rather than in the run's log.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*buffer is not writable.*", category=UserWarning)
            flat = torch.frombuffer(data, dtype=torch.uint8)
        _readonly_warning_seen = True
    else:
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(h, w, 4).permute(2, 0, 1).unsqueeze(0)


@dataclass(frozen=True)
class ImagePrep:
    """RGB PIL image -> (3, height, width) tensor, as Gemma 3's image processor computes it."""

    height: int
    width: int
    mode: str = "bilinear"  # torch interpolate mode, antialiased
    scale: tuple[float, float, float] = (2 / 255,) * 3  # per channel: rescale / std
    offset: tuple[float, float, float] = (-1.0,) * 3  # per channel: -mean / std
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_processor(cls, processor: Any, dtype: torch.dtype = torch.float32) -> "ImagePrep | None":
        """Settings of a Gemma 3 image processor (or a processor holding one); None when not supported."""
        ip = getattr(processor, "image_processor", processor)
        if unsupported_reason(ip) is not None:
            return None
        rescale = float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0
        if getattr(ip, "do_normalize", True):
            mean = _per_channel(ip.image_mean, "image_mean")
            std = _per_channel(ip.image_std, "image_std")
        else:
            mean, std = [0.0] * 3, [1.0] * 3
        return cls(height=int(ip.size["height"]), width=int(ip.size["width"]),
                   mode=_resample_mode(getattr(ip, "resample", Image.Resampling.BILINEAR)) or "bilinear",
                   scale=tuple(rescale / s for s in std), offset=tuple(-m / s for m, s in zip(mean, std)),
                   dtype=dtype)

    def resize(self, image: Image.Image) -> torch.Tensor:
        """uint8 (3, height, width), channels-last in memory, from an RGB image of any size."""
        pixels = _rgbx_tensor(_rgb(image))
        if pixels.shape[-2:] != (self.height, self.width):
            pixels = torch.nn.functional.interpolate(pixels, size=(self.height, self.width), mode=self.mode,
                                                     antialias=True, align_corners=False)
        return pixels[0, :3]

    def __post_init__(self):
        object.__setattr__(self, "_scale", torch.tensor(self.scale, dtype=torch.float32).view(3, 1, 1))
        object.__setattr__(self, "_offset", torch.tensor(self.offset, dtype=torch.float32).view(3, 1, 1))
        object.__setattr__(self, "_device_constants", {})
        use_single_block_images()  # decoded images then export without a copy (_pixel_memory)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(pixels * rescale - mean) / std as one multiply-add in float32, contiguous, in `dtype`."""
        out = pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(self._scale).add_(self._offset)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(image))

    # -- resizing on the device (GPU): the loader threads only decode

    def host_pixels(self, image: Image.Image) -> torch.Tensor:
        """(H, W, 4) uint8 RGBX of the decoded image at its own size, for `to_device` (a read-only view of the
        pixels Pillow holds, see `_pixel_memory`)."""
        return _rgbx_tensor(_rgb(image))[0].permute(1, 2, 0)

    def to_device(self, host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """(3, height, width) pixel values in `dtype` on `device`, from `host_pixels`' output: the resize in
        float (the antialiased kernel has no uint8 version on CUDA), rounded to uint8 levels like the
        processor's uint8 resize, then the same multiply-add as `normalize`.

        To a GPU the bytes go through page-locked memory, so that the copy neither blocks this thread until
        the kernels queued before it have run nor keeps a batch of full-size images pinned in the loader."""
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        x = host.to(device, non_blocking=True)[..., :3].permute(2, 0, 1).unsqueeze(0).float()
        if x.shape[-2:] != (self.height, self.width):
            x = torch.nn.functional.interpolate(x, size=(self.height, self.width), mode=self.mode, antialias=True,
                                                align_corners=False).round_().clamp_(0, 255)
        scale, offset = self._on(device)
        return torch.addcmul(offset, x[0], scale).to(self.dtype)

    def _on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        cached = self._device_constants.get(key)
        if cached is None:
            cached = self._device_constants[key] = (self._scale.to(device), self._offset.to(device))
        return cached
