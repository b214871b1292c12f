#!/usr/bin/env python3
"""Caption the downloaded ContraStyles images with Gemma 3, checkpointing and pushing to the Hub.

Examples:
  python batched_image_inference.py --max-images 10 --no-push
  python batched_image_inference.py --model google/gemma-3-4b-it --hf-repo me/ContraStylesRecap
  accelerate launch --num_processes 8 batched_image_inference.py --model google/gemma-3-12b-it
  python batched_image_inference.py --merge-only --checkpoint-dir ckpt_a ckpt_b
"""
from __future__ import annotations

import argparse

from vlm_caption import cli

try:
    from vlm_caption.config import COMPILE_CHOICES, DECODE_LOOPS, RunConfig
except ModuleNotFoundError as e:  # outside the venv: one line saying what to do, not a traceback
    from vlm_caption.cli import exit_missing_dependency
    exit_missing_dependency(e, as_script=__name__ == "__main__")

D = RunConfig()  # every default is the dataclass's, typed once


def auto_or_int(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to caption")
    g.add_argument("--model", default=D.model, help="HF model id or local dir (default: %(default)s)")
    g.add_argument("--data-dir", default=D.data_dir, help="what download_data.py wrote (default: %(default)s)")
    g.add_argument("--max-images", type=int, help="caption only the first N images (key order) of the selection")
    g.add_argument("--shards", help="only these img2dataset shards, e.g. 0-24 or 3,5,7-9")
    g.add_argument("--num-workers", type=int, help="split the work into this many slices (default: Slurm array "
                   "size x srun tasks x torchrun / accelerate world size, else 1; given, it replaces Slurm's own)")
    g.add_argument("--worker-index", type=int, help="which slice this machine takes, 0-based")
    g.add_argument("--retry-failed", action="store_true", help="caption images recorded as failed again")
    g.add_argument("--strict", action="store_true", help="exit 3 on any failure, even images that cannot be "
                   "decoded (by default those are recorded and the run exits 0)")
    g.add_argument("--keep-columns", help="carry these further metadata columns into the output, e.g. "
                   "aesthetic,license (comma-separated; default: the ContraStyles columns only)")

    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="instruction given with each image (default: a detailed description prompt); it "
                   "may name row columns, e.g. 'Tags: {tags}' ({{ and }} for literal braces)")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--prompts-file", help="YAML or JSON of named prompts ({name: prompt}): each image is captioned "
                   "once per prompt, into columns vlm_caption_NAME, caption_flags_NAME, caption_finish_NAME, "
                   "caption_tokens_NAME, caption_attempts_NAME; excludes --prompt / --prompt-file")
    g.add_argument("--format", default=D.format, help="text (default), or json: the "
                   "JSON instruction is appended to the prompt and the answer parsed into caption_FIELD columns "
                   "(invalid JSON: flag invalid_json and one retry; some keys absent: flag missing_fields; vlm_caption "
                   "keeps the raw text)")
    g.add_argument("--json-fields", help="--format json: comma-separated fields (default: "
                   "subject,style,medium,palette,composition,mood,text)")
    g.add_argument("--template-value-chars", type=int, default=D.template_value_chars, help="a metadata value "
                   "longer than this is cut (at a word, with an ellipsis) where a prompt template names its column; "
                   "0: whole values, as runs made before this limit (default: %(default)s)")
    g.add_argument("--max-tokens", type=int, default=D.max_tokens, help="max new tokens per caption, at most what "
                   "the model's context leaves after the prompt (default: %(default)s)")
    g.add_argument("--min-tokens", type=int, default=D.min_tokens, help=argparse.SUPPRESS)  # fixed-length benchmarks
    g.add_argument("--temperature", type=float, default=D.temperature, help="0 = greedy (default); >0 samples with a "
                   "per-image seed, so reruns reproduce")
    g.add_argument("--top-p", type=float, default=D.top_p, help="nucleus sampling cutoff when --temperature > 0 "
                   "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=D.seed, help="base seed of per-image sampling (default: %(default)s)")
    g.add_argument("--retry-repetition-penalty", type=float, default=D.retry_repetition_penalty,
                   help="a caption flagged repetition, empty or invalid_json is generated once more with this repetition "
                   "penalty and no repeated 4-grams; the better of the two is kept; 0: no second try "
                   "(default: %(default)s)")
    g.add_argument("--batch-size", type=auto_or_int, default=None, help="images per generate call, or auto "
                   "(default): start high and halve on out-of-memory")
    g.add_argument("--max-auto-batch-size", type=int, default=D.max_auto_batch_size, help=argparse.SUPPRESS)
    g.add_argument("--backend", default=D.backend, help="inference engine: transformers (default) or dummy "
                   "(no model: deterministic text from the key and image statistics, for tests and demos)")
    g.add_argument("--dtype", default=D.dtype, help="auto (bf16 on GPUs that support it, else fp16; fp32 on CPU), "
                   "bfloat16, float16, float32")
    g.add_argument("--device-map", help="'auto' spreads/offloads a model too big for one GPU (slow)")
    g.add_argument("--attn-implementation", default=D.attn_implementation, help="sdpa (default), flash_attention_2, flash_attention_3, eager")
    g.add_argument("--num-loader-workers", type=auto_or_int, default=D.num_loader_workers, help="image decode "
                   "threads, or auto (default): the usable cores minus one")
    g.add_argument("--compile", default=D.compile, choices=COMPILE_CHOICES, help="static KV cache with the "
                   "decode step compiled by torch.compile (CUDA graphs): auto (default) = on for CUDA, off for CPU; "
                   "falls back to the dynamic cache when prompt + --max-tokens exceeds Gemma 3's sliding window")
    g.add_argument("--decode-loop", default=D.decode_loop, choices=DECODE_LOOPS, help="auto "
                   "(default): graph where the compiled static cache runs on CUDA with the model on one device, else "
                   "generate; generate: transformers' loop; graph: after generate's prefill, one compiled step per "
                   "token with no host work between steps (greedy decoding; sampling and a model spread by "
                   "--device-map keep generate); continuous: graph where a row that stops gives its slot to the "
                   "next image at once, so a batch no longer waits for its longest caption")
    g.add_argument("--compile-cache", default=D.compile_cache, metavar="DIR", help="where torch.compile keeps "
                   "its kernels, so that a relaunch or another machine loads them instead of compiling again: auto "
                   "(default) = $TORCHINDUCTOR_CACHE_DIR if set, else compile_cache/ in the checkpoint dir; none = "
                   "torch's default (/tmp, per machine); or a directory")
    g.add_argument("--vision-overlap", action="store_true", help="experimental: run the next batch's vision "
                   "tower on its own CUDA stream while this batch decodes (same captions; no steady gain measured "
                   "on an H100 at batch 256)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", nargs="+", action="extend", dest="checkpoint_dirs",
                   metavar="DIR", help="where parts go (default: ./checkpoints); several with --merge-only")
    g.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every, help="rows per local part file (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue a run (done images are always skipped)")
    g.add_argument("--overwrite", action="store_true", help="set aside a checkpoint dir's run with other settings")
    g.add_argument("--merge-only", action="store_true", help="merge parts of the checkpoint dir(s), check "
                   "coverage against the data dir, and stop")
    g.add_argument("--dry-run", action="store_true", help="print the plan and stop; loads no model")

    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--hf-repo", default=D.hf_repo, help="dataset repo: NAME or USER/NAME (default: %(default)s)")
    g.add_argument("--hf-username", default=D.hf_username, help="owner for a bare --hf-repo (default: %(default)s)")
    g.add_argument("--push-every", type=int, default=D.push_every, help="push once this many rows wait (default: %(default)s)")
    g.add_argument("--min-push-interval", type=float, default=D.min_push_interval, help="seconds between one worker's Hub "
                   "commits, at least (default: %(default)s)")
    g.add_argument("--hub-commits-per-hour", type=int, default=D.hub_commits_per_hour, help="commit budget of all workers together; "
                   "each worker waits num_workers x 3600 / budget s between commits if that is longer "
                   "(default: %(default)s; the Hub allows about 128 per hour)")
    g.add_argument("--no-push", action="store_true", help="never touch the network")
    g.add_argument("--push-only", action="store_true", help="push what the checkpoint dir holds unpushed, then stop")
    g.add_argument("--check-hub", action="store_true", help="check on the Hub that every selected key of the data "
                   "dir is published once or recorded failed (the run of --checkpoint-dir, else of these flags); "
                   "writes hub_coverage.json into the checkpoint dir, exits 4 on missing or duplicated keys")
    g.add_argument("--private", action="store_true", help="create the repo private")
    g.add_argument("--hub-endpoint", help="another Hub endpoint (a mirror or a local test server)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (also of the HTTP libraries)")
    return p


def main(argv: list[str] | None = None) -> int:
    from vlm_caption import pipeline
    from vlm_caption.cli import setup_logging

    args = vars(build_parser().parse_args(argv))
    args["checkpoint_dirs"] = args["checkpoint_dirs"] or D.checkpoint_dirs  # "extend" starts from None
    setup_logging(args["verbose"])
    return pipeline.run(RunConfig(**args))


if __name__ == "__main__":
    from vlm_caption.cli import run_main

    run_main(main, exit_at_once_on_signal=True)  # threads only: no child process to clean up
