"""Smoke checks a user runs before a long job (test_pipeline.py): each prints PASS, FAIL with the reason, or SKIP.

The checks reuse the real code paths: dataset.load_image for images, batched_image_inference.main for captioning
(into a tmp checkpoint dir unless one is given), hub.connect for Hub access.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .cli import plural
from .data_layout import IMAGES_DIR, SHARD_NAMES
from .errors import FatalError, UsageError
from .schema import IMAGE_PATH, source_columns

DEFAULT_SMOKE_MODEL = "google/gemma-3-4b-it"
DEFAULT_SMOKE_REPO = "ContraStylesRecap-smoketest"
REQUIRED_COLUMNS = tuple(source_columns())  # what a data dir must hold for the output registry


class CheckFailed(Exception):
    """A check's one-line reason for failing."""


@dataclass
class Context:
    args: argparse.Namespace
    data_dir: Path
    work_dir: Path | None = None  # tmp dir of this smoke test (tiny model, checkpoints)
    ckpt: Path | None = None
    model: str | None = None
    selection: set[str] = field(default_factory=set)  # the keys --num-images selects
    repo_id: str | None = None  # the Hub dataset of --push
    run_id: str | None = None

    def tmp(self) -> Path:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="vlm-caption-smoke-"))
        return self.work_dir


# ---------------------------------------------------------------- data checks (no model)

def check_data_dir_layout(ctx: Context) -> str:
    from vlm_caption import dataset

    data = ctx.data_dir
    if not data.is_dir():
        what = "is a file, not a directory" if data.exists() else "does not exist"
        raise CheckFailed(f"{data} {what}; download it with: python download_data.py --output {data}")
    if not (data / IMAGES_DIR).is_dir():
        raise CheckFailed(f"{data} has no images/ folder; is it the directory download_data.py wrote?")
    files = dataset.metadata_files(data)
    shards = [d for d in (data / IMAGES_DIR).iterdir() if d.is_dir() and d.name.isdigit()]
    return f"{len(shards)} shard dir(s); metadata from {', '.join(str(p.relative_to(data)) for p, _ in files[:3])}" \
        + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def check_metadata_columns(ctx: Context) -> str:
    from vlm_caption import dataset

    rows = 0
    for path, _ in dataset.metadata_files(ctx.data_dir):
        pf = dataset.open_metadata(path)
        names = pf.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names and SHARD_NAMES.get(c) not in names]
        if missing:
            raise CheckFailed(f"{path} lacks column(s) {', '.join(missing)}; rerun download_data.py to rebuild it")
        rows += pf.metadata.num_rows
    if rows == 0:
        raise CheckFailed(f"the metadata of {ctx.data_dir} has no rows")
    return f"all {len(REQUIRED_COLUMNS)} columns present; {rows} rows"


def check_open_images(ctx: Context) -> str:
    """Open the images --num-images selects (the first N keys, as --max-images N picks them)."""
    from vlm_caption import dataset

    n = ctx.args.num_images
    plan = dataset.plan_work(ctx.data_dir, shards=None, max_images=n, worker=0, num_workers=1, done_keys=set(),
                             failed_keys=set())
    ctx.selection = set(plan.todo_keys)
    if not ctx.selection:
        raise CheckFailed(f"no images with status success in {ctx.data_dir}")
    opened, broken = [], []
    for row in dataset.iter_rows(ctx.data_dir, ctx.selection):
        try:
            img = dataset.load_image(row[IMAGE_PATH])
            opened.append(f"{row['key']} {img.width}x{img.height}")
        except dataset.ImageLoadError as e:
            broken.append(f"{row['key']} ({e.stage}: {str(e).splitlines()[0][:80]})")
    if not opened:
        raise CheckFailed(f"none of {len(broken)} images opens: {'; '.join(broken)}")
    detail = f"{len(opened)}/{len(opened) + len(broken)} opened ({', '.join(opened[:5])})"
    if broken:  # the captioner records such images as failures and goes on: worth knowing, not fatal
        detail += f"; unusable, will be recorded as failures: {'; '.join(broken)}"
    return detail


def check_output_schema(ctx: Context) -> str:
    from vlm_caption import store

    for f in store.OUTPUT_SCHEMA:
        print(f"    {f.name:<16} {f.type}")
    return f"{len(store.OUTPUT_SCHEMA)} columns (above), the same in every part, all_captions.parquet and the Hub"


# ---------------------------------------------------------------- model checks

def check_tiny_model(ctx: Context) -> str:
    from vlm_caption.tiny_model import build_tiny_model

    started = time.monotonic()
    model = build_tiny_model(ctx.tmp() / "tiny_model", preset="tiny", seed=0)
    # Each smoke test its own run: a local model is named by its content (run_identity.py), the same at every build,
    # so a second smoke test would find its captions on the Hub (--push) and caption nothing. A .json file (hashed
    # with the model) makes each build another model, as the tmp path that named the run did before.
    (model / "smoke_test.json").write_text(f'{{"smoke_test": "{uuid.uuid4().hex}"}}\n', encoding="utf-8")
    ctx.model = str(model)
    return f"random-weight Gemma 3 built in {time.monotonic() - started:.1f} s at {ctx.model} (its captions are noise)"


def check_hub_access(ctx: Context) -> str:
    """Token, write access and repo, before any model loads (the same call the pipeline makes)."""
    from vlm_caption import hub
    from vlm_caption.config import resolve_repo_id

    repo_id = resolve_repo_id(ctx.args.hf_repo, ctx.args.hf_username)
    hub.connect(repo_id, endpoint=ctx.args.hub_endpoint, way_out="or leave out --push")
    ctx.repo_id = repo_id
    return f"can write to dataset {repo_id}" + (f" at {ctx.args.hub_endpoint}" if ctx.args.hub_endpoint else "")


def caption_config(ctx: Context, **overrides):
    """The run a user would start with batched_image_inference.py and these flags."""
    from vlm_caption.config import RunConfig

    a = ctx.args
    cfg = RunConfig(model=ctx.model, data_dir=str(ctx.data_dir), checkpoint_dirs=[str(ctx.ckpt)],
                    max_images=a.num_images, max_tokens=a.max_tokens, verbose=a.verbose, no_push=not a.push)
    if a.push:  # push as soon as a part is written: the smoke test wants to see a commit, not batching
        cfg.hf_repo, cfg.hf_username, cfg.hub_endpoint = a.hf_repo, a.hf_username, a.hub_endpoint
        cfg.push_every, cfg.min_push_interval, cfg.hub_commits_per_hour = 1, 0, 3600
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def run_captioning(ctx: Context, **overrides) -> int:
    from vlm_caption import pipeline

    try:
        return pipeline.run(caption_config(ctx, **overrides))
    except (UsageError, FatalError) as e:
        raise CheckFailed(f"the captioning run stopped: {e}") from None


def check_caption(ctx: Context) -> str:
    from vlm_caption import store

    ctx.ckpt = Path(ctx.args.checkpoint_dir) if ctx.args.checkpoint_dir else ctx.tmp() / "checkpoints"
    started = time.monotonic()
    # A --checkpoint-dir of an earlier smoke test: its failed images are tried again (that one may have failed
    # for a reason since fixed), not skipped and judged by their old errors.
    code = run_captioning(ctx, retry_failed=True)
    ctx.run_id = (store.read_run_json(ctx.ckpt) or {}).get("run_id")
    return f"{ctx.model} on {len(ctx.selection)} images in {time.monotonic() - started:.1f} s (exit code {code})"


def selection_counts(ctx: Context) -> tuple[list[dict], dict[str, dict]]:
    """(merged rows of the selected keys, selected keys recorded as failed and not captioned -> their record)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from vlm_caption import store

    merged = pq.read_table(ctx.ckpt / store.MERGED)
    if not merged.schema.equals(store.OUTPUT_SCHEMA):
        raise CheckFailed(f"{store.MERGED} has schema {merged.schema}, not the output schema")
    wanted = merged.filter(pc.is_in(merged.column("key"), value_set=pa.array(sorted(ctx.selection), pa.string())))
    rows = wanted.to_pylist()
    captioned = {r["key"] for r in rows}
    recorded = store.failure_records(ctx.ckpt, ("key", "stage", "error"), quarantine_bad=False)
    failed = {k: r for k, r in recorded.items() if k in ctx.selection and k not in captioned}
    return rows, failed


def check_merged_output(ctx: Context) -> str:
    from vlm_caption import store
    from vlm_caption.images import IMAGE_STAGES

    if not (ctx.ckpt / store.MERGED).is_file():
        raise CheckFailed(f"{ctx.ckpt / store.MERGED} was not written")
    rows, failed = selection_counts(ctx)
    keys = [r["key"] for r in rows]
    n = len(ctx.selection)
    if len(keys) != len(set(keys)):
        raise CheckFailed(f"{store.MERGED} holds a key more than once")
    if len(rows) != n - len(failed):
        missing = sorted(ctx.selection - set(keys) - set(failed))
        raise CheckFailed(f"{len(rows)} rows, expected {n} images - {len(failed)} failures; missing {missing[:10]}")
    # An image that cannot be read is the data's failure; one the model could not caption is this machine's
    # (a CUDA error, a kernel the card lacks, a transformers mismatch): a long job would caption nothing.
    unreadable = {k for k, r in failed.items() if r["stage"] in IMAGE_STAGES}
    not_generated = sorted(set(failed) - unreadable)
    if not_generated:
        first = failed[not_generated[0]]
        raise CheckFailed(f"the model captioned {len(rows)} of {n - len(unreadable)} readable images: "
                          f"{len(not_generated)} failed at {first['stage']}, e.g. key {not_generated[0]}: "
                          f"{(first['error'] or '')[:300]}")
    empty = [r["key"] for r in rows if not (r["vlm_caption"] or "").strip()]
    if empty:
        raise CheckFailed(f"{len(empty)} of {len(rows)} captions are empty (e.g. key {empty[0]})")
    for r in rows[:3]:  # a real model's first captions, to read before trusting hours of GPU time
        print(f"    {r['key']} [{r['caption_finish']}, {r['caption_tokens']} tokens]: {r['vlm_caption'][:300]!r}")
    return f"{len(rows)} rows = {n} images - {len(failed)} recorded failures; exact output schema; no empty caption"


def check_resume(ctx: Context) -> str:
    """A rerun finds every selected key done or failed, captions nothing and rewrites no part."""
    import json

    from vlm_caption import store

    before = {p.path.name: p.path.stat().st_mtime_ns for p in store.list_parts(ctx.ckpt)}
    run_captioning(ctx, resume=True)
    after = {p.path.name: p.path.stat().st_mtime_ns for p in store.list_parts(ctx.ckpt)}
    this_run = json.loads((ctx.ckpt / store.SUMMARY).read_text())["this_run"]
    if after != before or this_run["captioned"]:
        raise CheckFailed(f"the rerun captioned {this_run['captioned']} images and changed the parts "
                          f"({len(before)} before, {len(after)} after)")
    return f"rerun skipped {plural(this_run['skipped_already_done'], 'done image')}, wrote nothing"


def check_push(ctx: Context) -> str:
    """The run says it pushed everything, the ledger names every part, and a fresh listing of the repo
    (not the pusher's own view) holds every file the ledger names, plus the dataset card."""
    import json

    from huggingface_hub import HfApi

    from vlm_caption import hub, store

    summary = json.loads((ctx.ckpt / store.SUMMARY).read_text())
    if not (summary.get("hub") or {}).get("pushed_all"):
        raise CheckFailed(f"the run did not report a complete push (run_summary.json hub = {summary.get('hub')})")
    ledger = [e for e in hub.read_ledger(ctx.ckpt) if e.get("run_id") == ctx.run_id]
    in_ledger = {name for e in ledger for name in e.get("parts", [])}
    unpushed = [p.path.name for p in store.list_parts(ctx.ckpt) if p.path.name not in in_ledger]
    if not ledger or unpushed:
        raise CheckFailed(f"{len(unpushed)} local part(s) are not in the Hub ledger, e.g. {unpushed[:3]}")
    on_hub = set(HfApi(endpoint=ctx.args.hub_endpoint).list_repo_files(ctx.repo_id, repo_type="dataset"))
    absent = [e["hub_path"] for e in ledger if e["hub_path"] not in on_hub]
    if absent:
        raise CheckFailed(f"the ledger names Hub files that {ctx.repo_id} does not hold: {absent[:3]}")
    if "README.md" not in on_hub:
        raise CheckFailed(f"the dataset card README.md is not on {ctx.repo_id}")
    rows = sum(e.get("rows", 0) for e in ledger)
    return f"{rows} rows in {len(ledger)} file(s) on {ctx.repo_id}, dataset card written"


# ---------------------------------------------------------------- running the checks

def plan_checks(args: argparse.Namespace) -> list:
    checks = [check_data_dir_layout, check_metadata_columns, check_open_images, check_output_schema]
    if args.skip_model:
        return checks
    if args.push:  # before the model: a bad token must not wait for a model to load
        checks.append(check_hub_access)
    if args.tiny:
        checks.append(check_tiny_model)
    checks += [check_caption, check_merged_output]
    if args.full:
        checks.append(check_resume)
    if args.push:
        checks.append(check_push)
    return checks


def run_check(check, ctx: Context) -> bool:
    name = check.__name__.removeprefix("check_")
    try:
        detail = check(ctx)
    except (CheckFailed, UsageError, FatalError) as e:
        print(f"FAIL {name}: {e}", flush=True)
        return False
    except Exception as e:  # noqa: BLE001 - a smoke test reports any crash as a FAIL, with its traceback
        traceback.print_exc()
        print(f"FAIL {name}: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
        return False
    print(f"PASS {name}: {detail}", flush=True)
    return True


def run_checks(args: argparse.Namespace) -> int:
    ctx = Context(args=args, data_dir=Path(args.data_dir), model=args.model)
    checks = plan_checks(args)
    passed = 0
    for i, check in enumerate(checks):
        if not run_check(check, ctx):
            # Later checks build on this one: say they did not run rather than pile up follow-on failures.
            for later in checks[i + 1:]:
                print(f"SKIP {later.__name__.removeprefix('check_')}: needs the failed check")
            if ctx.work_dir is not None and not any(ctx.work_dir.iterdir()):  # nothing in it to look at
                ctx.work_dir.rmdir()
                ctx.work_dir = None
            print(f"\n{passed} passed, 1 failed, {len(checks) - i - 1} not run" + (
                f"; files kept in {ctx.work_dir}" if ctx.work_dir else ""))
            return 1
        passed += 1
    gone = ""
    if ctx.work_dir is not None:
        from .store import FAILURES_DIR

        in_tmp = ctx.ckpt is not None and ctx.ckpt.is_relative_to(ctx.work_dir)
        if in_tmp and any((ctx.ckpt / FAILURES_DIR).glob("*.parquet")):  # the run's last lines named them there
            gone = ("; the failures/ named above were in this smoke test's temp dir, now removed "
                    "(--checkpoint-dir DIR keeps them)")
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    print(f"\nall {passed} checks passed{gone}")
    return 0
