"""The download stage's summary: which failures a rerun may fix, download_summary.json, the printed report.

Split from download.py (the stage itself); sample_data.py builds the same summary for its generated sets.
"""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .cli import plural
from .config import DownloadConfig
from .data_layout import (FULL_METADATA_FILE, IMAGES_DIR, INVALID_FILE, METADATA_CSV, SUMMARY_FILE, URLS_FILE,
                          VALIDATION_DIR, shard_name, stats_file)
from .validate import OutputCounts, ValidationStats

# Which failed downloads a later try may fix. img2dataset records one row per URL with a `status`
# (success / failed_to_download / failed_to_resize) and, for a failure, `error_message` = str() of the
# exception its urllib client raised (or "hash mismatch"). The rule, on that message alone:
#   retryable: a timeout ("timed out", "The read operation timed out"), HTTP 408, 429 and 5xx, and a
#              dropped or refused connection or a temporary DNS failure: the server or the network may
#              answer next time;
#   permanent: everything else: other HTTP 4xx (404 gone, 403 forbidden, 410), unknown host, bad URL,
#              TLS certificate errors, hash mismatch, failed_to_resize, a response over --max-image-mb
#              ("too large", download_client.py), and any message not listed above.
#              Saved files PIL cannot decode (invalid_images.parquet) are permanent data failures too.
# Unknown messages count as permanent so that a rerun is never asked for in vain; the reasons are printed
# and kept in download_summary.json either way.
_RETRYABLE_RE = re.compile(
    r"timed out|timeout|HTTP Error (?:408|429|5\d\d)\b|Connection (?:refused|reset|aborted)|"
    r"Remote end closed connection|RemoteDisconnected|IncompleteRead|Connection broken|"
    r"Temporary failure in name resolution|Network is unreachable|No route to host|"
    r"EOF occurred in violation of protocol",
    re.IGNORECASE,
)


def is_retryable(error_message: str | None) -> bool:
    """Whether a failed download's error_message is worth another try (the rule above)."""
    return bool(error_message) and _RETRYABLE_RE.search(error_message) is not None


def _shards_with_retryable(out: Path, shard_ids: list[int]) -> list[int]:
    """Finished shards holding a retryable failure (only their error_message column is read)."""
    found = []
    for shard_id in shard_ids:
        messages = pq.read_table(out / IMAGES_DIR / f"{shard_name(shard_id)}.parquet",
                                 columns=["error_message"]).column("error_message")
        if any(is_retryable(m) for m in pc.unique(messages).to_pylist()):
            found.append(shard_id)
    return found


def make_summary(cfg: DownloadConfig, n_rows: int, shard_ids: list[int], finished: list[int],
                 counts: OutputCounts, validation: ValidationStats, timings: dict | None) -> dict:
    unfinished = [s for s in shard_ids if s not in set(finished)]
    return {
        "source": cfg.source,
        "split": cfg.split,
        "rows_in": n_rows,
        "shard_size": cfg.shard_size,
        "shards": {"total": len(shard_ids), "finished": len(finished), "unfinished": unfinished},
        "rows_in_finished_shards": counts.rows,
        "downloaded": counts.downloaded,
        "failed": sum(counts.failed_by_status.values()),
        "failed_by_status": dict(counts.failed_by_status.most_common()),
        "failed_retryable": sum(n for reason, n in counts.failure_reasons.items() if is_retryable(reason)),
        "shards_with_retryable": _shards_with_retryable(Path(cfg.output), finished),
        "failure_reasons": dict(counts.failure_reasons.most_common(20)),
        "invalid": counts.invalid,
        "valid": counts.downloaded - counts.invalid,
        "full_metadata_rows": counts.metadata_rows,
        "validation": validation.as_dict(),
        "seconds": timings or {},
        "files": {"urls": URLS_FILE, "images": f"{IMAGES_DIR}/", "full_metadata": FULL_METADATA_FILE,
                  "metadata_csv": METADATA_CSV, "invalid_images": INVALID_FILE, "validation": f"{VALIDATION_DIR}/"},
    }


def print_summary(out: Path, summary: dict) -> None:
    retryable = summary.get("failed_retryable", 0)
    lines = [
        f"Download summary ({out})",
        f"  rows in source:      {summary['rows_in']} "
        f"in {plural(summary['shards']['total'], 'shard')} of {summary['shard_size']}",
        f"  downloaded:          {summary['downloaded']}",
        f"  failed to download:  {summary['failed']}"
        + (f"  ({retryable} retryable: timeout, HTTP 408/429/5xx, connection; {summary['failed'] - retryable} "
           "permanent)" if summary["failed"] else ""),
    ]
    # One line per reason: urllib's redirect-loop message, among others, spans lines (kept whole in the json).
    lines += [f"      {n:>8}  {' '.join(reason.split())}"
              for reason, n in list(summary["failure_reasons"].items())[:10]]
    lines += [
        f"  invalid (saved but undecodable): {summary['invalid']}  -> {out / INVALID_FILE}",
        f"  valid images:        {summary['valid']}  -> "
        + (f"{out / FULL_METADATA_FILE}, {out / METADATA_CSV}" if not summary["shards"]["unfinished"]
           else f"{FULL_METADATA_FILE} and {METADATA_CSV} are written once every shard is done"),
        f"  images:              {out / IMAGES_DIR}",
    ]
    unfinished = summary["shards"]["unfinished"]
    if unfinished:
        lines.append(f"  UNFINISHED shards:   {len(unfinished)} ({', '.join(map(shard_name, unfinished[:10]))}"
                     f"{', ...' if len(unfinished) > 10 else ''}); rerun the same command to retry them")
    print("\n".join(lines), flush=True)


def stats_files(out: Path, shards: list[int], shown: int = 10) -> str:
    """The stats files to delete, as paths that work from where the user is; past `shown`, where the rest are."""
    names = [str(out / IMAGES_DIR / stats_file(shard_name(s))) for s in shards[:shown]]
    more = len(shards) - shown
    return ", ".join(names) + (f" and {more} more (shards_with_retryable in {out / SUMMARY_FILE})" if more > 0 else "")
