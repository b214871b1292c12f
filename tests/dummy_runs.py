"""Runs of batched_image_inference.py with the dummy backend, as the caption tests make them (dummy_backend.py:
VLM_CAPTION_DUMMY_FAULTS=1 makes it write broken captions for keys by their last digit)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vlm_caption import store

FAULTS = {"VLM_CAPTION_DUMMY_FAULTS": "1"}
# What Slurm and torchrun / accelerate set to place a worker (vlm_caption.workers reads them).
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
               "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
               "SLURM_STEP_TASKS_PER_NODE", "TORCHELASTIC_RUN_ID",
               "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID")


def clear_launch_env(monkeypatch) -> None:
    """A process started by hand: none of the launchers' variables (the test sets those it emulates)."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


def dummy_args(data: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--model", "dummy-model", "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push",
            "--backend", "dummy", "--max-tokens", "40", "--batch-size", "4", "--checkpoint-every", "8",
            "--num-loader-workers", "1", *extra]


def merged_rows(ckpt: Path) -> list[dict]:
    return pq.read_table(ckpt / store.MERGED).to_pylist()


@pytest.fixture
def faults(monkeypatch):
    for k, v in FAULTS.items():
        monkeypatch.setenv(k, v)


def run_two_prompts(data: Path, ckpt: Path, *extra: str) -> int:
    """A --prompts-file run of prompts `short` and `long` flagged differently: `short` gets the test faults by
    key digit (FAULTS), `long` a garbled caption on every row (a replacement character), so a count that shows
    only the first prompt's flags is told apart from one that shows each."""
    from batched_image_inference import main
    from vlm_caption import dummy_backend

    prompts_file = ckpt.parent / f"{ckpt.name}-prompts.yaml"
    prompts_file.write_text('short: "Name it."\nlong: "Describe. Tags: {tags}"\n')
    real = dummy_backend.DummyBackend.generate

    def garbled_long(self, keys, batch, should_stop=None, *, retry=False, prompts=None):
        caps = real(self, keys, batch, should_stop, retry=retry, prompts=prompts)
        return [dataclasses.replace(c, text=c.text + " \ufffd") if p.startswith("Describe") else c
                for c, p in zip(caps, prompts or [self.prompt] * len(caps))]

    with pytest.MonkeyPatch.context() as mp:
        for k, v in FAULTS.items():
            mp.setenv(k, v)
        mp.setattr(dummy_backend.DummyBackend, "generate", garbled_long)
        return main(dummy_args(data, ckpt, "--prompts-file", str(prompts_file), *extra))


def flags_per_prompt(ckpt: Path) -> dict[str, dict[str, int]]:
    """Prompt name -> captions per flag, counted from all_captions.parquet's caption_flags_NAME columns."""
    from vlm_caption.rows import count_flags

    rows = merged_rows(ckpt)
    return {name: count_flags(r[f"caption_flags_{name}"] for r in rows) for name in ("short", "long")}


def assert_one_line_usage_errors(data: Path, ckpt: Path, cases, capsys) -> None:
    """Each (extra flags, text) case: a dummy run refused with exit 2 and one stderr line holding the text."""
    from batched_image_inference import main

    from vlm_caption.cli import run_main
    from vlm_caption.errors import EXIT_USAGE

    for extra, says in cases:
        with pytest.raises(SystemExit) as exc:
            run_main(main, dummy_args(data, ckpt, *extra), prog="batched_image_inference.py")
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == EXIT_USAGE and len(err) == 1 and says in err[0], err
