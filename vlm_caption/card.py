"""The Hub dataset card (README.md): YAML header for the Hub, then what the data is and how it was made."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from . import prompt_plan
from .config import SOURCE_DATASET, public_model_name
from .hub_index import run_data_globs
from .prompts import recorded_json_instruction
from .rows import FLAGS_BY_PROMPT, describe_counts
from .schema import COLUMNS

CITATION = """@article{somepalli2024measuring,
  title   = {Measuring Style Similarity in Diffusion Models},
  author  = {Somepalli, Gowthami and Gupta, Anubhav and Gupta, Kamal and Palta, Shramay and
             Goldblum, Micah and Geiping, Jonas and Shrivastava, Abhinav and Goldstein, Tom},
  journal = {arXiv preprint arXiv:2404.01292},
  year    = {2024}
}"""
log = logging.getLogger(__name__)
TEMPLATE = Path(__file__).parent / "templates" / "dataset_card.md"
_CARD_TAGS = ["art", "style", "image-captioning", "synthetic-captions", "contrastyles"]


def published_model(run_info: dict, before: dict) -> str:
    """The model runs/{run_id}.json and the card show: its public name (never a local path). A run of a local dir
    is named by the dir's content, so its dirs can load it from other paths (machines): the name it was first
    published with stays, else the card flipped between the dirs' names, a commit at each push with nothing new."""
    if before.get("model") and before.get("model_identity") and \
            before.get("model_identity") == run_info.get("model_identity"):
        return before["model"]
    return public_model_name(str(run_info.get("model", "unknown")), run_info.get("backend", "transformers"))


def size_category(n: int) -> str:
    # 25 runs of the ~400K images in one repo pass 10M rows: the Hub's next categories, not 1M<n<10M
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < limit:
            return name
    return "100M<n<1B"


def _data_files(run: dict) -> list[str]:
    return run_data_globs(run["run_id"], bool(run.get("legacy_files")))


def _fenced(prompt: str) -> str:
    fence = "`" * max(3, max(map(len, re.findall(r"`+", prompt)), default=0) + 1)  # the prompt stays verbatim
    return f"{fence}text\n{prompt}\n{fence}"


def _run_view(repo_id: str, run: dict, default: bool) -> dict:
    """What the template shows of one run."""
    failed = run.get("failed_by_stage") or {}
    specs = prompt_plan.run_specs({**run, "prompt": str(run.get("prompt") or "")}, recorded=True)
    specs_columns = [c for spec in specs for c in spec.output_columns()]
    return {"run_id": run["run_id"], "default": default, "model": run.get("model", "unknown"),
            "quantize": _quantized(run.get("quantize")),
            "kv_cache": _kv_cache(run.get("kv_cache_dtype")),
            "params": ", ".join(f"{k}={run.get(k)}" for k in ("max_tokens", "temperature", "top_p", "seed")),
            "rows": run.get("rows", 0),
            "failures": ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())) or "none",
            "flags": describe_counts(run.get("caption_flags")),
            "flags_by_prompt": _flags_by_prompt(run),
            "json_fields": ", ".join(f"`{spec.field_column(f)}`" for spec in specs for f in spec.json_fields),
            "extra_columns": ", ".join([*(f"`{k}` (--keep-columns)" for k in run.get("keep_columns") or []),
                                        *(f"`{c.name}`" for c in specs_columns)]),
            "code_version": run.get("code_version", "unknown"), "created": run.get("created", "unknown"),
            "load_args": f'"{repo_id}", split="train"' if default else f'"{repo_id}", "{run["run_id"]}", split="train"',
            "fenced_prompt": _fenced(str(run.get("prompt", ""))),
            "prompts": [{"name": k, "fenced": _fenced(str(run["prompts"][k]))} for k in prompt_plan.prompt_order(run)],
            "json_instruction": _json_instruction(run, specs[0].json_fields)}


def _quantized(choice: str | None) -> str:
    """What a --quantize run's weights were, for its Model line ("" for bf16 weights: no setting recorded)."""
    if not choice:
        return ""
    which = "the language model's" if choice == "fp8-text" else "the vision tower's and language model's"
    return (f"{which} linear layers in FP8 (`--quantize {choice}`: weights and activations rounded to float8 e4m3, "
            "scaled per output channel and per token)")


def _kv_cache(choice: str | None) -> str:
    """What a --kv-cache-dtype run cached its keys and values as, for its Model line ("" for the model's dtype)."""
    if not choice:
        return ""
    return (f"keys and values cached in FP8 (`--kv-cache-dtype {choice}`: rounded to float8 e4m3, "
            "saturated at +-448, unscaled)")


def _json_instruction(run: dict, fields: tuple[str, ...]) -> dict:
    """What a --format json run's prompts ended with: the instruction's version, and its text fenced as the prompt
    is when this code words that version ("" otherwise: the run's code version has it); {} for a text run."""
    if not fields:
        return {}
    version, text = recorded_json_instruction(run, fields)
    return {"version": version, "fenced": _fenced(text) if text else ""}


def _flags_by_prompt(run: dict) -> list[dict]:
    """A --prompts-file run's flag counts per prompt, in the file's order (runs/{run_id}.json sorts its keys);
    [] for one prompt, or a run published before these were counted (the card shows the plain counts)."""
    counts = run.get(FLAGS_BY_PROMPT) or {}
    return [{"name": n, "flags": describe_counts(counts[n])} for n in prompt_plan.prompt_order(run) if n in counts]


def showable(run: dict, mine: bool = False) -> bool:
    """Whether the card can show a run's runs/{run_id}.json. One edited by hand (a count that is no number, a
    list for a mapping) is left off the card with a warning, as an unreadable one is: it raised at the card of
    every other run of the repo, a traceback at each end of a run and --push-only."""
    try:
        int(run.get("rows") or 0), _run_view("", run, False)
        if not isinstance(run.get("created") or "", str):  # sorted with the others' times
            raise TypeError(f"created is {run.get('created')!r}")
        return True
    except Exception as e:  # noqa: BLE001  (any field, of any shape)
        log.warning("Hub: runs/%s.json cannot be shown (%s: %s); %s", run.get("run_id"), type(e).__name__,
                    str(e)[:200], "this run writes it again" if mine else "that run is left off the card")
        return False


def render_dataset_card(repo_id: str, runs: list[dict]) -> str:
    """README.md of the Hub dataset (templates/dataset_card.md through huggingface_hub's DatasetCard): one
    config per run (its own data/{run_id}/ folder), the newest run the default. Each run dict holds run.json's
    settings plus rows and failed_by_stage as published."""
    from huggingface_hub import DatasetCard, DatasetCardData

    # Newest first; a run with no file on the Hub yet gets no config (its data_files would match nothing, and
    # as the default it would break load_dataset(repo) for every run).
    runs = sorted(runs, key=lambda r: (int(r.get("rows") or 0) > 0, r.get("created") or "", r["run_id"]),
                  reverse=True)
    total = sum(int(r.get("rows") or 0) for r in runs)
    configs = [{"config_name": r["run_id"], "data_files": [{"split": "train", "path": _data_files(r)}],
                **({"default": True} if i == 0 else {})} for i, r in enumerate(runs) if int(r.get("rows") or 0) > 0]
    data = DatasetCardData(license="cc-by-4.0", task_categories=["image-to-text"], language=["en"],
                           size_categories=[size_category(total)], tags=_CARD_TAGS, configs=configs)
    card = DatasetCard.from_template(
        data, template_path=str(TEMPLATE), repo_id=repo_id, repo_name=repo_id.split("/")[-1], source=SOURCE_DATASET,
        total_rows=total, runs=[_run_view(repo_id, r, i == 0 and int(r.get("rows") or 0) > 0)
                                for i, r in enumerate(runs)], columns=COLUMNS,
        citation=CITATION)
    # Run ids are hex: PyYAML (YAML 1.1) writes 012345678901 or 123e45678901 bare, and a YAML 1.2 reader (the
    # Hub's) takes them for numbers. Quoted, every reader sees the config's name.
    head, sep, rest = str(card).partition("\n---\n")
    return re.sub(r"^(- config_name: )([0-9a-f]+)$", r"\1'\2'", head, flags=re.MULTILINE) + sep + rest
