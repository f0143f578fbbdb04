"""Token sampling: greedy, or temperature with optional top-k.

Two ways to draw:

* ``sample(logits, params, generator)``: one set of parameters for every row,
  randomness from torch's generator (``torch.multinomial``), as the reference
  does, so a script seeded with ``torch.manual_seed`` behaves the same.
* ``RowSampling``: the batched engine's way. Parameters are per-row tensors and
  the randomness is counter based: a row's uniform number for sampling step
  ``counter`` is a hash of (seed, counter, lane), computed with a few integer
  tensor ops, and the token is found by inverse-CDF sampling over the row's
  top-k. A row's draws therefore depend only on its own seed and step count,
  never on which other rows share the batch or when the row joined.
  ``generate_*(..., seed=...)`` use the same draws, so a seeded session in the
  engine and a seeded single-stream call give the same stream.

Sampling never raises on bad numbers and one row never affects another: NaN
logits count as -inf, +inf as the largest float, and a row whose logits are all
NaN or -inf gets some valid index. Temperatures below ``MIN_TEMPERATURE`` decode
greedily; temperatures above ``MAX_TEMPERATURE`` act as ``MAX_TEMPERATURE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-4  # below this, decoding is greedy (dividing by tinier numbers overflows float32)
MAX_TEMPERATURE = 1e4  # above this every kept token is equally likely anyway

# Lanes of the counter-based noise: codebook k of an audio frame uses lane k, text uses TEXT_LANE.
TEXT_LANE = 8

_M32 = 0xFFFFFFFF
_MIX = 0x045D9F3B  # < 2**31, so (x < 2**32) * _MIX stays below 2**63 in int64
_FLOAT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    """How to pick one token from logits.

    Greedy when ``temperature`` is None or below ``MIN_TEMPERATURE`` (0 and
    negative values included, as in the reference), or ``top_k`` is 1.
    Otherwise logits are divided by the temperature, everything below the k-th
    best is dropped (when ``top_k`` is set) and a token is drawn.
    """

    temperature: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float)):
            raise TypeError(f"temperature must be a number or None, got {type(t).__name__}")
        if t is not None and not math.isfinite(t):
            raise ValueError(f"temperature must be a finite number, got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def effective_temperature(self) -> float:
        """The divisor actually used (1.0 for greedy rows, whose logits are not divided)."""
        if self.greedy:
            return 1.0
        return min(float(self.temperature), MAX_TEMPERATURE)  # type: ignore[arg-type]


GREEDY = SamplingParams()


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row of ``logits`` (..., V) with torch's RNG; returns int64 of shape (...)."""
    if params.greedy:
        # argmax resolves ties to the lowest index, like the reference.
        return logits.argmax(dim=-1)
    scores = _clean(logits.float() / params.effective_temperature)
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    # A row with nothing finite left has NaN probabilities: it draws uniformly instead of raising.
    flat = flat.nan_to_num(0.0)
    flat = torch.where(flat.sum(-1, keepdim=True) > 0, flat, torch.ones_like(flat))
    drawn = torch.multinomial(flat, 1, generator=generator)
    return drawn.view(probs.shape[:-1])


def _clean(scores: Tensor) -> Tensor:
    return torch.nan_to_num(scores, nan=float("-inf"), posinf=_FLOAT_MAX, neginf=float("-inf"))


# Counter-based randomness ---------------------------------------------------------------


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift / multiply rounds) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A row's 64-bit seed as the non-negative int64 the noise is keyed by."""
    return int(seed) % (1 << 63)


def _lane_key(lane: int | Tensor) -> int | Tensor:
    return (lane * 0x27D4EB2F + 0x165667B1) & _M32


def counter_uniform(seeds: Tensor, counters: Tensor, lane: int | range) -> Tensor:
    """Uniform float32 numbers in (0, 1), one per row and lane, fixed by (seed, counter, lane) alone.

    ``seeds`` and ``counters`` are int64 tensors of the same shape (non-negative).
    One ``lane`` gives that shape; a range of lanes adds a last dimension, one
    column per lane, with the same values (the lane enters only the last round, so
    a frame's 8 codebooks cost one hash of the seed and counter, not 8). The lanes'
    keys are computed on the device (no host-to-device copy: CUDA graphs capture this).
    """
    h = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ 0x5BD1E995))
    h = _mix32(h ^ (counters & _M32)) ^ ((counters >> 32) & _M32)
    if isinstance(lane, int):
        h = _mix32(h ^ _lane_key(lane))
    else:
        lanes = torch.arange(lane.start, lane.stop, lane.step, device=h.device)
        h = _mix32(h.unsqueeze(-1) ^ _lane_key(lanes))
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def k_bucket(k: int, vocab: int) -> int:
    """The candidate count a batch sorts: the next power of two >= k, at most the vocabulary."""
    return min(vocab, 1 << max(0, int(k) - 1).bit_length())


def sample_inverse_cdf(
    logits: Tensor, temperature: Tensor, top_k: Tensor, greedy: Tensor, u: Tensor, k_cap: int, any_greedy: bool = True
) -> Tensor:
    """One token per row of ``logits`` (B, V) with per-row parameters and given uniforms ``u`` (B,).

    ``temperature`` (B,) float (1.0 on greedy rows), ``top_k`` (B,) int64 in
    [1, k_cap], ``greedy`` (B,) bool. The row's ``top_k`` best candidates (of
    the ``k_cap`` sorted ones) are kept and token number j is taken where the
    cumulative probability first exceeds ``u``. Greedy rows are a plain argmax
    of the raw logits, bit for bit. A fixed sequence of batched ops whatever
    the rows hold.

    Candidates are the ``k_cap`` largest raw logits (a positive temperature does
    not change their order), so temperature and the NaN/inf clean-up touch only
    those: two passes over the vocabulary (argmax, topk) whatever the batch.
    NaN sorts above every number there and is then cleaned to -inf: a row's NaN
    logit takes one of its candidate places and is never drawn while a finite
    candidate is left.

    The caller's host-side knowledge skips a pass: ``k_cap`` 1 means every row
    is greedy (no candidates are sorted), ``any_greedy`` False that none is (no
    argmax).
    """
    if k_cap <= 1:
        return logits.argmax(dim=-1)
    k_cap = min(k_cap, logits.shape[-1])
    values, index = logits.topk(k_cap, dim=-1)
    values = _clean(values.float() / temperature.view(-1, 1))
    rank = torch.arange(k_cap, device=logits.device).view(1, -1)
    values = values.masked_fill(rank >= top_k.view(-1, 1), float("-inf"))
    cdf = values.softmax(dim=-1).cumsum(dim=-1)
    # Rows with nothing finite give NaN: the comparison is then false and j = 0, their best candidate.
    j = (cdf < (u.view(-1, 1) * cdf[:, -1:])).sum(dim=-1).clamp(max=k_cap - 1)
    drawn = index.gather(1, j.view(-1, 1)).view(-1)
    if not any_greedy:
        return drawn
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


@dataclass
class RowSampling:
    """Per-row sampling parameters as tensors, and each row's noise key (seed, step counter).

    One instance describes the rows of one batched call; ``sample(logits, lane)``
    draws one token per row. ``counters`` is the row's sampling step (its
    ``lane`` tells codebooks and text apart within a step).
    """

    temperature: Tensor  # (B,) float32
    top_k: Tensor  # (B,) int64 in [1, k_cap]
    greedy: Tensor  # (B,) bool
    seeds: Tensor  # (B,) int64
    counters: Tensor  # (B,) int64
    k_cap: int
    any_greedy: bool = True  # False when the host knows no row is greedy (skips an argmax)

    def sample(self, logits: Tensor, lane: int, u: Tensor | None = None) -> Tensor:
        """One token per row; ``u`` (B,), when given, is ``self.uniforms([lane])[:, 0]`` computed earlier."""
        if self.k_cap <= 1:  # every row greedy: no noise needed
            return logits.argmax(dim=-1)
        if u is None:
            u = counter_uniform(self.seeds, self.counters, lane)
        return sample_inverse_cdf(logits, self.temperature, self.top_k, self.greedy, u, self.k_cap, self.any_greedy)

    def uniforms(self, lanes: range) -> Tensor:
        """The rows' uniform numbers (B, len(lanes)) for several lanes at once."""
        return counter_uniform(self.seeds, self.counters, lanes)

    def rows(self, index: Tensor) -> RowSampling:
        """The same parameters for the rows ``index`` (a gather, no host reads)."""
        return RowSampling(
            self.temperature.index_select(0, index),
            self.top_k.index_select(0, index),
            self.greedy.index_select(0, index),
            self.seeds.index_select(0, index),
            self.counters.index_select(0, index),
            self.k_cap,
            self.any_greedy,
        )

    @staticmethod
    def build(
        params: list[SamplingParams], seeds: list[int], counters: list[int], vocab: int, device: torch.device | str
    ) -> RowSampling:
        k_cap = k_bucket(max((row_top_k(p, vocab) for p in params), default=1), vocab)
        any_greedy = any(p.greedy for p in params)
        return RowSampling(
            torch.tensor([p.effective_temperature for p in params], dtype=torch.float32, device=device),
            torch.tensor([min(row_top_k(p, vocab), k_cap) for p in params], dtype=torch.long, device=device),
            torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device),
            torch.tensor([seed_key(s) for s in seeds], dtype=torch.long, device=device),
            torch.tensor(counters, dtype=torch.long, device=device),
            k_cap,
            any_greedy,
        )


def row_top_k(params: SamplingParams, vocab: int) -> int:
    """The candidate count a row keeps: 1 when greedy, its top_k, or the whole vocabulary."""
    if params.greedy:
        return 1
    return min(params.top_k or vocab, vocab)
