"""The command lines of batched_image_inference.py and download_data.py: their flags, grouped, and how --help
shows them.

A newcomer reads `--help` for the few flags a first run needs: it shows the common flags (COMMON_FLAGS) with
short metavars (N, DIR, REPO) and the usage line `usage: PROG [options]`; `--help-all` shows every flag.
The settings and their checks live in config.py (RunConfig, DownloadConfig), the defaults with them.
"""
from __future__ import annotations

import argparse
import textwrap

from . import cli
from .config import (COMPILE_CHOICES, DECODE_ATTENTIONS, DECODE_LOOPS, KV_CACHE_DTYPES, QUANTIZE_CHOICES,
                     VISION_ATTENTIONS, DownloadConfig, RunConfig)

# batched_image_inference.py's flags shown by --help (--help-all adds the others): what a first run needs.
COMMON_FLAGS = frozenset({
    "--help", "--help-all", "--verbose", "--model", "--data-dir", "--max-images", "--shards", "--prompt",
    "--prompt-file", "--format", "--max-tokens", "--hf-repo", "--hf-username", "--no-push", "--push-only",
    "--check-hub", "--checkpoint-dir", "--resume", "--dry-run", "--merge-only", "--batch-size"})


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (examples keep their lines); flag names up to 30 columns keep their help on
    the same line."""

    def __init__(self, prog: str, **kwargs):
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """Lines break at spaces only: not inside tomg-group-umd/ContraStyles or --prompt-file."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Help(argparse._HelpAction):
    """-h/--help (the common flags only, when the parser names some) and --help-all (every flag)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None,
                 every: bool = False):
        super().__init__(option_strings, dest=dest, default=default, help=help)
        self.every = every

    def __call__(self, parser, namespace, values, option_string=None):
        common = getattr(parser, "common_flags", None)
        hidden = [] if self.every or common is None else \
            [a for a in parser._actions if a.help != argparse.SUPPRESS and not common & set(a.option_strings)]
        saved = [(a, a.help) for a in hidden]
        epilog = parser.epilog
        try:
            for a in hidden:
                a.help = argparse.SUPPRESS
            if hidden:
                parser.epilog = (f"These are the common flags; --help-all shows {len(hidden)} more (sampling, Hub "
                                 "pacing, engine tuning, several workers).\n" + (epilog or ""))
            parser.print_help()
        finally:
            parser.epilog = epilog
            for a, text in saved:
                a.help = text
        parser.exit()


def _parser(description: str, epilog: str, common: frozenset[str] | None) -> cli.Parser:
    p = cli.Parser(description=description, epilog=epilog, usage="%(prog)s [options]", add_help=False,
                   formatter_class=HelpFormatter)
    p.common_flags = common
    p.add_argument("-h", "--help", action=_Help, help="show the common flags and exit" if common else
                   "show this help and exit")
    if common:
        p.add_argument("--help-all", action=_Help, every=True, help="show every flag and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (also of the HTTP libraries)")
    return p


def auto_or_int(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def caption_parser(description: str) -> argparse.ArgumentParser:
    """batched_image_inference.py's flags (every default is RunConfig's, typed once)."""
    D = RunConfig()
    p = _parser(description, "README.md (Flags) explains each flag in full.", COMMON_FLAGS)
    g = p.add_argument_group("what to caption")
    g.add_argument("--model", metavar="ID|DIR", default=D.model, help="Hub model id or saved model dir "
                   "(default: %(default)s)")
    g.add_argument("--data-dir", metavar="DIR", default=D.data_dir, help="what download_data.py wrote "
                   "(default: %(default)s)")
    g.add_argument("--max-images", metavar="N", type=int, help="caption only the first N images (key order)")
    g.add_argument("--shards", metavar="SPEC", help="only these shards, e.g. 0-24 or 3,5,7-9")
    g.add_argument("--keep-columns", metavar="COLS", help="further metadata columns to carry into the output, "
                   "e.g. aesthetic,license")
    g.add_argument("--retry-failed", action="store_true", help="caption images recorded as failed again")
    g.add_argument("--strict", action="store_true", help="exit 3 on any failure, even an undecodable image")

    g = p.add_argument_group("prompt and decoding")
    g.add_argument("--prompt", metavar="TEXT", help="instruction given with each image (default: a detailed "
                   "description); may name row columns: 'Tags: {tags}'")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    g.add_argument("--prompts-file", metavar="FILE", help="YAML/JSON {name: prompt}: one caption per prompt, "
                   "in columns vlm_caption_NAME etc.")
    g.add_argument("--format", metavar="text|json", default=D.format, help="json: parse the answer into "
                   "caption_FIELD columns (default: %(default)s)")
    g.add_argument("--json-fields", metavar="FIELDS", help="fields of --format json (default: subject,style,"
                   "medium,palette,composition,mood,text)")
    g.add_argument("--template-value-chars", metavar="N", type=int, default=D.template_value_chars,
                   help="cut longer metadata values in a prompt; 0: whole (default: %(default)s)")
    g.add_argument("--max-tokens", metavar="N", type=int, default=D.max_tokens, help="max new tokens per "
                   "caption, at most what the model's context leaves after the prompt (default: %(default)s)")
    g.add_argument("--min-tokens", type=int, default=D.min_tokens, help=argparse.SUPPRESS)  # fixed-length benchmarks
    g.add_argument("--temperature", metavar="T", type=float, default=D.temperature, help="0: greedy; >0 samples, "
                   "seeded per image (default: %(default)s)")
    g.add_argument("--top-p", metavar="P", type=float, default=D.top_p, help="nucleus cutoff when sampling "
                   "(default: %(default)s)")
    g.add_argument("--seed", metavar="N", type=int, default=D.seed, help="base of per-image sampling seeds "
                   "(default: %(default)s)")
    g.add_argument("--retry-repetition-penalty", metavar="X", type=float, default=D.retry_repetition_penalty,
                   help="penalty of the one retry of a repetitive, empty or invalid caption; 0: no retry "
                   "(default: %(default)s)")

    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--hf-repo", metavar="REPO", default=D.hf_repo, help="dataset repo: NAME or USER/NAME "
                   "(default: %(default)s)")
    g.add_argument("--hf-username", metavar="USER", default=D.hf_username, help="owner of a bare --hf-repo "
                   "(default: %(default)s)")
    g.add_argument("--no-push", action="store_true", help="never touch the network")
    g.add_argument("--push-only", action="store_true", help="push the checkpoint dir's unpushed rows, stop")
    g.add_argument("--check-hub", action="store_true", help="check every selected image is on the Hub once, "
                   "stop (exit 4: missing or duplicated)")
    g.add_argument("--private", action="store_true", help="create the repo private")
    g.add_argument("--push-every", metavar="N", type=int, default=D.push_every, help="push once N rows wait "
                   "(default: %(default)s)")
    g.add_argument("--min-push-interval", metavar="SECONDS", type=float, default=D.min_push_interval,
                   help="between one worker's commits, at least (default: %(default)s)")
    g.add_argument("--hub-commits-per-hour", metavar="N", type=int, default=D.hub_commits_per_hour,
                   help="commit budget of all workers together (default: %(default)s; the Hub allows ~128)")
    g.add_argument("--hub-endpoint", metavar="URL", help="another Hub (a mirror, a local test server)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", nargs="+", action="extend", dest="checkpoint_dirs", metavar="DIR",
                   help=f"where parts go (default: {D.checkpoint_dir}); several with --merge-only")
    g.add_argument("--resume", action="store_true", help="continue a run (done images are always skipped)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and stop; loads no model")
    g.add_argument("--merge-only", action="store_true", help="merge checkpoint dir(s), check coverage, stop")
    g.add_argument("--overwrite", action="store_true", help="set aside the dir's run of other settings")
    g.add_argument("--checkpoint-every", metavar="N", type=int, default=D.checkpoint_every, help="rows per part "
                   "file: the most a crash costs (default: %(default)s)")

    g = p.add_argument_group("speed and hardware")
    g.add_argument("--batch-size", metavar="N|auto", type=auto_or_int, default=None, help="images per generate "
                   "call; auto: start high, halve on out-of-memory (default: auto)")
    g.add_argument("--max-auto-batch-size", type=int, default=D.max_auto_batch_size, help=argparse.SUPPRESS)
    g.add_argument("--dtype", metavar="TYPE", default=D.dtype, help="auto (bf16/fp16 on GPU, fp32 on CPU), "
                   "bfloat16, float16, float32 (default: %(default)s)")
    g.add_argument("--device-map", metavar="MAP", help="auto: spread a model too big for one GPU (slow)")
    g.add_argument("--attn-implementation", metavar="IMPL", default=D.attn_implementation, help="sdpa, eager, "
                   "flash_attention_2 or _3 (default: %(default)s)")
    g.add_argument("--num-loader-workers", metavar="N|auto", type=auto_or_int, default=D.num_loader_workers,
                   help="image decode threads; auto: cores / ranks of this machine - 1 (default: auto)")
    g.add_argument("--compile", metavar="|".join(COMPILE_CHOICES), default=D.compile, choices=COMPILE_CHOICES,
                   help="static KV cache + compiled decode step and vision tower; auto: on for CUDA "
                        "(default: %(default)s)")
    g.add_argument("--quantize", metavar="|".join(QUANTIZE_CHOICES), default=D.quantize, choices=QUANTIZE_CHOICES,
                   help="fp8: the linear layers as FP8 GEMMs (H100/H200, L4, L40S), other captions; fp8-text: "
                   "the language model's only (default: %(default)s)")
    g.add_argument("--kv-cache-dtype", metavar="|".join(KV_CACHE_DTYPES), default=D.kv_cache_dtype,
                   choices=KV_CACHE_DTYPES, help="fp8: float8 keys and values, half the cache; other captions "
                   "(default: %(default)s)")
    g.add_argument("--decode-loop", metavar="LOOP", default=D.decode_loop, choices=DECODE_LOOPS,
                   help=f"{', '.join(DECODE_LOOPS[1:])}; auto: graph on CUDA, else generate (default: %(default)s)")
    g.add_argument("--decode-attention", metavar="KERNEL", default=D.decode_attention, choices=DECODE_ATTENTIONS,
                   help="sdpa or flex; auto: flex for compiled batches of 128+ on an H100/H200, else sdpa "
                   "(default: %(default)s)")
    g.add_argument("--vision-attention", metavar="KERNEL", default=D.vision_attention, choices=VISION_ATTENTIONS,
                   help=f"{', '.join(VISION_ATTENTIONS[1:])}; auto: the fastest, timed on a GPU (default: "
                   "%(default)s)")
    g.add_argument("--compile-cache", metavar="DIR", default=D.compile_cache, help="where compiled kernels are "
                   "kept; auto: $TORCHINDUCTOR_CACHE_DIR, else in the checkpoint dir; none: torch's own "
                   "(default: %(default)s)")
    g.add_argument("--vision-overlap", action="store_true", help="experimental: the next batch's vision tower "
                   "runs during this decode")
    g.add_argument("--backend", metavar="NAME", default=D.backend, help="transformers, or dummy: no model, for "
                   "tests and demos (default: %(default)s)")

    g = p.add_argument_group("several GPUs or machines")
    g.add_argument("--num-workers", metavar="N", type=int, help="split the work into N slices (default: Slurm "
                   "array x tasks x torchrun/accelerate ranks, else 1)")
    g.add_argument("--worker-index", metavar="I", type=int, help="the slice this process takes, 0-based")
    return p


def download_parser(description: str) -> argparse.ArgumentParser:
    """download_data.py's flags: few enough that --help shows them all."""
    d = DownloadConfig()
    p = _parser(description, "", None)
    g = p.add_argument_group("what to download")
    g.add_argument("--output", metavar="DIR", default=d.output, help="output directory (default: %(default)s)")
    g.add_argument("--source", metavar="ID|FILE", default=d.source, help="HF dataset id or dir, or a .parquet/"
                   ".csv/.jsonl with key,url,caption,md5,tags,merged_tags (default: %(default)s)")
    g.add_argument("--split", metavar="NAME", default=d.split, help="split of the HF dataset (default: %(default)s)")
    g.add_argument("--max-rows", metavar="N", type=int, default=d.max_rows, help="only the first N source rows "
                   "(trials)")
    g.add_argument("--strict", action="store_true", help="exit 3 when any row failed, 404s and undecodable "
                   "files included")
    g = p.add_argument_group("download settings")
    g.add_argument("--threads", metavar="N", type=int, default=d.threads, help="download threads per process "
                   "(default: %(default)s)")
    g.add_argument("--processes", metavar="N", type=int, default=d.processes, help="download processes "
                   "(default: %(default)s, the usable cores up to 16)")
    g.add_argument("--timeout", metavar="SECONDS", type=int, default=d.timeout, help="wait for each part of a "
                   "response; 3x for the whole (default: %(default)s)")
    g.add_argument("--max-image-mb", metavar="MB", type=int, default=d.max_image_mb, help="a larger response "
                   "fails for good, 'too large' (default: %(default)s)")
    g.add_argument("--retries", metavar="N", type=int, default=d.retries, help="extra tries per failed URL "
                   "(default: %(default)s)")
    g.add_argument("--shard-size", metavar="N", type=int, default=d.shard_size, help="images per shard "
                   "(default: %(default)s)")
    g.add_argument("--distributor", default=d.distributor, choices=["multiprocessing", "pyspark", "ray"],
                   metavar="NAME", help="multiprocessing, pyspark or ray (default: %(default)s)")
    g.add_argument("--validate-workers", metavar="N", type=int, default=d.validate_workers, help="processes "
                   "that decode images to find broken ones (default: %(default)s)")
    return p
