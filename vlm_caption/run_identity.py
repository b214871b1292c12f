"""What names a run: the settings that make a caption what it is, hashed into the run id.

A checkpoint dir holds the captions of one run, and a Hub repo keeps each run in its own folder and card config,
so two processes with the same run id must make the same captions, and two with different ones must not share a
dir or a folder.

A Hub model is named by its id. A local model dir was named by its absolute path, which got both directions wrong:
- the same weights at another path (the node-local copies of a Slurm array, another machine's mount point) made
  another run, whose rows went to another folder of the repo: each key published once per path, and a check by
  the flags on one machine could not find the run of another;
- new weights saved over the same dir made the same run, mixing two models' captions in one dataset.

So a local dir is named by its content (`model_identity`): the files that make the model (config, tokenizer,
processor, chat template, weights), the small ones whole, the large ones by their size and SAMPLE_BLOCKS blocks
spread over them. A fine-tune changes every block of its weights, so sampled blocks tell it apart from its base
at a small cost: 32 reads of 64 KB per weight file, where hashing a 4B model whole would read 8 GB each launch.
The path stays in run.json (it is what loads the model), but no longer names the run. A dir whose run.json an
earlier version wrote (no `model_identity`) goes on as the run its path named (`is_run_of`).

Settings spelled differently that caption the same way are one run (`canonical_settings`): else two machines of
one job launched with equivalent flags made two runs and published every key twice, once per run folder. The
default spelling keeps its id; a rare one is mapped onto it: a greedy run records the default seed (a seed picks
nothing when no token is sampled), --prompt with the default prompt's very text is the default prompt, a text
run's prompt is recorded without surrounding whitespace (the chat template trims what the model gets, and
--prompt-file always stripped it), --keep-columns names each column once. A run an earlier version recorded under
another spelling keeps its id: a dir or a Hub run whose recorded settings this version reads as ours is our run
(`same_settings`), so a relaunch resumes it instead of being refused or starting a second run.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Callable

from .errors import UsageError

# Settings that change what a caption is; a checkpoint dir holds captions of one setting only.
RUN_SETTINGS = ("model", "prompt", "prompt_version", "max_tokens", "min_tokens", "temperature", "top_p", "seed")
MODEL_IDENTITY = "model_identity"  # a local model dir's content (local_model_identity), in place of its path
# Part of a run's identity only when set (RunConfig.run_settings).
OPTIONAL_SETTINGS = ("backend", "keep_columns", "retry_repetition_penalty", "prompts", "prompt_order", "format",
                     "json_fields", "json_instruction_version", "template_value_chars", "template_braces", "quantize",
                     "kv_cache_dtype")

MODEL_FILE_SUFFIXES = (".json", ".jinja", ".model", ".safetensors", ".bin", ".pt", ".pth", ".gguf")
WHOLE_FILE_BYTES = 4 << 20  # files up to this size are hashed whole (configs, templates, small tokenizers)
SAMPLE_BLOCKS, SAMPLE_BYTES = 32, 64 << 10
SETTING_NAMES = "setting_names"  # in run.json (and the Hub's runs/*.json): the names of the settings it records
GREEDY_SEED = 0  # the seed a greedy run records, whatever --seed said: RunConfig.seed's default


def local_model_identity(model_dir: Path) -> str:
    """`local-sha256:...` of the files that make the model in `model_dir` (top level, as save_pretrained
    writes them); the same content at any path gives the same identity. A dir or file that cannot be read
    is a UsageError (one line), not a traceback."""
    try:
        files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)
        # Read once per launch (the run and the captioning both ask), again when a file changes
        return _identity_of(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    except OSError as e:
        raise UsageError(f"--model {model_dir}: cannot read {e.filename or model_dir} ({e.strerror or e}); "
                         "make the model dir readable, or give a Hub model id") from e


@functools.lru_cache(maxsize=8)
def _identity_of(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, size, _ in files:
        digest.update(f"{Path(name).name}\0{size}\0".encode())
        with open(name, "rb") as f:
            if size <= WHOLE_FILE_BYTES:
                digest.update(f.read())
                continue
            step = (size - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)  # the first block, the last, and evenly between
            for i in range(SAMPLE_BLOCKS):
                f.seek(int(i * step))
                digest.update(f.read(SAMPLE_BYTES))
    return f"local-sha256:{digest.hexdigest()[:24]}"


def recorded_settings(settings: dict) -> dict:
    """The settings run.json records: those of the run's identity, the model's path included."""
    return {k: settings[k] for k in (*RUN_SETTINGS, MODEL_IDENTITY, *OPTIONAL_SETTINGS) if k in settings}


def run_id_for(settings: dict) -> str:
    named = recorded_settings(settings)
    if MODEL_IDENTITY in named:  # a local dir: its content names the run, not where it lies
        named["model"] = named.pop(MODEL_IDENTITY)
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:12]


def canonical_settings(settings: dict) -> dict:
    """The settings as this version spells them (see the module's doc): what run_settings records, and how a run
    recorded by an earlier version is read. A spelling that captions otherwise is never changed: a --format json
    prompt keeps its whitespace (the JSON instruction follows it, so the model sees it)."""
    from .prompts import DEFAULT_PROMPT, PROMPT_VERSION

    s = dict(settings)
    temperature = s.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0:
        s.update(temperature=0.0, top_p=1.0, seed=GREEDY_SEED)  # -0.0 and 0 too: json.dumps spells them apart
    prompt = s.get("prompt")
    if isinstance(prompt, str) and not s.get("prompts"):
        if s.get("format", "text") == "text":
            s["prompt"] = prompt = prompt.strip()
        if prompt == DEFAULT_PROMPT:
            s["prompt_version"] = PROMPT_VERSION
    if isinstance(s.get("keep_columns"), list):
        s["keep_columns"] = list(dict.fromkeys(s["keep_columns"]))
    return s


def same_settings(info: dict, settings: dict) -> bool:
    """Whether a run recorded as `info` (a run.json, or the Hub's runs/{run_id}.json, whose model is its public
    name) captions as `settings` do, whatever spelling of them its version recorded: it is then their run."""
    from .config import public_model_name

    if not isinstance(info, dict):
        return False
    names = info.get(SETTING_NAMES)  # (none: an earlier version's record, whose settings this version all knows)
    if isinstance(names, list) and not set(map(str, names)) <= {*RUN_SETTINGS, MODEL_IDENTITY, *OPTIONAL_SETTINGS}:
        return False  # a later version's setting: its captions may differ in a way this version cannot see
    info = dict(info)
    public = info.get("model") != settings.get("model") and \
        info.get("model") == public_model_name(str(settings.get("model")), settings.get("backend", "transformers"))
    if public:
        info["model"] = settings.get("model")  # the Hub shows a model by its public name
    try:
        respelled = run_id_for(canonical_settings(info))
    except (TypeError, ValueError):  # edited by hand into what json cannot hash: not ours
        return False
    # A run an earlier version named by a local dir's path is ours only at that very path: a Hub record shows the
    # dir's name alone (local:NAME), which any dir of that name, of any weights, would match.
    return respelled == run_id_for(settings) or (not public and respelled == path_named_run_id(settings))


def earlier_run(other_runs: list[str], read_infos: Callable[[], dict], settings: dict, typed_id: str | None = None,
                allowed: set[str] | None = None) -> str | None:
    """The run among a repo's `other_runs` that is these settings as an earlier version named them, or None: the id
    it gave these very flags (`typed_id`, found by its data folder: runs/{run_id}.json is written only when one of
    the run's processes ends), else a run whose record reads as these settings (same_settings). `read_infos`: the
    repo's runs/{run_id}.json by id, read only when needed; `allowed`: only these ids (what a dir's parts name)."""
    candidates = [r for r in sorted(other_runs) if allowed is None or r in allowed]
    if typed_id in candidates:
        return typed_id
    if not candidates:
        return None
    infos = read_infos()
    return next((r for r in candidates if same_settings(infos.get(r), settings)), None)


def _respelled_id(info: dict) -> str | None:
    """The id this version gives the settings a run.json records; its own id when it records none (parts only)."""
    if not info.get("model"):
        return info.get("run_id")
    try:
        return run_id_for(canonical_settings(info))
    except (TypeError, ValueError):
        return info.get("run_id")


def path_named_run_id(settings: dict) -> str | None:
    """The id earlier versions gave these settings, a local dir named by its path; None for a Hub model."""
    if MODEL_IDENTITY not in settings:
        return None
    return run_id_for({k: v for k, v in settings.items() if k != MODEL_IDENTITY})


def is_run_of(existing: dict, settings: dict) -> bool:
    """Whether run.json `existing` is the run of `settings`: the same id, or a run.json of an earlier version
    (no model identity) whose path-named id these settings give (the same dir goes on as it was)."""
    if existing.get("run_id") == run_id_for(settings):
        return True
    if MODEL_IDENTITY not in existing and existing.get("run_id") == path_named_run_id(settings):
        return True
    return same_settings(existing, settings)  # recorded in another spelling of these settings


def one_run(infos: list[dict]) -> bool:
    """Whether the run.json `infos` of several dirs are of one run: one run id, or the dirs an earlier version
    made (named by the model's path) and dirs of this version (named by its content) whose model, at that very
    path, with the same settings, gives that path-named id: each dir going on would go on as that one run."""
    ids = {info.get("run_id") for info in infos}
    if len(ids) <= 1 or len({_respelled_id(info) for info in infos}) == 1:  # one run in two spellings: one run
        return True
    legacy = {info.get("run_id") for info in infos if MODEL_IDENTITY not in info}
    named = [info for info in infos if MODEL_IDENTITY in info]
    return (len(legacy) == 1 and None not in legacy and len({i.get("run_id") for i in named}) == 1
            and all(path_named_run_id(info) in legacy for info in named))


def well_formed(info) -> bool:
    """Whether a run.json holds what its readers take from it, of their types: one edited by hand into other
    types reads as unreadable (a run re-adopting its parts sets it aside), not a traceback at a run's end."""
    if not (isinstance(info, dict) and isinstance(info.get("run_id"), str)):
        return False
    prompts, order, fields = (info.get(k) or empty for k, empty in (("prompts", {}), ("prompt_order", []),
                                                                    ("json_fields", [])))
    return (all(isinstance(info.get(k) or "", str) for k in ("dir_id", "prompt"))
            and isinstance(info.get("template_value_chars") or 0, int)
            and isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values())
            and isinstance(order, list) and all(isinstance(o, str) and (o in prompts or not prompts) for o in order)
            and isinstance(fields, list) and all(isinstance(f, str) for f in fields))


def described_differences(names: list[str], existing: dict, settings: dict) -> str:
    """`max_tokens: 32 in the dir, 256 now; ...`: what a refused run would change, each value cut short. The
    built-in prompt's version is left out beside a prompt of the user's own (it follows from it)."""
    def shown(value) -> str:
        text = repr(value) if isinstance(value, str) else json.dumps(value)
        return text if len(text) <= 48 else text[:44] + " ..."

    names = [n for n in names if not (n == "prompt_version" and "prompt" in names)]
    return "; ".join(n if n.startswith("the ") else f"{n}: {shown(existing.get(n))} in the dir, "
                     f"{shown(settings.get(n))} now" for n in names)
