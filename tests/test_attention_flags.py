"""Throughput flags crossed with --attn-implementation on the tiny Gemma 3 (CPU): a kernel flag that cannot take
effect must not be accepted without a word, and run_summary.json must not claim a kernel that never ran.

Precedent in the project: `--kv-cache-dtype fp8 --attn-implementation eager` is one usage line (exit 2,
config.RunConfig.validate), because the fp8 cache needs the grouped sdpa kernels. `--decode-attention` and
`--vision-attention` choose kernels inside torch's sdpa too, yet with another attention implementation they are
accepted and dropped silently.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from batched_image_inference import main
from vlm_caption import store
from vlm_caption.cli import run_main
from vlm_caption.errors import EXIT_USAGE


def _args(model: Path, data: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push",
            "--max-tokens", "3", "--batch-size", "4", "--max-images", "4", "--num-loader-workers", "1",
            "--dtype", "float32", *extra]


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        run_main(main, args, prog="batched_image_inference.py")
    return exc.value.code


def test_vision_attention_kernel_is_not_claimed_when_the_tower_runs_eager_attention(
        tiny_model_dir, sample_data_dir, tmp_path, capsys):
    """`--attn-implementation eager --vision-attention flash`: the vision tower is loaded with eager attention
    (plain matmul + softmax, no torch sdpa call at all), so the sdpa kernel order that `--vision-attention` sets
    (vision_attention._KernelCall) has no effect. Yet the run is accepted without a word and
    run_summary.json's `decoding.vision_attention` says "flash": a user comparing runs (or reading a GPU run
    with `--attn-implementation flash_attention_2`, where `auto` even times sdpa kernels and reports one as
    chosen) is told a kernel ran that never did.

    Expected: refused in one line (exit 2, as `--kv-cache-dtype fp8` with a non-sdpa implementation is), or
    run and reported truthfully (the summary does not claim `flash`, it says the tower's attention is eager)."""
    ckpt = tmp_path / "ckpt"
    code = _run(_args(tiny_model_dir, sample_data_dir, ckpt, "--attn-implementation", "eager",
                      "--vision-attention", "flash"))
    err = capsys.readouterr().err
    if code == EXIT_USAGE:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "--vision-attention" in lines[0], lines
        return
    decoding = json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["decoding"]
    assert decoding["attention"] == "eager"  # the text model's attention is reported truthfully ...
    assert "flash" not in decoding["vision_attention"], decoding  # ... the vision tower's is not


def test_decode_attention_flex_with_another_attention_implementation_is_not_dropped_silently(
        tiny_model_dir, sample_data_dir, tmp_path, capsys, caplog):
    """`--decode-attention flex` (or `sdpa`) picks the grouped decode kernels, which are installed only over a text
    model loaded with sdpa (grouped_attention.set_grouped_decode_attention returns False for eager / flash
    attention). With `--attn-implementation eager` the flag is accepted, nothing says it was dropped (the start
    log only says "decode attention: eager"), and the run decodes without it: on a GPU a user who asked for
    both `--attn-implementation flash_attention_2` and `--decode-attention flex` gets neither FlexAttention nor
    a word about it.

    Expected (as `--kv-cache-dtype fp8 --attn-implementation eager` is refused): one usage line, exit 2,
    naming --decode-attention; or at the very least a warning that names the flag it ignores."""
    caplog.set_level(logging.INFO)
    ckpt = tmp_path / "ckpt"
    code = _run(_args(tiny_model_dir, sample_data_dir, ckpt, "--attn-implementation", "eager",
                      "--decode-attention", "flex"))
    err = capsys.readouterr().err
    if code == EXIT_USAGE:
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "--decode-attention" in lines[0], lines
        return
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and "--decode-attention" in r.getMessage()]
    warned += [line for line in err.splitlines() if "WARNING" in line and "--decode-attention" in line]
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "decode attention: eager" in said  # the log is captured: the start line names the kernel, not the flag
    assert warned, f"--decode-attention flex was dropped without a word (exit {code}); log:\n{said[-2000:]}"
