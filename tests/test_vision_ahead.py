"""--vision-overlap (vlm_caption/vision_ahead.py) on the tiny Gemma 3 (CPU): the image features are computed
when the batch is assembled, generate's prefill is served them instead of running the vision tower, and the
tokens are the same as without."""
from __future__ import annotations

import logging

import pytest

from test_captioning import all_keys, caption_args, full_run, read_table  # noqa: F401  (full_run: a fixture)
from test_decode_loop import token_ids
from test_static_decode import captioner, counting_backend, images, model_and_processor  # noqa: F401
from vlm_caption import store
from vlm_caption.batch_size import auto_batch_size, row_memory
from vlm_caption.tiny_model import build_config, build_tokenizer

COMPILED = {"compile": "on", "compile_options": {"backend": counting_backend}}


@pytest.fixture
def tower_calls(model_and_processor, monkeypatch):
    """Every run of the vision tower, as the name of the phase it ran in ("assemble" or "generate")."""
    model, _ = model_and_processor
    calls, phase = [], ["assemble"]
    tower = model.model.vision_tower
    real = tower.forward
    monkeypatch.setattr(tower, "forward", lambda *a, **kw: calls.append(phase[0]) or real(*a, **kw))
    return calls, phase


def ids_of(cap, images, phase, prompts=None, **kw) -> list[list[int]]:
    """token_ids, with the batch assembled first (as the pipeline's background thread does)."""
    rows = []
    real = cap._finish
    cap._finish = lambda tokens: rows.append(tokens.tolist()) or real(tokens)
    try:
        phase[0] = "assemble"
        assembled = cap.assemble([cap.prepare(im) for im in images], prompts)
        phase[0] = "generate"
        list(cap.generate([f"k{i}" for i in range(len(images))], assembled, prompts=prompts, **kw))
    finally:
        cap._finish = real
    return rows


@pytest.mark.parametrize("path", ["dynamic", "compiled", "graph"])
def test_same_tokens_and_no_vision_tower_inside_generate(path, model_and_processor, images, tower_calls):
    model, processor = model_and_processor
    calls, phase = tower_calls
    kw = {"dynamic": {}, "compiled": COMPILED, "graph": {**COMPILED, "decode_loop": "graph"}}[path]
    prompts = ["Describe.", "Describe this artwork in great detail, with its colours.", "Name it."] * 2
    reference = captioner(model, processor, **kw)
    want = [ids_of(reference, images, phase), ids_of(reference, images[:3], phase, prompts[:3])]
    assert calls.count("generate") == 2  # without: the prefill runs the tower
    calls.clear()
    cap = captioner(model, processor, vision_overlap=True, **kw)
    # 6 rows, then 3 left-padded templated prompts (padded to 4 rows on the static paths)
    assert [ids_of(cap, images, phase), ids_of(cap, images[:3], phase, prompts[:3])] == want
    assert calls == ["assemble", "assemble"] and cap.vision_ahead.misses == 0
    assert cap.vision_ahead._serving is None


def test_several_prompts_share_one_run_of_the_tower(model_and_processor, images, tower_calls):
    """A run with several prompts assembles the same images once per prompt: the tower runs once."""
    model, processor = model_and_processor
    calls, phase = tower_calls
    want = token_ids(captioner(model, processor), images[:3], prompts=["Name the painter."] * 3)
    calls.clear()
    cap = captioner(model, processor, vision_overlap=True)
    prepared = [cap.prepare(im) for im in images[:3]]
    first, second = (cap.assemble(prepared, [p] * 3) for p in ("Describe.", "Name the painter."))
    assert calls == ["assemble"] and first.ahead.features is second.ahead.features
    got = []
    real = cap._finish
    cap._finish = lambda tokens: got.append(tokens.tolist()) or real(tokens)
    list(cap.generate(["a", "b", "c"], second, prompts=["Name the painter."] * 3))
    assert got == want and cap.vision_ahead.misses == 0
    cap.assemble(list(prepared), ["Describe."] * 3)  # a new list of the same images: still the same
    cap.assemble(prepared[:2], ["Describe."] * 2)  # other images: the tower again
    assert calls == ["assemble", "assemble"]


def test_reused_features_come_with_an_event_after_this_batch_s_own_copies(model_and_processor, images, monkeypatch):
    """The next prompt's batch reuses the features but has new copies (ids, mask, pixels) queued on the side
    stream: its generate must wait for an event recorded after those, not for the first batch's."""
    import torch

    model, processor = model_and_processor
    cap = captioner(model, processor, vision_overlap=True)
    recorded = []

    class Event:  # torch.cuda.Event on a machine without one: remembers where it was recorded
        def record(self, stream):
            recorded.append(stream)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(cap.vision_ahead, "stream", "side stream")
    prepared = [cap.prepare(im) for im in images[:3]]
    a, b = (cap.vision_ahead.encode(cap.collate(prepared, [p] * 3)["pixel_values"], prepared)
            for p in ("Describe.", "Name the painter."))
    assert a.features is b.features and a.event is not b.event and recorded == ["side stream"] * 2


def test_a_list_of_images_and_the_retry_still_work(model_and_processor, images, tower_calls):
    """generate given prepared images (the retry, a batch after a halving) assembles them itself."""
    model, processor = model_and_processor
    calls, phase = tower_calls
    want = token_ids(captioner(model, processor), images[:2], retry=True)
    cap = captioner(model, processor, vision_overlap=True)
    assert token_ids(cap, images[:2], retry=True) == want and cap.vision_ahead.misses == 0


def test_other_pixels_than_the_served_ones_are_computed_inline(model_and_processor, images, tower_calls,
                                                               monkeypatch, caplog):
    """If generate ever hands the model a copy of the pixels, the features are not trusted to match: the
    tower runs inline (same tokens), counted and warned once."""
    model, processor = model_and_processor
    calls, phase = tower_calls
    want = ids_of(captioner(model, processor), images[:3], phase)
    cap = captioner(model, processor, vision_overlap=True)
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: real(**{**kw, "pixel_values": kw["pixel_values"].clone()}))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        assert ids_of(cap, images[:3], phase) == want
    assert calls == ["assemble", "generate"] and cap.vision_ahead.misses == 1
    assert "computing the image features inline" in caplog.text


def test_serving_ends_when_generate_fails(model_and_processor, images, monkeypatch):
    model, processor = model_and_processor
    cap = captioner(model, processor, vision_overlap=True)

    def out_of_memory(**kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "generate", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        cap.generate(["a", "b"], cap.assemble([cap.prepare(im) for im in images[:2]]))
    assert cap.vision_ahead._serving is None


def test_one_vision_ahead_per_model(model_and_processor):
    model, processor = model_and_processor
    first = captioner(model, processor, vision_overlap=True).vision_ahead
    assert captioner(model, processor, vision_overlap=True).vision_ahead is first
    assert captioner(model, processor).vision_ahead is None


def test_the_overlap_is_budgeted_in_the_auto_batch_size():
    """Two batches' vision and pixels are alive at once: the per-row estimate adds what it used to max."""
    config = build_config("gemma-3-4b", build_tokenizer())
    alone = row_memory(config, 536, 2, static_full_attention=True, prompt_tokens=336)
    both = row_memory(config, 536, 2, static_full_attention=True, prompt_tokens=336, vision_overlap=True)
    assert both.total == alone.total + min(alone.vision, alone.prefill) + alone.pixels
    free = 40 * 2**30
    assert auto_batch_size(config, free, 0, 536, 2, static_full_attention=True, prompt_tokens=336,
                           vision_overlap=True) <= auto_batch_size(config, free, 0, 536, 2,
                                                                   static_full_attention=True, prompt_tokens=336)


def test_cli_vision_overlap_captions_like_the_default_run(full_run, tiny_model_dir, sample_data_dir, tmp_path):
    from batched_image_inference import main

    code, default_ckpt = full_run
    ckpt = tmp_path / "overlap"
    assert main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--vision-overlap")) == code
    got = read_table(ckpt / store.MERGED).set_index("key")
    want = read_table(default_ckpt / store.MERGED).set_index("key")
    assert sorted(got.index) == sorted(want.index) and len(all_keys(ckpt)) == len(got)
    assert got.loc[want.index, "vlm_caption"].tolist() == want["vlm_caption"].tolist()


def test_the_whole_batch_runs_inside_the_decode_stream(model_and_processor, images, monkeypatch):
    """On CUDA `decoding()` switches to the high-priority stream: the cache reset, generate and the copy of
    the tokens must all happen inside it (work outside would race the stream). Recorded with a stand-in."""
    import contextlib

    model, processor = model_and_processor
    cap = captioner(model, processor, vision_overlap=True, **COMPILED)
    inside, seen = [False], []

    @contextlib.contextmanager
    def decoding():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(cap.vision_ahead, "decoding", decoding)
    real_cache_for, real_generate = cap.static_decode.cache_for, model.generate
    monkeypatch.setattr(cap.static_decode, "cache_for", lambda rows: seen.append(("cache", inside[0]))
                        or real_cache_for(rows))
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(("generate", inside[0])) or real_generate(**kw))
    assembled = cap.assemble([cap.prepare(im) for im in images[:2]])
    assert not inside[0] and assembled.ahead is not None
    list(cap.generate(["a", "b"], assembled))
    assert seen == [("cache", True), ("generate", True)] and not inside[0]


def test_out_of_memory_back_off_lets_go_of_the_kept_features(model_and_processor, images, tower_calls):
    """free_memory (the pipeline's out-of-memory back-off) drops the features kept for the next prompt: the
    same images assembled again run the tower again, and give the same tokens."""
    model, processor = model_and_processor
    calls, phase = tower_calls
    cap = captioner(model, processor, vision_overlap=True)
    want = ids_of(cap, images[:2], phase)
    assert cap.vision_ahead._last is not None
    cap.free_memory()
    assert cap.vision_ahead._last is None
    calls.clear()
    assert ids_of(cap, images[:2], phase) == want and calls == ["assemble"]
