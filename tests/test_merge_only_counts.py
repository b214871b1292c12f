"""--merge-only's coverage line and coverage.json: the counts add up to what was expected."""
from __future__ import annotations

import json
import re

import pytest

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
    assert outside > 0 and f"({outside} more captioned outside the selection, 0 of them more than once)" in out, out


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("dup") / "data", n=30, broken=False, seed=5, shard_size=10)


def test_merge_only_of_one_shard_is_not_failed_by_keys_captioned_twice_in_other_shards(three_shards, tmp_path,
                                                                                       monkeypatch, capsys):
    """User impact: an operator proves one slice of a run (`--merge-only --shards 0`, README: --shards) whose
    dirs captioned other shards twice (a resubmitted array task, say). Since dade259 the coverage line counts
    only the selection's keys: "10 expected, 10 captioned, 0 failed, 0 missing, 20 captioned more than once (20
    more captioned outside the selection)" -- but the "captioned more than once" count and the exit code still
    take every duplicate of the dirs: exit 4 ("keys missing or captioned twice") for a selection whose every key
    is captioned exactly once. `--check-hub` of the same selection counts duplicates within the selection only
    (hub_coverage.py: "a check of some shards ... is not failed by a retryable failure or a duplicate outside
    them") and exits 0, so the two checks disagree on the same data.
    Expected: duplicates are counted within the selection (those outside said apart, as the captioned keys
    are), and a selection whose keys are each captioned once exits 0."""
    clear_launch_env(monkeypatch)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(dummy_args(three_shards, a)) == EXIT_OK  # every shard
    assert main(dummy_args(three_shards, b, "--shards", "1-2")) == EXIT_OK  # shards 1 and 2 again, in another dir
    capsys.readouterr()

    code = main(["--merge-only", "--data-dir", str(three_shards), "--checkpoint-dir", str(a), str(b),
                 "--shards", "0"])
    out = capsys.readouterr().out
    m = re.search(r"coverage: (\d+) expected, (\d+) captioned, (\d+) failed, (\d+) missing, (\d+) captioned more "
                  r"than once", out)
    assert m, out
    expected, captioned, failed, missing, twice = map(int, m.groups())
    assert (expected, captioned, failed, missing) == (10, 10, 0, 0), out  # shard 0: each key captioned once
    coverage = json.loads((a / store.COVERAGE).read_text())
    assert twice == 0 and code == EXIT_OK, out
    assert (coverage["duplicated"], coverage["duplicated_outside"], coverage["unexpected_keys"]) == (0, 20, 20)
    assert "(20 more captioned outside the selection, 20 of them more than once)" in out, out
