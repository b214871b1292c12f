"""Run settings: one dataclass per CLI, one field per flag, validated before any work starts.

A bad flag must fail in a second with a one-line message (UsageError, exit code 2), not after
the model has spent a minute loading.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from . import workers
from .backends import BACKENDS, RETRY_REPETITION_PENALTY
from .data_layout import FULL_METADATA_FILE, IMAGES_DIR, URLS_FILE
from .errors import UsageError
from .flag_checks import (  # noqa: F401  (check_output_file: re-exported, imported from here)
    REPO_ID_RE, check_model, check_output_file, check_sampling, check_sdpa_flags, check_utf8_names,
    check_writable_dir, parse_shards, resolve_repo_id)

DEFAULT_MODEL = "google/gemma-3-27b-it"
DEFAULT_DATA_DIR = "./data/contrastyles_full"
SOURCE_DATASET = "tomg-group-umd/ContraStyles"
COMPILE_CHOICES = ("auto", "on", "off")  # --compile: auto = on for CUDA (static_decode.compile_wanted)
# --decode-loop: auto = graph where the compiled static cache runs on CUDA (1.08x on an H100, BENCHMARKS.md §6),
DECODE_LOOPS = ("auto", "generate", "graph", "continuous")  # else generate; decode_loop.py, continuous.py
# --decode-attention: the decode step's attention (grouped_attention.py); auto = flex for compiled steps of 128+
# rows on Hopper cards (1.10x a batch of 256 on an H100, BENCHMARKS.md §6 run 4), else sdpa.
DECODE_ATTENTIONS = ("auto", "sdpa", "flex")
# --vision-attention: the vision tower's attention kernel (vision_attention.py); auto = on a GPU the fastest of
# torch's sdpa kernels, timed at the first batch, else sdpa (torch's own pick).
VISION_ATTENTIONS = ("auto", "sdpa", "flash", "cudnn", "efficient", "math")
# --quantize: none (bf16 weights), fp8 (the vision tower's and language model's linear layers as FP8 GEMMs) or
# fp8-text (the language model's only); fp8.py. Not none: a run of its own (RunConfig.typed_settings).
QUANTIZE_CHOICES = ("none", "fp8", "fp8-text")
# --kv-cache-dtype: auto (the model's dtype) or fp8 (keys and values cached as float8 e4m3, kv_fp8.py). fp8: a run of
# its own (RunConfig.typed_settings).
KV_CACHE_DTYPES = ("auto", "fp8")
# --max-tokens' cap before any model is known: the longest context of a Gemma 3 model (4B to 27B); once the
# model is loaded, model_loading.check_context holds it to what that model's context leaves after the prompt.
MAX_TOKENS_LIMIT = 131_072
# --template-value-chars' default: a metadata value longer than this is cut in a prompt (at a word, with an
# ellipsis): else one row's scraped 100K-character alt text sized the whole run's KV cache and --batch-size auto
# by its prompt, turned the static cache off for every batch, or refused the run. Recorded in a templated run's
# settings (prompts.template_settings); 0 = whole values, as runs made before the limit (their run ids stay theirs).
TEMPLATE_VALUE_CHARS = 1000

# What transformers' from_pretrained takes as a device_map string: accelerate's strategies, or one device.
_DEVICE_MAP_RE = re.compile(r"auto|balanced|balanced_low_0|sequential|cpu|(?:cuda|xpu|npu|mps)(?::\d+)?")
_RESERVED_FIELDS = ("model", "finish", "tokens", "flags", "attempts")  # caption_{field} would shadow these


def public_model_name(model: str, backend: str = "transformers") -> str:
    """What the Hub shows of a model: a hub id as is; a local dir (recorded in run.json as its absolute path,
    which names the run) as `local:DIRNAME`, so no user name or file system layout is published; another
    backend than transformers before it (`dummy:...`: no model wrote those captions)."""
    name = f"local:{Path(model).name}" if Path(model).is_absolute() else model
    return name if backend == "transformers" else f"{backend}:{name}"


@dataclass
class RunConfig:
    """Settings of batched_image_inference.py."""

    model: str = DEFAULT_MODEL  # HF model id or local dir saved with save_pretrained
    data_dir: str = DEFAULT_DATA_DIR  # what download_data.py wrote (img2dataset layout)
    checkpoint_dirs: list[str] = field(default_factory=lambda: ["./checkpoints"])  # >1 only for --merge-only
    batch_size: int | None = None  # None = auto: start high, halve on out-of-memory
    max_auto_batch_size: int = 0  # cap of --batch-size auto; 0 = backends.AUTO_BATCH_CAP on CUDA, AUTO_BATCH_CPU on CPU
    push_every: int = 500  # push pending rows to the Hub once this many are waiting
    min_push_interval: float = 120.0  # seconds between Hub commits of one worker, at least
    hub_commits_per_hour: int = 60  # budget of all workers of a run together (the Hub allows about 128/h)
    checkpoint_every: int = 200  # rows per local part file (what a crash can cost at most)
    max_images: int | None = None  # only the first N keys of the selection, over all workers
    max_tokens: int = 256  # max new tokens per caption
    min_tokens: int = 0  # min new tokens (benchmarks force a fixed length with it)
    temperature: float = 0.0  # 0 = greedy; >0 samples with a per-key seed
    top_p: float = 1.0  # nucleus sampling cutoff when temperature > 0
    seed: int = 0  # base of the per-key sampling seeds
    retry_repetition_penalty: float = RETRY_REPETITION_PENALTY  # the second try of a flagged caption; 0 = no second try
    template_value_chars: int = TEMPLATE_VALUE_CHARS  # a longer metadata value is cut in a templated prompt; 0 = whole
    prompt: str | None = None  # overrides the default prompt
    prompt_file: str | None = None  # file whose text is the prompt
    prompts_file: str | None = None  # YAML or JSON of named prompts: one caption column set per prompt
    format: str = "text"  # text, or json: the caption is one JSON object, parsed into caption_{field} columns
    json_fields: str | None = None  # --format json: comma-separated fields (default prompts.DEFAULT_JSON_FIELDS)
    hf_repo: str = "ContraStylesRecap"  # bare name or user/name
    hf_username: str = "somepago"  # owner when --hf-repo is a bare name
    hub_endpoint: str | None = None  # another Hub endpoint (a mirror, or a local stub in tests)
    private: bool = False  # create the Hub repo private
    no_push: bool = False  # never touch the network
    push_only: bool = False  # push what the checkpoint dir holds unpushed, then stop
    merge_only: bool = False  # merge parts (of one or more checkpoint dirs), check coverage, stop
    check_hub: bool = False  # count the run's keys published on the Hub against the data dir, stop
    resume: bool = False  # states intent; done keys are always skipped
    retry_failed: bool = False  # caption keys recorded in failures/ again
    strict: bool = False  # any failure, even an image that cannot be decoded, makes the exit code 3
    overwrite: bool = False  # start over in a checkpoint dir that holds another run's settings
    dry_run: bool = False  # print the plan, load no model
    shards: str | None = None  # e.g. "0-24" or "3,5,7-9"
    num_workers: int | None = None  # total workers (default: Slurm array x torch.distributed world)
    worker_index: int | None = None  # this worker's index among them
    dtype: str = "auto"  # auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU
    device_map: str | None = None  # None = whole model on this worker's device; "auto" = offload
    backend: str = "transformers"  # inference engine (backends.BACKENDS); "dummy" = no model, for tests and demos
    compile: str = "auto"  # static KV cache + torch.compile'd decode: auto (on for CUDA), on, off
    quantize: str = "none"  # none, fp8 or fp8-text: FP8 weights for the linear layers (fp8.py)
    kv_cache_dtype: str = "auto"  # auto (the model's) or fp8: the keys and values cached as float8 (kv_fp8.py)
    decode_loop: str = "auto"  # auto, generate, graph (one compiled step per token) or continuous (+ rows join)
    decode_attention: str = "auto"  # auto, sdpa or flex: the kernel of a decode step's attention
    vision_attention: str = "auto"  # the vision tower's attention kernel: auto (timed on a GPU), sdpa, ...
    compile_cache: str = "auto"  # where compiled kernels are kept (compile_cache.choose): auto, none, or a dir
    vision_overlap: bool = False  # the next batch's vision tower runs while this one decodes (vision_ahead.py)
    keep_columns: str | None = None  # further metadata columns carried into the output, comma-separated
    attn_implementation: str = "sdpa"  # sdpa, eager, flash_attention_2
    num_loader_workers: int | None = None  # image decode threads; None = auto (cores / ranks of the machine - 1)
    verbose: bool = False

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint_dirs[0]

    def push_interval(self, num_workers: int) -> float:
        """Seconds between one worker's commits, so that all workers together stay within the budget."""
        return max(self.min_push_interval, num_workers * 3600.0 / self.hub_commits_per_hour)

    def validate(self) -> None:
        check_utf8_names([("--data-dir", self.data_dir), *(("--checkpoint-dir", d) for d in self.checkpoint_dirs),
                          ("--prompt-file", self.prompt_file), ("--prompts-file", self.prompts_file)])
        positive = {"--batch-size": self.batch_size, "--max-images": self.max_images, "--max-tokens": self.max_tokens,
                    "--push-every": self.push_every, "--checkpoint-every": self.checkpoint_every,
                    "--hub-commits-per-hour": self.hub_commits_per_hour,
                    "--num-loader-workers": self.num_loader_workers}
        for flag, value in positive.items():
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be a positive integer, got {value}")
        if self.compile not in COMPILE_CHOICES:
            raise UsageError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise UsageError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.quantize != "none" and self.device_map is not None:
            raise UsageError(f"--quantize {self.quantize} runs on one GPU per process: drop --device-map (a 27B "
                             "with FP8 weights takes ~30 GB: one H100 holds it)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise UsageError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.decode_loop not in DECODE_LOOPS:
            raise UsageError(f"--decode-loop must be one of {', '.join(DECODE_LOOPS)}, got {self.decode_loop!r}")
        if self.decode_attention not in DECODE_ATTENTIONS:
            raise UsageError(f"--decode-attention must be one of {', '.join(DECODE_ATTENTIONS)}, "
                             f"got {self.decode_attention!r}")
        if self.vision_attention not in VISION_ATTENTIONS:
            raise UsageError(f"--vision-attention must be one of {', '.join(VISION_ATTENTIONS)}, "
                             f"got {self.vision_attention!r}")
        check_sdpa_flags(self.attn_implementation, kv_cache_dtype=self.kv_cache_dtype,
                         decode_attention=self.decode_attention, vision_attention=self.vision_attention)
        if self.decode_attention == "flex":  # said before a model loads for minutes
            from .grouped_attention import FLEX_NEEDS, flex_available

            if not flex_available():
                import torch

                raise UsageError(f"--decode-attention flex needs {FLEX_NEEDS} (this is torch {torch.__version__}); "
                                 f"auto uses it where it is there")
        if self.max_tokens > MAX_TOKENS_LIMIT:  # else caches and --batch-size auto are sized for it
            raise UsageError(f"--max-tokens {self.max_tokens} is more than a Gemma 3 model's whole context "
                             f"({MAX_TOKENS_LIMIT} tokens, prompt included); a caption takes a few hundred")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise UsageError("--min-tokens must be between 0 and --max-tokens")
        check_sampling(self.temperature, self.top_p)
        if not 0 <= self.retry_repetition_penalty < float("inf"):
            raise UsageError(f"--retry-repetition-penalty must be >= 0 (0: no second try), got "
                             f"{self.retry_repetition_penalty}")
        if self.template_value_chars < 0:
            raise UsageError(f"--template-value-chars must be >= 0 (0: whole values), got {self.template_value_chars}")
        if not 0 <= self.min_push_interval < float("inf"):  # nan and inf too: inf never pushed until the run's end
            raise UsageError(f"--min-push-interval must be a number of seconds >= 0, got {self.min_push_interval}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise UsageError(f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "transformers" and not (self.merge_only or self.push_only or self.check_hub):
            check_model(self.model)
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
            raise UsageError(f"--attn-implementation {self.attn_implementation!r} is not one of sdpa, eager, "
                             "flash_attention_2, flash_attention_3")
        if self.device_map is not None and not _DEVICE_MAP_RE.fullmatch(self.device_map):
            raise UsageError(f"--device-map {self.device_map!r} is not one of auto, balanced, balanced_low_0, "
                             "sequential, or a device such as cuda:1")
        if self.device_map in ("auto", "balanced", "balanced_low_0", "sequential") and workers.ranks_per_machine() > 1:
            raise UsageError(f"--device-map {self.device_map} spreads one model over all of a machine's GPUs, but "
                             f"{workers.ranks_per_machine()} processes run on this one: launch one process per "
                             "machine with it, or drop it (one GPU per process)")
        if self.prompt is not None and self.prompt_file is not None:
            raise UsageError("give --prompt or --prompt-file, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise UsageError("--prompt is empty")
        if self.prompt is not None and not self.prompt.isascii():
            try:  # bytes the shell could not decode arrive as surrogates: the tokenizer would fail after loading
                self.prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError("--prompt is not valid UTF-8 text (check the terminal's encoding)") from None
        if self.prompt_file is not None and not Path(self.prompt_file).is_file():
            what = "is a directory" if Path(self.prompt_file).is_dir() else "does not exist"
            raise UsageError(f"--prompt-file {self.prompt_file} {what}")
        if self.prompt_file is not None and self._is_a_prompts_file(self.prompt_file):
            raise UsageError(f"--prompt-file {self.prompt_file} holds named prompts: did you mean --prompts-file?")
        if self.format not in ("text", "json"):
            raise UsageError(f"--format must be text or json, got {self.format!r}")
        if self.json_fields is not None and self.format != "json":
            raise UsageError("--json-fields needs --format json")
        self.fields()
        if self.prompts_file is not None:
            if self.prompt is not None or self.prompt_file is not None:
                raise UsageError("--prompts-file excludes --prompt and --prompt-file")
            self.named_prompts()
        modes = [m for m in ("merge_only", "push_only", "check_hub", "dry_run") if getattr(self, m)]
        if len(modes) > 1:
            raise UsageError("--merge-only, --push-only, --check-hub and --dry-run exclude each other")
        if self.overwrite and modes and modes[0] != "dry_run":  # it was ignored: none of these starts a run
            raise UsageError(f"--overwrite starts a run over; --{modes[0].replace('_', '-')} starts none: drop it")
        if (self.push_only or self.check_hub) and self.no_push:
            raise UsageError(f"--{'push-only' if self.push_only else 'check-hub'} and --no-push exclude each other")
        if any(not str(d).strip() for d in self.checkpoint_dirs):
            raise UsageError("--checkpoint-dir is empty; give a directory (e.g. ./checkpoints)")
        if len(self.checkpoint_dirs) > 1 and not self.merge_only:
            raise UsageError("several --checkpoint-dir values are only allowed with --merge-only")
        for d in self.checkpoint_dirs:
            check_writable_dir(Path(d), "--checkpoint-dir", write=not self.dry_run)  # a plan writes nothing
        if not (self.merge_only or self.push_only or self.check_hub):
            self._validate_data_dir()
        elif not self.push_only and not Path(self.data_dir).is_dir():  # coverage is counted against it
            raise UsageError(f"--data-dir {self.data_dir} does not exist; --{modes[0].replace('_', '-')} checks "
                             "coverage against the data dir the runs captioned")
        for flag, value in (("--shards", self.shards), ("--keep-columns", self.keep_columns)):
            if value is not None and not value.replace(",", "").strip():  # "$SHARDS" unset in a script, say
                raise UsageError(f"{flag} is empty: give a value, or leave the flag out")
        parse_shards(self.shards)
        self.worker_slice()
        resolve_repo_id(self.hf_repo, self.hf_username)  # a typo should not wait for the day pushes are on
        if self.hub_endpoint is not None:
            url = urlsplit(self.hub_endpoint)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise UsageError(f"--hub-endpoint {self.hub_endpoint!r} is not an http:// or https:// URL")

    def _validate_data_dir(self) -> None:
        data = Path(self.data_dir)
        if data.exists() and not data.is_dir():
            raise UsageError(f"--data-dir {data} is a file, not the directory download_data.py wrote")
        if not data.is_dir():
            raise UsageError(f"--data-dir {data} does not exist; run download_data.py --output {data} first")
        if not (data / FULL_METADATA_FILE).is_file() and not list((data / IMAGES_DIR).glob("*.parquet")):
            started = (data / URLS_FILE).is_file()  # a download that has only just started
            raise UsageError(f"--data-dir {data} holds no finished shard yet: wait for download_data.py to finish "
                             "one (or rerun it, if it stopped)" if started else f"--data-dir {data} holds no "
                             "full_metadata.parquet and no images/*.parquet; is it the dir download_data.py wrote?")
        if not (data / IMAGES_DIR).is_dir():
            # Without it every image would be recorded as a permanent load failure (and skipped on reruns).
            raise UsageError(f"--data-dir {data} has no {IMAGES_DIR}/ folder with the images: is its disk mounted? "
                             "(download_data.py writes it)")

    def worker_slice(self) -> tuple[int, int]:
        """(worker_index, num_workers) over all machines, Slurm tasks and ranks (vlm_caption/workers.py)."""
        return workers.worker_slice(self.num_workers, self.worker_index)

    def kept_columns(self) -> list[str]:
        # each once: "a,a" carried a twice (two columns of one name)
        return list(dict.fromkeys(c.strip() for c in (self.keep_columns or "").split(",") if c.strip()))

    def run_settings(self) -> dict:
        """What makes a caption what it is, resolved once (prompt included): run.json, the run id, the backend."""
        from .run_identity import canonical_settings

        return canonical_settings(self.typed_settings())  # equivalent spellings are one run (run_identity.py)

    def typed_settings(self) -> dict:
        """The settings as these flags spell them: what versions before canonical_settings recorded, and whose id
        they gave the run (a greedy --seed 7 kept its seed), so a machine not yet upgraded names its run by it."""
        from .prompts import DEFAULT_PROMPT, PROMPT_VERSION, json_instruction_settings, template_settings
        from .run_identity import MODEL_IDENTITY, local_model_identity

        prompt = self.prompt_text()
        # A local model dir is recorded as an absolute path (what loads it); hub ids as typed.
        model = str(Path(self.model).resolve()) if Path(self.model).is_dir() else self.model
        settings = {"model": model, "prompt": prompt or DEFAULT_PROMPT,
                    "prompt_version": "custom" if prompt else PROMPT_VERSION, "max_tokens": self.max_tokens,
                    "min_tokens": self.min_tokens, "temperature": self.temperature,
                    "top_p": self.top_p if self.temperature > 0 else 1.0, "seed": self.seed}
        if Path(self.model).is_dir():  # a local dir: its content names the run, not its path (run_identity.py)
            settings[MODEL_IDENTITY] = local_model_identity(Path(model))
        # Recorded only when not the default, so the run ids of earlier runs stay what they were.
        if self.backend != "transformers":
            settings["backend"] = self.backend
        if self.kept_columns():  # as typed: an earlier version recorded "a,a" as [a, a] (canonical_settings: once)
            settings["keep_columns"] = [c.strip() for c in self.keep_columns.split(",") if c.strip()]
        if self.prompts_file is not None:  # every prompt joins the run id; "prompt" stays for older readers
            prompts = self.named_prompts()
            settings.update(prompt=None, prompt_version="custom", prompts=prompts)
            # The order matters (the first prompt's caption is also the plain vlm_caption) but a dict is recorded
            # with sorted keys: an order other than the sorted one joins the run id, so two orders never mix.
            if list(prompts) != sorted(prompts):
                settings["prompt_order"] = list(prompts)
        settings.update(template_settings([settings["prompt"]] if settings["prompt"] else
                                          list(settings["prompts"].values()), self.template_value_chars))
        if self.format == "json":
            settings.update(format="json", json_fields=list(self.fields()), **json_instruction_settings())
        if self.retry_repetition_penalty != RunConfig.retry_repetition_penalty:
            settings["retry_repetition_penalty"] = self.retry_repetition_penalty
        if self.quantize != "none" and self.backend == "transformers":  # FP8 weights write other captions
            settings["quantize"] = self.quantize
        if self.kv_cache_dtype != "auto" and self.backend == "transformers":  # rounded keys and values: other captions
            settings["kv_cache_dtype"] = self.kv_cache_dtype
        return settings

    def fields(self) -> tuple[str, ...]:
        """--format json: the JSON fields asked for (each becomes a caption_{field} column); () for text."""
        if self.format != "json":
            return ()
        from .prompts import DEFAULT_JSON_FIELDS, PROMPT_NAME_RE

        if self.json_fields is None:
            return tuple(DEFAULT_JSON_FIELDS)
        fields = tuple(f.strip() for f in self.json_fields.split(",") if f.strip())
        bad = [f for f in fields if not PROMPT_NAME_RE.fullmatch(f) or f in _RESERVED_FIELDS]
        if not fields or bad or len(set(fields)) != len(fields):
            raise UsageError(f"--json-fields {self.json_fields!r}: give distinct names of 1-32 of a-z, 0-9, _ "
                             f"starting with a letter, comma-separated, e.g. subject,style,medium (not "
                             f"{', '.join(_RESERVED_FIELDS)}: their caption_ columns exist)")
        return fields

    @staticmethod
    def _is_a_prompts_file(path: str) -> bool:
        """A .yaml/.yml/.json file that reads as {name: prompt}: its text as one prompt is a typo's result."""
        from .prompts import load_prompts_file

        try:  # ValueError for other suffixes too
            return len(load_prompts_file(path)) > 0
        except ValueError:
            return False

    def named_prompts(self) -> dict[str, str] | None:
        """--prompts-file: {name: template}, or None without one; a bad file is a one-line usage error."""
        if self.prompts_file is None:
            return None
        from .prompts import load_prompts_file

        try:
            return load_prompts_file(self.prompts_file)
        except ValueError as e:
            raise UsageError(f"--prompts-file {e}") from None

    def prompt_text(self) -> str | None:
        """The user's prompt, if any (None = prompts.DEFAULT_PROMPT)."""
        if self.prompt_file is not None:
            from .prompts import PROMPT_FILE_ENCODING

            try:
                text = Path(self.prompt_file).read_text(encoding=PROMPT_FILE_ENCODING).strip()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--prompt-file {self.prompt_file} cannot be read as UTF-8 text: {e}") from None
            if not text:
                raise UsageError(f"--prompt-file {self.prompt_file} is empty")
            return text
        return self.prompt


@dataclass
class DownloadConfig:
    """Settings of download_data.py."""
    output: str = DEFAULT_DATA_DIR  # where urls.parquet, images/, full_metadata.parquet go
    source: str = SOURCE_DATASET  # HF dataset id, or a local .parquet / .csv / .jsonl with the same columns
    split: str = "train"  # split of the HF dataset
    threads: int = 64  # download threads per process (img2dataset thread_count)
    processes: int = field(default_factory=lambda: min(16, workers.usable_cores()))  # img2dataset processes_count
    timeout: int = 30  # seconds per wait for bytes; a whole response gets 3 times that (download_client.py)
    max_image_mb: int = 64  # a response over this fails for good ("too large"), before it fills a worker's memory
    retries: int = 2  # extra tries per URL inside img2dataset
    max_rows: int | None = None  # only the first N rows of the source (tests, trials)
    shard_size: int = 10_000  # images per shard (img2dataset number_sample_per_shard)
    distributor: str = "multiprocessing"  # multiprocessing, pyspark or ray (passed to img2dataset)
    validate_workers: int = field(default_factory=workers.usable_cores)  # processes for PIL decode checks
    verbose: bool = False

    def validate(self) -> None:
        if not self.output.strip():  # an unset "$OUT" in a script: not a download into the current directory
            raise UsageError(f"--output is empty; give a directory (e.g. {DEFAULT_DATA_DIR})")
        check_utf8_names([("--output", self.output), ("--source", self.source)])
        for flag, value in {"--threads": self.threads, "--processes": self.processes, "--timeout": self.timeout,
                            "--max-image-mb": self.max_image_mb, "--shard-size": self.shard_size,
                            "--validate-workers": self.validate_workers,
                            "--max-rows": 1 if self.max_rows is None else self.max_rows}.items():
            if value < 1:
                raise UsageError(f"{flag} must be a positive integer, got {value}")
        if self.retries < 0:
            raise UsageError(f"--retries must be >= 0, got {self.retries}")
        if self.distributor not in ("multiprocessing", "pyspark", "ray"):
            raise UsageError(f"--distributor must be multiprocessing, pyspark or ray, got {self.distributor!r}")
        check_writable_dir(Path(self.output), "--output")
