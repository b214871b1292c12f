"""Decode attention without repeat_kv (vlm_caption/grouped_attention.py): the same attention as transformers'
sdpa, term by term, and the same greedy tokens on the tiny Gemma 3 (2 query heads on 1 KV head)."""
from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import pytest
import torch
import transformers.integrations.sdpa_attention as sdpa_module

from test_static_decode import CAPTURED, captioner, counting_backend, images, model_and_processor  # noqa: F401
from test_decode_loop import token_ids
import vlm_caption.grouped_attention as grouped_module
from vlm_caption.grouped_attention import (ATTENTION_NAME, AUTO_ATTENTION_NAME, FLEX_ATTENTION_NAME,
                                           decode_attention_kernel, describe_decode_attention,
                                           grouped_auto_attention, grouped_flex_attention,
                                           grouped_sdpa_attention, set_grouped_decode_attention, wants_flex)
from vlm_caption.config import RunConfig
from vlm_caption.errors import UsageError
from vlm_caption.model_loading import load_model


def attention_inputs(batch=3, heads=8, kv_heads=4, q_len=1, keys=11, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, dim, generator=g) for h, n in ((heads, q_len), (kv_heads, keys),
                                                                       (kv_heads, keys)))
    mask = torch.rand(batch, 1, q_len, keys, generator=g) > 0.3
    mask[..., -1] = True  # every query sees at least one key
    return SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True), q, k, v, mask


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("kernel", [grouped_sdpa_attention, grouped_flex_attention])
def test_one_query_token_is_the_same_attention_as_sdpa(with_mask, kernel):
    module, q, k, v, mask = attention_inputs(keys=11 if kernel is grouped_sdpa_attention else 300)  # 3 flex blocks
    if kernel is grouped_flex_attention:  # whole blocks masked: a left padding past a block, the unwritten end
        mask[0, ..., :140] = False
        mask[1, ..., 256:] = False
    mask = mask if with_mask else None
    # (not 0.25 = 1/sqrt(16), the default: a scale dropped on the way would go unseen)
    want, _ = sdpa_module.sdpa_attention_forward(module, q, k, v, mask, scaling=0.1)
    got, _ = kernel(module, q, k, v, mask, scaling=0.1)
    assert got.shape == want.shape == (3, 1, 8, 16)  # (batch, q_len, heads, dim), as transformers returns
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["prompt", "per_head_mask", "softcap"])
@pytest.mark.parametrize("kernel", [grouped_sdpa_attention, grouped_flex_attention])
def test_anything_else_goes_to_transformers_sdpa(case, kernel, monkeypatch):
    module, q, k, v, mask = attention_inputs(q_len=5 if case == "prompt" else 1)
    kwargs = {"softcap": 50.0} if case == "softcap" else {}
    if case == "per_head_mask":
        mask = mask.expand(-1, 8, -1, -1)
    calls = []
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward",
                        lambda *a, **kw: calls.append(kw) or ("delegated", None))
    assert kernel(module, q, k, v, mask, scaling=0.25, **kwargs) == ("delegated", None)
    assert calls and calls[0]["scaling"] == 0.25


def test_the_text_model_switches_and_the_vision_tower_stays(model_and_processor):
    model, _ = model_and_processor
    text, vision = model.config.get_text_config(decoder=True), model.config.vision_config
    assert set_grouped_decode_attention(model) is True
    assert text._attn_implementation == model.model.language_model.config._attn_implementation == ATTENTION_NAME
    assert vision._attn_implementation == "sdpa"
    assert set_grouped_decode_attention(model, on=False) is False and text._attn_implementation == "sdpa"
    assert set_grouped_decode_attention(model, "flex") is True and text._attn_implementation == FLEX_ATTENTION_NAME
    assert set_grouped_decode_attention(model, True) is True and text._attn_implementation == ATTENTION_NAME
    assert set_grouped_decode_attention(model, "auto") is True and text._attn_implementation == AUTO_ATTENTION_NAME
    assert decode_attention_kernel(model) == "auto"
    with pytest.raises(ValueError, match="flex"):
        set_grouped_decode_attention(model, "flesh")
    set_grouped_decode_attention(model, False)
    assert decode_attention_kernel(model) == "sdpa_repeat_kv"


def test_without_flex_attention_auto_is_sdpa_and_flex_is_refused(model_and_processor, monkeypatch):
    """torch 2.4 (requirements allow it) has no FlexAttention, and early ones lack what the kernel calls: auto
    must still run, flex must say why not."""
    model, _ = model_and_processor
    monkeypatch.setattr(grouped_module, "flex_available", lambda: False)
    assert set_grouped_decode_attention(model, "auto") is True and decode_attention_kernel(model) == "sdpa"
    with pytest.raises(ValueError, match="needs a torch whose FlexAttention takes enable_gqa"):
        set_grouped_decode_attention(model, "flex")
    # the CLI says so in one line before a model loads (exit 2), and auto goes on
    with pytest.raises(UsageError, match="--decode-attention flex needs a torch whose FlexAttention"):
        RunConfig(decode_attention="flex").validate()
    with pytest.raises(UsageError, match="--data-dir"):  # past the attention: the next check
        RunConfig(decode_attention="auto").validate()


def test_flex_available_asks_the_installed_torchs_signatures(monkeypatch):
    import torch.nn.attention.flex_attention as flex_module

    assert grouped_module.flex_available()  # this torch has what grouped_flex_attention calls
    monkeypatch.setattr(flex_module, "flex_attention", lambda query, key, value, score_mod=None, block_mask=None,
                        scale=None: None)  # a FlexAttention from before enable_gqa
    assert not grouped_module.flex_available()


@pytest.mark.parametrize("capability,kernel", [((9, 0), "auto"), ((10, 0), "auto"), ((8, 0), "sdpa"), ((7, 5), "sdpa")])
def test_auto_keeps_the_grouped_sdpa_on_cards_flex_was_not_measured_on(model_and_processor, monkeypatch,
                                                                       capability, kernel):
    """flex was timed on Hopper only; an A100, L4 or T4 (less shared memory for its head-dim-256 kernel) keeps
    the grouped sdpa under auto. (The tiny model stays on this CPU; its device is what the check is told.)"""
    model, _ = model_and_processor
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(grouped_module, "_device_of", lambda model: torch.device("cuda", 0))
    assert set_grouped_decode_attention(model, "auto") is True and decode_attention_kernel(model) == kernel
    assert set_grouped_decode_attention(model, "flex") is True and decode_attention_kernel(model) == "flex"
    set_grouped_decode_attention(model, False)


@pytest.mark.parametrize("rows,device,compiling,flex", [
    (256, "cuda", True, True), (128, "cuda", True, True),  # measured faster at 256 (run 4)
    (64, "cuda", True, False),  # measured slower at 64
    (256, "cpu", True, False), (256, "cuda", False, False)])  # flex is a compiled CUDA kernel
def test_auto_takes_flex_for_compiled_cuda_steps_of_many_rows(rows, device, compiling, flex):
    assert wants_flex(rows, device, compiling) is flex


def test_auto_runs_the_kernel_wants_flex_names(monkeypatch):
    module, q, k, v, mask = attention_inputs()
    for flex in (False, True):
        monkeypatch.setattr(grouped_module, "wants_flex", lambda rows, device, compiling, kv_fp8=False: flex)
        got, _ = grouped_auto_attention(module, q, k, v, mask, scaling=0.1)
        want, _ = (grouped_flex_attention if flex else grouped_sdpa_attention)(module, q, k, v, mask, scaling=0.1)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    calls = []
    monkeypatch.setattr(grouped_module, "grouped_flex_attention", lambda *a, **kw: calls.append(kw) or ("flex", None))
    assert grouped_auto_attention(module, q, k, v, mask, scaling=0.1) == ("flex", None)
    assert calls == [{"scaling": 0.1}]


def test_another_attention_implementation_is_left_alone(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), torch.device("cpu"), dtype="float32", attn_implementation="eager")
    assert set_grouped_decode_attention(model) is False
    assert model.config.get_text_config(decoder=True)._attn_implementation == "eager"


def count_repeat_kv(monkeypatch) -> list:
    calls = []
    real = sdpa_module.repeat_kv
    monkeypatch.setattr(sdpa_module, "repeat_kv", lambda x, n: calls.append(x.shape) or real(x, n))
    return calls


def test_same_greedy_tokens_on_every_decode_path_and_no_kv_copies_after_the_prompt(model_and_processor, images,
                                                                                   monkeypatch):
    model, processor = model_and_processor
    want = token_ids(captioner(model, processor, grouped_attention=False), images)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    calls = count_repeat_kv(monkeypatch)
    grouped = captioner(model, processor)
    assert grouped.grouped_attention
    assert token_ids(grouped, images) == want
    # 12 tokens: the prompt's forward copies K and V once per layer; the 11 decode steps copy nothing.
    assert len(calls) == 2 * layers
    compiled = {"compile": "on", "compile_options": {"backend": counting_backend}}
    assert token_ids(captioner(model, processor, **compiled), images) == want
    assert token_ids(captioner(model, processor, decode_loop="graph", **compiled), images) == want


def kv_copies_in(graph) -> int:
    """repeat_kv in a captured graph: an expand to 5 dims (batch, kv heads, groups, keys, dim)."""
    return sum(args.count(",") == 4 for args in re.findall(r"\.expand\(([^)]*)\)", graph.code))


def test_the_compiled_decode_step_has_no_kv_copy(model_and_processor, images):
    """Under torch.compile transformers' sdpa copies the cache per query head (5.24 skips its own grouping
    while compiling, 5.17 has none): the step this run's GPUs replay every token."""
    model, processor = model_and_processor
    compiled = {"compile": "on", "compile_options": {"backend": counting_backend}, "max_tokens": 4, "min_tokens": 4}
    copies = {}
    for grouped in (False, True):
        torch._dynamo.reset()
        CAPTURED.clear()
        token_ids(captioner(model, processor, grouped_attention=grouped, **compiled), images[:2])
        assert len(CAPTURED) == 1
        copies[grouped] = kv_copies_in(CAPTURED[0])
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    assert copies == {False: 2 * layers, True: 0}


def test_a_refused_switch_keeps_sdpa_and_warns(model_and_processor, monkeypatch, caplog):
    model, _ = model_and_processor

    def refuse(*args, **kwargs):
        raise ValueError("unknown attention implementation")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with caplog.at_level("WARNING"):
        assert set_grouped_decode_attention(model) is False
    assert model.config.get_text_config(decoder=True)._attn_implementation == "sdpa"
    assert "it stays sdpa" in caplog.text


def test_flex_gives_the_same_greedy_tokens_compiled(model_and_processor, images, monkeypatch):
    """FlexAttention (--decode-attention flex, auto's pick on a card) on the decode paths it runs on: generate's
    compiled step and the graph loop under inductor, the compiler a GPU uses (here its CPU backend), with
    the row mask changed in place between steps."""
    import torch.nn.attention.flex_attention as flex_module

    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, **fixed), images[:3])
    try:
        calls, real = [], flex_module.flex_attention
        spy = functools.wraps(real)(lambda *a, **kw: calls.append(1) or real(*a, **kw))  # (its signature kept)
        monkeypatch.setattr(flex_module, "flex_attention", spy)
        assert token_ids(captioner(model, processor, grouped_attention="flex", **fixed), images[:3]) == want
        assert len(calls) == 5 * model.config.get_text_config(decoder=True).num_hidden_layers  # each decode step
        monkeypatch.undo()
        generate = captioner(model, processor, grouped_attention="flex", compile="on",
                             compile_options={"backend": counting_backend}, **fixed)
        assert generate.grouped_attention and token_ids(generate, images[:3]) == want
        loop = captioner(model, processor, grouped_attention="flex", compile="on", decode_loop="graph", **fixed)
        assert token_ids(loop, images[:3]) == want
    finally:
        set_grouped_decode_attention(model, True)


def test_auto_puts_flex_in_the_compiled_step_only(model_and_processor, images, monkeypatch, caplog):
    """The default kernel with its device test waived (this CPU stands for the card): the compiled decode
    step traces FlexAttention and gives the grouped sdpa's greedy tokens; eager decode steps never take flex,
    and `wants_flex` is asked with the step's rows, device and compiling state."""
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, grouped_attention="sdpa", **fixed), images[:3])
    asked, flex_calls, real_flex = [], [], grouped_module.grouped_flex_attention
    monkeypatch.setattr(grouped_module, "wants_flex", lambda rows, device, compiling, kv_fp8=False:
                        asked.append((rows, device, compiling)) or compiling)
    monkeypatch.setattr(grouped_module, "grouped_flex_attention",
                        lambda *a, **kw: flex_calls.append(1) or real_flex(*a, **kw))
    with caplog.at_level("INFO", logger="vlm_caption"):
        eager = captioner(model, processor, **fixed)  # --compile off: one-token steps, eagerly
    assert "decode attention: the grouped sdpa (auto: FlexAttention only in compiled CUDA steps of 128+ rows)" \
        in caplog.text
    assert describe_decode_attention(model, "cuda", True) == \
        "auto: FlexAttention at batches of 128+ rows, the grouped sdpa below"
    assert token_ids(eager, images[:3]) == want and flex_calls == []
    steps = [args for args in asked if args[0] != 128]  # (128: the start log's description asks too)
    assert steps and set(steps) == {(3, "cpu", False)}  # each decode step's layers, 3 rows
    assert eager.decoding_report(3)["attention"] == "auto: sdpa"
    monkeypatch.undo()  # (a spy's side effects would split the traced step)
    # flex only for exactly the traced step's arguments: its 3 rows, on this CPU, compiling
    monkeypatch.setattr(grouped_module, "wants_flex",
                        lambda rows, device, compiling, kv_fp8=False: (rows, device, compiling) == (3, "cpu", True))
    CAPTURED.clear()
    cap = captioner(model, processor, compile="on", compile_options={"backend": counting_backend},
                    decode_loop="graph", **fixed)
    assert decode_attention_kernel(model) == "auto" and token_ids(cap, images[:3]) == want
    assert len(CAPTURED) == 1 and "flex_attention" in CAPTURED[0].code
    monkeypatch.undo()
    assert cap.decoding_report(256)["attention"] == "auto: sdpa"  # a CPU: no flex at any size


def test_a_batch_whose_flex_kernel_fails_is_decoded_again_with_the_grouped_sdpa(model_and_processor, images,
                                                                                monkeypatch, caplog):
    """A flex kernel that does not compile (a card, torch or Triton it was never run on: here a compiler that
    refuses any graph holding flex_attention) costs one retry of the batch, not the run: the same greedy
    tokens, a warning, and the grouped sdpa for the rest of the run."""
    model, processor = model_and_processor
    fixed = {"max_tokens": 6, "min_tokens": 6}
    want = token_ids(captioner(model, processor, grouped_attention="sdpa", **fixed), images[:3])
    monkeypatch.setattr(grouped_module, "wants_flex", lambda rows, device, compiling, kv_fp8=False: compiling)
    refused = []

    def no_flex_backend(gm, example_inputs):
        if "flex_attention" in gm.code:
            refused.append(1)
            raise RuntimeError("triton: out of resource: shared memory, required: 264192")
        return gm.forward

    cap = captioner(model, processor, compile="on", compile_options={"backend": no_flex_backend},
                    decode_loop="graph", **fixed)
    with caplog.at_level("WARNING"):
        assert token_ids(cap, images[:3]) == want
    assert refused and decode_attention_kernel(model) == "sdpa"
    assert "failed with FlexAttention" in caplog.text and "out of resource" in caplog.text
    assert token_ids(cap, images[:3]) == want and len(refused) == 1  # later batches: no flex, no retry
    assert cap.decoding_report(3)["attention"] == "sdpa"
