"""A randomly initialised Gemma 3 (image-text-to-text) built offline, for tests and benchmarks.

`build_tiny_model` saves a small model + processor that reloads with `AutoProcessor` /
`AutoModelForImageTextToText` exactly like `google/gemma-3-4b-it`. `build_random_model` instantiates
any preset (including the real Gemma 3 sizes) in memory on a device, for throughput measurements.

    python -m vlm_caption.tiny_model --preset tiny --out DIR [--seed 0]
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

if TYPE_CHECKING:
    import torch
    from transformers import Gemma3Config, Gemma3Processor, GemmaTokenizer

# torch and transformers are imported where a model is built (~8 s of CPU): the CLI refuses a wrong --out or a
# real-size preset at once.

# Same order as Gemma 3 for the first five; the rest are Gemma 3's chat and image markers.
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *TURN_TOKENS,
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback: any text encodes, nothing is <unk>
TRAINED_VOCAB = 1024  # specials + bytes + learned pieces; larger presets are padded with filler pieces

_CORPUS = """\
Describe the image in one sentence. The painting shows a quiet harbour at dusk in soft blue and grey.
A bold abstract composition with red, yellow and black shapes on a white background.
An impressionist landscape of a field of poppies under a bright summer sky with loose brush strokes.
A minimalist photograph of a concrete stair, strong shadows, high contrast, black and white.
A watercolour portrait of a young woman wearing a green scarf, warm light, gentle pastel tones.
A baroque still life: grapes, a silver cup and a candle on dark velvet, dramatic chiaroscuro.
A cubist guitar made of flat planes in ochre, brown and muted olive, with collage newspaper.
A pop art print of a soup can, repeated in a grid, flat bright colours and thick outlines.
An ink drawing of mountains and mist in the style of a Chinese scroll, sparse and calm.
A digital illustration of a neon city at night, purple and cyan glow, rain on the street.
A romantic seascape with a stormy sky, crashing waves and a small ship, golden highlights.
A surrealist scene with melting clocks on a tree branch in a vast desert, smooth gradients.
A geometric pattern of triangles and circles in orange, teal and cream, art deco style.
A charcoal sketch of a horse in motion, rough texture, expressive lines, smudged edges.
A pointillist park by the river with people, umbrellas and boats, made of tiny dots of colour.
A gothic cathedral window in stained glass, deep red, royal blue and gold, light streaming in.
A ukiyo-e woodblock print of a great wave, indigo and white, fine detail, flat perspective.
A modern poster with bold typography, a single orange circle and lots of empty space.
A soft focus photograph of flowers in a vase, pink and lavender, vintage film grain.
An expressionist portrait with distorted features, thick paint, vivid green and violet.
The style is realistic, abstract, classical, modern, rustic, elegant, playful or dark.
Colours: red, orange, yellow, green, blue, indigo, violet, pink, brown, black, white, grey, gold, silver.
The mood is calm, joyful, tense, melancholic, mysterious, warm, cold, bright, muted or vibrant.
"""

# Chat template with Gemma 3's turn structure: a system message is folded into the first user turn,
# images become <start_of_image> (the processor expands it to the image soft tokens).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='', turns=messages) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set sys = messages[0]['content'] -%}"
    "{%- set ns.prefix = (sys if sys is string else sys | map(attribute='text') | join('\n')) + '\n\n' -%}"
    "{%- set ns.turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in ns.turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ ns.prefix if loop.first else '' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=896, patch_size=14)
_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
_GEMMA3_TEXT = dict(vocab_size=262_208, sliding_window=1024, rope_parameters=_GEMMA3_ROPE)

PRESETS = {
    # Unit tests: 0.19M parameters, 0.8 MB on disk, builds in ~0.15 s; 64 px, 4x4 patches -> 16 image tokens.
    "tiny": dict(text=dict(vocab_size=TRAINED_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=512,
                           layer_types=["sliding_attention", "full_attention"]),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=16),
                 mm_tokens_per_image=16, savable=True),
    # CPU benchmarks: 10.4M parameters, 41.5 MB fp32 on disk; 128 px, 16x16 patches pooled 2x2 -> 64 tokens.
    "small": dict(text=dict(vocab_size=TRAINED_VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=512,
                            layer_types=["sliding_attention"] * 3 + ["full_attention"]),
                  vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=128, patch_size=8),
                  mm_tokens_per_image=64, savable=True),
    # Real sizes (public configs of google/gemma-3-*-it), random weights, never saved: GPU throughput only.
    "gemma-3-4b": dict(text=dict(_GEMMA3_TEXT, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256),
                       vision=_SIGLIP_SO400M, mm_tokens_per_image=256, savable=False),
    "gemma-3-12b": dict(text=dict(_GEMMA3_TEXT, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=256),
                        vision=_SIGLIP_SO400M, mm_tokens_per_image=256, savable=False),
    "gemma-3-27b": dict(text=dict(_GEMMA3_TEXT, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                                  num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                  query_pre_attn_scalar=168),
                        vision=_SIGLIP_SO400M, mm_tokens_per_image=256, savable=False),
}


def _preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = copy.deepcopy(PRESETS[name])  # configs may fill in nested dicts (rope) in place
    # Gemma3MultiModalProjector average-pools the patch grid down to sqrt(mm_tokens) per side.
    per_side = math.isqrt(preset["mm_tokens_per_image"])
    patches = preset["vision"]["image_size"] // preset["vision"]["patch_size"]
    if per_side**2 != preset["mm_tokens_per_image"] or patches % per_side:
        raise ValueError(f"preset {name!r}: mm_tokens_per_image must be a square dividing the patch grid")
    return preset


def _train_pieces() -> tuple[list[str], list[tuple[str, str]]]:
    """Learn BPE pieces on the corpus, with the normalizer/pre-tokenizer GemmaTokenizer rebuilds on reload."""
    trainer_tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer = BpeTrainer(vocab_size=TRAINED_VOCAB, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS, show_progress=False)
    trainer_tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)  # specials and bytes come first, in our order
    return pieces, [tuple(merge) for merge in model["merges"]]


def build_tokenizer(vocab_size: int = TRAINED_VOCAB) -> GemmaTokenizer:
    """The tiny Gemma tokenizer, padded with filler pieces up to `vocab_size` so every id the model can
    emit decodes to text (an id past the vocabulary would be silently dropped by `tokenizers`)."""
    from transformers import GemmaTokenizer

    pieces, merges = _train_pieces()
    if vocab_size < len(pieces):
        raise ValueError(f"vocab_size must be at least {len(pieces)}, got {vocab_size}")
    known = set(pieces)
    fillers = (p for p in (f"▁w{i}" for i in range(vocab_size)) if p not in known)
    pieces += [next(fillers) for _ in range(vocab_size - len(pieces))]
    tokenizer = GemmaTokenizer(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=merges,
        # Like Gemma, plain text gets a leading <bos>; the chat template writes its own <bos> and the
        # processor's apply_chat_template then skips this one.
        add_bos_token=True,
        add_eos_token=False,
        # Gemma3Processor reads boi/eoi/image tokens from the tokenizer by these names.
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    # Turn markers are plain special tokens in Gemma 3 (no named attribute): one id each, dropped by
    # decode(skip_special_tokens=True).
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in TURN_TOKENS])
    return tokenizer


def build_processor(preset: str = "tiny", tokenizer: GemmaTokenizer | None = None) -> Gemma3Processor:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    spec = _preset(preset)
    side = spec["vision"]["image_size"]
    # Settings of gemma-3's preprocessor_config.json; the Pil class saves as "Gemma3ImageProcessor", so
    # AutoProcessor picks the torchvision class where torchvision is installed and this one otherwise.
    image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side}, resample=2, do_rescale=True,
                                              rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3, do_convert_rgb=True)
    tokenizer = tokenizer or build_tokenizer(spec["text"]["vocab_size"])
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                           image_seq_length=spec["mm_tokens_per_image"])


def build_config(preset: str, tokenizer: GemmaTokenizer) -> Gemma3Config:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    spec = _preset(preset)
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(**spec["text"], pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"),
                            bos_token_id=ids("<bos>"))
    vision = SiglipVisionConfig(**spec["vision"], vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=spec["mm_tokens_per_image"],
                        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                        image_token_index=ids("<image_soft_token>"))


def build_random_model(preset: str, device: str | torch.device = "cuda", dtype: torch.dtype | None = None,
                       seed: int = 0):
    """(model, processor) for `preset`, randomly initialised directly on `device` (no CPU copy first); dtype:
    bfloat16 unless given."""
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if dtype is None else dtype
    processor = build_processor(preset, build_tokenizer(_preset(preset)["text"]["vocab_size"]))
    config = build_config(preset, processor.tokenizer)
    device = torch.device(device)
    # Fork the RNG so seeding here leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        # transformers starts the image projection (and its norm) at zero, which makes every image look
        # the same to the language model; a random model must see its images or no test can tell them apart.
        projector = model.model.multi_modal_projector
        with torch.no_grad():
            projector.mm_input_projection_weight.normal_(std=config.vision_config.hidden_size ** -0.5)
            projector.mm_soft_emb_norm.weight.normal_(std=0.5)
    eos = [processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    # Gemma stops at <eos> or <end_of_turn>, like the released generation_config.json.
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    return model.eval(), processor


def build_tiny_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Save a random Gemma 3 (`preset` tiny or small) with its processor in `out_dir`, as a hub model would be."""
    if not _preset(preset)["savable"]:
        raise ValueError(f"preset {preset!r} is real-size: use build_random_model, it is never saved")
    import torch

    out_dir = Path(out_dir)
    model, processor = build_random_model(preset, device="cpu", dtype=torch.float32, seed=seed)
    model.save_pretrained(out_dir)  # safetensors is the only format transformers 5 writes
    processor.save_pretrained(out_dir)
    return out_dir


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    from . import cli
    from .config import check_writable_dir
    from .errors import UsageError

    parser = cli.Parser(prog="python -m vlm_caption.tiny_model",
                        description="Build a random Gemma 3 offline and save it like a hub model.")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--out", metavar="DIR", required=True, help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not PRESETS[args.preset]["savable"]:
        raise UsageError(f"preset {args.preset!r} is real-size and is never saved; use tiny or small")
    out = Path(args.out)
    check_writable_dir(out, "--out")  # a file or an unwritable place: one line, not a traceback
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        # A model dir is rebuilt in place; any other dir (a data dir typed by mistake) would get model files mixed in.
        raise UsageError(f"--out {out} holds files and no model; choose a new directory")
    out = build_tiny_model(out, preset=args.preset, seed=args.seed)
    print(f"{out}\t{_size_on_disk(out) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    from .cli import run_main

    run_main(main, prog="python -m vlm_caption.tiny_model")
