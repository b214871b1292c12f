"""The dataset card of a Hub repo: README.md and runs/{run_id}.json, written in one commit (split from hub.py)."""
from __future__ import annotations

import json
import time
from collections import Counter

from huggingface_hub import CommitOperationAdd

from .card import published_model, render_dataset_card, showable
from .hub_index import REPO_TYPE, is_legacy_file, run_info_path
from .rows import flags_by_prompt, ordered_counts, run_flag_columns


def write_card(client, run_info: dict, summary: dict, failed_keys: dict[str, str] | None = None) -> str:
    """README.md and runs/{run_id}.json in one commit; returns the card. Rows and flag counts are the Hub's
    own; failures are keys (key -> stage) that some dir of the run recorded and no dir published: each
    dir_id's are kept in runs/{run_id}.json, added to what it recorded before less the keys published since."""
    run_id, dir_id = run_info["run_id"], run_info.get("dir_id") or "legacy"
    failed = (summary.get("checkpoint_dir") or {}).get("failed_by_stage", summary.get("failed", {}))
    card_text = ""

    def attempt() -> None:
        nonlocal card_text
        snap = client.index(run_id).snapshot()
        # Another run whose data is gone (deleted by hand) gets no config: as the default it broke load_dataset
        runs = {r: info if r in (run_id, *snap.other_runs) else {**info, "rows": 0} for r, info in
                client.index(run_id).read_run_infos(snap.head).items() if r == run_id or showable(info)}
        # The run started when its first dir did; a dir that gave no keys (an older version) counts as is.
        before = runs.get(run_id) or {}
        by_dir = before.get("failed_keys_by_dir")  # (a dir's entry edited by hand into another shape: dropped)
        by_dir = {d: ks for d, ks in by_dir.items() if isinstance(ks, dict)} if isinstance(by_dir, dict) else {}
        before = before if not before or showable(before, mine=True) else {}  # edited by hand: rewritten
        if failed_keys is not None:  # merged: copies of a dir (`cp -r`) share its dir_id but fail other keys
            by_dir[dir_id] = {k: st for k, st in by_dir.get(dir_id, {}).items() if k not in snap.keys} | failed_keys
        still = {k: stage for keys in by_dir.values() for k, stage in keys.items() if k not in snap.keys}
        counted = dict(Counter(still.values())) if by_dir else (failed if isinstance(failed, dict) else {})
        mine = {**{k: v for k, v in run_info.items() if k != "dir_id"}, "rows": len(snap.keys),
                "model": published_model(run_info, before),
                "files": len(snap.files), "failed_keys_by_dir": by_dir, "failed_by_stage": counted,
                "caption_flags": ordered_counts(client.index(run_id).flag_counts(snap)),
                **flags_by_prompt(run_flag_columns(run_info),  # each prompt's, not the first's only
                                  lambda column: ordered_counts(client.index(run_id).flag_counts(snap, column))),
                "created": min(filter(None, (before.get("created"), run_info.get("created"))), default=None),
                "legacy_files": any(map(is_legacy_file, snap.files))}
        unchanged = {k: v for k, v in before.items() if k != "updated"} == mine and "updated" in before
        # Nothing new keeps the old time: both files are then byte-identical and no commit is made (a fresh
        # time made every --push-only and every run end with nothing to push spend a commit).
        mine["updated"] = before["updated"] if unchanged else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        runs[run_id] = mine
        card_text = render_dataset_card(client.repo_id, list(runs.values()))
        ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()),
               CommitOperationAdd(path_in_repo=run_info_path(run_id),
                                  path_or_fileobj=(json.dumps(mine, indent=2, sort_keys=True) + "\n").encode())]
        client.api.create_commit(client.repo_id, ops, commit_message=f"Update dataset card (run {run_id})",
                                 repo_type=REPO_TYPE, parent_commit=snap.head)

    with client._lock:
        client._against_head(attempt, "card update")
    return card_text
