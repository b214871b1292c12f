"""Static full-attention KV cache + compiled decode (vlm_caption/static_decode.py) on the tiny Gemma 3 (CPU).

Compiled tests use a counting dynamo backend that runs the captured graphs eagerly: it shows what dynamo
captures (graphs, breaks, recompiles) without inductor's C++ build; one test runs real inductor (~30 s on
the 2-core dev machine, most of it compiling).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm_caption.captioner import Captioner
from vlm_caption.model_loading import load_model
from vlm_caption.static_decode import StaticDecode, compile_wanted, prepare_static_decode

CAPTURED: list = []  # decode graphs the counting backend was handed (a module-level list: CompileConfig deep-copies)
# --compile compiles the prefill too (prefill_compile.py): the vision tower's and projector's graphs, and the
# language model's over the prompt (its placeholder: the embedded prompt, where a decode step's are token ids).
VISION_CAPTURED: list = []
PREFILL_CAPTURED: list = []


def is_vision_graph(gm) -> bool:  # a SigLIP encoder layer's (the tower is compiled layer by layer) or the projector's
    return "layer_norm1" in gm.code or "patch_embedding" in gm.code or "mm_input_projection" in gm.code


def is_language_prefill_graph(gm) -> bool:  # a decoder layer's, compiled on its own (the prefill's)
    return any(node.op == "placeholder" and node.name.startswith("l_self_modules_input_layernorm")
               for node in gm.graph.nodes)


def counting_backend(gm, example_inputs):
    kind = VISION_CAPTURED if is_vision_graph(gm) else PREFILL_CAPTURED if is_language_prefill_graph(gm) else CAPTURED
    kind.append(gm)
    return gm.forward


@pytest.fixture
def model_and_processor(tiny_model_dir):
    """A fresh model per test: `generate` caches its compiled call on the model."""
    torch._dynamo.reset()
    model, processor = load_model(str(tiny_model_dir), torch.device("cpu"), dtype="float32")
    yield model, processor
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (60 + 7 * i, 90, 3), dtype=np.uint8)) for i in range(6)]


def captioner(model, processor, max_tokens=12, min_tokens=12, **kw) -> Captioner:
    return Captioner(model, processor, model_name="tiny", prompt="Describe this artwork.", max_tokens=max_tokens,
                     min_tokens=min_tokens, **kw)


def token_ids(cap: Captioner, keys, pixels) -> list[list[int]]:
    """Generated ids per row (texts of a random model hide differences behind byte-fallback pieces)."""
    rows: list[list[int]] = []
    real = cap._finish

    def record(tokens):
        rows.append(tokens.tolist())
        return real(tokens)

    cap._finish = record
    try:
        list(cap.generate(keys, pixels))  # captions decode lazily: take them all
    finally:
        cap._finish = real
    return rows


def run_two_batches(cap: Captioner, images) -> tuple[list, list]:
    """A batch of 6, then a smaller one of 3 (a run's last batch / a batch after failed images)."""
    pixels = [cap.prepare(im) for im in images]
    keys = [f"k{i}" for i in range(len(images))]
    return token_ids(cap, keys, pixels), token_ids(cap, keys[:3], pixels[:3])


def test_static_eager_decode_gives_the_default_paths_tokens(model_and_processor, images):
    model, processor = model_and_processor
    reference = run_two_batches(captioner(model, processor), images)
    assert len({tuple(r) for r in reference[0]}) > 1, "rows must differ or the test cannot see a row mix-up"
    static = captioner(model, processor, compile="on", compile_options={"compile": False})
    assert static.static_decode is not None and static.gen_config.disable_compile
    assert run_two_batches(static, images) == reference
    # One cache per batch shape, kept for the next call: 6 rows, then 3 rows padded to 4.
    assert sorted(static.static_decode.caches) == [4, 6]


def test_decode_steps_build_the_causal_mask_alone_and_the_same_tokens(model_and_processor, images, monkeypatch):
    """With our full-attention cache, a decode step's sliding mask equals the full one: it is not built
    (transformers builds it with torch.vmap, the slowest part of a compiled step), only the prefill's is;
    the tokens are those of the model's own mask function."""
    import transformers.masking_utils as masking_utils

    model, processor = model_and_processor
    static = captioner(model, processor, compile="on", compile_options={"compile": False})
    assert getattr(model.create_masks_for_generate, "full_masks_when_exact", False)
    vmapped = []
    real = masking_utils._vmap_expansion_sdpa
    monkeypatch.setattr(masking_utils, "_vmap_expansion_sdpa", lambda fn: vmapped.append(fn) or real(fn))
    pixels = [static.prepare(im) for im in images]
    keys = [f"k{i}" for i in range(len(images))]
    fast = token_ids(static, keys, pixels)
    assert len(vmapped) <= 1  # the prefill's sliding mask only, not one per each of the 12 steps
    del model.create_masks_for_generate  # the model's own function again (the class attribute)
    vmapped.clear()
    assert token_ids(static, keys, pixels) == fast
    assert len(vmapped) >= 12


def test_compiled_decode_same_tokens_no_graph_breaks_no_recompiles(model_and_processor, images):
    from torch._dynamo.utils import counters

    model, processor = model_and_processor
    reference = run_two_batches(captioner(model, processor), images)
    counters.clear()
    for graphs in (CAPTURED, VISION_CAPTURED, PREFILL_CAPTURED):
        graphs.clear()
    cap = captioner(model, processor, compile="on", compile_options={"backend": counting_backend})
    assert cap.gen_config.compile_config is not None and not cap.gen_config.disable_compile
    assert run_two_batches(cap, images) == reference
    # 11 decode steps per call ran through dynamo; one graph per batch shape (6, and 3 padded to 4): no
    # recompile from one step to the next, no graph break.
    assert len(CAPTURED) == 2, [g.graph for g in CAPTURED[2:]]
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2 + len(VISION_CAPTURED) + len(PREFILL_CAPTURED)
    # The same shapes again: nothing new is compiled, the caches are reset and reused.
    caches = dict(cap.static_decode.caches)
    compiled = len(VISION_CAPTURED), len(PREFILL_CAPTURED)
    assert run_two_batches(cap, images) == reference
    assert len(CAPTURED) == 2 and cap.static_decode.caches == caches
    assert (len(VISION_CAPTURED), len(PREFILL_CAPTURED)) == compiled


def test_eos_stops_with_the_static_cache(model_and_processor, images):
    model, processor = model_and_processor
    reference = run_two_batches(captioner(model, processor, max_tokens=16, min_tokens=0), images)
    static = captioner(model, processor, max_tokens=16, min_tokens=0, compile="on",
                       compile_options={"backend": counting_backend})
    assert run_two_batches(static, images) == reference


def test_sampling_runs_and_repeats_with_the_static_cache(model_and_processor, images):
    """Sampled rows are not compared with the dynamic path: the static cache's logits differ by ~3e-7 (the
    same attention over a longer, masked key range), and the tiny random model's near-uniform distribution
    turns such noise into a different nucleus order. Greedy tokens are compared above."""
    model, processor = model_and_processor
    kw = dict(max_tokens=10, min_tokens=10, temperature=0.8, top_p=0.9, seed=3, compile="on",
              compile_options={"backend": counting_backend})
    first = run_two_batches(captioner(model, processor, **kw), images)
    again = run_two_batches(captioner(model, processor, **kw), images)
    assert first == again and all(len(row) == 10 for batch in first for row in batch)


def test_inductor_compiled_decode_gives_the_same_tokens(model_and_processor, images):
    model, processor = model_and_processor
    reference = run_two_batches(captioner(model, processor, max_tokens=6, min_tokens=6), images[:4])
    cap = captioner(model, processor, max_tokens=6, min_tokens=6, compile="on")  # inductor, forced on CPU
    assert cap.gen_config.compile_config.backend == "inductor"
    assert run_two_batches(cap, images[:4]) == reference


def test_longer_than_the_sliding_window_keeps_the_dynamic_cache(model_and_processor):
    model, processor = model_and_processor
    window = model.config.text_config.sliding_window
    plan, reason = prepare_static_decode(model, window + 1)
    assert plan is None and "sliding window" in reason and str(window) in reason
    plan, reason = prepare_static_decode(model, window, compile=False)
    assert isinstance(plan, StaticDecode) and plan.max_cache_len == window
    prompt_len = captioner(model, processor).prompt_inputs["input_ids"].shape[-1]
    cap = captioner(model, processor, max_tokens=window - prompt_len + 1, min_tokens=0, compile="on")
    assert cap.static_decode is None
    assert cap.gen_config.cache_implementation is None and cap.gen_config.compile_config is None
    # The model was not touched: its own layer types still drive RoPE and masks.
    assert "sliding_attention" in model.config.text_config.layer_types


def test_switching_the_models_own_layer_types_would_change_the_logits(model_and_processor):
    """Why the cache gets a config copy: Gemma 3 picks each layer's RoPE by `layer_types`."""
    model, _ = model_and_processor
    text = model.config.text_config
    ids = torch.randint(10, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        original = list(text.layer_types)
        text.layer_types = ["full_attention"] * len(original)
        try:
            naive = model(input_ids=ids).logits
        finally:
            text.layer_types = original
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert (before - naive).abs().max() > 1e-2


def test_buckets_pad_short_batches_to_a_known_shape():
    plan = StaticDecode(max_cache_len=10, cache_config=None, compile_config=None, reason="")
    assert [plan.bucket(n) for n in (64, 64, 63, 33, 32, 20, 1)] == [64, 64, 64, 64, 32, 32, 1]
    plan.drop_caches()  # after an out-of-memory error the run's size is forgotten
    assert [plan.bucket(n) for n in (32, 16, 33)] == [32, 16, 33] and plan.run_batch == 33
    odd = StaticDecode(max_cache_len=10, cache_config=None, compile_config=None, reason="")
    assert [odd.bucket(n) for n in (48, 47, 25, 24, 3)] == [48, 48, 32, 32, 4]
    # fill (the pipeline's batches on a GPU): the run's batch size however short; after an out-of-memory error
    # the size that failed is forgotten, so the halved batches set it anew.
    filled = StaticDecode(max_cache_len=10, cache_config=None, compile_config=None, reason="")
    assert [filled.bucket(n, fill=True) for n in (64, 20, 1)] == [64, 64, 64]
    filled.drop_caches()
    assert [filled.bucket(n, fill=n != 32) for n in (32, 9)] == [32, 32] and filled.bucket(9) == 16
    # floor (a retry's rows on a GPU): at least that many, still at most the run's batch size
    assert [filled.bucket(n, floor=8) for n in (1, 3, 9, 17)] == [8, 8, 16, 32]


def test_on_a_gpu_the_pipeline_s_last_batch_is_padded_to_the_run_s_size(model_and_processor, images):
    """A batch the pipeline assembled runs at the run's batch size however short (no new decode step to
    compile: ~90 s on an H100); a list given to generate (a retry, a halving) takes a power of two, at least
    the GPU's floor. The pad rows change no real row's tokens."""
    model, processor = model_and_processor
    kw = dict(compile="on", compile_options={"backend": counting_backend}, decode_loop="graph")
    cap = captioner(model, processor, **kw)
    pixels = [cap.prepare(im) for im in images]
    want = token_ids(captioner(model, processor, **kw), ["a", "b", "c"], pixels[:3])
    assert not cap.fill_short_batches and cap.min_bucket == 1  # a CPU: there the pad rows' work would cost more
    cap.fill_short_batches, cap.min_bucket = True, 4  # as on a GPU (its floor: 64)
    assert cap.assemble(pixels).inputs["input_ids"].shape[0] == 6
    tail = cap.assemble(pixels[:3])
    assert tail.rows == 3 and tail.inputs["input_ids"].shape[0] == 6  # not 4: no second graph, no second cache
    got = []
    real = cap._finish
    cap._finish = lambda tokens: got.append(tokens.tolist()) or real(tokens)
    list(cap.generate(["a", "b", "c"], tail))
    assert got == want and list(cap.static_decode.caches) == [6]
    cap._finish = real
    assert token_ids(cap, ["a", "b", "c"], pixels[:3]) == want and sorted(cap.static_decode.caches) == [4, 6]
    assert token_ids(cap, ["a"], pixels[:1]) == want[:1] and sorted(cap.static_decode.caches) == [4, 6]  # not 1


def test_out_of_memory_drops_the_caches(model_and_processor, images, monkeypatch):
    model, processor = model_and_processor
    cap = captioner(model, processor, max_tokens=4, min_tokens=4, compile="on", compile_options={"compile": False})
    pixels = [cap.prepare(im) for im in images]
    cap.generate([str(i) for i in range(6)], pixels)
    assert cap.static_decode.caches

    def oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "generate", oom)
    with pytest.raises(torch.OutOfMemoryError):
        cap.generate([str(i) for i in range(6)], pixels)
    assert not cap.static_decode.caches and cap.static_decode.run_batch == 0


def test_compile_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not compile_wanted("auto", cpu) and compile_wanted("auto", cuda)
    assert compile_wanted("on", cpu) and not compile_wanted("off", cuda)
    with pytest.raises(ValueError):
        compile_wanted("yes", cpu)
