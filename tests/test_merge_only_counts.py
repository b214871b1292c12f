"""--merge-only's coverage line and coverage.json: the counts add up to what was expected."""
from __future__ import annotations

import json
import re

from batched_image_inference import main
from dummy_runs import clear_launch_env, dummy_args
from vlm_caption import store
from vlm_caption.errors import EXIT_OK


def test_merge_only_of_a_narrower_selection_counts_only_its_keys_as_captioned(sample_data_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """User impact: an operator proves one slice (`--merge-only --shards 0`, or `--max-images N` as the trial
    was run) of a dir that captioned more: it prints "coverage: 10 expected, 42 captioned, 1 failed, 0 missing"
    and coverage.json says captioned 42 of 10 expected. The counts do not add up (captioned + failed + missing
    != expected), and "captioned" no longer says how many of the expected keys are done; `--check-hub` of the
    same selection prints "10 expected, 9 published, 1 failed, 0 missing ... (33 more outside the selection)".
    Expected: captioned counts the expected keys (captioned + failed + missing == expected), the keys outside the
    selection said apart (coverage.json already has unexpected_keys)."""
    clear_launch_env(monkeypatch)
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, ckpt)) == EXIT_OK
    capsys.readouterr()
    assert main(dummy_args(sample_data_dir, ckpt, "--merge-only", "--max-images", "10")) == EXIT_OK
    out = capsys.readouterr().out
    m = re.search(r"coverage: (\d+) expected, (\d+) captioned, (\d+) failed, (\d+) missing", out)
    assert m, out
    expected, captioned, failed, missing = map(int, m.groups())
    assert expected == 10
    assert captioned + failed + missing == expected, out
    coverage = json.loads((ckpt / store.COVERAGE).read_text())
    assert coverage["captioned"] + coverage["failed"] + coverage["missing"] == coverage["expected"], coverage
    outside = coverage["unexpected_keys"]
    assert outside > 0 and f"({outside} more captioned outside the selection)" in out, out
