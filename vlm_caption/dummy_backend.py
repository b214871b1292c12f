"""A deterministic engine with no model: a caption made from the key and the image's statistics, at once.

For pipeline tests (selection, parts, resume, merge, Hub, crash loops), loader benchmarks and demos of
everything but the model: the same key and image always give the same caption, whatever the batch.

Test faults: with the environment variable VLM_CAPTION_DUMMY_FAULTS=1 (read when the backend is made; tests
only), a key's last digit picks a broken caption, so quality flags show up deterministically:
    1  a generation loop (flag `repetition`)      2  a chatty lead-in (flag `preamble`)
    3  no text at all (flag `empty`)               4  a generation loop, on the retry too
    other digits: the normal caption. These ignore --max-tokens (finish "stop"). generate(retry=True)
    gives the normal caption, except for digit 4.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from .backends import Caption

_WORDS = ("a", "quiet", "study", "in", "colour", "and", "light", "with", "soft", "edges", "under", "an", "open",
          "sky", "painted", "loosely")
FAULTS_ENV = "VLM_CAPTION_DUMMY_FAULTS"
PREAMBLE = "Here is a detailed description of the image:\n"


class DummyBackend:
    target_size = 224  # small: the loader's draft decode makes big JPEGs cheap

    def __init__(self, *, model_name: str, prompt: str, max_tokens: int, min_tokens: int = 0,
                 default_batch_size: int = 32):
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
        return [self._caption(key, stats, retry) for key, stats in zip(keys, batch)]

    def _caption(self, key: str, stats: dict[str, Any], retry: bool = False) -> Caption:
        w, h = stats["size"]
        seed = sum(key.encode())
        words = [f"Image {key},", f"{w}x{h},", f"mean colour {stats['colour']}:"]
        words += [_WORDS[(seed + i) % len(_WORDS)] for i in range(max(self.min_tokens, 8))]
        words[-1] += "."
        fault = self._fault(key, words, retry)
        if fault is not None:
            return fault
        if len(words) > self.max_tokens:
            return Caption(" ".join(words[:self.max_tokens]), "length", self.max_tokens)
        return Caption(" ".join(words), "stop", len(words))

    def _fault(self, key: str, words: list[str], retry: bool) -> Caption | None:
        digit = key[-1:] if self.faults else ""
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
