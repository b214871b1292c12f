"""A small stand-in for the Hugging Face Hub HTTP API on 127.0.0.1, for the real huggingface_hub client.

It implements what `HfApi` calls for whoami, create_repo, create_commit (regular files inline, no LFS),
list_repo_tree, repo_info, validate-yaml and hf_hub_download / snapshot_download, keeps every commit
(blobs in a tmp dir), and injects faults: an HTTP status (500, 429 + Retry-After, 401, ...), a dropped
connection before the request is applied ("drop"), a commit applied whose answer is lost
("lost_response"), or a commit applied whose answer comes very late ("hang").

Use the `hub_stub` fixture (conftest.py) or `HubStub(root).start()`; `hub_parts.assert_hub_matches` checks a
repo against a checkpoint dir.
"""
from __future__ import annotations

import io
import os
import re
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
from hub_stub_http import Fault, Handler, Repo, Server, git_blob_sha

REPO_ROOT_HINT = str(Path(__file__).resolve().parent.parent)  # PYTHONPATH for subprocesses that import vlm_caption
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"


class HubStub:
    """State + fault table of the stub; the HTTP side is `hub_stub_http.Handler`."""

    def __init__(self, root: Path, tokens: dict[str, dict] | None = None, hang_seconds: float = 120.0):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.token = "hf_CANARY" + os.urandom(12).hex()
        self.read_token = "hf_READONLY" + os.urandom(12).hex()
        self.user = "tester"
        self.tokens = tokens or {
            self.token: {"name": self.user, "role": "write", "orgs": ["test-org"]},
            self.read_token: {"name": self.user, "role": "read", "orgs": ["test-org"]},
        }
        self.hang_seconds = hang_seconds
        # Tree listings come in pages with a Link header, as the Hub pages them (it sends 1,000 entries a page;
        # a small page makes every test with a few files follow the client's paging).
        self.tree_page_size = 8
        self.repos: dict[tuple[str, str], Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self.downloads: list[tuple[str, int, bool]] = []  # (file, bytes sent, was it a Range request) of GETs
        self.commits_applied = 0
        self.listings: dict[tuple[str, str, bool], list[dict]] = {}  # (commit, folder, recursive) -> tree entries
        self._sizes: dict[str, int] = {}  # blob sha -> bytes
        self._lock = threading.RLock()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "HubStub":
        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.stub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-stub",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()  # wake "hang" handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the stub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ test helpers

    def inject(self, method: str, path_regex: str, kind: str, times: int = 1,
               retry_after: float | None = None, body: str | None = None) -> None:
        """The next `times` requests matching METHOD and the path regex get `kind` instead of an answer."""
        with self._lock:
            self.faults.append(Fault(method.upper(), path_regex, str(kind), times, retry_after, body))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def count(self, method: str, path_regex: str) -> int:
        """How many requests with this method reached a path matching the regex (faulted ones included)."""
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method.upper() and re.search(path_regex, p))

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return False

    def repo_files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at `revision` of a repo."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            tree = repo.commits[repo.branches.get(revision, revision)]
            return {path: self._blob(sha) for path, sha in tree.items()}

    def read_rows(self, repo_id: str, prefix: str = "data/") -> list[dict]:
        """All rows of every parquet file under `prefix` on the main branch, in path order."""
        rows: list[dict] = []
        for path, data in sorted(self.repo_files(repo_id).items()):
            if path.startswith(prefix) and path.endswith(".parquet"):
                rows.extend(pq.read_table(io.BytesIO(data)).to_pylist())
        return rows

    def create_repo_direct(self, repo_id: str, repo_type: str = "dataset", private: bool = False) -> None:
        with self._lock:
            self._create(repo_type, repo_id, private)

    # ------------------------------------------------------------------ state

    def _blob(self, sha: str) -> bytes:
        return (self.root / "blobs" / sha).read_bytes()

    def _put_blob(self, data: bytes) -> str:
        sha = git_blob_sha(data)
        path = self.root / "blobs" / sha
        if not path.exists():
            path.write_bytes(data)
        self._sizes[sha] = len(data)
        return sha

    def blob_size(self, sha: str) -> int:
        if sha not in self._sizes:
            self._sizes[sha] = (self.root / "blobs" / sha).stat().st_size
        return self._sizes[sha]

    def _create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type, repo_id, private)
        oid = os.urandom(20).hex()
        repo.commits[oid] = {".gitattributes": self._put_blob(GITATTRIBUTES)}
        repo.branches["main"] = oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and re.search(fault.path_regex, path):
                    fault.times -= 1
                    return fault
        return None
