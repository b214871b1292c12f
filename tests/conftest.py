"""Shared fixtures: hermetic environment, the tiny Gemma 3, a sample data set, the local Hub stub.

Every test runs with HF caches in a tmp dir, offline, with no token: nothing reaches the network
except servers the tests start on 127.0.0.1.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

_HERMETIC_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    # Subprocesses (CLI runs, torchrun ranks) share 2 cores with the test process: one thread each
    # keeps them from thrashing (a tiny-model run went 10x slower under contention without it).
    "OMP_NUM_THREADS": "1",
}


def pytest_configure(config):
    # Before any test imports huggingface_hub (it reads some variables at import time).
    os.environ.update(_HERMETIC_ENV)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        os.environ.pop(var, None)


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random Gemma 3, saved like a hub model (built once per session)."""
    from vlm_caption.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory) -> Path:
    """48 synthetic images in the img2dataset layout, some deliberately broken. Treat as read-only.

    The broken files are put into full_metadata.parquet on purpose (download_data.py leaves them out), so
    that captioning tests meet them and check how failures are recorded.
    """
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("sample") / "data", n=48, broken=True, seed=0,
                        include_broken_in_metadata=True)


@pytest.fixture
def hub_stub(tmp_path, monkeypatch):
    """A running stub; the real client is pointed at it, online, with the stub's write token in HF_TOKEN.

    conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, and the library reads it once at
    import time into `constants.HF_HUB_OFFLINE`: patching the constant is what turns offline mode off.
    Its own retry sleeps (`http_backoff`, up to 8 s each) are made instant so fault tests stay fast.
    """
    import types

    from huggingface_hub import constants
    from huggingface_hub.utils import _http as hf_http

    from hub_stub import HubStub

    stub = HubStub(tmp_path / "hub_stub").start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", stub.token)
    # The token file path is fixed at import time; never let a developer's real login leak into a test.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_here"))
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=lambda s: None))
    yield stub
    stub.stop()
    hf_http.close_session()  # drop keep-alive connections to this stub's port


@pytest.fixture
def cpu_fp8_gemm():
    """Skips a test that runs --quantize's FP8 GEMMs on the CPU where this torch has no row-wise one (2.11's CPU
    `_scaled_mm` takes one scale a tensor; CI's 2.13 has it)."""
    import torch

    from vlm_caption.fp8 import _gemm_error

    error = _gemm_error(torch.device("cpu"), torch.bfloat16)
    if error:
        pytest.skip(f"torch {torch.__version__} has no row-wise FP8 GEMM on the CPU ({error[:80]})")
