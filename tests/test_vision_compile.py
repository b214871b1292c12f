"""The vision tower compiled with the decode step (vlm_caption/vision_compile.py), on the tiny Gemma 3 (CPU):
the same tokens, one graph per module and at most one recompile for a new batch size, the tower eager when
compile is off, and a compiled tower that fails given up for the run after one retry of the batch."""
from __future__ import annotations

import threading

import torch

from test_decode_loop import token_ids
from test_static_decode import (CAPTURED, VISION_CAPTURED, captioner, counting_backend, images,  # noqa: F401
                                is_vision_graph, model_and_processor)
from vlm_caption.vision_compile import set_vision_compile, vision_compiled


def test_compile_on_compiles_the_tower_once_and_once_more_for_a_new_batch_size(model_and_processor, images):
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = [token_ids(captioner(model, processor, **fixed), batch) for batch in (images, images[:3], images[:1])]
    VISION_CAPTURED.clear()
    cap = captioner(model, processor, compile="on", compile_options={"backend": counting_backend}, **fixed)
    assert vision_compiled(model) and cap.decoding_report(6)["vision_tower"] == "compiled"
    assert token_ids(cap, images) == want[0]
    assert len(VISION_CAPTURED) == 2  # the tower and the projector, at 6 rows
    assert token_ids(cap, images[:3]) == want[1]  # 3 rows padded to 4: a new size, compiled with a dynamic batch
    assert len(VISION_CAPTURED) == 4
    assert token_ids(cap, images) == want[0] and token_ids(cap, images[:2]) == want[1][:2]
    assert len(VISION_CAPTURED) == 4  # any later size, and the first one again: nothing new
    assert token_ids(cap, images[:1]) == want[2]
    assert len(VISION_CAPTURED) == 6  # but one row: torch specialises a size of 1 (as the decode step's bucket)
    # The pipeline assembles on another thread, a retry inside generate: the same kind of tensors, no recompile.
    pixels = [cap.prepare(im) for im in images]
    assembled = []
    thread = threading.Thread(target=lambda: assembled.append(cap.assemble(pixels)))
    thread.start()
    thread.join()
    assert assembled[0].inputs["pixel_values"].is_inference()
    list(cap.generate([f"k{i}" for i in range(6)], assembled[0]))
    assert len(VISION_CAPTURED) == 6


def test_the_tower_stays_eager_with_compile_off_auto_on_a_cpu_or_the_static_cache_uncompiled(model_and_processor):
    model, processor = model_and_processor
    captioner(model, processor, compile="on", compile_options={"backend": counting_backend})
    assert vision_compiled(model)
    for kw in ({"compile": "off"}, {"compile": "auto"}, {"compile": "on", "compile_options": {"compile": False}},
               {"compile": "on", "compile_options": {"backend": counting_backend, "vision": False}}):
        cap = captioner(model, processor, **kw)  # (each one also un-compiles what an earlier one compiled)
        assert not vision_compiled(model), kw
        assert cap.decoding_report(4)["vision_tower"] == "eager"


def test_a_batch_whose_compiled_tower_fails_runs_again_with_it_eager(model_and_processor, images, caplog):
    """A tower that does not compile (a card, torch or Triton it was never run on: here a compiler that refuses
    its graphs) costs one retry of the batch, not the run: the same tokens, a warning, and the eager tower for
    the rest of the run, while the decode step stays compiled."""
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    refused, decode_graphs = [], []

    def no_vision_backend(gm, example_inputs):
        if is_vision_graph(gm):
            refused.append(1)
            raise RuntimeError("triton: out of resource: shared memory, required: 264192")
        decode_graphs.append(gm)
        return gm.forward

    cap = captioner(model, processor, compile="on", compile_options={"backend": no_vision_backend}, **fixed)
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:3]) == want
    assert refused == [1] and not vision_compiled(model) and decode_graphs
    assert "failed with the tower compiled" in caplog.text and "out of resource" in caplog.text
    assert token_ids(cap, images[:3]) == want and refused == [1]  # later batches: eager, no retry
    assert cap.decoding_report(3)["vision_tower"] == "eager"


def test_set_vision_compile_leaves_a_model_without_a_tower_alone():
    class TextOnly(torch.nn.Module):
        pass

    assert set_vision_compile(TextOnly(), True) is False and not vision_compiled(TextOnly())


def test_with_vision_overlap_a_failing_compiled_tower_is_given_up_on_the_assembling_side(model_and_processor, images,
                                                                                           caplog):
    """--vision-overlap runs the tower where the next batch is assembled, outside generate: a compiled tower that
    fails there is given up for the run too, and the batch gets its features from the eager tower."""
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    refused = []

    def no_vision_backend(gm, example_inputs):
        if is_vision_graph(gm):
            refused.append(1)
            raise RuntimeError("inductor: no C++ compiler")
        return gm.forward

    cap = captioner(model, processor, compile="on", compile_options={"backend": no_vision_backend},
                    vision_overlap=True, **fixed)
    pixels = [cap.prepare(im) for im in images[:3]]
    with caplog.at_level("WARNING"):
        assembled = cap.assemble(pixels)  # the tower runs here, with the next batch's copies
    assert assembled.ahead is not None and refused == [1] and not vision_compiled(model)
    assert "failed with the tower compiled" in caplog.text and "no C++ compiler" in caplog.text
    assert cap.vision_ahead.misses == 0
    rows = []
    real = cap._finish
    cap._finish = lambda tokens: rows.append(tokens.tolist()) or real(tokens)
    list(cap.generate([f"k{i}" for i in range(3)], assembled))
    assert rows == want and cap.vision_ahead.misses == 0  # the prefill took the features served, not the tower


def test_out_of_memory_gives_up_neither_the_compiled_tower_nor_flex(model_and_processor, images, monkeypatch):
    """Out of memory is the caller's to back off from (a smaller batch), not a kernel's fault: the batch raises
    it at once with the tower still compiled and flex still the decode attention (explicit flex without the
    static cache gave flex up on an out-of-memory error before)."""
    import pytest

    from vlm_caption.grouped_attention import decode_attention_kernel

    model, processor = model_and_processor
    for kw in ({"compile": "on", "compile_options": {"backend": counting_backend}},
               {"compile": "off", "grouped_attention": "flex"}):
        cap = captioner(model, processor, max_tokens=4, min_tokens=4, **kw)
        calls = []

        def no_memory(*a, **k):
            calls.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.40 GiB")

        monkeypatch.setattr(model, "generate", no_memory)
        with pytest.raises(torch.OutOfMemoryError):
            token_ids(cap, images[:2])
        monkeypatch.undo()
        assert calls == [1], kw  # no retry at the same size
        assert vision_compiled(model) is (kw["compile"] == "on")
        assert decode_attention_kernel(model) == kw.get("grouped_attention", "auto")
