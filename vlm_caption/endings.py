"""The end of a captioning run and the modes that caption nothing: merge, summary and card, exit code,
--push-only, --merge-only (--dry-run: dry_run.py). Split from pipeline.py, which re-exports these names.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from . import dataset, rows as rowcols, store, workers
from .atomic import atomic_write_json, remove_stale_tmp
from .cli import plural
from .config import RunConfig, resolve_repo_id
from .errors import EXIT_COVERAGE, EXIT_FATAL, EXIT_ITEMS_FAILED, EXIT_OK, FatalError, UsageError
from .image_match import dir_match, hub_match, parts_images
from .interrupts import Interrupted
from .locks import DirLock
from .merge import merge_parts
from .run_identity import one_run

if TYPE_CHECKING:
    from .pipeline import RunStats

log = logging.getLogger("vlm_caption.pipeline")  # the messages users know, under the name they had


def still_failed(dirs: list[Path], captioned: set[str]) -> dict[str, dict]:
    """key -> failure record (key, stage, error) of every failed key that no later run captioned."""
    failed: dict[str, dict] = {}
    for d in dirs:  # a failure file of another run is set aside, as its parts are (merge.py)
        run_id = (store.read_run_json_safe(d)[0] or {}).get("run_id")
        failed.update((k, row) for k, row in store.failure_records(d, run_id=run_id).items() if k not in captioned)
    return failed


def finish(cfg: RunConfig, writer: store.CheckpointStore, worker: int, num_workers: int, plan: dataset.WorkPlan,
           stats: RunStats, hub_client, pushed_all: bool, push_refused: str | None = None) -> int:
    """One merge per dir: the last worker to finish merges, writes the summary and the card; the others skip.
    `push_refused`: the Hub's answer when it refused this worker's pushes (exit 1: rerunning as is won't help)."""
    ckpt = writer.dir
    summary = {
        "run_id": writer.run_id, "worker": worker, "num_workers": num_workers, "model": cfg.model,
        "this_run": {"captioned": stats.captioned, "failed_by_stage": dict(stats.failed),
                     "caption_flags": rowcols.ordered_counts(stats.flags),
                     **rowcols.flags_by_prompt(stats.flags_by_prompt, rowcols.ordered_counts),
                     "skipped_already_done": plan.done, "skipped_failed_before": plan.failed, **stats.rates(),
                     **({"compile_cache": stats.compile_cache} if stats.compile_cache else {}),
                     **({"decoding": stats.decoding} if stats.decoding else {})},
        "selection": {"selected": plan.selected, "mine": plan.mine, "duplicate_input_keys": plan.duplicate_keys,
                      "unreadable_shards": plan.unreadable_shards},
        "hub": {"pushed_all": pushed_all} if hub_client is not None else None,
    }
    # --dry-run's estimate: this run's rate, or an earlier run's where this one captioned nothing
    rate = (summary["this_run"].get("captioning_img_per_s") or summary["this_run"].get("img_per_s")) \
        if stats.captioned else None
    if rate:
        save_rate(ckpt, rate)
    summary[LAST_RATE] = rate or measured_rate(ckpt)
    # A rank of this launch that has not reached the dir yet (still importing, or a quick rank of a relaunch
    # whose slice was done) will end after this one: it merges, not this one (a merge and a card too early).
    late = writer.lock.not_started(workers.sibling_workers(worker, num_workers))
    last_out = not late and writer.lock.last_one_out()
    if last_out:
        if hub_client is not None and pushed_all:  # (not after a failed push: --push-only takes them all later)
            pushed_all = push_left_behind(hub_client, ckpt, writer.run_id)
            summary["hub"]["pushed_all"] = pushed_all
        # keys of an unreadable shard are not keys of a removed one: none is left out of the merge
        summarise(ckpt, summary, None if plan.unreadable_shards else plan.data_keys, hub_client)
    elif late:
        print(f"\n{plural(len(late), 'other worker')} of this launch ({', '.join(map(str, late))}) of {ckpt} not "
              "started yet: the last one to finish merges the dir")
    else:
        print(f"\nother workers of {ckpt} are still running ({'; '.join(writer.lock.holders()) or 'ending now'}): "
              "the last one to finish merges the dir")
    failed_mine = sum(stats.failed.values()) + plan.failed + len(plan.keyless)  # (keyless: written by the pipeline)
    print_summary(summary, ckpt, failed_mine)
    code = exit_code(cfg, stats, plan, pushed_all, failed_mine, push_refused, ckpt,
                     card_written=(summary["hub"] or {}).get("card_written", True))
    if code != EXIT_OK and not last_out and workers.under_torchrun():
        wait_for_the_dir(writer.lock, code)
    return code


def exit_code(cfg: RunConfig, stats: RunStats, plan: dataset.WorkPlan, pushed_all: bool, failed_mine: int,
              push_refused: str | None, ckpt: Path, card_written: bool = True) -> int:
    # Exit policy (README): 0 when every selected image is captioned or recorded as a permanent data failure
    # (it cannot be loaded or decoded); 3 when work worth retrying remains: generation errors (now or recorded
    # before), unreadable shard metadata, unpushed rows or card (its error said so). --strict: any failure is 3.
    retryable = stats.failed["generate"] + plan.failed_retryable + len(plan.unreadable_shards)
    if plan.unreadable_shards:
        log.error("shards not read, their images were not captioned (rerun when they can be read): %s",
                  ", ".join(plan.unreadable_shards))
    if push_refused and not pushed_all:
        log.error("%s; every caption is kept in %s: fix the token or --hf-repo, then run --push-only",
                  push_refused, ckpt)
        return EXIT_FATAL
    if not pushed_all:
        log.error("some parts could not be pushed to the Hub; rerun with --push-only when it is reachable")
    if retryable or not (pushed_all and card_written) or (cfg.strict and failed_mine):
        return EXIT_ITEMS_FAILED
    return EXIT_OK


TORCHRUN_WAIT_POLL_S = 5.0
LAST_RATE = "last_measured_img_per_s"  # run_summary.json: kept through reruns that caption nothing


def wait_for_the_dir(lock, code: int) -> None:
    """Under torchrun, return only once no other process holds the dir. torchrun stops every worker of the
    job as soon as one exits non-zero: a worker ending with 3 (say, one unreadable shard of its slice) would
    kill the others mid-batch, at every relaunch. Its own hold goes first, so waiting workers never wait for
    each other; a signal still ends the wait at once (Interrupted)."""
    lock.release()
    if lock.holders():
        print(f"exit {code} waits for the other workers of {lock.dir.parent} to finish (torchrun stops every "
              "worker as soon as one exits non-zero)", flush=True)
    try:
        while lock.holders():
            time.sleep(TORCHRUN_WAIT_POLL_S)
    except Interrupted as e:  # torchrun ending the job, or Ctrl-C: this worker's work is done either way
        log.info("stopped waiting (%s); exit %d", e, code)


def push_left_behind(hub_client, ckpt: Path, run_id: str) -> bool:
    """The last process out of a dir also pushes what other workers of it left unpushed (one killed, run with
    --no-push, whose final push failed, or not relaunched because the next run has fewer workers): no other
    process holds the dir now, so none of them writes those parts. True when nothing of the dir is pending
    (a push that returns has committed everything its last look found, and nobody writes parts any more)."""
    try:
        rows = hub_client.push(ckpt, run_id, worker=None)
        if rows:
            log.info("pushed %s that other workers of %s had left unpushed", plural(rows, "row"), ckpt)
        return True
    except FatalError as e:  # HubUnavailable included: the parts stay, the exit code says so
        log.error("could not push the dir's other pending parts: %s", hub_client.describe(e))
        return False


def read_summary(ckpt: Path, set_aside: bool = True) -> dict:
    """run_summary.json, or {}. A broken one is set aside in quarantine/ with a warning (the next end of a run
    writes it anew); with set_aside False (--dry-run changes nothing) it is only warned about."""
    path = ckpt / store.SUMMARY
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
        if isinstance(summary, dict):
            return summary
        problem = "not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e)
    if set_aside:
        store.quarantine(ckpt, path, f"unreadable ({problem})", "going on without its counts")
    else:
        log.warning("%s is unreadable (%s); going on without its counts", path, problem)
    return {}


def summarise(ckpt: Path, summary: dict, data_keys: set[str], hub_client) -> None:
    """Merge the dir, add its counts to `summary`, write run_summary.json and the dataset card."""
    report = merge_parts([ckpt], ckpt / store.MERGED, data_keys=data_keys)
    failed = still_failed([ckpt], report.keys)
    summary["checkpoint_dir"] = {"captioned": len(report.keys), "failed": len(failed),
                                 "failed_by_stage": dict(Counter(r["stage"] for r in failed.values())),
                                 "duplicate_keys": len(report.duplicate_keys),
                                 "not_in_data": len(report.not_in_data),
                                 "caption_flags": rowcols.count_flags_in_file(ckpt / store.MERGED)}
    # --prompts-file: the counts of each prompt's captions (the plain counts are the first prompt's)
    named = rowcols.run_flag_columns(store.read_run_json_safe(ckpt)[0] or {})
    summary["checkpoint_dir"].update(rowcols.flags_by_prompt(
        named, lambda column: rowcols.count_flags_in_file(ckpt / store.MERGED, column)))
    write_summary(ckpt, summary)
    if hub_client is not None:
        try:
            hub_client.write_card(store.read_run_json(ckpt), summary, {k: r["stage"] for k, r in failed.items()})
        except FatalError as e:  # every local output is saved; the card can follow with --push-only
            log.error("could not write the dataset card: %s; rerun with --push-only later", e)
            summary["hub"]["card_written"] = False
            write_summary(ckpt, summary)


def write_summary(ckpt: Path, summary: dict) -> None:
    try:
        atomic_write_json(ckpt / store.SUMMARY, summary)
    except OSError as e:  # a full disk: the merge is written, only the counts are lost
        raise FatalError(f"could not write {ckpt / store.SUMMARY}: {e.strerror or e}; free space and rerun") from None


def save_rate(ckpt: Path, rate: float) -> None:
    """The rate a run of the dir measured, finished or stopped by a signal (a Slurm job at its time limit writes
    no run_summary.json): a file of its own, replaced whole, so no worker rewrites another's summary."""
    try:
        atomic_write_json(ckpt / store.RATE, {"img_per_s": rate, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except (OSError, UsageError) as e:  # a full disk, a dir in the way: only --dry-run's estimate is lost, and a
        # run stopped by a signal still ends as stopped (exit 143, not 2)
        log.warning("could not write %s: %s", ckpt / store.RATE, getattr(e, "strerror", None) or e)


def measured_rate(ckpt: Path) -> float | None:
    """The last img/s a run of this dir measured (last_rate.json; run_summary.json of a dir from before it), or
    None. Read only: an unreadable file is warned about (the summary) or passed over."""
    summary = read_summary(ckpt, set_aside=False)
    try:
        rate = json.loads((ckpt / store.RATE).read_text()).get("img_per_s")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        this = summary.get("this_run")
        earlier = (this.get("captioning_img_per_s") or this.get("img_per_s")) if isinstance(this, dict) else None
        rate = summary.get(LAST_RATE) or earlier
    return rate if isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate < float("inf") \
        else None


def _by_stage(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{stage} {n}' for stage, n in counts.items())})" if counts else ""


def _and_failed_before(n: int | None) -> str:
    return f", {n} failed before" if n else ""


def print_summary(summary: dict, ckpt: Path, failed_mine: int) -> None:
    this, total = summary["this_run"], summary.get("checkpoint_dir")
    steady = this.get("captioning_img_per_s")
    rates = (f" ({this['img_per_s']:.2f} img/s with model loading"
             f"{f', {steady:.2f} img/s after the first batch' if steady else ''}, {this['tokens_per_s']:.0f} tokens/s)"
             if this["captioned"] else "")
    print(f"\ncaptioned {plural(this['captioned'], 'image')} in {this['wall_s']:.1f} s{rates}; "
          f"failed {sum(this['failed_by_stage'].values())}{_by_stage(this['failed_by_stage'])}; "
          f"skipped {this['skipped_already_done']} already done"
          f"{_and_failed_before(this.get('skipped_failed_before'))}")
    named = this.get(rowcols.FLAGS_BY_PROMPT) or {}
    if any(named.values()):  # several prompts: a line each, or the flags of all but the first go unseen
        for name, counts in named.items():
            print(f"quality flags of this run's captions, prompt {name}: {rowcols.describe_counts(counts)}")
    elif this.get("caption_flags"):
        print(f"quality flags of this run's captions: {rowcols.describe_counts(this['caption_flags'])}")
    decoding = this.get("decoding") or {}
    if decoding.get("device_memory_gib"):  # room a larger --batch-size could use, or how close the run came
        print(f"GPU memory: peak {decoding['peak_memory_gib']:.1f} of {decoding['device_memory_gib']:.1f} GiB "
              f"at batch size {decoding['batch_size']}")
    if decoding.get("retry_calls"):  # what the second tries cost (retry_pool.py: 64 to a call on a GPU)
        print(f"second tries: {plural(decoding['retried_captions'], 'flagged caption')} generated again in "
              f"{plural(decoding['retry_calls'], 'call')}")
    if total is not None:
        gone = f"; {total['not_in_data']} no longer in the data dir (left out)" if total["not_in_data"] else ""
        print(f"checkpoint dir {ckpt}: {total['captioned']} captioned, {total['failed']} failed{gone}; "
              f"merged into {ckpt / store.MERGED}; summary in {ckpt / store.SUMMARY}")
    if failed_mine:
        print(f"{plural(failed_mine, 'image')} of this worker failed (reasons in {ckpt / store.FAILURES_DIR}); "
              "--retry-failed tries them again")


def push_only(cfg: RunConfig, run_info: dict, hub_client=None) -> int:
    """--push-only: what the dir holds unpushed, to the Hub (`hub_client`: tests pass one, else it connects)."""
    from . import hub  # (huggingface_hub is imported only by runs that push)
    from .hub_retry import HubUnavailable

    ckpt = Path(cfg.checkpoint_dir)
    repo_id = resolve_repo_id(cfg.hf_repo, cfg.hf_username)
    run_id = run_info["run_id"]
    remove_stale_tmp(ckpt)  # a killed push's half-kept keys (hub_keys/): a dir only pushed from never captions
    rows = 0
    try:
        hub_client = hub_client or hub.connect(repo_id, private=cfg.private, endpoint=cfg.hub_endpoint,
                                               checkpoint_dir=ckpt, way_out=None)
    except HubUnavailable as e:  # down from the first request: as retryable as a refused commit (README)
        log.error("Hub unavailable: %s", e)
        print(f"pushed 0 rows from {ckpt} to {repo_id}; rerun --push-only when the Hub is reachable")
        return EXIT_ITEMS_FAILED
    try:  # the first listing too: a Hub that lists nothing is as retryable as one that takes no commit (exit 3)
        snap = hub_client.snapshot(run_id)
        log.info(hub_client.describe_repo(run_id, snap))
        hub_match(hub_client.repo_id, run_id, snap.images(), kept="the Hub's captions of those keys stand, this "
                  "dir's are not pushed").see_all(hub_client.dir_images(ckpt, run_id).items()).check(
            f"--checkpoint-dir {ckpt}", "did this dir caption another data set?")  # its rows would not be pushed
        found = hub_client.pending_rows(ckpt, run_id)  # those this push does not commit, another pusher did
        rows = hub_client.push(ckpt, run_id, worker=None)  # (rows this process committed)
        pending = hub_client.pending_rows(ckpt, run_id)
        failed = still_failed([ckpt], set())  # those captioned since are on the Hub: the card leaves them out
        summary = read_summary(ckpt)
        hub_client.write_card(run_info, summary, {k: r["stage"] for k, r in failed.items()})
    except HubUnavailable as e:  # retryable (README): the rows stay in the parts for the next try
        log.error("Hub unavailable: %s", e)
        print(f"pushed {rows} rows from {ckpt} to {hub_client.repo_id}; rerun --push-only when the Hub is reachable")
        return EXIT_ITEMS_FAILED
    unusable = sorted(p.name for p in hub_client.unusable)
    others = max(0, found - rows - pending)  # rows written meanwhile are pending, not another pusher's
    print(f"pushed {rows} rows from {ckpt} to {hub_client.repo_id}"
          + (f"; {others} rows were pushed meanwhile by another process (found on the Hub)" if others else "")
          + (f"; {pending} rows still pending" if pending else "")
          + (f"; {plural(len(unusable), 'part')} not pushed ({', '.join(unusable[:5])}: see the warnings): a run "
             "of the captioning command sets them aside and captions their keys again" if unusable else "")
          + ("; every row of the dir is on the Hub" if not (pending or unusable) else ""))
    # The file as it is now (a worker may have ended during the push), its hub state only; not while a worker of
    # the dir runs: its end writes the file. The dir held meanwhile: the last worker out lets go of its worker id,
    # then merges and writes the file holding the dir (worker ids alone: its summary was overwritten by this one).
    lock = DirLock(ckpt, worker=-1)
    try:
        free = lock.hold_if_idle("--push-only writing run_summary.json")
        summary = read_summary(ckpt, set_aside=False) if free else {}
        if summary:
            summary["hub"] = {"pushed_all": not (pending or unusable), "card_written": True}
            write_summary(ckpt, summary)
    finally:
        lock.release()
    return EXIT_OK if not (pending or unusable) else EXIT_ITEMS_FAILED


def run_of_parts(ckpt: Path) -> dict:
    """A dir without run.json is of the run its parts record (one run, or a UsageError, as a run of it says)."""
    runs = {r for files, schema in ((store.list_parts(ckpt), store.OUTPUT_SCHEMA),
                                    (store.list_failure_files(ckpt), store.FAILURE_SCHEMA))
            for part in files if (r := store.check_file(part.path, schema).run_id)}
    if len(runs) > 1:
        raise UsageError(f"{ckpt} has no run.json and holds parts of runs {', '.join(sorted(runs))}: restore its "
                         "run.json (the other run's parts are then set aside), or move them out of parts/")
    return {"run_id": runs.pop()} if runs else {}


def merge_and_check(cfg: RunConfig) -> int:
    """--merge-only: merge one or more checkpoint dirs and prove every selected key is there once."""
    dirs = [Path(d) for d in cfg.checkpoint_dirs]
    for d in dirs:  # a typo (or an unmatched glob) must not pass as a dir whose keys are all "missing"
        if not d.is_dir():
            raise UsageError(f"--checkpoint-dir {d} does not exist; --merge-only merges the dirs runs wrote")
        if not (d / store.RUN_JSON).exists() and not store.list_parts(d):
            raise UsageError(f"--checkpoint-dir {d} holds no run (no run.json, no parts): nothing to merge")
    twice = [d for i, d in enumerate(dirs) if d.resolve() in {e.resolve() for e in dirs[:i]}]
    if twice:  # (a glob and a name of one dir, say) each of its keys would count as captioned twice: exit 4
        raise UsageError(f"--checkpoint-dir {twice[0]} is given twice (or by another path): give each dir once")
    infos = {str(d): store.read_run_json(d) or run_of_parts(d) for d in dirs}
    runs = {d: info.get("run_id") for d, info in infos.items()}
    # captions of another model or prompt must not be mixed in silently (dirs an earlier version named by the
    # model's path are of the run their path names: run_identity.one_run)
    if not one_run(list(infos.values())):
        raise UsageError("the checkpoint dirs hold different runs (settings differ): "
                         + ", ".join(f"{d}={r}" for d, r in runs.items()))
    out = dirs[0] / store.MERGED
    captioned = parts_images(dirs)  # (unreadable parts: merge_parts says so)
    plan = dataset.plan_run(cfg, matches=[dir_match("the checkpoint dir(s)", captioned)], reads_images=False)
    if captioned and not captioned.keys() & plan.data_keys:  # the merge would replace a good file with 0 rows
        raise UsageError(f"none of the {len(captioned)} captioned keys of the checkpoint dir(s) are in --data-dir "
                         f"{cfg.data_dir}: is it the data dir these runs captioned?")
    in_use = False
    for d in dirs:  # its rows not yet in a part count as missing: say why, or exit 4 reads as lost work
        live = DirLock(d, worker=-1).holders()
        in_use = in_use or bool(live)
        if live:
            log.warning("%s is still in use by %s: keys it has not written yet count as missing; --merge-only "
                        "again once it ends (its last worker merges the dir itself)", d, "; ".join(live))
    if plan.unreadable_shards:  # (their keys are not those of a removed shard: none is left out of the merge)
        log.error("shards not read, their keys are not counted: %s", ", ".join(plan.unreadable_shards))
    # The merge is written holding the dir it goes to, as its last worker's merge is: a worker ending while this
    # one read the parts merged the dir, and this older merge then replaced that file, its last part's rows gone.
    lock = DirLock(dirs[0], worker=-1)
    try:
        free = lock.hold_if_idle("--merge-only merging")
        report = merge_parts(dirs, out if free else None, data_keys=None if plan.unreadable_shards else
                             plan.data_keys)
    finally:
        lock.release()
    expected = plan.todo_keys  # failures of keys outside it (other --shards, a shard removed) are not its coverage
    counts = {"captioned": report.keys, "failed": {k: r for k, r in still_failed(dirs, report.keys).items()
                                                   if k in expected}}
    missing = sorted(expected - counts["captioned"] - set(counts["failed"]))
    # A narrower --shards / --max-images than the runs had: the other keys are said apart, and decide nothing
    outside = len(counts["captioned"] - expected)
    duplicated = [k for k in report.duplicate_keys if k in expected]
    coverage = {"expected": len(expected), "captioned": len(counts["captioned"] & expected),
                "failed": len(counts["failed"]), "missing": len(missing), "duplicated": len(duplicated),
                "missing_keys": missing, "duplicated_keys": duplicated,
                "duplicated_outside": len(report.duplicate_keys) - len(duplicated),
                "unexpected_keys": outside, "not_in_data": len(report.not_in_data),
                "checkpoint_dirs": [str(d) for d in dirs]}
    atomic_write_json(dirs[0] / store.COVERAGE, coverage)
    if free:
        print(f"merged {report.rows} rows from {report.parts} parts of {len(dirs)} dir(s) into {out}")
    else:
        print(f"counted {report.rows} rows in {report.parts} parts of {len(dirs)} dir(s); {out} not written: "
              f"{dirs[0]} is in use (its last worker merges it; --merge-only again once it ends)")
    print(f"coverage: {coverage['expected']} expected, {coverage['captioned']} captioned, {coverage['failed']} "
          f"failed, {len(missing)} missing, {len(duplicated)} captioned more than once"
          + (f" ({outside} more captioned outside the selection, {coverage['duplicated_outside']} of them more "
             "than once)" if outside else ""))
    if missing:
        print(f"  missing (first 20): {', '.join(missing[:20])}")
    if duplicated:
        print(f"  duplicated (first 20): {', '.join(duplicated[:20])}")
    print(f"  full lists in {dirs[0] / 'coverage.json'}")
    if duplicated or (missing and not in_use):
        return EXIT_COVERAGE
    if missing:  # a run still under way: work left, not a defect of the published set
        return EXIT_ITEMS_FAILED
    retryable = plan.unreadable_shards or any(r["stage"] == "generate" for r in counts["failed"].values())  # finish()
    return EXIT_ITEMS_FAILED if retryable or (cfg.strict and counts["failed"]) else EXIT_OK
