"""The Hub stub's HTTP side: the routes huggingface_hub's client calls, answered from a `HubStub`'s state
(tests/hub_stub.py), with its injected faults applied; and the repo model they share."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

if TYPE_CHECKING:
    from hub_stub import HubStub

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Fault:
    method: str
    path_regex: str
    kind: str  # an HTTP status ("500", "429", "403", ...), "drop", "lost_response" or "hang"
    times: int
    retry_after: float | None = None
    body: str | None = None


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, dict[str, str]] = field(default_factory=dict)  # commit oid -> {path: blob sha}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client killed mid-request (the SIGKILL test) or a dropped socket is expected here.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer carries Content-Length
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    @property
    def stub(self) -> HubStub:
        return self.server.stub  # type: ignore[attr-defined]

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, self.query = unquote(split.path), parse_qs(split.query)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.late: Fault | None = None  # a fault that acts after the request is applied
        fault = self.stub.take_fault(method, path)
        self.stub.requests.append((method, path, fault.kind if fault else "ok"))
        if fault is not None and fault.kind == "drop":
            self._drop()
            return
        if fault is not None and fault.kind in ("lost_response", "hang"):
            self.late = fault
        elif fault is not None:
            status = int(fault.kind)
            headers = {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else {}
            self._json(status, {"error": fault.body or f"injected {status}"}, headers)
            return
        try:
            self._route(method, path)
        except HubError as e:
            headers = {"X-Error-Code": e.code} if e.code else {}
            if e.status == 401:
                headers["X-Error-Message"] = e.message
            self._json(e.status, {"error": e.message}, headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        if self.late is not None and self.late.kind == "lost_response":
            self._drop()
            return
        if self.late is not None and self.late.kind == "hang":
            self.stub._release.wait(self.stub.hang_seconds)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _user(self, required: bool = False) -> dict | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            if required:
                raise HubError(401, "Invalid credentials in Authorization header")
            return None
        user = self.stub.tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, plural: str, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.stub.repos.get((_TYPES[plural], repo_id))
        ns = repo_id.split("/")[0]
        owner = user is not None and (ns == user["name"] or ns in user["orgs"])
        if repo is None or (repo.private and not owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and not (owner and user["role"] == "write"):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, rev: str) -> str:
        oid = repo.branches.get(rev, rev)
        if oid not in repo.commits:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str) -> None:
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml()
        m = _API_REPO.match(path)
        if m:
            plural, repo_id, rest = m.group(1), f"{m.group(2)}/{m.group(3)}", m.group(4) or ""
            return self._repo_api(method, plural, repo_id, rest)
        m = _RESOLVE.match(path)
        if m and method in ("GET", "HEAD"):
            plural = m.group(1) or "models"
            return self._resolve(method, plural, f"{m.group(2)}/{m.group(3)}", m.group(4), m.group(5))
        raise HubError(404, f"no route for {method} {path}")

    def _whoami(self) -> None:
        user = self._user(required=True)
        self._json(200, {
            "type": "user", "id": "0" * 24, "name": user["name"], "fullname": user["name"],
            "orgs": [{"type": "org", "name": o} for o in user["orgs"]],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": user["role"]}},
        })

    def _create_repo(self) -> None:
        user = self._user(required=True)
        req = json.loads(self.body or b"{}")
        repo_type = req.get("type") or "model"
        ns = req.get("organization") or user["name"]
        repo_id = f"{ns}/{req['name']}"
        if ns != user["name"] and ns not in user["orgs"] or user["role"] != "write":
            raise HubError(403, f"You don't have the rights to create a {repo_type} under the namespace {ns!r}")
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.stub.endpoint}/{prefix}{repo_id}"
        with self.stub._lock:
            if (repo_type, repo_id) in self.stub.repos:
                return self._json(409, {"error": f"You already created this {repo_type} repo", "url": url})
            self.stub._create(repo_type, repo_id, req.get("visibility") == "private" or bool(req.get("private")))
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        import yaml

        content = json.loads(self.body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _repo_api(self, method: str, plural: str, repo_id: str, rest: str) -> None:
        action, _, arg = rest.partition("/")
        if method == "GET" and action in ("", "revision"):
            return self._info(self._repo(plural, repo_id), arg or "main")
        if method == "GET" and action == "tree":
            rev, _, sub = arg.partition("/")
            return self._tree(self._repo(plural, repo_id), rev, sub.strip("/"))
        if method == "POST" and action == "preupload":
            return self._preupload(self._repo(plural, repo_id, write=True), arg)
        if method == "POST" and action == "commit":
            return self._commit(self._repo(plural, repo_id, write=True), arg)
        raise HubError(404, f"no route for {method} /api/{plural}/{repo_id}/{rest}")

    def _info(self, repo: Repo, rev: str) -> None:
        with self.stub._lock:
            oid = self._commit_of(repo, rev)
            tree = dict(repo.commits[oid])
        self._json(200, {
            "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": oid, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(tree)],
        })

    def _tree(self, repo: Repo, rev: str, sub: str) -> None:
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        with self.stub._lock:
            oid = self._commit_of(repo, rev)
            tree = dict(repo.commits[oid])
        # A commit's tree never changes: listed once, then each page is a slice (a listing of every page's
        # request read every blob for its size, and made the stub, not the client, the cost of benchmarks)
        listing = self.stub.listings.get((oid, sub, recursive))
        if listing is None:
            listing = self._listing(tree, rev, sub, recursive)
            with self.stub._lock:
                while len(self.stub.listings) >= 64:  # the latest commits' only: a long benchmark makes hundreds
                    del self.stub.listings[next(iter(self.stub.listings))]
                self.stub.listings[oid, sub, recursive] = listing
        size = self.stub.tree_page_size
        start = int(self.query.get("cursor", ["0"])[0])
        headers = {}
        if start + size < len(listing):  # the next page, as the Hub links it (huggingface_hub follows it)
            query = urlencode({**{k: v[0] for k, v in self.query.items()}, "cursor": start + size})
            headers["Link"] = f'<{self.stub.endpoint}{urlsplit(self.path).path}?{query}>; rel="next"'
        self._json(200, listing[start:start + size], headers)

    def _listing(self, tree: dict[str, str], rev: str, sub: str, recursive: bool) -> list[dict]:
        prefix = f"{sub}/" if sub else ""
        below = {p: sha for p, sha in tree.items() if p.startswith(prefix)}
        if sub and not below:
            raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound")
        entries, dirs = [], set()
        for p, sha in sorted(below.items()):
            rel = p[len(prefix):]
            parents = rel.split("/")[:-1]
            for i in range(1, len(parents) + 1 if recursive else min(1, len(parents)) + 1):
                dirs.add(prefix + "/".join(parents[:i]))
            if recursive or not parents:
                entries.append({"type": "file", "oid": sha, "size": self.stub.blob_size(sha), "path": p})
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return folders + entries

    def _preupload(self, repo: Repo, rev: str) -> None:
        with self.stub._lock:
            tree = repo.commits[self._commit_of(repo, rev)]
        files = json.loads(self.body)["files"]
        self._json(200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
            for f in files
        ]})

    def _commit(self, repo: Repo, rev: str) -> None:
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        with self.stub._lock:
            head = self._commit_of(repo, rev)
            if header.get("parentCommit") and not head.startswith(header["parentCommit"]):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[head])
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    tree[value["path"]] = self.stub._put_blob(base64.b64decode(value["content"]))
                elif item["key"] == "deletedFile":
                    tree.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    tree = {p: s for p, s in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif item["key"] != "header":
                    raise HubError(422, f"the stub does not support {item['key']!r} commit items")
            oid = os.urandom(20).hex()
            repo.commits[oid] = tree
            repo.branches[rev] = oid
            self.stub.commits_applied += 1
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._json(200, {"commitUrl": f"{self.stub.endpoint}/{prefix}{repo.repo_id}/commit/{oid}",
                         "commitOid": oid, "pullRequestUrl": None})

    def _resolve(self, method: str, plural: str, repo_id: str, rev: str, filename: str) -> None:
        repo = self._repo(plural, repo_id)
        with self.stub._lock:
            oid = self._commit_of(repo, rev)
            sha = repo.commits[oid].get(filename)
        if sha is None:
            raise HubError(404, f"{filename} does not exist on {rev}", "EntryNotFound")
        data = self.stub._blob(sha)
        status, rng = 200, re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng:
            start, end = int(rng.group(1)), int(rng.group(2) or len(data) - 1)
            data, status = data[start:end + 1], 206
        if method == "GET":
            self.stub.downloads.append((filename, len(data), rng is not None))
        self._send(status, data, {"X-Repo-Commit": oid, "ETag": f'"{sha}"', "Accept-Ranges": "bytes"},
                   content_type="application/octet-stream", head=method == "HEAD")
