"""The prompts a run captions with are the ones its run.json records, whatever happens to the files they came from
while it runs."""
from __future__ import annotations

import json

import pytest
from dummy_runs import dummy_args

from batched_image_inference import main
from vlm_caption import dataset, dummy_backend
from vlm_caption.errors import EXIT_OK


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from vlm_caption.sample_data import write_sample

    return write_sample(tmp_path_factory.mktemp("as-recorded") / "data", n=8, broken=False, seed=3)


@pytest.mark.parametrize("flag, first, edited", [
    ("--prompts-file", 'short: "Name it."\n', 'short: "Describe it in detail."\nlong: "Describe it."\n'),
    ("--prompt-file", "Name it.\n", "Describe it in detail.\n"),
])
def test_a_prompt_file_edited_while_the_run_scans_its_data_changes_nothing(data, tmp_path, monkeypatch, flag, first,
                                                                           edited):
    """The file was read again after run.json was written: a user editing it for the next experiment (while this
    run read its data, or connected to the Hub) had this run caption with the new prompts under the old run id."""
    prompt_file = tmp_path / ("prompts.yaml" if flag == "--prompts-file" else "prompt.txt")
    prompt_file.write_text(first)
    plan_work = dataset.plan_work

    def edit_then_plan(*args, **kwargs):  # after open_run (run.json written), before the first caption
        prompt_file.write_text(edited)
        return plan_work(*args, **kwargs)

    asked: set[str] = set()
    generate = dummy_backend.DummyBackend.generate

    def recording(self, keys, batch, should_stop=None, *, retry=False, prompts=None):
        asked.update(prompts or [self.prompt])
        return generate(self, keys, batch, should_stop, retry=retry, prompts=prompts)

    monkeypatch.setattr(dataset, "plan_work", edit_then_plan)
    monkeypatch.setattr(dummy_backend.DummyBackend, "generate", recording)
    ckpt = tmp_path / "ckpt"
    assert main(dummy_args(data, ckpt, flag, str(prompt_file))) == EXIT_OK
    assert asked == {"Name it."}
    recorded = json.loads((ckpt / "run.json").read_text())
    assert recorded.get("prompts", {"short": recorded["prompt"]}) == {"short": "Name it."}
