"""retry_pool.py: flagged captions gathered across batches for their second try, with the rows and captions a
retry right after each batch gives, every row written once, a signal dropping only what resume redoes."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal

import pyarrow.parquet as pq
import pytest
from dummy_runs import dummy_args, faults, merged_rows  # noqa: F401 (faults: a fixture)

from batched_image_inference import main
from vlm_caption import dummy_backend, loader, store
from vlm_caption.backends import Caption
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK
from vlm_caption.interrupts import Interrupted
from vlm_caption.prompt_plan import PromptSpec
from vlm_caption.retry_pool import RetryPool

FLAGGED_DIGITS = "134"  # the dummy's test faults: keys ending so get a caption flagged for a retry
CAPTION_COLUMNS = ("vlm_caption", "caption_flags", "caption_attempts", "caption_finish", "caption_tokens")


@pytest.fixture
def generate_calls(monkeypatch):
    """Every DummyBackend.generate call as (retry, keys)."""
    calls: list[tuple[bool, list[str]]] = []
    real = dummy_backend.DummyBackend.generate

    def spy(self, keys, batch, should_stop=None, *, retry=False, prompts=None):
        calls.append((retry, list(keys)))
        return real(self, keys, batch, should_stop, retry=retry, prompts=prompts)

    monkeypatch.setattr(dummy_backend.DummyBackend, "generate", spy)
    return calls


def captions_by_key(ckpt, columns=CAPTION_COLUMNS) -> dict[str, tuple]:
    return {r["key"]: tuple(r[c] for c in columns) for r in merged_rows(ckpt)}


def test_gathered_retries_give_the_rows_of_a_retry_after_each_batch_in_fewer_calls(faults, sample_data_dir,
                                                                                   tmp_path, generate_calls,
                                                                                   monkeypatch, capsys):
    """retry_rows 1 (a CPU's): one retry call after each batch holding a flagged caption. retry_rows 6 (a GPU's
    64, scaled to the sample): calls of at least 6 rows but the last, at most a batch (8), and the same rows."""
    args = ("--batch-size", "8")
    assert main(dummy_args(sample_data_dir, tmp_path / "each", *args)) in (EXIT_OK, EXIT_ITEMS_FAILED)
    each = [keys for retry, keys in generate_calls if retry]
    generate_calls.clear()
    monkeypatch.setattr(dummy_backend.DummyBackend, "retry_rows", 6)
    gathered_ckpt = tmp_path / "gathered"
    assert main(dummy_args(sample_data_dir, gathered_ckpt, *args)) in (EXIT_OK, EXIT_ITEMS_FAILED)
    gathered = [keys for retry, keys in generate_calls if retry]

    assert captions_by_key(gathered_ckpt) == captions_by_key(tmp_path / "each")
    flagged = sorted(k for keys in each for k in keys)
    assert flagged and sorted(k for keys in gathered for k in keys) == flagged  # each flagged caption once
    assert {k[-1] for k in flagged} == set(FLAGGED_DIGITS)
    assert len(gathered) < len(each), (gathered, each)
    assert all(6 <= len(keys) <= 8 for keys in gathered[:-1]) and 1 <= len(gathered[-1]) <= 8, gathered
    keys = [k for _, ks in store.read_keys(store.list_parts(gathered_ckpt)) for k in ks]
    assert len(keys) == len(set(keys))  # every row written once
    decoding = json.loads((gathered_ckpt / store.SUMMARY).read_text())["this_run"]["decoding"]
    assert decoding["retry_gathered_rows"] == 6
    assert decoding["retry_calls"] == len(gathered) and decoding["retried_captions"] == len(flagged)
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("second tries")]
    assert said[-1] == f"second tries: {len(flagged)} flagged captions generated again in {len(gathered)} calls"


def test_each_prompt_retries_its_own_flagged_captions_gathered(faults, sample_data_dir, tmp_path, monkeypatch):
    """--prompts-file: a row waits when any prompt's caption is flagged; each prompt's call holds only its own
    flagged rows, and a prompt's clean caption of a waiting row keeps its one attempt."""
    prompts_file = tmp_path / "prompts.yaml"
    prompts_file.write_text('short: "Name it."\nlong: "Describe it."\n')
    real = dummy_backend.DummyBackend.generate
    calls: list[tuple[str, list[str]]] = []

    def long_empty_for_7(self, keys, batch, should_stop=None, *, retry=False, prompts=None):
        caps = real(self, keys, batch, should_stop, retry=retry, prompts=prompts)
        if retry:
            calls.append((prompts[0], list(keys)))
        # `long`: no text for keys ending in 7 on the first try (flag empty); the test faults apply to `short` only
        return [c if not p.startswith("Describe") else
                dataclasses.replace(c, text="" if k.endswith("7") and not retry else f"A long look at {k}.")
                for c, p, k in zip(caps, prompts, keys)]

    monkeypatch.setattr(dummy_backend.DummyBackend, "generate", long_empty_for_7)
    monkeypatch.setattr(dummy_backend.DummyBackend, "retry_rows", 5)
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, ckpt, "--prompts-file", str(prompts_file))) in (EXIT_OK,
                                                                                            EXIT_ITEMS_FAILED)
    short = [k for p, keys in calls if p.startswith("Name") for k in keys]
    long = [k for p, keys in calls if p.startswith("Describe") for k in keys]
    assert short and {k[-1] for k in short} == set(FLAGGED_DIGITS) and long and {k[-1] for k in long} == {"7"}
    rows = captions_by_key(ckpt, ("caption_attempts_short", "caption_attempts_long", "caption_flags_long"))
    for key, (attempts_short, attempts_long, flags_long) in rows.items():
        assert attempts_short == (2 if key[-1] in FLAGGED_DIGITS else 1), key
        assert attempts_long == (2 if key[-1] == "7" else 1) and "empty" not in flags_long, key


def test_a_signal_drops_the_rows_waiting_for_a_retry_and_resume_captions_them(faults, sample_data_dir, tmp_path,
                                                                              generate_calls, monkeypatch, caplog):
    """Rows wait for their second try in no part: a stop drops them like the batch in flight (said once), the
    others are written; the resume captions them again, and the run ends as one that was never stopped."""
    whole = tmp_path / "whole"
    assert main(dummy_args(sample_data_dir, whole)) in (EXIT_OK, EXIT_ITEMS_FAILED)
    monkeypatch.setattr(dummy_backend.DummyBackend, "retry_rows", 1000)  # nothing retried before the end
    generate_calls.clear()
    real = dummy_backend.DummyBackend.generate

    def stop_at_the_third_batch(self, keys, batch, should_stop=None, *, retry=False, prompts=None):
        if len(generate_calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, keys, batch, should_stop, retry=retry, prompts=prompts)

    monkeypatch.setattr(dummy_backend.DummyBackend, "generate", stop_at_the_third_batch)
    ckpt = tmp_path / "ckpt"
    with caplog.at_level(logging.INFO, logger="vlm_caption"), pytest.raises(Interrupted):
        main(dummy_args(sample_data_dir, ckpt))
    written = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
    first_two = [k for _, keys in generate_calls[:2] for k in keys]
    waiting = [k for k in first_two if k[-1] in FLAGGED_DIGITS]
    assert waiting and not any(retry for retry, _ in generate_calls)
    assert sorted(written) == sorted(set(first_two) - set(waiting))  # the third batch was in flight
    said = [r.getMessage() for r in caplog.records if "waiting for the second try" in r.getMessage()]
    assert said == [f"{len(waiting)} captioned rows waiting for the second try of a flagged caption are not "
                    "written; resume captions them again"]

    monkeypatch.setattr(dummy_backend.DummyBackend, "generate", real)
    assert main(dummy_args(sample_data_dir, ckpt)) in (EXIT_OK, EXIT_ITEMS_FAILED)
    assert captions_by_key(ckpt) == captions_by_key(whole)
    keys = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
    assert len(keys) == len(set(keys)) == pq.read_metadata(ckpt / store.MERGED).num_rows


# ---------------------------------------------------------------- the pool alone


class _Backend:
    """Captions by key: "loop" keys get a repetition on the first try; a retry can be made to fail."""

    def __init__(self, fail_retry: BaseException | None = None):
        self.fail_retry, self.calls, self.freed = fail_retry, [], 0

    def generate(self, keys, batch, should_stop=None, *, retry=False, prompts=None):
        self.calls.append(list(keys))
        if self.fail_retry is not None:
            raise self.fail_retry
        return [Caption(f"A clean second caption of {k}.", "stop", 6) for k in keys]

    def is_out_of_memory(self, error):
        return "out of memory" in str(error)

    def free_memory(self):
        self.freed += 1


def _batch(keys):
    items = [loader.Loaded({"key": k}, inputs=k) for k in keys]
    loop = "A tower. " + "and the tower " * 30
    return [(items, [[Caption(loop if "loop" in k else f"A tower {k}.", "stop", 9) for k in keys]], None)]


def _pool(backend, rows, batch_rows=8):
    posted = []
    pool = RetryPool(backend, [PromptSpec.make(None, "Describe.")], rows, batch_rows=lambda: batch_rows,
                     post=lambda results, retries: posted.append((results, retries)), should_stop=lambda: False)
    return pool, posted


def _posted_keys(posted):
    return [[i.row["key"] for items, _, _ in results for i in items] for results, _ in posted]


def test_the_pool_posts_clean_rows_at_once_and_retries_in_calls_no_bigger_than_the_batch():
    backend = _Backend()
    pool, posted = _pool(backend, rows=4, batch_rows=3)  # (a batch halved after running out of memory)
    pool.add(_batch(["a", "loop1", "loop2"]))
    assert _posted_keys(posted) == [["a"]] and backend.calls == []  # 2 wait: fewer than min(4, 3)
    pool.add(_batch(["loop3", "b", "loop4", "loop5"]))
    assert backend.calls == [["loop1", "loop2", "loop3"], ["loop4", "loop5"]] and not pool.waiting
    assert _posted_keys(posted)[1:] == [["b"], ["loop1", "loop2", "loop3"], ["loop4", "loop5"]]
    (items, caps, error), = posted[3][0]
    assert error is None and [c.text for c in caps[0]] == ["A tower. " + "and the tower " * 30] * 2
    assert {i: c.text for i, c in posted[3][1][0][0].items()} == {0: "A clean second caption of loop4.",
                                                                  1: "A clean second caption of loop5."}
    assert pool.report() == {"retry_gathered_rows": 4, "retry_calls": 2, "retried_captions": 5}


def test_a_failed_retry_keeps_the_first_captions_and_frees_the_memory(caplog):
    backend = _Backend(fail_retry=RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    pool, posted = _pool(backend, rows=1)
    with caplog.at_level(logging.WARNING, logger="vlm_caption"):
        pool.add(_batch(["loop1", "b"]))
    assert _posted_keys(posted) == [["b"], ["loop1"]] and posted[1][1] == [[{}]] and backend.freed == 1
    assert [r.getMessage() for r in caplog.records] == [
        "the retry of 1 flagged captions failed (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB); "
        "their first captions are kept"]
    assert pool.report()["retried_captions"] == 0 and not pool.waiting


def test_no_second_try_posts_every_row_as_it_came():
    backend = _Backend()
    pool, posted = _pool(backend, rows=0)  # --retry-repetition-penalty 0
    pool.add(_batch(["loop1", "a"]))
    pool.flush()
    assert _posted_keys(posted) == [["loop1", "a"]] and backend.calls == [] and not pool.waiting


def test_a_stop_during_a_retry_call_keeps_its_rows_waiting_unposted():
    """generate cut short by a signal gives incomplete retries: the group is neither posted nor forgotten (the
    loop drops it, and resume captions those rows again), and no further call starts."""
    stopping = []

    class Stopped(_Backend):
        def generate(self, keys, batch, should_stop=None, *, retry=False, prompts=None):
            stopping.append(True)  # the signal arrives during the call
            return super().generate(keys, batch, should_stop, retry=retry, prompts=prompts)

    backend = Stopped()
    posted = []
    pool = RetryPool(backend, [PromptSpec.make(None, "Describe.")], 2, batch_rows=lambda: 2,
                     post=lambda results, retries: posted.append((results, retries)),
                     should_stop=lambda: bool(stopping))
    pool.add(_batch(["loop1", "a", "loop2", "loop3"]))
    assert _posted_keys(posted) == [["a"]] and backend.calls == [["loop1", "loop2"]]
    assert [w.item.row["key"] for w in pool.waiting] == ["loop1", "loop2", "loop3"]
