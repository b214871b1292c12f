"""--quantize fp8 (vlm_caption/fp8.py) on the CPU: an FP8 linear layer against its bf16 / fp32 original, which
layers a choice quantizes and which it keeps, the same tokens compiled as eager with no graph break, a card
without FP8 refused in one line, and a run that records its FP8 weights (run id, run.json, card, summary)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from test_decode_loop import token_ids
from test_static_decode import (CAPTURED, PREFILL_CAPTURED, VISION_CAPTURED, captioner,  # noqa: F401
                                counting_backend, images, model_and_processor)
from vlm_caption.fp8 import FP8, QUANTIZED_PARTS, Fp8Linear, fp8_layers, fp8_problem, quantize_fp8


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.usefixtures("cpu_fp8_gemm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_linear_is_its_linear_within_fp8_rounding(dtype):
    """Weights and activations rounded to e4m3 (3 mantissa bits): a few per cent off over the whole output,
    every shape and the bias kept, the output in the input's dtype, the weights 1 byte each."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True).to(dtype)
    x = torch.randn(3, 7, 128, dtype=dtype)
    fp8 = Fp8Linear(linear)
    assert fp8.weight.dtype == FP8 and fp8.weight.shape == (96, 128) and fp8.weight_scale.shape == (1, 96)
    with torch.inference_mode():
        want, got = linear(x), fp8(x)
    assert got.shape == want.shape == (3, 7, 96) and got.dtype == dtype
    assert relative_error(got, want) < 0.06
    assert relative_error(fp8(torch.zeros(2, 128, dtype=dtype)), linear.bias.expand(2, 96)) < 1e-6  # no NaN


@pytest.mark.usefixtures("cpu_fp8_gemm")
def test_eager_an_fp8_linear_makes_no_float32_copy_of_its_input():
    """--compile off (or a compiled part given up): a float32 copy of SigLIP's activations at batch 256 would be
    ~5 GB beside the bf16 ones. Every tensor the forward makes is the input's size in bf16 or FP8, or one
    float32 value per row (the scales)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made: list[tuple[torch.dtype, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend((t.dtype, t.numel()) for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor))
            return out

    fp8 = Fp8Linear(nn.Linear(128, 96, dtype=torch.bfloat16))
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    with torch.inference_mode(), Record():
        fp8(x)
    assert made and all(numel <= 64 for dtype, numel in made if dtype == torch.float32), made


@pytest.mark.usefixtures("cpu_fp8_gemm")
def test_each_token_has_its_own_scale_so_an_outlier_row_costs_the_others_nothing():
    """Row-wise activation scales: one token 1,000x larger (Gemma's massive activations) leaves the precision
    of the other rows as it was; one scale for the whole tensor would round them to nothing."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)
    x[0] *= 1000
    with torch.inference_mode():
        want, got = linear(x), Fp8Linear(linear)(x)
    assert relative_error(got[1:], want[1:]) < 0.06
    assert relative_error(got[:1], want[:1]) < 0.06


def test_fp8_quantizes_the_towers_and_language_models_linear_layers_and_nothing_else(model_and_processor):
    """lm_head (the logits, tied to the embeddings), the embeddings, the norms and the projector's bare weight
    stay as they were; model.parameters() keeps its dtype (the captioner reads the model's dtype from it)."""
    model, _ = model_and_processor
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    report = quantize_fp8(model, QUANTIZED_PARTS["fp8"])
    quantized = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert quantized == {n for n in linears if n.startswith(("model.vision_tower.", "model.language_model."))}
    assert report.layers == len(quantized) == fp8_layers(model) > 0 and not report.kept
    assert type(model.lm_head) is nn.Linear
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert report.bytes_after * 3 < report.bytes_before  # fp32 -> 1 byte (+ a float32 scale per output channel)
    assert report.describe().startswith(f"fp8 weights: {report.layers} linear layers of the vision tower and "
                                        "language model")


def test_fp8_text_leaves_the_vision_tower_alone(model_and_processor):
    model, _ = model_and_processor
    quantize_fp8(model, QUANTIZED_PARTS["fp8-text"])
    assert not any(isinstance(m, Fp8Linear) for m in model.model.vision_tower.modules())
    assert any(isinstance(m, Fp8Linear) for m in model.model.language_model.modules())


def test_a_layer_whose_sizes_are_not_multiples_of_16_stays_as_it_was_and_is_named():
    model = nn.Module()
    model.language_model = nn.Sequential(nn.Linear(24, 40), nn.Linear(32, 64))
    report = quantize_fp8(model, ("language_model", "vision_tower"))  # (a part the model has not: skipped)
    assert report.parts == ("language_model",) and report.layers == 1
    assert type(model.language_model[0]) is nn.Linear and isinstance(model.language_model[1], Fp8Linear)
    assert report.kept == ["language_model.0: 40x24 not multiples of 16"]
    assert "1 kept in bf16" in report.describe()


@pytest.mark.usefixtures("cpu_fp8_gemm")
@pytest.mark.parametrize("loop", ["generate", "graph"])
def test_fp8_compiles_with_no_graph_break_and_keeps_its_eager_tokens(model_and_processor, images, loop):
    """The FP8 GEMMs trace into the compiled prefill (tower, language model) and decode step as plain ops
    (inductor then fuses each activation's cast into the op before it): the same tokens as eager FP8."""
    from torch._dynamo.utils import counters

    model, processor = model_and_processor
    quantize_fp8(model)
    want = token_ids(captioner(model, processor, max_tokens=6, min_tokens=6), images)
    for captured in (CAPTURED, PREFILL_CAPTURED, VISION_CAPTURED):
        captured.clear()
    counters.clear()
    cap = captioner(model, processor, max_tokens=6, min_tokens=6, compile="on", decode_loop=loop,
                    compile_options={"backend": counting_backend})
    assert token_ids(cap, images) == want
    assert VISION_CAPTURED and PREFILL_CAPTURED and CAPTURED
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert any(node.target is torch.ops.aten._scaled_mm.default or node.target is torch._scaled_mm
               for gm in PREFILL_CAPTURED for node in gm.graph.nodes)
    assert cap.decoding_report(6)["fp8_layers"] == fp8_layers(model) > 0


@pytest.mark.parametrize("capability, dtype, gemm_error, says", [
    ((8, 0), torch.bfloat16, None, "is 8.0: use --quantize none"),
    ((9, 0), torch.float16, None, "use --dtype auto or bfloat16, not float16"),
    ((8, 9), torch.bfloat16, "Invalid scaling configuration", "has no row-wise FP8 GEMM for NVIDIA L4 (Invalid scaling"),
    ((9, 0), torch.bfloat16, None, None),
    ((8, 9), torch.bfloat16, None, None),
])
def test_a_gpu_without_fp8_tensor_cores_or_kernel_or_a_dtype_other_than_bf16_is_one_line(monkeypatch, capability,
                                                                                         dtype, gemm_error, says):
    """Checked before the model loads: the capability, the dtype, then one tiny FP8 GEMM on the card."""
    import vlm_caption.fp8 as fp8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    monkeypatch.setattr(fp8, "_gemm_error", lambda device, dtype: gemm_error)
    problem = fp8_problem(torch.device("cuda", 0), dtype)
    assert (problem is None) if says is None else (says in problem and "\n" not in problem)


def test_a_cpu_runs_fp8_where_its_torch_has_the_row_wise_gemm_else_one_line(monkeypatch):
    """The CPU runs --quantize (the tests do); torch 2.11's CPU GEMM takes one scale a tensor, refused up front."""
    import vlm_caption.fp8 as fp8

    monkeypatch.setattr(fp8, "_gemm_error", lambda device, dtype: None)
    assert fp8_problem(torch.device("cpu"), torch.float32) is None
    monkeypatch.setattr(fp8, "_gemm_error", lambda device, dtype: "Now _scaled_mm only supports per-tensor scaling")
    problem = fp8_problem(torch.device("cpu"), torch.float32)
    assert "has no row-wise FP8 GEMM on cpu (Now _scaled_mm" in problem and problem.endswith("use --quantize none")


@pytest.mark.usefixtures("cpu_fp8_gemm")
def test_the_gemm_probe_gives_the_first_line_of_the_kernels_error(monkeypatch):
    from vlm_caption.fp8 import _gemm_error

    assert _gemm_error(torch.device("cpu"), torch.bfloat16) is None

    def no_kernel(*args, **kwargs):
        raise RuntimeError("Invalid scaling configuration\n(a long explanation)")

    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    assert _gemm_error(torch.device("cpu"), torch.bfloat16) == "Invalid scaling configuration"


def run_of_its_own(tiny_model_dir, sample_data_dir, tmp_path, setting: str, value: str, default: str):
    """A run with --{setting} {value} after checking that the setting joins the run id (its default keeps the
    plain run's id): (run.json, its run summary's decoding, its card section, a plain run's card section)."""
    from batched_image_inference import main
    from test_captioning import caption_args, read_table
    from vlm_caption import store
    from vlm_caption.card import render_dataset_card
    from vlm_caption.config import RunConfig
    from vlm_caption.run_identity import run_id_for

    def run_id(**kw):
        return run_id_for(RunConfig(model=str(tiny_model_dir), data_dir=str(sample_data_dir), **kw).run_settings())

    field = setting.replace("-", "_")
    assert run_id(**{field: default}) == run_id() != run_id(**{field: value})
    ckpt = tmp_path / value
    assert main(caption_args(tiny_model_dir, sample_data_dir, ckpt, f"--{setting}", value)) == 0
    run = json.loads((ckpt / store.RUN_JSON).read_text())
    assert run[field] == value and run["run_id"] == run_id(**{field: value}, max_tokens=6)  # (caption_args)
    assert len(read_table(ckpt / store.MERGED)) > 0
    card = render_dataset_card("me/data", [{**run, "rows": 3}, {"run_id": "plain", "rows": 3, "prompt": "Hi."}])
    return (run, json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["decoding"],
            *card.split("### Run `")[1:3])


@pytest.mark.usefixtures("cpu_fp8_gemm")
def test_an_fp8_run_is_a_run_of_its_own_and_says_so(tiny_model_dir, sample_data_dir, tmp_path):
    """FP8 weights write other captions: --quantize joins the run id (none keeps the bf16 run's id), and run.json,
    the run summary and the dataset card say what ran."""
    from vlm_caption.config import RunConfig
    from vlm_caption.run_identity import run_id_for

    settings = [RunConfig(model=str(tiny_model_dir), quantize=q).run_settings() for q in ("fp8", "fp8-text")]
    assert run_id_for(settings[0]) != run_id_for(settings[1])
    _, decoding, fp8_run, bf16_run = run_of_its_own(tiny_model_dir, sample_data_dir, tmp_path, "quantize", "fp8",
                                                    "none")
    assert decoding["fp8_layers"] > 0
    assert "linear layers in FP8 (`--quantize fp8`" in fp8_run and "FP8" not in bf16_run


def refused_in_one_line(tiny_model_dir, sample_data_dir, tmp_path, capsys, flags: list[str], says: str) -> None:
    """The CLI with `flags` ends with exit 2 and one line saying `says` (argparse's usage line may come too),
    before it makes the checkpoint dir."""
    from batched_image_inference import main
    from test_captioning import caption_args
    from vlm_caption.cli import run_main

    with pytest.raises(SystemExit) as ended:
        run_main(main, caption_args(tiny_model_dir, sample_data_dir, tmp_path / "c", *flags), prog="caption")
    err = capsys.readouterr().err
    assert ended.value.code == 2 and says in err and len(err.strip().splitlines()) <= 2, err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, says", [
    (["--quantize", "fp8", "--device-map", "auto"], "--quantize fp8 runs on one GPU per process"),
    (["--quantize", "int4"], "argument --quantize: invalid choice"),
])
def test_a_quantize_the_run_cannot_take_is_one_line_and_exit_2(tiny_model_dir, sample_data_dir, tmp_path, capsys,
                                                               flags, says):
    refused_in_one_line(tiny_model_dir, sample_data_dir, tmp_path, capsys, flags, says)
