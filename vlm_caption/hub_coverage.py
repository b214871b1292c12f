"""--check-hub: prove from the Hub itself that a run publishes every selected key exactly once.

The local dirs are only a cache of the Hub. After a run spread over machines, each with its own checkpoint dir
and all pushing to one repo, no local dir holds every key, and --merge-only counts a key that another dir
published as missing. This reads the run's data files on the Hub (their `key` and `sha256` columns only, through
the dir's key cache, as a push does) and the failures each dir recorded in runs/{run_id}.json. It then counts them
against the selection of the data dir, as --merge-only does with local parts.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import dataset, store
from .atomic import atomic_write_json
from .cli import plural
from .config import RunConfig, resolve_repo_id
from .errors import EXIT_COVERAGE, EXIT_ITEMS_FAILED, EXIT_OK, UsageError
from .image_match import hub_match

HUB_COVERAGE = store.HUB_COVERAGE  # in the checkpoint dir: the counts and the full key lists


def check_hub(hub_client, cfg: RunConfig, run_id: str, named_by_flags: bool = False,
              path_named: str | None = None, settings: dict | None = None, typed: str | None = None) -> int:
    """Count the run's published keys on the Hub against the selection; exit code as --merge-only's.
    `named_by_flags`: the run id comes from this command's settings, not from a dir the run wrote.
    `path_named`: the id an earlier version gave those settings (a local --model named by its path,
    run_identity.py), checked when the repo holds nothing of `run_id`; `settings`: those flags', whose run the repo
    may hold as an earlier version spelled them (run_identity.same_settings), checked then too; `typed`: the id an
    earlier version gave these flags as typed, checked then too (its runs/{run_id}.json may not be written yet)."""
    from .hub_index import run_data_dir
    from .hub_types import disagreements
    from .hub_retry import HubUnavailable  # (huggingface_hub is imported only by runs that use the Hub)

    try:
        snap = hub_client.snapshot(run_id)
        index = hub_client.index(run_id)
        infos = hub_client.run_infos(run_id, snap.head)  # retried, as the listing is
    except HubUnavailable as e:  # retryable (README): nothing was decided
        return unreachable(hub_client.repo_id, e, hub_client.api.endpoint)
    info = infos.get(run_id)
    if not snap.files and info is None and path_named and path_named in snap.other_runs:
        # Published by an earlier version (dirs it made go on as that run): the run these flags made there
        print(f"{hub_client.repo_id} holds nothing of run {run_id}; checking run {path_named}, the run of these "
              "settings as earlier versions named it (by the --model dir's path)")
        return check_hub(hub_client, cfg, path_named, named_by_flags)
    if not snap.files and info is None and settings is not None:
        from .run_identity import earlier_run

        found = earlier_run(snap.other_runs, lambda: infos, settings, typed)
        if found:
            print(f"{hub_client.repo_id} holds nothing of run {run_id}; checking run {found}, the run of these "
                  "settings as an earlier version named them")
            return check_hub(hub_client, cfg, found, named_by_flags)
    if not snap.files and info is None:  # the repo never heard of it: other flags, or another repo
        others = f"; it holds run(s) {', '.join(snap.other_runs)}" if snap.other_runs else ""
        if named_by_flags:
            raise UsageError(f"{hub_client.repo_id} holds no data of run {run_id}{others}: check with the "
                             "--checkpoint-dir the run wrote, or with the flags it ran with")
        # A dir's run: counting would list every key as missing (exit 4), and a rerun would caption it all again
        raise UsageError(f"{hub_client.repo_id} holds no data of run {run_id}, the run of {cfg.checkpoint_dir}"
                         f"{others}: is it the --hf-repo that run pushed to? (--push-only pushes what the dir holds)")
    recorded = (info or {}).get("failed_keys_by_dir") or {}
    recorded = recorded if isinstance(recorded, dict) else {}  # edited by hand: no failures recorded
    on_hub = Counter(k for file in snap.files.values() for k in index.keys_of_file(file))
    match = hub_match(hub_client.repo_id, run_id, snap.images(), "Check with the --data-dir that run captioned",
                      "counted as published, of the image as it was")  # published, but of the data dir's images?
    plan = dataset.plan_run(cfg, matches=[match], reads_images=False)  # (a count: no image is read)
    expected = plan.todo_keys
    # Counted within the selection, as its keys are: a check of some shards (or of --max-images) is not failed
    # by a retryable failure or a duplicate outside them, and published + failed + missing = expected.
    published = Counter({k: n for k, n in on_hub.items() if k in expected})
    failed = {k: stage for keys in recorded.values() if isinstance(keys, dict)
              for k, stage in keys.items() if k in expected and k not in published}
    missing = sorted(expected - published.keys() - failed.keys())
    twice = {k: n for k, n in sorted(published.items()) if n > 1}
    outside = len(on_hub.keys() - expected)
    coverage = {"repo": hub_client.repo_id, "run_id": run_id, "commit": snap.head, "files": len(snap.files),
                "expected": len(expected), "published": len(published), "failed": len(failed),
                "missing": len(missing), "duplicated": len(twice), "missing_keys": missing,
                "duplicated_keys": twice, "failed_keys": dict(sorted(failed.items())),
                "unexpected_keys": outside, "unreadable_files": snap.unreadable, "foreign_files": snap.foreign,
                "hidden_files": snap.hidden}
    mixed = disagreements(snap.entries)  # load_dataset casts every file to the first one's types (or fails)
    coverage["type_disagreements"] = mixed
    out = Path(cfg.checkpoint_dir) / HUB_COVERAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, coverage)
    print(f"{hub_client.repo_id} at {snap.head[:8]}, run {run_id} ({plural(len(snap.files), 'file')}): "
          f"{len(expected)} expected, {len(published)} published, {len(failed)} failed, {len(missing)} missing, "
          f"{len(twice)} published more than once" + (f" ({outside} more outside the selection)" if outside else ""))
    if snap.unreadable:  # their rows, if any, are not counted: their keys show as missing
        print(f"  unreadable files (first 5), which the run's dataset config cannot load: delete or replace them: "
              f"{', '.join(snap.unreadable[:5])}")
    if snap.foreign:  # the run's config loads them: their rows are counted, the files named for a look
        print(f"  files in {run_data_dir(run_id)}/ this tool did not write for the run (first 5; their rows are "
              f"counted, as the run's dataset config loads them): "
              + "; ".join(f"{p} ({why})" for p, why in sorted(snap.foreign.items())[:5]))
    if snap.hidden:  # named: their rows count as missing, since the config does not load them
        print(f"  hidden files (first 5), which the run's dataset config does not load (their rows are not "
              f"counted): {', '.join(snap.hidden[:5])}")
    for name, kinds in mixed.items():
        print(f"  column {name} has {len(kinds)} types in the run's files, which load_dataset casts to one (or "
              f"fails on): " + "; ".join(f"{kind} in {len(paths)} file(s), e.g. {paths[0]}" for kind, paths in
                                         kinds.items()) + "; rewrite the files of the other type(s) cast to one "
              "type, keys and names unchanged, in one commit")
    if missing:
        print(f"  missing (first 20): {', '.join(missing[:20])}")
    if twice:
        print(f"  published more than once (first 20): {', '.join(f'{k} x{n}' for k, n in list(twice.items())[:20])}")
    print(f"  full lists in {out}")
    if missing or twice or snap.unreadable or mixed:  # (load_dataset of the config fails on an unreadable file)
        return EXIT_COVERAGE
    retryable = any(stage == "generate" for stage in failed.values())  # the exit policy of --merge-only
    return EXIT_ITEMS_FAILED if retryable or (cfg.strict and failed) else EXIT_OK


def unreachable(repo_id: str, e: Exception, endpoint: str | None) -> int:
    from huggingface_hub import constants

    at = endpoint or constants.ENDPOINT  # (HF_ENDPOINT, else huggingface.co): which Hub, where it is not said
    where = "" if at in str(e) else f" at {at}"
    print(f"could not read {repo_id} from the Hub{where}: {e}; rerun --check-hub when it is reachable")
    return EXIT_ITEMS_FAILED


def run_check(cfg: RunConfig) -> int:
    """--check-hub: the run is the checkpoint dir's (its run.json), else the one this command's settings name."""
    from . import hub

    ckpt = Path(cfg.checkpoint_dir)
    existing = store.read_run_json(ckpt) if ckpt.is_dir() else None
    settings = None if existing else cfg.run_settings()
    run_id = existing["run_id"] if existing else store.run_id_for(settings)
    repo_id = resolve_repo_id(cfg.hf_repo, cfg.hf_username)
    try:
        client = hub.connect_reader(repo_id, endpoint=cfg.hub_endpoint, checkpoint_dir=ckpt)
    except hub.HubUnavailable as e:  # down from the first request: retryable, as when it fails later (exit 3)
        return unreachable(repo_id, e, cfg.hub_endpoint)
    print(f"run {run_id}, " + (f"the run of {ckpt}" if existing else "the run this command's settings name"))
    return check_hub(client, cfg, run_id, named_by_flags=existing is None,
                     path_named=None if existing else store.path_named_run_id(settings), settings=settings,
                     typed=None if existing else store.run_id_for(cfg.typed_settings()))
