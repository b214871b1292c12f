"""Caption quality flags: a table of realistic captions, good and bad, each with its exact flags."""
from __future__ import annotations

import json

import pytest

from vlm_caption.quality import FLAGS, JSON_FLAGS, caption_flags, strip_preamble

GOOD_PROSE = (
    "This oil painting shows a young woman in a pale blue dress seated beside a tall window, reading a letter "
    "that she holds close to her face. Soft daylight falls from the left across her shoulders and the folds of "
    "the fabric, leaving the back of the room in warm brown shadow. The style recalls Dutch Golden Age interiors, "
    "especially the quiet domestic scenes of Vermeer, with their careful geometry and calm stillness. The "
    "brushwork is smooth in the face and hands but looser in the curtain, where thick strokes of ochre and "
    "umber suggest heavy velvet. The palette is restrained: cool blues and greys against honeyed yellows and "
    "deep browns. The composition places the figure slightly off centre, balanced by a map on the wall and a "
    "chair in the foreground. The mood is intimate and contemplative. A small signature, \"J. van Loon 1664\", "
    "is visible in the lower right corner, and there is no watermark."
)

GOOD_MARKDOWN = """**Subject:** A lone fox stands at the edge of a snowy birch forest, its head turned toward the viewer.

**Style:** Contemporary illustration with a strong nod to Japanese woodblock prints (ukiyo-e), flat areas of colour and crisp outlines.

**Medium:** Digital painting imitating gouache, with a visible paper grain and dry-brush texture in the snow.

**Palette:** Muted whites and blue-greys, with the fox's burnt orange coat as the single warm accent.

**Composition:** The fox sits on the lower third; vertical birch trunks create a rhythm across the frame.

**Mood:** Quiet, cold and watchful, with soft diffuse light of an overcast winter morning.

**Text:** None visible."""

GOOD_BULLETS = """## Description

- **Subject:** Three dancers in white tutus rehearse at the barre while a teacher watches.
- **Style:** Impressionism, clearly inspired by Edgar Degas and his ballet studies.
- **Medium:** Pastel on toned paper, with the paper colour showing through the strokes.
- **Palette:** Soft pinks, creamy whites, pale greens and touches of coral.
- **Composition:** A diagonal line of dancers leads the eye from the lower left toward a bright window.
- **Mood:** Light, airy and absorbed in work.
- **Text:** A faint signature, "Degas", in the upper left."""

GOOD_NUMBERED = """1. **Subject:** A bowl of lemons and a cracked blue jug on a wooden table.
2. **Style:** Classical still life in the manner of Spanish bodegones.
3. **Medium:** Oil on canvas, glazed in thin layers with crisp highlights on the jug.
4. **Palette:** Lemon yellow, cobalt blue and dark umber.
5. **Composition:** The objects form a low triangle against a nearly black background.
6. **Mood:** Still, sober and precise.
7. **Text:** None."""

GOOD_WITH_THE_OF_AND = (
    "The image is a watercolour of the harbour of a small fishing town at the end of the day. The boats of the "
    "fishermen rest at the edge of the water, and the roofs of the houses and the tower of the church rise "
    "behind them. The light of the setting sun spreads over the surface of the sea and the sails of the boats. "
    "The washes are loose and wet, and the colours of the sky and the water bleed into each other."
)

GOOD_WITH_CANNOT = (
    "A charcoal drawing of a hooded figure walking through a dark forest. The face of the figure cannot be "
    "identified because it is hidden in shadow, and the trees dissolve into smudged grey marks. I cannot help "
    "noticing the strong contrast between the white path and the black trunks, which gives the scene tension."
)

GOOD_QUOTED_SHORT_REPEATS = (
    'A protest poster in bold red and black, in the style of Soviet constructivism. The slogan reads "NO WAR '
    'NO WAR NO WAR" in heavy sans-serif capitals across a diagonal band, and a cartoon character below shouts '
    '"hahaha!" in a speech bubble. The printing looks like two-colour screen print on cheap newsprint.'
)

GOOD_HERE_CONTENT = (
    "Here, a woman stands on a cliff above a stormy sea, her red shawl whipped by the wind. The painting is "
    "a Romantic oil on canvas with dramatic chiaroscuro and heavy impasto in the waves."
)

GOOD_MARKDOWN_RULE_TABLE = """## Overview

A flat vector poster of a mountain lake at sunrise.

---

| Aspect | Notes |
|---|---|
| Style | Minimalist travel poster, mid-century modern |
| Palette | Peach, teal, cream and navy |
| Text | "LAKE LOUISE" in large capitals at the bottom |"""

LOOP_TAIL = (
    "A landscape painting of rolling hills under a cloudy sky. The sky is blue. The sky is blue. The sky is "
    "blue. The sky is blue. The sky is blue. The sky is blue. The sky is blue. The sky is"
)

PREAMBLE_PROSE = "Here is a detailed description of this artwork:\n\n" + GOOD_PROSE
PREAMBLE_MARKDOWN = "Here's a detailed description of the artwork:\n\n" + GOOD_MARKDOWN

CASES = [
    # --- good captions: no flag -----------------------------------------------------------------------
    ("good prose ~150 words", GOOD_PROSE, "stop", []),
    ("good prose cut right after a sentence", GOOD_PROSE, "length", []),
    ("good markdown bold headers", GOOD_MARKDOWN, "stop", []),
    ("good bullet list with heading", GOOD_BULLETS, "stop", []),
    ("good numbered list", GOOD_NUMBERED, "stop", []),
    ("good prose full of the/of/and", GOOD_WITH_THE_OF_AND, "stop", []),
    ("'cannot' later in a good description", GOOD_WITH_CANNOT, "stop", []),
    ("quoted short repeats", GOOD_QUOTED_SHORT_REPEATS, "stop", []),
    ("'Here,' is content", GOOD_HERE_CONTENT, "stop", []),
    ("markdown rule and table", GOOD_MARKDOWN_RULE_TABLE, "stop", []),
    ("short good caption", "A pencil sketch of a sleeping cat curled on a cushion.", "stop", []),
    ("ends with a closing quote", 'A neon sign in the window reads "Open all night."', "length", []),
    ("ends with bold after the full stop", "**Mood:** Calm and reflective.**", "length", []),
    ("ends with a bracket after the full stop", "A linocut of a hare (printed in two colours.)", "length", []),
    ("great wave is not an interjection",
     "Great Wave off Kanagawa pastiche: a towering blue wave curls over three small boats, with Mount Fuji "
     "tiny in the distance, rendered as a digital woodblock print.", "stop", []),
    ("very very is fine", "A very very small figure stands under an enormous orange moon, drawn in ink.", "stop", []),
    ("as an AI-generated image is description",
     "As an AI-generated image, this artwork shows a surreal city floating above clouds in a glossy 3D render "
     "style with pastel colours.", "stop", []),
    ("not a refusal when the model opens with description",
     "A watercolour of a lighthouse. The artist is unknown and I can tell little about the date, but the "
     "loose washes suggest the early twentieth century.", "stop", []),
    ("no signature or text to see (the default prompt asks for them)",
     "A watercolour of a harbour at dusk. I cannot see any signature or text in the image.", "stop", []),
    ("a JSON text field's answer", "I can't see any visible text.", "stop", []),
    ("cannot see the image", "I cannot see the image you attached.", "stop", ["refusal"]),
    ("cannot see any image", "I can't see any image in your message.", "stop", ["refusal"]),
    ("cannot see an attached image", "I can't see any attached image. Please upload it again.", "stop", ["refusal"]),
    ("cannot see an uploaded photo", "I cannot see an uploaded photograph here.", "stop", ["refusal"]),
    ("no visible signature", "A pastel of a dancer. I cannot see a visible signature.", "stop", []),
    ("a signature with digits", "An etching of a cathedral facade, signed and dated 'R. M. 1921' lower left.",
     "stop", []),
    ("a whole sentence in japanese, hindi, arabic at the token limit",
     "静かな田園風景。「春」。 यह एक शांत दृश्य है। هل هذه لوحة؟", "length", []),
    ("cyrillic and japanese letters are text",
     "Плакат в стиле конструктивизма с надписью «Вперёд». 右下に「春」という文字がある。", "stop", []),

    # --- empty --------------------------------------------------------------------------------------------
    ("empty string", "", "stop", ["empty"]),
    ("whitespace only", "  \n\t \n", "stop", ["empty"]),
    ("punctuation only", " ... ** -- ", "stop", ["empty"]),
    ("only a preamble", "Here's a detailed description of the artwork:\n\n", "length", ["empty", "preamble"]),

    # --- repetition -------------------------------------------------------------------------------------
    ("sentence loop to the token limit", LOOP_TAIL, "length", ["repetition", "truncated"]),
    ("sentence loop that ended", "A portrait of an old man. " + "He has a long white beard. " * 3, "stop",
     ["repetition"]),
    ("same sentence thrice, not in a row",
     "The bridge crosses a green river. Ducks swim below. The bridge crosses a green river. Trees lean over it. "
     "The bridge crosses a green river.", "stop", ["repetition"]),
    ("word repeated many times", "The painting shows a very " + "very " * 12 + "large red apple.", "stop",
     ["repetition"]),
    ("phrase loop without full stops",
     "An abstract composition of circles and lines, " + "bright colours and bold shapes, " * 6, "length",
     ["repetition", "truncated"]),
    ("character loop without spaces", "A cartoon cat laughing: " + "ha" * 30, "length", ["repetition", "truncated"]),
    ("exclamation marks run", GOOD_WITH_THE_OF_AND[:150] + "!" * 12, "stop", ["repetition"]),
    ("exclamation marks only", "!" * 200, "length", ["empty"]),
    ("exclamation marks outnumber the words", "What a wonderful painting" + "!" * 40, "stop",
     ["repetition", "garbled"]),
    ("markdown list loop",
     "**Subject:** A vase of flowers.\n" + "- **Palette:** Red, orange and yellow.\n" * 4, "stop", ["repetition"]),

    # --- truncated --------------------------------------------------------------------------------------
    ("cut mid-sentence", GOOD_PROSE[:430], "length", ["truncated"]),
    ("cut after a bullet without full stop",
     "- **Subject:** A red barn in a snowy field\n- **Style:** Folk art, naive painting", "length", ["truncated"]),
    ("cut after a heading", GOOD_MARKDOWN[:200] + "\n\n**Palette:**", "length", ["truncated"]),
    ("no full stop but the model ended", "A small ink drawing of a heron standing in reeds", "stop", []),

    # --- preamble ---------------------------------------------------------------------------------------
    ("here is ... this artwork:", PREAMBLE_PROSE, "stop", ["preamble"]),
    ("here's ... the artwork: markdown", PREAMBLE_MARKDOWN, "stop", ["preamble"]),
    ("sure! here's", "Sure! Here's a description of the image:\n" + GOOD_PROSE, "stop", ["preamble"]),
    ("okay, here's ... focusing on",
     "Okay, here's a detailed description of the artwork, focusing on the elements you requested:\n\n"
     + GOOD_BULLETS, "stop", ["preamble"]),
    ("certainly. this artwork ...:",
     "Certainly. This artwork has a lot going on, so let me go through it:\n" + GOOD_NUMBERED, "stop",
     ["preamble"]),
    ("okay, let's break down", "Okay, let's break down this artwork.\n\n" + GOOD_MARKDOWN, "stop", ["preamble"]),
    ("same-line preamble", "Here is a description of the painting: " + GOOD_PROSE, "stop", ["preamble"]),
    ("preamble and a cut", "Here's a detailed description of the artwork:\n\n" + GOOD_PROSE[:300], "length",
     ["truncated", "preamble"]),

    # --- refusal ----------------------------------------------------------------------------------------
    ("unable", "I'm unable to describe this image because it may contain sensitive content.", "stop", ["refusal"]),
    ("cannot", "I cannot provide a description of this image.", "stop", ["refusal"]),
    ("can't help", "I can’t help with identifying people in images.", "stop", ["refusal"]),
    ("sorry, but", "I'm sorry, but I can't assist with that request.", "stop", ["refusal"]),
    ("as an ai", "As an AI language model, I do not have the ability to see images.", "stop", ["refusal"]),
    ("refusal in the second sentence",
     "This image appears to contain explicit material. I'm unable to describe it in detail.", "stop", ["refusal"]),
    ("refusal after a preamble", "Sure!\nI'm sorry, but I cannot describe this artwork.", "stop",
     ["preamble", "refusal"]),

    # --- garbled ----------------------------------------------------------------------------------------
    ("replacement characters", "A painting of a \ufffd\ufffd garden with roses and a stone bench.", "stop",
     ["garbled"]),
    ("leftover chat markup", GOOD_PROSE + "<end_of_turn>\n<start_of_turn>model\n", "stop", ["garbled"]),
    ("image tokens", "<image_soft_token><image_soft_token> A landscape with hills.", "stop", ["garbled"]),
    ("mostly symbols", "{{ }} [[ ]] 0x3F 0x2A 9384 ### %% $$ @@ 1029 3847 ~~ ^^ | | 12.34 => <= :: ;;", "stop",
     ["garbled"]),
    ("eos in the text", "A bronze sculpture of a horse.<eos>", "stop", ["garbled"]),
    ("control characters", "A harbour at dusk with \x1b[31m boats and\x00 gulls over the water.", "stop", ["garbled"]),
    ("tabs and line breaks are prose", "A harbour at dusk.\r\n\tBoats rest on the calm water.", "stop", []),
]


@pytest.mark.parametrize("text, finish, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_caption_flags(text, finish, expected):
    assert caption_flags(text, finish) == expected


def test_table_is_big_and_covers_every_detector():
    assert len(CASES) >= 40
    flagged = {flag for case in CASES for flag in case[3]}
    assert flagged == set(FLAGS) - set(JSON_FLAGS)  # those are set by rows.judge


def test_flags_come_in_flags_order():
    flags = caption_flags("Here is a description of the artwork:\n" + LOOP_TAIL + "<eos>", "length")
    assert flags == ["repetition", "truncated", "preamble", "garbled"]
    assert flags == [f for f in FLAGS if f in flags]


# ------------------------------------------------------------------------------------------ strip_preamble

STRIPPED = [
    ("Here is a detailed description of this artwork:\n\nThe painting shows a dog.", "The painting shows a dog."),
    ("Here's a detailed description of the artwork:\n**Subject:** A dog.", "**Subject:** A dog."),
    ("Here’s a description of the image: A dog asleep on a rug.", "A dog asleep on a rug."),
    ("Sure! Here's what I see:\n- A dog.", "- A dog."),
    ("Okay, here's a description of the artwork, broken down into sections:\n\n## Subject\nA dog.",
     "## Subject\nA dog."),
    ("Certainly. This artwork is rich in detail:\nA dog sits under a tree.", "A dog sits under a tree."),
    ("Sure!\n\nA dog sits under a tree.", "A dog sits under a tree."),
    ("Let me describe this painting:\nA dog sits under a tree.", "A dog sits under a tree."),
    ("Okay, let's break down this artwork.\n\nA dog sits under a tree.", "A dog sits under a tree."),
    ("Below is a detailed analysis of the image.\nA dog sits under a tree.", "A dog sits under a tree."),
]

KEPT = [
    "Here, a woman stands on a cliff above a stormy sea.",
    "Here is a woman holding three things: a cup, a book and a candle.",
    "Here lies a knight, carved in marble on his tomb.",
    "Here's a woman in a red dress.\nShe sits by a window.",
    "Okay, this painting is a striking example of Fauvism.\nIts colours are wild.",
    "Great Wave pastiche: a huge blue wave.",
    "A dog sits under a tree. Here is a description of the tree: it is an oak.",
    "The title reads: Sure! Here's the thing.",
    "Here's a detailed description of the artwork",  # no colon, no line break: nothing marks its end
]


@pytest.mark.parametrize("text, expected", STRIPPED)
def test_strip_preamble_removes_lead_in(text, expected):
    assert strip_preamble(text) == (expected, True)
    assert "preamble" in caption_flags(text, "stop")


@pytest.mark.parametrize("text", KEPT)
def test_strip_preamble_keeps_content(text):
    assert strip_preamble(text) == (text, False)
    assert "preamble" not in caption_flags(text, "stop")


def test_strip_preamble_is_deterministic_and_single_pass():
    text = "Here is a detailed description of this artwork:\n\n" + GOOD_PROSE
    assert strip_preamble(text) == strip_preamble(text) == (GOOD_PROSE, True)
    assert strip_preamble(GOOD_PROSE) == (GOOD_PROSE, False)


def test_json_cut_at_max_tokens_is_not_generated_again():
    """A second try at the same --max-tokens is cut the same way: it only doubled the cost."""
    from vlm_caption.backends import Caption
    from vlm_caption.prompt_plan import PromptSpec
    from vlm_caption.rows import judge, wants_retry

    spec = PromptSpec.make(None, "Describe.", ("subject", "style"))
    cut = Caption(text='{"subject": "a cat on a', finish="length", tokens=8)
    assert judge(cut, spec)[1] == ["truncated", "invalid_json"] and not wants_retry(cut, spec)
    assert wants_retry(Caption(text="no json here at all.", finish="stop", tokens=5), spec)


def test_json_fields_that_answer_alike_are_no_loop_but_a_loop_within_a_field_is():
    """The fields were joined into one text: the same answer in three fields read as a sentence said thrice, and its
    retry (no repeated 4-grams) could not answer alike again."""
    from vlm_caption.backends import Caption
    from vlm_caption.prompt_plan import PromptSpec
    from vlm_caption.rows import judge, wants_retry

    spec = PromptSpec.make(None, "Describe.", ("text", "signature", "watermark"))
    alike = Caption(json.dumps(dict.fromkeys(spec.json_fields, "None visible in the image.")), "stop", 30)
    assert judge(alike, spec)[1] == [] and not wants_retry(alike, spec)
    looped = Caption(json.dumps({"text": "la " * 12, "signature": "", "watermark": ""}), "stop", 30)
    assert judge(looped, spec)[1] == ["repetition"] and wants_retry(looped, spec)


@pytest.mark.parametrize("last", ["cubist", "cubist."])
@pytest.mark.parametrize("after", ["\n```", "\nThis artwork shows a cat sitting on"])
def test_a_whole_json_object_is_not_truncated_when_what_came_after_it_was_cut(last, after):
    """The object closed, so no field was cut: `truncated` followed whether the last field's value happened to end
    with a full stop (its fields were judged as prose with the raw caption's finish)."""
    from vlm_caption.backends import Caption
    from vlm_caption.prompt_plan import PromptSpec
    from vlm_caption.rows import caption_values

    spec = PromptSpec.make(None, "Describe.", ("subject", "style"))
    text = f'```json\n{{"subject": "a cat", "style": "{last}"}}' + after
    values = caption_values(Caption(text=text, finish="length", tokens=40), spec=spec)
    assert values["caption_flags"] == [] and values["caption_style"] == last
    assert values["caption_finish"] == "length"  # the row still says where generation ended


@pytest.mark.parametrize("text, flags", [
    ('{"subject": "a cat", "style": "cubist"}', ["missing_fields"]),  # key "text" absent
    ('{"Subject": "a cat"}', ["missing_fields"]),
    ('{"subject": "a cat", "style": "cubist", "text": ""}', []),  # "": what the instruction asks when none applies
    ('{"subject": "a cat", "style": null, "text": ""}', []),  # null says the same
    ('{"subject": "a cat", "style": "cubist", "text": "", "extra": "x"}', []),
    ('{"title": "a cat"}', ["invalid_json"]),  # none of the fields: invalid, not missing
])
def test_json_lacking_some_of_the_fields_is_flagged_missing_fields(text, flags):
    from vlm_caption.backends import Caption
    from vlm_caption.prompt_plan import PromptSpec
    from vlm_caption.rows import judge, wants_retry

    spec = PromptSpec.make(None, "Describe.", ("subject", "style", "text"))
    cap = Caption(text=text, finish="stop", tokens=8)
    _text, got, fields = judge(cap, spec)
    assert got == flags
    assert (fields["subject"] == "a cat") == (flags != ["invalid_json"])
    assert wants_retry(cap, spec) == (flags == ["invalid_json"])  # a partial answer is kept, not redone


def test_missing_fields_comes_right_after_invalid_json():
    assert FLAGS.index("missing_fields") == FLAGS.index("invalid_json") + 1 == len(FLAGS) - 1


def test_json_fields_all_answered_empty_are_flagged_but_not_generated_again():
    """The instruction asks for "" where a field does not apply: `--json-fields text` on a picture without text
    answers {"text": ""} in form, and a second generation of every such row was only a cost."""
    from vlm_caption.backends import Caption
    from vlm_caption.prompt_plan import PromptSpec
    from vlm_caption.rows import judge, wants_retry

    spec = PromptSpec.make(None, "Describe.", ("text", "signature"))
    answered = Caption(json.dumps({"text": "", "signature": ""}), "stop", 12)
    assert judge(answered, spec)[1] == ["empty"] and not wants_retry(answered, spec)
    lacking = Caption(json.dumps({"text": ""}), "stop", 6)  # a key absent: not an answer in form
    assert "empty" in judge(lacking, spec)[1] and wants_retry(lacking, spec)
    assert wants_retry(Caption("", "stop", 1), spec)  # no JSON at all
