"""A deterministic engine with no model: a caption made from the key and the image's statistics, at once.

For pipeline tests (selection, parts, resume, merge, Hub, crash loops), loader benchmarks and demos of
everything but the model: the same key and image always give the same caption, whatever the batch.

Test faults: with the environment variable VLM_CAPTION_DUMMY_FAULTS=1 (read when the backend is made; tests
only), a key's last digit picks a broken caption, so quality flags show up deterministically:
    1  a generation loop (flag `repetition`)      2  a chatty lead-in (flag `preamble`)
    3  no text at all (flag `empty`)               4  a generation loop, on the retry too
    other digits: the normal caption. These ignore --max-tokens (finish "stop"). generate(retry=True)
    gives the normal caption, except for digit 4.
A prompt asking for JSON (prompts.json_instruction) gets one JSON object with the fields it names, always;
with the test faults, keys ending in 5 get invalid JSON on the first try (valid on the retry), and the
digits above do not apply.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Sequence

from .backends import AUTO_BATCH_CPU, Caption

_WORDS = ("a", "quiet", "study", "in", "colour", "and", "light", "with", "soft", "edges", "under", "an", "open",
          "sky", "painted", "loosely")
FAULTS_ENV = "VLM_CAPTION_DUMMY_FAULTS"
_JSON_ASKED = "Answer with exactly one JSON object"  # prompts.json_instruction
_JSON_FIELD_RE = re.compile(r'"([a-z][a-z0-9_]*)": "\.\.\."')
PREAMBLE = "Here is a detailed description of the image:\n"


class DummyBackend:
    target_size = 224  # small: the loader's draft decode makes big JPEGs cheap
    retry_rows = 1  # a call costs what its rows do: each batch's flagged captions are retried right after it

    def __init__(self, *, model_name: str, prompt: str, max_tokens: int, min_tokens: int = 0,
                 default_batch_size: int = AUTO_BATCH_CPU):
        self.model_name, self.prompt = model_name, prompt
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.default_batch_size = default_batch_size
        self.faults = os.environ.get(FAULTS_ENV) == "1"  # see the module docstring

    def prepare(self, image) -> dict[str, Any]:
        from PIL import ImageStat

        r, g, b = (int(v) for v in ImageStat.Stat(image.resize((4, 4))).mean[:3])
        return {"size": image.size, "colour": f"#{r:02x}{g:02x}{b:02x}"}

    def assemble(self, inputs: list[Any], prompts: Sequence[str] | None = None) -> list[Any]:
        return list(inputs)

    def generate(self, keys: Sequence[str], batch: list[Any], should_stop: Callable[[], bool] | None = None, *,
                 retry: bool = False, prompts: Sequence[str] | None = None) -> list[Caption]:
        prompts = list(prompts) if prompts is not None else [self.prompt] * len(keys)
        return [self._json(key, stats, p, retry) if _JSON_ASKED in p else
                self._fault(key, stats, retry) or self._caption(key, stats)
                for key, stats, p in zip(keys, batch, prompts)]

    def _json(self, key: str, stats: dict[str, Any], prompt: str, retry: bool) -> Caption:
        seed = sum(key.encode())
        fields = _JSON_FIELD_RE.findall(prompt.split(_JSON_ASKED, 1)[1])
        word = [_WORDS[(seed + i) % len(_WORDS)] for i in range(len(fields) + 3)]
        answer = {f: f"{word[i]} {word[i + 1]} {f}, {word[i + 2]} {word[i + 3]} light in image {key}"
                  for i, f in enumerate(fields)}
        text = json.dumps(answer)
        if self.faults and key.endswith("5") and not retry:
            text = text[: len(text) // 2]  # cut mid-object: unbalanced braces
        return Caption(text, "stop", len(text.split()))

    def _words(self, key: str, stats: dict[str, Any]) -> list[str]:
        w, h = stats["size"]
        seed = sum(key.encode())
        words = [f"Image {key},", f"{w}x{h},", f"mean colour {stats['colour']}:"]
        words += [_WORDS[(seed + i) % len(_WORDS)] for i in range(max(self.min_tokens, 8))]
        words[-1] += "."
        return words

    def _caption(self, key: str, stats: dict[str, Any]) -> Caption:
        words = self._words(key, stats)
        if len(words) > self.max_tokens:
            return Caption(" ".join(words[:self.max_tokens]), "length", self.max_tokens)
        return Caption(" ".join(words), "stop", len(words))

    def _fault(self, key: str, stats: dict[str, Any], retry: bool) -> Caption | None:
        """The test fault of `key` (module docstring), or None: then the normal caption."""
        digit = key[-1:] if self.faults else ""
        if digit not in ("1", "2", "3", "4"):
            return None
        words = self._words(key, stats)
        if digit == "4" or (digit == "1" and not retry):
            if retry:
                words = words + ["again"]  # another loop: the first stays (ties keep the first)
            loop = words + ["painted", "loosely"] * 6
            return Caption(" ".join(loop), "stop", len(loop))
        if retry:
            return None
        if digit == "2":
            return Caption(PREAMBLE + " ".join(words), "stop", len(words) + 8)
        if digit == "3":
            return Caption("", "stop", 0)
        return None

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)

    def free_memory(self) -> None:
        pass
