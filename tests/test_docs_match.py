"""README.md against the code: the flags it lists and their defaults, the names in its layouts, the modules and
names it points at. Cheap checks (no model, no network) that fail when one side changes without the other."""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _section(heading: str) -> str:
    """README's text under `heading` (a line starting with it), up to the next heading of any level."""
    start = README.index("\n" + heading) + 1
    end = re.search(r"^#{1,6} ", README[start + len(heading):], flags=re.M)
    return README[start:start + len(heading) + end.start()] if end else README[start:]


def _code_block(heading: str) -> str:
    """The first ``` block of a README section."""
    return _section(heading).split("```")[1]


def _flag_table(heading: str) -> dict[str, str]:
    """{flag: its default cell} of a section's markdown table ("| `--a` / `--b` | `x`, `y` | ..." gives both)."""
    rows = {}
    for line in _section(heading).splitlines():
        if not line.startswith("| `-"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        flags = re.findall(r"`(-[-\w]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        for i, flag in enumerate(flags):
            rows[flag] = defaults[i] if len(defaults) == len(flags) else cells[1]
    return rows


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option string a user may type (help and hidden benchmark-only flags left out)."""
    return {s: a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
            for s in a.option_strings}


def _same_default(readme: str, default) -> bool:
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(readme) == float(default)
        except ValueError:
            return False
    return readme == str(default)


def _check_table(heading: str, parser: argparse.ArgumentParser, defaults_elsewhere: dict[str, object]) -> None:
    table, options = _flag_table(heading), _options(parser)
    assert table, f"no flag table under {heading!r}"
    assert sorted(set(table) - set(options)) == [], f"README ({heading}) names flags the parser lacks"
    assert sorted(set(options) - set(table)) == [], f"parser flags missing from README ({heading})"
    wrong = {}
    for flag, cell in table.items():
        default = defaults_elsewhere.get(flag, options[flag].default)
        if default is None or isinstance(default, bool):
            continue  # "all", "off", "none", "the Hub": words, not values
        if not _same_default(cell, default):
            wrong[flag] = (cell, default)
    assert wrong == {}, f"README ({heading}) default != the parser's: {wrong}"


def test_caption_flags_in_readme_are_the_parsers_with_its_defaults():
    from batched_image_inference import D, build_parser

    from vlm_caption.prompts import DEFAULT_JSON_FIELDS

    # Defaults the parser leaves as None and the run fills in (auto_or_int's None is "auto").
    elsewhere = {"--checkpoint-dir": D.checkpoint_dirs[0], "--json-fields": ",".join(DEFAULT_JSON_FIELDS),
                 "--batch-size": "auto", "--num-loader-workers": "auto"}
    _check_table("### `batched_image_inference.py`", build_parser(), elsewhere)


def test_download_flags_in_readme_are_the_parsers_with_its_defaults():
    from download_data import build_parser

    parser = build_parser()
    table = _flag_table("### `download_data.py`")
    # Defaults counted from this machine's cores: README says so in words.
    assert "cores" in table["--processes"] and "16" in table["--processes"] and "cores" in table["--validate-workers"]
    for flag in ("--processes", "--validate-workers"):
        next(a for a in parser._actions if flag in a.option_strings).default = None
    _check_table("### `download_data.py`", parser, {})


def test_download_defaults_count_the_cores_this_process_may_use(monkeypatch):
    """README: --processes "cores (<=16)", --validate-workers "cores": in a Slurm job or under taskset, the cores
    it was given, not every core of the node (one process per core of a 128-core node for a 4-core job)."""
    import os

    from vlm_caption.config import DownloadConfig

    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert (DownloadConfig().processes, DownloadConfig().validate_workers) == (4, 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert (DownloadConfig().processes, DownloadConfig().validate_workers) == (16, 64)


def _synopsis_flags(prefix: str) -> set[str]:
    """The flags of the README's one-line synopsis that starts with `prefix`."""
    line = next(line for line in README.splitlines() if line.startswith(prefix))
    return set(re.findall(r"(?<![\w-])(--?[a-z][-a-z]*)", line.split("`")[1])) - {"-m"}  # python -m


def _check_synopsis(flags: set[str], parser: argparse.ArgumentParser, own: set[str] = frozenset()) -> None:
    """Every flag of the synopsis is the parser's (or in `own`), and every option of the parser is in it under
    one of its names."""
    options = _options(parser)
    assert sorted(flags - set(options) - own) == []
    unnamed = {a.option_strings[-1] for a in options.values() if not flags & set(a.option_strings)}
    assert sorted(unnamed) == []


def test_test_pipeline_synopsis_names_every_flag():
    from test_pipeline import build_parser

    _check_synopsis(_synopsis_flags("`test_pipeline.py ["), build_parser())


def _parser_of(main) -> argparse.ArgumentParser:
    """The parser a module's main() builds inside itself: caught as it parses."""
    caught = []
    real = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        caught.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = spy
    try:
        with pytest.raises(SystemExit):
            main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return caught[0]


def test_preview_compare_and_demo_synopses_name_every_flag():
    from vlm_caption import compare, demo, preview

    _check_synopsis(_synopsis_flags("`python -m vlm_caption.preview "), _parser_of(preview.main))
    _check_synopsis(_synopsis_flags("`python -m vlm_caption.compare "), _parser_of(compare.main))
    compare_show = next(a for a in _parser_of(compare.main)._actions if "--show" in a.option_strings)
    assert f"[--show {compare_show.default}]" in README
    preview_n = next(a for a in _parser_of(preview.main)._actions if "--n" in a.option_strings)
    assert f"[--n {preview_n.default}]" in README
    demo_parser = _parser_of(demo.main)
    demo_parser._actions = [a for a in demo_parser._actions if a.dest != "verbose"]  # the demo's own debugging
    _check_synopsis(_synopsis_flags("`./run_captioning.sh --demo "), demo_parser, own={"--demo"})
    assert f"default {demo.DEFAULT_ROWS}" in _section("### `test_pipeline.py`, preview, demo")
    # --n 6 was refused with a minimum that neither the README nor run_captioning.sh --help named
    assert f"default {demo.DEFAULT_ROWS}, at least {demo.MIN_ROWS}" in _section("### `test_pipeline.py`, preview, demo")
    assert f"(default: {demo.DEFAULT_ROWS}, at least {demo.MIN_ROWS};" in (REPO / "run_captioning.sh").read_text()


def test_every_module_name_the_readme_points_at_exists():
    """`rows.RETRY_FLAGS`, `backends.make_backend`, ...: a rename must not leave the README pointing nowhere."""
    modules = {p.stem for p in (REPO / "vlm_caption").glob("*.py")}
    named = set(re.findall(r"\b([a-z_]+)\.([A-Za-z_]\w*)", README))  # file names too: demo.lock, ...
    named = {(m, n) for m, n in named if m in modules and n not in ("py", "lock", "json", "jsonl", "parquet")}
    assert len(named) >= 6
    missing = [f"{m}.{n}" for m, n in sorted(named) if not hasattr(importlib.import_module(f"vlm_caption.{m}"), n)]
    assert missing == []
    paths = set(re.findall(r"`((?:vlm_caption|benchmarks|runs|tests)/[\w./-]+\.\w+)`", README))
    assert [p for p in sorted(paths) if not (REPO / p).exists()] == []


def _layout_names(block: str) -> set[str]:
    """The first word of each entry of a layout block (a file or a folder), and the folder of each `dir/file`."""
    names = {line.split()[0] for line in block.splitlines() if line.startswith("  ") and not line.startswith(" " * 20)}
    return names | {n.split("/")[0] + "/" for n in names if "/" in n.rstrip("/")}


def _as_readme_names(root: Path) -> set[str]:
    names = set()
    for path in root.iterdir():
        name = re.sub(r"^\d{5}", "00000", path.name) + ("/" if path.is_dir() else "")
        names.add(name)
        if path.name == "locks":  # README names the lock files on the locks/ line
            names |= {re.sub(r"worker-\d{3}", "worker-NNN", p.name) for p in path.iterdir()}
    return names


def test_what_a_run_writes_is_in_the_checkpoint_layout(tmp_path):
    """Every file and folder a finished run and a --merge-only leave in the checkpoint dir (and every lock file
    in locks/) is named in README's "Checkpoint layout"."""
    from batched_image_inference import main

    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=12, broken=True, seed=3, shard_size=8, include_broken_in_metadata=True)
    ckpt = tmp_path / "ckpt"
    common = ["--data-dir", str(data), "--checkpoint-dir", str(ckpt), "--backend", "dummy", "--no-push"]
    assert main([*common, "--num-loader-workers", "1"]) == 0
    assert main([*common, "--merge-only"]) == 0
    block = _code_block("## Checkpoint layout and guarantees")
    documented = _layout_names(block)
    locks_line = next(line for line in block.splitlines() if line.strip().startswith("locks/"))
    locks_text = locks_line + "\n" + block.split(locks_line, 1)[1].split("\n  machines.json", 1)[0]
    written = _as_readme_names(ckpt)
    lock_files = {n for n in written if n.endswith(".lock")}
    assert lock_files and all(n in locks_text for n in lock_files), (lock_files, locks_text)
    assert {"parts/", "failures/", "coverage.json"} <= written
    assert sorted(written - lock_files - documented) == []


def test_what_the_sample_data_holds_is_in_the_data_layout(tmp_path):
    """sample_data writes download_data.py's layout: each of its files and folders is in README's "Data layout"."""
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=8, broken=True, seed=3, shard_size=8)
    documented = _layout_names(_code_block("## Data layout"))
    written = _as_readme_names(data) | {"images/" + n for n in _as_readme_names(data / "images")}
    assert sorted(written - documented) == []


def test_every_setting_the_run_scripts_read_from_the_environment_is_in_the_readme():
    """runs/slurm_array.sbatch captions with its own MODEL default and pushes to HF_USERNAME's repo: a newcomer
    following README's `sbatch` line learnt neither, nor how to change them."""
    scale_out = README.split("\n## Scale-out\n")[1].split("```")[1]  # (its comments start with "# ")
    for script in sorted((REPO / "runs").iterdir()):
        text = script.read_text()
        settings = set(re.findall(r"\$\{([A-Z_]+):-", text)) - {"SLURM_SUBMIT_DIR", "SLURM_GPUS_ON_NODE"}  # Slurm's own
        assert settings, script.name
        assert sorted(v for v in settings if not re.search(rf"\b{v}\b", scale_out)) == [], script.name
        model = re.search(r"\$\{MODEL:-([^}]+)\}", text).group(1)
        assert f"{model} in {script.name}" in " ".join(scale_out.replace("#", " ").split()), script.name


def test_the_exit_code_list_names_every_code_the_scripts_give():
    """README's "Exit codes" list: each `errors.EXIT_*` and each signal's 128 + number has its own line."""
    import signal

    from vlm_caption import errors

    listed = {int(code) for code in re.findall(r"^- `(\d+)`", README.split("**Exit codes**")[1].split("\n\n")[0],
                                               flags=re.M)}
    listed |= {int(code) for code in re.findall(r"^- `\d+` [^`]*`(\d+)`", README, flags=re.M)}  # "`130` ..., `143`"
    codes = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    codes |= {128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGPIPE}
    assert codes <= listed, sorted(codes - listed)
