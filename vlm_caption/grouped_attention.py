"""Decode-step attention that reads each key/value head once (grouped-query attention without `repeat_kv`).

Why: Gemma 3 has fewer key/value heads than query heads (4B: 8 query heads on 4 KV heads). transformers'
SDPA attention, given a mask (there always is one: left padding), copies every cached key and value
`num_key_value_groups` times (`repeat_kv`) before calling `scaled_dot_product_attention`, on every layer
of every decode step: transformers 5.17 always, 5.24 still under `torch.compile` (its `pack_gqa` is
skipped while compiling). With the static cache that copy covers the whole cache buffer. For the 4B model
at batch 128 and a 536-token cache a step then moves ~24 GB through memory for attention instead of ~5 GB
(read K/V, write them twice over, read the copies): ~6 ms a step on an H100 at 3.35 TB/s.

For one query token the query heads that share a KV head can instead be laid out as that head's query
rows: (batch, heads, 1, dim) -> (batch, kv_heads, groups, dim). The mask, (batch, 1, 1, keys), is the same
for every head and broadcasts over the rows. That is the same attention, term by term. Anything else (a
prompt, a per-head mask, softcapping) goes to transformers' own function unchanged.

Installed under its own name (`ATTENTION_NAME`) on the text model only: the vision tower keeps "sdpa",
masks are built as for "sdpa", nothing global is replaced.

The same step can also run on FlexAttention (`grouped_flex_attention`), whose kernel reads only the cache
blocks the mask leaves readable. On an H100 (BENCHMARKS.md §6 run 4, compiled, bf16, one layer, 536 slots)
it took 0.255 ms at batch 256 against 0.369 for the grouped sdpa (whose default kernel read the cache at
45 % of the card's bandwidth), a whole batch of 256 at 200 tokens ran 1.10x; at batch 64 it lost (0.245 vs
0.201 ms: flex's time hardly grows with the batch). So "auto", the default, picks per compiled step:
flex on CUDA while compiling for `FLEX_MIN_ROWS` rows or more, the grouped sdpa otherwise (eager steps
too: flex is a compiled kernel); on a card older than Hopper, where flex is untimed, always the grouped sdpa.
A batch that fails while flex may be in use turns it off for the rest of the run (give_up_flex).

An fp8 cache's keys and values (--kv-cache-dtype fp8, kv_fp8.py) go to flex as they are in a compiled CUDA step
(its kernel converts each block as it loads it); every other path here converts them first (readable_kv).
"""
from __future__ import annotations

import logging

import torch

from .kv_fp8 import FP8, flex_reads_fp8, readable_kv

log = logging.getLogger(__name__)

ATTENTION_NAME = "vlm_caption_grouped_sdpa"
FLEX_ATTENTION_NAME = "vlm_caption_grouped_flex"
AUTO_ATTENTION_NAME = "vlm_caption_grouped_auto"
FLEX_BLOCK = 128  # cache slots per FlexAttention block
# Rows from which "auto" takes flex: run 4 measured flex 1.45x faster at 256 rows and 1.22x slower at 64;
# the straight line through the two points crosses near 128 (unmeasured between).
FLEX_MIN_ROWS = 128
# Cards where "auto" may take flex: Hopper (H100, H200), where it was measured. On others its Triton kernel
# at head dim 256 (4B, 12B) is untimed and may not fit a smaller shared memory: they keep the grouped sdpa.
FLEX_MIN_CAPABILITY = (9, 0)


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (batch, heads, q_len, dim) in, ((batch, q_len, heads,
    dim), None) out. One query token with a head-shared mask: grouped; anything else: transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value = readable_kv(module, query, key, value)  # an fp8 cache's, converted (kv_fp8.py)
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    batch, heads, q_len, dim = query.shape
    if not _one_token_shared_mask(query, key, attention_mask, groups, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Query head h uses KV head h // groups (as repeat_kv lays them out): its row h % groups of that head.
    rows = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _one_token_shared_mask(query, key, attention_mask, groups: int, kwargs) -> bool:
    """A decode step the grouped kernels take: one query token, query heads on fewer KV heads, a mask the
    same for every head, no softcapping or position bias (anything else: transformers' sdpa)."""
    heads, q_len = query.shape[1], query.shape[2]
    shared_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1
                                             and attention_mask.shape[-1] == key.shape[-2])
    return (groups > 1 and q_len == 1 and shared_mask and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and key.shape[1] * groups == heads)


def grouped_flex_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """As `grouped_sdpa_attention`, with FlexAttention for the decode step. The blocks to read come from this
    call's mask and each is partial (the row mask is read inside the kernel), so a mask changed in place
    between steps (the graph loop's) holds, and blocks no row slot of which is readable are skipped."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if dropout or not _one_token_shared_mask(query, key, attention_mask, groups, kwargs):
        key, value = readable_kv(module, query, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if not (key.dtype == FP8 and flex_reads_fp8(query)):  # else the kernel converts each block as it loads it
        key, value = readable_kv(module, query, key, value)
    block_mask = None
    if attention_mask is not None:
        row = attention_mask[:, 0, 0, :]
        allowed = row if row.dtype == torch.bool else row == 0  # an additive mask: 0 where allowed
        batch, slots = allowed.shape
        blocks = -(-slots // FLEX_BLOCK)
        # Each row's blocks with a slot it may read, first, in order: the kernel skips the rest (the cache's
        # unwritten end, a long left padding). Computed on the device from the mask of this step.
        live = torch.nn.functional.pad(allowed, (0, blocks * FLEX_BLOCK - slots)).view(batch, blocks, FLEX_BLOCK)
        live = live.any(-1)
        counts = live.sum(-1, dtype=torch.int32).view(batch, 1, 1)
        indices = torch.argsort((~live).to(torch.int8), dim=-1, stable=True).to(torch.int32).view(batch, 1, 1, blocks)

        def row_mask(b, h, q_idx, kv_idx):
            return allowed[b, kv_idx]

        block_mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=row_mask,
                                              seq_lengths=(1, slots))
    out = flex_attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def wants_flex(rows: int, device_type: str, compiling: bool, kv_fp8: bool = False) -> bool:
    """The "auto" kernel's choice for a decode step of `rows` rows: flex where it was measured faster, and at any
    rows for an fp8 cache (`kv_fp8`), which flex reads as it is where the grouped sdpa converts it first."""
    return compiling and device_type == "cuda" and (rows >= FLEX_MIN_ROWS or kv_fp8)


def grouped_auto_attention(module, query, key, value, attention_mask, **kwargs):
    """"auto": `grouped_flex_attention` or `grouped_sdpa_attention` by `wants_flex`. Under torch.compile the
    choice is made once per traced shape (the rows and the device are static there), so it costs a step
    nothing. A prompt (more than one query token) goes to sdpa before the rows are looked at: the compiled
    prefill's batch is dynamic, and a test of it would split its graph at FLEX_MIN_ROWS."""
    if query.shape[2] == 1 and wants_flex(query.shape[0], query.device.type, torch.compiler.is_compiling(),
                                          key.dtype == FP8):
        return grouped_flex_attention(module, query, key, value, attention_mask, **kwargs)
    return grouped_sdpa_attention(module, query, key, value, attention_mask, **kwargs)


KERNELS = {"auto": (AUTO_ATTENTION_NAME, grouped_auto_attention), "sdpa": (ATTENTION_NAME, grouped_sdpa_attention),
           "flex": (FLEX_ATTENTION_NAME, grouped_flex_attention)}


FLEX_NEEDS = "a torch whose FlexAttention takes enable_gqa and BlockMask.from_kv_blocks(seq_lengths=)"


def flex_available() -> bool:
    """FlexAttention as grouped_flex_attention calls it (FLEX_NEEDS), asked of the installed torch's own
    signatures rather than its version (requirements allow torch 2.4, which has no FlexAttention)."""
    import inspect

    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return False
    from_kv_blocks = getattr(BlockMask, "from_kv_blocks", None)
    return (from_kv_blocks is not None and "seq_lengths" in inspect.signature(from_kv_blocks).parameters
            and "enable_gqa" in inspect.signature(flex_attention).parameters)


def decode_attention_kernel(model) -> str:
    """The grouped kernel the text model of `model` decodes with ("auto", "sdpa", "flex"), else its own
    attention implementation's name (eager, flash_attention_2, or sdpa with repeat_kv: "sdpa_repeat_kv")."""
    current = getattr(model.config.get_text_config(decoder=True), "_attn_implementation", None)
    for kernel, (name, _) in KERNELS.items():
        if current == name:
            return kernel
    return "sdpa_repeat_kv" if current == "sdpa" else str(current)


def describe_decode_attention(model, device_type: str, compiled: bool) -> str:
    """One line for the log: the decode attention of `model` on this device, and for "auto" when it takes which
    kernel (`compiled`: the decode step is compiled)."""
    kernel = decode_attention_kernel(model)
    if kernel == "auto":
        if wants_flex(FLEX_MIN_ROWS, device_type, compiled):
            return f"auto: FlexAttention at batches of {FLEX_MIN_ROWS}+ rows, the grouped sdpa below"
        return f"the grouped sdpa (auto: FlexAttention only in compiled CUDA steps of {FLEX_MIN_ROWS}+ rows)"
    return {"sdpa": "the grouped sdpa (each KV head read once)", "flex": "FlexAttention (each KV head read once)",
            "sdpa_repeat_kv": "transformers' sdpa (the KV cache copied per query head)"}.get(kernel, kernel)


def set_grouped_decode_attention(model, on: bool | str = True) -> bool:
    """Switch the text model of `model` between "sdpa" and a grouped decode attention (on: "auto", "sdpa"
    (also True), "flex"; False: transformers' sdpa); True when it now uses a grouped one. Nothing changes when
    the text model was loaded with another implementation (eager, flash) or has as many KV heads as query
    heads. "flex" without a FlexAttention it can use (flex_available) is refused; "auto" then means "sdpa", as it
    does on a CUDA card older than Hopper (flex_measured_on)."""
    text = model.config.get_text_config(decoder=True)
    current = getattr(text, "_attn_implementation", None)
    heads, kv_heads = getattr(text, "num_attention_heads", 1), getattr(text, "num_key_value_heads", None)
    names = [name for name, _ in KERNELS.values()]
    if current not in ("sdpa", *names) or not kv_heads or heads == kv_heads:
        return False
    kernel = "sdpa" if on is True else on
    if kernel and kernel not in KERNELS:
        raise ValueError(f"grouped attention kernel must be one of {', '.join(KERNELS)}, got {on!r}")
    if kernel in ("auto", "flex") and not flex_available():
        if kernel == "flex":
            raise ValueError(f"the flex decode attention needs {FLEX_NEEDS} (this is torch {torch.__version__})")
        kernel = "sdpa"
    if kernel == "auto" and not flex_measured_on(_device_of(model)):
        kernel = "sdpa"
    wanted = KERNELS[kernel][0] if kernel else "sdpa"
    if current == wanted:
        return bool(kernel)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, registered in KERNELS.values():
        AttentionInterface.register(name, registered)
        AttentionMaskInterface.register(name, sdpa_mask)  # masks exactly as for "sdpa"
    key = _text_config_key(model.config, text)
    try:
        model.set_attn_implementation({key: wanted} if key else wanted)
    except (ValueError, AttributeError) as e:  # a transformers whose checks refuse a registered name
        log.warning("could not switch the text model's attention to %s (%s); it stays %s", wanted, e, current)
        return current in names
    if text._attn_implementation != wanted:
        log.warning("could not switch the text model's attention to %s; it stays %s", wanted, current)
    return text._attn_implementation in names


def may_use_flex(model, rows: int, device_type: str, compiled: bool, kv_fp8: bool = False) -> bool:
    """Whether a decode step of `rows` rows of `model` may have run FlexAttention (--decode-attention flex, or
    auto where wants_flex takes it; `kv_fp8`: its cache is float8)."""
    kernel = decode_attention_kernel(model)
    return kernel == "flex" or (kernel == "auto" and wants_flex(rows, device_type, compiled, kv_fp8))


def give_up_flex(model, error: BaseException) -> None:
    """A batch that may have run FlexAttention failed: the rest of the run decodes with the grouped sdpa, the
    kernel earlier versions used, so a flex kernel that does not compile on some card, torch or Triton costs
    one batch's retry, not the run (Captioner tries the batch once more at once)."""
    from .errors import described

    cause = getattr(error, "inner_exception", None) or error  # dynamo's BackendCompilerFailed wraps the compiler's
    log.warning("decode: a batch failed with FlexAttention as its decode attention (%s); decoding with the grouped "
                "sdpa from now on (--decode-attention sdpa skips flex from the start)", described(cause))
    set_grouped_decode_attention(model, "sdpa")


def flex_measured_on(device: torch.device) -> bool:
    """Whether "auto" may take flex for a model on `device`: any but a CUDA card older than Hopper (a CPU keeps
    "auto", which takes the grouped sdpa there: wants_flex)."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= FLEX_MIN_CAPABILITY


def _device_of(model) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _text_config_key(config, text) -> str | None:
    """The sub-config name of the text model in a composite config (Gemma 3: "text_config"), None when the
    config is the text model's own."""
    for name in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, name, None) is text:
            return name
    return None
