"""The next batch's image features, computed while the current batch decodes (`--vision-overlap`).

Why: on an H100 the prefill took 23 ms an image (BENCHMARKS.md §6), most of it SigLIP over 4,096 patches,
compute-bound; a decode step reads the weights and the KV cache, bandwidth-bound, and leaves most of the
card's arithmetic idle. The pipeline already assembles the next batch on a background thread while this one
generates; with this on, that thread also runs the vision tower + projector for it, on its own CUDA stream,
so the two kinds of work share the card instead of taking turns.

Measured (H100, batch 256, BENCHMARKS.md §6 run 3): no steady gain. The batches in between took 10-12 s
with it against 10.5 s without; only the last batch, with no next tower to run beside it, is faster. The
decode kernels slow by as much as the vision work they hide, so the flag stays off by default.

How generate uses them: Gemma 3's forward asks `get_image_features(pixel_values)` of its inner model on the
prefill. `VisionAhead` answers that call, for the one pixel tensor it was given, with the features already
computed (an instance attribute over the method; the class is untouched), and leaves every other call to the
model. Everything else generate does is unchanged: the same token ids, masks and positions, and the same
feature values, so the same tokens (tests/test_vision_ahead.py).

Streams: the batch's copies, resize and vision tower run on the side stream; an event marks the end.
Generate's stream waits for that event on the device (the host does not wait), and every tensor of the
batch is marked as used by generate's stream so the allocator does not hand its memory back to the side
stream before generate is done with it. Generate itself runs on a stream of higher priority than the side
one: the card does not preempt running blocks, but as SMs free up the decode step's blocks go before the
next vision blocks, so a decode kernel waits for at most the vision blocks already running, not for a whole
queued GEMM. On the CPU there are no streams: the features are computed on the assembling thread.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .vision_chunks import image_features_call

log = logging.getLogger(__name__)


@dataclass
class Ahead:
    """One batch's image features (the projector's output, one row per image) and, on CUDA, the event that
    marks them done on the side stream."""

    features: torch.Tensor
    event: Any = None


class VisionAhead:
    """Computes image features for a batch on a side stream, and serves them to that batch's generate."""

    @classmethod
    def of(cls, model, device: torch.device) -> "VisionAhead | None":
        """The model's VisionAhead (one per model: it answers the model's calls); None, with a warning, for a
        model whose forward does not ask its inner model for image features (not a Gemma 3-like VLM)."""
        inner = getattr(model, "model", model)
        existing = inner.__dict__.get("get_image_features")
        if isinstance(getattr(existing, "__self__", None), cls):
            return existing.__self__
        if not callable(getattr(type(inner), "get_image_features", None)):
            log.warning("--vision-overlap: %s has no get_image_features; the vision tower runs in the prefill",
                        type(model).__name__)
            return None
        return cls(model, device)

    def __init__(self, model, device: torch.device):
        self.inner = getattr(model, "model", model)  # Gemma3Model: the object whose forward calls it
        self.compute = image_features_call(self.inner)  # the model's own method, or it chunk by chunk
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # priority 0: the lowest
        self.decode_stream = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        self._serving: tuple[torch.Tensor, torch.Tensor] | None = None
        self.misses = 0  # prefills whose pixels were not the ones served: computed inline (counted, logged)
        self._last: tuple[list[torch.Tensor], torch.Tensor] | None = None  # the last images encoded, their features
        self.inner.get_image_features = self._get_image_features

    def forget(self) -> None:
        """Let go of the last images encoded and their features (after an out-of-memory error: a whole batch's
        features, ~1.3 MB an image for the 4B, would otherwise stay on the card until the next encode)."""
        self._last = None

    def side_stream(self):
        """Where the next batch is assembled: the side stream on CUDA, the current one elsewhere."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def decoding(self):
        """Where generate runs: the high-priority stream on CUDA, the current one elsewhere."""
        return torch.cuda.stream(self.decode_stream) if self.decode_stream is not None else contextlib.nullcontext()

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, images: list[torch.Tensor]) -> Ahead:
        """Features for `pixel_values`, the batch of `images` (run inside `side_stream()`, after the batch's
        copies were queued). The same images again (the next prompt of a run with several) reuse them."""
        last = self._last
        if last is not None and len(last[0]) == len(images) and all(a is b for a, b in zip(last[0], images)):
            features = last[1]
        else:
            features = self._features(pixel_values)
            self._last = (list(images), features)  # holds the images: their ids stay theirs
        event = None
        if self.stream is not None:  # recorded anew each time: it must also cover this batch's own copies
            event = torch.cuda.Event()
            event.record(self.stream)
        return Ahead(features, event)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's output for `pixel_values`; a compiled tower that fails here (the assembling thread, not
        generate's) is given up for the run and run again eagerly, as Captioner._generate does."""
        from .prefill_compile import eager_prefill_on_failure

        return eager_prefill_on_failure(self.inner, lambda: self.compute(pixel_values, return_dict=True).pooler_output)

    @contextlib.contextmanager
    def serving(self, inputs: dict[str, torch.Tensor], ahead: Ahead | None) -> Iterator[None]:
        """Within: generate's prefill of `inputs` gets `ahead`'s features instead of running the tower (None:
        nothing to serve, the prefill runs it)."""
        if ahead is None:
            yield
            return
        if ahead.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ahead.event)  # on the device: the host goes on
            for tensor in (*inputs.values(), ahead.features):
                if tensor.is_cuda:
                    tensor.record_stream(stream)  # made on the side stream, read on this one
        self._serving = (inputs["pixel_values"], ahead.features)
        try:
            yield
        finally:
            self._serving = None

    def _get_image_features(self, pixel_values, **kwargs):
        served = self._serving
        if served is not None and served[0] is pixel_values:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            return BaseModelOutputWithPooling(pooler_output=served[1])
        if served is not None:
            self.misses += 1
            if self.misses == 1:
                log.warning("vision overlap: generate passed other pixel values than the batch's; computing the "
                            "image features inline")
        return self.compute(pixel_values, **kwargs)
