"""The inference seam: what the pipeline needs from a captioning engine, and the one place that picks one.

The pipeline (batches, out-of-memory back-off, parts, pushes) only talks to a CaptionBackend. A new engine (vLLM,
say) is one new module with a class of this shape plus one line in make_backend and in BACKENDS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from .errors import UsageError

BACKENDS = ("transformers", "dummy")
RETRY_NO_REPEAT_NGRAM = 4  # a retried caption never repeats a 4-gram
RETRY_REPETITION_PENALTY = 1.15  # --retry-repetition-penalty's default: the second try of a flagged caption
AUTO_BATCH_CAP = 512  # --batch-size auto on CUDA: the largest batch tried (free memory decides below it)
VISION_CHUNK_ROWS = 64  # images the vision tower runs over at a time: its activations do not cap the batch
GPU_MIN_BUCKET = 64  # on a GPU fewer rows (a retry) run padded to this: a new size is a compile (static_decode.py);
#                    flagged captions gather to this many for their retry (retry_pool.py)
AUTO_BATCH_CPU = 32  # --batch-size auto on CPU and for the dummy engine: best for the small preset (BENCHMARKS.md)


@dataclass
class Caption:
    text: str
    finish: str  # "stop" (end of turn / EOS) or "length" (hit --max-tokens)
    tokens: int  # generated tokens, the stop token excluded


class CaptionBackend(Protocol):
    model_name: str  # written into every row (caption_model)
    target_size: int  # the image side the engine wants: the loader decodes JPEGs at a matching reduced scale
    default_batch_size: int  # where --batch-size auto starts (it halves on out-of-memory)
    retry_rows: int  # flagged captions gathered (across batches) for one retry call: where a call costs ~as 1 row

    def prepare(self, image) -> Any:
        """One decoded RGB PIL image -> the engine's input for it; runs in a loader thread."""

    def assemble(self, inputs: list[Any], prompts: Sequence[str] | None = None) -> Any:
        """A batch of prepared inputs made ready for generate (stacked, pinned, copied to the device), with
        each row's prompt (None: the backend's prompt for all). It runs in a background thread while the
        previous batch generates; generate also takes the plain list (and then its own `prompts`)."""

    def generate(self, keys: Sequence[str], batch: Any, should_stop: Callable[[], bool] | None = None, *,
                 retry: bool = False, prompts: Sequence[str] | None = None) -> Sequence[Caption]:
        """One caption per input, in order. should_stop() true ends generation early (the caller drops them).
        The captions may be decoded lazily, on first access, so that decoding runs off the generate thread.
        retry=True: the second try of flagged captions, with the run's retry repetition penalty and no
        repeated 4-grams (RETRY_NO_REPEAT_NGRAM)."""

    def is_out_of_memory(self, error: BaseException) -> bool:
        """Whether a generate error means "the batch was too big" (then the pipeline halves it)."""

    def free_memory(self) -> None:
        """Release what a failed batch left behind before the retry."""

    # Optional, for continuous batching (stream_loop.py; the transformers backend with --decode-loop continuous):
    # stream_chunk_rows(slots) -> rows per chunk, or None to caption in batches; caption_stream(next_chunk,
    # slots, should_stop) -> (tag, captions) per chunk as its rows finish, (tag, None) for one it hands back to
    # be captioned in batches (Captioner.caption_stream). decoding_report(rows) -> how it decoded at its last
    # batch size, for run_summary.json.


def make_backend(name: str, *, model: str, prompt: str, max_tokens: int, min_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, dtype: str = "auto",
                 device_map: str | None = None, attn_implementation: str = "sdpa",
                 max_auto_batch_size: int = 0, compile: str = "auto", decode_loop: str = "auto",
                 decode_attention: str = "auto", vision_attention: str = "auto", vision_overlap: bool = False,
                 quantize: str = "none", kv_cache_dtype: str = "auto",
                 retry_repetition_penalty: float = RETRY_REPETITION_PENALTY) -> CaptionBackend:
    """The engine `name` with the run's settings; the model loads here (seconds to minutes)."""
    if name == "dummy":  # no model, no context: only config.MAX_TOKENS_LIMIT bounds max_tokens
        from .dummy_backend import DummyBackend

        return DummyBackend(model_name=model, prompt=prompt, max_tokens=max_tokens, min_tokens=min_tokens,
                            default_batch_size=max_auto_batch_size or AUTO_BATCH_CPU)
    if name == "transformers":
        from .captioner import Captioner
        from .model_loading import check_context, choose_device, load_model, resolve_dtype

        device = choose_device()
        if quantize != "none":  # a card without FP8 is one line before minutes of loading, not a kernel error after
            from .fp8 import fp8_problem

            problem = fp8_problem(device, resolve_dtype(dtype, device))
            if problem:
                raise UsageError(problem)
        if kv_cache_dtype == "fp8":
            from .kv_fp8 import kv_fp8_problem

            problem = kv_fp8_problem()
            if problem:
                raise UsageError(problem)
        loaded, processor = load_model(model, device, dtype=dtype, device_map=device_map,
                                       attn_implementation=attn_implementation)
        if quantize != "none":  # before the Captioner compiles anything and sizes batches from free memory
            from .fp8 import QUANTIZED_PARTS, quantize_fp8

            quantize_fp8(loaded, QUANTIZED_PARTS[quantize])
        captioner = Captioner(loaded, processor, model_name=model, prompt=prompt, max_tokens=max_tokens,
                              min_tokens=min_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              auto_batch_cap=max_auto_batch_size or AUTO_BATCH_CAP, compile=compile,
                              decode_loop=decode_loop, grouped_attention=decode_attention,
                              vision_attention=vision_attention, vision_overlap=vision_overlap,
                              kv_cache_dtype=kv_cache_dtype, retry_repetition_penalty=retry_repetition_penalty)
        # Checked once the prompt is tokenised; nothing sized by max_tokens is allocated before the first batch.
        check_context(loaded.config, captioner.prompt_inputs["input_ids"].shape[-1], max_tokens, model)
        return captioner
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
