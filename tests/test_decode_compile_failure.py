"""A compiled decode step that fails a batch (vlm_caption/decode_loop.give_up_decode_compile), on the tiny
Gemma 3 (CPU): a compiler that refuses the step's graphs, as a card, torch or Triton it was never run on might.
The batch runs again at once with the step eager and gives the same tokens; the rest of the run decodes
eagerly, with a warning; the prefill's compiled parts and FlexAttention are given up first, each alone."""
from __future__ import annotations

import pytest
import torch

from test_decode_loop import token_ids
from test_static_decode import (captioner, images, is_language_prefill_graph, is_vision_graph,  # noqa: F401
                                model_and_processor)

FIXED = {"max_tokens": 6, "min_tokens": 6}
GIVEN_UP = "decode step: a batch failed with it compiled"


def refusing_decode_backend(refused: list):
    """A compiler that refuses every decode step's graph (neither the vision tower's nor the language model's
    prefill) and runs the others as traced."""
    def backend(gm, example_inputs):
        if not (is_vision_graph(gm) or is_language_prefill_graph(gm)):
            refused.append(1)
            raise RuntimeError("triton: out of resource: shared memory, required: 264192")
        return gm.forward

    return backend


def reference_tokens(model, processor, pictures) -> list[list[int]]:
    return token_ids(captioner(model, processor, **FIXED), pictures)  # eager generate, the dynamic cache


def refused_run(model_and_processor, images, caplog, **kw):
    """(the captioner, the refusals) after a first batch with every decode step's graph refused: the same
    tokens as eager generate's."""
    model, processor = model_and_processor
    want = reference_tokens(model, processor, images[:3])
    refused: list = []
    cap = captioner(model, processor, compile="on", compile_options={"backend": refusing_decode_backend(refused)},
                    **FIXED, **kw)
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:3]) == want
    return cap, refused, want


def test_a_graph_loop_step_that_does_not_compile_runs_eagerly_for_the_rest_of_the_run(model_and_processor, images,
                                                                                      caplog):
    cap, refused, want = refused_run(model_and_processor, images, caplog, decode_loop="graph",
                                     grouped_attention="sdpa")
    assert refused == [1] and not cap.graph_decode.compiled
    assert "the decode step: a batch failed with it compiled" in caplog.text and "out of resource" in caplog.text
    assert token_ids(cap, images[:3]) == want and refused == [1]  # later batches: eager, no retry
    report = cap.decoding_report(4)
    assert report["decode_step"] == "eager" and report["loop"] == "graph"
    assert report["vision_tower"] == report["language_model_prefill"] == "compiled"  # not blamed for the step


def test_with_flex_a_failing_step_gives_up_flex_first_then_its_compile(model_and_processor, images, caplog):
    """Flex is the likelier culprit (a Triton kernel of its own): the first failure turns it off alone; the
    step failing again with the grouped sdpa is given up too. Two retries of the batch, the same tokens."""
    from vlm_caption.grouped_attention import decode_attention_kernel

    cap, refused, _ = refused_run(model_and_processor, images, caplog, decode_loop="graph", grouped_attention="flex")
    assert refused == [1, 1] and decode_attention_kernel(cap.model) == "sdpa" and not cap.graph_decode.compiled
    assert "FlexAttention" in caplog.text and GIVEN_UP in caplog.text


def test_generates_compiled_step_that_does_not_compile_runs_eagerly(model_and_processor, images, caplog):
    """--decode-loop generate (and the retry of flagged captions, and sampling, on any loop): generate's own
    compiled forward. Its compile errors are dynamo's; the run's and the retry's configs turn compiling off."""
    model, processor = model_and_processor
    assert captioner(model, processor, compile="on", decode_loop="generate").decoding_report(4)["decode_step"] == \
        "compiled"
    cap, refused, want = refused_run(model_and_processor, images, caplog, decode_loop="generate",
                                     grouped_attention="sdpa")
    assert refused == [1] and cap.gen_config.disable_compile and cap.retry_config.disable_compile
    assert "generate's decode step: a batch failed with it compiled" in caplog.text
    assert cap.decoding_report(4)["decode_step"] == "eager"
    assert token_ids(cap, images[:3]) == want and refused == [1]


def test_an_error_no_compiled_step_raised_fails_the_batch_and_leaves_the_step_compiled(model_and_processor, images,
                                                                                       monkeypatch):
    """Not a compile's fault (here the prefill, eager, meets a broken card): raised as before, nothing given up
    (an eager step would fail the same way)."""
    model, processor = model_and_processor
    cap = captioner(model, processor, compile="on", decode_loop="graph", grouped_attention="sdpa",
                    compile_options={"vision": False, "language": False}, **FIXED)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        token_ids(cap, images[:3])
    assert cap.graph_decode.compiled and cap.decoding_report(4)["decode_step"] == "compiled"


def test_out_of_memory_in_the_step_is_the_callers_to_back_off_from(model_and_processor, images, monkeypatch):
    """A smaller batch fixes out of memory, an eager step does not: the compiled step stays."""
    model, processor = model_and_processor
    cap = captioner(model, processor, compile="on", decode_loop="graph", grouped_attention="sdpa", **FIXED)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.40 GiB")

    monkeypatch.setattr(cap.graph_decode, "_step", out_of_memory)
    cap.graph_decode._compiled_step = out_of_memory  # (what `compiled` compares with)
    with pytest.raises(torch.OutOfMemoryError):
        token_ids(cap, images[:3])
    assert cap.graph_decode.compiled
