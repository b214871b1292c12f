"""--kv-cache-dtype fp8 (vlm_caption/kv_fp8.py) on the tiny Gemma 3 (CPU): keys and values stored as float8 in the
static cache, the same greedy tokens on every decode path of an fp8 run (dynamic cache, generate's compiled step,
the graph loop, continuous batching), half the cache's memory, and a run that records it (run id, run.json, card,
summary); a setting the run cannot take is one line."""
from __future__ import annotations

import json

import pytest
import torch

from test_continuous import continuous_captioner, streamed_ids, without_pads
from test_decode_loop import token_ids
from test_fp8 import refused_in_one_line, run_of_its_own
from test_static_decode import (CAPTURED, PREFILL_CAPTURED, VISION_CAPTURED, captioner,  # noqa: F401
                                counting_backend, images, model_and_processor)
from vlm_caption.batch_size import auto_batch_size, row_memory
from vlm_caption.grouped_attention import grouped_flex_attention, grouped_sdpa_attention
from vlm_caption.kv_fp8 import FP8, MARK, fp8_cache, readable_kv, set_kv_fp8, stored, to_fp8

FIXED = {"max_tokens": 8, "min_tokens": 8}


def test_to_fp8_rounds_to_three_mantissa_bits_and_saturates():
    x = torch.tensor([1.0, 1.0625, 1.1, -3.3, 500.0, -1e4, 1e-4])
    got = to_fp8(x)
    assert got.dtype == FP8 and got.element_size() == 1
    # 1.0625 = 1 + 1/16 sits halfway between 1 and 1.125 (3 mantissa bits): to even; 3.3 -> 3.25; past 448: 448
    assert got.float().tolist() == [1.0, 1.0, 1.125, -3.25, 448.0, -448.0, 0.0]
    assert not torch.isnan(to_fp8(torch.tensor([float("inf"), -float("inf")])).float()).any()


def test_readable_kv_converts_an_fp8_cache_and_rounds_a_marked_layers_dynamic_one():
    class Layer:
        pass

    q = torch.randn(2, 4, 1, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    plain, marked = Layer(), Layer()
    setattr(marked, MARK, True)
    assert readable_kv(plain, q, k, v) == (k, v)  # a run without fp8: untouched, no copy
    from_cache = readable_kv(plain, q, to_fp8(k), to_fp8(v))
    rounded = readable_kv(marked, q, k, v)
    for got, want in zip(from_cache + rounded, (k, v, k, v)):
        assert got.dtype == q.dtype
        torch.testing.assert_close(got, to_fp8(want).float())
    assert (rounded[0] != k).any()  # rounding happened


@pytest.mark.parametrize("kernel", [grouped_sdpa_attention, grouped_flex_attention])
def test_the_grouped_kernels_read_an_fp8_cache_as_its_converted_values(kernel):
    from test_grouped_attention import attention_inputs

    module, q, k, v, mask = attention_inputs(keys=300)
    want, _ = kernel(module, q, to_fp8(k).float(), to_fp8(v).float(), mask, scaling=0.1)
    got, _ = kernel(module, q, to_fp8(k), to_fp8(v), mask, scaling=0.1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    prompt = attention_inputs(q_len=5, keys=11)  # a prompt: transformers' sdpa, after the conversion
    want, _ = kernel(prompt[0], prompt[1], to_fp8(prompt[2]).float(), to_fp8(prompt[3]).float(), None, scaling=0.1)
    got, _ = kernel(prompt[0], prompt[1], to_fp8(prompt[2]), to_fp8(prompt[3]), None, scaling=0.1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("rows,device,compiling,flex", [
    (64, "cuda", True, True), (1, "cuda", True, True),  # a retry's 64 rows: flex reads float8, sdpa converts it
    (64, "cpu", True, False), (64, "cuda", False, False)])  # flex reads float8 only compiled on CUDA
def test_auto_takes_flex_for_an_fp8_cache_at_any_rows(rows, device, compiling, flex):
    from vlm_caption.grouped_attention import wants_flex

    assert wants_flex(rows, device, compiling, kv_fp8=True) is flex
    assert wants_flex(rows, device, compiling) is False  # (the model's dtype: from FLEX_MIN_ROWS only)


def test_an_fp8_static_cache_stores_one_byte_per_element(model_and_processor, images):
    """The static cache's buffers are float8 (half a bf16 cache, a quarter of this fp32 model's), written in
    place at the same addresses batch after batch, and hold the model's keys rounded."""
    model, processor = model_and_processor
    cap = captioner(model, processor, compile="on", compile_options={"backend": counting_backend},
                    kv_cache_dtype="fp8", **FIXED)
    assert cap.kv_fp8 and cap.static_decode.kv_fp8
    token_ids(cap, images[:4])
    cache = cap.static_decode.caches[4]
    layer = cache.layers[0]
    assert type(layer).__name__ == "Fp8StaticLayer" and layer.keys.dtype == layer.values.dtype == FP8
    text = model.config.get_text_config(decoder=True)
    assert layer.keys.shape == (4, text.num_key_value_heads, cap.static_decode.max_cache_len, text.head_dim)
    written = int(layer.cumulative_length)
    assert written == cap.prompt_inputs["input_ids"].shape[-1] + FIXED["max_tokens"] - 1  # (the last token: not fed)
    assert layer.keys[:, :, :written].float().abs().sum() > 0 and layer.keys[:, :, written:].float().abs().sum() == 0
    address = layer.keys.data_ptr()
    token_ids(cap, images[2:6])
    assert cap.static_decode.caches[4].layers[0].keys.data_ptr() == address
    with pytest.raises(ValueError, match="before its first update"):
        fp8_cache(cache)


def test_a_compiled_step_writes_the_fp8_cache_in_place_without_copying_it():
    """Under torch 2.11's inductor (the GPU host's), the write as it was, an index_copy_ through a uint8 view of
    the float8 buffer, compiled into a copy of the whole cache every step (~76 GB a step for the 4B at 512 rows);
    the index assignment is written in place. Real inductor: no cache-sized buffer in its code, the slot written."""
    from torch._inductor.utils import run_and_get_code

    from vlm_caption.kv_fp8 import fp8_layer_class

    shape = (2, 4, 48, 32)  # (rows, KV heads, cache slots, head size)
    layer = fp8_layer_class()(max_cache_len=shape[2])
    prompt = torch.randn(shape[0], shape[1], 5, shape[3])
    layer.update(prompt, prompt)  # the prompt, eager
    step = torch.compile(lambda k, v: layer.update(k, v)[0].float().sum(), backend="inductor", fullgraph=True)
    new = torch.randn(shape[0], shape[1], 1, shape[3]) * 1000
    with torch.inference_mode():
        _, code = run_and_get_code(step, new, new)
    allocations = [line.strip() for line in "\n".join(code).splitlines()
                   if "empty_strided" in line and str(shape).replace(" ", "") in line.replace(" ", "")]
    assert not allocations, allocations
    assert int(layer.cumulative_length) == 6
    assert torch.equal(layer.keys[:, :, 5:6].float(), to_fp8(new).float())  # saturated at 448, written in place
    assert torch.equal(layer.keys[:, :, :5].float(), to_fp8(prompt).float()) and not layer.keys[:, :, 6:].float().any()


def sharpen_attention(model) -> None:
    """Scale the language model's query and key norms so that attention, not the residual stream, picks the
    tokens: the tiny random model otherwise writes one token whatever the image (and whatever its cache
    holds), and a path that skipped the float8 rounding would go unseen."""
    with torch.no_grad():
        for layer in model.get_decoder().layers:
            layer.self_attn.q_norm.weight.fill_(3.0)
            layer.self_attn.k_norm.weight.fill_(40.0)


def test_every_decode_path_of_an_fp8_run_gives_the_same_greedy_tokens(model_and_processor, images):
    """Whichever cache a batch takes, its keys and values are the same float8 values: the dynamic cache (eager,
    as a CPU run decodes) rounds them, the static caches store them. The tokens are the fp8 run's, not the
    full-precision run's: the cache is what the run id says."""
    model, processor = model_and_processor
    sharpen_attention(model)
    dynamic = captioner(model, processor, kv_cache_dtype="fp8", **FIXED)
    assert dynamic.static_decode is None and dynamic.kv_fp8
    want = token_ids(dynamic, images)
    compiled = {"compile": "on", "compile_options": {"backend": counting_backend}}
    assert token_ids(captioner(model, processor, kv_cache_dtype="fp8", **compiled, **FIXED), images) == want
    assert token_ids(captioner(model, processor, kv_cache_dtype="fp8", decode_loop="graph", **compiled, **FIXED),
                     images) == want
    assert token_ids(captioner(model, processor, kv_cache_dtype="fp8", decode_loop="graph", compile="on", **FIXED),
                     images[:4]) == want[:4]  # inductor, the compiler a GPU uses (its CPU backend here)
    flex = captioner(model, processor, kv_cache_dtype="fp8", decode_loop="graph", compile="on",
                     grouped_attention="flex", **FIXED)  # (a CPU's flex wants one dtype: converted first)
    assert token_ids(flex, images[:4]) == want[:4]
    stream = continuous_captioner(model, processor, kv_cache_dtype="fp8", **FIXED)
    got, _ = streamed_ids(stream, images, slots=2)
    assert [got[i] for i in range(len(images))] == without_pads(want, stream)
    # A later captioner on the same model without fp8 takes the mark off: its tokens are the model's own.
    plain = token_ids(captioner(model, processor, **FIXED), images)
    assert not any(getattr(m, MARK, False) for m in model.modules())
    assert sum(p != w for p, w in zip(plain, want)) >= len(images) // 2  # the rounding shows in the tokens


def test_where_flex_cannot_read_float8_the_batch_is_decoded_again_with_the_grouped_sdpa(model_and_processor, images,
                                                                                        monkeypatch, caplog):
    """A torch whose FlexAttention wants one dtype (older than the card's should be): here inductor's CPU kernel,
    handed the float8 cache as a card's would be, refuses it. The batch is decoded again with the grouped sdpa
    (which converts the cache), the same greedy tokens, a warning, and sdpa for the rest of the run."""
    import vlm_caption.grouped_attention as grouped_module

    model, processor = model_and_processor
    sharpen_attention(model)
    want = token_ids(captioner(model, processor, kv_cache_dtype="fp8", **FIXED), images[:4])
    monkeypatch.setattr(grouped_module, "flex_reads_fp8", lambda query: torch.compiler.is_compiling())
    monkeypatch.setattr(grouped_module, "wants_flex", lambda rows, device, compiling, kv_fp8=False: compiling)
    cap = captioner(model, processor, kv_cache_dtype="fp8", decode_loop="graph", compile="on", **FIXED)
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:4]) == want
    assert "failed with FlexAttention" in caplog.text and "dtype" in caplog.text
    assert cap.decoding_report(4)["attention"] == "sdpa"


def test_the_fp8_run_is_its_rounding_of_the_full_precision_run(model_and_processor, images):
    """What the rounding of keys and values does to the first new token's logits: a small relative error on this
    random model, not none (the marked layers did round)."""
    model, processor = model_and_processor
    inputs = captioner(model, processor, **FIXED).assemble([captioner(model, processor).prepare(im) for im in images])
    with torch.inference_mode():
        full = model(**inputs.inputs).logits[:, -1]
        set_kv_fp8(model, True)
        try:
            rounded = model(**inputs.inputs).logits[:, -1]
        finally:
            set_kv_fp8(model, False)
    error = ((rounded - full).norm() / full.norm()).item()
    assert 0 < error < 0.1


def test_continuous_batchings_copy_of_a_prompt_saturates_into_fp8():
    buffer = torch.zeros(2, 3, dtype=FP8)
    states = torch.tensor([[1.1, 600.0, -700.0], [0.5, 2.0, 3.3]])
    buffer[torch.tensor([0, 1])] = stored(buffer, states)
    assert buffer.float().tolist() == [[1.125, 448.0, -448.0], [0.5, 2.0, 3.25]]
    assert stored(torch.zeros(1), states) is states


def test_auto_batch_size_counts_one_byte_per_cached_element():
    """The 4B's config at 536 tokens: the fp8 cache halves the KV term, and the same free memory holds more rows."""
    from vlm_caption.tiny_model import build_config, build_tokenizer

    config = build_config("gemma-3-4b", build_tokenizer())
    bf16 = row_memory(config, 536, 2, static_full_attention=True)
    fp8 = row_memory(config, 536, 2, static_full_attention=True, kv_bytes=1)
    assert fp8.kv_cache * 2 == bf16.kv_cache and fp8.vision == bf16.vision and fp8.prefill == bf16.prefill
    free = 55 * 10**9  # after the weights (weight_bytes 0); the tower over 64 images at a time, as a run has it
    sizes = [auto_batch_size(config, free, 0, 536, 2, cap=1024, static_full_attention=True, vision_rows=64,
                             kv_bytes=kv) for kv in (None, 1)]
    assert sizes == [256, 512]


def test_an_fp8_run_is_a_run_of_its_own_and_says_so(tiny_model_dir, sample_data_dir, tmp_path):
    """--kv-cache-dtype fp8 joins the run id (auto keeps the run's id), and run.json, the run summary and the
    dataset card say what ran."""
    _, decoding, fp8_run, plain_run = run_of_its_own(tiny_model_dir, sample_data_dir, tmp_path, "kv-cache-dtype",
                                                     "fp8", "auto")
    assert decoding["kv_cache_dtype"] == "float8_e4m3fn"
    assert "keys and values cached in FP8 (`--kv-cache-dtype fp8`" in fp8_run and "FP8" not in plain_run


@pytest.mark.parametrize("flags, says", [
    (["--kv-cache-dtype", "fp8", "--attn-implementation", "eager"],
     "--kv-cache-dtype fp8 needs --attn-implementation sdpa"),
    (["--kv-cache-dtype", "int8"], "argument --kv-cache-dtype: invalid choice"),
])
def test_a_kv_cache_dtype_the_run_cannot_take_is_one_line_and_exit_2(tiny_model_dir, sample_data_dir, tmp_path,
                                                                     capsys, flags, says):
    refused_in_one_line(tiny_model_dir, sample_data_dir, tmp_path, capsys, flags, says)


def test_bench_kv_fp8_runs_and_reports_both_sides(capsys):
    """benchmarks/bench_kv_fp8.py on the tiny preset: the cache's bytes from real buffers (a quarter of this
    fp32 model's), the drift, and both sides' rates."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from bench_kv_fp8 import main
    finally:
        sys.path.pop(0)
    assert main(["--preset", "tiny", "--batch", "2", "--new-tokens", "4", "--rounds", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cache = result["cache_bytes_a_row"]
    assert cache["this_preset"]["auto"] == 4 * cache["this_preset"]["fp8"] > 0
    assert cache["gemma_3_4b_536_tokens_bf16"] == 2 * cache["gemma_3_4b_536_tokens_fp8"]
    assert 0 < result["first_token_logits"]["relative_error"] < 0.1 and result["fp8_over_auto"] > 0
    assert set(result["img_s"]) == {"auto", "fp8"} and result["greedy_tokens"]["rows_identical"].endswith("/2")


@pytest.mark.parametrize("static, device, kernel, says", [
    (False, "cpu", "auto", "rounded at every step"),
    (True, "cuda", "sdpa", "converts the cache before reading it"),
    (True, "cuda", "auto", None),  # auto: flex, which reads it as it is
    (True, "cpu", "sdpa", None),  # (a CPU's run has no static cache unless --compile on: a test's setting)
])
def test_an_fp8_run_where_it_costs_time_says_so(caplog, static, device, kernel, says):
    from vlm_caption.kv_fp8 import warn_where_fp8_costs

    with caplog.at_level("WARNING"):
        warn_where_fp8_costs(static, device, kernel)
    assert (says in caplog.text) if says else not caplog.text


def test_a_transformers_whose_static_layer_fp8_cannot_extend_is_named_before_loading(monkeypatch):
    import transformers.cache_utils as cache_utils

    from vlm_caption.kv_fp8 import kv_fp8_problem

    assert kv_fp8_problem() is None  # 5.17 (the GPU host's) and 5.24 (this machine's)

    class OlderStaticLayer:  # positions from generate's cache_position, no tensor of its own
        def __init__(self, max_cache_len):
            self.max_cache_len = max_cache_len

    monkeypatch.setattr(cache_utils, "StaticLayer", OlderStaticLayer)
    assert "--kv-cache-dtype fp8 needs a transformers whose StaticLayer counts" in kv_fp8_problem()
