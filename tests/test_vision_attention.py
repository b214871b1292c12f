"""The vision tower's attention kernel (vlm_caption/vision_attention.py) on the tiny Gemma 3 (CPU): a named
kernel is the one the tower runs, eager and compiled; "auto" on a CPU leaves torch's pick untimed; the timing
takes the fastest kernel whose output matches torch's pick, and keeps torch's pick when none is clearly faster."""
from __future__ import annotations

import pytest
import torch

from test_decode_loop import token_ids
from test_static_decode import captioner, images, model_and_processor  # noqa: F401
from vlm_caption.vision_attention import pick, set_vision_attention, time_kernels, vision_attention_report

FLASH_CPU = "_scaled_dot_product_flash_attention_for_cpu"  # torch's pick on a CPU
MATH = "_scaled_dot_product_attention_math"


def ops_of(fn) -> set[str]:
    """The aten ops `fn` runs (eager), nested ones included (the kernel under sdpa's dispatch)."""
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name.removeprefix("aten::") for event in prof.events()}


def tower_ops(model, pixels) -> set[str]:
    return ops_of(lambda: model.model.get_image_features(pixel_values=pixels))


@pytest.fixture
def pixels(model_and_processor, images):
    model, processor = model_and_processor
    cap = captioner(model, processor, max_tokens=4, min_tokens=4)
    return cap.assemble([cap.prepare(im) for im in images[:2]]).inputs["pixel_values"]


def test_a_named_kernel_runs_the_towers_attention_and_auto_on_a_cpu_is_torchs_pick(model_and_processor, pixels):
    model, _ = model_and_processor
    for choice in ("auto", "sdpa"):
        set_vision_attention(model, choice)
        ops = tower_ops(model, pixels)
        assert FLASH_CPU in ops and MATH not in ops, choice
        assert vision_attention_report(model) == "sdpa (torch's pick)"
    set_vision_attention(model, "math")
    ops = tower_ops(model, pixels)
    assert MATH in ops and FLASH_CPU not in ops
    assert vision_attention_report(model) == "math"
    # Only the tower: the language model's attention outside it keeps torch's pick.
    qkv = [torch.randn(1, 2, 8, 16) for _ in range(3)]
    assert FLASH_CPU in ops_of(lambda: torch.nn.functional.scaled_dot_product_attention(*qkv))


def test_the_compiled_tower_is_traced_with_the_named_kernel_and_gives_the_same_tokens(model_and_processor, images):
    """Inductor's code for the tower's layers calls the kernel the order names (the layers are traced inside
    the encoder's call), and the captions' tokens are eager's."""
    from torch._dynamo.backends.common import aot_autograd

    model, processor = model_and_processor
    fixed = {"max_tokens": 5, "min_tokens": 5}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    forward_graphs: list[str] = []

    def keep(gm, example_inputs):
        forward_graphs.append(gm.code)
        return gm.forward

    backend = aot_autograd(fw_compiler=keep)
    cap = captioner(model, processor, compile="on", vision_attention="math", compile_options={"backend": backend},
                    **fixed)
    assert token_ids(cap, images[:3]) == want
    tower = [code for code in forward_graphs if "layer_norm" in code and ("scaled_dot_product" in code or
                                                                          "_softmax" in code)]
    assert tower and not any(FLASH_CPU in code for code in tower)
    assert cap.decoding_report(3)["vision_attention"] == "math"


def test_timing_keeps_the_kernels_that_match_and_times_them():
    timings = time_kernels((2, 2, 64, 16), torch.float32, torch.device("cpu"), ("flash", "math"), rounds=2)
    assert set(timings) == {"sdpa", "flash", "math"}
    assert all(isinstance(ms, float) and ms > 0 for ms in timings.values()), timings


def test_timing_reports_a_kernel_that_fails_or_gives_another_output(monkeypatch):
    """A kernel that cannot take the shape, or whose output is not torch's pick's, is left out with its reason."""
    import vlm_caption.vision_attention as va

    real = va._attend_on

    def faulty(kernel, q, k, v):
        if kernel == "math":
            raise RuntimeError("No available kernel. Aborting execution.\nmore")
        return real(kernel, q, k, v) * (2 if kernel == "flash" else 1)

    monkeypatch.setattr(va, "_attend_on", faulty)
    timings = time_kernels((2, 2, 64, 16), torch.float32, torch.device("cpu"), ("flash", "math"), rounds=1)
    assert isinstance(timings["sdpa"], float)
    assert timings["math"] == "failed: No available kernel. Aborting execution."
    assert timings["flash"] == "output differs from torch's pick by 100.0%"
    assert pick(timings) is None


def test_pick_takes_the_fastest_clearly_ahead_of_torchs_pick():
    assert pick({"sdpa": 1.0, "flash": 1.0, "cudnn": 0.6, "efficient": 0.8}) == "cudnn"
    assert pick({"sdpa": 1.0, "flash": 1.0, "cudnn": 0.99, "efficient": "failed: no"}) is None  # noise: keep it
    assert pick({"sdpa": 1.0, "cudnn": "output differs from torch's pick by 9%"}) is None
    assert pick({"sdpa": "failed: x", "cudnn": 0.5}) is None  # nothing to compare with: torch's pick
    assert pick({}) is None


def test_auto_on_a_gpu_times_at_the_first_call_then_runs_the_pick(model_and_processor, pixels, monkeypatch):
    """"auto" where kernels are timed (a GPU; here the CPU pretends, with math made the fastest): the first
    tower call times the kernels on the tower's shapes, the report says what it chose and why, and the tower
    runs that kernel from then on; no second timing."""
    import vlm_caption.vision_attention as va

    model, _ = model_and_processor
    monkeypatch.setitem(va.CANDIDATES, "cpu", ("flash", "math"))
    shapes = []

    def timed(shape, dtype, device, candidates, **kw):
        shapes.append(shape)
        return {"sdpa": 1.0, "flash": 1.0, "math": 0.5}

    monkeypatch.setattr(va, "time_kernels", timed)
    set_vision_attention(model, "auto")
    assert vision_attention_report(model) == "auto (chosen at the first batch)"
    ops = tower_ops(model, pixels)
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    assert shapes == [(2, vision.num_attention_heads, tokens, vision.hidden_size // vision.num_attention_heads)]
    assert MATH in ops and FLASH_CPU not in ops
    assert vision_attention_report(model).startswith("auto: math (one layer, 2 images: sdpa 1.000 ms")
    tower_ops(model, pixels)
    assert len(shapes) == 1


def test_the_gpus_kernel_order_puts_the_kernel_first_keeps_the_others_and_is_restored_after():
    """The CUDA side of `_first_in_order` (only flags: it runs on a CPU too): the named kernel first in torch's
    priority order, every kernel still enabled, and the order and flags as before once the block ends."""
    from torch.nn.attention import SDPBackend

    import vlm_caption.vision_attention as va

    def flags():
        return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())

    before, order = flags(), torch._C._get_sdp_priority_order()
    with va._first_in_order("cudnn", "cuda"):
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
        assert all(flags())
        out = torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 2, 8, 16) for _ in range(3)))
    assert out.shape == (1, 2, 8, 16)
    assert flags() == before and torch._C._get_sdp_priority_order() == order


def test_overlapping_tower_calls_on_two_threads_put_the_order_back_once_both_end():
    """--vision-overlap runs the tower on the assembler thread too. Each call's own save-and-restore of torch's
    process-wide order, overlapping (A in, B in, A out, B out), left the tower's order for the whole process:
    the first call in sets it, the last one out puts it back."""
    import threading

    import vlm_caption.vision_attention as va

    both_inside = threading.Barrier(2, timeout=30)
    seen = []

    class Encoder:
        def _call_impl(self, hidden, after=None):
            seen.append(torch._C._get_sdp_priority_order()[0])
            both_inside.wait()
            if after is not None:  # B leaves once A's whole call, its restore included, has ended
                after.join(30)
            return hidden

    call = va._KernelCall(Encoder(), "cudnn")
    order = torch._C._get_sdp_priority_order()
    hidden = torch.zeros(1, 2)
    original = va._first_in_order
    try:  # the flags of the CUDA side, on any machine (as the test above)
        va._first_in_order = lambda kernel, device_type: original(kernel, "cuda")
        first = threading.Thread(target=call, args=(hidden,))
        second = threading.Thread(target=call, args=(hidden,), kwargs={"after": first})
        first.start()
        second.start()
        first.join(30)
        second.join(30)
    finally:
        va._first_in_order = original
    assert len(seen) == 2 and set(seen) == {int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)}
    assert torch._C._get_sdp_priority_order() == order
