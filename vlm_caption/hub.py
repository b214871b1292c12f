"""Publish a checkpoint dir's captions to a Hub dataset repo: token check, pushes, ledger, retries, card.

The Hub is the source of truth for what is published (hub_index.py): every push first reads which keys the
repo already holds for this run, at a commit C, then commits only the other rows with C as its parent. A
commit that raced another writer (409/412) or whose answer was lost is planned again from a fresh read, so
a row is published once whatever wrote it: another dir, another machine, another worker count, a relaunch.

Hub layout (hub_files.py): data/{run_id}/{dir_id}-w{worker:03d}-{first:06d}-{last:06d}-{digest}.parquet holds
the unpublished rows of local parts first..last of one worker of one checkpoint dir (dir_id is made with the
dir), sorted by key. Each run has its own folder and its own config on the dataset card; runs/{run_id}.json
records its settings and counts.

hub_ledger.jsonl (hub_ledger.py) is a local record of the commits, checked against the repo's real files;
nothing is decided from it. The token never appears in a message of this module: every error text goes
through hub_retry.describe.
"""
from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HfUriError, RepositoryNotFoundError

from .cli import plural
from .errors import FatalError, UsageError
from .rows import conform
from .hub_files import (HUB_FILE_RE, ROW_GROUP_ROWS, HubFile, hub_file_bytes, plan_hub_files, rows_committed,
                        send_commit)
from .hub_index import DATA_DIR, REPO_TYPE, HubIndex, Snapshot, is_legacy_file, run_data_dir
from .hub_key_cache import KeyCache
from .hub_types import hub_targets
from .hub_ledger import append_ledger, ledger_entry, read_ledger
from .hub_retry import (HubUnavailable, RetryPolicy, bound_requests, call_with_retries, check_namespace, describe,
                        http_status, usable_token)
from .store import OUTPUT_SCHEMA, FileCheck, Part, check_file, list_parts, read_run_json

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_FILES_PER_COMMIT = 50  # the Hub's advice is 50-100 files a commit; a bigger backlog takes more
_LOGIN_HINT = "run `hf auth login` or set HF_TOKEN"  # (huggingface-cli: the older name of `hf`)


# ---------------------------------------------------------------- connecting

def connect(repo_id: str, *, private: bool = False, endpoint: str | None = None,
            retry: RetryPolicy | None = None, way_out: str | None = "or pass --no-push",
            checkpoint_dir: Path | str | None = None) -> HubClient:
    """Check the token and its write access, create the dataset repo if needed. Call before the model loads.

    `way_out` ends the messages of problems the user can also avoid by not pushing (the caller's own flag;
    None where pushing is the whole point, e.g. --push-only). `checkpoint_dir` keeps the keys of the Hub files
    read or pushed (hub_key_cache.py), for every worker of the dir and every relaunch; None: this process only."""
    tail = f" {way_out}" if way_out else ""
    if constants.is_offline_mode():
        raise UsageError(f"HF_HUB_OFFLINE is set, so nothing can be pushed; unset it{tail}")
    token = usable_token(get_token(), _LOGIN_HINT)  # HF_TOKEN, then the cached `hf auth login`
    if not token:
        raise UsageError(f"no Hugging Face token found: {_LOGIN_HINT}{',' if tail else ''}{tail}")
    client = HubClient(HfApi(endpoint=endpoint, token=token), repo_id, token, retry or RetryPolicy(),
                       KeyCache(checkpoint_dir))
    name = check_write_access(client)
    client._checked(lambda: _create_repo(client.api, repo_id, private), f"creation of dataset repo {repo_id}")
    log.info("Hub: pushing to dataset %s as %s", repo_id, name)
    return client


def check_write_access(client: HubClient) -> str:
    """The token's user name, when it may write to the client's repo (else a UsageError); reads only."""
    who = client._checked(client.api.whoami, "token check")
    if who.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise UsageError(f"the Hugging Face token of {who.get('name')} is read-only; create a write token at "
                         f"https://huggingface.co/settings/tokens, then {_LOGIN_HINT}")
    check_namespace(who, client.repo_id)
    return who.get("name")


def connect_reader(repo_id: str, *, endpoint: str | None = None, retry: RetryPolicy | None = None,
                   checkpoint_dir: Path | str | None = None, look_up: bool = True, keep_keys: bool = True) -> HubClient:
    """A client that only reads (--check-hub): with any token or none (a public repo); creates nothing. `look_up`:
    that the repo is there, first (else a UsageError). keep_keys=False: checkpoint_dir's keys serve, none are kept."""
    if constants.is_offline_mode():
        raise UsageError("HF_HUB_OFFLINE is set, so the Hub cannot be read; unset it")
    token = usable_token(get_token(), _LOGIN_HINT)
    client = HubClient(HfApi(endpoint=endpoint, token=token), repo_id, token, retry or RetryPolicy(),
                       KeyCache(checkpoint_dir, read_only=not keep_keys))
    return look_up_repo(client) if look_up else client


def look_up_repo(client: HubClient) -> HubClient:
    repo_id, token = client.repo_id, client._token
    try:
        client._retry(lambda: client.api.repo_info(repo_id, repo_type=REPO_TYPE), "repo lookup")
    except RepositoryNotFoundError:  # (also what a private repo looks like to another token)
        raise UsageError(f"no dataset repo {repo_id} on the Hub that this token can see" + (
            "" if token else f" (no token: {_LOGIN_HINT} for a private repo)")) from None
    except HfHubHTTPError as e:
        raise UsageError(f"the Hub refused the lookup of {repo_id} ({describe(e, token)})") from None
    return client


def _create_repo(api: HfApi, repo_id: str, private: bool) -> None:
    try:
        api.create_repo(repo_id, repo_type=REPO_TYPE, exist_ok=True, private=private)
    except HfUriError:
        # huggingface_hub 2.4: create was refused (401/403) but repo_info found the repo, and building its URL
        # fails for any endpoint but huggingface.co. The repo exists, which is all exist_ok asks for.
        pass


# ---------------------------------------------------------------- the client

class HubClient:
    """One repo, one token. Pushes are serialised per client (background thread and close())."""

    def __init__(self, api: HfApi, repo_id: str, token: str, retry: RetryPolicy, key_cache: KeyCache | None = None):
        self.api, self.repo_id, self._token, self.retry = api, repo_id, token, retry
        self.has_token = bool(token)  # (a public repo reads without one)
        self._key_cache = key_cache or KeyCache()  # content-addressed: shared by the runs of the repo
        self._indexes: dict[str, HubIndex] = {}
        self._part_checks: dict[tuple[Path, int, int], FileCheck | None] = {}  # parts never change once written
        self._other_images = 0  # rows of the dir another dir published for other images, as last said
        self.unusable: dict[Path, str] = {}  # parts not pushed, and why (unreadable, or another run's rows)
        self._warned_ledger, self._lock = set(), threading.Lock()
        bound_requests()  # (huggingface_hub's client waits for an answer without limit)

    def __repr__(self) -> str:  # never the token
        return f"HubClient({self.repo_id!r}, endpoint={self.api.endpoint!r})"

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retries(fn, what, self.retry, token=self._token)

    def _checked(self, fn: Callable[[], T], what: str) -> T:
        """A retried call at connect time, where a refusal is the user's to fix: one line, exit 2."""
        try:
            return self._retry(fn, what)
        except HubUnavailable as e:
            raise HubUnavailable(f"the Hub at {self.api.endpoint} is unreachable: {e}") from None
        except HfHubHTTPError as e:
            status, why = http_status(e), describe(e, self._token)
            if status == 401:
                raise UsageError("the Hub refused the Hugging Face token (invalid or expired): "
                                 f"{_LOGIN_HINT}") from None
            if status == 403:
                raise UsageError(f"no write access to {self.repo_id} with this token ({why}); use a token that can "
                                 "write to that namespace, or an --hf-repo under your own user") from None
            raise UsageError(f"the Hub refused the {what} ({why})") from None

    def _refused(self, e: HfHubHTTPError, what: str) -> FatalError:
        return FatalError(f"the Hub refused the {what} ({self.repo_id}): {describe(e, self._token)}")

    # -- what the repo holds

    def index(self, run_id: str) -> HubIndex:
        if run_id not in self._indexes:
            self._indexes[run_id] = HubIndex(self.api, self.repo_id, run_id, self._token, self._key_cache)
        return self._indexes[run_id]

    def _read(self, fn: Callable[[], T], what: str) -> T:
        """A read of the repo, retried (HubUnavailable when the Hub stays down; FatalError on a refusal)."""
        try:
            return self._retry(fn, what)
        except HubUnavailable:
            raise
        except HfHubHTTPError as e:
            raise self._refused(e, what) from None

    def snapshot(self, run_id: str) -> Snapshot:
        """The run's published files and keys, read from the repo now."""
        return self._read(self.index(run_id).snapshot, "key listing")

    def run_infos(self, run_id: str, head: str) -> dict[str, dict]:
        """runs/{run_id}.json of every run in the repo at `head`."""
        return self._read(lambda: self.index(run_id).read_run_infos(head), "run listing")

    def describe_repo(self, run_id: str, snap: Snapshot | None = None) -> str:
        """One line for the start of a run: what the repo already holds (`snap`: a snapshot just read)."""
        snap = snap or self.snapshot(run_id)
        others = (f"{len(snap.other_runs)} other run(s) ({', '.join(snap.other_runs[:5])}), each in its own "
                  f"{DATA_DIR}/ folder and card config; " if snap.other_runs else "")
        return (f"Hub: {self.repo_id} holds {others}{len(snap.keys)} rows of this run {run_id} in "
                f"{len(snap.files)} file(s); this run writes to {run_data_dir(run_id)}/")

    def _local_check(self, part: Part, run_id: str, images: dict[str, str | None] | None = None
                     ) -> FileCheck | None:
        """The part's keys (check_file), or None when it is not pushed (said once). `images`: also collect
        key -> sha256 of its rows there (read again if cached: the cache keeps keys only)."""
        st = part.path.stat()
        cache_key = (part.path, st.st_ino, st.st_mtime_ns)
        if cache_key in self._part_checks and images is None:
            return self._part_checks[cache_key]
        check = check_file(part.path, OUTPUT_SCHEMA)
        problem = check.problem
        if problem is None and check.run_id not in (None, run_id):  # copied in from another dir, say
            problem = f"it holds rows of run {check.run_id}, not of run {run_id}"
        if problem and self.unusable.get(part.path) != problem:
            self.unusable[part.path] = problem
            log.warning("Hub: not pushing %s: %s (the next run quarantines it)", part.path, problem)
        if problem is None and images is not None:
            images.update(zip(check.keys, check.sha256 or [None] * len(check.keys)))
        # (its images are read again only when a key of it is another dir's: not held through the run)
        self._part_checks[cache_key] = None if problem else check._replace(sha256=None)
        return self._part_checks[cache_key]

    def dir_images(self, checkpoint_dir: Path | str, run_id: str) -> dict[str, str | None]:
        """key -> sha256 of the rows of every part of run `run_id` a push of the dir would send (for the check
        that they are of the Hub's images: image_match); each part is read once for this and the pushes after."""
        images: dict[str, str | None] = {}
        for part in list_parts(Path(checkpoint_dir)):
            self._local_check(part, run_id, images)
        return images

    def _pending(self, ckpt: Path, worker: int | None, published: set[str], run_id: str,
                 others: Mapping[str, str | None] | None = None) -> list[tuple[Part, list[str]]]:
        """(part, its keys not on the Hub yet) for the parts of `worker` (None: every worker) of run `run_id`.
        `others`: key -> image of the rows other dirs published; this dir's rows of those keys holding other
        images are not pushed either (a key is published once), but said (`_say_other_images`)."""
        seen = set(published)
        pending, other_images = [], []
        for part in list_parts(ckpt):
            if worker is not None and part.worker != worker:
                continue
            check = self._local_check(part, run_id)
            keys = [k for k in (check.keys if check else []) if k not in seen]
            seen.update(keys)
            if keys:
                pending.append((part, keys))
            overlap = [k for k in check.keys if k in others] if others and check else []
            if overlap:  # (rare: a key that another dir published too)
                images: dict[str, str | None] = {}
                self._local_check(part, run_id, images)
                other_images += [k for k in overlap if images.get(k) and others[k] not in (None, images[k])]
        if others is not None:
            self._say_other_images(ckpt, other_images)
        return pending

    def _say_other_images(self, ckpt: Path, keys: list[str]) -> None:
        """Another data set pushing into this run (one that started with this one, before either had pushed,
        passes the check at start: image_match.py) takes keys from it, and this dir's rows of them are never
        published: said whenever there are more of them, never silent."""
        if len(keys) > self._other_images:
            self._other_images = len(keys)
            log.warning("Hub: %s of %s are published by another dir for other images (sha256 differs, e.g. key %s):"
                        " they are not pushed, as a key is published once; is another data set pushing into this "
                        "run? It takes a --hf-repo of its own", plural(len(keys), "row"), ckpt, min(keys))

    def _check_ledger(self, ckpt: Path, run_id: str, dir_id: str, snap: Snapshot, worker: int | None) -> None:
        """Keep the ledger true to the repo: record files of this dir found on the Hub but missing from it (a
        commit whose answer was lost, or a crash before the line was written), and say once when it records
        files the repo no longer holds (a deleted or recreated repo: their rows are pushed again).
        Only `worker`'s own files (None: every worker's, when no other process holds the dir): another live
        worker may commit and write its line between this snapshot and this read of the ledger."""
        ledger = [e for e in read_ledger(ckpt) if e.get("repo") == self.repo_id and e.get("run_id") == run_id
                  and worker in (None, e.get("worker"))]
        recorded = {e["hub_path"] for e in ledger}
        gone = recorded - set(snap.files)
        if gone and self.repo_id not in self._warned_ledger:
            self._warned_ledger.add(self.repo_id)
            log.warning("Hub: the ledger of %s records %d file(s) pushed to %s that the repo no longer holds "
                        "(deleted or recreated?); their rows are pushed again", ckpt, len(gone), self.repo_id)
        found = []
        mine = [(path, m) for path in sorted(set(snap.files) - recorded) if (m := HUB_FILE_RE.match(path))
                and m["run"] == run_id and m["dir"] == dir_id and worker in (None, int(m["worker"]))]
        local = list_parts(ckpt) if mine else []  # once, not per file: a dir holds thousands of parts
        for path, m in mine:
            owner, first, last = int(m["worker"]), int(m["first"]), int(m["last"])
            parts = [p for p in local if p.worker == owner and first <= p.seq <= last]
            # No local part in that range (a copy of this dir pushed it: the same dir_id): the name says which
            found.append({**ledger_entry(self.repo_id, run_id, HubFile(path, owner, parts, []), None),
                          "first": first, "last": last,
                          "rows": len(self.index(run_id).keys_of_file(snap.files[path])), "recovered": True})
        if found:
            log.info("Hub: %d file(s) of this dir were on the Hub but not in the ledger (a lost answer or a "
                     "crash); recorded as recovered", len(found))
            append_ledger(ckpt, found)

    def pending_rows(self, checkpoint_dir: Path | str, run_id: str, worker: int | None = None) -> int:
        with self._lock:
            snap = self.snapshot(run_id)
            return sum(len(k) for _, k in self._pending(Path(checkpoint_dir), worker, snap.keys, run_id))

    # -- pushing

    def push_pending(self, checkpoint_dir: Path | str, run_id: str, worker: int | None = None) -> int:
        """Push every unpublished row of the worker's parts (None: all workers) in one commit; returns rows.

        Hub down after retries: one warning, returns 0, the rows stay pending. A refusal (401/403/404...)
        raises FatalError.
        """
        try:
            return self.push(checkpoint_dir, run_id, worker)
        except HubUnavailable as e:
            log.warning("Hub unavailable; the parts stay pending and are pushed next time: %s", e)
            return 0

    def describe(self, error: BaseException) -> str:
        """One line for a log, the token scrubbed."""
        return describe(error, self._token)

    def push(self, checkpoint_dir: Path | str, run_id: str, worker: int | None = None) -> int:
        """push_pending that raises HubUnavailable when the Hub stays down (the background pusher decides)."""
        ckpt = Path(checkpoint_dir)
        info = read_run_json(ckpt)
        if info is None or info.get("run_id") != run_id:
            raise FatalError(f"{ckpt} does not hold run {run_id}: nothing of it to push")
        dir_id = info.get("dir_id") or "legacy"

        committed, more, sent = 0, False, []  # rows it committed; files left; (file, op) of an unanswered commit

        def attempt() -> None:
            nonlocal committed, more, sent
            snap = self.index(run_id).snapshot()
            committed, sent = committed + rows_committed(sent, snap.files), []  # landed if its files are there
            self._check_ledger(ckpt, run_id, dir_id, snap, worker)
            others = snap.images(but_dir=dir_id)  # (another data set's rows: said, never pushed)
            files = plan_hub_files(run_id, dir_id, self._pending(ckpt, worker, snap.keys, run_id, others))
            files = [f for f in files if f.path not in snap.entries]  # same name = same rows: published already
            # (a file of that name whose keys did not read holds none of them: replaced with its rows)
            for f in files:
                if f.path in snap.files:
                    log.warning("Hub: replacing %s, unreadable, with the %d rows its name says", f.path, f.rows)
            more, files = len(files) > MAX_FILES_PER_COMMIT, files[:MAX_FILES_PER_COMMIT]
            if not files:
                return
            rows = sum(f.rows for f in files)
            targets = hub_targets(snap.entries)  # one type per column with the run's files already there
            uploads = [hub_file_bytes(f, targets) for f in files]
            ops = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=data) for f, data in zip(files, uploads)]
            ops += self._migrate_legacy(run_id, snap, pq.read_schema(io.BytesIO(uploads[0])))  # the new files' columns
            sent = list(zip(files, ops))
            commit = send_commit(sent, lambda: self.api.create_commit(  # (a refused one: none of its rows)
                self.repo_id, ops, commit_message=f"Add {rows} captions of run {run_id} ({len(files)} file(s))",
                repo_type=REPO_TYPE, parent_commit=snap.head)).oid
            mine, sent = rows_committed(sent), []  # not another pusher's since this look (hub_files.py)
            committed += mine
            append_ledger(ckpt, [ledger_entry(self.repo_id, run_id, f, commit) for f in files])
            for data in uploads:  # their keys are known: no snapshot of any worker of the dir reads them back
                self._key_cache.put_upload(data)
            log.info("Hub: pushed %d rows in %d file(s) to %s", mine, len(files), self.repo_id)

        with self._lock:
            self._against_head(attempt, "push")
            while more:  # each commit re-reads the repo first, as the first did
                self._against_head(attempt, "push")
        return committed

    def _migrate_legacy(self, run_id: str, snap: Snapshot, schema: pa.Schema) -> list:
        """Files of this run in 0.1's flat layout (data/{run_id}-w...parquet, older columns) move into the run's
        folder with today's columns, in the same commit as new rows: one config must share one schema for
        `load_dataset`. The same keys, so the published set does not change."""
        ops: list = []
        for path in sorted(filter(is_legacy_file, snap.entries)):  # (an unreadable one stays, named: hub_index)
            data = self.index(run_id).read_file(path, snap.head)
            table = conform(pq.read_table(io.BytesIO(data)).replace_schema_metadata(None), schema)
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS)
            ops += [CommitOperationAdd(path_in_repo=f"{run_data_dir(run_id)}/v0.1-{path.rsplit('/', 1)[1]}",
                                       path_or_fileobj=buf.getvalue()),
                    CommitOperationDelete(path_in_repo=path)]
        if ops:
            log.info("Hub: moving %d file(s) of the 0.1 layout into %s/ with today's columns", len(ops) // 2,
                     run_data_dir(run_id))
        return ops

    def _against_head(self, attempt: Callable[[], T], what: str) -> T:
        """Run a read-then-commit attempt until its commit lands on the head it read.

        Transient failures are retried with backoff by call_with_retries; a lost race with another writer
        (409/412: the parent commit is no longer the head) is planned again after RetryPolicy.race_wait, until
        RetryPolicy.race_deadline: a count of tries would give up sooner the more workers share the repo.
        Each attempt reads the repo again, so an applied commit whose answer was lost is never repeated.
        """
        start, race = self.retry.clock(), 0
        while True:
            try:
                return self._retry(attempt, what)
            except HfHubHTTPError as e:
                if http_status(e) not in (409, 412):
                    raise self._refused(e, what) from None
            wait, elapsed = self.retry.race_wait(race), self.retry.clock() - start
            race += 1
            if elapsed + wait > self.retry.race_deadline:
                raise HubUnavailable(f"lost {race} races in {elapsed:.0f} s to other writers of {self.repo_id} "
                                     f"(gives up after {self.retry.race_deadline:.0f} s)")
            log.info("Hub: another writer committed to %s first; planning again in %.1f s", self.repo_id, wait)
            self.retry.sleep(wait)

    # -- the dataset card

    def write_card(self, run_info: dict, summary: dict, failed_keys: dict[str, str] | None = None) -> str:
        """README.md and runs/{run_id}.json in one commit; returns the card (hub_card.write_card)."""
        from .hub_card import write_card

        return write_card(self, run_info, summary, failed_keys)
