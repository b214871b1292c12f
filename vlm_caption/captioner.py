"""Gemma 3 captioning, the transformers backend: prompts, batches and their decoding (model_loading.py loads).

Each distinct prompt text is tokenised once; a batch is its rows' cached token ids, left-padded, plus the pixel
values the loader threads computed. It decodes through `generate`, the graph loop (decode_loop.py) or continuous
batching (continuous.py), on a static cache where one fits (static_decode.py).
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .backends import (AUTO_BATCH_CAP, AUTO_BATCH_CPU, GPU_MIN_BUCKET, RETRY_NO_REPEAT_NGRAM,
                       RETRY_REPETITION_PENALTY, VISION_CHUNK_ROWS, Caption)  # noqa: F401  (the engine's result type)
from .batch_size import auto_batch_size, free_accelerator_memory, free_device_memory, is_out_of_memory
from .decode_loop import DecodeLater, choose_decode_loop, give_up_decode_compile
from .grouped_attention import (decode_attention_kernel, describe_decode_attention, give_up_flex, may_use_flex,
                                set_grouped_decode_attention)
from .image_prep import ImagePrep, unsupported_reason
from .kv_fp8 import use_kv_fp8, warn_where_fp8_costs
from .images import MODEL_IMAGE_SIZE
from .prefill_compile import PARTS as PREFILL_PARTS, failed_part, give_up_prefill_compile, set_prefill_compile
from .quality import CHAT_MARKUP_RE
from .sampling import SeededSampler
from .vision_ahead import Ahead, VisionAhead
from .vision_attention import set_vision_attention
from .vision_chunks import set_vision_chunk_rows

log = logging.getLogger(__name__)

_PROMPT_CACHE_SIZE = 4096  # distinct prompt texts whose token ids are kept


# ---------------------------------------------------------------- the captioner

class Captioner:
    """The transformers backend (backends.CaptionBackend): Gemma 3 through `generate`."""

    def __init__(self, model, processor, *, model_name: str, prompt: str, max_tokens: int, min_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, auto_batch_cap: int = AUTO_BATCH_CAP,
                 compile: str = "off", compile_options: dict[str, Any] | None = None,
                 retry_repetition_penalty: float = RETRY_REPETITION_PENALTY, resize_on_device: bool | None = None,
                 decode_loop: str = "auto", grouped_attention: bool | str = "auto", vision_attention: str = "auto",
                 vision_overlap: bool = False, vision_chunk_rows: int = VISION_CHUNK_ROWS,
                 kv_cache_dtype: str = "auto"):
        self.model, self.processor, self.model_name, self.prompt = model, processor, model_name, prompt
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # Decode steps read each KV head once, not a copy per query head (grouped_attention.py: auto, sdpa, flex).
        self.grouped_attention = set_grouped_decode_attention(model, grouped_attention)
        from .config import KV_CACHE_DTYPES

        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        # Keys and values cached in float8 (kv_fp8.py): the grouped kernels read or convert them.
        self.kv_fp8 = use_kv_fp8(model, kv_cache_dtype == "fp8", self.grouped_attention)
        set_vision_attention(model, vision_attention)  # the tower's kernel: auto = the fastest on a GPU (timed)
        # The tower over a chunk of images at a time: its activations do not cap the batch (vision_chunks.py).
        self.vision_chunk_rows = set_vision_chunk_rows(model, vision_chunk_rows)
        # None: on a GPU the loader threads only decode, the card resizes (image_prep.ImagePrep.to_device).
        self.resize_on_device = self.device.type == "cuda" if resize_on_device is None else resize_on_device
        tok = processor.tokenizer
        tok.padding_side = "left"  # generation continues from the right edge of every row
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.stop_ids = self._stop_ids()
        self.target_size = self._image_size()
        self._encoded: dict[str, dict[str, torch.Tensor]] = {}  # prompt text -> its token ids (a cache)
        # Assembler (encode, pad), writer (decode) and a retry (encode) share the tokenizer: a fast tokenizer
        # changed by one thread mid-call of another raises "Already borrowed" (a healthy batch failed).
        self._tokenizer_lock = threading.RLock()
        self.prompt_inputs = self._encode_prompt(prompt)
        self.gen_config = self._generation_config(max_tokens, min_tokens)
        self.static_decode = self._static_decode(compile, max_tokens, compile_options or {})
        compiled = self.static_decode is not None  # (a static cache is a compiled one)
        if compiled:
            self.static_decode.kv_fp8 = self.kv_fp8
        if self.kv_fp8:
            warn_where_fp8_costs(compiled, self.device.type, decode_attention_kernel(model))
        log.info("decode attention: %s", describe_decode_attention(model, self.device.type, compiled))
        # The loop after the prefill: generate's, the graph loop or continuous batching (decode_loop.py).
        self.graph_decode, self.continuous, self.graph_decode_options = choose_decode_loop(
            self, decode_loop, compile_options or {})
        self.continuous_failed: dict[int, dict[str, Any]] = {}  # slot count -> its steps and error, once it failed
        # The pipeline's short batches (the last one) padded to the run's batch size, and the others (retries)
        # to at least GPU_MIN_BUCKET rows: on a GPU another compiled decode step costs more than decoding pad
        # rows (static_decode.py). Continuous batching's chunks: no decode step per chunk size.
        self.fill_short_batches = self.device.type == "cuda" and self.static_decode is not None and \
            self.static_decode.compile_config is not None and self.continuous is None
        self.min_bucket = GPU_MIN_BUCKET if self.fill_short_batches else 1
        # A GPU's generate call costs about the same at 1 row as at 64: flagged rows gather for it (retry_pool.py).
        self.retry_rows = GPU_MIN_BUCKET if self.device.type == "cuda" else 1
        self.retry_config = self._retry_config(retry_repetition_penalty)
        # The next batch's vision tower runs while this one decodes (vision_ahead.py).
        self.vision_ahead = VisionAhead.of(model, self.device) if vision_overlap else None
        if self.vision_ahead is not None and self.continuous is not None:  # chunks prefill as they join
            log.info("--vision-overlap is off with --decode-loop continuous")
            self.vision_ahead = None
        self.default_batch_size = self._auto_batch_size(max_tokens, auto_batch_cap)

    def _static_decode(self, compile: str, max_tokens: int, options: dict[str, Any]):
        """compile "auto" (on for CUDA), "on" or "off": a static full-attention KV cache with the decode
        step compiled by generate (static_decode.py), or None for the default dynamic cache; on, the prefill
        (vision tower, language model over the prompt) is compiled too."""
        from .static_decode import compile_wanted, prepare_static_decode

        wanted = compile_wanted(compile, self.device)
        options = {"force_compile": self.device.type != "cuda", **options}
        # The prefill too (prefill_compile.py); options["vision"] / ["language"] False: that part eager, for an A/B.
        parts = {part for part in PREFILL_PARTS if options.pop(part, options.get("compile", True))}
        set_prefill_compile(self.model, parts if wanted else (), options)
        if not wanted:
            return None
        static, reason = prepare_static_decode(self.model, self.prompt_inputs["input_ids"].shape[-1] + max_tokens,
                                               **options)
        log.info("decode: %s", reason)
        if static is not None:
            static.configure(self.gen_config)
        return static

    def _auto_batch_size(self, max_tokens: int, cap: int) -> int:
        """Where --batch-size auto starts: on a GPU what free memory allows (KV cache per row from the config
        at this run's length, batch_size.py); on CPU AUTO_BATCH_CPU, measured best for the small preset."""
        if self.device.type != "cuda":
            return min(AUTO_BATCH_CPU, cap)
        free, static = free_device_memory(self.device), self.static_decode is not None
        size = auto_batch_size(self.model.config, free, 0, self.prompt_inputs["input_ids"].shape[-1] + max_tokens,
                               self.dtype.itemsize, cap=cap, static_full_attention=static,
                               kv_bytes=1 if static and self.kv_fp8 else None,
                               sampling=self.temperature > 0, vision_overlap=self.vision_ahead is not None,
                               vision_rows=self.vision_chunk_rows,
                               retry_rows=self.retry_rows if static and self.retry_config.repetition_penalty else 0)
        log.info("auto batch size %d: what %.1f GiB of free GPU memory holds at %d new tokens", size, free / 2**30,
                 max_tokens)
        return size

    def is_out_of_memory(self, error: BaseException) -> bool:
        return is_out_of_memory(error)

    def free_memory(self) -> None:
        if self.vision_ahead is not None:  # the last batch's features, kept for its next prompt: not needed now
            self.vision_ahead.forget()
        free_accelerator_memory()

    def _stop_ids(self) -> list[int]:
        tok = self.processor.tokenizer
        ids = {tok.eos_token_id}
        end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn != tok.unk_token_id:
            ids.add(end_of_turn)
        gen_eos = self.model.generation_config.eos_token_id
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    def _image_size(self) -> int:
        size = getattr(self.processor.image_processor, "size", None) or {}
        return int(size.get("height") or size.get("shortest_edge") or MODEL_IMAGE_SIZE)

    def _encode_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        """The token ids of one image + `prompt` chat turn (cached per distinct text)."""
        with self._tokenizer_lock:
            cached = self._encoded.get(prompt)
            if cached is not None:
                return cached
            if len(self._encoded) >= _PROMPT_CACHE_SIZE:  # templates: one text per row; keep memory bounded
                self._encoded.clear()
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            from PIL import Image

            # The chat template already writes <bos>; without add_special_tokens=False there would be two.
            enc = self.processor(text=[text], images=[[Image.new("RGB", (self.target_size, self.target_size))]],
                                 add_special_tokens=False, return_tensors="pt")
            encoded = self._encoded[prompt] = {k: v for k, v in enc.items() if k != "pixel_values"}
            return encoded

    def _generation_config(self, max_tokens: int, min_tokens: int):
        from transformers import GenerationConfig

        # Our own config instead of the model's (google's sets do_sample=True, top_k=64): greedy unless asked.
        return GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=min_tokens or None, do_sample=False,
                                eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                bos_token_id=self.processor.tokenizer.bos_token_id)

    def _retry_config(self, penalty: float):
        """The run's config (static decode settings included) for the second try of a flagged caption."""
        import copy

        config = copy.deepcopy(self.gen_config)
        config.repetition_penalty = penalty
        config.no_repeat_ngram_size = RETRY_NO_REPEAT_NGRAM
        return config

    # -- per image, in a loader thread

    @functools.cached_property
    def _image_prep(self) -> ImagePrep | None:
        """The fast path for this processor's settings, or None: then the processor itself runs."""
        reason = unsupported_reason(self.processor.image_processor)
        if reason is not None:
            log.info("images are preprocessed by the model's image processor (%s)", reason)
            return None
        return ImagePrep.from_processor(self.processor.image_processor, self.dtype)

    def prepare(self, image) -> torch.Tensor:
        """Pixel values for one RGB image, in the model's dtype (runs off the generate path).

        The same resize / rescale / normalise as the image processor, in torch's SIMD kernels (under 1/2
        of the CPU, equal to within ~1/255: see image_prep); the processor for settings it does not cover.
        With `resize_on_device`, the decoded image's RGBX bytes instead: `collate` resizes them on the device.
        """
        prep = self._image_prep
        if prep is not None and self.resize_on_device:
            return prep.host_pixels(image)
        if prep is not None:
            return prep(image)
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return pixels.to(self.dtype)

    # -- per batch, on the generate path

    def collate(self, pixel_values: list[torch.Tensor],
                prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Token ids of each row's prompt (None: the run's prompt for every row), left-padded with an attention
        mask, and the stacked pixel values, on the device."""
        encoded = [self._encode_prompt(p) for p in prompts] if prompts is not None else \
            [self.prompt_inputs] * len(pixel_values)
        features = {k: [e[k][0].tolist() for e in encoded] for k in encoded[0] if k != "attention_mask"}
        with self._tokenizer_lock:
            batch = self.processor.tokenizer.pad(features, padding=True, padding_side="left", return_tensors="pt")
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.resize_on_device and self._image_prep is not None:
            batch["pixel_values"] = torch.stack([self._image_prep.to_device(p, self.device) for p in pixel_values])
            return batch
        pixels = torch.stack(pixel_values)
        if self.device.type == "cuda":
            pixels = pixels.pin_memory()
        batch["pixel_values"] = pixels.to(self.device, non_blocking=True)
        return batch

    def assemble(self, pixel_values: list[torch.Tensor], prompts: Sequence[str] | None = None) -> "_Assembled":
        """Pad (static decode: to a batch shape that already has a graph and a cache; on a GPU with the decode
        step compiled, the run's batch size: its last batch compiles nothing), stack, pin and copy; the
        pipeline runs it for the next batch while this one generates. `prompts`: one per row (templates)."""
        return self._assemble(pixel_values, prompts, fill=self.fill_short_batches)

    @torch.inference_mode()  # inference tensors whichever thread assembles: compiled code guards on the kind
    def _assemble(self, pixel_values: list[torch.Tensor], prompts: Sequence[str] | None = None, *,
                  fill: bool = False) -> "_Assembled":
        """`assemble`; fill: pad to the run's batch size, not to a power of two (StaticDecode.bucket)."""
        n = len(pixel_values)
        rows = self.static_decode.bucket(n, fill, self.min_bucket) if self.static_decode is not None else n
        if prompts is not None:
            prompts = list(prompts) + [prompts[-1]] * (rows - n)
        padded = list(pixel_values) + [pixel_values[-1]] * (rows - n)
        if self.vision_ahead is None:
            return _Assembled(n, self.collate(padded, prompts))
        with self.vision_ahead.side_stream():  # copies, resize and vision tower beside the running decode
            inputs = self.collate(padded, prompts)
            return _Assembled(n, inputs, self.vision_ahead.encode(inputs["pixel_values"], padded))

    @torch.inference_mode()
    def generate(self, keys: Sequence[str], batch: "list[torch.Tensor] | _Assembled",
                 should_stop: Callable[[], bool] | None = None, *, retry: bool = False,
                 prompts: Sequence[str] | None = None) -> Sequence[Caption]:
        """One caption per image (retry: with self.retry_config, see backends.CaptionBackend). `should_stop()`
        true (a SIGTERM, say) ends generate at the next token: the captions are then cut short, and the caller
        drops them. Token ids are decoded on first access. An assembly with `ahead` features (--vision-overlap)
        serves them to the prefill instead of running the vision tower."""
        # A list (a retry of flagged rows, an out-of-memory halving, a row alone): to a power of two, at least
        # min_bucket, not filled.
        assembled = batch if isinstance(batch, _Assembled) else self._assemble(batch, prompts)
        if self.vision_ahead is None:
            return self._generate(keys, assembled, should_stop, retry)
        # Everything of this batch on the decode stream (above the vision stream's priority): the cache reset,
        # the steps and the copy of the tokens back, so no work of it waits behind queued vision blocks.
        with self.vision_ahead.decoding(), self.vision_ahead.serving(assembled.inputs, assembled.ahead):
            return self._generate(keys, assembled, should_stop, retry)

    def _generate(self, keys: Sequence[str], assembled: "_Assembled", should_stop: Callable[[], bool] | None,
                  retry: bool) -> Sequence[Caption]:
        n, inputs = assembled.rows, assembled.inputs
        rows = inputs["input_ids"].shape[0]
        given, keys = keys, list(keys) + [keys[-1]] * (rows - n)
        extra: dict[str, Any] = {}
        if self.temperature > 0:
            from transformers import LogitsProcessorList

            extra["logits_processor"] = LogitsProcessorList(
                [SeededSampler(keys, self.seed, self.temperature, self.top_p)])
        if should_stop is not None:
            from transformers import StoppingCriteriaList

            from .decode_loop import StopWhen

            extra["stopping_criteria"] = StoppingCriteriaList([StopWhen(should_stop)])
        try:
            if self.static_decode is not None and \
                    self.static_decode.fits(inputs["input_ids"].shape[-1], self.gen_config.max_new_tokens):
                name, extra[name] = self.static_decode.cache_for(rows)  # (a new one allocates: out of memory?)
            if self.graph_decode is not None and not retry and "logits_processor" not in extra and \
                    self.static_decode.cache_name in extra:
                new_tokens = self._graph_generate(inputs, extra, should_stop)
            else:
                config = self.retry_config if retry else self.gen_config
                out = self.model.generate(**inputs, generation_config=config, **extra)
                new_tokens = out[:, inputs["input_ids"].shape[-1]:]
        except RuntimeError as e:  # torch.OutOfMemoryError included
            if is_out_of_memory(e):  # the caller backs off
                if self.static_decode is not None:
                    self.static_decode.drop_caches()  # so the caller's smaller retry gets the memory back
            elif failed_part(e) and give_up_prefill_compile(self.model, e):  # a compiled part of the prefill raised it
                return self._generate(given, assembled, should_stop, retry)  # that part is eager now
            elif may_use_flex(self.model, rows, self.device.type, self.static_decode is not None, self.kv_fp8):
                give_up_flex(self.model, e)  # (a compile error of dynamo or Triton is a RuntimeError too)
                return self._generate(given, assembled, should_stop, retry)  # once: flex is off now
            elif give_up_decode_compile(self, e):  # the compiled decode step raised it: eager from now on
                return self._generate(given, assembled, should_stop, retry)
            raise
        # The copy to the host is queued, not done: generate's thread goes on to the next batch, and the reader
        # (the writer thread) waits for this event before it looks at the tokens (pinned memory, non_blocking).
        tokens = new_tokens[:n].to("cpu", non_blocking=True)  # pad rows dropped
        copied = None
        if new_tokens.is_cuda:
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))  # the stream the copy was queued on
        return DecodeLater(tokens, self._finish, copied)

    def _graph_generate(self, inputs: dict[str, torch.Tensor], extra: dict[str, Any],
                        should_stop: Callable[[], bool] | None) -> torch.Tensor:
        """generate's own prefill and first token, then GraphDecode's compiled steps on the same cache."""
        out = self.model.generate(**inputs, generation_config=self.first_token_config(), **extra)
        cache_kw = self.static_decode.cache_name
        return self.graph_decode.decode(out[:, -1], inputs["attention_mask"], extra[cache_kw], cache_kw,
                                        self.gen_config.max_new_tokens, self.gen_config.min_new_tokens or 0,
                                        should_stop)

    def first_token_config(self):
        """The run's config for a prefill and its first token only (the graph and continuous loops)."""
        import copy

        first = copy.deepcopy(self.gen_config)
        first.max_new_tokens, first.min_new_tokens = 1, min(1, self.gen_config.min_new_tokens or 0) or None
        first.disable_compile, first.compile_config = True, None  # one token: no decode step to compile
        return first

    def decoding_report(self, rows: int | None = None) -> dict[str, Any]:
        """How this run decoded at `rows` (its last batch size), for run_summary.json (decode_loop.decoding_report)."""
        from .decode_loop import decoding_report

        return decoding_report(self, rows)

    def stream_chunk_rows(self, slots: int) -> int | None:
        """Rows per chunk for `caption_stream` with `slots` rows decoding together; None: this run captions
        in whole batches (no --decode-loop continuous, or the static cache or greedy decoding is off)."""
        from .continuous import chunk_rows

        return chunk_rows(slots) if self.continuous is not None else None

    def caption_stream(self, next_chunk, slots: int, should_stop: Callable[[], bool] | None = None):
        """(tag, captions) per chunk as its rows finish, with `slots` rows decoding at once (continuous.py).
        `next_chunk(wait)` gives (tag, an assembly of at most stream_chunk_rows(slots) rows), or None: none is
        ready yet (wait=False), or the input is over (wait=True). (tag, None): a chunk handed back to batches."""
        from .continuous import stream_captions

        return stream_captions(self, next_chunk, slots, should_stop)

    def _finish(self, tokens: torch.Tensor) -> Caption:
        ids = tokens.tolist()
        stop_at = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        kept = ids if stop_at is None else ids[:stop_at]
        with self._tokenizer_lock:
            text = self.processor.tokenizer.decode(kept, skip_special_tokens=True)
        text = CHAT_MARKUP_RE.sub("", text).strip()  # even from a tokenizer that does not mark it special
        return Caption(text=text, finish="length" if stop_at is None else "stop", tokens=len(kept))


@dataclass
class _Assembled:
    rows: int  # real rows; the inputs may hold pad rows after them
    inputs: dict[str, torch.Tensor]
    ahead: Ahead | None = None  # the image features, computed while the previous batch decoded
