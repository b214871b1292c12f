#!/usr/bin/env python3
"""The steps that need no model, at the data set's real size: plan, relaunch of a nearly finished run, many
workers starting on it, merge, preview, dataset card, --push-only to the local Hub stub and a relaunch after it.

Builds a data dir of --rows metadata rows pointing at the few images of a small sample (bench_memory's
scaled_sample), then a checkpoint dir where all but --left rows are done, written the way a real run writes them:
parts of --part-rows rows through the store's own writer (CheckpointStore.write_part), split between --writers
workers by the real key partition, with captions of about --caption-chars characters of varied words (real
captions: one or two paragraphs). The rows left are captioned by the dummy backend (no model). Each step is a
fresh process of the real command line; its wall time and peak RSS (/usr/bin/time) are measured from outside.

--layout shards makes img2dataset's own layout instead (shard parquets without file_name, a folder of image files
per shard, no full_metadata.parquet). --hub-files N publishes the dir before --push-only the way a run's periodic
pushes do (one file per worker per push, about N files), so the relaunches read a Hub of many small files. A code
dir other than this checkout (--code-dir, e.g. a `git worktree` of an older commit) runs the steps with that code.

    python benchmarks/bench_scale.py --rows 400000 --hub-files 1000 --work bench_scale
    python benchmarks/bench_scale.py --rows 400000 --layout shards --steps plan,relaunch,workers,merge,preview
    python benchmarks/bench_scale.py --rows 400000 --caption-chars 3600 --steps push_only

Prints one JSON line per step: {"step", "rows", "wall_s", "peak_rss_mb", ...}; relaunches add "plan_s" (until
the "N to caption" line) and "start_s" (until captioning starts: the "batch size" line); Hub steps add the
requests the stub answered, the commits and the files the repo holds.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

REPO = "tester/bench-scale"
STEPS = ("plan", "relaunch", "workers", "merge", "preview", "card", "push_only", "relaunch_after_push",
         "fresh_dir_after_push", "workers_after_push")
HUB_STEPS = STEPS[5:]
MARKS = {"plan_s": " to caption", "start_s": "INFO vlm_caption.pipeline: batch size"}
_WORDS = ("a quiet study in colour and light with soft edges under an open sky painted loosely the figure stands "
          "before a dark wooden door while warm ochre and umber tones fill the background brushwork visible thick "
          "impasto strokes oil on canvas ink wash watercolour pencil digital render composition centred diagonal "
          "mood calm melancholic bright signature lower right corner text reads").split()


def captions(n: int, chars: int, seed: int = 0) -> list[str]:
    """n distinct captions of about `chars` characters of varied words (parquet compresses them like prose)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words: list[str] = []
        while sum(map(len, words)) + len(words) < chars:
            words.append(rng.choice(_WORDS))
        out.append(" ".join(words).capitalize() + ".")
    return out


def shard_layout(base: Path, out: Path, rows: int, shard_size: int = 10_000) -> Path:
    """img2dataset's own layout with no full_metadata.parquet (a download still under way, or validation not
    run): shard parquets without file_name, and a folder of image files per shard (hard links to the few images
    of a small sample, each with its .json as img2dataset writes), which the run lists to find each image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption.data_layout import img2dataset_key, shard_name, stats_file
    from vlm_caption.download import SHARD_SCHEMA
    from vlm_caption.sample_data import write_sample

    write_sample(base, n=16, broken=False, seed=0)
    images = sorted((base / "images").glob("*/*.jpg"))
    for s in range(-(-rows // shard_size)):
        folder = out / "images" / shard_name(s)
        folder.mkdir(parents=True)
        table = []
        for i in range(s * shard_size, min(rows, (s + 1) * shard_size)):
            key = img2dataset_key(i, shard_size)
            os.link(images[i % len(images)], folder / f"{key}.jpg")
            (folder / f"{key}.json").write_text("{}")
            table.append({"original_key": str(i), "source_md5": f"{i:032x}", "tags": "oil painting, portrait",
                          "merged_tags": "oil painting, portrait, art", "caption": f"alt text of image {i}",
                          "url": f"https://img.example/{i}.jpg", "key": key, "status": "success", "width": 500,
                          "height": 350, "original_width": 2000, "original_height": 1400, "sha256": f"{i:064x}"})
        pq.write_table(pa.Table.from_pylist(table, schema=SHARD_SCHEMA), folder.with_suffix(".parquet"))
        (out / "images" / stats_file(shard_name(s))).write_text(json.dumps({"successes": len(table)}))
    return out


def settings_for(data: Path) -> dict:
    from vlm_caption.config import RunConfig

    return RunConfig(model="dummy-model", backend="dummy", data_dir=str(data)).run_settings()


def build_nearly_done(data: Path, ckpt: Path, left: int, writers: int, part_rows: int, chars: int) -> dict:
    """A checkpoint dir of the dummy run where every key but `left` random ones is captioned, in parts written by
    `writers` workers (the real partition) through the store's writer, each worker's parts in key order."""
    from vlm_caption.dataset import iter_rows, plan_work, worker_of
    from vlm_caption.schema import IMAGE_PATH
    from vlm_caption.store import CheckpointStore

    t0 = time.perf_counter()
    plan = plan_work(data, shards=None, max_images=None, worker=0, num_workers=1, done_keys=set(), failed_keys=set())
    keys = sorted(plan.todo_keys)
    todo = plan.todo_keys - set(random.Random(1).sample(keys, left))
    texts = captions(4096, chars)
    by_worker: dict[int, list[dict]] = collections.defaultdict(list)
    for i, row in enumerate(iter_rows(data, todo)):  # the metadata as a run reads it, in its order
        row.pop(IMAGE_PATH)
        by_worker[worker_of(row["key"], writers)].append({
            **row, "vlm_caption": texts[(i * 7919) % len(texts)], "caption_model": "dummy:dummy-model",
            "caption_finish": "stop", "caption_tokens": chars // 5, "caption_flags": [], "caption_attempts": 1})
    first = CheckpointStore(ckpt, 0, num_workers=writers)
    first.open_run(settings_for(data), overwrite=False)
    first.lock.release()
    parts = 0
    for w, rows in sorted(by_worker.items()):
        store = CheckpointStore(ckpt, w, num_workers=writers)
        store.run_id, store.dir_id = first.run_id, first.dir_id
        for start in range(0, len(rows), part_rows):
            store.write_part(rows[start:start + part_rows])
            parts += 1
    return {"step": "build", "rows_done": len(todo), "parts": parts, "writers": writers,
            "disk_mb": round(sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 2**20, 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


class Proc:
    """One command line, its output lines timed, its peak RSS from /usr/bin/time (a child forked from this
    process would count this process's own memory in its ru_maxrss: Linux carries the high-water mark over fork)."""

    def __init__(self, cmd: list[str], env: dict):
        self.t0 = time.perf_counter()
        self.rss_file = tempfile.NamedTemporaryFile(prefix="bench_scale_rss_", delete=False)
        self.p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", self.rss_file.name, *cmd], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.marks: dict[str, float] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            for name, text in MARKS.items():
                if name not in self.marks and text in line:
                    self.marks[name] = round(time.perf_counter() - self.t0, 2)
            self.lines.append(line)

    def result(self) -> dict:
        self.p.wait()
        wall = time.perf_counter() - self.t0
        self.reader.join()
        rss_kb = Path(self.rss_file.name).read_text().split()[-1]
        os.unlink(self.rss_file.name)
        out = {"exit_code": self.p.returncode, "wall_s": round(wall, 2),
               "peak_rss_mb": round(int(rss_kb) / 1024, 1), **self.marks}
        if self.p.returncode not in (0, 3):
            out["tail"] = "".join(self.lines[-8:])[-1500:]
        return out


class Many:
    """Processes started together: the worst of each measure, and each one's plan time."""

    def __init__(self, procs: list[Proc]):
        self.procs = procs

    def result(self) -> dict:
        results = [proc.result() for proc in self.procs]
        out = {"workers": len(results), "exit_code": max(r["exit_code"] for r in results),
               **{f"{k}_max": max(r.get(k, 0) for r in results) for k in ("plan_s", "start_s", "wall_s", "peak_rss_mb")},
               "plan_s_each": [r.get("plan_s") for r in results]}
        tails = [r["tail"] for r in results if "tail" in r]
        return {**out, **({"tail": tails[0]} if tails else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--left", type=int, default=1000, help="rows not yet captioned in the nearly finished dir")
    p.add_argument("--writers", type=int, default=8, help="workers whose parts the nearly finished dir holds")
    p.add_argument("--part-rows", type=int, default=200, help="rows per part (--checkpoint-every)")
    p.add_argument("--caption-chars", type=int, default=1200)
    p.add_argument("--layout", choices=("full", "shards"), default="full",
                   help="full: full_metadata.parquet naming each image's file; shards: img2dataset's shard "
                        "parquets and one folder of files per shard (every image file is made: slower to build)")
    p.add_argument("--workers", type=int, default=8, help="processes started together in the 'workers' step")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--hub-files", type=int, default=0,
                   help="before --push-only, publish the dir the way a run's periodic pushes do, in about this "
                        "many Hub files (one per worker per push), leaving the last push's parts pending; 0: the "
                        "Hub starts empty")
    p.add_argument("--code-dir", default=str(ROOT), help="checkout whose batched_image_inference.py runs")
    p.add_argument("--work", help="keep the data and the checkpoint dirs here (default: a tmp dir, removed)")
    args = p.parse_args()
    steps = args.steps.split(",")
    if unknown := set(steps) - set(STEPS):
        p.error(f"unknown step(s) {', '.join(sorted(unknown))}")
    from bench_memory import scaled_sample

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": args.code_dir,
           "HF_HOME": str(work / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    script = str(Path(args.code_dir) / "batched_image_inference.py")
    data = work / f"data{args.rows}-{args.layout}"
    if not data.exists():
        make = scaled_sample if args.layout == "full" else shard_layout
        make(work / f"base{args.rows}-{args.layout}", data, args.rows)
    done = work / f"done{args.rows}-{args.layout}"  # the nearly finished dir, kept pristine: each step works on a copy
    if not done.exists():
        print(json.dumps({**build_nearly_done(data, done, args.left, args.writers, args.part_rows,
                                              args.caption_chars), "rows": args.rows, "layout": args.layout}),
              flush=True)

    def fresh_copy(name: str) -> Path:
        dest = work / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(done, dest)
        return dest

    def cli(ckpt: Path, *extra: str, hub: tuple[str, dict] | None = None) -> Proc:
        base = [sys.executable, script, "--model", "dummy-model", "--backend", "dummy", "--data-dir", str(data),
                "--checkpoint-dir", str(ckpt)]
        if hub is None:
            return Proc([*base, "--no-push", *extra], env)
        endpoint, hub_env = hub
        return Proc([*base, "--hf-repo", REPO, "--hub-endpoint", endpoint, *extra], {**env, **hub_env})

    def report(step: str, result: dict, **more) -> None:
        print(json.dumps({"step": step, "rows": args.rows, "layout": args.layout, **result, **more}), flush=True)

    if "plan" in steps:
        shutil.rmtree(work / "fresh", ignore_errors=True)
        report("plan", cli(work / "fresh", "--dry-run").result(), dir="fresh")
        report("plan", cli(fresh_copy("relaunch"), "--dry-run").result(), dir="nearly finished")
    if "relaunch" in steps:
        report("relaunch", cli(fresh_copy("relaunch")).result(), left=args.left)
    if "workers" in steps:
        ckpt = fresh_copy("workers")
        report("workers", Many([cli(ckpt, "--num-workers", str(args.workers), "--worker-index", str(i))
                                for i in range(args.workers)]).result())
    merged = work / "relaunch"  # a finished dir (merged by the relaunch), or the nearly finished one
    if not merged.exists():
        fresh_copy("relaunch")
    if "merge" in steps:
        report("merge", cli(merged, "--merge-only").result())
    if "preview" in steps:
        if not (merged / "all_captions.parquet").exists():
            cli(merged, "--merge-only").result()
        cmd = [sys.executable, "-m", "vlm_caption.preview", str(merged), "--data-dir", str(data), "--out",
               str(work / "preview.html")]
        report("preview", Proc(cmd, env).result())
    hub_steps = [s for s in steps if s in HUB_STEPS]
    if hub_steps:
        run_hub_steps(hub_steps, work, cli, fresh_copy, report, env, done, args.hub_files, args.workers)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


CARD_CHILD = """
import json, sys
from pathlib import Path
from vlm_caption import endings, hub, store
ckpt = Path(sys.argv[1])
client = hub.connect(sys.argv[2], endpoint=sys.argv[3], checkpoint_dir=ckpt)
failed = endings.still_failed([ckpt], set())
card = client.write_card(store.read_run_json(ckpt), endings.read_summary(ckpt), {k: r["stage"] for k, r in failed.items()})
print("card chars", len(card))
"""


def publish_incrementally(stub, done: Path, ckpt: Path, files: int) -> dict:
    """Fill `ckpt` with the parts of `done` a few per worker at a time, pushing after each round (one Hub file
    per worker per push, as a run's background pusher makes them); the last round stays unpushed."""
    from vlm_caption import hub
    from vlm_caption.store import RUN_JSON, list_parts, read_run_json

    t0 = time.perf_counter()
    ckpt.mkdir(parents=True)
    shutil.copy2(done / RUN_JSON, ckpt / RUN_JSON)
    (ckpt / "parts").mkdir()
    by_worker: dict[int, list] = collections.defaultdict(list)
    for part in list_parts(done):
        by_worker[part.worker].append(part)
    rounds = max(2, files // max(1, len(by_worker)) + 1)
    client = hub.connect(REPO, endpoint=stub.endpoint, checkpoint_dir=ckpt)
    run_id = read_run_json(ckpt)["run_id"]
    for r in range(rounds):
        for parts in by_worker.values():
            for part in parts[r * len(parts) // rounds:(r + 1) * len(parts) // rounds]:
                os.link(part.path, ckpt / "parts" / part.path.name)
        if r < rounds - 1:
            client.push(ckpt, run_id)
    return {"step": "publish", "hub_files": len(stub.repo_files(REPO)), "commits": stub.commits_applied,
            "wall_s": round(time.perf_counter() - t0, 1)}


def run_hub_steps(steps, work: Path, cli, fresh_copy, report, env, done: Path, hub_files: int,
                  n_workers: int) -> None:
    from hub_stub import HubStub

    shutil.rmtree(work / "stub", ignore_errors=True)
    stub = HubStub(work / "stub").start()
    hub_env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": stub.token}
    hub = (stub.endpoint, hub_env)

    def counted(step: str, proc) -> None:
        n0, c0 = len(stub.requests), stub.commits_applied
        result = proc().result()
        reqs = stub.requests[n0:]
        kinds = collections.Counter(f"{m} {re.sub(r'/[0-9a-f]{40}|[?].*', '', path)}" for m, path, _ in reqs)
        try:
            files = len(stub.repo_files(REPO))
        except KeyError:  # no repo yet
            files = 0
        report(step, result, requests=len(reqs), commits=stub.commits_applied - c0,
               hub_files=files, top_requests=dict(kinds.most_common(4)))

    try:
        if hub_files:
            os.environ.update(hub_env, HF_HOME=env["HF_HOME"])
            shutil.rmtree(work / "pushed", ignore_errors=True)
            ckpt = work / "pushed"
            print(json.dumps(publish_incrementally(stub, done, ckpt, hub_files)), flush=True)
        else:
            ckpt = fresh_copy("pushed")
        counted("push_only", lambda: cli(ckpt, "--push-only", hub=hub))  # every other Hub step needs it
        if "card" in steps:
            counted("card", lambda: Proc([sys.executable, "-c", CARD_CHILD, str(ckpt), REPO, stub.endpoint],
                                         {**env, **hub_env}))
        if "relaunch_after_push" in steps:
            counted("relaunch_after_push", lambda: cli(ckpt, hub=hub))
        if "fresh_dir_after_push" in steps:
            shutil.rmtree(work / "fresh_hub", ignore_errors=True)
            counted("fresh_dir_after_push", lambda: cli(work / "fresh_hub", hub=hub))
        if "workers_after_push" in steps:  # on a copy of the pushed dir (after the steps above: nothing left to do)
            copy = work / "pushed_workers"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ckpt, copy)

            def workers():
                return Many([cli(copy, "--num-workers", str(n_workers), "--worker-index", str(i), hub=hub)
                             for i in range(n_workers)])
            counted("workers_after_push", workers)
    finally:
        stub.stop()


if __name__ == "__main__":
    main()
