"""--help as a newcomer reads it: a short usage line, metavars that say what goes there, the common flags of
batched_image_inference.py first (--help) and every flag with --help-all; download_data.py's few flags at once.
It printed 193 lines before, 38 of them a usage block of `[--max-images MAX_IMAGES]`."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_caption.cli_args import COMMON_FLAGS

REPO = Path(__file__).resolve().parent.parent


def _parsers() -> dict[str, argparse.ArgumentParser]:
    import batched_image_inference
    import download_data

    return {"batched_image_inference.py": batched_image_inference.build_parser(),
            "download_data.py": download_data.build_parser()}


def _help(parser: argparse.ArgumentParser, flag: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([flag])
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions a user may type and the help names (benchmark-only flags are SUPPRESS on purpose)."""
    return [a for a in parser._actions if a.help != argparse.SUPPRESS and a.option_strings]


@pytest.fixture(autouse=True)
def _80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal: the width a pipe gets


@pytest.mark.parametrize("script", ["batched_image_inference.py", "download_data.py"])
def test_help_exits_0_with_a_one_line_usage(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == [f"usage: {script} [options]", ""]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["batched_image_inference.py", "download_data.py"])
def test_every_flag_is_in_the_full_help_with_a_metavar_that_is_not_its_dest(script, capsys):
    parser = _parsers()[script]
    text = _help(parser, "--help-all" if parser.common_flags else "--help", capsys)
    for action in _shown(parser):
        for flag in action.option_strings:
            assert re.search(rf"(^|[ ,]){re.escape(flag)}\b", text, flags=re.M), f"{flag} is not in {script}'s help"
        if action.nargs != 0:  # a flag that takes a value
            assert action.metavar not in (None, action.dest.upper()), f"{action.option_strings}: metavar {action.metavar}"
            assert f"{action.option_strings[-1]} {action.dest.upper()}" not in text
        said = re.findall(r"\(default\b|\bdefault\)", action.help.replace("%(default)s", ""))
        assert len(said) <= 1, f"{action.option_strings}: its default shown twice"


def test_short_help_shows_the_common_flags_only_and_points_at_help_all(capsys):
    parser = _parsers()["batched_image_inference.py"]
    short = _help(parser, "--help", capsys)
    full = _help(parser, "--help-all", capsys)
    for action in _shown(parser):
        common = bool(COMMON_FLAGS & set(action.option_strings))
        flag = action.option_strings[-1]
        assert (re.search(rf"^  (-\w, )?{re.escape(flag)}\b", short, flags=re.M) is not None) == common, flag
    for newcomer_flag in ("--model", "--data-dir", "--max-images", "--no-push", "--hf-repo", "--resume"):
        assert newcomer_flag in COMMON_FLAGS
    hidden = len(_shown(parser)) - sum(bool(COMMON_FLAGS & set(a.option_strings)) for a in _shown(parser))
    assert f"--help-all shows {hidden} more" in short
    assert len(short.splitlines()) < 60 < len(full.splitlines()) < 120
    assert _help(parser, "--help-all", capsys) == full  # the short help hid flags for its own print only


def test_the_flags_parse_as_before():
    args = _parsers()["batched_image_inference.py"].parse_args(
        ["--batch-size", "auto", "--num-loader-workers", "3", "--checkpoint-dir", "a", "b", "--compile", "off",
         "--min-tokens", "4", "-v"])
    assert (args.batch_size, args.num_loader_workers, args.checkpoint_dirs, args.compile, args.min_tokens,
            args.verbose) == (None, 3, ["a", "b"], "off", 4, True)


@pytest.mark.skipif(not (REPO / "vlm-caption" / "bin" / "python").is_file(), reason="no ./vlm-caption venv here")
def test_run_captioning_forwards_help_all_without_setting_up(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "run_captioning.sh"), "--help-all"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--demo-dir" in proc.stdout and "--vision-overlap" in proc.stdout


@pytest.mark.skipif(not (REPO / "vlm-caption" / "bin" / "python").is_file(), reason="no ./vlm-caption venv here")
def test_the_demos_help_all_is_its_help(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "run_captioning.sh"), "--demo", "--help-all"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--demo-dir" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "demo").exists()  # help only: nothing made


def test_the_demos_usage_names_its_flags_as_readme_does(capsys):
    """`./run_captioning.sh --demo --help` showed `[--dir DIR]` and an unexplained `-v`, while README and
    run_captioning.sh --help say `--demo-dir DIR`."""
    from vlm_caption import demo

    with pytest.raises(SystemExit):
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert "[--demo-dir DIR]" in out.split("\n\n")[0] and "--dir DIR" not in out.split("\n\n")[0], out
    assert "debug logging" in out


def test_test_pipelines_help_uses_the_short_metavars_of_the_other_scripts():
    """test_pipeline.py --help showed `--num-images NUM_IMAGES`, `--checkpoint-dir CHECKPOINT_DIR`, ... where
    batched_image_inference.py --help says N and DIR for the same flags."""
    from test_pipeline import build_parser

    text = build_parser().format_help()
    assert re.findall(r"\b[A-Z]+_[A-Z_]+\b", text) == [], text
    assert "--num-images N " in text and "--checkpoint-dir DIR" in text and "--data-dir DIR" in text


def test_the_previews_help_names_its_arguments_as_readme_does():
    """README: `python -m vlm_caption.preview CHECKPOINT_DIR --out preview.html [--data-dir DIR]`; its --help said
    `checkpoint_dir`, `--out OUT`, `--data-dir DATA_DIR`."""
    from test_docs_match import _parser_of

    from vlm_caption import preview

    usage = _parser_of(preview.main).format_usage()
    assert "CHECKPOINT_DIR" in usage and "[--data-dir DIR]" in usage and "[--out FILE]" in usage, usage
