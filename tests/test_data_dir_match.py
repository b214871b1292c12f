"""A checkpoint dir resumed or merged against another data set: keys name images by their place in a download,
so the same key in another data dir is another image. The parts' sha256 against the data dir's decides."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dummy_runs import clear_launch_env, dummy_args
from vlm_caption import dataset, store
from vlm_caption.sample_data import write_sample


@pytest.fixture
def two_data_sets(tmp_path, monkeypatch):
    """Two downloads with the same keys (000000 ...) and other images: what a trial of another data set, or
    a --data-dir pointing at the wrong download, looks like to a run."""
    clear_launch_env(monkeypatch)
    return (write_sample(tmp_path / "a", n=12, broken=False, seed=0, shard_size=6),
            write_sample(tmp_path / "b", n=12, broken=False, seed=5, shard_size=6))


def run(capsys, *args: str) -> tuple[int, str]:
    from batched_image_inference import main
    from vlm_caption.cli import run_main

    with pytest.raises(SystemExit) as ended:
        run_main(main, list(args), prog="caption")
    return ended.value.code, capsys.readouterr().err


def files(ckpt) -> dict[str, bytes]:
    return {str(p.relative_to(ckpt)): p.read_bytes() for p in sorted(ckpt.rglob("*.parquet"))}


def test_the_same_keys_in_the_two_sample_sets_are_other_images(two_data_sets):
    a, b = (pq.read_table(d / "full_metadata.parquet", columns=["key", "sha256"]).to_pylist() for d in two_data_sets)
    assert [r["key"] for r in a] == [r["key"] for r in b]
    assert all(x["sha256"] != y["sha256"] for x, y in zip(a, b))


def test_a_dir_resumed_against_another_data_set_is_refused_before_anything_is_written(two_data_sets, tmp_path,
                                                                                         capsys):
    a, b = two_data_sets
    ckpt = tmp_path / "ckpt"
    assert run(capsys, *dummy_args(a, ckpt, "--max-images", "6"))[0] == 0
    before = files(ckpt)
    code, err = run(capsys, *dummy_args(b, ckpt))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"6 of the 6 images --checkpoint-dir {ckpt} captioned are other images in --data-dir {b}" in err
    assert "Another data set takes a --checkpoint-dir of its own" in err
    assert files(ckpt) == before  # nothing captioned, merged or set aside
    code, err = run(capsys, *dummy_args(b, ckpt, "--dry-run"))  # the plan says what the run would
    assert code == 2 and "are other images in --data-dir" in err, err
    assert run(capsys, *dummy_args(a, ckpt))[0] == 0  # the right data dir goes on
    assert len(pq.read_table(ckpt / store.MERGED)) == 12


def test_merge_only_against_another_data_set_keeps_the_merged_file(two_data_sets, tmp_path, capsys):
    a, b = two_data_sets
    ckpt = tmp_path / "ckpt"
    assert run(capsys, *dummy_args(a, ckpt))[0] == 0
    before = files(ckpt)
    code, err = run(capsys, *dummy_args(b, ckpt, "--merge-only"))
    assert code == 2 and "12 of the 12 images the checkpoint dir(s) captioned are other images" in err, err
    assert files(ckpt) == before


def test_a_few_images_downloaded_again_are_a_warning_and_keep_their_captions(two_data_sets, tmp_path, caplog):
    """A shard downloaded again whose server sent other bytes for one image: not another data set."""
    from batched_image_inference import main

    a, _ = two_data_sets
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(a, ckpt)) == 0
    again = tmp_path / "a_again"
    shutil.copytree(a, again)
    for path, _ in dataset.metadata_files(again):  # key 000003's image changed, in every file that lists it
        table = pq.read_table(path)
        sha = pc.if_else(pc.equal(table.column("key"), "000003"), pa.scalar("0" * 64), table.column("sha256"))
        pq.write_table(table.set_column(table.schema.get_field_index("sha256"), "sha256", sha), path)
    before = pq.read_table(ckpt / store.MERGED).to_pylist()
    assert main(dummy_args(again, ckpt)) == 0
    said = [r.getMessage() for r in caplog.records if "sha256 differs" in r.getMessage()]
    assert len(said) == 1, said
    assert "1 of the 12 images" in said[0] and "e.g. key 000003" in said[0], said
    assert pq.read_table(ckpt / store.MERGED).to_pylist() == before  # kept, not captioned again
