"""The prefill compiled with the decode step (vlm_caption/prefill_compile.py), on the tiny Gemma 3 (CPU): here
the vision tower and its projector, and what both parts share. The same tokens, one graph per module for every
batch size (one more for a single row), both parts eager when compile is off, a compiled part that fails given
up for the run after one retry of the batch, with nothing else given up for it and nothing else blamed on it.
The language model's own tests: test_prefill_compile_language.py."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from test_decode_loop import token_ids
from test_static_decode import (CAPTURED, PREFILL_CAPTURED, VISION_CAPTURED, captioner,  # noqa: F401
                                counting_backend, images, is_language_prefill_graph, is_vision_graph,
                                model_and_processor)
from vlm_caption.grouped_attention import decode_attention_kernel
from vlm_caption.prefill_compile import compiled_parts, set_prefill_compile


def vision_compiled(model) -> bool:
    return compiled_parts(model)["vision_tower"] == "compiled"


def language_compiled(model) -> bool:
    return compiled_parts(model)["language_model_prefill"] == "compiled"


def test_compile_on_compiles_the_tower_once_for_every_batch_size(model_and_processor, images):
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = [token_ids(captioner(model, processor, **fixed), batch) for batch in (images, images[:3], images[:1])]
    VISION_CAPTURED.clear()
    cap = captioner(model, processor, compile="on", compile_options={"backend": counting_backend}, **fixed)
    assert vision_compiled(model) and cap.decoding_report(6)["vision_tower"] == "compiled"
    assert token_ids(cap, images) == want[0]
    assert len(VISION_CAPTURED) == 2  # the tower and the projector, with the batch dimension dynamic
    # The tower layer by layer: every encoder layer compiled, all of them one graph; its embeddings eager.
    tower = model.model.vision_tower
    assert len(tower.encoder.layers) > 1 and all(layer._compiled_call_impl for layer in tower.encoder.layers)
    assert tower._compiled_call_impl is None and tower.embeddings._compiled_call_impl is None
    assert sum("layer_norm1" in gm.code for gm in VISION_CAPTURED) == 1
    assert token_ids(cap, images[:3]) == want[1] and token_ids(cap, images[:2]) == want[1][:2]
    assert token_ids(cap, images) == want[0]
    assert len(VISION_CAPTURED) == 2  # 3 rows padded to 4, 2 rows, 6 again: the same graphs
    assert token_ids(cap, images[:1]) == want[2]
    assert len(VISION_CAPTURED) == 4  # but one row: torch specialises a size of 1 (as the decode step's bucket)
    # The pipeline assembles on another thread, a retry inside generate: the same kind of tensors, no recompile.
    pixels = [cap.prepare(im) for im in images]
    assembled = []
    thread = threading.Thread(target=lambda: assembled.append(cap.assemble(pixels)))
    thread.start()
    thread.join()
    assert assembled[0].inputs["pixel_values"].is_inference()
    list(cap.generate([f"k{i}" for i in range(6)], assembled[0]))
    assert len(VISION_CAPTURED) == 4


def test_the_prefill_stays_eager_with_compile_off_auto_on_a_cpu_or_the_static_cache_uncompiled(model_and_processor):
    model, processor = model_and_processor
    captioner(model, processor, compile="on", compile_options={"backend": counting_backend})
    assert vision_compiled(model) and language_compiled(model)
    for kw in ({"compile": "off"}, {"compile": "auto"}, {"compile": "on", "compile_options": {"compile": False}},
               {"compile": "on", "compile_options": {"backend": counting_backend, "vision": False, "language": False}}):
        cap = captioner(model, processor, **kw)  # (each one also un-compiles what an earlier one compiled)
        assert not vision_compiled(model) and not language_compiled(model), kw
        report = cap.decoding_report(4)
        assert report["vision_tower"] == report["language_model_prefill"] == "eager"
    # Each A/B switch alone: its part eager, the other compiled.
    for part, other in (("vision", language_compiled), ("language", vision_compiled)):
        captioner(model, processor, compile="on", compile_options={"backend": counting_backend, part: False})
        assert other(model) and not (vision_compiled if part == "vision" else language_compiled)(model), part


def test_a_batch_whose_compiled_tower_fails_runs_again_with_it_eager(model_and_processor, images, caplog):
    """A tower that does not compile (a card, torch or Triton it was never run on: here a compiler that refuses
    its graphs) costs one retry of the batch, not the run: the same tokens, a warning, and the eager tower for
    the rest of the run, while the decode step stays compiled."""
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    refused: list = []
    decode_graphs: list = []
    cap = captioner(model, processor, compile="on",
                    compile_options={"backend": refusing_vision_backend(refused, decode_graphs)}, **fixed)
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:3]) == want
    assert refused == [1] and not vision_compiled(model) and decode_graphs
    assert "vision tower: a batch failed with it compiled" in caplog.text and "out of resource" in caplog.text
    assert token_ids(cap, images[:3]) == want and refused == [1]  # later batches: eager, no retry
    assert cap.decoding_report(3)["vision_tower"] == "eager"


def test_set_prefill_compile_leaves_a_model_without_those_parts_or_spread_over_devices_alone(model_and_processor,
                                                                                             monkeypatch):
    class TextOnly(torch.nn.Module):
        pass

    assert set_prefill_compile(TextOnly(), {"vision", "language"}) == set() and not vision_compiled(TextOnly())
    model, _ = model_and_processor  # --device-map auto with some layers offloaded: accelerate's hooks move weights
    monkeypatch.setattr(model, "hf_device_map", {"model.vision_tower": 0, "model.language_model": "cpu"},
                        raising=False)
    assert set_prefill_compile(model, {"vision", "language"}) == set()
    assert not vision_compiled(model) and not language_compiled(model)


def test_with_vision_overlap_a_failing_compiled_tower_is_given_up_on_the_assembling_side(model_and_processor, images,
                                                                                         caplog):
    """--vision-overlap runs the tower where the next batch is assembled, outside generate: a compiled tower that
    fails there is given up for the run too, and the batch gets its features from the eager tower."""
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    refused: list = []
    cap = captioner(model, processor, compile="on", compile_options={"backend": refusing_vision_backend(refused)},
                    vision_overlap=True, **fixed)
    pixels = [cap.prepare(im) for im in images[:3]]
    with caplog.at_level("WARNING"):
        assembled = cap.assemble(pixels)  # the tower runs here, with the next batch's copies
    assert assembled.ahead is not None and refused == [1] and not vision_compiled(model)
    assert "vision tower: a batch failed with it compiled" in caplog.text and "out of resource" in caplog.text
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


def refusing_vision_backend(refused: list, decode_graphs: list | None = None, refuses=is_vision_graph):
    """A compiler that refuses the vision tower's graphs (`refuses`: which graphs), as a card, torch or Triton
    it was never run on might, and runs every other graph as traced."""
    def backend(gm, example_inputs):
        if refuses(gm):
            refused.append(1)
            raise RuntimeError("triton: out of resource: shared memory, required: 264192")
        if decode_graphs is not None:
            decode_graphs.append(gm)
        return gm.forward

    return backend


def test_a_failing_tower_leaves_flex_alone(model_and_processor, images, caplog):
    """Where flex is the decode attention (auto's pick on an H100 at 128+ rows), a tower that fails is given up,
    not flex: the error is the tower's, the retry runs once, and flex stays for the decode steps."""
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    refused: list = []
    cap = captioner(model, processor, compile="on", grouped_attention="flex", decode_loop="graph",
                    compile_options={"backend": refusing_vision_backend(refused)}, **fixed)
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:3]) == want
    assert refused == [1] and not vision_compiled(model) and decode_attention_kernel(model) == "flex"
    assert "vision tower: a batch failed with it compiled" in caplog.text and "FlexAttention" not in caplog.text


def test_an_error_the_tower_did_not_raise_leaves_it_compiled(model_and_processor, images, monkeypatch):
    model, processor = model_and_processor
    cap = captioner(model, processor, max_tokens=4, min_tokens=4, compile="on",
                    compile_options={"backend": counting_backend})
    token_ids(cap, images[:2])  # the tower compiled and ran

    def broken_step(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(model, "generate", broken_step)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        token_ids(cap, images[:2])
    assert vision_compiled(model)


@pytest.mark.parametrize("failing", ["vision_tower", "language_model_prefill"])
def test_continuous_batching_gives_a_failing_part_up_and_goes_on_streaming(model_and_processor, sample_data_dir,
                                                                           tiny_model_dir, tmp_path, monkeypatch,
                                                                           failing):
    """--decode-loop continuous prefills each chunk through generate itself: a compiled part of the prefill that
    fails there costs that chunk's retry, and the stream goes on (it used to end, and the rest went in batches)."""
    from test_captioning import caption_args, read_table
    from batched_image_inference import main
    from vlm_caption import store
    import vlm_caption.captioner as captioner_module

    refused: list = []
    refuses = is_vision_graph if failing == "vision_tower" else is_language_prefill_graph
    real = captioner_module.set_prefill_compile
    monkeypatch.setattr(captioner_module, "set_prefill_compile",
                        lambda model, parts, options=None: real(
                            model, parts, {"backend": refusing_vision_backend(refused, refuses=refuses)}))
    ckpt = tmp_path / "continuous"
    code = main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--compile", "on", "--decode-loop", "continuous"))
    decoding = json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["decoding"]
    other = ({"vision_tower", "language_model_prefill"} - {failing}).pop()
    assert refused == [1] and decoding[failing] == "eager" and decoding[other] == "compiled", decoding
    assert not any("fell_back_to_batches" in run for run in decoding["continuous"].values()), decoding
    assert code == 0 and len(read_table(ckpt / store.MERGED)) > 0
