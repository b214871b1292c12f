"""Seeded nucleus sampling for --temperature > 0: a row's caption depends on its key and the seed only."""
from __future__ import annotations

import zlib
from typing import Sequence

import torch


class SeededSampler:
    """Samples each row from its own generator seeded by (seed, key), then hands generate a one-hot score.

    A row's caption then depends only on its key and the seed, not on which batch it landed in, so a
    rerun (or a resume with another batch size) reproduces it. Generate runs greedy on the result.
    """

    def __init__(self, keys: Sequence[str], seed: int, temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(zlib.crc32(f"{seed}:{k}".encode())) for k in keys]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(scores.device, non_blocking=True)
        scores = scores.float()
        # Shifted so the top score is 0 first: a tiny temperature then gives -inf (greedy), not an overflow to
        # +-inf whose softmax is NaN (an empty nucleus: one same token for every row)
        probs = torch.softmax((scores - scores.amax(-1, keepdim=True)) / self.temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < self.top_p  # the nucleus; the top token always stays
        cum = (sorted_p * keep).cumsum(-1)
        pick = torch.searchsorted(cum, (u * cum[:, -1]).unsqueeze(-1)).clamp_(max=cum.shape[-1] - 1)
        chosen = order.gather(-1, pick)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)
