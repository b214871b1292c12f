"""Greedy decoding in one compiled step per token, no host work between steps (`--decode-loop graph`).

Why: on an H100 a compiled `generate` step of Gemma 3 4B at batch 64 took 13.8 ms against a 3.5 ms
bandwidth roof (BENCHMARKS.md §6). Its graph is one CUDA-graph launch; the rest is `generate`'s Python
around it every step: input preparation, 4D mask creation, the model call's guards, logits processors,
stopping criteria, `torch.cat` of the ids and the attention mask, and a device sync for the stop check.

Here the prefill is transformers' own (`generate` with one new token: vision tower, image-block masks,
positions from the left padding, exactly as the default path), into the run's static full-attention cache
(static_decode.py). Each further token is one call of a compiled function that does everything on the
device: the mask (a (batch, cache) boolean buffer with the new position switched on), the model step, the
`min_new_tokens` suppression of stop ids, argmax, pad-after-stop and the finished flags. The host only loops,
checks `should_stop()` and looks at the finished flags every `SYNC_EVERY` steps.

Exact for greedy decoding: the same tokens as `generate` (tests/test_decode_loop.py). Sampling and the
retry settings (repetition penalty, no repeated n-grams) keep `generate`.

A compiled decode step that fails a batch (a compile that does not work on some card, torch or Triton: this
step's, or generate's own compiled forward) is given up for the rest of the run (`give_up_decode_compile`): the
batch runs again at once with the step eager, a warning says why. Slower (run 2: 45 vs 14 ms a step at batch 64
on an H100), but the rented hours caption instead of recording every image as failed. Captioner tries the
prefill's compiled parts and FlexAttention first: each is given up alone, before the whole step.
"""
from __future__ import annotations

import collections.abc
import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from .backends import Caption

log = logging.getLogger(__name__)

SYNC_EVERY = 16  # steps between looks at the finished flags (each look waits for the device)
_RAISED_IN = "_raised_in_compiled_decode_step"  # set on an error that left GraphDecode's compiled step


class GraphDecode:
    """Greedy decode steps after a prefill, for one model; an `allowed` buffer per (batch, cache length).

    The cache is static_decode's full-attention cache, no longer than the sliding window: there the sliding
    layers' mask equals the full one, so one mask serves both (as `use_full_masks_when_exact`)."""

    def __init__(self, model, *, stop_ids: list[int], pad_id: int, compile_options: dict[str, Any] | None = None):
        self.model = model
        device = next(model.parameters()).device
        self.stop_ids = stop_ids
        self.pad_id = int(pad_id)
        options = dict(compile_options or {})
        if "backend" not in options:
            options["backend"] = "inductor"
            if device.type == "cuda":
                options.setdefault("mode", "reduce-overhead")  # CUDA graphs: one launch a step
        self._compiled_step = torch.compile(self._one_step, fullgraph=False, dynamic=False, **options)
        self._step = self._compiled_step  # _one_step itself once the compiled one is given up
        self._allowed: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def stop_ids(self) -> torch.Tensor:
        return self._stop_ids

    @stop_ids.setter
    def stop_ids(self, ids) -> None:
        """The stop tokens, and the vocabulary mask of them the step uses; on the device: no copy in the graph."""
        self._stop_ids = torch.as_tensor(ids, dtype=torch.long).to(next(self.model.parameters()).device)
        self.is_stop = stop_token_mask(self.model, self._stop_ids)

    @property
    def compiled(self) -> bool:
        return self._step is self._compiled_step

    def give_up_compile(self) -> None:
        """The rest of the run's steps run eagerly (give_up_decode_compile)."""
        self._step = self._one_step

    def _run_step(self, *args):
        try:
            return self._step(*args)
        except RuntimeError as e:  # dynamo's and inductor's errors included
            if self.compiled:
                setattr(e, _RAISED_IN, True)
            raise

    def _one_step(self, tokens, positions, step, prompt_len, min_new, allowed, finished, cache, cache_kw: str):
        """Token `step + 1` of every row from token `step` (on the device, no host sync)."""
        allowed.index_fill_(1, (prompt_len + step).view(1), True)  # the cache slot this token writes
        mask = allowed[:, None, None, :]  # = padding mask AND causal: later slots are still False
        out = self.model(input_ids=tokens[:, None], position_ids=(positions + step)[:, None], use_cache=True,
                         attention_mask={"full_attention": mask, "sliding_attention": mask}, **{cache_kw: cache})
        early = (step + 1) < min_new  # min_new_tokens: no stop token yet (as MinNewTokensLengthLogitsProcessor)
        chosen = greedy_tokens(out.logits[:, -1], self.is_stop, early)
        chosen = torch.where(finished, self.pad_id, chosen)  # rows that stopped get pad, as generate
        return chosen, finished | torch.isin(chosen, self.stop_ids)

    def decode(self, first: torch.Tensor, attention_mask: torch.Tensor, cache, cache_kw: str, max_new: int,
               min_new: int, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """(batch, <= max_new) new token ids: `first` (the prefill's token) and the ones after it, with the
        cache holding the prompt. Ends like `generate`: when every row has stopped, or at `max_new`."""
        first = first.contiguous()  # a column of generate's output: its stride would be a new graph
        device = first.device
        rows, prompt_len = attention_mask.shape
        key = (rows, int(cache.layers[0].max_cache_len))
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self._allowed[key] = torch.zeros(key, dtype=torch.bool, device=device)
            torch._dynamo.mark_static_address(allowed)  # the same buffer every call: a CUDA-graph input
        allowed.zero_()
        allowed[:, :prompt_len] = attention_mask.bool()
        positions = attention_mask.long().sum(-1)  # generate's: cumsum of the mask - 1, then + 1 a token
        steps = torch.arange(max_new, device=device)  # step i is a view of this: no host-to-device copy a step
        prompt_len_t, min_new_t = torch.tensor(prompt_len, device=device), torch.tensor(min_new, device=device)
        finished = torch.isin(first, self.stop_ids)
        tokens, done = [first], [finished]
        for step in range(max_new - 1):
            if should_stop is not None and should_stop():
                break
            if step % SYNC_EVERY == 0 and bool(finished.all()):
                break
            chosen, finished = self._run_step(tokens[-1], positions, steps[step], prompt_len_t, min_new_t, allowed,
                                              finished, cache, cache_kw)
            # A CUDA graph's outputs are overwritten by its next replay: keep copies.
            tokens.append(chosen.clone())
            finished = finished.clone()
            done.append(finished)
        all_done = torch.stack(done).all(dim=1)
        keep = int(all_done.nonzero()[0]) + 1 if bool(all_done.any()) else len(tokens)
        return torch.stack(tokens[:keep], dim=1)


class StopWhen:
    """generate's stopping criterion that ends every row of the batch once `flag()` is true (a signal)."""

    def __init__(self, flag: Callable[[], bool]):
        self.flag = flag

    def __deepcopy__(self, memo):  # generate deep-copies its criteria: the copy must watch the same flag
        return self

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag(), dtype=torch.bool, device=input_ids.device)


def give_up_decode_compile(cap, error: BaseException) -> bool:
    """A batch of Captioner `cap` failed in a compiled decode step: the rest of the run decodes eagerly (the
    module's docstring). False when no compiled decode step raised `error` (out of memory excepted: a smaller
    batch's to fix): nothing changed, a retry would fail the same way."""
    import torch._dynamo.exc

    from .batch_size import is_out_of_memory
    from .errors import described

    if is_out_of_memory(error):
        return False
    graph = cap.graph_decode
    if graph is not None and graph.compiled and getattr(error, _RAISED_IN, False):
        graph.give_up_compile()
        which = "the decode step"
    elif isinstance(error, torch._dynamo.exc.TorchDynamoException) and _generate_compiles(cap):
        for config in (cap.gen_config, cap.retry_config):  # (the retry's: a copy of the run's settings)
            config.disable_compile = True
        which = "generate's decode step"
    else:
        return False
    cause = getattr(error, "inner_exception", None) or error  # dynamo's BackendCompilerFailed wraps the compiler's
    log.warning("%s: a batch failed with it compiled (%s); running it eagerly from now on, several times slower "
                "(--compile off skips every compile)", which, described(cause))
    return True


def _generate_compiles(cap) -> bool:
    """Whether `generate` compiles its decode steps for `cap` (a static cache with a compile config)."""
    return cap.static_decode is not None and cap.static_decode.compile_config is not None \
        and not cap.gen_config.disable_compile


def stop_token_mask(model, stop_ids: torch.Tensor) -> torch.Tensor:
    """(vocabulary,) True at the stop tokens, on their device: `greedy_tokens`' mask."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return torch.zeros(vocab, dtype=torch.bool, device=stop_ids.device).index_fill_(0, stop_ids, True)


def greedy_tokens(logits: torch.Tensor, is_stop: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token from its last logits, the stop tokens left out where `early` (min_new_tokens,
    as generate's processor). A mask, not an assignment into a float copy of the logits: compiled, it is one
    read of the logits (the assignment wrote a (rows, vocabulary) float32 copy a step: 268 MB at 256 rows)."""
    return torch.where(early & is_stop, float("-inf"), logits.float()).argmax(-1)


def decode_step_compiled(cap) -> bool:
    """Whether the batches' decode steps run compiled now (the graph loop's step, else generate's)."""
    return cap.graph_decode.compiled if cap.graph_decode is not None else _generate_compiles(cap)


def choose_decode_loop(cap, decode_loop: str, options: dict[str, Any]):
    """(GraphDecode or None, {} for continuous batching's decoders by slot count or None, the graph loops'
    compile options) for a Captioner. decode_loop "graph": greedy tokens after the prefill from one compiled
    step each; "continuous": the same step with continuous batching (continuous.py); "auto": graph on CUDA (where
    it was measured faster), generate elsewhere; no GraphDecode for "generate", or when there is no static cache,
    the run samples or the model is spread over devices."""
    from .config import DECODE_LOOPS
    from .model_loading import spread_over_devices

    if decode_loop not in DECODE_LOOPS:
        raise ValueError(f"decode_loop must be one of {', '.join(DECODE_LOOPS)}, got {decode_loop!r}")
    if decode_loop == "generate" or (decode_loop == "auto" and cap.device.type != "cuda"):
        return None, None, {}
    # A model spread over devices or offloaded (--device-map auto) moves weights in hooks: no graph to replay.
    if cap.static_decode is None or cap.temperature > 0 or spread_over_devices(cap.model):
        if decode_loop != "auto":
            log.info("decode loop: generate (the %s loop needs the static cache, greedy decoding and the model "
                     "on one device)", decode_loop)
        return None, None, {}
    options = {k: v for k, v in options.items() if k in ("backend", "mode")}
    if decode_loop == "continuous":
        log.info("decode loop: continuous batching, one compiled step per token; a finished row's slot "
                 "takes the next image")
    else:
        log.info("decode loop: one compiled step per token after generate's prefill")
    return (GraphDecode(cap.model, stop_ids=cap.stop_ids, pad_id=cap.pad_id, compile_options=options),
            {} if decode_loop == "continuous" else None, options)


def decoding_report(cap, rows: int | None = None) -> dict[str, Any]:
    """How a Captioner decoded, for run_summary.json: the loop, the cache, the decode attention (for "auto",
    the kernel it takes at `rows`, the batch size the run ended with), the decode step (compiled or eager, at
    the end: give_up_decode_compile), the vision tower and the language model's prefill (compiled or eager,
    prefill_compile.py), the vision tower's attention kernel (vision_attention.py) and the images it runs over at
    a time (vision_chunks.py; 0: the whole batch), for continuous batching the decode steps it ran (per image,
    the number its schedule saves against whole batches), its FP8 linear layers (fp8.py), the dtype its keys and
    values were cached in (kv_fp8.py: float8, or rounded as float8 on a dynamic cache), and on a GPU the
    peak memory against the card's (batch_size.peak_device_memory)."""
    from .batch_size import peak_device_memory
    from .fp8 import fp8_layers
    from .grouped_attention import decode_attention_kernel, may_use_flex
    from .prefill_compile import compiled_parts
    from .vision_attention import vision_attention_report
    from .vision_chunks import vision_chunk_rows

    loop = "continuous" if cap.continuous is not None else "graph" if cap.graph_decode is not None else "generate"
    attention = decode_attention_kernel(cap.model)
    if attention == "auto":  # a static cache is a compiled one (Captioner._static_decode)
        flex = rows and may_use_flex(cap.model, rows, cap.device.type, cap.static_decode is not None, cap.kv_fp8)
        attention += ": flex" if flex else ": sdpa"
    report: dict[str, Any] = {"loop": loop, "static_cache": cap.static_decode is not None, "attention": attention,
                              "decode_step": "compiled" if decode_step_compiled(cap) else "eager",
                              **compiled_parts(cap.model), "vision_attention": vision_attention_report(cap.model),
                              "vision_chunk_rows": vision_chunk_rows(cap.model),
                              "fp8_layers": fp8_layers(cap.model), "kv_cache_dtype": kv_cache_dtype(cap),
                              **peak_device_memory(cap.device)}
    ran = {**{slots: {"decode_steps": decoder.steps} for slots, decoder in (cap.continuous or {}).items()},
           **cap.continuous_failed}  # a stream that failed: its steps, and why the rest went in batches
    if ran:
        from .continuous import chunk_rows

        report["continuous"] = {str(slots): {"chunk_rows": chunk_rows(slots), **what} for slots, what in ran.items()}
    return report


def kv_cache_dtype(cap) -> str:
    """What a Captioner's keys and values were cached as: "float8_e4m3fn" (a static cache's buffers; a dynamic
    cache's rounded as they would be) or the language model's dtype."""
    from .kv_fp8 import FP8

    return str(FP8 if cap.kv_fp8 else cap.dtype).removeprefix("torch.")


class DecodeLater(collections.abc.Sequence):
    """Captions decoded from token ids on first access: in the pipeline, on its writer thread.

    On CUDA the ids arrive by a non-blocking copy into pinned memory: `copied` is the event after it, waited
    for before the first read (reading earlier gives whatever the pinned block held before, silently)."""

    def __init__(self, tokens: torch.Tensor, finish: Callable[[torch.Tensor], Caption], copied: Any = None):
        self._tokens, self._finish, self._copied, self._captions = tokens, finish, copied, None

    def _all(self) -> list[Caption]:
        if self._captions is None:
            if self._copied is not None:
                self._copied.synchronize()
            self._captions = [self._finish(row) for row in self._tokens]
        return self._captions

    def __len__(self) -> int:
        return self._tokens.shape[0]

    def __getitem__(self, i):
        return self._all()[i]
