"""test_pipeline.py (the smoke test a user runs before a long job) must not pass when no caption was made."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("smoke_cli_verdicts", REPO / "test_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_smoke_test_fails_when_every_generate_call_fails(smoke, sample_data_dir, monkeypatch, capsys):
    """User impact: README step 4 says to run `test_pipeline.py --num-images 3 --model ...` "before a long job";
    its exit 1 means "a check failed". When generation itself is broken on this machine (every `generate` call
    raises: a CUDA error, a kernel the card cannot run, a model/transformers mismatch), the captioning run records
    each image as a retryable `generate` failure and exits 3, yet the smoke test prints `PASS caption ... (exit
    code 3)` and `PASS merged_output: 0 rows = 3 images - 3 recorded failures`, "all N checks passed", exit 0:
    the user launches the 400K-image job on a setup that captions nothing.
    Expected: a smoke test whose captioning produced no caption at all (or exited non-zero / only recorded
    `generate` failures) fails (exit 1, a FAIL line)."""
    from vlm_caption import captioner

    def broken_generate(self, keys, batch, should_stop=None, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(captioner.Captioner, "generate", broken_generate)
    code = smoke.main(["--num-images", "3", "--tiny", "--max-tokens", "8", "--data-dir", str(sample_data_dir)])
    out = capsys.readouterr().out
    assert code == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert fails == [fails[0]] and "the model captioned 0 of 2 readable images: 2 failed at generate" in fails[0] \
        and "device-side assert" in fails[0], out
