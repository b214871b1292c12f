"""--dry-run: what a real run of these flags would do, from the checkpoint dir and the Hub as they are now;
nothing is loaded, written or pushed."""
from __future__ import annotations

from pathlib import Path

from . import dataset, store
from .cli import duration
from .config import RunConfig, resolve_repo_id
from .endings import measured_rate
from .errors import EXIT_OK, FatalError, UsageError
from .image_match import dir_match, hub_match


def dry_run(cfg: RunConfig, settings: dict, worker: int, num_workers: int, columns: tuple) -> int:
    ckpt = Path(cfg.checkpoint_dir)
    existing, problem = store.read_run_json_safe(ckpt)
    reader = store.CheckpointStore(ckpt, worker, quarantine_bad=False) if ckpt.is_dir() else None
    if reader is not None and existing is not None:
        reader.run_id = existing["run_id"]
    done_images = reader.done_images() if reader else {}
    done = set(done_images)
    failed = set() if cfg.retry_failed or reader is None else reader.failed_keys()
    holds_work = bool(done or failed)
    other_run = existing is not None and not store.is_run_of(existing, settings)
    # run.json lost: a real run re-adopts the parts only when they are of its run (store), else it refuses
    runs = {r for r, _ in reader._provenance()} if reader is not None and existing is None else set()
    orphans = runs and runs not in ({store.run_id_for(settings)}, {store.path_named_run_id(settings)})
    if other_run or orphans:  # a real run starts over (--overwrite): the old run's keys are not done for it
        done, failed, done_images = set(), set(), {}
    matches = [dir_match(f"--checkpoint-dir {ckpt}", done_images)]
    hub_only: set[str] = set()
    hub_note = None
    if not cfg.no_push:  # a pushing run skips what any dir or machine already published: so does its plan
        run_id = existing["run_id"] if existing is not None and not other_run else store.run_id_for(settings)
        hub_keys, hub_images, hub_note = published_keys(cfg, run_id)
        hub_only = hub_keys - done
        done |= hub_keys
        if hub_images is not None:
            matches.append(hub_match(resolve_repo_id(cfg.hf_repo, cfg.hf_username), run_id, hub_images))
    plan = dataset.plan_run(cfg, worker=worker, num_workers=num_workers, done_keys=done, failed_keys=failed,
                            hub_only=hub_only, matches=matches)  # as the run would
    rate = measured_rate(ckpt)
    eta = f"{duration(plan.todo / rate)} at the last measured {rate:.2f} img/s" if rate else \
        "unknown (no earlier run in this checkpoint dir to measure a rate from)"
    print(f"plan for worker {worker} of {num_workers} (model {cfg.model}, nothing loaded):")
    print(f"  selected {plan.selected}, this worker's share {plan.mine}")
    print(f"  to do {plan.todo}, already done {plan.done}"
          + (f" ({plan.done_hub_only} of them on the Hub only)" if plan.done_hub_only else "")
          + f", failed before {plan.failed}" + (" (skipped; --retry-failed to redo)" if plan.failed else ""))
    print(f"  estimated time: {eta}")
    if hub_note:
        print(f"  note: {hub_note}")
    print_first_prompts(cfg, plan, *columns)
    if other_run:
        print(f"  note: {ckpt} holds another run ({existing['run_id']}); " + (
            ("a real run with --overwrite moves it to superseded/ first" if cfg.overwrite else
             "a real run needs --overwrite or another --checkpoint-dir") if holds_work else
            "it captioned nothing, so a real run replaces its settings"))
    elif orphans:
        print(f"  note: {ckpt / store.RUN_JSON} is {problem} and the parts are of run(s) "
              f"{', '.join(sorted(r or 'unrecorded' for r in runs))}, not of this run: a real run needs the settings "
              "that made them, or --overwrite")
    elif existing is None and problem != "missing":
        print(f"  note: {ckpt / store.RUN_JSON} is {problem}; a real run re-adopts parts of this run only "
              "(else it needs --overwrite)")
    return EXIT_OK


def published_keys(cfg: RunConfig, run_id: str) -> tuple[set[str], dict | None, str | None]:
    """(keys the Hub publishes for the run, their images for the data-dir check or None, a note on what the
    plan could not count or what the real run would refuse), read-only and with whatever token there is."""
    from . import hub
    from .hub_retry import RetryPolicy

    repo_id = resolve_repo_id(cfg.hf_repo, cfg.hf_username)
    retry = RetryPolicy(tries=3, max_retry_after=10)  # fewer tries than a run's: a plan waits seconds, not minutes
    unread = "keys already on the Hub are not counted"
    try:
        client = hub.connect_reader(repo_id, endpoint=cfg.hub_endpoint, retry=retry, look_up=False,
                                    checkpoint_dir=cfg.checkpoint_dir, keep_keys=False)  # the dir's keys, unwritten
    except UsageError as e:  # offline mode
        return set(), None, f"{unread}: {e}"
    note = None
    try:
        if client.has_token:  # the real run's first check: a refusal is then all it does
            try:
                hub.check_write_access(client)
            except UsageError as e:
                return set(), None, f"a real run of these flags would stop at once: {e}"
        else:
            note = "no Hugging Face token here: a real run that pushes needs one (hf auth login, or HF_TOKEN)"
        hub.look_up_repo(client)
        snap = client.snapshot(run_id)
    except UsageError as e:  # a repo this token cannot see, a refused lookup
        if "no dataset repo" in str(e) and client.has_token:
            return set(), None, None  # a first run creates it
        return set(), None, f"{unread}: {e}" + (f"; {note}" if note else "")
    except FatalError as e:  # unreachable, after the retries
        return set(), None, f"{unread} (the Hub could not be read: {e})"
    return snap.keys, snap.images(), note


def print_first_prompts(cfg: RunConfig, plan: dataset.WorkPlan, extra: list, specs: list, also: list[str]) -> None:
    """--dry-run: the prompt(s) of the first selected row as the model would get them."""
    first = min(plan.todo_keys or plan.data_keys or {""})
    row = next(iter(dataset.iter_rows(Path(cfg.data_dir), {first}, extra, also, shards=plan.shards)),
               None) if first else None
    if row is None:
        print("  prompt: no selected row to render it for")
        return
    for spec in specs:
        print(f"  prompt{f' {spec.name}' if spec.name else ''} of the first selected row ({first}):")
        print("    " + spec.render(row).replace("\n", "\n    "))
