"""Bad images, bad metadata, bad flags and a failing disk: recorded or refused in one line, never a crash."""
from __future__ import annotations

import errno
import io
import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batched_image_inference import main
from vlm_caption import dataset, store
from vlm_caption.cli import run_main
from vlm_caption.errors import EXIT_FATAL, EXIT_ITEMS_FAILED, EXIT_USAGE


# ---------------------------------------------------------------- a corpus of bad images

def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header declares width x height pixels."""
    data = png(Image.new("L", (1, 1)))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def exif_rotated() -> bytes:
    img = Image.new("RGB", (60, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    return jpeg(img, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("P", (32, 32), i) for i in (1, 50, 100)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def palette_with_transparency() -> bytes:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (10, 10, 30, 30))
    return png(img, transparency=0)


GOOD = {
    "cmyk": jpeg(Image.new("CMYK", (48, 32), (0, 128, 255, 0))),
    "grey16": png(Image.new("I;16", (40, 30), 40000)),
    "palette_alpha": palette_with_transparency(),
    "animated_gif": animated_gif(),
    "exif_rotated": exif_rotated(),
    "one_pixel": png(Image.new("RGB", (1, 1), (9, 9, 9))),
    "strip": png(Image.new("RGB", (20000, 100), (1, 2, 3))),
    "non_utf8_text": jpeg(Image.new("RGB", (50, 50), (0, 0, 200))),
}
BAD = {  # name -> (bytes or None for a missing file, expected failure stage)
    "truncated": (jpeg(Image.new("RGB", (300, 300), (5, 5, 5)))[:400], "decode"),
    "zero_bytes": (b"", "decode"),
    "html": (b"<!doctype html><html><body>Not found</body></html>", "decode"),
    "bomb": (bomb_png(100_000, 100_000), "decode"),
    "missing": (None, "load"),
}


def write_shard(data: Path, shard: str, rows: list[dict]) -> None:
    schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.binary()),
                        ("status", pa.string()), ("error_message", pa.string()), ("original_key", pa.string()),
                        ("source_md5", pa.string()), ("tags", pa.binary()), ("merged_tags", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data / "images" / f"{shard}.parquet")
    (data / "images" / f"{shard}_stats.json").write_text(json.dumps({"successes": len(rows)}))


def row(key: str, name: str, caption: bytes = b"a caption", tags: bytes = b"tag") -> dict:
    return {"key": key, "url": f"http://127.0.0.1/{name}", "caption": caption, "status": "success",
            "error_message": None, "original_key": name, "source_md5": "0" * 32, "tags": tags,
            "merged_tags": "style", "width": None, "height": None, "sha256": "f" * 64}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """img2dataset layout without full_metadata.parquet, so the shard parquets themselves are read."""
    data = tmp_path_factory.mktemp("bad") / "data"
    (data / "images" / "00000").mkdir(parents=True)
    (data / "images" / "00001").mkdir(parents=True)
    rows, expected = [], {}
    for i, (name, content) in enumerate([*GOOD.items(), *((n, c) for n, (c, _) in BAD.items())]):
        key = f"{i:09d}"
        if content is not None:
            (data / "images" / "00000" / f"{key}.jpg").write_bytes(content)
        bad_text = name == "non_utf8_text"
        rows.append(row(key, name, caption=b"caf\xe9 \xff" if bad_text else b"a caption",
                        tags=b"\xfe\xfftag" if bad_text else b"tag"))
        expected[key] = BAD[name][1] if name in BAD else "captioned"
    rows.append(row("../../x", "escape"))  # a key that tries to leave the data dir
    expected["../../x"] = "load"
    write_shard(data, "00000", rows)
    # Shard 1 repeats a key of shard 0 (its first occurrence is used) and adds one good image.
    (data / "images" / "00001" / "000010000.jpg").write_bytes(GOOD["cmyk"])
    write_shard(data, "00001", [row("000000000", "duplicate"), row("000010000", "good")])
    expected["000010000"] = "captioned"
    (data / "images" / "00002.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (data / "images" / "00002_stats.json").write_text("{}")
    (data / "images" / "00003.parquet").write_bytes(b"")  # a shard img2dataset was killed in: no stats file
    return data, expected


def test_bad_corpus_is_captioned_or_recorded_and_the_run_goes_on(bad_corpus, tiny_model_dir, tmp_path, capsys):
    data, expected = bad_corpus
    ckpt = tmp_path / "ckpt"
    code = main(["--model", str(tiny_model_dir), "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
                 "--no-push", "--max-tokens", "4", "--batch-size", "4"])
    assert code == EXIT_ITEMS_FAILED
    captions = pq.read_table(ckpt / store.MERGED).to_pandas().set_index("key")
    failures = pq.read_table(ckpt / store.FAILURES_DIR).to_pandas().set_index("key")
    got = {k: "captioned" for k in captions.index} | dict(failures["stage"])
    assert got == expected
    assert all(len(e) > 10 for e in failures["error"])
    assert "pixels" in failures.loc[f"{list(GOOD).__len__() + 3:09d}", "error"]  # the bomb names its size
    bad_text = captions.loc[f"{list(GOOD).index('non_utf8_text'):09d}"]
    assert bad_text["original_caption"] == "caf\ufffd \ufffd" and bad_text["tags"].endswith("tag")
    assert captions.loc["000000004", "md5"] == "0" * 32  # source_md5 restored as md5
    summary = json.loads((ckpt / store.SUMMARY).read_text())
    assert summary["selection"]["duplicate_input_keys"] == 1
    assert summary["selection"]["unreadable_shards"] == [
        str(data / "images" / "00002.parquet"), str(data / "images" / "00003.parquet") + " (unfinished download)"]
    assert summary["this_run"]["failed_by_stage"] == {"decode": 4, "load": 2}
    assert not list(tmp_path.rglob("x"))  # nothing was written outside the checkpoint dir


def test_image_modes_are_normalised(tmp_path):
    for name, content in GOOD.items():
        path = tmp_path / name
        path.write_bytes(content)
        img = dataset.load_image(path)
        assert img.mode == "RGB", name
    rotated = dataset.load_image(tmp_path / "exif_rotated")
    assert rotated.size == (20, 60)  # EXIF orientation applied
    grey = dataset.load_image(tmp_path / "grey16")
    assert grey.getpixel((0, 0))[0] == 40000 // 256  # scaled to 8 bits, not clipped to white
    transparent = dataset.load_image(tmp_path / "palette_alpha")
    assert transparent.getpixel((0, 0)) == (255, 255, 255) and transparent.getpixel((20, 20)) == (0, 255, 0)


def test_paths_from_data_never_leave_the_data_dir(tmp_path):
    assert dataset.resolve_image_path(tmp_path, "000000001", "../../etc/passwd", None) is None
    assert dataset.resolve_image_path(tmp_path, "000000001", "/etc/passwd", None) is None
    assert dataset.resolve_image_path(tmp_path, "../../x", None, "00000") is None
    assert dataset.resolve_image_path(tmp_path, "000000001", None, "../..") is None
    assert dataset.resolve_image_path(tmp_path, "1", "images/00000/1.jpg", None) == tmp_path / "images/00000/1.jpg"


# ---------------------------------------------------------------- bad flags

def one_line_exit(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]  # progress bars may come before it
    assert len(errors) == 1, err
    return exc.value.code, errors[0]


@pytest.mark.parametrize("flags, message", [
    (["--max-images", "0"], "--max-images must be a positive integer"),
    (["--max-images", "-3"], "--max-images must be a positive integer"),
    (["--shards", "0-999999999999"], "is past any shard"),  # the set of its numbers filled the memory
    (["--shards", ""], "--shards is empty: give a value, or leave the flag out"),  # it ran every shard
    (["--keep-columns", " , "], "--keep-columns is empty: give a value, or leave the flag out"),  # ignored
    (["--num-workers", "0"], "--num-workers must be 1 or more, got 0"),  # was "give ... together"
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--max-tokens", "1000000000"], "--max-tokens 1000000000 is more than a Gemma 3 model's whole context"),
    (["--hf-repo", "bad repo!"], "invalid Hub repo id"),
    (["--hf-repo", "a/b/c"], "invalid Hub repo id"),
    (["--num-workers", "2", "--worker-index", "5"], "--worker-index must be in"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature must be a number"),
    (["--temperature", "inf"], "--temperature must be a number"),
    (["--min-push-interval", "nan"], "--min-push-interval must be a number of seconds >= 0, got nan"),
    (["--min-push-interval", "inf"], "--min-push-interval must be a number of seconds >= 0, got inf"),
    (["--checkpoint-dir", ""], "--checkpoint-dir is empty"),
    (["--device-map", "foo"], "--device-map 'foo' is not one of auto"),
    (["--hub-endpoint", "notaurl"], "is not an http:// or https:// URL"),
    (["--hub-endpoint", "ftp://mirror.example"], "is not an http:// or https:// URL"),
    (["--model", "./models/gemma-3-4b-it"], "is neither a directory here nor a Hub model id"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, message, sample_data_dir, tmp_path, capsys):
    argv = ["--data-dir", str(sample_data_dir), "--checkpoint-dir", str(tmp_path / "c"), *flags]
    if "--hf-repo" not in flags:
        argv.append("--no-push")
    code, err = one_line_exit(capsys, argv)
    assert code == EXIT_USAGE and message in err


def test_max_tokens_past_the_models_context_is_one_line_once_it_is_loaded(tiny_model_dir, sample_data_dir, tmp_path,
                                                                          capsys):
    """Under the flag's cap, but more than the tiny model's context leaves after its prompt: exit 2, nothing
    captioned (caches and --batch-size auto would be sized for tokens the model has no positions for)."""
    from transformers import AutoConfig

    from vlm_caption.config import MAX_TOKENS_LIMIT

    context = AutoConfig.from_pretrained(tiny_model_dir).get_text_config(decoder=True).max_position_embeddings
    assert context <= MAX_TOKENS_LIMIT
    ckpt = tmp_path / "c"
    code, err = one_line_exit(capsys, ["--model", str(tiny_model_dir), "--data-dir", str(sample_data_dir),
                                       "--checkpoint-dir", str(ckpt), "--no-push", "--max-images", "2",
                                       "--max-tokens", str(context)])
    assert code == EXIT_USAGE and f"--max-tokens {context} does not fit" in err and "or less" in err, err
    assert not store.list_parts(ckpt) and not store.list_failure_files(ckpt)


def test_the_context_check_leaves_room_for_the_prompt():
    from transformers import Gemma3TextConfig

    from vlm_caption.errors import UsageError
    from vlm_caption.model_loading import check_context

    config = Gemma3TextConfig(max_position_embeddings=512)
    check_context(config, 300, 212, "m")  # exactly full
    with pytest.raises(UsageError, match="takes 300, leaving 212; use --max-tokens 212 or less"):
        check_context(config, 300, 213, "m")
    with pytest.raises(UsageError, match="leaving none; shorten the prompt"):
        check_context(config, 600, 1, "m")
    no_limit = SimpleNamespace(get_text_config=lambda decoder: SimpleNamespace())  # names no context
    check_context(no_limit, 600, 10**9, "m")


def test_bad_prompt_files_are_one_line_and_exit_2(sample_data_dir, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("Décris l'œuvre.".encode("cp1252"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "good.txt").write_text("Describe {tags}.\n")
    base = ["--no-push", "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(tmp_path / "c"), "--dry-run"]
    for name, says in (("nope.txt", "does not exist"), (".", "is a directory"), ("latin1.txt", "as UTF-8 text"),
                       ("empty.txt", "is empty")):
        code, err = one_line_exit(capsys, base + ["--prompt-file", str(tmp_path / name)])
        assert code == EXIT_USAGE and says in err, err
    with pytest.raises(SystemExit) as exc:
        run_main(main, base + ["--prompt-file", str(tmp_path / "good.txt")])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "\n    Describe " in out and "{tags}" not in out  # the template, rendered


def test_bad_directories_are_one_line_and_exit_2(sample_data_dir, tmp_path, capsys):
    base = ["--no-push", "--checkpoint-dir", str(tmp_path / "c")]
    code, err = one_line_exit(capsys, base + ["--data-dir", str(tmp_path / "nope")])
    assert code == EXIT_USAGE and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, err = one_line_exit(capsys, base + ["--data-dir", str(tmp_path / "empty")])
    assert code == EXIT_USAGE and "full_metadata.parquet" in err
    unmounted = tmp_path / "unmounted"  # the metadata without the images: every load would fail for good
    unmounted.mkdir()
    (unmounted / "full_metadata.parquet").write_bytes((sample_data_dir / "full_metadata.parquet").read_bytes())
    code, err = one_line_exit(capsys, base + ["--data-dir", str(unmounted)])
    assert code == EXIT_USAGE and "has no images/ folder" in err
    (tmp_path / "afile").write_text("x")
    code, err = one_line_exit(capsys, base + ["--data-dir", str(tmp_path / "afile")])
    assert code == EXIT_USAGE and "is a file" in err
    code, err = one_line_exit(capsys, ["--no-push", "--data-dir", str(sample_data_dir), "--checkpoint-dir",
                                       str(tmp_path / "afile")])
    assert code == EXIT_USAGE and "is a file" in err
    # /proc refuses new files even to root, where permission bits would not.
    code, err = one_line_exit(capsys, ["--no-push", "--data-dir", str(sample_data_dir), "--checkpoint-dir",
                                       "/proc/self/ckpt"])
    assert code == EXIT_USAGE and "not writable" in err


def test_unknown_model_offline_is_one_fatal_line(sample_data_dir, tmp_path, capsys):
    code, err = one_line_exit(capsys, ["--model", "google/no-such-gemma", "--data-dir", str(sample_data_dir),
                                       "--checkpoint-dir", str(tmp_path / "c"), "--no-push", "--max-images", "2"])
    assert code == EXIT_FATAL and "google/no-such-gemma" in err and "not in the local cache" in err


def test_model_access_errors_say_what_to_do():
    import importlib.util  # huggingface_hub 2's transport is httpx2; 1.x's (the GPU host's 1.33) httpx
    httpx2 = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from vlm_caption.model_loading import _model_load_error

    response = httpx2.Response(403, request=httpx2.Request("GET", "http://127.0.0.1/x"))
    for cause, needle in [(GatedRepoError("gated", response=response), "accept its licence"),
                          (RepositoryNotFoundError("missing", response=response), "was not found")]:
        wrapped = OSError("cannot load")
        wrapped.__cause__ = cause
        message = str(_model_load_error("google/gemma-3-4b-it", wrapped))
        assert needle in message and "\n" not in message
    assert "login" in str(_model_load_error("google/gemma-3-4b-it", OSError("You are trying to access a gated repo")))


def test_no_trust_remote_code_anywhere():
    root = Path(__file__).resolve().parent.parent
    sources = [p for p in root.glob("*.py")] + list((root / "vlm_caption").glob("*.py"))
    assert not [p for p in sources if "trust_remote_code" in p.read_text()]


# ---------------------------------------------------------------- a failing disk

def test_disk_full_mid_part_leaves_no_corrupt_part_and_resumes(tiny_model_dir, sample_data_dir, tmp_path, capsys,
                                                               monkeypatch):
    ckpt = tmp_path / "ckpt"
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(ckpt),
            "--no-push", "--max-tokens", "4", "--batch-size", "4", "--checkpoint-every", "8"]
    real_write = pq.write_table
    calls = {"n": 0}

    def disk_fills_up(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the third part: half of it reaches the disk, then the disk is full
            Path(where).write_bytes(b"PAR1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", disk_fills_up)
    code, err = one_line_exit(capsys, argv)
    assert code == EXIT_FATAL and "No space left on device" in err and "rerun to resume" in err
    for part in store.list_parts(ckpt):
        pq.read_table(part.path)  # every part that exists is whole
    assert len(store.list_parts(ckpt)) == 2
    assert not list(ckpt.rglob(".*.tmp-*"))

    monkeypatch.setattr(pq, "write_table", real_write)
    main(argv)
    keys = [k for _, ks in store.read_keys(store.list_parts(ckpt)) for k in ks]
    failed = [k for _, ks in store.read_keys(store.list_failure_files(ckpt)) for k in ks]
    meta = pq.read_table(sample_data_dir / "full_metadata.parquet", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) | set(failed) == set(meta)


def test_an_unreadable_first_shard_is_retryable_like_any_other(tiny_model_dir, tmp_path):
    """Only the first shard's columns were read up front: a broken first shard was a usage error (exit 2),
    any other one the documented exit 3 with the rest captioned."""
    from vlm_caption.sample_data import write_sample

    data = write_sample(tmp_path / "data", n=8, broken=False, seed=3, shard_size=4)
    (data / "full_metadata.parquet").unlink()
    first, second = sorted((data / "images").glob("*.parquet"))
    first.write_bytes(first.read_bytes()[:60])
    ckpt = tmp_path / "ckpt"
    code = main(["--model", str(tiny_model_dir), "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
                 "--no-push", "--backend", "dummy", "--max-tokens", "4"])
    assert code == EXIT_ITEMS_FAILED
    assert sorted(pq.read_table(ckpt / store.MERGED).column("key").to_pylist()) == \
        sorted(pq.read_table(second).column("key").to_pylist())


def test_an_unquoted_yaml_prompt_says_to_quote_it(sample_data_dir, tmp_path, capsys):
    """`a: {tags} ...` is a YAML mapping and `a: Style: x` a syntax error: the line says to quote the prompt."""
    base = ["--no-push", "--data-dir", str(sample_data_dir), "--checkpoint-dir", str(tmp_path / "c"), "--dry-run"]
    for name, text in (("brace.yaml", "a: {tags}\n"), ("colon.yaml", "a: Name the style: five words.\n")):
        (tmp_path / name).write_text(text)
        code, err = one_line_exit(capsys, base + ["--prompts-file", str(tmp_path / name)])
        assert code == EXIT_USAGE and "quote a prompt" in err, err


def test_merge_only_with_a_data_dir_that_does_not_exist_says_so(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / store.RUN_JSON).write_text(json.dumps({"run_id": "0123456789ab"}))
    code, err = one_line_exit(capsys, ["--merge-only", "--checkpoint-dir", str(tmp_path / "c"),
                                       "--data-dir", str(tmp_path / "nope")])
    assert code == EXIT_USAGE and "--data-dir" in err and "does not exist" in err, err


def test_a_data_dir_listing_no_images_says_so(sample_data_dir, tmp_path, caplog):
    """A download where every URL failed leaves an empty full_metadata.parquet: the run captioned 0 images and
    exited 0 without a word of why."""
    import shutil

    from dummy_runs import dummy_args

    from vlm_caption.errors import EXIT_OK

    data = tmp_path / "data"
    shutil.copytree(sample_data_dir, data)
    meta = pq.read_table(data / "full_metadata.parquet")
    pq.write_table(meta.slice(0, 0), data / "full_metadata.parquet")
    assert main(dummy_args(data, tmp_path / "c")) == EXIT_OK
    assert [r for r in caplog.records if f"{data} lists no images: nothing to caption" in r.getMessage()]
