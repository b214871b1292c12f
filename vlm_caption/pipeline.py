"""The captioning run: dataset -> captioner -> store -> hub, joined by plain rows.

Each row either becomes a caption in a part file or a failure record with its stage and reason;
nothing is skipped silently. A crash loses at most the rows not yet written to a part.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import compile_cache, dataset, dir_scope, hub_coverage, prompt_plan, store, workers
from .atomic import remove_stale_tmp
from .caption_loop import caption_all
from .config import RunConfig, resolve_repo_id
from .dry_run import dry_run
from .endings import finish, merge_and_check, push_only
from .errors import FatalError, UsageError
from .image_match import dir_match, hub_match
from .interrupts import StopSignals
from .schema import output_schema

log = logging.getLogger(__name__)

FINAL_PUSH_AFTER_SIGNAL_S = 20.0  # Slurm sends SIGKILL 30-90 s after SIGTERM


@dataclass
class RunStats:
    started: float = field(default_factory=time.monotonic)
    captioned: int = 0
    tokens: int = 0
    generate_s: float = 0.0  # time inside generate calls: the accelerator's share of the wall time
    failed: Counter = field(default_factory=Counter)
    flags: Counter = field(default_factory=Counter)  # captions per quality flag (quality.FLAGS)
    flags_by_prompt: dict[str, Counter] = field(default_factory=dict)  # --prompts-file: the same, per prompt
    first_batch: tuple[float, int, int] | None = None  # (time, captioned, tokens) when the first batch was done
    ended: float | None = None  # when the captioning ended: the final Hub push is no captioning time
    compile_cache: dict | None = None  # graphs torch.compile loaded from its cache and compiled (compile_cache.py)
    decoding: dict | None = None  # how the captions were decoded: batch size, loop, cache (run_summary.json)

    def batch_done(self) -> None:
        if self.first_batch is None:
            self.first_batch = (time.monotonic(), self.captioned, self.tokens)

    def rates(self) -> dict[str, float | None]:
        """Whole-run rates (model loading included) and the steady rate after the first batch (for estimates)."""
        now = time.monotonic()
        wall = max(now - self.started, 1e-9)
        steady = None
        if self.first_batch is not None and self.captioned > self.first_batch[1]:
            since, done, tokens = self.first_batch
            steady = round((self.captioned - done) / max((self.ended or now) - since, 1e-9), 3)
        return {"wall_s": round(wall, 2), "img_per_s": round(self.captioned / wall, 3),
                "captioning_img_per_s": steady, "tokens_per_s": round(self.tokens / wall, 1),
                "generate_share": round(self.generate_s / wall, 3)}


def run(cfg: RunConfig) -> int:
    cfg.validate()
    # A bad --compile-cache is one line before any write; the modes that caption nothing make no cache dir.
    compiled_into = None if cfg.merge_only or cfg.check_hub or cfg.push_only or cfg.dry_run else \
        compile_cache.choose(cfg.compile_cache, cfg.checkpoint_dir)
    worker, num_workers = cfg.worker_slice()
    if cfg.merge_only:
        with StopSignals():  # SIGTERM as Ctrl-C: exit 143 with its line (writes are atomic), not a bare kill
            return merge_and_check(cfg)
    if cfg.check_hub:  # what the Hub holds, whatever this machine's dirs hold
        with StopSignals():
            return hub_coverage.run_check(cfg)
    ckpt = Path(cfg.checkpoint_dir)
    # --push-only pushes the run its dir's run.json names: the --model files are not read (a login node, say)
    settings = {} if cfg.push_only else cfg.run_settings()
    extra, specs, also = [], [], []
    if not cfg.push_only:  # a template naming an unknown column fails here, before any work
        extra, specs, also = plan_columns(cfg, settings)
    if cfg.dry_run:
        return dry_run(cfg, settings, worker, num_workers, (extra, specs, also))

    if (cfg.resume and cfg.no_push and worker == 0 and not (ckpt / store.RUN_JSON).exists()
            and not store.list_parts(ckpt)):  # (pushing, a fresh dir resumes from what the Hub holds)
        log.warning("--resume: %s holds no run yet, so a new one starts there (a typo in --checkpoint-dir?)", ckpt)
    existing = None
    if cfg.push_only:  # pushes the run the dir holds, whatever the generation flags of this command say
        existing = store.read_run_json(ckpt)
        if existing is None:
            raise UsageError(f"--checkpoint-dir {ckpt} holds no run.json" + ("" if ckpt.exists() else " (no such dir)")
                             + ": nothing to push; give the --checkpoint-dir of the run to push")
    if existing is not None:
        with StopSignals():  # a commit lands whole or not at all: stopping between them loses nothing
            return push_only(cfg, existing)  # (it connects: a Hub down from the start is retryable there, exit 3)
    hub_client = None
    if not cfg.no_push:  # before the model loads: a bad token must not cost GPU time
        from . import hub

        from .hub_retry import HubUnavailable

        try:
            hub_client = hub.connect(resolve_repo_id(cfg.hf_repo, cfg.hf_username), private=cfg.private,
                                     endpoint=cfg.hub_endpoint, checkpoint_dir=ckpt, way_out="or pass --no-push")
        except HubUnavailable as e:  # the line said what failed, not what to do next
            raise HubUnavailable(f"{e}; {HUB_DOWN_NEXT_STEP}") from None
    writer = store.CheckpointStore(ckpt, worker, schema=output_schema([*extra, *prompt_columns(specs)]),
                                   num_workers=num_workers)
    run_id = writer.open_run(settings, cfg.overwrite, wait_for_leader=not workers.leads_its_machine(),
                             find_run_id=lambda: published_as(hub_client, writer, settings, cfg.typed_settings()))
    try:
        dir_scope.check_machines(ckpt, *workers.machine_slice(cfg.num_workers, cfg.worker_index),  # before the model
                                 nodes=(workers.node_slice() or (0, 1))[1], launch=workers.launch_id())
        with StopSignals() as stop:
            return _run_open(cfg, writer, run_id, worker, num_workers, hub_client, stop, compiled_into, settings)
    finally:
        writer.lock.release()


HUB_DOWN_NEXT_STEP = "rerun when it is reachable, or caption with --no-push and push the checkpoint dir later " \
                     "with --push-only"


def published_as(hub_client, writer: store.CheckpointStore, settings: dict, typed: dict | None = None) -> str | None:
    """A new dir's run as the Hub already holds it: the id of a run published with another spelling of these
    settings (a greedy run launched with --seed 7 by an earlier version, say; run_identity.canonical_settings), so
    this dir publishes into that run's folder, not each key a second time into a folder of its own. A dir whose
    run.json is lost but whose parts took such an id is that run again. None: the id of these settings (no Hub, a
    dir whose run.json names its run, parts of these settings' own id, a Hub run not yet described by
    runs/{run_id}.json). `typed`: these flags as typed (RunConfig.typed_settings): the id an earlier version gave
    them is this run's even before that run's first process has ended and written runs/{run_id}.json (a machine
    not yet upgraded that has been captioning for days under --seed 7 has written none)."""
    if hub_client is None or store.read_run_json_safe(writer.dir)[0] is not None:
        return None
    from .hub_retry import HubUnavailable
    from .run_identity import earlier_run, run_id_for

    own = run_id_for(settings)
    recorded = writer.recorded_runs()  # parts of a dir whose run.json is gone: only the run they name can be it
    if recorded and (len(recorded) != 1 or recorded == {own} or None in recorded):
        return None  # store.open_run decides, as for any dir
    try:
        snap = hub_client.snapshot(own)
        if snap.files or not snap.other_runs:
            return None
        found = earlier_run(snap.other_runs, lambda: hub_client.run_infos(own, snap.head), settings,
                            run_id_for(typed) if typed is not None else None, recorded or None)
    except HubUnavailable as e:  # as at connect (a moment before): exit 1, with what to do next
        raise HubUnavailable(f"{e}; {HUB_DOWN_NEXT_STEP}") from None
    if found:
        log.info("Hub: run %s of %s holds these settings as an earlier version named them: this dir goes on "
                 "as that run", found, hub_client.repo_id)
    return found


def plan_columns(cfg: RunConfig, settings: dict) -> tuple[list, list[prompt_plan.PromptSpec], list[str]]:
    """(--keep-columns as registry columns, the run's prompts, metadata columns read for the prompts only)."""
    extra = dataset.extra_columns(Path(cfg.data_dir), cfg.kept_columns())
    specs = prompt_plan.run_specs(settings)
    names = [n for n in output_schema(extra).names]
    also = prompt_plan.prompt_columns(specs, names, dataset.metadata_names(Path(cfg.data_dir)))
    prompt_plan.check_distinct_columns(output_schema([*extra, *prompt_columns(specs)]).names)
    return extra, specs, also


def prompt_columns(specs: list[prompt_plan.PromptSpec]) -> list:
    return [c for spec in specs for c in spec.output_columns()]


def _run_open(cfg: RunConfig, writer: store.CheckpointStore, run_id: str, worker: int, num_workers: int,
              hub_client, stop: StopSignals, compiled_into: Path | None, settings: dict) -> int:
    ckpt = writer.dir
    remove_stale_tmp(ckpt)
    failed_stages = {} if cfg.retry_failed else writer.failed_stages()
    failed_keys = set(failed_stages)
    done_images = writer.done_images()
    done_keys = set(done_images)
    matches = [dir_match(f"--checkpoint-dir {ckpt}", done_images)]
    hub_only: set[str] = set()
    if hub_client is not None:  # rows another dir or machine already published are not captioned again
        snap = hub_client.snapshot(run_id)  # one read of the repo serves the line below and the skip
        log.info(hub_client.describe_repo(run_id, snap))
        hub_only = snap.keys - done_keys  # every worker's: plan_work counts this worker's share
        done_keys |= snap.keys
        matches.append(hub_match(hub_client.repo_id, run_id, snap.images()))  # not done if of other images
    plan = dataset.plan_run(cfg, worker=worker, num_workers=num_workers, done_keys=done_keys,
                            failed_keys=failed_keys, hub_only=hub_only, matches=matches)
    del matches, done_images  # not held through the run (~60 MB each at 400K rows)
    log.info("worker %d/%d: %d selected, %d mine, %d done (%d of them on the Hub only), %d failed before, "
             "%d to caption", worker, num_workers, plan.selected, plan.mine, plan.done, plan.done_hub_only, plan.failed,
             plan.todo)
    if not plan.selected:  # exit 0 with "captioned 0 images" said nothing of why
        log.warning("%s lists no images%s: nothing to caption (the download's stats say why)", cfg.data_dir,
                    f" in shards {cfg.shards}" if cfg.shards else "")
    plan.failed_retryable = sum(1 for k, stage in failed_stages.items()
                                if stage == "generate" and k in plan.failed_keys)
    if plan.keyless:
        writer.write_failures([{"key": k, "original_key": None, "url": None, "stage": "load",
                                "error": "the metadata row has no key (null or empty): it cannot be captioned"}
                               for k in plan.keyless])
    stats = RunStats()
    pusher = None
    if hub_client is not None:
        from .hub_pusher import BackgroundPusher

        pusher = BackgroundPusher(hub_client, ckpt, run_id, worker, push_every=cfg.push_every,
                                  min_push_interval=cfg.push_interval(num_workers), num_workers=num_workers)
        try:  # a resumed run's backlog goes out with the first push, not after push_every new rows
            pusher.notify(hub_client.pending_rows(ckpt, run_id, worker))
        except FatalError as e:
            log.warning("could not check the Hub for unpushed parts (%s); they go out with the next push", e)
    try:
        if plan.todo:
            with compile_cache.using(compiled_into) as compiles:
                caption_all(cfg, plan, writer, stats, pusher, stop=stop, settings=settings)
            stats.compile_cache = compiles.report_or_why_not(cfg.backend, cfg.compile)
    finally:
        # After a signal the Hub gets a bounded last chance; the rest waits for the next run or --push-only.
        timeout = FINAL_PUSH_AFTER_SIGNAL_S if stop.requested or sys.exc_info()[0] is not None else None
        stats.ended = time.monotonic()
        pushed_all = pusher.close(final=True, timeout=timeout) if pusher is not None else True
    return finish(cfg, writer, worker, num_workers, plan, stats, hub_client, pushed_all,
                  push_refused=pusher.refused if pusher is not None else None)
