"""Runs of batched_image_inference.py with the dummy backend, as the caption tests make them (dummy_backend.py:
VLM_CAPTION_DUMMY_FAULTS=1 makes it write broken captions for keys by their last digit)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vlm_caption import store

FAULTS = {"VLM_CAPTION_DUMMY_FAULTS": "1"}


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
