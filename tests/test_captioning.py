"""batched_image_inference.py end to end with the tiny Gemma 3 on sample data (CPU, --no-push)."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batched_image_inference import main
from vlm_caption import store
from vlm_caption.errors import EXIT_FATAL, EXIT_ITEMS_FAILED, EXIT_OK, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent


def caption_args(model: Path, data: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--no-push",
            "--max-tokens", "6", "--batch-size", "4", "--checkpoint-every", "8", "--num-loader-workers", "2", *extra]


def read_table(path: Path):
    return pq.read_table(path).to_pandas()


def all_keys(ckpt: Path) -> list[str]:
    """Every key in every part, duplicates kept."""
    return [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]


def failed_keys(ckpt: Path) -> list[str]:
    return [k for _, ks in store.read_keys(store.list_failure_files(ckpt)) for k in ks]


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, sample_data_dir, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("run") / "ckpt"
    code = main(caption_args(tiny_model_dir, sample_data_dir, ckpt))
    return code, ckpt


def test_end_to_end_schema_and_carried_columns(full_run, sample_data_dir, tiny_model_dir):
    code, ckpt = full_run
    merged = pq.read_table(ckpt / store.MERGED)
    assert merged.schema.equals(store.OUTPUT_SCHEMA)
    out = merged.to_pandas().set_index("key")
    meta = read_table(sample_data_dir / "full_metadata.parquet").set_index("key")
    failed = set(failed_keys(ckpt))
    # Every input row is captioned or failed, never both, never neither.
    assert set(out.index) | failed == set(meta.index)
    assert not set(out.index) & failed
    assert out.index.is_unique and list(out.index) == sorted(out.index)
    for col_in, col_out in [("original_key", "original_key"), ("url", "url"), ("caption", "original_caption"),
                            ("md5", "md5"), ("tags", "tags"), ("merged_tags", "merged_tags"), ("sha256", "sha256"),
                            ("width", "width"), ("height", "height")]:
        assert (out[col_out] == meta.loc[out.index, col_in]).all(), col_out
    assert (out["caption_model"] == f"local:{tiny_model_dir.name}").all()  # no local path published
    assert set(out["caption_finish"]) <= {"stop", "length"}
    assert (out["caption_tokens"] <= 6).all() and (out["caption_tokens"] >= 0).all()
    assert not any("<start_of_turn>" in c or "<end_of_turn>" in c for c in out["vlm_caption"])
    # The sample holds broken files: failures with a stage and a reason. They cannot be decoded, a permanent
    # data failure, so the run is complete: exit 0 (--strict would say 3).
    assert failed and code == EXIT_OK
    failures = read_table(ckpt / store.FAILURES_DIR)
    assert set(failures["stage"]) <= {"load", "decode", "generate"}
    assert failures["error"].str.len().min() > 5
    summary = __import__("json").loads((ckpt / store.SUMMARY).read_text())
    assert summary["checkpoint_dir"]["captioned"] == len(out)
    assert summary["checkpoint_dir"]["failed"] == len(failed)


def test_rerun_is_a_no_op_and_keeps_parts(full_run, tiny_model_dir, sample_data_dir):
    code, ckpt = full_run
    before = {p.path.name: p.path.read_bytes() for p in store.list_parts(ckpt)}
    again = main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--resume"))
    assert again == EXIT_OK  # the undecodable images stay recorded: nothing worth retrying, a set -e script goes on
    assert main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--resume", "--strict")) == EXIT_ITEMS_FAILED
    after = {p.path.name: p.path.read_bytes() for p in store.list_parts(ckpt)}
    assert after == before


def test_retry_failed_tries_again_and_records_again(full_run, tiny_model_dir, sample_data_dir, tmp_path):
    _, ckpt = full_run
    copy = tmp_path / "ckpt"
    __import__("shutil").copytree(ckpt, copy)
    n_failed = len(set(failed_keys(copy)))
    main(caption_args(tiny_model_dir, sample_data_dir, copy, "--retry-failed"))
    assert len(failed_keys(copy)) == 2 * n_failed  # tried again, failed again, recorded again
    assert len(all_keys(copy)) == len(set(all_keys(copy)))


def test_batched_equals_one_by_one_under_greedy(tiny_model_dir, sample_data_dir):
    import torch

    from vlm_caption import dataset, loader
    from vlm_caption.captioner import Captioner
    from vlm_caption.model_loading import load_model
    from vlm_caption.config import RunConfig

    cfg = RunConfig(model=str(tiny_model_dir), dtype="float32")
    model, processor = load_model(cfg.model, torch.device("cpu"), dtype=cfg.dtype)
    cap = Captioner(model, processor, model_name=cfg.model, prompt="Describe the image.", max_tokens=12)
    rows = list(dataset.iter_rows(sample_data_dir, {f"{i:09d}" for i in range(48)}))
    items = [i for i in loader.prefetch(rows, cap.prepare, workers=2, window=8) if i.error is None][:8]
    keys = [i.row["key"] for i in items]
    batched = cap.generate(keys, [i.inputs for i in items])
    single = [cap.generate([k], [i.inputs])[0] for k, i in zip(keys, items)]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.tokens for c in batched] == [c.tokens for c in single]
    assert len({c.text for c in batched}) > 1, "the tiny model should react to its image"


def test_sampling_is_reproducible_per_key_whatever_the_batch(tiny_model_dir, sample_data_dir):
    import torch

    from vlm_caption import dataset, loader
    from vlm_caption.captioner import Captioner
    from vlm_caption.model_loading import load_model
    from vlm_caption.config import RunConfig

    cfg = RunConfig(model=str(tiny_model_dir))
    model, processor = load_model(cfg.model, torch.device("cpu"), dtype=cfg.dtype)
    cap = Captioner(model, processor, model_name=cfg.model, prompt="Describe.", max_tokens=10, temperature=1.0,
                    seed=7)
    rows = list(dataset.iter_rows(sample_data_dir, {f"{i:09d}" for i in range(12)}))
    items = [i for i in loader.prefetch(rows, cap.prepare, workers=1, window=4) if i.error is None][:4]
    keys = [i.row["key"] for i in items]
    batched = [c.text for c in cap.generate(keys, [i.inputs for i in items])]
    reversed_batch = [c.text for c in cap.generate(keys[::-1], [i.inputs for i in items][::-1])][::-1]
    greedy = Captioner(model, processor, model_name=cfg.model, prompt="Describe.", max_tokens=10)
    assert batched == reversed_batch
    assert batched != [c.text for c in greedy.generate(keys, [i.inputs for i in items])]


def test_settings_mismatch_is_refused(full_run, tiny_model_dir, sample_data_dir, capsys):
    _, ckpt = full_run
    code = None
    with pytest.raises(SystemExit) as exc:
        from vlm_caption.cli import run_main

        run_main(main, caption_args(tiny_model_dir, sample_data_dir, ckpt, "--prompt", "Something else"))
    code = exc.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE
    assert len(err) == 1 and "other settings" in err[0] and "--overwrite" in err[0]
    # each setting with its two values (the built-in prompt's version follows from --prompt: not named)
    assert "(prompt: 'Describe this artwork" in err[0] and "in the dir, 'Something else' now)" in err[0], err
    assert "prompt_version" not in err[0]


def test_settings_of_a_run_that_captioned_nothing_are_replaced(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exc:  # a typo in the model id: run.json is written, nothing captioned
        from vlm_caption.cli import run_main

        run_main(main, caption_args("google/gemma-3-4b-itt", sample_data_dir, ckpt, "--max-images", "2"))
    assert exc.value.code == EXIT_FATAL and store.read_run_json(ckpt)["model"] == "google/gemma-3-4b-itt"
    assert main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--max-images", "2")) == EXIT_OK
    assert store.read_run_json(ckpt)["model"] == str(tiny_model_dir) and not (ckpt / "superseded").exists()


def test_overwrite_sets_the_old_run_aside(tiny_model_dir, sample_data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--max-images", "4"))
    old_parts = [p.path.name for p in store.list_parts(ckpt)]
    main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--max-images", "4", "--max-tokens", "3", "--overwrite"))
    aside = list((ckpt / "superseded").iterdir())
    assert len(aside) == 1 and sorted(p.name for p in (aside[0] / "parts").iterdir()) == sorted(old_parts)
    assert store.read_run_json(ckpt)["max_tokens"] == 3


def test_max_images_shards_and_worker_slices_select_what_they_say(tiny_model_dir, tmp_path):
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=30, broken=False, seed=1, shard_size=10)
    keys = sorted(read_table(data / "full_metadata.parquet")["key"])

    ck = tmp_path / "max"
    main(caption_args(tiny_model_dir, data, ck, "--max-images", "5"))
    assert sorted(all_keys(ck)) == keys[:5]

    ck = tmp_path / "shards"
    main(caption_args(tiny_model_dir, data, ck, "--shards", "1-2"))
    shard_dirs = {k: Path(f).parent.name for k, f in
                  read_table(data / "full_metadata.parquet")[["key", "file_name"]].itertuples(index=False)}
    assert {int(shard_dirs[k]) for k in all_keys(ck)} == {1, 2}
    assert len(all_keys(ck)) == sum(1 for s in shard_dirs.values() if int(s) in (1, 2))

    got = []
    for i in range(3):
        ck = tmp_path / f"w{i}"
        main(caption_args(tiny_model_dir, data, ck, "--num-workers", "3", "--worker-index", str(i)))
        mine = all_keys(ck)
        assert mine and all(p.worker == i for p in store.list_parts(ck))
        got += mine
    assert sorted(got) == keys  # disjoint slices that cover everything


def test_dry_run_loads_no_model(sample_data_dir, tmp_path, capsys):
    code = main(caption_args("no-such-org/no-such-model", sample_data_dir, tmp_path / "ckpt", "--dry-run"))
    out = capsys.readouterr().out
    assert code == EXIT_OK
    n_rows = pq.read_metadata(sample_data_dir / "full_metadata.parquet").num_rows
    assert f"to do {n_rows}," in out and "already done 0" in out
    assert not (tmp_path / "ckpt").exists()


def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch):
    import torch

    from vlm_caption.captioner import Captioner

    real = Captioner.generate
    sizes = []

    def small_memory(self, keys, pixel_values, should_stop=None, **kwargs):
        sizes.append(len(keys))
        if len(keys) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, keys, pixel_values, should_stop, **kwargs)

    monkeypatch.setattr(Captioner, "generate", small_memory)
    ckpt = tmp_path / "ckpt"
    main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--batch-size", "8"))
    meta_keys = set(read_table(sample_data_dir / "full_metadata.parquet")["key"])
    assert set(all_keys(ckpt)) | set(failed_keys(ckpt)) == meta_keys
    assert len(all_keys(ckpt)) == len(set(all_keys(ckpt)))
    assert 8 in sizes and max(sizes[sizes.index(2):]) <= 2  # once it fit at 2 it stayed at 2


def test_out_of_memory_lets_go_of_the_next_batchs_assembly_too(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch):
    """The next batch was assembled (on the device) at the old size while this one ran out of memory; the
    smaller retries never use it, so it goes at once instead of holding memory they need."""
    import torch

    from vlm_caption import caption_loop
    from vlm_caption.captioner import Captioner

    real_generate, real_assemble = Captioner.generate, caption_loop.assemble_all
    assemblies = []

    def small_memory(self, keys, pixel_values, should_stop=None, **kwargs):
        if len(keys) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(self, keys, pixel_values, should_stop, **kwargs)

    def recorded(backend, specs, items):
        assemblies.append((len(items), real_assemble(backend, specs, items)))
        return assemblies[-1][1]

    monkeypatch.setattr(Captioner, "generate", small_memory)
    monkeypatch.setattr(caption_loop, "assemble_all", recorded)
    ckpt = tmp_path / "ckpt"
    main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--batch-size", "8"))
    # The batch that ran out of memory, and the next one of 8 if its assembly had started (else it was cancelled):
    # every assembly made at the old size is let go of.
    at_old_size = [made for n, made in assemblies if n == 8]
    assert 1 <= len(at_old_size) <= 2 and all(made == [] for made in at_old_size)
    assert assemblies[0][0] == 8 and all(n <= 2 for n, _ in assemblies[len(at_old_size):])
    meta_keys = set(read_table(sample_data_dir / "full_metadata.parquet")["key"])
    assert set(all_keys(ckpt)) | set(failed_keys(ckpt)) == meta_keys and len(all_keys(ckpt)) == len(set(all_keys(ckpt)))


def test_sigkill_after_first_part_then_resume_gives_every_key_once(tiny_model_dir, sample_data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = caption_args(tiny_model_dir, sample_data_dir, ckpt, "--batch-size", "2", "--checkpoint-every", "4")
    args[args.index("--max-tokens") + 1] = "48"
    cmd = [sys.executable, str(REPO / "batched_image_inference.py"), *args, "--min-tokens", "48"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not store.list_parts(ckpt) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    first = len(all_keys(ckpt))
    assert 0 < first < 48
    code = main(args + ["--min-tokens", "48"])
    keys = all_keys(ckpt)
    meta_keys = set(read_table(sample_data_dir / "full_metadata.parquet")["key"])
    assert len(keys) == len(set(keys))
    assert set(keys) | set(failed_keys(ckpt)) == meta_keys
    assert code == EXIT_OK  # only undecodable images failed
    assert not list(ckpt.rglob(".*.tmp-*"))


def test_ctrl_c_keeps_the_captions_already_made(tiny_model_dir, sample_data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = caption_args(tiny_model_dir, sample_data_dir, ckpt, "--batch-size", "2", "--checkpoint-every", "1000")
    args[args.index("--max-tokens") + 1] = "48"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "batched_image_inference.py"), *args, "--min-tokens", "48"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 600
        # The progress bar past the sample's 3 broken images: at least one caption made.
        made = re.compile(r"captioning: [^\r\n]*\| *([4-9]|\d{2,})/\d+ \[")
        while not made.search(log.read_text()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 130, log.read_text()[-2000:]
    assert "finished parts are kept" in log.read_text()
    saved = all_keys(ckpt)
    assert saved, log.read_text()[-3000:]  # no part would exist without the flush
    said = re.search(r"stopped: this run captioned (\d+) images?[^;]*; (\d+) of this worker's (\d+) left", log.read_text())
    assert said and int(said[1]) == len(saved), log.read_text()[-3000:]  # what it says it made is what it kept
    assert int(said[2]) <= int(said[3]) - len(saved)
    main(args + ["--min-tokens", "48"])
    keys = all_keys(ckpt)
    assert len(keys) == len(set(keys)) and set(saved) <= set(keys)


# ---------------------------------------------------------------- the backend seam


def test_dummy_backend_is_deterministic_and_batch_independent(sample_data_dir):
    from vlm_caption import dataset
    from vlm_caption.backends import make_backend

    backend = make_backend("dummy", model="none", prompt="Describe.", max_tokens=12)
    rows = [r for r in dataset.iter_rows(sample_data_dir, {f"{i:06d}" for i in range(6)})]
    inputs = [backend.prepare(dataset.load_image(r["image_path"], backend.target_size)) for r in rows]
    keys = [r["key"] for r in rows]
    batched = backend.generate(keys, inputs)
    assert batched == [backend.generate([k], [x])[0] for k, x in zip(keys, inputs)]
    assert batched == backend.generate(keys, inputs)
    assert len({c.text for c in batched}) == len(rows)  # key and image statistics show
    assert all(c.tokens <= 12 for c in batched)


def test_a_signal_while_the_last_rows_are_recorded_still_writes_them(sample_data_dir, tmp_path, monkeypatch):
    """The end of captioning waits for the writer thread. A signal there raised in the middle of the wait: the
    main thread flushed while the writer thread was still adding the last batch's rows, which then stayed
    unwritten (and two threads could write parts at once). Now the wait finishes, then the stop."""
    import threading

    from dummy_runs import dummy_args

    from vlm_caption import rows as rowcols
    from vlm_caption.interrupts import Interrupted

    made = []
    row_values = rowcols.row_values

    def slow_row_values(*args, **kwargs):  # on the writer thread, while the main thread waits for it
        assert threading.current_thread() is not threading.main_thread()
        if not made:
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
        made.append(1)
        return row_values(*args, **kwargs)

    monkeypatch.setattr(rowcols, "row_values", slow_row_values)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupted):  # one batch of four, then the stop the signal asked for
        main(dummy_args(sample_data_dir, ckpt, "--max-images", "4", "--checkpoint-every", "100"))
    written = sum(pq.read_metadata(p.path).num_rows for p in store.list_parts(ckpt))
    assert made and written == len(made)


def test_the_signal_handler_only_records_the_stop_and_the_loop_says_it_once(caplog):
    """Logging inside a signal handler can hit the main thread in the middle of its own write to stderr (a
    "reentrant call" RuntimeError): the handler records the signal, the first check of `requested` says it."""
    from vlm_caption.interrupts import Interrupted, StopSignals

    with StopSignals() as stop, caplog.at_level(logging.WARNING):
        with stop.graceful():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs at the next bytecode of the main thread
            assert stop.signum == signal.SIGTERM and not caplog.records
            assert stop.requested and stop.requested
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and said[0].startswith("SIGTERM received: stopping after writing")
        with pytest.raises(Interrupted):
            stop.raise_if_requested()
