"""What goes wrong before any work starts, each one line and no traceback. Text that is not UTF-8 where it must be:
a --prompts-file prompt with a lone surrogate escape (half an emoji, cut by the tool that wrote the file), a
directory name in latin-1 bytes (Python holds those as surrogates); each was a traceback after the model loaded (the
tokenizer's TypeError, pyarrow's UnicodeEncodeError at the first part written). An empty download --output. A Ctrl-C
while a script still imports its modules."""
from __future__ import annotations

import os
import shutil

import pytest
from dummy_runs import assert_one_line_usage_errors, clear_launch_env, dummy_args

from vlm_caption.cli import run_main
from vlm_caption.errors import EXIT_USAGE

LATIN1_NAME = os.fsdecode(b"donn\xe9es")


@pytest.mark.parametrize("name, text", [("p.json", '{"a": "Describe it \\ud83d"}'),
                                        ("p.yaml", 'a: "Describe it \\ud800"\n')])
def test_a_lone_surrogate_in_a_prompts_file_is_one_usage_line(sample_data_dir, tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert_one_line_usage_errors(sample_data_dir, tmp_path / "ckpt", [(("--prompts-file", str(path)),
                                                                       "holds a lone surrogate escape")], capsys)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("which", ["--checkpoint-dir", "--data-dir"])
def test_a_dir_name_that_is_not_utf8_is_one_usage_line(sample_data_dir, tmp_path, monkeypatch, capsys, which):
    from batched_image_inference import main

    clear_launch_env(monkeypatch)
    data, ckpt = sample_data_dir, tmp_path / "ckpt"
    if which == "--checkpoint-dir":
        ckpt = tmp_path / LATIN1_NAME
    else:
        data = tmp_path / LATIN1_NAME
        shutil.copytree(sample_data_dir, data)
    with pytest.raises(SystemExit) as exc:
        run_main(main, dummy_args(data, ckpt), prog="batched_image_inference.py")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == EXIT_USAGE and len(lines) == 1, lines
    assert f"{which} {tmp_path}/donn\\xe9es is not a UTF-8 name" in lines[0]
    assert not (tmp_path / LATIN1_NAME / "parts").exists()


def test_a_download_output_or_source_that_is_not_utf8_is_refused(tmp_path):
    from vlm_caption.config import DownloadConfig
    from vlm_caption.errors import UsageError

    for flags in ({"output": str(tmp_path / LATIN1_NAME)}, {"source": str(tmp_path / f"{LATIN1_NAME}.parquet")}):
        with pytest.raises(UsageError, match=r"--(output|source) .*donn\\xe9es.* is not a UTF-8 name"):
            DownloadConfig(**flags).validate()


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_download_output_is_refused_not_the_current_directory(tmp_path, monkeypatch, value):
    """An unset "$OUT" in a script downloaded urls.parquet, images/ and full_metadata.parquet beside the code."""
    from vlm_caption.config import DownloadConfig
    from vlm_caption.errors import UsageError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="--output is empty; give a directory"):
        DownloadConfig(output=value, source=str(tmp_path / "src.parquet")).validate()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["batched_image_inference.py", "download_data.py", "test_pipeline.py",
                                    "-m vlm_caption.preview"])
def test_ctrl_c_while_a_script_imports_is_one_line_and_130(tmp_path, script):
    """The imports take ~0.2 s here, seconds on a cold network file system: a Ctrl-C then was a KeyboardInterrupt
    traceback. An import hook makes the Ctrl-C land there every time."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass CtrlC:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vlm_caption.config':\n            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n")
    proc = subprocess.run([sys.executable, *script.split(), "--help"], cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1, proc.stderr[-400:]
    assert lines[0].endswith("interrupted (SIGINT) while starting; nothing was done")


@pytest.mark.parametrize("tool", ["preview", "compare"])
def test_preview_and_compare_of_a_run_dir_whose_name_is_not_utf8_is_one_usage_line(
        sample_data_dir, tmp_path, monkeypatch, capsys, tool):
    """The run dir moved under a latin-1 name: pyarrow's UnicodeEncodeError was a traceback in both tools."""
    from batched_image_inference import main
    from vlm_caption import compare, preview

    clear_launch_env(monkeypatch)
    good = tmp_path / "ckpt"
    assert main(dummy_args(sample_data_dir, good)) == 0
    bad = tmp_path / LATIN1_NAME
    shutil.move(str(good), str(bad))
    capsys.readouterr()
    argv = [str(bad), "--out", str(tmp_path / "p.html")] if tool == "preview" else [str(bad), str(bad)]
    with pytest.raises(SystemExit) as exc:
        run_main(preview.main if tool == "preview" else compare.main, argv, prog=f"python -m vlm_caption.{tool}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == EXIT_USAGE and len(lines) == 1, lines[-3:]
    assert "not a UTF-8 name" in lines[0]
