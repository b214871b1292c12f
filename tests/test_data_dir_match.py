"""A checkpoint dir resumed or merged against another data set, or a run of another data set pushing to a repo
that holds a run of the same settings: keys name images by their place in a download, so the same key in
another data dir is another image. The sha256 of the parts (or of the Hub's files) against the data dir's
decides (image_match.py)."""
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


# ---------------------------------------------------------------- the Hub: the source of truth of what is done

REPO = "tester/data-match"


def hub_args(data, ckpt, stub, *extra: str, repo: str = REPO) -> list[str]:
    args = dummy_args(data, ckpt, *extra)
    args.remove("--no-push")
    return [*args, "--hf-repo", repo, "--hub-endpoint", stub.endpoint]


def published(stub, repo: str = REPO) -> dict[str, str]:
    """key -> sha256 of every row in the repo's data files (each key once)."""
    rows = stub.read_rows(repo)
    assert len({r["key"] for r in rows}) == len(rows)
    return {r["key"]: r["sha256"] for r in rows}


def sha_by_key(data) -> dict[str, str]:
    table = pq.read_table(data / "full_metadata.parquet", columns=["key", "sha256"])
    return dict(zip(table.column("key").to_pylist(), table.column("sha256").to_pylist()))


def test_a_run_of_another_data_set_does_not_take_the_hub_s_keys_as_its_own(two_data_sets, tmp_path, capsys,
                                                                           hub_stub):
    """Before: the fresh dir of data set b counted every key data set a published as done, captioned nothing
    and ended 'exit 0', its 12 images never captioned, nor published."""
    a, b = two_data_sets
    assert run(capsys, *hub_args(a, tmp_path / "ckpt_a", hub_stub))[0] == 0
    assert published(hub_stub) == sha_by_key(a)
    commits = hub_stub.commits_applied
    code, err = run(capsys, *hub_args(b, tmp_path / "ckpt_b", hub_stub))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "12 of the 12 images the Hub run" in err and f"of {REPO} published are other images in --data-dir {b}" \
        in err and "Another data set takes a --hf-repo of its own" in err, err
    assert not store.list_parts(tmp_path / "ckpt_b") and hub_stub.commits_applied == commits  # nothing captioned
    # the same data set from a fresh dir (another machine): every key published, nothing captioned again
    assert run(capsys, *hub_args(a, tmp_path / "ckpt_a2", hub_stub))[0] == 0
    assert published(hub_stub) == sha_by_key(a)
    # b in a repo of its own: all of it captioned and published there
    assert run(capsys, *hub_args(b, tmp_path / "ckpt_b", hub_stub, repo="tester/other-data"))[0] == 0
    assert published(hub_stub, "tester/other-data") == sha_by_key(b)
    code, err = run(capsys, *hub_args(b, tmp_path / "ckpt_b_check", hub_stub, "--check-hub"))
    assert code == 2 and "are other images in --data-dir" in err, err  # what a is published, b is not


def test_push_only_of_another_data_set_s_captions_is_refused_not_half_dropped(two_data_sets, tmp_path, capsys,
                                                                              hub_stub):
    """Before: --push-only of b's dir to a repo holding a's run pushed none of its rows (their keys were
    published) and said every row of the dir was on the Hub."""
    a, b = two_data_sets
    assert run(capsys, *hub_args(a, tmp_path / "ckpt_a", hub_stub))[0] == 0
    assert run(capsys, *dummy_args(b, tmp_path / "ckpt_b"))[0] == 0  # captioned with --no-push
    commits = hub_stub.commits_applied
    code, err = run(capsys, *hub_args(b, tmp_path / "ckpt_b", hub_stub, "--push-only"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"are other images in --checkpoint-dir {tmp_path / 'ckpt_b'}" in err and "did this dir caption another " \
        "data set?" in err, err
    assert hub_stub.commits_applied == commits and published(hub_stub) == sha_by_key(a)
    assert run(capsys, *hub_args(b, tmp_path / "ckpt_b", hub_stub, "--push-only", repo="tester/other-data"))[0] == 0
    assert published(hub_stub, "tester/other-data") == sha_by_key(b)


def test_push_only_reads_each_part_once_for_the_image_check_and_the_push(two_data_sets, tmp_path, capsys,
                                                                         hub_stub, monkeypatch):
    """Before: the check of the dir's images read every part, then the pusher read each again for its keys
    (at 400K rows, 2,000 parts: a second pass over the dir). The rows themselves are read once more to be sent."""
    from collections import Counter

    from vlm_caption import hub

    a, _ = two_data_sets
    assert run(capsys, *dummy_args(a, tmp_path / "ckpt"))[0] == 0
    parts = {p.path for p in store.list_parts(tmp_path / "ckpt")}
    reads: Counter = Counter()
    for module in (hub, store):
        real = module.check_file
        monkeypatch.setattr(module, "check_file", lambda path, *a, real=real, **k: reads.update([path]) or
                            real(path, *a, **k))
    assert run(capsys, *hub_args(a, tmp_path / "ckpt", hub_stub, "--push-only"))[0] == 0
    assert published(hub_stub) == sha_by_key(a)
    assert len(parts) >= 2 and {p: reads[p] for p in parts} == {p: 1 for p in parts}, reads


def test_a_push_says_the_rows_another_data_set_took_the_keys_of(two_data_sets, tmp_path, capsys, hub_stub, caplog):
    """Two data sets started together into one repo, before either had pushed, both pass the check at start:
    the second to push finds its keys published for other images. A key is published once, so those rows are
    not pushed, but each push says so, never silently."""
    from vlm_caption import hub

    a, b = two_data_sets
    assert run(capsys, *dummy_args(b, tmp_path / "ckpt_b"))[0] == 0  # b captioned (--no-push), then a publishes
    assert run(capsys, *hub_args(a, tmp_path / "ckpt_a", hub_stub, "--max-images", "8"))[0] == 0
    client = hub.connect(REPO, endpoint=hub_stub.endpoint, retry=hub.RetryPolicy(sleep=lambda s: None),
                         checkpoint_dir=tmp_path / "ckpt_b")
    run_id = store.read_run_json(tmp_path / "ckpt_b")["run_id"]
    with caplog.at_level("WARNING"):
        assert client.push(tmp_path / "ckpt_b", run_id) == 4  # the 4 keys a did not publish
    said = [r.getMessage() for r in caplog.records if "published by another dir for other images" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"Hub: 8 rows of {tmp_path / 'ckpt_b'}") and "e.g. key 000000" \
        in said[0], said
    first = sorted(sha_by_key(a))[:8]  # a's: its first 8 keys; b's: the rest
    assert published(hub_stub) == {k: (sha_by_key(a) if k in first else sha_by_key(b))[k] for k in sha_by_key(b)}
    client.push(tmp_path / "ckpt_b", run_id)  # said again only when there are more
    assert len([r for r in caplog.records if "for other images" in r.getMessage()]) == 1
