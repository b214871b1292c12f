"""The loader's fast path (vlm_caption.image_prep): same pixels as Gemma 3's image processor, JPEG draft
decoding that fires, load_image's failures unchanged, and the loader benchmark runs."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_caption import dataset
from vlm_caption.loader import default_loader_workers
from vlm_caption.image_prep import ImagePrep, unsupported_reason

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "benchmarks" / "bench_loader.py"
sys.path.insert(0, str(BENCH.parent))
import bench_loader  # noqa: E402  (a script, not a package)

TOLERANCE = 0.01  # mean |fast - processor| on the [-1, 1] scale, per image
SMALL_TARGET_DRAFT_TOLERANCE = 0.03  # the same for a JPEG draft-decoded for a 64 px target (tiny model)


def save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header declares width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = buf.getvalue()
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


@pytest.fixture(scope="module")
def varied_images(tmp_path_factory) -> dict[str, Path]:
    """Big JPEG that draft-decodes, PNG with alpha, greyscale, CMYK JPEG, tiny, very wide, 1/2 scale that
    leaves little to resize (the worst case kept by the draft margin at 896), EXIF-rotated."""
    d = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(1)
    art = bench_loader.art_image(4000, 3000, rng)
    rgba = bench_loader.art_image(700, 500, rng).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "big_jpeg": save(art, d / "big.jpg", "JPEG", quality=90),
        "png_alpha": save(rgba, d / "alpha.png", "PNG"),
        "grey_jpeg": save(bench_loader.art_image(1200, 900, rng).convert("L"), d / "grey.jpg", "JPEG", quality=90),
        "cmyk_jpeg": save(bench_loader.art_image(1000, 800, rng).convert("CMYK"), d / "cmyk.jpg", "JPEG", quality=90),
        "tiny_png": save(bench_loader.art_image(7, 5, rng), d / "tiny.png", "PNG"),
        "wide_jpeg": save(bench_loader.art_image(4000, 150, rng), d / "wide.jpg", "JPEG", quality=90),
        "just_over_2x": save(bench_loader.art_image(2250, 2250, rng), d / "over2x.jpg", "JPEG", quality=90),
        "exif_rotated": save(bench_loader.art_image(1900, 1000, rng), d / "rot.jpg", "JPEG", quality=90,
                             exif=exif.tobytes()),
    }


def full_decode(path: Path) -> Image.Image:
    """The reference input: the whole image decoded at full size, flattened like load_image does."""
    with Image.open(path) as img:
        img.load()
        return dataset.to_rgb(img)


def processors(tiny_model_dir: Path) -> dict[str, object]:
    from transformers import AutoProcessor

    return {"tiny": AutoProcessor.from_pretrained(tiny_model_dir).image_processor,
            "gemma3_896": bench_loader.gemma3_image_processor(896)}


def test_fast_path_matches_the_image_processor(varied_images, tiny_model_dir):
    report = []
    for name, ip in processors(tiny_model_dir).items():
        prep = ImagePrep.from_processor(ip)
        assert prep is not None and (prep.height, prep.width) == (ip.size["height"], ip.size["width"])
        for kind, path in varied_images.items():
            ref = ip(images=[full_decode(path)], return_tensors="pt")["pixel_values"][0]
            loaded = dataset.load_image(path, prep.height)
            drafted = loaded.size != full_decode(path).size
            # The CPU path, and the GPU path (decode here, resize on the device) run on the CPU device.
            for where, got in (("host", prep(loaded)), ("device", prep.to_device(prep.host_pixels(loaded), "cpu"))):
                assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
                diff = (got - ref).abs()
                report.append(f"{name}/{kind}/{where}: mean {diff.mean():.5f} max {diff.max():.4f}")
                # Gemma 3's 896 px: every image within 0.01. The tiny model's 64 px target draft-decodes
                # almost every JPEG, mostly at 1/8 (DC coefficients only): a coarser filter than the
                # processor's bilinear over the full image at that size, measured up to 0.027 there.
                bound = TOLERANCE if name == "gemma3_896" or not drafted else SMALL_TARGET_DRAFT_TOLERANCE
                assert diff.mean() <= bound, report[-1]
    print("\n".join(report))  # shown with -s: the max is reported, only the mean is bounded


def test_model_dtype_and_channel_order(tiny_model_dir):
    ip = processors(tiny_model_dir)["tiny"]
    img = Image.new("RGB", (300, 200), (255, 0, 128))
    out = ImagePrep.from_processor(ip, torch.bfloat16)(img)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 64, 64)
    assert out[:, 10, 10].float().tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=0.01)


def test_settings_are_read_from_the_processor():
    ip = bench_loader.gemma3_image_processor(448)
    ip.image_mean, ip.image_std, ip.rescale_factor = [0.2, 0.4, 0.6], [0.5, 0.25, 0.1], 1 / 255
    ip.resample = 3  # bicubic
    prep = ImagePrep.from_processor(ip)
    assert (prep.height, prep.width, prep.mode) == (448, 448, "bicubic")
    img = bench_loader.art_image(900, 700, np.random.default_rng(2))
    ref = ip(images=[img], return_tensors="pt")["pixel_values"][0]
    assert (prep(img) - ref).abs().mean() <= TOLERANCE * 3  # std 0.1 magnifies every rounding by 10


@pytest.mark.parametrize("change, reason", [
    ({"do_pan_and_scan": True}, "pan_and_scan"),
    ({"resample": 1}, "resample"),  # LANCZOS: no fast kernel
    ({"do_resize": False}, "do_resize"),
])
def test_unsupported_settings_fall_back_to_the_processor(change, reason):
    ip = bench_loader.gemma3_image_processor(896)
    for key, value in change.items():
        setattr(ip, key, value)
    assert reason in unsupported_reason(ip)
    assert ImagePrep.from_processor(ip) is None


def test_captioner_prepare_uses_the_fast_path_and_falls_back(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_caption.captioner import Captioner

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    img = bench_loader.art_image(500, 300, np.random.default_rng(3))
    ref = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
    cap = Captioner(model, processor, model_name="tiny", prompt="Describe.", max_tokens=4)
    assert isinstance(cap._image_prep, ImagePrep)
    assert (cap.prepare(img) - ref).abs().mean() <= TOLERANCE
    # Pan and scan is not reproduced: the processor itself must run (no crops at this aspect ratio).
    processor.image_processor.do_pan_and_scan = True
    processor.image_processor.pan_and_scan_min_crop_size = 32
    processor.image_processor.pan_and_scan_max_num_crops = 4
    processor.image_processor.pan_and_scan_min_ratio_to_activate = 3.0
    cap = Captioner(model, processor, model_name="tiny", prompt="Describe.", max_tokens=4)
    assert cap._image_prep is None
    assert torch.equal(cap.prepare(img), ref)


def test_captioner_can_resize_on_the_device(tiny_model_dir):
    """resize_on_device (the default on CUDA): prepare hands over the decoded bytes at full size, collate
    resizes and normalises them on the model's device; the batch equals the CPU path's to uint8 rounding,
    and generate runs on it (here the device is the CPU)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_caption.captioner import Captioner

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rng = np.random.default_rng(6)
    images = [bench_loader.art_image(w, h, rng) for w, h in ((500, 300), (64, 64), (90, 700))]
    host = Captioner(model, processor, model_name="tiny", prompt="Describe.", max_tokens=3)
    on_device = Captioner(model, processor, model_name="tiny", prompt="Describe.", max_tokens=3, min_tokens=3,
                          resize_on_device=True)
    assert not host.resize_on_device  # the default off CUDA
    handed = [on_device.prepare(im) for im in images]
    assert [tuple(h.shape) for h in handed] == [(300, 500, 4), (64, 64, 4), (700, 90, 4)]
    assert all(h.dtype == torch.uint8 for h in handed)
    got = on_device.assemble(handed).inputs["pixel_values"]
    want = host.assemble([host.prepare(im) for im in images]).inputs["pixel_values"]
    assert got.shape == want.shape == (3, 3, 64, 64) and got.dtype == want.dtype
    assert (got - want).abs().max() <= 2 / 127.5 + 1e-6  # one uint8 level each side of the rounding
    assert (got - want).abs().mean() <= 0.01
    captions = on_device.generate(["a", "b", "c"], handed)
    assert len(captions) == 3 and all(c.tokens == 3 for c in captions)


def test_pixels_are_read_from_pillows_own_memory_and_outlive_the_image(tmp_path):
    """No copy out of Pillow for a decoded image (Arrow export, one block); the tensor keeps that memory alive
    after the image is gone, and holds the same bytes a copy would."""
    import gc

    from vlm_caption.image_prep import _pixel_memory

    prep = ImagePrep(height=896, width=896)  # raises Pillow's block size: the 12 MP image is one block
    path = save(bench_loader.art_image(4000, 3000, np.random.default_rng(8)), tmp_path / "p.jpg", "JPEG")
    with Image.open(path) as img:
        img.load()
        want = img.tobytes("raw", "RGBX")
        if hasattr(img, "__arrow_c_array__"):  # Pillow >= 11.2
            assert isinstance(_pixel_memory(img), memoryview)
        host = prep.host_pixels(img)
    del img
    gc.collect()
    _ = [Image.new("RGB", (4000, 3000), (9, 9, 9)) for _ in range(3)]  # memory freed would be reused here
    assert host.shape == (3000, 4000, 4) and host.flatten().numpy().tobytes() == want


def test_jpeg_draft_decoding_fires_for_big_images(tmp_path):
    big = save(bench_loader.art_image(4000, 3000, np.random.default_rng(4)), tmp_path / "big.jpg", "JPEG", quality=90)
    assert dataset.load_image(big, 896).size == (2000, 1500)  # reduced, still covers 896 (+25 %) on both sides
    assert dataset.load_image(big, 64).size == (500, 375)  # 1/8, the largest DCT scale
    assert dataset.load_image(big, 1600).size == (4000, 3000)  # 3000 < 2 x 1.25 x 1600: full size
    # A camera JPEG with an MPF segment (an embedded preview) opens as MPO: it was decoded at full size.
    camera = bench_loader.art_image(4000, 3000, np.random.default_rng(4))
    mpo = save(camera, tmp_path / "camera.jpg", "MPO", save_all=True, append_images=[camera.resize((400, 300))])
    with Image.open(mpo) as opened:
        assert opened.format == "MPO"
    assert dataset.load_image(mpo, 896).size == (2000, 1500)
    over2x = save(bench_loader.art_image(2056, 1865, np.random.default_rng(5)), tmp_path / "o.jpg", "JPEG")
    assert dataset.load_image(over2x, 896).size == (2056, 1865)  # 1028x933 would leave too little to resize
    narrow = save(Image.new("RGB", (6000, 1000)), tmp_path / "narrow.jpg", "JPEG")
    assert dataset.load_image(narrow, 896).size == (6000, 1000)  # the short side would drop below 896
    for target in (64, 224, 448, 896):
        w, h = dataset.load_image(big, target).size
        assert min(w, h) >= target and (w, h) != (4000, 3000)


def test_load_image_failures_are_unchanged(tmp_path):
    def stage_and_message(path):
        with pytest.raises(dataset.ImageLoadError) as e:
            dataset.load_image(path, 896)
        return e.value.stage, str(e.value)

    def write(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (5, 5, 5)).save(buf, "JPEG")
    assert stage_and_message(None) == ("load", "no safe image path for this key (outside the data dir or malformed key)")
    stage, msg = stage_and_message(tmp_path / "missing.jpg")
    assert stage == "load" and msg.startswith("cannot open missing.jpg")
    assert stage_and_message(write("html.jpg", b"<html>gone</html>")) == (
        "decode", "html.jpg: not a recognised image format")
    assert stage_and_message(write("empty.jpg", b"")) == ("decode", "empty.jpg: not a recognised image format")
    stage, msg = stage_and_message(write("truncated.jpg", buf.getvalue()[:400]))
    assert stage == "decode" and msg.startswith("OSError")
    stage, msg = stage_and_message(write("bomb.png", bomb_png(100_000, 100_000)))
    assert stage == "decode" and "pixels" in msg  # refused before decoding, its size named


def test_colour_key_transparency_gets_the_processors_white_background(tmp_path, tiny_model_dir):
    """A PNG whose tRNS chunk keys one colour of an RGB or greyscale image transparent: the fast and device paths
    kept the key colour (black) where the model's image processor, given the same image, paints it white."""
    ip = processors(tiny_model_dir)["tiny"]
    prep = ImagePrep.from_processor(ip)
    rgb = Image.new("RGB", (120, 80), (0, 0, 0))
    rgb.paste((200, 40, 90), (30, 20, 90, 60))
    for name, img, key in (("rgb", rgb, (0, 0, 0)), ("grey", rgb.convert("L"), 0)):
        path = save(img, tmp_path / f"{name}.png", "PNG", transparency=key)
        loaded = dataset.load_image(path, prep.height)
        assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((60, 40)) != (255, 255, 255), name
        with Image.open(path) as raw:  # what the processor makes of the file itself
            ref = ip(images=[raw], return_tensors="pt")["pixel_values"][0]
        paths = {"host": prep(loaded), "device": prep.to_device(prep.host_pixels(loaded), "cpu"),
                 "processor": ip(images=[loaded], return_tensors="pt")["pixel_values"][0]}
        if ref[:, 0, 0].eq(-1).all():  # an older transformers (5.17, the GPU host's: its convert_to_rgb drops
            ref = paths.pop("processor")  # transparency, the key stays black): white is kept whatever the version
        for where, got in paths.items():
            assert (got - ref).abs().mean() <= TOLERANCE, f"{name}/{where}"


def test_exif_orientation_is_applied_beside_a_tag_pillow_cannot_write_back(tmp_path):
    """Tag 334 (NumberOfInks, a SHORT to Pillow) stored as text: ImageOps.exif_transpose turned the pixels, then
    raised struct.error writing the EXIF back, so an image that validates and decodes failed its row."""
    from PIL import ImageOps

    from vlm_caption.validate import check_image

    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Canon"  # orientation: turn 90 degrees clockwise; Make, retagged below
    odd_exif = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x4e\x00\x02")
    picture = Image.linear_gradient("L").resize((60, 20)).convert("RGB")
    path = save(picture, tmp_path / "odd.jpg", "JPEG", exif=odd_exif)
    clean = save(picture, tmp_path / "clean.jpg", "JPEG", exif=exif.tobytes())
    assert check_image(str(path))[3] is None
    loaded = dataset.load_image(path)
    with Image.open(clean) as img:
        want = ImageOps.exif_transpose(img).convert("RGB")
    assert loaded.size == (20, 60) and loaded.tobytes() == want.tobytes()
    assert dataset.to_rgb(loaded).size == (20, 60)  # upright already: not turned a second time


def test_default_loader_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert default_loader_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_loader_workers() == 1

    def unavailable(pid):
        raise AttributeError("no sched_getaffinity here")

    monkeypatch.setattr(os, "sched_getaffinity", unavailable, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_loader_workers() == 15


def test_no_warning_from_the_read_only_pixel_buffer():
    # torch warns once per process, so only a fresh process shows whether the one warning is absorbed.
    code = ("import torch; from PIL import Image; from vlm_caption.image_prep import ImagePrep; "
            "p = ImagePrep(height=32, width=32); p(Image.new('RGB', (50, 40))); p(Image.new('RGB', (9, 9)))")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert out.returncode == 0 and "writable" not in out.stderr, out.stderr


def test_make_images_is_seeded(tmp_path):
    small = (64, 96, 48, 64)
    a = bench_loader.make_images(tmp_path / "a", 3, seed=5, sizes=small)
    b = bench_loader.make_images(tmp_path / "b", 2, seed=5, sizes=small)
    assert [p.read_bytes() for p in a[:2]] == [p.read_bytes() for p in b]
    for p in a:
        with Image.open(p) as img:
            assert img.format == "JPEG" and 48 <= min(img.size) and max(img.size) <= 96


def test_bench_loader_prints_one_json_line_per_method(tmp_path):
    bench_loader.make_images(tmp_path / "imgs", 3, seed=0, sizes=(64, 96, 48, 64))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(BENCH), "--images", str(tmp_path / "imgs"), "--rounds", "1",
                          "--threads", "1", "2", "--compare"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    compared, *lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert compared["images"] == 3 and compared["device"]["mean_abs_diff"] <= TOLERANCE
    assert {(r["method"], r["threads"]) for r in lines} == {(m, t) for m in ("processor", "fast", "device")
                                                            for t in (1, 2)}
    for r in lines:
        assert r["images"] == 3 and r["cpu_ms_per_img"] > 0 and r["img_per_s"] > 0
        assert {"method", "images", "threads", "cpu_ms_per_img", "img_per_s"} <= set(r)


def test_any_error_a_decoder_raises_fails_the_image_not_the_run(tmp_path, monkeypatch):
    """PIL's plugins raise more than OSError (a fuzzed DDS: NotImplementedError): it stopped the loader, and so
    the run at the same image on every relaunch."""
    from vlm_caption.images import ImageLoadError

    path = tmp_path / "odd.jpg"
    Image.new("RGB", (8, 8)).save(path)

    def unknown_pixel_format(self):
        raise NotImplementedError("Unknown pixel format flags 144")

    monkeypatch.setattr(type(Image.open(path)), "load", unknown_pixel_format)
    with pytest.raises(ImageLoadError, match="NotImplementedError: Unknown pixel format"):
        dataset.load_image(path)
