"""Token sampling: greedy, or temperature with optional top-k, per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick one token from logits.

    Greedy when ``temperature`` is None or <= 0, or ``top_k`` is 1, as in the
    reference. Otherwise logits are divided by the temperature, everything
    below the k-th best is dropped (when ``top_k`` is set) and a token is drawn.
    """

    temperature: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not isinstance(self.temperature, int | float):
            raise TypeError(f"temperature must be a number or None, got {type(self.temperature).__name__}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature <= 0 or self.top_k == 1


GREEDY = SamplingParams()


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row of ``logits`` (..., V); returns int64 of shape (...)."""
    if params.greedy:
        # argmax resolves ties to the lowest index, like the reference.
        return logits.argmax(dim=-1)
    scores = logits.float() / float(params.temperature)  # type: ignore[arg-type]
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    drawn = torch.multinomial(flat, 1, generator=generator)
    return drawn.view(probs.shape[:-1])


def sample_rows(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None] | None = None
) -> Tensor:
    """Sample row b of ``logits`` (B, V) with ``params[b]``; rows sharing greedy decoding go in one argmax."""
    out = logits.argmax(dim=-1)
    for b, p in enumerate(params):
        if not p.greedy:
            gen = generators[b] if generators is not None else None
            out[b] = sample(logits[b], p, gen)
    return out
