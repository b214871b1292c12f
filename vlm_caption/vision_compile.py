"""The vision tower compiled with the decode step (`--compile`): the larger half of the prefill.

Why: on an H100 a 4B image took ~36 ms at batch 256, 16.4 ms of it SigLIP over 896 px = 4,096 patches, its
compute roof 5.5 ms (BENCHMARKS.md §6). Run 3 timed the tower + projector alone at batch 64: 1.047 s eager,
0.889 s compiled (inductor, default mode), 1.18x, after a 28 s compile.

How: `nn.Module.compile` on the tower and the projector, in place: the weights keep their names, and every
caller (generate's prefill, --vision-overlap's side stream) goes through them. torch.compile's default mode,
no CUDA graphs: a graph would keep a whole batch's vision activations in its own memory pool, and the batch
size changes with the last batch and the out-of-memory back-off. The first batch of a new size recompiles
once with the batch dimension dynamic (torch's automatic dynamic shapes), so a run compiles the tower at
most twice, and a third time for a batch of one row (torch specialises a size of 1; the decode step
compiles a graph for every padded batch size anyway). A batch that fails while the tower is compiled gives
the compiled tower up (a warning with the compiler's own error) and is tried once more at once
(Captioner._generate; VisionAhead for --vision-overlap), as with FlexAttention.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

VISION_MODULES = ("vision_tower", "multi_modal_projector")  # Gemma 3's, under the inner model (get_image_features)


def _modules(model) -> list:
    inner = getattr(model, "model", model)
    return [m for m in (getattr(inner, name, None) for name in VISION_MODULES) if m is not None]


def set_vision_compile(model, on: bool, options: dict[str, Any] | None = None) -> bool:
    """Compile `model`'s vision tower and projector in place (`on`; `options`: torch.compile's backend, for
    tests), or run them eagerly (a model that an earlier Captioner compiled, in a benchmark); True when they
    run compiled now. A model spread over devices by --device-map stays eager (accelerate moves weights in
    hooks around each module)."""
    modules = _modules(model)
    spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    if not on or not modules or spread:
        for module in modules:
            module._compiled_call_impl = None  # what nn.Module.compile sets; __call__ then runs the module itself
        if on:
            log.info("vision tower: eager (%s)", "spread over devices" if spread else "the model has none")
        return False
    backend = (options or {}).get("backend", "inductor")
    for module in modules:
        module.compile(backend=backend)
    log.info("vision tower: compiled (%s, at its first batch; once more if the batch size changes)",
             getattr(backend, "__name__", backend))
    return True


def vision_compiled(model) -> bool:
    """Whether `model`'s vision tower runs compiled."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in _modules(model))


def give_up_vision_compile(model, error: BaseException) -> None:
    """A batch failed while the vision tower was compiled: the rest of the run runs it eagerly, so a compile
    that does not work on some card, torch or Triton costs one batch's retry, not the run."""
    from .errors import described

    cause = getattr(error, "inner_exception", None) or error  # dynamo's BackendCompilerFailed wraps the compiler's
    log.warning("vision tower: a batch failed with the tower compiled (%s); running it eagerly from now on "
                "(--compile off also skips the decode step's compile)", described(cause))
    set_vision_compile(model, False)
