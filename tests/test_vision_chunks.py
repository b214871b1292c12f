"""The vision tower over a batch in chunks of images (vlm_caption/vision_chunks.py) on the tiny Gemma 3 (CPU):
the same features and greedy tokens as over the whole batch, on the generate and graph loops and with
--vision-overlap, and the auto batch size no longer paying the tower's activations per row."""
from __future__ import annotations

import pytest
import torch

from test_decode_loop import token_ids
from test_static_decode import captioner, counting_backend, images, model_and_processor  # noqa: F401
from test_vision_ahead import ids_of
from vlm_caption.batch_size import auto_batch_size, parameter_bytes, row_memory
from vlm_caption.tiny_model import build_config, build_tokenizer
from vlm_caption.vision_chunks import ChunkedImageFeatures, set_vision_chunk_rows, vision_chunk_rows

COMPILED = {"compile": "on", "compile_options": {"backend": counting_backend}}
GB = 10**9


@pytest.fixture
def tower_batches(model_and_processor, monkeypatch):
    """The number of images of every run of the vision tower."""
    model, _ = model_and_processor
    sizes = []
    tower = model.model.vision_tower
    real = tower.forward
    monkeypatch.setattr(tower, "forward", lambda *a, **kw: sizes.append(kw["pixel_values"].shape[0]) or real(*a, **kw))
    return sizes


@pytest.mark.parametrize("path", ["dynamic", "graph"])
def test_same_tokens_as_the_whole_batch(path, model_and_processor, images, tower_batches):
    model, processor = model_and_processor
    kw = {"dynamic": {}, "graph": {**COMPILED, "decode_loop": "graph"}}[path]
    prompts = ["Describe.", "Describe this artwork in great detail, with its colours.", "Name it."]
    whole = captioner(model, processor, vision_chunk_rows=0, **kw)
    want = [token_ids(whole, images), token_ids(whole, images[:3], prompts)]
    assert tower_batches == [6, 3 if path == "dynamic" else 4]  # (the static paths pad 3 rows to 4)
    tower_batches.clear()
    cap = captioner(model, processor, vision_chunk_rows=4, **kw)
    assert [token_ids(cap, images), token_ids(cap, images[:3], prompts)] == want
    assert tower_batches == [4, 2, 3 if path == "dynamic" else 4]  # a batch of <= 4 rows: one call
    assert vision_chunk_rows(model) == 4 and cap.decoding_report(6)["vision_chunk_rows"] == 4


def test_the_features_are_the_whole_batch_s_and_only_the_pooled_ones_are_kept(model_and_processor, images):
    model, processor = model_and_processor
    cap = captioner(model, processor, vision_chunk_rows=0)
    pixels = cap.collate([cap.prepare(im) for im in images])["pixel_values"]
    inner = model.model
    with torch.inference_mode():
        whole = inner.get_image_features(pixels, return_dict=True)
        chunked = ChunkedImageFeatures(inner, 4)
        out = chunked(pixels, return_dict=True)
    assert chunked.chunked_calls == 1 and out.last_hidden_state is None  # not every patch of every image
    assert out.pooler_output.shape == whole.pooler_output.shape
    torch.testing.assert_close(out.pooler_output, whole.pooler_output, rtol=1e-5, atol=1e-5)


def test_with_the_vision_overlap_the_tower_runs_in_chunks_at_assembly(model_and_processor, images, tower_batches):
    """--vision-overlap answers the prefill's call with features it computed through the chunks; a later
    Captioner's chunk size reaches it (one VisionAhead per model)."""
    model, processor = model_and_processor
    phase = ["assemble"]
    want = ids_of(captioner(model, processor, vision_chunk_rows=0), images, phase)
    tower_batches.clear()
    cap = captioner(model, processor, vision_overlap=True, vision_chunk_rows=4)
    assert ids_of(cap, images, phase) == want and cap.vision_ahead.misses == 0
    assert tower_batches == [4, 2] and vision_chunk_rows(model) == 4
    again = captioner(model, processor, vision_overlap=True, vision_chunk_rows=2)
    assert again.vision_ahead is cap.vision_ahead and vision_chunk_rows(model) == 2
    tower_batches.clear()
    assert ids_of(again, images, phase) == want and tower_batches == [2, 2, 2]


def test_a_model_whose_features_come_in_another_form_runs_whole_batches(model_and_processor, images, caplog):
    """Another model's get_image_features may return a tensor (no pooler_output): the first chunked call runs
    the whole batch through the model's own method instead, and so do the later ones (logged once)."""
    import logging

    model, processor = model_and_processor
    cap = captioner(model, processor, vision_chunk_rows=0)
    pixels = cap.collate([cap.prepare(im) for im in images])["pixel_values"]
    inner = model.model
    sizes = []

    def tensor_features(self, pixel_values, **kwargs):
        sizes.append(pixel_values.shape[0])
        return pixel_values.mean(dim=(1, 2, 3))

    chunked = ChunkedImageFeatures(inner, 4)
    chunked.own = tensor_features.__get__(inner)
    with caplog.at_level(logging.INFO, logger="vlm_caption.vision_chunks"):
        first, second = chunked(pixels, return_dict=True), chunked(pixels, return_dict=True)
    assert torch.equal(first, pixels.mean(dim=(1, 2, 3))) and torch.equal(second, first)
    assert sizes == [4, 6, 6] and chunked.rows == 0 and chunked.chunked_calls == 0
    assert caplog.text.count("another form") == 1


def test_no_chunks_is_the_model_s_own_method(model_and_processor):
    model, processor = model_and_processor
    captioner(model, processor)  # the default: chunks of VISION_CHUNK_ROWS
    assert isinstance(model.model.__dict__.get("get_image_features"), ChunkedImageFeatures)
    assert set_vision_chunk_rows(model, 0) == 0 and "get_image_features" not in model.model.__dict__
    assert vision_chunk_rows(model) == 0
    with pytest.raises(ValueError, match=">= 1"):
        set_vision_chunk_rows(model, -1)


def test_chunks_let_the_kv_cache_set_the_batch():
    """The 4B at a 336-token prompt + 200 new tokens: over the whole batch, SigLIP's activations (~127 MB an
    image) cap an 80 GB card at 256 rows; in chunks of 64 they are one chunk's, and 512 fit."""
    config = build_config("gemma-3-4b", build_tokenizer())
    weights = parameter_bytes(config, 2)
    memory = row_memory(config, 536, 2, static_full_attention=True, prompt_tokens=336)
    per_row = memory.kv_cache + memory.pixels + memory.logits
    assert memory.batch_bytes(512, 0) == 512 * (per_row + memory.vision)
    # In chunks, the larger of one chunk's tower and the whole batch's prompt through a layer (here the prompt).
    assert memory.batch_bytes(512, 64) == 512 * (per_row + memory.prefill) > 64 * memory.vision + 512 * per_row
    assert memory.batch_bytes(128, 64) == 128 * per_row + 64 * memory.vision  # (the chunk's tower the larger)
    assert memory.batch_bytes(8, 64) == memory.batch_bytes(8, 0) == 8 * memory.total  # a batch within one chunk
    pick = {rows: auto_batch_size(config, 80 * GB, weights, 536, 2, cap=1024, static_full_attention=True,
                                  prompt_tokens=336, vision_rows=rows) for rows in (0, 64)}
    assert pick == {0: 256, 64: 512}
    overlap = auto_batch_size(config, 80 * GB, weights, 536, 2, cap=1024, static_full_attention=True,
                              prompt_tokens=336, vision_rows=64, vision_overlap=True)
    assert 256 <= overlap <= 512
    assert auto_batch_size(config, 141 * GB, weights, 536, 2, static_full_attention=True, prompt_tokens=336,
                           vision_rows=64) == 512  # an H200: the default cap
    # The retries' own cache of 64 rows (~4.5 GB) beside the batch's: 512 still fit on 80 GB, not on 76 GB.

    def pick(gb, retry_rows):
        return auto_batch_size(config, gb * GB, weights, 536, 2, cap=1024, static_full_attention=True,
                               prompt_tokens=336, vision_rows=64, retry_rows=retry_rows)

    assert pick(80, 64) == 512 and (pick(76, 0), pick(76, 64)) == (512, 256)
