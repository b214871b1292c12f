"""The language model's prefill compiled with the decode step (vlm_caption/prefill_compile.py), on the tiny
Gemma 3 (CPU): prompts only, one graph for every prompt length, the same tokens on every decode loop and batch
shape, the static cache allocated before the prefill (its buffers marked static for CUDA graphs), and its
failures and out of memory handled without blaming the tower. The tower's tests: test_prefill_compile.py."""
from __future__ import annotations

import pytest
import torch

from test_decode_loop import token_ids
from test_prefill_compile import language_compiled, refusing_vision_backend, vision_compiled
from test_static_decode import (CAPTURED, PREFILL_CAPTURED, VISION_CAPTURED, captioner,  # noqa: F401
                                counting_backend, images, is_language_prefill_graph, is_vision_graph,
                                model_and_processor)
from vlm_caption.prefill_compile import set_prefill_compile


def test_the_language_models_prefill_compiles_once_for_every_prompt_length_and_never_a_decode_step(
        model_and_processor):
    """The language model's compiled call takes prompts (more than one token) only, with their length dynamic
    from the first call; a one-token call (an eager decode step) runs the module itself."""
    model, _ = model_and_processor
    lm = model.model.language_model
    PREFILL_CAPTURED.clear()
    assert set_prefill_compile(model, {"language"}, {"backend": counting_backend}) == {"language"}
    assert language_compiled(model) and not vision_compiled(model)
    torch.manual_seed(0)
    with torch.inference_mode():
        for length in (1, 9, 5, 12, 1):
            embeds = torch.randn(2, length, lm.config.hidden_size)
            got = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state
            want = lm._call_impl(inputs_embeds=embeds, use_cache=False).last_hidden_state  # the module itself
            assert torch.allclose(got, want, atol=1e-5), length
            assert len(PREFILL_CAPTURED) == (0 if length == 1 and not PREFILL_CAPTURED else 1), length
    set_prefill_compile(model, ())
    assert not language_compiled(model)


@pytest.mark.parametrize("loop", ["generate", "graph"])
def test_compile_on_compiles_the_language_models_prefill_and_keeps_the_tokens(model_and_processor, images, loop):
    """Both decode loops prefill through the compiled language model: the same tokens as eager, a graph for the
    first batch shape and one (dynamic in the batch) for the rest, none for another prompt length, and the
    static cache's buffers marked as fixed addresses (CUDA graphs of the decode step need them; transformers
    skips the mark when the first update is traced, so the cache is allocated before the prefill)."""
    from test_decode_loop import token_ids as ids_for

    model, processor = model_and_processor
    prompts = ["Describe it.", "Hi.", "Describe this art."]  # shorter than the run's prompt: the static cache fits
    reference = captioner(model, processor, max_tokens=6, min_tokens=6)
    want = [ids_for(reference, images), ids_for(reference, images[:3]), ids_for(reference, images[:3], prompts)]
    PREFILL_CAPTURED.clear()
    cap = captioner(model, processor, max_tokens=6, min_tokens=6, compile="on", decode_loop=loop,
                    compile_options={"backend": counting_backend})
    assert cap.decoding_report(6)["language_model_prefill"] == "compiled"
    assert [ids_for(cap, images), ids_for(cap, images[:3]), ids_for(cap, images[:3], prompts)] == want
    # One graph: every decoder layer (sliding and full) for 6 rows, 3 rows padded to 4, another prompt length.
    assert len(PREFILL_CAPTURED) == 1
    assert ids_for(cap, images) == want[0] and ids_for(cap, images[:3], prompts) == want[2]
    assert len(PREFILL_CAPTURED) == 1
    for cache in cap.static_decode.caches.values():
        for layer in cache.layers:
            assert hasattr(layer.keys, "_dynamo_static_input_type"), "a cache buffer not marked static"


def test_a_failing_language_model_prefill_is_given_up_and_the_tower_stays_compiled(model_and_processor, images,
                                                                                   caplog):
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    refused: list = []
    cap = captioner(model, processor, compile="on", decode_loop="graph", **fixed,
                    compile_options={"backend": refusing_vision_backend(refused, refuses=is_language_prefill_graph)})
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:3]) == want
    assert refused == [1] and not language_compiled(model) and vision_compiled(model)
    assert "language model's prefill: a batch failed with it compiled" in caplog.text
    assert "vision tower: a batch failed" not in caplog.text
    assert token_ids(cap, images[:3]) == want and refused == [1]
    report = cap.decoding_report(3)
    assert (report["vision_tower"], report["language_model_prefill"]) == ("compiled", "eager")


def test_when_both_compiled_parts_fail_the_batch_runs_again_with_both_eager(model_and_processor, images, caplog):
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    refused: list = []
    either = lambda gm: is_vision_graph(gm) or is_language_prefill_graph(gm)  # noqa: E731
    cap = captioner(model, processor, compile="on", **fixed,
                    compile_options={"backend": refusing_vision_backend(refused, refuses=either)})
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:3]) == want
    assert len(refused) == 2 and not language_compiled(model) and not vision_compiled(model)
    assert caplog.text.count("a batch failed with it compiled") == 2


def test_every_shape_a_run_meets_compiles_a_bounded_set_of_prefill_graphs(model_and_processor, images):
    """A run's batches: the first size, the padded last, smaller ones after failed images, a single row, and
    templated prompts too long for the static cache (the dynamic cache then): the same tokens as eager, and
    6 prefill graphs in all (under the recompile limit prefill_compile raises to 16: past it dynamo would run
    the rest eagerly)."""
    import torch._dynamo

    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    long = ["Describe this artwork in one long sentence, naming its colours, its mood and its medium, please."]
    batches = [(6, None), (3, None), (2, None), (1, None), (3, long * 3), (1, long), (5, None)]
    reference = captioner(model, processor, **fixed)
    want = [token_ids(reference, images[:n], prompts) for n, prompts in batches]
    VISION_CAPTURED.clear()
    PREFILL_CAPTURED.clear()
    cap = captioner(model, processor, compile="on", decode_loop="graph",
                    compile_options={"backend": counting_backend}, **fixed)
    assert [token_ids(cap, images[:n], prompts) for n, prompts in batches] == want
    # The tower's layers and the projector, the language model's layers: any size, and 1 row.
    assert (len(VISION_CAPTURED), len(PREFILL_CAPTURED)) == (4, 2)
    assert torch._dynamo.config.recompile_limit >= 16


def test_out_of_memory_in_a_compiled_prefill_gives_nothing_up_and_frees_the_caches(model_and_processor, images):
    """Out of memory raised inside the compiled language model (not a faked generate): the caller's to back
    off from, with the prefill still compiled and the static caches freed for the smaller retry."""
    model, processor = model_and_processor

    def backend(gm, example_inputs):
        if not is_language_prefill_graph(gm):
            return gm.forward

        def no_memory(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.40 GiB")

        return no_memory

    cap = captioner(model, processor, max_tokens=4, min_tokens=4, compile="on", compile_options={"backend": backend})
    with pytest.raises(torch.OutOfMemoryError):
        token_ids(cap, images[:2])
    assert language_compiled(model) and vision_compiled(model) and cap.static_decode.caches == {}


def test_a_cache_that_does_not_fit_frees_the_others(model_and_processor, images, monkeypatch):
    """A static cache's buffers are allocated when it is made: out of memory there is the batch's, and the
    other caches are freed and the run's batch size forgotten before the caller backs off."""
    from transformers import StaticCache

    model, processor = model_and_processor
    cap = captioner(model, processor, max_tokens=4, min_tokens=4, compile="on",
                    compile_options={"backend": counting_backend})
    token_ids(cap, images)
    assert list(cap.static_decode.caches) == [6] and cap.static_decode.run_batch == 6

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.10 GiB")

    monkeypatch.setattr(StaticCache, "early_initialization", no_memory)
    with pytest.raises(torch.OutOfMemoryError):
        token_ids(cap, images[:2])  # a new bucket of 2
    assert cap.static_decode.caches == {} and cap.static_decode.run_batch == 0


def test_an_error_marked_with_a_part_not_compiled_or_out_of_memory_is_not_retried(model_and_processor):
    """A retry follows a part given up, so it cannot fail the same way forever; out of memory gives none up."""
    from vlm_caption.prefill_compile import _RAISED_IN, eager_prefill_on_failure, give_up_prefill_compile

    model, _ = model_and_processor
    set_prefill_compile(model, {"vision"}, {"backend": counting_backend})
    error = RuntimeError("triton: out of resource")
    setattr(error, _RAISED_IN, "language")
    assert give_up_prefill_compile(model, error) is False and vision_compiled(model)
    calls = []

    def failing():
        calls.append(1)
        raise error

    with pytest.raises(RuntimeError, match="out of resource"):
        eager_prefill_on_failure(model, failing)
    assert calls == [1]
    # Out of memory out of a compiled part (continuous batching's chunk prefill, --vision-overlap): the caller's
    # to back off from, not the compile's fault.
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.40 GiB")
    setattr(error, _RAISED_IN, "vision")
    with pytest.raises(torch.OutOfMemoryError):
        eager_prefill_on_failure(model, failing)
    assert calls == [1, 1] and vision_compiled(model)


def test_a_prefill_traced_from_an_outer_compiled_region_is_part_of_that_graph(model_and_processor):
    """Inside another compiled function (a decode step's graph traces the module), the language model's call
    is the module itself: no compiled call of its own, one graph, the same output."""
    model, _ = model_and_processor
    lm = model.model.language_model
    set_prefill_compile(model, {"language"}, {"backend": counting_backend})
    CAPTURED.clear()
    PREFILL_CAPTURED.clear()
    outer = torch.compile(lambda x: lm(inputs_embeds=x, use_cache=False).last_hidden_state, backend=counting_backend)
    embeds = torch.randn(2, 7, lm.config.hidden_size)
    with torch.inference_mode():
        got = outer(embeds)
        want = lm._call_impl(inputs_embeds=embeds, use_cache=False).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    assert len(CAPTURED) == 1 and PREFILL_CAPTURED == []


def test_a_model_spread_over_devices_keeps_each_cache_layer_on_its_own_device(model_and_processor, monkeypatch):
    """--device-map over several devices: the caches are not allocated up front on the first parameter's device
    (a later layer on another GPU would write across devices); each layer allocates at its first update, which
    is never traced there (the prefill stays eager)."""
    from vlm_caption.static_decode import prepare_static_decode

    model, _ = model_and_processor
    here, _ = prepare_static_decode(model, 64, compile=False)
    assert all(layer.is_initialized for layer in here.cache_for(2)[1].layers)
    monkeypatch.setattr(model, "hf_device_map", {"model.vision_tower": 0, "model.language_model": 1}, raising=False)
    spread, _ = prepare_static_decode(model, 64, compile=False)
    assert not any(layer.is_initialized for layer in spread.cache_for(2)[1].layers)
    assert set_prefill_compile(model, {"vision", "language"}) == set()


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_the_layers_compiled_alone_write_the_cache_eager_writes_and_share_one_graph(model_and_processor, kind):
    """Each decoder layer is compiled on its own, the cache written after its call (by the layer's index,
    outside the graph), so sliding and full layers share one graph: the same hidden states, the same cache
    (keys, values, length) as the eager prefill, with left padding, for either kind of cache. A prefill into a
    cache that already holds tokens is not the compiled kind (its keys are not the prompt's alone): it runs
    eagerly, and gives eager's result."""
    from transformers import DynamicCache, StaticCache

    from vlm_caption.static_decode import _cache_kwarg_name

    model, _ = model_and_processor
    inner, text = model.model, model.model.language_model.config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}

    def new_cache():
        return StaticCache(config=text, max_cache_len=32) if kind == "static" else DynamicCache(config=text)

    torch.manual_seed(0)
    with torch.inference_mode():  # (as generate's: a tensor made outside would be a graph of its own)
        embeds, more = torch.randn(3, 9, text.hidden_size), torch.randn(3, 4, text.hidden_size)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    cache_kw = _cache_kwarg_name()

    whole = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    positions = (whole.cumsum(-1) - 1).clamp(min=0)  # (as generate's, from the left padding)

    def prefill_then_more(compiled: bool):
        set_prefill_compile(model, {"language"} if compiled else (), {"backend": counting_backend})
        cache = new_cache()
        with torch.inference_mode():
            first = inner(inputs_embeds=embeds, attention_mask=mask, position_ids=positions[:, :9], use_cache=True,
                          **{cache_kw: cache})
            second = inner(inputs_embeds=more, attention_mask=whole, position_ids=positions[:, 9:], use_cache=True,
                           **{cache_kw: cache})
        return first.last_hidden_state, second.last_hidden_state, cache

    want = prefill_then_more(False)
    PREFILL_CAPTURED.clear()
    got = prefill_then_more(True)
    assert all(layer._compiled_call_impl for layer in inner.language_model.layers)
    assert len(PREFILL_CAPTURED) == 1  # both kinds of layer, the first prefill only
    for name, a, b in (("prompt", got[0], want[0]), ("after it", got[1], want[1])):
        assert torch.allclose(a, b, atol=1e-5), name
    for got_layer, want_layer in zip(got[2].layers, want[2].layers, strict=True):
        assert torch.allclose(got_layer.keys, want_layer.keys, atol=1e-5)
        assert torch.allclose(got_layer.values, want_layer.values, atol=1e-5)
        assert int(got_layer.get_seq_length()) == int(want_layer.get_seq_length()) == 13


def test_a_prompt_never_asks_the_decode_attentions_row_threshold(model_and_processor, monkeypatch):
    """The compiled prefill's batch is dynamic: had the decode attention's "auto" compared its rows with
    FLEX_MIN_ROWS there, the layers' graph would split at that size. A prompt goes to sdpa first; a one-token
    step still asks."""
    import vlm_caption.grouped_attention as grouped

    model, processor = model_and_processor
    captioner(model, processor, compile="on", compile_options={"backend": counting_backend})  # auto attention
    asked: list = []
    monkeypatch.setattr(grouped, "wants_flex",
                        lambda rows, device_type, compiling, kv_fp8=False: asked.append(rows) or False)
    lm = model.model.language_model
    with torch.inference_mode():
        lm(inputs_embeds=torch.randn(3, 7, lm.config.hidden_size), use_cache=False)
        assert asked == []
        lm(inputs_embeds=torch.randn(3, 1, lm.config.hidden_size), use_cache=False)
    assert asked and set(asked) == {3}
