"""--decode-loop continuous (vlm_caption/continuous.py) on the tiny Gemma 3 (CPU): rows join the decoding batch
as others stop. Every row's greedy tokens must be generate's, whatever rows it shared the batch with."""
from __future__ import annotations

import json

import pytest
import torch

from test_captioning import all_keys, caption_args, failed_keys, full_run, read_table  # noqa: F401  (full_run: a fixture)
from test_decode_loop import token_ids, use_stop_ids
from test_static_decode import CAPTURED, captioner, counting_backend, images, model_and_processor  # noqa: F401
from vlm_caption import store
from vlm_caption.captioner import Captioner


def continuous_captioner(model, processor, **kw) -> Captioner:
    cap = captioner(model, processor, compile="on", compile_options={"backend": counting_backend},
                    decode_loop="continuous", **kw)
    assert cap.continuous is not None
    return cap


def streamed_ids(cap: Captioner, images, slots: int, prompts=None) -> tuple[dict[int, list[int]], list]:
    """Row -> generated ids (pads after a stop dropped), and the chunk tags in the order they finished."""
    chunk = cap.stream_chunk_rows(slots)
    pixels = [cap.prepare(im) for im in images]
    todo = list(range(0, len(images), chunk))

    def next_chunk(wait: bool):
        if not todo:
            return None
        start = todo.pop(0)
        rows = pixels[start:start + chunk]
        return start, cap.assemble(rows, None if prompts is None else prompts[start:start + chunk])

    got, order = {}, []
    for start, caps in cap.caption_stream(next_chunk, slots):
        order.append(start)
        for i, row in enumerate(caps._tokens.tolist()):
            got[start + i] = row
    return got, order


def without_pads(rows: list[list[int]], cap: Captioner) -> list[list[int]]:
    """generate's rows, cut after the first stop id (the stream hands back a row's own tokens only)."""
    out = []
    for row in rows:
        stop = next((i for i, t in enumerate(row) if t in cap.stop_ids), None)
        out.append(row if stop is None else row[:stop + 1])
    return out


def stop_ids_that_end_rows_early(model, processor, images) -> list[int]:
    free = token_ids(captioner(model, processor, max_tokens=16, min_tokens=0), images)
    return sorted({row[3] for row in free[:2]} | {row[9] for row in free[2:4]})


def test_rows_that_join_mid_decode_get_generates_tokens(model_and_processor, images):
    """Slots of 8 in chunks of 1: rows stop at different steps, the next image takes each freed slot, and every
    row's tokens are the ones generate gives it alone in its batch."""
    model, processor = model_and_processor
    stop = stop_ids_that_end_rows_early(model, processor, images)
    for min_tokens in (0, 5):
        reference = captioner(model, processor, max_tokens=16, min_tokens=min_tokens)
        use_stop_ids(reference, stop)
        want = without_pads(token_ids(reference, images), reference)
        lengths = {len(row) for row in want}
        assert len(lengths) > 1, "every row has one length: nothing would join mid-decode"
        cap = continuous_captioner(model, processor, max_tokens=16, min_tokens=min_tokens)
        use_stop_ids(cap, stop)
        cap.continuous.clear()
        got, order = streamed_ids(cap, images, slots=2)
        assert [got[i] for i in range(len(images))] == want


def test_one_compiled_graph_and_left_padded_templated_prompts(model_and_processor, images):
    """Chunks of different prompt lengths (left-padded each) share one ring; one graph for all the steps."""
    from torch._dynamo.utils import counters

    model, processor = model_and_processor
    prompts = ["Describe.", "Describe this artwork.", "Name it.", "What is it?", "Describe this artwork.",
               "Colours?"]  # none longer than the run's prompt, which sizes the ring
    reference = captioner(model, processor)
    want = token_ids(reference, images[:3], prompts=prompts[:3]) + token_ids(reference, images[3:], prompts=prompts[3:])
    cap = continuous_captioner(model, processor)
    counters.clear()
    CAPTURED.clear()
    got, _ = streamed_ids(cap, images, slots=4, prompts=prompts)
    assert [got[i] for i in range(6)] == want
    assert len(CAPTURED) == 1 and sum(counters["graph_break"].values()) == 0
    got, _ = streamed_ids(cap, images, slots=4, prompts=prompts)  # the ring reused, rows at new offsets
    assert [got[i] for i in range(6)] == want and len(CAPTURED) == 1


def test_decode_steps_follow_the_mean_length_not_the_longest(model_and_processor, images):
    """Per-row limits (as the benchmark's caption lengths): 12 rows, 4 slots; a batch loop pays each batch's
    longest row, the continuous one about the mean."""
    from vlm_caption import continuous

    model, processor = model_and_processor
    cap = continuous_captioner(model, processor, max_tokens=24, min_tokens=24)
    lengths = [24, 3, 3, 3] * 3
    pixels = [cap.prepare(images[i % 6]) for i in range(12)]
    todo = list(range(12))

    def next_chunk(wait):
        if not todo:
            return None
        i = todo.pop(0)
        return continuous.prefill(cap, i, cap.assemble(pixels[i:i + 1]), torch.tensor([lengths[i]]))

    decoder = continuous.decoder_for(cap, 4)
    got = {tag: ids.shape[1] for tag, ids in decoder.run(next_chunk, chunk_rows=1)}
    assert got == dict(enumerate(lengths))
    # Batches of 4 would run 3 x 23 steps; here the long rows overlap the short ones.
    assert decoder.steps < 3 * 23 and decoder.steps >= 23
    # Run from outside inference mode (as the benchmark runs it), the step kept autograd graphs: the ring's
    # buffers required grad and chained every step's graph to the next (memory growing on a card).
    assert not any(layer.keys.requires_grad for layer in decoder.cache.layers)


def test_cli_continuous_captions_like_the_default_run(full_run, tiny_model_dir, sample_data_dir, tmp_path):
    """batched_image_inference.py --compile on --decode-loop continuous (inductor on the CPU) with the flex
    decode attention (auto's pick for a card's 128+ slots): the same captions as the default run of the same
    data (the failed images recorded the same), every key once."""
    from batched_image_inference import main

    code, default_ckpt = full_run
    ckpt = tmp_path / "continuous"
    assert main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--compile", "on", "--decode-loop",
                             "continuous", "--decode-attention", "flex", "--batch-size", "4")) == code
    got = read_table(ckpt / store.MERGED).set_index("key")
    want = read_table(default_ckpt / store.MERGED).set_index("key")
    assert sorted(got.index) == sorted(want.index) and len(all_keys(ckpt)) == len(got)
    assert got.loc[want.index, "vlm_caption"].tolist() == want["vlm_caption"].tolist()
    assert got.loc[want.index, "caption_tokens"].tolist() == want["caption_tokens"].tolist()
    assert sorted(failed_keys(ckpt)) == sorted(failed_keys(default_ckpt))
    decoding = json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["decoding"]
    steps = decoding["continuous"]["4"]["decode_steps"]  # 6 tokens a caption: at most 5 steps an image
    assert decoding["loop"] == "continuous" and decoding["static_cache"] and 0 < steps <= 5 * len(got)
    assert decoding["attention"] == "flex"
    assert decoding["vision_tower"] == decoding["language_model_prefill"] == "compiled"  # the chunks' prefills
    assert decoding["decode_step"] == "compiled"  # (the batches' step, had the stream handed any back)
    default = json.loads((default_ckpt / store.SUMMARY).read_text())["this_run"]["decoding"]
    retried = int((want["caption_attempts"] == 2).sum())  # a CPU's retries: one call after each batch needing it
    assert (default.pop("retry_gathered_rows"), default.pop("retried_captions")) == (1, retried)
    assert 0 < default.pop("retry_calls") <= min(retried, -(-len(want) // 4))
    assert default == {"batch_size": 4, "loop": "generate", "static_cache": False, "attention": "auto: sdpa",
                       "decode_step": "eager", "vision_tower": "eager", "language_model_prefill": "eager",
                       "vision_attention": "sdpa (torch's pick)", "vision_chunk_rows": 64, "fp8_layers": 0,
                       "kv_cache_dtype": "float32"}


def continuous_args(model, data, ckpt, *extra):
    return caption_args(model, data, ckpt, "--compile", "on", "--decode-loop", "continuous", "--max-images", "12",
                        *extra)


def test_a_failing_stream_hands_its_unfinished_chunks_to_batches(full_run, tiny_model_dir, sample_data_dir,
                                                                 tmp_path, monkeypatch, caplog):
    """Out of memory when the third chunk joins: the chunks in flight and the rest are captioned in batches
    (the same captions), nothing lost, nothing twice."""
    from batched_image_inference import main
    from vlm_caption.continuous import ContinuousDecode

    joins, real_join = [], ContinuousDecode._join

    def join_then_fail(self, chunk, slots):
        joins.append(chunk.rows)
        if len(joins) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_join(self, chunk, slots)

    monkeypatch.setattr(ContinuousDecode, "_join", join_then_fail)
    ckpt = tmp_path / "fell_back"
    assert main(continuous_args(tiny_model_dir, sample_data_dir, ckpt)) == 0
    assert len(joins) == 3 and "the rest is captioned in batches" in caplog.text
    decoding = json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["decoding"]
    assert decoding["continuous"]["4"]["fell_back_to_batches"].startswith("OutOfMemoryError: CUDA out of memory")
    assert decoding["continuous"]["4"]["decode_steps"] == 0  # it failed filling the slots, before a step
    got = read_table(ckpt / store.MERGED).set_index("key")
    want = read_table(full_run[1] / store.MERGED).set_index("key")
    assert len(got) == len(all_keys(ckpt)) == 12 - len(failed_keys(ckpt))
    assert got["vlm_caption"].tolist() == want.loc[got.index, "vlm_caption"].tolist()


def test_a_stop_mid_stream_keeps_finished_chunks_and_the_resume_does_the_rest(full_run, tiny_model_dir,
                                                                              sample_data_dir, tmp_path, monkeypatch):
    """A signal while the first chunk's rows are recorded: the finished chunks are written, the ones decoding
    are dropped; the resume captions exactly the rest."""
    import os
    import signal

    from batched_image_inference import main
    from vlm_caption import rows as rowcols
    from vlm_caption.interrupts import Interrupted

    made, row_values = [], rowcols.row_values

    def signal_at_the_first_row(*args, **kwargs):
        if not made:
            os.kill(os.getpid(), signal.SIGINT)
        made.append(1)
        return row_values(*args, **kwargs)

    monkeypatch.setattr(rowcols, "row_values", signal_at_the_first_row)
    ckpt = tmp_path / "stopped"
    with pytest.raises(Interrupted):
        main(continuous_args(tiny_model_dir, sample_data_dir, ckpt, "--checkpoint-every", "100"))
    first = all_keys(ckpt)
    assert first and len(first) == len(made) < 12
    monkeypatch.setattr(rowcols, "row_values", row_values)
    assert main(continuous_args(tiny_model_dir, sample_data_dir, ckpt)) == 0
    keys = all_keys(ckpt)
    assert len(keys) == len(set(keys)) == 12 - len(failed_keys(ckpt)) and set(first) <= set(keys)
    want = read_table(full_run[1] / store.MERGED).set_index("key")
    got = read_table(ckpt / store.MERGED).set_index("key")
    assert got["vlm_caption"].tolist() == want.loc[got.index, "vlm_caption"].tolist()


def test_a_failed_stream_lets_go_of_its_ring_cache(model_and_processor, images, monkeypatch):
    """The batches that take over after an out-of-memory error need the memory the ring held."""
    from vlm_caption.continuous import ContinuousDecode

    def out_of_memory(self, chunk, slots):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cap = continuous_captioner(*model_and_processor)
    monkeypatch.setattr(ContinuousDecode, "_join", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        streamed_ids(cap, images, slots=2)
    assert cap.continuous == {}


def test_an_interrupt_in_the_stream_waits_for_the_read_in_flight():
    """A second Ctrl-C raises inside the stream while the assembler thread is reading the loader: the stream ends
    that read before it raises, because the caller closes the loader next (a generator closed while another
    thread runs it raises "generator already executing": a traceback, and the finished captions went unwritten)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from vlm_caption import loader, stream_loop
    from vlm_caption.interrupts import Interrupted
    from vlm_caption.prompt_plan import PromptSpec

    more_images = threading.Event()

    def slow_loader():
        yield loader.Loaded({"key": "0"}, inputs=0)
        more_images.wait()  # the next image is still being decoded
        yield loader.Loaded({"key": "1"}, inputs=1)

    class Backend:
        def assemble(self, inputs, prompts):
            return inputs

        def caption_stream(self, next_chunk, slots, should_stop):
            next_chunk(True)  # the first chunk joins; the next read starts and waits for the loader
            threading.Timer(0.5, more_images.set).start()
            raise Interrupted()
            yield

    items = slow_loader()
    with ThreadPoolExecutor(max_workers=1) as assembler:
        with pytest.raises(Interrupted):
            stream_loop.stream(Backend(), [PromptSpec.make(None, "Describe.")], items, 2, 1, assembler=assembler,
                               should_stop=lambda: False, on_failure=print, on_chunk=print,
                               on_handed_back=print)
        assert not items.gi_running
        items.close()


def test_a_templated_prompt_too_long_for_the_ring_goes_to_batches_alone(tiny_model_dir, sample_data_dir, tmp_path,
                                                                        caplog, monkeypatch):
    """The ring is sized by the longest rendering in bytes, a proxy for tokens; a prompt of more tokens than that
    (here: the ring sized by the shortest rendering, as it was by characters for CJK values) does not fit it.
    That chunk is captioned in batches (the dynamic cache, as the default run does); the stream goes on with the
    others instead of handing the whole rest of the run to batches."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from batched_image_inference import main

    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    meta = pq.read_table(data / "full_metadata.parquet")
    tags = ["art"] * meta.num_rows
    tags[1], tags[9] = "x" * 60, "日本語の絵画" * 5  # 60 characters, 61 tokens; 30 characters, 91 tokens
    meta = meta.set_column(meta.column_names.index("tags"), "tags", pa.array(tags, pa.string()))
    pq.write_table(meta, data / "full_metadata.parquet")
    from vlm_caption import prompt_plan

    monkeypatch.setattr(prompt_plan, "longest_prompt", lambda specs, rows: "Describe art.")
    caplog.set_level("INFO", logger="vlm_caption")
    runs = {}
    for loop in ("generate", "continuous"):
        runs[loop] = tmp_path / loop
        assert main(caption_args(tiny_model_dir, data, runs[loop], "--compile", "on", "--decode-loop", loop,
                                 "--prompt", "Describe {tags}.", "--max-images", "16")) == 0
    said = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("vlm_caption"))
    assert "continuous decoding failed" not in said and "longer than the static cache holds" in said
    want = read_table(runs["generate"] / store.MERGED).set_index("key")
    got = read_table(runs["continuous"] / store.MERGED).set_index("key")
    assert sorted(got.index) == sorted(want.index) and len(all_keys(runs["continuous"])) == len(got)
    assert got.loc[want.index, "vlm_caption"].tolist() == want["vlm_caption"].tolist()


@pytest.mark.parametrize("broken", ["metadata", "writer"])
def test_errors_of_the_loader_and_the_writer_are_raised_not_taken_for_a_failed_stream(
        broken, tiny_model_dir, sample_data_dir, tmp_path, monkeypatch, caplog):
    """A corrupt metadata shard (raised by the loader on the assembler thread) or a part the writer could not
    write is raised, as the default run raises it. Taken for a failed stream, the run went on in batches and
    exited 0 without the rows they cost (a failed shard: every row the loader had not yielded yet), neither
    captioned nor failed."""
    from batched_image_inference import main
    from vlm_caption import dataset

    real_rows, real_write, writes = dataset.WorkPlan.rows, store.CheckpointStore.write_part, []

    def rows_then_corrupt(self, *args, **kwargs):
        for i, row in enumerate(real_rows(self, *args, **kwargs)):
            if i == 6:
                raise ValueError("corrupt shard")
            yield row

    def second_part_fails(self, rows):
        writes.append(rows)
        if len(writes) == 2:
            raise ValueError("corrupt part")
        return real_write(self, rows)

    if broken == "metadata":
        monkeypatch.setattr(dataset.WorkPlan, "rows", rows_then_corrupt)
    else:
        monkeypatch.setattr(store.CheckpointStore, "write_part", second_part_fails)
    with pytest.raises(ValueError, match="corrupt"):
        main(continuous_args(tiny_model_dir, sample_data_dir, tmp_path / "c", "--checkpoint-every", "2"))
    assert "continuous decoding failed" not in caplog.text


def test_a_stream_failing_during_a_stop_still_stops_as_asked(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch):
    """SIGTERM, then out of memory in a prefill before the stream sees the stop: the run stops as asked (exit
    143, what was made written), not with the out-of-memory traceback; the resume captions exactly the rest."""
    import os
    import signal

    from batched_image_inference import main
    from vlm_caption import continuous
    from vlm_caption.interrupts import Interrupted

    prefills, real_prefill = [], continuous.prefill

    def stop_then_out_of_memory(*args, **kwargs):
        prefills.append(1)
        if len(prefills) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(continuous, "prefill", stop_then_out_of_memory)
    ckpt = tmp_path / "stopped"
    with pytest.raises(Interrupted) as stopped:
        main(continuous_args(tiny_model_dir, sample_data_dir, ckpt))
    assert stopped.value.signum == signal.SIGTERM
    monkeypatch.setattr(continuous, "prefill", real_prefill)
    assert main(continuous_args(tiny_model_dir, sample_data_dir, ckpt)) == 0
    keys = all_keys(ckpt)
    assert len(keys) == len(set(keys)) == 12 - len(failed_keys(ckpt))
