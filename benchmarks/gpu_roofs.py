"""Arithmetic from a Gemma 3 config for the GPU check: FLOP per image, bytes a decode step reads, and the
best-case img/s a card allows (compute and bandwidth roofs). No torch needed, no device."""
from __future__ import annotations

# Dense bf16 FLOP/s and memory bandwidth (bytes/s) by card name; the first match wins (specific names first).
CARDS = [("H200", 989e12, 4.8e12), ("H100 NVL", 835e12, 3.9e12), ("H100 PCIe", 756e12, 2.0e12),
         ("H100", 989e12, 3.35e12), ("A100", 312e12, 2.0e12), ("L40S", 362e12, 0.864e12), ("A10", 125e12, 0.6e12)]


def flop_per_image(config, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """FLOP (2 per multiply-add) of one image: SigLIP linear + attention, prefill, decode. Attention counts
    the keys a query really uses (all patches for SigLIP; the tokens so far for the language model)."""
    v, t = config.vision_config, config.get_text_config(decoder=True)
    patches = (v.image_size // v.patch_size) ** 2
    h, inter = v.hidden_size, v.intermediate_size
    patch_embed = 2 * patches * (v.num_channels * v.patch_size**2) * h
    vision_linear = 2 * patches * v.num_hidden_layers * (4 * h * h + 2 * h * inter) + patch_embed
    vision_attention = 2 * 2 * patches * patches * h * v.num_hidden_layers  # QK^T and AV, every head
    image_tokens = int(config.mm_tokens_per_image)
    projector = 2 * image_tokens * h * t.hidden_size
    head_dim = t.head_dim
    q_width, kv_width = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    per_layer = t.hidden_size * (2 * q_width + 2 * kv_width) + 3 * t.hidden_size * t.intermediate_size
    body = per_layer * t.num_hidden_layers  # multiply-adds per token, embeddings excluded
    lm_head = t.hidden_size * t.vocab_size

    def attention(queries_from: int, queries_to: int) -> float:  # QK^T + AV for queries at these positions
        return sum(2 * 2 * (pos + 1) * q_width * t.num_hidden_layers for pos in range(queries_from, queries_to))

    prefill = 2 * body * prompt_tokens + 2 * lm_head + attention(0, prompt_tokens)  # logits of the last only
    decode = (2 * (body + lm_head) * new_tokens + attention(prompt_tokens, prompt_tokens + new_tokens))
    out = {"vision_linear": vision_linear, "vision_attention": vision_attention, "projector": projector,
           "prefill": prefill, "decode": decode}
    out["total"] = sum(out.values())
    return {k: float(f"{x:.4g}") for k, x in out.items()}


def text_weight_bytes(config, dtype_bytes: int) -> int:
    """Bytes a decode step reads for weights: every decoder layer + the (tied) LM head, once per step."""
    t = config.get_text_config(decoder=True)
    q_width, kv_width = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (2 * q_width + 2 * kv_width) + 3 * t.hidden_size * t.intermediate_size
    return (per_layer * t.num_hidden_layers + t.hidden_size * t.vocab_size) * dtype_bytes


def roofs(config, prompt_tokens: int, new_tokens: int, batch: int, peak_flops: float, bandwidth: float,
          dtype_bytes: int = 2) -> dict[str, float]:
    """Best-case img/s of a batch: vision + prefill at the compute roof, then each decode step at the slower
    of compute and bandwidth (it reads the text weights once and each row's KV cache so far)."""
    from vlm_caption.batch_size import kv_cache_bytes_per_row

    flop = flop_per_image(config, prompt_tokens, new_tokens)
    front = batch * (flop["vision_linear"] + flop["vision_attention"] + flop["projector"] + flop["prefill"])
    weights = text_weight_bytes(config, dtype_bytes)
    decode_flop_step = flop["decode"] / new_tokens
    decode_s = bytes_total = 0.0
    for step in range(new_tokens):
        kv = kv_cache_bytes_per_row(config, prompt_tokens + step, dtype_bytes) * batch
        bytes_total += weights + kv
        decode_s += max(batch * decode_flop_step / peak_flops, (weights + kv) / bandwidth)
    seconds = front / peak_flops + decode_s
    return {"batch": batch, "roof_img_s": round(batch / seconds, 2),
            "compute_only_img_s": round(peak_flops / flop["total"], 2),
            "decode_bandwidth_img_s": round(batch / (bytes_total / bandwidth), 2),
            "decode_bytes_per_step_gb": round(bytes_total / new_tokens / 1e9, 3)}


def card_peaks(name: str, args) -> tuple[float | None, float | None, str]:
    match = next(((f, b, n) for n, f, b in CARDS if n.lower() in name.lower()), (None, None, ""))
    flops = args.peak_tflops * 1e12 if args.peak_tflops else match[0]
    bandwidth = args.peak_tbps * 1e12 if args.peak_tbps else match[1]
    source = "--peak-tflops/--peak-tbps" if args.peak_tflops or args.peak_tbps else (match[2] or "unknown card")
    return flops, bandwidth, source
