"""The random Gemma 3 built offline: reload through the Auto classes, chat template, determinism, CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_caption.tiny_model import PRESETS, SPECIAL_TOKENS, build_random_model, build_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_SIZES = {"gemma-3-4b": 4.30e9, "gemma-3-12b": 12.19e9, "gemma-3-27b": 27.43e9}  # published sizes


def _image(color=(200, 30, 30), size=(100, 80)) -> Image.Image:
    return Image.new("RGB", size, color)


def _messages(image=None, text="Describe") -> list[dict]:
    image_item = {"type": "image", "image": image} if image is not None else {"type": "image"}
    return [{"role": "user", "content": [image_item, {"type": "text", "text": text}]}]


def _greedy(model, inputs, max_new_tokens=8) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[-1]:]


def _load(model_dir):
    return AutoProcessor.from_pretrained(model_dir), AutoModelForImageTextToText.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reloaded(tiny_model_dir):
    return _load(tiny_model_dir)


def test_build_is_small(tmp_path):
    out = build_tiny_model(tmp_path / "model")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 20e6, f"{size / 1e6:.1f} MB on disk"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_reloads_offline_like_a_hub_model(reloaded):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    processor, model = reloaded
    tokenizer = processor.tokenizer
    assert type(processor).__name__ == "Gemma3Processor"
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert model.config.image_token_id == tokenizer.image_token_id
    assert model.config.boi_token_id == tokenizer.boi_token_id
    assert processor.image_seq_length == model.config.mm_tokens_per_image
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id,
                                                    tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_chat_template_then_generate_and_decode(reloaded):
    processor, model = reloaded
    inputs = processor.apply_chat_template(_messages(_image()), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(processor.tokenizer.image_token_id) == model.config.mm_tokens_per_image
    assert ids.count(processor.tokenizer.bos_token_id) == 1
    new_tokens = _greedy(model, inputs)
    assert 1 <= new_tokens.shape[1] <= 8
    captions = processor.batch_decode(new_tokens, skip_special_tokens=True)
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_chat_template_turn_structure(reloaded):
    processor, _ = reloaded
    messages = [
        {"role": "system", "content": "You are an art critic."},
        *_messages(text="  Describe  "),
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "text", "text": "More?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<bos><start_of_turn>user\nYou are an art critic.\n\n<start_of_image>Describe<end_of_turn>\n"
        "<start_of_turn>model\nA red square.<end_of_turn>\n"
        "<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\n"
    )
    without_prompt = processor.apply_chat_template(messages, tokenize=False)
    assert without_prompt.endswith("More?<end_of_turn>\n")


def test_two_step_left_padded_batch_matches_one_at_a_time(reloaded):
    processor, model = reloaded
    texts = ["Describe", "Describe the style and the colours of this painting", "Colour?"]
    images = [_image(c) for c in [(200, 30, 30), (10, 200, 30), (0, 0, 250)]]
    prompts = [processor.apply_chat_template(_messages(text=t), add_generation_prompt=True, tokenize=False)
               for t in texts]
    # The prompts already start with <bos>: do not let the tokenizer add a second one.
    batch = processor(text=prompts, images=[[im] for im in images], padding=True, padding_side="left",
                      add_special_tokens=False, return_tensors="pt")
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][0, 0]
    batched = _greedy(model, batch)
    for prompt, image, row in zip(prompts, images, batched):
        single = processor(text=[prompt], images=[[image]], add_special_tokens=False, return_tensors="pt")
        assert _greedy(model, single)[0].tolist() == row.tolist()
    assert all(isinstance(c, str) for c in processor.batch_decode(batched, skip_special_tokens=True))


def test_special_tokens_are_single_ids(reloaded):
    tokenizer = reloaded[0].tokenizer
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids[:3]
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer(f"a {token}b", add_special_tokens=False)["input_ids"].count(token_id) == 1
    encoded = tokenizer("<start_of_turn>model\nA red square<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "model\nA red square"


def test_ids_past_the_vocabulary_decode_without_error(reloaded):
    tokenizer = reloaded[0].tokenizer
    hello = tokenizer("red and blue", add_special_tokens=False)["input_ids"]
    # A real-size checkpoint emits ids up to 262207: `tokenizers` drops ids it does not know.
    texts = tokenizer.batch_decode([hello + [len(tokenizer) + 5, 262_207]], skip_special_tokens=True)
    assert texts == ["red and blue"]


def test_same_seed_same_bytes_and_output_other_seed_other_weights(tiny_model_dir, reloaded, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()

    processor, model = reloaded
    inputs = processor.apply_chat_template(_messages(_image()), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert torch.equal(_greedy(_load(again)[1], inputs), _greedy(model, inputs))


def test_random_small_model_generates_on_cpu_and_keeps_caller_rng():
    rng_before = torch.get_rng_state()
    model, processor = build_random_model("small", device="cpu", dtype=torch.float32, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    assert processor.image_seq_length == PRESETS["small"]["mm_tokens_per_image"] == 64
    inputs = processor.apply_chat_template(_messages(_image(size=(300, 200))), add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[-1] == PRESETS["small"]["vision"]["image_size"]
    new_tokens = _greedy(model, inputs, max_new_tokens=4)
    assert new_tokens.shape[1] >= 1
    assert isinstance(processor.batch_decode(new_tokens, skip_special_tokens=True)[0], str)


@pytest.mark.parametrize("preset", sorted(REAL_SIZES))
def test_real_size_presets_build_on_meta(preset):
    # The meta device allocates nothing: this checks configs, parameter count and processor only.
    model, processor = build_random_model(preset, device="meta")
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - REAL_SIZES[preset]) / REAL_SIZES[preset] < 0.01
    assert model.dtype == torch.bfloat16
    assert processor.image_processor.size.height == 896 and processor.image_seq_length == 256
    # Every id the 262K-vocabulary model can emit decodes to text.
    assert len(processor.tokenizer) == model.config.text_config.vocab_size == 262_208
    assert processor.batch_decode([[262_207, 100_000]], skip_special_tokens=True)[0].strip()


def test_cli_writes_a_model_and_rejects_real_sizes(tmp_path):
    cli = [sys.executable, "-m", "vlm_caption.tiny_model"]
    done = subprocess.run([*cli, "--preset", "tiny", "--out", str(tmp_path / "cli"), "--seed", "3"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "cli") in done.stdout and "MB" in done.stdout
    assert (tmp_path / "cli" / "model.safetensors").is_file()

    refused = subprocess.run([*cli, "--preset", "gemma-3-4b", "--out", str(tmp_path / "big")],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "gemma-3-4b" in refused.stderr
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("case", ["a file", "a data dir"])
def test_cli_refuses_an_out_that_is_no_place_for_a_model_in_one_line(tmp_path, case):
    out = tmp_path / "out"
    if case == "a file":
        out.write_text("mine")  # was a FileExistsError traceback
    else:
        out.mkdir()
        (out / "full_metadata.parquet").write_text("data")  # got config.json, model.safetensors, ... mixed in
    done = subprocess.run([sys.executable, "-m", "vlm_caption.tiny_model", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--out" in done.stderr and not (out.is_dir() and (out / "config.json").exists())
