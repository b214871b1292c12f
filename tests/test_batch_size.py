"""auto_batch_size on the real Gemma 3 configs (tiny_model's real-size presets; nothing is allocated)."""
from __future__ import annotations

import pytest

from vlm_caption.batch_size import auto_batch_size, free_device_memory, kv_cache_bytes_per_row, parameter_bytes, row_memory

GB = 10**9


@pytest.fixture(scope="module")
def configs():
    from vlm_caption.tiny_model import build_config, build_tokenizer

    tokenizer = build_tokenizer()
    return {p: build_config(p, tokenizer) for p in ("gemma-3-4b", "gemma-3-12b", "gemma-3-27b")}


def test_kv_cache_per_row_by_hand(configs):
    cfg = configs["gemma-3-4b"]  # 34 layers (5 of 6 sliding), 4 KV heads x 256, window 1024
    per_token_layer = 2 * 4 * 256 * 2
    assert kv_cache_bytes_per_row(cfg, 520, 2) == 34 * 520 * per_token_layer
    assert kv_cache_bytes_per_row(cfg, 520, 2, static_full_attention=True) == 34 * 520 * per_token_layer
    sliding = cfg.text_config.layer_types.count("sliding_attention")
    assert sliding == 29
    long = kv_cache_bytes_per_row(cfg, 4000, 2)  # sliding layers stop at the window
    assert long == (sliding * 1024 + (34 - sliding) * 4000) * per_token_layer
    assert kv_cache_bytes_per_row(cfg, 4000, 2, static_full_attention=True) == 34 * 4000 * per_token_layer


def test_weights_of_the_real_sizes(configs):
    billions = {p: parameter_bytes(c, 1) / 1e9 for p, c in configs.items()}
    assert 4.2 < billions["gemma-3-4b"] < 4.4 and 12.0 < billions["gemma-3-12b"] < 12.4
    assert 27.0 < billions["gemma-3-27b"] < 27.8


def test_picks_on_an_80_gb_card_at_200_new_tokens(configs, capsys):
    seq = 256 + 64 + 200
    picks = {}
    for preset, cfg in configs.items():
        weights = parameter_bytes(cfg, 2)
        picks[preset] = auto_batch_size(cfg, 80 * GB, weights, seq, 2, cap=1024, static_full_attention=True)
        per_row = row_memory(cfg, seq, 2, static_full_attention=True)
        with capsys.disabled():
            print(f"\n{preset}: weights {weights / GB:.1f} GB, per row {per_row.total / 1e6:.0f} MB "
                  f"(KV {per_row.kv_cache / 1e6:.0f}, vision {per_row.vision / 1e6:.0f}) -> batch {picks[preset]}")
    assert picks == {"gemma-3-4b": 256, "gemma-3-12b": 128, "gemma-3-27b": 32}
    assert auto_batch_size(configs["gemma-3-4b"], 80 * GB, parameter_bytes(configs["gemma-3-4b"], 2), seq, 2) == 256


def test_powers_of_two_monotone_and_bounded(configs):
    cfg = configs["gemma-3-4b"]
    weights = 8.6 * GB
    sizes = [auto_batch_size(cfg, free * GB, weights, 520, 2, cap=4096) for free in (12, 16, 24, 40, 80, 141)]
    assert sizes == sorted(sizes) and all(s & (s - 1) == 0 for s in sizes)
    assert auto_batch_size(cfg, 80 * GB, weights, 520, 2, cap=48) == 32  # the cap rounds down too
    assert auto_batch_size(cfg, 8 * GB, weights, 520, 2) == 1  # nothing fits: 1, and the OOM back-off decides
    # Longer captions, sampling and stored attention scores all cost memory.
    base = row_memory(cfg, 520, 2).total
    assert row_memory(cfg, 1320, 2).total > base and row_memory(cfg, 520, 2, sampling=True).total > base
    assert row_memory(cfg, 520, 2, vision_scores=True).vision > 5 * row_memory(cfg, 520, 2).vision
    assert auto_batch_size(cfg, 80 * GB, weights, 520, 2, cap=4096, vision_scores=True) < sizes[4]
    with pytest.raises(ValueError):
        auto_batch_size(cfg, 40 * GB, weights, 0, 2)


def test_free_device_memory_on_cpu():
    assert free_device_memory("cpu") > 0


def test_free_cuda_memory_counts_what_torch_holds_unused(monkeypatch):
    """Memory torch's caching allocator reserved but no tensor uses is free to the next batch, not used."""
    import torch

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 9 * gib)
    assert free_device_memory("cuda:0") == 13 * gib


def test_peak_memory_is_torch_s_count_against_the_card_s_and_said_at_the_end(monkeypatch, capsys):
    """run_summary.json's decoding on a GPU: the peak tensors held and the card's size (a run at --batch-size
    auto shows the room its batch left); the end of the run says it in a line. Nothing on a CPU."""
    import types
    from pathlib import Path

    import torch

    from vlm_caption.batch_size import peak_device_memory
    from vlm_caption.endings import print_summary

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: int(61.25 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=int(79.19 * gib)))
    decoding = {"batch_size": 512, **peak_device_memory("cuda:0")}
    assert decoding == {"batch_size": 512, "peak_memory_gib": 61.25, "device_memory_gib": 79.19}
    assert peak_device_memory("cpu") == {}
    this = {"captioned": 1024, "wall_s": 60.0, "img_per_s": 17.1, "tokens_per_s": 3400, "failed_by_stage": {},
            "skipped_already_done": 0, "decoding": decoding}
    print_summary({"this_run": this}, Path("ckpt"), 0)
    assert "GPU memory: peak 61.2 of 79.2 GiB at batch size 512" in capsys.readouterr().out.splitlines()


def test_a_library_s_failed_allocation_counts_as_out_of_memory():
    """cuBLAS / cuDNN report a full card in their own words; the back-off must halve the batch for them too
    (else every row is retried alone, each a new batch shape to compile)."""
    import torch

    from vlm_caption.batch_size import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(ValueError("Image features and image tokens do not match"))
