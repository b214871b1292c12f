"""Continuous batching of greedy decoding (`--decode-loop continuous`): a row that stops gives its slot to the
next image at once, instead of idling until the longest caption of its batch ends.

Why: real captions vary in length. A batch decodes until its longest row stops (or `--max-tokens`), so with
256 rows a run pays about the longest caption's steps for every image: the rest of the batch decodes pad
tokens. Here the batch is a set of `slots`; the images come in chunks (a few per slot set), and whenever a
chunk's worth of slots is free, the next chunk is prefilled and takes them. Decode steps then follow the
mean caption length, not the batch's maximum (BENCHMARKS.md §6 "Continuous batching").

How, on decode_loop.GraphDecode's design (one compiled step per token, the host looks at the device every
LOOK_EVERY steps, where decode_loop's looks every 16):
- One static full-attention cache of `slots` rows used as a ring of `max_cache_len` positions (>= the
  longest prompt + max new tokens): every step writes all rows at the same ring position (the cache layers'
  `cumulative_length`, set each step). Each row has its own mask over the ring (`allowed`), its own RoPE
  position and its own count of tokens, all on the device, so rows of different ages share the step.
- A chunk's prefill is transformers' own (`generate` with one new token, as the graph loop's, into a
  dynamic cache); its keys and values (already rotated by their positions) are copied into its slots at
  the ring positions just before the current one, which is where its first generated token goes next.
  A row lives at most prompt + max new tokens positions, so the ring never reaches its own live entries.
- Rows that finished keep running in the step (the batch shape is fixed: one CUDA graph) and write pad
  tokens into their own slot until a chunk reuses it.

Exact for greedy decoding: each row's tokens are generate's (tests/test_continuous.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .decode_loop import greedy_tokens, stop_token_mask
from .errors import brief, described
from .kv_fp8 import stored

LOOK_EVERY = 4  # steps between looks at the finished rows: a look costs one device sync (a launch gap, tens of
# microseconds, against ~20 ms a step of the 4B at batch 256), a freed slot idles until the next look


@dataclass
class Prefilled:
    """A chunk after its prefill: what its rows need to join the slots."""
    tag: Any  # the caller's name for the chunk, handed back with its tokens
    rows: int  # real rows (the prefill may have run pad rows after them: dropped)
    first: torch.Tensor  # (>= rows,) the first generated token of each row
    mask: torch.Tensor  # (>= rows, prompt) the left-padded prompt's attention mask
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values): (>= rows, kv_heads, prompt, dim)
    limits: torch.Tensor | None = None  # (rows,) max new tokens per row (benchmarks); None: the run's


@dataclass
class HandedBack:
    """A chunk the ring does not take (its prompts outgrow it): its tag goes back to the caller at once."""
    tag: Any


class ContinuousDecode:
    """`slots` rows decoding together; chunks join as slots free up. One per model and slot count."""

    def __init__(self, model, cache, *, slots: int, stop_ids: list[int], pad_id: int, max_new: int, min_new: int,
                 compile_options: dict[str, Any] | None = None):
        self.model, self.cache = model, cache  # cache: a StaticCache of full-attention layers, not yet used
        self.slots, self.max_new, self.pad_id = slots, max_new, int(pad_id)
        self.ring = int(cache.layers[0].max_cache_len)
        device = self.device = next(model.parameters()).device
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.is_stop = stop_token_mask(model, self.stop_ids)

        def zeros(dtype):
            return torch.zeros(slots, dtype=dtype, device=device)
        # The step's state: static buffers (CUDA-graph inputs), changed in place by the step and the joins.
        self.tokens, self.pos, self.made = zeros(torch.long), zeros(torch.long), zeros(torch.long)
        self.limit, self.min_new = zeros(torch.long) + max_new, zeros(torch.long) + min_new
        self.finished = torch.ones(slots, dtype=torch.bool, device=device)  # a free slot counts as finished
        self.out = torch.full((slots, max_new), self.pad_id, dtype=torch.long, device=device)
        self.allowed = torch.zeros((slots, self.ring), dtype=torch.bool, device=device)
        self.at = torch.zeros((), dtype=torch.long, device=device)  # the ring position the next step writes
        self.at_host = 0
        for buf in (self.tokens, self.pos, self.made, self.limit, self.min_new, self.finished, self.out,
                    self.allowed, self.at):
            torch._dynamo.mark_static_address(buf)
        options = dict(compile_options or {})
        if "backend" not in options:
            options["backend"] = "inductor"
            if device.type == "cuda":
                options.setdefault("mode", "reduce-overhead")
        self._step = torch.compile(self._one_step, fullgraph=False, dynamic=False, **options)
        self.steps = 0  # decode steps run (benchmarks: steps per image)
        self.cache_kw = _cache_kwarg()

    # -- on the device

    def _one_step(self, cache, cache_kw: str) -> None:
        """One token for every slot; the state buffers change in place (no output: nothing to copy)."""
        self.allowed.index_fill_(1, self.at.view(1), True)  # this step's own position, in every row
        for layer in cache.layers:  # where StaticLayer.update writes this step's keys and values
            layer.cumulative_length.copy_(self.at)
        mask = self.allowed[:, None, None, :]
        out = self.model(input_ids=self.tokens[:, None], position_ids=self.pos[:, None], use_cache=True,
                         attention_mask={"full_attention": mask, "sliding_attention": mask}, **{cache_kw: cache})
        early = (self.made < self.min_new)[:, None]  # min new tokens: no stop token yet
        live = ~self.finished
        chosen = torch.where(live, greedy_tokens(out.logits[:, -1], self.is_stop, early), self.pad_id)
        column = self.made.clamp(max=self.max_new - 1)[:, None]
        self.out.scatter_(1, column, torch.where(live[:, None], chosen[:, None], self.out.gather(1, column)))
        self.made.add_(live.long())
        self.finished.copy_(self.finished | torch.isin(chosen, self.stop_ids) | (self.made >= self.limit))
        self.tokens.copy_(chosen)
        self.pos.add_(1)
        self.at.copy_((self.at + 1) % self.ring)

    def _join(self, chunk: Prefilled, slots: list[int]) -> None:
        """Chunk rows into free slots: their prompt's keys and values at the ring positions before `at`."""
        n, prompt = chunk.rows, chunk.mask.shape[1]
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        ring = (torch.arange(prompt, device=self.device) + (self.at_host - prompt)) % self.ring
        for layer, (keys, values) in zip(self.cache.layers, chunk.kv):
            if not layer.is_initialized:
                layer.lazy_initialization(keys.new_empty(self.slots, *keys.shape[1:]),
                                          values.new_empty(self.slots, *values.shape[1:]))
            layer.keys[rows[:, None], :, ring[None, :]] = stored(layer.keys, keys[:n].transpose(1, 2))
            layer.values[rows[:, None], :, ring[None, :]] = stored(layer.values, values[:n].transpose(1, 2))
        allowed = torch.zeros((n, self.ring), dtype=torch.bool, device=self.device)
        allowed[:, ring] = chunk.mask[:n].bool()
        self.allowed[rows] = allowed
        first = chunk.first[:n]
        self.tokens[rows] = first
        self.pos[rows] = chunk.mask[:n].long().sum(-1)  # generate's position of the first new token
        self.made[rows] = 1
        self.limit[rows] = self.max_new if chunk.limits is None else chunk.limits.to(self.device)
        self.out[rows] = self.pad_id
        self.out[rows, 0] = first
        self.finished[rows] = torch.isin(first, self.stop_ids) | (self.limit[rows] <= 1)

    # -- on the host

    @torch.inference_mode()  # (a caller outside it, as the benchmark: no autograd graph in the compiled step)
    def run(self, next_chunk: Callable[[bool], Prefilled | HandedBack | None], chunk_rows: int,
            should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """(tag, (rows, <= max_new) token ids on the host, pad after a stop) per chunk, as chunks finish;
        (tag, None) for a chunk handed back, as soon as it is.

        `next_chunk(wait)` prefills and returns the next chunk (at most `chunk_rows` rows), None when none is
        ready (wait=False) or when the input is over (wait=True). A stop request ends the run at the next step;
        unfinished chunks are not returned."""
        if self.cache.layers[0].is_initialized:  # a rerun: the previous run's rows are gone
            self.cache.reset()
        self.finished.fill_(True)
        self.allowed.zero_()
        free = list(range(self.slots))
        owner: dict[int, tuple[Any, int]] = {}  # slot -> (chunk tag, row in the chunk)
        waiting: dict[Any, list] = {}  # chunk tag -> its rows' tokens (None until the row finished)
        over = False
        while True:
            if self.steps % LOOK_EVERY == 0 or not owner:
                yield from self._collect(owner, free, waiting)
                while not over and len(free) >= chunk_rows:
                    chunk = next_chunk(not owner)
                    if chunk is None:
                        over = not owner  # waited for one and got none: the input is over
                        break
                    if isinstance(chunk, HandedBack):  # out now: held until a chunk finished, it kept its images
                        yield chunk.tag, None  # (with no row decoding, the whole rest of the input was read first)
                        continue
                    taken, free = free[:chunk.rows], free[chunk.rows:]
                    self._join(chunk, taken)
                    waiting[chunk.tag] = [None] * chunk.rows
                    owner.update({slot: (chunk.tag, i) for i, slot in enumerate(taken)})
                if not owner:
                    return
            if should_stop is not None and should_stop():
                return
            self._step(self.cache, self.cache_kw)
            self.steps += 1
            self.at_host = (self.at_host + 1) % self.ring

    def _collect(self, owner: dict, free: list[int], waiting: dict) -> Iterator[tuple[Any, torch.Tensor]]:
        """Copy out the rows that finished, free their slots, and yield the chunks now complete."""
        if not owner:
            return
        finished = self.finished.tolist()  # waits for the device
        done = [slot for slot in owner if finished[slot]]
        if not done:
            return
        index = torch.tensor(done, dtype=torch.long, device=self.device)
        tokens, made = self.out[index].cpu(), self.made[index].tolist()
        complete = []
        for j, slot in enumerate(done):
            tag, i = owner.pop(slot)
            waiting[tag][i] = tokens[j, :made[j]]
            free.append(slot)
            if all(row is not None for row in waiting[tag]):
                complete.append(tag)
        for tag in complete:
            rows = waiting.pop(tag)
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = row
            yield tag, ids


def _cache_kwarg() -> str:
    from .static_decode import _cache_kwarg_name

    return _cache_kwarg_name()


CHUNKS_PER_BATCH = 8  # a batch of slots refills in chunks of 1/8 of it (prefill efficiency vs idle slots)


def chunk_rows(slots: int) -> int:
    return max(1, -(-slots // CHUNKS_PER_BATCH))


@torch.inference_mode()
def prefill(cap, tag: Any, assembled, limits: torch.Tensor | None = None) -> Prefilled:
    """A captioner's assembly of a chunk -> its prefill: generate's own (vision tower, image-block masks,
    positions from the left padding) with one new token, into a dynamic full-attention cache."""
    from transformers import DynamicCache

    from .prefill_compile import eager_prefill_on_failure

    inputs = assembled.inputs
    prompt = inputs["input_ids"].shape[-1]
    if prompt + cap.gen_config.max_new_tokens > cap.static_decode.max_cache_len:
        raise ValueError(f"a chunk's prompts ({prompt} tokens) are longer than the decoding ring holds")

    def first_token():
        cache = DynamicCache(config=cap.static_decode.cache_config)
        return cap.model.generate(**inputs, generation_config=cap.first_token_config(),
                                  **{cap.static_decode.cache_name: cache}), cache

    out, cache = eager_prefill_on_failure(cap.model, first_token)  # (a fresh cache for a second try)
    return Prefilled(tag, assembled.rows, out[:, -1].contiguous(), inputs["attention_mask"],
                     [(layer.keys, layer.values) for layer in cache.layers], limits)


@torch.inference_mode()
def decoder_for(cap, slots: int) -> ContinuousDecode:
    """The captioner's decoder for `slots` rows (one ring cache each, kept for the run)."""
    decoder = cap.continuous.get(slots)
    if decoder is None:
        ring = cap.static_decode.new_cache()
        decoder = cap.continuous[slots] = ContinuousDecode(
            cap.model, ring, slots=slots, stop_ids=cap.stop_ids, pad_id=cap.pad_id,
            max_new=cap.gen_config.max_new_tokens, min_new=cap.gen_config.min_new_tokens or 0,
            compile_options=cap.graph_decode_options)
    return decoder


@torch.inference_mode()
def stream_captions(cap, next_chunk: Callable[[bool], tuple[Any, Any] | None], slots: int,
                    should_stop: Callable[[], bool] | None = None):
    """Captioner.caption_stream: (tag, captions decoded on first access) per chunk, as chunks finish; (tag, None)
    for a chunk handed back: its templated prompts outgrow the ring (sized by UTF-8 bytes, a proxy for tokens),
    batches decode it with the dynamic cache, the stream goes on."""
    from .decode_loop import DecodeLater

    def prefilled(wait: bool) -> Prefilled | HandedBack | None:
        got = next_chunk(wait)
        if got is None:
            return None
        if cap.static_decode.fits(got[1].inputs["input_ids"].shape[-1], cap.gen_config.max_new_tokens):
            return prefill(cap, *got)
        return HandedBack(got[0])

    decoder = decoder_for(cap, slots)
    try:
        for tag, ids in decoder.run(prefilled, chunk_rows(slots), should_stop):
            yield tag, None if ids is None else DecodeLater(ids, cap._finish)
    except BaseException as e:
        cap.continuous.pop(slots, None)  # its ring cache: the batches that take over need the memory
        if isinstance(e, Exception):  # (not a stop) what run_summary says of it: the rest went in batches
            cap.continuous_failed[slots] = {"decode_steps": decoder.steps,
                                            "fell_back_to_batches": brief(described(e))}
        raise
