"""--decode-loop graph (vlm_caption/decode_loop.py) on the tiny Gemma 3 (CPU): generate's prefill, then one
compiled step per token. Greedy tokens must be generate's, in every shape a run meets."""
from __future__ import annotations

import json

import pytest
import torch

from test_captioning import all_keys, caption_args, full_run, read_table  # noqa: F401  (full_run: a fixture)
from test_static_decode import CAPTURED, captioner, counting_backend, images, model_and_processor  # noqa: F401
from vlm_caption import store
from vlm_caption.captioner import Captioner
from vlm_caption.decode_loop import choose_decode_loop


def graph_captioner(model, processor, **kw) -> Captioner:
    return captioner(model, processor, compile="on", compile_options={"backend": counting_backend},
                     decode_loop="graph", **kw)


def token_ids(cap: Captioner, images, prompts=None, **kw) -> list[list[int]]:
    """Generated ids per row, as `_finish` sees them (pads after a stop included)."""
    rows: list[list[int]] = []
    real = cap._finish
    cap._finish = lambda tokens: rows.append(tokens.tolist()) or real(tokens)
    try:
        list(cap.generate([f"k{i}" for i in range(len(images))], [cap.prepare(im) for im in images],
                          prompts=prompts, **kw))
    finally:
        cap._finish = real
    return rows


def use_stop_ids(cap: Captioner, ids: list[int]) -> None:
    cap.stop_ids = ids
    cap.gen_config.eos_token_id = ids
    if cap.graph_decode is not None:
        cap.graph_decode.stop_ids = torch.tensor(ids)


def test_graph_loop_gives_generates_tokens_in_one_graph(model_and_processor, images):
    from torch._dynamo.utils import counters

    model, processor = model_and_processor
    reference = captioner(model, processor)
    want = [token_ids(reference, images), token_ids(reference, images[:3])]
    counters.clear()
    CAPTURED.clear()
    cap = graph_captioner(model, processor)
    assert cap.graph_decode is not None
    assert [token_ids(cap, images), token_ids(cap, images[:3])] == want  # 6 rows, then 3 padded to 4
    # One graph per batch shape for the 11 steps of each call; no break, nothing new on the same shapes.
    assert len(CAPTURED) == 2 and sum(counters["graph_break"].values()) == 0
    assert [token_ids(cap, images), token_ids(cap, images[:3])] == want and len(CAPTURED) == 2


def test_graph_loop_stops_like_generate(model_and_processor, images):
    """Rows stop at different steps: the same tokens, pads after each stop, and the output ends when the
    last row stops (not at max tokens), as generate's; min tokens holds the stop ids back."""
    model, processor = model_and_processor
    free = token_ids(captioner(model, processor, max_tokens=16, min_tokens=0), images)
    stop = sorted({row[5] for row in free[:3]} | {row[9] for row in free[3:]})  # common enough to end rows
    for min_tokens in (0, 7):
        reference = captioner(model, processor, max_tokens=16, min_tokens=min_tokens)
        cap = graph_captioner(model, processor, max_tokens=16, min_tokens=min_tokens)
        use_stop_ids(reference, stop)
        use_stop_ids(cap, stop)
        want = token_ids(reference, images)
        assert any(set(stop) & set(row) for row in want), "no row stopped: the test would see nothing"
        assert token_ids(cap, images) == want
        if min_tokens:
            assert all(not set(stop) & set(row[:min_tokens]) for row in want)


def test_graph_loop_with_left_padded_templated_prompts(model_and_processor, images):
    model, processor = model_and_processor
    prompts = ["Describe.", "Describe this artwork in great detail, with its colours.", "Name it."]
    want = token_ids(captioner(model, processor), images[:3], prompts=prompts)
    assert token_ids(graph_captioner(model, processor), images[:3], prompts=prompts) == want


def test_retry_sampling_and_a_stop_request_keep_their_paths(model_and_processor, images):
    model, processor = model_and_processor
    cap = graph_captioner(model, processor)
    # The retry's repetition penalty and n-gram ban are generate's logits processors.
    assert token_ids(cap, images[:2], retry=True) == token_ids(captioner(model, processor), images[:2], retry=True)
    assert graph_captioner(model, processor, temperature=0.7).graph_decode is None
    assert captioner(model, processor, decode_loop="graph").graph_decode is None  # no static cache: generate
    calls = []
    stopped = token_ids(cap, images[:2], should_stop=lambda: calls.append(1) or len(calls) > 4)
    assert all(len(row) < 12 for row in stopped)
    with pytest.raises(ValueError, match="decode_loop"):
        captioner(model, processor, decode_loop="fast")


def test_graph_loop_under_inductor(model_and_processor, images):
    """The compiler the GPU uses (here inductor's CPU backend, no CUDA graphs): the same tokens."""
    model, processor = model_and_processor
    want = token_ids(captioner(model, processor, max_tokens=6, min_tokens=6), images[:4])
    cap = captioner(model, processor, max_tokens=6, min_tokens=6, compile="on", decode_loop="graph")
    assert token_ids(cap, images[:4]) == want


def test_cli_graph_loop_captions_like_the_default_run(full_run, tiny_model_dir, sample_data_dir, tmp_path):
    """batched_image_inference.py --compile on --decode-loop graph (inductor on the CPU, the vision tower
    compiled too): the same captions as the default run of the same data, every key once."""
    from batched_image_inference import main

    code, default_ckpt = full_run
    ckpt = tmp_path / "graph"
    assert main(caption_args(tiny_model_dir, sample_data_dir, ckpt, "--compile", "on", "--decode-loop", "graph")) \
        == code
    got = read_table(ckpt / store.MERGED).set_index("key")
    want = read_table(default_ckpt / store.MERGED).set_index("key")
    assert sorted(got.index) == sorted(want.index) and len(all_keys(ckpt)) == len(got)
    assert got.loc[want.index, "vlm_caption"].tolist() == want["vlm_caption"].tolist()
    assert got.loc[want.index, "caption_tokens"].tolist() == want["caption_tokens"].tolist()
    decoding = json.loads((ckpt / store.SUMMARY).read_text())["this_run"]["decoding"]
    assert decoding["loop"] == "graph" and decoding["vision_tower"] == "compiled"


def test_auto_picks_the_graph_loop_only_where_it_was_measured_faster(model_and_processor, monkeypatch):
    """--decode-loop auto (the default): the graph loop on CUDA with the compiled static cache (1.08x on an
    H100, BENCHMARKS.md §6 run 3), transformers' generate on the CPU, without a static cache, when sampling,
    or with the model spread over devices."""
    model, processor = model_and_processor
    cap = captioner(model, processor, compile="on", compile_options={"backend": counting_backend})
    assert cap.static_decode is not None and cap.graph_decode is None  # CPU: generate
    cap.device = torch.device("cuda")  # as if the model were on a card: only the choice is asked, nothing runs
    assert choose_decode_loop(cap, "auto", {})[0] is not None
    cap.temperature = 0.7
    assert choose_decode_loop(cap, "auto", {})[0] is None
    dynamic = captioner(model, processor)
    dynamic.device = torch.device("cuda")
    assert dynamic.static_decode is None and choose_decode_loop(dynamic, "auto", {})[0] is None
    cap.temperature = 0.0  # --device-map auto spreading the model (some layers offloaded): no graph loop
    monkeypatch.setattr(model, "hf_device_map", {"vision_tower": 0, "language_model": "cpu"}, raising=False)
    assert choose_decode_loop(cap, "auto", {})[0] is None and choose_decode_loop(cap, "graph", {})[0] is None


def test_captions_wait_for_the_copy_of_their_tokens_before_the_first_read():
    """On CUDA the ids come back by a non-blocking copy into pinned memory: reading before its event is done
    would read the block's old contents. The event is waited for once, before the first caption is made."""
    from vlm_caption.captioner import Caption
    from vlm_caption.decode_loop import DecodeLater

    order: list[str] = []

    class Copied:  # stands in for the torch.cuda.Event recorded after the copy
        def synchronize(self):
            order.append("synchronize")

    def finish(row: torch.Tensor) -> Caption:
        order.append("read")
        return Caption(text=str(row.tolist()), finish="stop", tokens=row.numel())

    later = DecodeLater(torch.tensor([[1, 2], [3, 4]]), finish, Copied())
    assert len(later) == 2 and order == []  # nothing read, nothing waited for yet
    assert [c.text for c in later] == ["[1, 2]", "[3, 4]"]
    assert order == ["synchronize", "read", "read"]
