"""The preview's "random weights" banner follows the run's model when the demo dir is moved (random_weights.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dummy_runs import dummy_args

from batched_image_inference import main
from vlm_caption import demo, store
from vlm_caption.errors import EXIT_ITEMS_FAILED, EXIT_OK
from vlm_caption.preview import write_preview
from vlm_caption.random_weights import RANDOM_WEIGHTS_MARKER


@pytest.fixture()
def demo_run(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch) -> Path:
    """DIR/model as the demo builds it (its marker included; the tiny model copied, not built again) and a run of
    it captioned into DIR/checkpoints."""
    from vlm_caption import tiny_model

    monkeypatch.setattr(tiny_model, "build_tiny_model", lambda out, **kw: shutil.copytree(tiny_model_dir, out))
    demo_dir = tmp_path / "demo"
    model, built = demo.ensure_model(demo_dir)
    assert built and (model / RANDOM_WEIGHTS_MARKER).is_file()
    args = dummy_args(sample_data_dir, demo_dir / "checkpoints", "--max-images", "4")
    args[args.index("--model") + 1] = str(model)
    assert main(args) in (EXIT_OK, EXIT_ITEMS_FAILED)
    return demo_dir


def page(ckpt: Path, out: Path) -> str:
    write_preview(ckpt, out, n=2)
    return out.read_text()


def test_the_banner_stays_when_the_demo_dir_is_moved(demo_run, tmp_path):
    """run.json names the model by its absolute path: once the dir moved, no marker was found there and the page
    of random-weight captions had no banner."""
    assert 'id="noise"' in page(demo_run / "checkpoints", tmp_path / "before.html")
    moved = tmp_path / "elsewhere" / "my-demo"
    moved.parent.mkdir()
    demo_run.rename(moved)
    assert not Path(json.loads((moved / "checkpoints" / store.RUN_JSON).read_text())["model"]).exists()
    html = page(moved / "checkpoints", tmp_path / "after.html")
    assert 'id="noise"' in html and "(random weights: noise)" in html


def test_a_marked_dir_of_other_weights_where_the_model_was_is_no_banner(demo_run, tiny_model_dir, tmp_path):
    """A dir found by name beside the moved checkpoint dir counts only when its content is the run's model."""
    moved = tmp_path / "moved"
    demo_run.rename(moved)
    shutil.rmtree(moved / "model")
    shutil.copytree(tiny_model_dir, moved / "model")
    (moved / "model" / "config.json").write_text((moved / "model" / "config.json").read_text() + "\n")  # other
    (moved / "model" / RANDOM_WEIGHTS_MARKER).write_text("random")
    assert 'id="noise"' not in page(moved / "checkpoints", tmp_path / "p.html")
    shutil.rmtree(moved / "model")
    assert 'id="noise"' not in page(moved / "checkpoints", tmp_path / "p.html")  # and none when it is gone
