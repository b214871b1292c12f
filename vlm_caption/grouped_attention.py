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
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ATTENTION_NAME = "vlm_caption_grouped_sdpa"


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (batch, heads, q_len, dim) in, ((batch, q_len, heads,
    dim), None) out. One query token with a head-shared mask: grouped; anything else: transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    batch, heads, q_len, dim = query.shape
    shared_mask = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    if (groups == 1 or q_len != 1 or not shared_mask or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or key.shape[1] * groups != heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Query head h uses KV head h // groups (as repeat_kv lays them out): its row h % groups of that head.
    rows = query.reshape(batch, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def set_grouped_decode_attention(model, on: bool = True) -> bool:
    """Switch the text model of `model` between "sdpa" and the grouped decode attention; True when it now
    uses the grouped one. Nothing changes when the text model was loaded with another implementation
    (eager, flash), has as many KV heads as query heads, or this transformers has no attention registry."""
    text = model.config.get_text_config(decoder=True)
    current = getattr(text, "_attn_implementation", None)
    heads, kv_heads = getattr(text, "num_attention_heads", 1), getattr(text, "num_key_value_heads", None)
    if current not in ("sdpa", ATTENTION_NAME) or not kv_heads or heads == kv_heads:
        return False
    wanted = ATTENTION_NAME if on else "sdpa"
    if current == wanted:
        return on
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers without the registries: keep sdpa
        return False
    AttentionInterface.register(ATTENTION_NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # masks exactly as for "sdpa"
    key = _text_config_key(model.config, text)
    try:
        model.set_attn_implementation({key: wanted} if key else wanted)
    except (ValueError, AttributeError) as e:  # a transformers whose checks refuse a registered name
        log.warning("could not switch the text model's attention to %s (%s); it stays %s", wanted, e, current)
        return current == ATTENTION_NAME
    if text._attn_implementation != wanted:
        log.warning("could not switch the text model's attention to %s; it stays %s", wanted, current)
    return text._attn_implementation == ATTENTION_NAME


def _text_config_key(config, text) -> str | None:
    """The sub-config name of the text model in a composite config (Gemma 3: "text_config"), None when the
    config is the text model's own."""
    for name in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, name, None) is text:
            return name
    return None
