"""Talking to the Hub through failures: which errors are worth another try, bounded backoff, messages that
never carry the token, and what a token may do (usable_token, check_namespace).

huggingface_hub retries preupload, LFS and downloads itself, but not the commit POST of create_commit,
create_repo or whoami: hub.py wraps those in call_with_retries.
"""
from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from huggingface_hub.errors import HfHubHTTPError

from .errors import FatalError, UsageError

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx  # type: ignore[no-redef]

log = logging.getLogger(__name__)
T = TypeVar("T")

# A dropped connection is RemoteProtocolError("Server disconnected without sending a response."): no status.
NETWORK_ERRORS = (_httpx.TimeoutException, _httpx.NetworkError, _httpx.RemoteProtocolError)
LOST_RACE_DEADLINE_S = 600.0  # a push that keeps losing races to other writers gives up after this long
HUB_REQUEST_TIMEOUT_S = 120.0  # a request with no answer for this long failed (retried as a dropped connection)
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{10,}")


class HubUnavailable(FatalError):
    """Transient failures (5xx, 429, dropped connections) outlasted every retry."""


def scrub(text: str, token: str | None = None) -> str:
    """Remove the token, and anything token-shaped, from a message."""
    return _TOKEN_LIKE.sub("***", text.replace(token, "***") if token else text)


def http_status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def describe(exc: BaseException, token: str | None = None) -> str:
    """One scrubbed line: the HTTP status and the server's own words, or the network error."""
    status, server = http_status(exc), getattr(exc, "server_message", None)
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    text = f"HTTP {status}: {(server or first).splitlines()[0]}" if status else f"{type(exc).__name__}: {first}"
    return scrub(text, token)[:300]


def is_transient(exc: BaseException) -> bool:
    """Worth another try: 5xx, 408, 429, lost connections. A commit's lost race (409/412) is not retried here:
    hub.py's `_against_head` plans it again from a fresh read."""
    if isinstance(exc, NETWORK_ERRORS):
        return True
    status = http_status(exc)
    return status is not None and (status >= 500 or status in (408, 429))


@dataclass(frozen=True)
class RetryPolicy:
    tries: int = 6  # attempts in all
    base: float = 1.0  # first wait; doubles each retry (1, 2, 4, 8, 16 s), times a 0.5-1.0 jitter
    cap: float = 60.0  # longest backoff wait
    max_retry_after: float = 600.0  # Retry-After is honoured up to this many seconds
    race_deadline: float = LOST_RACE_DEADLINE_S  # lost races are planned again until this many seconds passed
    sleep: Callable[[float], None] = time.sleep  # tests pass a recorder
    clock: Callable[[], float] = time.monotonic  # the deadline's; tests pass a fake one

    def race_wait(self, race: int) -> float:
        """Before re-planning after lost race number `race` (0, 1, ...): exponential full jitter, which
        spreads many writers of one repo apart where a narrow jitter kept them colliding."""
        return random.uniform(0.0, min(self.cap, self.base * 2 ** race))

    def wait(self, attempt: int, exc: BaseException) -> float:
        backoff = min(self.cap, self.base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        retry_after = str(getattr(getattr(exc, "response", None), "headers", {}).get("Retry-After", ""))
        return max(backoff, min(float(retry_after), self.max_retry_after)) if retry_after.isdigit() else backoff


def call_with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy = RetryPolicy(), *,
                      token: str | None = None) -> T:
    """fn() with bounded exponential backoff on transient failures; other errors go up at once."""
    for attempt in range(1, policy.tries + 1):
        try:
            return fn()
        except (HfHubHTTPError, *NETWORK_ERRORS) as e:
            if not is_transient(e):
                raise
            if attempt == policy.tries:
                raise HubUnavailable(f"Hub {what} failed {policy.tries} times, last: {describe(e, token)}") from None
            wait = policy.wait(attempt, e)
            log.info("Hub %s failed (%s); retry %d/%d in %.1fs", what, describe(e, token), attempt,
                     policy.tries - 1, wait)
            policy.sleep(wait)
    raise AssertionError("unreachable")


def bound_requests() -> None:
    """Every request of huggingface_hub's shared HTTP client gives up after HUB_REQUEST_TIMEOUT_S without an
    answer: its default is timeout=None, so a commit whose answer never came (a black-holed connection) held the
    pusher thread for ever, and with it the run's end (the final push's join). Once per process; requests that
    set their own timeout (downloads) keep it."""
    try:
        from huggingface_hub import set_client_factory
        from huggingface_hub.utils import _http
    except ImportError:  # (a version without them keeps its own client)
        return
    made = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)  # (a private name: another version keeps its own)
    if made is None or getattr(made, "bounded", False):
        return

    def bounded():
        client = made()
        client.timeout = _httpx.Timeout(HUB_REQUEST_TIMEOUT_S)  # (read when a client is made: tests shorten it)
        return client

    bounded.bounded = True  # type: ignore[attr-defined]
    set_client_factory(bounded)


def usable_token(token: str | None, hint: str) -> str | None:
    """`token`, refused in one line where an HTTP header cannot carry it (quotes pasted with it, as from a web
    page: a UnicodeEncodeError traceback from httpx). The token itself is never said."""
    if token and not token.isascii():
        raise UsageError(f"the Hugging Face token holds characters that are not ASCII (quotes pasted with it?); "
                         f"set HF_TOKEN to the token alone, or {hint}")
    return token


def check_namespace(who: dict, repo_id: str) -> None:
    """A user's token writes only to the user's own namespace and their orgs'. create_repo(exist_ok=True) does
    not say so for a repo that exists (someone else's, e.g. the default --hf-username's): every push of the
    run would then be refused. Within those namespaces a write is only proven by the first push."""
    namespace = repo_id.split("/")[0]
    if who.get("type", "user") != "user" or "/" not in repo_id:
        return
    mine = [who.get("name"), *(o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict))]
    if namespace not in mine:
        raise UsageError(f"the Hugging Face token of {who.get('name')} cannot write to {repo_id}: {namespace} is "
                         f"neither that user nor one of their organisations ({', '.join(map(str, mine))}); pass "
                         f"--hf-username with your user or organisation name, or a --hf-repo USER/NAME of yours")
