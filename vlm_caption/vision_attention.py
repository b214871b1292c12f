"""Which of torch's attention kernels the vision tower's self-attention runs on (`--vision-attention`).

Why: Gemma 3's SigLIP attends over an 896 px image's 4,096 patches in each of its 27 layers: 2.09 of the ~9.2
TFLOP an image costs (BENCHMARKS.md §6), and at 16 heads of 72 it has a head size flash attention has no
kernel for (its kernels come in 32, 64, 96, 128 ...: 72 runs on the 96 one). On an H100 (run 3's tower at
batch 64, 16.4 ms an image eager, less run 5's 4.7 ms of its GEMMs) the attention is about 10 ms of an image's
~29.5. torch has other kernels for it (cuDNN's fused attention, the memory-efficient one); which is fastest
depends on the card, torch and cuDNN, so it is measured where it runs rather than written down here.

How: "auto" on a GPU times torch's own pick and each kernel at the tower's shapes (a few rows of random
queries, keys and values laid out as SigLIP's are) at the tower's first call, keeps those whose output
matches torch's pick, and puts the fastest first in torch's order of kernels for every call of the tower's
encoder (`sdpa_kernel(..., set_priority=True)`: the others stay allowed, so a shape it cannot take still runs;
a CPU's sdpa takes no order, so there the named kernel and math are the ones allowed).
torch.compile traces the kernel that order names (the compiled layers are traced inside the call), so the
compiled tower runs it too. Within 3 % of torch's pick, torch's pick stays. On a CPU "auto" is torch's pick,
untimed; a kernel's name puts that kernel first without timing; "sdpa" is torch's pick.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

_BACKEND_NAMES = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}  # torch.nn.attention.SDPBackend's
CANDIDATES = {"cuda": ("flash", "cudnn", "efficient")}  # what "auto" times, by device type
SAMPLE_ROWS = 4  # images the timing runs at (the kernels' speed per image hardly depends on it)
KEEP_TORCHS_PICK_WITHIN = 1.03  # a kernel must beat torch's own pick by more than this to replace it


def set_vision_attention(model, choice: str) -> None:
    """Make `model`'s vision tower run its attention on `choice` (of config.VISION_ATTENTIONS): a call in place
    of its encoder's own, the kernel chosen at its first call for "auto". Nothing for a model without one."""
    encoder = _encoder(model)
    if encoder is None:
        return
    loaded = getattr(getattr(model.config, "vision_config", None), "_attn_implementation", None) or "sdpa"
    if loaded != "sdpa":  # eager or flash attention: no sdpa kernel to choose (the flag itself is refused then)
        encoder._compiled_call_impl = None
        encoder._vision_attention = f"{loaded} (--attn-implementation: not sdpa)"
        return
    if choice != "sdpa" and not _priority_supported():
        log.warning("--vision-attention %s needs torch >= 2.6 (sdpa_kernel's set_priority; this is %s): "
                    "torch's own pick", choice, torch.__version__)
        choice = "sdpa"
    if choice == "sdpa" or (choice == "auto" and _device_type(model) not in CANDIDATES):
        encoder._compiled_call_impl = None  # (nn.Module.compile's attribute: None runs the module itself)
        encoder._vision_attention = "sdpa (torch's pick)"
        return
    encoder._compiled_call_impl = _KernelCall(encoder, choice)
    encoder._vision_attention = choice if choice != "auto" else "auto (chosen at the first batch)"


def vision_attention_report(model) -> str:
    """What the vision tower's attention runs on, for run_summary.json."""
    encoder = _encoder(model)
    return getattr(encoder, "_vision_attention", "sdpa (torch's pick)") if encoder is not None else "none"


class _KernelCall:
    """The encoder's call inside torch's kernel order with the chosen kernel first ("auto": timed first)."""

    def __init__(self, encoder, choice: str):
        self.encoder = encoder
        self.kernel: str | None = None if choice == "auto" else choice  # None: torch's pick
        self.chosen = choice != "auto"
        self._lock = threading.Lock()  # the tower may run on two threads (--vision-overlap)
        self._order_lock, self._inside, self._order = threading.Lock(), 0, None

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.encoder._call_impl(*args, **kwargs)
        hidden = _first_tensor(args, kwargs)
        if not self.chosen:
            with self._lock:
                if not self.chosen:
                    self._choose(hidden)
        if self.kernel is None or hidden is None:
            return self.encoder._call_impl(*args, **kwargs)
        with self._in_order(hidden.device.type):
            return self.encoder._call_impl(*args, **kwargs)

    @contextlib.contextmanager
    def _in_order(self, device_type: str):
        """The kernel order set by the first of overlapping calls and put back by the last. Each call's own
        sdpa_kernel (process-wide flags, saved and restored) on two threads could restore them out of turn and
        leave the tower's order in place for the whole process."""
        with self._order_lock:
            if not self._inside:
                self._order = _first_in_order(self.kernel, device_type)
                self._order.__enter__()
            self._inside += 1
        try:
            yield
        finally:
            with self._order_lock:
                self._inside -= 1
                if not self._inside:
                    self._order.__exit__(None, None, None)

    def _choose(self, hidden: torch.Tensor | None) -> None:
        try:  # (a kernel that fails is one time_kernels reports; this is for an encoder or input not SigLIP's)
            shape = _attention_shape(self.encoder.config, hidden)
            timings = time_kernels(shape, hidden.dtype, hidden.device, CANDIDATES[hidden.device.type])
        except (RuntimeError, TypeError, AttributeError, KeyError) as e:
            log.warning("vision attention: could not time the kernels (%s); torch's own pick", e)
            shape, timings = None, {}
        self.kernel = pick(timings)
        self.chosen = True
        shown = ", ".join(f"{name} {ms:.3f} ms" if isinstance(ms, float) else f"{name}: {ms}"
                          for name, ms in timings.items())
        chosen = self.kernel or "sdpa (torch's pick)"
        self.encoder._vision_attention = f"auto: {chosen}" + (
            f" (one layer, {shape[0]} images: {shown})" if shown else "")
        log.info("vision attention: %s", self.encoder._vision_attention)


def pick(timings: dict[str, Any]) -> str | None:
    """The kernel to put first from `time_kernels`' timings: the fastest that ran and matched, unless torch's
    own pick ("sdpa") is within KEEP_TORCHS_PICK_WITHIN of it (None: torch's pick)."""
    ran = {name: ms for name, ms in timings.items() if isinstance(ms, float)}
    if "sdpa" not in ran:
        return None
    best = min((name for name in ran if name != "sdpa"), key=ran.get, default=None)
    if best is None or ran[best] * KEEP_TORCHS_PICK_WITHIN >= ran["sdpa"]:
        return None
    return best


def time_kernels(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, candidates,
                 *, rounds: int = 5, clock: Callable[[], float] | None = None) -> dict[str, Any]:
    """ms of one attention call at `shape` = (rows, heads, tokens, head dim) on torch's pick ("sdpa") and each
    of `candidates` first in torch's order, best of `rounds`; a candidate that raises or whose output is not
    torch's pick's (bf16 rounding allowed) gets the reason instead of a time."""
    rows, heads, tokens, dim = shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    # Laid out as SigLIP's: (rows, tokens, heads, dim) transposed, not contiguous.
    q, k, v = (torch.randn(rows, tokens, heads, dim, generator=generator).to(device, dtype).transpose(1, 2)
               for _ in range(3))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = clock or time.perf_counter
    with torch.inference_mode():
        reference = _attend_on(None, q, k, v)
        found: dict[str, Any] = {}
        for name in ("sdpa", *candidates):
            kernel = None if name == "sdpa" else name
            try:
                out = _attend_on(kernel, q, k, v)
            except RuntimeError as e:
                found[name] = f"failed: {str(e).splitlines()[0][:120]}"
                continue
            error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            if not error <= 0.02:  # (bf16 rounding is ~0.5 %; NaN fails too)
                found[name] = f"output differs from torch's pick by {error:.1%}"
                continue
            best = float("inf")
            for _ in range(rounds):
                sync()
                start = clock()
                _attend_on(kernel, q, k, v)
                sync()
                best = min(best, clock() - start)
            found[name] = round(1000 * best, 4)
    return found


def _attend_on(kernel: str | None, q, k, v) -> torch.Tensor:
    """torch's sdpa on `kernel` first (None: torch's own pick)."""
    if kernel is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with _first_in_order(kernel, q.device.type):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _first_in_order(kernel: str, device_type: str):
    """torch's sdpa with `kernel` first and the others after it (a shape it cannot take still runs). A CPU's
    sdpa takes no order (flash where it can, else math): there `kernel` and math are the ones allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, _BACKEND_NAMES[kernel])
    if device_type != "cuda":
        return sdpa_kernel(list(dict.fromkeys([first, SDPBackend.MATH])))
    rest = [getattr(SDPBackend, name) for name in _BACKEND_NAMES.values() if name != _BACKEND_NAMES[kernel]]
    return sdpa_kernel([first, *rest], set_priority=True)


def _priority_supported() -> bool:
    import inspect

    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def _attention_shape(config, hidden: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, heads, tokens, head dim) of the encoder's attention for the batch `hidden` (rows, tokens, width)."""
    heads = int(config.num_attention_heads)
    return min(hidden.shape[0], SAMPLE_ROWS), heads, hidden.shape[1], hidden.shape[-1] // heads


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)


def _encoder(model):
    inner = getattr(model, "model", model)
    return getattr(getattr(inner, "vision_tower", None), "encoder", None)


def _device_type(model) -> str:
    return next(model.parameters()).device.type
