"""Publish a checkpoint dir's captions to a Hub dataset repo: token check, pushes, ledger, retries, card.

Hub layout: data/{run_id}-w{worker:03d}-{first:06d}-{last:06d}.parquet holds the local parts first..last of one
worker (consecutive seq numbers), rows sorted by key, written deterministically: a re-push after a crash rewrites
the same path with the same bytes. A backlog becomes several files of at most MAX_ROWS_PER_HUB_FILE rows, all in
one commit.

Exactly once: a part is "on the Hub" when a line of hub_ledger.jsonl names it, or when a data/ file of this run
and worker on the Hub covers its seq number. The repo tree is listed once per client and again after any failed
commit, so a commit that was applied but whose answer was lost (or a crash between commit and ledger line) is
found and recorded as `recovered` instead of being pushed twice.

Several workers: every worker pushes only its own parts, and its file names carry its worker id, so two workers
never write the same path. Their commits to one branch may race; the Hub answers a lost race with 409/412, which
is retried like any transient failure. Push all workers at once (worker=None, --push-only) only when no worker is
pushing any more.

The token never appears in a message of this module: every error text goes through hub_retry.describe.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HfUriError

from .card import render_dataset_card
from .config import FatalError, UsageError
from .hub_retry import HubUnavailable, RetryPolicy, call_with_retries, describe, http_status
from .store import LEDGER, OUTPUT_SCHEMA, Part, list_parts

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ROWS_PER_HUB_FILE = 100_000
ROW_GROUP_ROWS = 10_000  # small row groups keep the dataset viewer and streaming readers fast
REPO_TYPE = "dataset"
_HUB_FILE_RE = re.compile(r"^data/(?P<run>.+)-w(?P<worker>\d{3,})-(?P<first>\d{6,})-(?P<last>\d{6,})\.parquet$")
_LOGIN_HINT = "run `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN, or pass --no-push"


# ---------------------------------------------------------------- connecting

def connect(repo_id: str, *, private: bool = False, endpoint: str | None = None,
            retry: RetryPolicy | None = None) -> HubClient:
    """Check the token and its write access, create the dataset repo if needed. Call before the model loads."""
    if constants.is_offline_mode():
        raise UsageError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it or pass --no-push")
    token = get_token()  # HF_TOKEN, then the cached `hf auth login`
    if not token:
        raise UsageError(f"no Hugging Face token found: {_LOGIN_HINT}")
    client = HubClient(HfApi(endpoint=endpoint, token=token), repo_id, token, retry or RetryPolicy())
    who = client._checked(client.api.whoami, "check the token")
    if who.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise UsageError(f"the Hugging Face token of {who.get('name')} is read-only; create a write token at "
                         f"https://huggingface.co/settings/tokens, then {_LOGIN_HINT}")
    client._checked(lambda: _create_repo(client.api, repo_id, private), f"create dataset repo {repo_id}")
    log.info("Hub: pushing to dataset %s as %s", repo_id, who.get("name"))
    return client


def _create_repo(api: HfApi, repo_id: str, private: bool) -> None:
    try:
        api.create_repo(repo_id, repo_type=REPO_TYPE, exist_ok=True, private=private)
    except HfUriError:
        # huggingface_hub 2.4: create was refused (401/403) but repo_info found the repo, and building its URL
        # fails for any endpoint but huggingface.co. The repo exists, which is all exist_ok asks for.
        pass


# ---------------------------------------------------------------- what goes where

class HubFile(NamedTuple):
    path: str
    worker: int
    parts: list[Part]
    rows: int


def hub_path(run_id: str, worker: int, first: int, last: int) -> str:
    return f"data/{run_id}-w{worker:03d}-{first:06d}-{last:06d}.parquet"


def part_rows(part: Part) -> int:
    return pq.ParquetFile(part.path).metadata.num_rows


def plan_hub_files(run_id: str, parts: list[Part], max_rows: int | None = None) -> list[HubFile]:
    """Group parts per worker into runs of consecutive seq numbers holding at most max_rows rows."""
    max_rows = max_rows or MAX_ROWS_PER_HUB_FILE
    groups: list[list[tuple[Part, int]]] = []
    for part in sorted(parts):
        n, last = part_rows(part), groups[-1] if groups else None
        if (last is None or last[-1][0].worker != part.worker or part.seq != last[-1][0].seq + 1
                or sum(r for _, r in last) + n > max_rows):
            groups.append([])
        groups[-1].append((part, n))
    return [HubFile(hub_path(run_id, g[0][0].worker, g[0][0].seq, g[-1][0].seq), g[0][0].worker,
                    [p for p, _ in g], sum(n for _, n in g)) for g in groups]


def hub_file_bytes(parts: list[Part]) -> bytes:
    """The parts' rows sorted by key, as parquet; the same parts always give the same bytes."""
    tables = [pq.read_table(p.path, schema=OUTPUT_SCHEMA).replace_schema_metadata(None) for p in parts]
    buf = io.BytesIO()
    pq.write_table(pa.concat_tables(tables).sort_by("key").combine_chunks(), buf, compression="zstd",
                   row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue()


# ---------------------------------------------------------------- the ledger

def read_ledger(checkpoint_dir: Path | str) -> list[dict]:
    path = Path(checkpoint_dir) / LEDGER
    entries = []
    for n, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # torn by a crash; the tree listing still covers its parts
            log.warning("%s line %d is unreadable; ignoring it", path, n)
    return entries


def append_ledger(checkpoint_dir: Path | str, entries: list[dict]) -> None:
    """One os.write with O_APPEND, so lines of concurrent workers never interleave."""
    path, data = Path(checkpoint_dir) / LEDGER, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise FatalError(f"short write to {path} (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def _ledger_entry(f: HubFile, run_id: str, commit: str | None) -> dict:
    entry = {"run_id": run_id, "hub_path": f.path, "worker": f.worker, "first": f.parts[0].seq,
             "last": f.parts[-1].seq, "parts": [p.path.name for p in f.parts], "rows": f.rows, "commit": commit,
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return entry if commit else {**entry, "recovered": True}  # found on the Hub, commit id unknown


# ---------------------------------------------------------------- the client

class HubClient:
    """One repo, one token. Pushes are serialised per client (background thread and close())."""

    def __init__(self, api: HfApi, repo_id: str, token: str, retry: RetryPolicy):
        self.api, self.repo_id, self._token, self.retry = api, repo_id, token, retry
        self._hub_paths: set[str] | None = None  # files on the Hub as last listed; None = list again
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the token
        return f"HubClient({self.repo_id!r}, endpoint={self.api.endpoint!r})"

    def _retry(self, fn: Callable[[], T], what: str, conflicts: bool = False) -> T:
        return call_with_retries(fn, what, self.retry, conflicts=conflicts, token=self._token)

    def _checked(self, fn: Callable[[], T], what: str) -> T:
        """A retried call at connect time, where a refusal is the user's to fix: one line, exit 2."""
        try:
            return self._retry(fn, what)
        except HubUnavailable as e:
            raise HubUnavailable(f"the Hub at {self.api.endpoint} is unreachable: {e}") from None
        except HfHubHTTPError as e:
            status, why = http_status(e), describe(e, self._token)
            if status == 401:
                raise UsageError(f"the Hub refused the Hugging Face token (invalid or expired): {_LOGIN_HINT}") from None
            if status == 403:
                raise UsageError(f"no write access to {self.repo_id} with this token ({why}); use a token that can "
                                 "write to that namespace, or an --hf-repo under your own user") from None
            raise UsageError(f"could not {what} ({why})") from None

    def _list_now(self) -> set[str]:
        self._hub_paths = {f.path for f in self.api.list_repo_tree(self.repo_id, repo_type=REPO_TYPE, recursive=True)}
        return self._hub_paths

    def hub_paths(self) -> set[str]:
        """Files on the Hub, listed once per client and again after a failed commit."""
        if self._hub_paths is None:
            try:
                return self._retry(self._list_now, "list files")
            except HfHubHTTPError as e:
                raise FatalError(f"could not list {self.repo_id}: {describe(e, self._token)}") from None
        return self._hub_paths

    def _pending(self, ckpt: Path, run_id: str, worker: int | None) -> list[Part]:
        """Parts not on the Hub yet. Parts found on the Hub but not in the ledger get a recovered line."""
        parts = [p for p in list_parts(ckpt) if worker is None or p.worker == worker]
        ledgered = {name for e in read_ledger(ckpt) if e.get("run_id") == run_id for name in e.get("parts", [])}
        on_hub, recovered = set(), []
        for path in sorted(self.hub_paths()):
            m = _HUB_FILE_RE.match(path)
            if not m or m["run"] != run_id:
                continue
            covered = [p for p in parts if p.worker == int(m["worker"]) and int(m["first"]) <= p.seq <= int(m["last"])]
            on_hub.update(p.path.name for p in covered)
            if any(p.path.name not in ledgered for p in covered):
                rows = sum(part_rows(p) for p in covered)
                recovered.append(_ledger_entry(HubFile(path, int(m["worker"]), covered, rows), run_id, None))
        if recovered:
            log.info("Hub: %d file(s) on the Hub were missing from the ledger (a lost answer or a crash); "
                     "recorded as recovered", len(recovered))
            append_ledger(ckpt, recovered)
        done = ledgered | on_hub
        return [p for p in parts if p.path.name not in done]

    def pending_rows(self, checkpoint_dir: Path | str, run_id: str, worker: int | None = None) -> int:
        with self._lock:
            return sum(part_rows(p) for p in self._pending(Path(checkpoint_dir), run_id, worker))

    def push_pending(self, checkpoint_dir: Path | str, run_id: str, worker: int | None = None) -> int:
        """Push every pending part of the worker (None: all workers) in one commit; returns rows pushed.

        Hub down after retries: one warning, returns 0, the parts stay pending. A refusal (401/403/404...)
        raises FatalError.
        """
        try:
            return self._push_pending(Path(checkpoint_dir), run_id, worker)
        except HubUnavailable as e:
            log.warning("Hub unavailable; the parts stay pending and are pushed next time: %s", e)
            return 0

    def _push_pending(self, ckpt: Path, run_id: str, worker: int | None) -> int:
        with self._lock:
            files = plan_hub_files(run_id, self._pending(ckpt, run_id, worker))
            if not files:
                return 0
            rows = sum(f.rows for f in files)
            payload = {f.path: hub_file_bytes(f.parts) for f in files}
            commit = self._commit(payload, f"Add {rows} captions ({', '.join(f.path[5:] for f in files)})", True)
            append_ledger(ckpt, [_ledger_entry(f, run_id, commit) for f in files])
            self.hub_paths().update(payload)
            log.info("Hub: pushed %d rows in %d file(s) to %s", rows, len(files), self.repo_id)
            return rows

    def _commit(self, files: dict[str, bytes], message: str, check_applied: bool) -> str | None:
        """One create_commit, retried; None when a lost answer turned out to be an applied commit."""
        tries = 0

        def attempt() -> str | None:
            nonlocal tries
            tries += 1
            # huggingface_hub never retries the commit POST: look before committing again.
            if tries > 1 and check_applied and set(files) <= self._list_now():
                log.info("Hub: the earlier commit attempt was applied though its answer was lost")
                return None
            ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in files.items()]
            return self.api.create_commit(self.repo_id, ops, commit_message=message, repo_type=REPO_TYPE).oid

        try:
            return self._retry(attempt, "commit", conflicts=True)
        except HubUnavailable:
            self._hub_paths = None  # the last attempt may have been applied: list again next time
            raise
        except HfHubHTTPError as e:
            self._hub_paths = None
            raise FatalError(f"the Hub refused a commit to {self.repo_id}: {describe(e, self._token)}") from None


# ---------------------------------------------------------------- pushing while captioning

class BackgroundPusher:
    """Pushes from a daemon thread, so captioning never waits for the Hub.

    A push starts once push_every rows are pending and min_push_interval seconds have passed since the last
    push attempt (the Hub rate-limits commits; after a failed attempt the interval is waited out too).
    """

    def __init__(self, client: HubClient, checkpoint_dir: Path | str, run_id: str, worker: int,
                 push_every: int = 500, min_push_interval: float = 120.0):
        self.client, self.checkpoint_dir, self.run_id, self.worker = client, Path(checkpoint_dir), run_id, worker
        self.push_every, self.min_push_interval = push_every, min_push_interval
        self.rows_pushed, self.last_error = 0, None
        self._pending_rows, self._last_attempt, self._closing = 0, float("-inf"), False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"hub-push-w{worker:03d}", daemon=True)
        self._thread.start()

    def notify(self, rows_written: int) -> None:
        """Called after each part is written; never blocks on the Hub."""
        with self._cond:
            self._pending_rows += rows_written
            self._cond.notify()

    def _wait_for_trigger(self) -> int | None:
        """Rows pending once a push is due; None when closing."""
        with self._cond:
            while not self._closing:
                due_in = self._last_attempt + self.min_push_interval - time.monotonic()
                if self._pending_rows >= self.push_every and due_in <= 0:
                    self._last_attempt = time.monotonic()
                    return self._pending_rows
                self._cond.wait(timeout=due_in if self._pending_rows >= self.push_every else None)
            return None

    def _run(self) -> None:
        while (snapshot := self._wait_for_trigger()) is not None:
            if self._push():
                with self._cond:  # rows notified during the push stay counted
                    self._pending_rows = max(0, self._pending_rows - snapshot)

    def _push(self) -> bool:
        try:
            self.rows_pushed += self.client._push_pending(self.checkpoint_dir, self.run_id, self.worker)
            self.last_error = None
            return True
        except HubUnavailable as e:
            self.last_error = str(e)
            log.warning("Hub unavailable, captioning goes on; pending parts go at the next trigger: %s", e)
        # The thread must outlive any failure (a revoked token, a full disk): log it, close() reports it.
        except Exception as e:  # noqa: BLE001
            self.last_error = describe(e, self.client._token)
            log.error("Hub push failed, captioning goes on: %s", self.last_error)
        return False

    def close(self, final: bool = True) -> bool:
        """Wait for a push in flight; with final, push all that is pending. True when nothing is left."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        if final and not self._push():
            return False
        try:
            return self.client.pending_rows(self.checkpoint_dir, self.run_id, self.worker) == 0
        except (FatalError, OSError) as e:
            log.warning("could not tell whether everything reached the Hub: %s", describe(e, self.client._token))
            return False


# ---------------------------------------------------------------- the dataset card

def write_dataset_card(client: HubClient, checkpoint_dir: Path | str, summary: dict, run_info: dict) -> str:
    """Upload README.md in one retried commit; returns the card. Rows = what the ledger says is on the Hub."""
    run_id = run_info.get("run_id")
    per_file = {e["hub_path"]: e.get("rows", 0) for e in read_ledger(checkpoint_dir) if e.get("run_id") == run_id}
    card = render_dataset_card(client.repo_id, summary, run_info, rows=sum(per_file.values()) or None)
    with client._lock:
        client._commit({"README.md": card.encode()}, "Update dataset card", check_applied=False)
    return card
