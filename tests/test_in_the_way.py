"""A directory put by hand where a run writes a file is a user's mistake in a dir of ours: one line, exit 2, the
same whether the file is an output (all_captions.parquet, run_summary.json) or a lock file."""
from __future__ import annotations

import pytest
from dummy_runs import dummy_args

from vlm_caption import store
from vlm_caption.errors import EXIT_USAGE
from vlm_caption.locks import LOCKS_DIR


@pytest.mark.parametrize("in_the_way", [store.MERGED, store.SUMMARY, f"{LOCKS_DIR}/worker-000.lock"])
def test_a_directory_in_place_of_a_file_of_the_run_is_one_line_exit_2(sample_data_dir, tmp_path, capsys, in_the_way):
    """An output file exited 1 ('a fatal condition', as a full disk), a lock file 2 (a usage error)."""
    from batched_image_inference import main

    from vlm_caption.cli import run_main

    ckpt = tmp_path / "ckpt"
    (ckpt / in_the_way / "mine").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        run_main(main, dummy_args(sample_data_dir, ckpt, "--max-images", "4"), prog="batched_image_inference.py")
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exc.value.code == EXIT_USAGE, err
    assert len(err) == 1 and f"{in_the_way} is a directory" in err[0] and "move it aside and rerun" in err[0], err
    assert (ckpt / in_the_way / "mine").is_dir()  # left as it was
