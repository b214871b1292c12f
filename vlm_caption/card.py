"""The Hub dataset card (README.md): YAML header for the Hub, then what the data is and how it was made."""
from __future__ import annotations

import re

import yaml

from .config import SOURCE_DATASET
from .schema import COLUMNS

CITATION = """@article{somepalli2024measuring,
  title   = {Measuring Style Similarity in Diffusion Models},
  author  = {Somepalli, Gowthami and Gupta, Anubhav and Gupta, Kamal and Palta, Shramay and
             Goldblum, Micah and Geiping, Jonas and Shrivastava, Abhinav and Goldstein, Tom},
  journal = {arXiv preprint arXiv:2404.01292},
  year    = {2024}
}"""
_CARD_TAGS = ["art", "style", "image-captioning", "synthetic-captions", "contrastyles"]


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def _data_files(run: dict) -> list[str]:
    files = [f"data/{run['run_id']}/*.parquet"]
    return files + [f"data/{run['run_id']}-w*.parquet"] if run.get("legacy_files") else files


def _fenced(prompt: str) -> str:
    fence = "`" * max(3, max(map(len, re.findall(r"`+", prompt)), default=0) + 1)  # the prompt stays verbatim
    return f"{fence}text\n{prompt}\n{fence}"


def _run_section(repo_id: str, run: dict, default: bool) -> str:
    params = ", ".join(f"{k}={run.get(k)}" for k in ("max_tokens", "temperature", "top_p", "seed"))
    failed = run.get("failed_by_stage") or {}
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())) or "none"
    load = f'"{repo_id}", split="train"' if default else f'"{repo_id}", "{run["run_id"]}", split="train"'
    return f"""### Run `{run['run_id']}`{' (default config)' if default else ''}

- Model: `{run.get('model', 'unknown')}`
- Generation: {params} (temperature 0 = greedy decoding)
- Rows (captioned images): {run.get('rows', 0)}; images without a caption, by stage: {failures}
- Code version {run.get('code_version', 'unknown')}, started {run.get('created', 'unknown')}
- Load: `datasets.load_dataset({load})`
- Prompt, verbatim:

{_fenced(str(run.get('prompt', '')))}
"""


def render_dataset_card(repo_id: str, runs: list[dict]) -> str:
    """README.md of the Hub dataset: one config per run (its own data/{run_id}/ folder), the newest run the
    default. Each run dict holds run.json's settings plus rows and failed_by_stage as published."""
    runs = sorted(runs, key=lambda r: (r.get("created") or "", r["run_id"]), reverse=True)
    total = sum(int(r.get("rows") or 0) for r in runs)
    columns = "\n".join(f"| `{c.name}` | {c.type} | {c.description} |" for c in COLUMNS)
    configs = [{"config_name": r["run_id"], "data_files": [{"split": "train", "path": _data_files(r)}],
                **({"default": True} if i == 0 else {})} for i, r in enumerate(runs)]
    meta = {"license": "cc-by-4.0", "task_categories": ["image-to-text"], "language": ["en"],
            "size_categories": [size_category(total)], "tags": _CARD_TAGS, "configs": configs}
    sections = "\n".join(_run_section(repo_id, r, i == 0) for i, r in enumerate(runs))
    return f"""---
{yaml.safe_dump(meta, sort_keys=False)}---

# {repo_id.split('/')[-1]}

Captions written by a vision-language model for the images of
[{SOURCE_DATASET}](https://huggingface.co/datasets/{SOURCE_DATASET}) (ContraStyles, Tom Goldstein's lab,
University of Maryland). No images are included: each row keeps the image URL and the source metadata next to
the generated caption. Images that could not be downloaded or decoded have no row.

Rows in all runs: {total}. Each run (one model, prompt and set of generation parameters) is its own config,
with each image at most once in it.

## Runs

{sections}
## Columns

| column | type | description |
|---|---|---|
{columns}

## Use

```python
import datasets

ds = datasets.load_dataset("{repo_id}", split="train")  # the default config: the newest run
```

## License and citation

The source rows are CC-BY-4.0 and so is this dataset; the images belong to their owners. ContraStyles was
released with the CSD paper, which introduced it under the name LAION-Styles:

```bibtex
{CITATION}
```
"""
