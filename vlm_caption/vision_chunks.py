"""The vision tower over a batch in chunks of images, so its activations do not set the batch size.

Why: a decode step reads the language model's weights once for every row of the batch, and launches the same
~1,000 kernels whatever the batch, so the larger the batch the cheaper each row's step (BENCHMARKS.md §6: every
measured batch size up to 256 captioned faster per image than the one below it). What capped the batch was
not the KV cache (the 4B: ~75 MB a row at 536 tokens) but SigLIP's activations over a whole batch at once:
4,096 patches an image, ~127 MB an image in bf16 while a layer runs (batch_size.py), freed before the language
model's prefill. Run over 64 images at a time, the tower's peak is one chunk's (~8 GB), a fixed cost, and the
batch is what the KV cache and the prompt's activations allow (`batch_size.auto_batch_size(vision_rows=...)`).

Speed: 64 images are 262,144 patch rows per GEMM and 1,024 (image, head) pairs per attention call, far more
than an H100's 132 SMs need; the chunks add a few hundred kernel launches per chunk (~ms) to ~0.8 s of work.
Each image's features depend on that image alone (the tower has no cross-image op), so the same values
(tests/test_vision_chunks.py: the same greedy tokens as the whole batch).

How: Gemma 3's forward asks its inner model's `get_image_features(pixel_values)` for the projector's output
(`.pooler_output`); an instance attribute answers it chunk by chunk and returns only the pooled features
(256 tokens an image), not the tower's last hidden state over all 4,096 patches of every image, which the
model's own method hands back too and which would stay alive through the prefill. --vision-overlap's
VisionAhead, which answers the same call with precomputed features, computes them through the chunks.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class ChunkedImageFeatures:
    """`inner.get_image_features` over at most `rows` images at a time (the model's own method per chunk)."""

    def __init__(self, inner, rows: int):
        if rows < 1:
            raise ValueError(f"vision chunk rows must be >= 1, got {rows}")
        self.rows = rows
        self.own = type(inner).get_image_features.__get__(inner)
        self.chunked_calls = 0  # calls split into more than one chunk (tests, diagnostics)

    def __call__(self, pixel_values: torch.Tensor, **kwargs):
        if pixel_values.shape[0] <= self.rows or kwargs.get("return_dict") is False or not self.rows:
            return self.own(pixel_values, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = []
        for chunk in pixel_values.split(self.rows):
            out = self.own(chunk, **kwargs)
            if not isinstance(getattr(out, "pooler_output", None), torch.Tensor):  # not Gemma 3's kind of output
                log.info("vision tower: %s's image features come in another form; it runs over whole batches",
                         type(self.own.__self__).__name__)
                self.rows = 0
                return self.own(pixel_values, **kwargs)
            pooled.append(out.pooler_output)
        self.chunked_calls += 1
        return BaseModelOutputWithPooling(pooler_output=torch.cat(pooled))


def image_features_call(inner):
    """What computes `inner`'s image features: the chunked call when one is installed, else the model's own."""
    current = inner.__dict__.get("get_image_features")
    return current if isinstance(current, ChunkedImageFeatures) else type(inner).get_image_features.__get__(inner)


def set_vision_chunk_rows(model, rows: int) -> int:
    """Run `model`'s vision tower and projector over at most `rows` images at a time (0: the whole batch at
    once). Returns the rows in effect (0 for a model without `get_image_features`: not a Gemma 3-like VLM)."""
    inner = getattr(model, "model", model)
    if not callable(getattr(type(inner), "get_image_features", None)):
        return 0
    call = ChunkedImageFeatures(inner, rows) if rows else type(inner).get_image_features.__get__(inner)
    current = inner.__dict__.get("get_image_features")
    serving = getattr(current, "__self__", None)
    if serving is not None and hasattr(serving, "compute"):  # --vision-overlap answers the call: it computes
        serving.compute = call  # through the chunks (vision_ahead.VisionAhead)
    elif rows:
        inner.get_image_features = call
    else:
        inner.__dict__.pop("get_image_features", None)
    return rows


def vision_chunk_rows(model) -> int:
    """The rows the vision tower runs over at a time (0: the whole batch), for run_summary.json."""
    inner = getattr(model, "model", model)
    call = inner.__dict__.get("get_image_features")
    call = getattr(getattr(call, "__self__", None), "compute", call)  # --vision-overlap's computes through it
    return call.rows if isinstance(call, ChunkedImageFeatures) else 0
