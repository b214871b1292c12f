"""The GPU check's whole-pipeline section: pipeline.run over art-sized JPEGs with the model gpu_check.py built
(make_backend bypassed), each batch's time kept, the steady rate over the batches between the first and the last."""
from __future__ import annotations

import json
import time
from pathlib import Path

# --pipeline-runs: the whole pipeline's variants, each a section of its own (key: PIPELINE_RUNS[name][0])
PIPELINE_RUNS = {"plain": ("pipeline", False, "generate"), "overlap": ("pipeline_overlap", True, "generate"),
                 "graph": ("pipeline_graph", False, "graph"), "overlap_graph": ("pipeline_overlap_graph", True, "graph")}


def write_data_dir(data: Path, paths: list[Path], images: int) -> Path:
    """A data dir in img2dataset's layout of `images` rows, cycling through the JPEGs `paths` (sample_data.py's
    needs exifread, which the GPU host lacks)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlm_caption import data_layout
    from vlm_caption.validate import FULL_METADATA_SCHEMA

    rows = []
    for i in range(images):
        key = data_layout.img2dataset_key(i, 10_000)
        name = data_layout.image_file_name(0, key)
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[i % len(paths)], data / name)
        rows.append({"key": key, "file_name": name, "url": f"http://127.0.0.1/{key}.jpg", "caption": "art"})
    pq.write_table(pa.Table.from_pylist(rows, schema=FULL_METADATA_SCHEMA), data / data_layout.FULL_METADATA_FILE)
    return data


def run_pipeline(model, processor, paths: list[Path], root: Path, args, batch: int, prompt: str,
                 vision_overlap: bool = False, decode_loop: str = "generate") -> dict:
    """The whole pipeline (pipeline.run: loader threads, background assembly, generate, writer thread, part
    files; no Hub) over `--pipeline-images` art-sized JPEGs with the model already built (make_backend is
    bypassed), compiled static decode: run_summary.json's captioning rate (after the first batch) and the
    steady rate of the batches between the first and the last."""
    import pyarrow.parquet as pq

    from vlm_caption import caption_loop, pipeline
    from vlm_caption.captioner import Captioner
    from vlm_caption.config import RunConfig

    data, ckpt = root / "data", root / "ckpt"
    write_data_dir(data, paths, args.pipeline_images)

    batch_ends: list[float] = []  # when each batch's generate returned (one generate thread: back to back)

    def built_backend(name, *, model: str, prompt: str, max_tokens: int, min_tokens: int = 0, compile: str = "auto",
                      vision_overlap: bool = False, decode_loop: str = "generate", vision_attention: str = "auto",
                      **_):
        cap = Captioner(built_backend.model, processor, model_name=model, prompt=prompt, max_tokens=max_tokens,
                        min_tokens=min_tokens, compile=compile, vision_overlap=vision_overlap, decode_loop=decode_loop,
                        vision_attention=vision_attention,
                        compile_options={"backend": "eager"} if args.cpu_smoke else {})
        generate = cap.generate

        def timed_generate(*a, **kw):
            captions = generate(*a, **kw)
            batch_ends.append(time.perf_counter())
            return captions

        cap.generate = timed_generate
        return cap

    built_backend.model = model
    real = caption_loop.make_backend
    caption_loop.make_backend = built_backend
    cfg = RunConfig(model=args.preset, data_dir=str(data), checkpoint_dirs=[str(ckpt)], batch_size=batch,
                    max_tokens=args.new_tokens, min_tokens=args.new_tokens, prompt=prompt, no_push=True,
                    compile="on", vision_overlap=vision_overlap, decode_loop=decode_loop,
                    vision_attention=args.vision_attention,
                    retry_repetition_penalty=0)  # the bare batches never retry: the same arithmetic here
    try:
        start = time.perf_counter()
        code = pipeline.run(cfg)
        wall = time.perf_counter() - start
    finally:
        caption_loop.make_backend = real
    summary = json.loads((ckpt / "run_summary.json").read_text())["this_run"]
    # The second try (retry_pool.py) would generate a flagged caption once more, and random weights write
    # garbage that is flagged nearly always: it is off above (runs 1 and 2 had it on); counted anyway.
    attempts = pq.read_table(ckpt / "all_captions.parquet", columns=["caption_attempts"]).column(0).to_pylist()
    retried = sum(1 for a in attempts if a and a > 1)
    rate = summary.get("captioning_img_per_s") or 0
    # run_summary's rate starts after the first batch (compilation) and so counts the last batch, which with
    # --vision-overlap has no next batch's vision tower to share the card with: over 2 batches (GPU run 3)
    # that read 41 img/s where the batches in between ran at ~24. The steady rate leaves out both ends.
    gaps = [b - a for a, b in zip(batch_ends, batch_ends[1:])]  # batches 2..n
    steady = round(batch * (len(gaps) - 1) / sum(gaps[:-1]), 3) if len(gaps) >= 2 else None
    batch_s = [round(g, 3) for g in gaps]
    return {"batch": batch, "images": args.pipeline_images, "vision_overlap": vision_overlap,
            "decode_loop": decode_loop, "exit_code": code,
            "wall_s": round(wall, 1),
            "retried": retried, "generated_captions_s": round(rate * (1 + retried / max(len(attempts), 1)), 3),
            "captioning_img_s": summary.get("captioning_img_per_s"), "img_s_with_first_batch": summary.get("img_per_s"),
            "steady_img_s": steady, "batch_s": batch_s,
            "tokens_s": round((summary.get("captioning_img_per_s") or 0) * args.new_tokens, 1),
            "generate_share": summary.get("generate_share"),
            "captioned": summary.get("captioned"), "failed": summary.get("failed_by_stage"),
            "loader_threads": "auto (cores - 1)", "resize": "on the device" if model.device.type == "cuda" else "CPU"}
