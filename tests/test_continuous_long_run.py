"""--decode-loop continuous over a long run (hours, 400K images, one process): nothing may grow per chunk."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from test_continuous import continuous_captioner
from test_static_decode import images, model_and_processor  # noqa: F401  (fixtures)
from vlm_caption import loader, stream_loop
from vlm_caption.prompt_plan import PromptSpec


class SequentialBackend:
    """Decodes one chunk at a time; the assembly of image 2 fails (a broken image, a template that raises)."""

    def assemble(self, inputs, prompts):
        if 2 in inputs:
            raise ValueError("cannot stack these pixel values")
        return inputs

    def caption_stream(self, next_chunk, slots, should_stop):
        while (got := next_chunk(True)) is not None:
            yield got[0], [f"caption of {got[1]}"]


def test_a_chunk_whose_assembly_failed_goes_to_batches_at_once():
    """Kept to the end of the stream, every chunk that failed to assemble held its images for the rest of the run
    (hours: the memory grew with each); batches take it as soon as it is read, as a handed-back chunk."""
    events = []
    items = (loader.Loaded({"key": str(i)}, inputs=i) for i in range(6))
    with ThreadPoolExecutor(max_workers=1) as assembler:
        left = stream_loop.stream(
            SequentialBackend(), [PromptSpec.make(None, "Describe.")], items, 2, 1, assembler=assembler,
            should_stop=lambda: False, on_failure=print,
            on_chunk=lambda chunk, caps: events.append(("stream", chunk[0].row["key"])),
            on_handed_back=lambda chunk: events.append(("batches", chunk[0].row["key"])))
    assert left == []
    assert events.index(("batches", "2")) < events.index(("stream", "5"))
    assert sorted(key for _, key in events) == [str(i) for i in range(6)]


def test_a_chunk_too_long_for_the_ring_is_handed_back_before_the_next_is_read(model_and_processor, images,
                                                                              monkeypatch):
    """Handed-back chunks waited for the next chunk to finish decoding; with no row decoding (every prompt too
    long for the ring, say) the stream read the whole rest of the input, every image held, before the first."""
    cap = continuous_captioner(*model_and_processor)
    monkeypatch.setattr(cap.static_decode, "fits", lambda prompt_tokens, new_tokens: False)
    pixels = [cap.prepare(im) for im in images]
    read: list[int] = []

    def next_chunk(wait: bool):
        if len(read) == len(pixels):
            return None
        read.append(len(read))
        return read[-1], cap.assemble(pixels[read[-1]:read[-1] + 1])

    handed_back = [(tag, len(read)) for tag, captions in cap.caption_stream(next_chunk, 2) if captions is None]
    assert handed_back == [(i, i + 1) for i in range(len(pixels))]


def test_a_stop_ends_the_stream_as_a_stop_though_a_read_ahead_met_a_loader_error():
    """SIGTERM while the chunk read ahead meets a corrupt metadata shard: the stream ends as the stop does (the
    run exits 128+signal with its captions written, the resume meets the shard again), as the batch path, which
    breaks before it reads on. It raised the loader's error: a traceback, the rows still buffered not written."""
    import threading

    reading, corrupt, stop = threading.Event(), threading.Event(), threading.Event()

    def loader_with_a_corrupt_shard():
        yield loader.Loaded({"key": "0"}, inputs=0)
        reading.set()  # the read ahead is under way
        corrupt.wait()
        raise ValueError("corrupt shard")

    class StoppedBackend:
        def assemble(self, inputs, prompts):
            return inputs

        def caption_stream(self, next_chunk, slots, should_stop):
            next_chunk(True)  # the first chunk joins; the next read starts
            reading.wait()
            stop.set()  # SIGTERM: the stream ends at the next step
            corrupt.set()
            return
            yield

    with ThreadPoolExecutor(max_workers=1) as assembler:
        left = stream_loop.stream(StoppedBackend(), [PromptSpec.make(None, "Describe.")], loader_with_a_corrupt_shard(),
                                  2, 1, assembler=assembler, should_stop=stop.is_set, on_failure=print,
                                  on_chunk=print, on_handed_back=print)
    assert left == []


def test_time_waiting_for_the_loader_is_said_apart_from_generate_time():
    """The whole stream was counted as generate time, waits for a slow loader included: run_summary's
    generate_share read ~1 for a run held back by its loader (the batch path counts generate calls only)."""
    import threading

    release = threading.Event()

    def slow_loader():
        for i in range(3):
            if i == 2:
                release.wait()  # the third image comes late: the stream, with nothing decoding, waits for it
            yield loader.Loaded({"key": str(i)}, inputs=i)

    class Backend(SequentialBackend):
        def assemble(self, inputs, prompts):
            return inputs

    waits = []
    threading.Timer(0.3, release.set).start()
    with ThreadPoolExecutor(max_workers=1) as assembler:
        stream_loop.stream(Backend(), [PromptSpec.make(None, "Describe.")], slow_loader(), 1, 1, assembler=assembler,
                           should_stop=lambda: False, on_failure=print, on_chunk=lambda chunk, caps: None,
                           on_handed_back=print, on_wait=waits.append)
    assert len(waits) >= 3 and max(waits) >= 0.2  # (a lower bound on a wait, not a timing of the code)
