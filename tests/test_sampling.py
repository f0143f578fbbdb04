"""Batched, counter-based sampling: per-row parameters, batch-independent draws, no failure modes."""

from __future__ import annotations

import math

import pytest
import torch

from lfm2audio.sampling import (
    MIN_TEMPERATURE,
    RowSampling,
    SamplingParams,
    counter_uniform,
    k_bucket,
    sample,
    sample_inverse_cdf,
)


def _rows(params, seeds, counters, vocab):
    return RowSampling.build(params, seeds, counters, vocab, "cpu")


def test_uniforms_are_in_the_open_interval_and_fixed_by_seed_counter_lane():
    seeds = torch.tensor([0, 1, 2**62, 12345] * 256)
    counters = torch.arange(1024)
    u = counter_uniform(seeds, counters, 3)
    assert bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u, counter_uniform(seeds, counters, 3))
    # Each row's draw depends on its own key only: computing rows alone gives the same numbers.
    alone = torch.cat([counter_uniform(seeds[i : i + 1], counters[i : i + 1], 3) for i in range(0, 1024, 97)])
    assert torch.equal(alone, u[::97])
    assert not torch.equal(u, counter_uniform(seeds, counters, 4))  # lanes differ
    # Roughly uniform: mean and spread of 1024 draws.
    assert abs(float(u.mean()) - 0.5) < 0.05
    assert abs(float(u.std()) - math.sqrt(1 / 12)) < 0.03


def test_greedy_rows_are_argmax_and_sampled_rows_follow_their_distribution():
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(1, vocab).repeat(4000, 1)
    params = [SamplingParams()] * 2000 + [SamplingParams(1.0, 3)] * 2000
    rows = _rows(params, [7] * 4000, list(range(4000)), vocab)
    tokens = rows.sample(logits, 0)
    assert bool((tokens[:2000] == logits[0].argmax()).all())
    top3 = logits[0].topk(3)
    drawn = tokens[2000:]
    assert set(drawn.tolist()) <= set(top3.indices.tolist())
    probs = top3.values.softmax(-1)
    for idx, p in zip(top3.indices.tolist(), probs.tolist(), strict=True):
        freq = float((drawn == idx).float().mean())
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / 2000) + 1e-3


def test_a_row_draws_the_same_token_alone_or_in_any_batch():
    torch.manual_seed(1)
    vocab = 2049
    logits = torch.randn(16, vocab)
    params = [SamplingParams(1.0, 4), SamplingParams(0.8, 64), SamplingParams(), SamplingParams(1.3, None)] * 4
    seeds, counters = list(range(100, 116)), [5] * 16
    batch = _rows(params, seeds, counters, vocab).sample(logits, 2)
    for i in range(16):
        alone = _rows(params[i : i + 1], seeds[i : i + 1], counters[i : i + 1], vocab).sample(logits[i : i + 1], 2)
        assert int(alone) == int(batch[i])


def test_nan_inf_and_extreme_temperatures_never_raise_or_leak_into_other_rows():
    vocab = 64
    torch.manual_seed(2)
    good = torch.randn(vocab)
    logits = torch.stack(
        [
            good,
            torch.full((vocab,), float("nan")),
            torch.full((vocab,), float("-inf")),
            good.clone().index_fill_(0, torch.tensor([5]), float("inf")),
            good,
        ]
    )
    params = [SamplingParams(1.0, 8), SamplingParams(1.0, 8), SamplingParams(1.0, None), SamplingParams(1.0, 8)]
    params.append(SamplingParams(1e-300, 8))  # below MIN_TEMPERATURE: greedy
    rows = _rows(params, [3] * 5, [0] * 5, vocab)
    tokens = rows.sample(logits, 8)
    assert tokens.shape == (5,)
    assert bool(((tokens >= 0) & (tokens < vocab)).all())
    assert int(tokens[3]) == 5  # an infinite logit wins
    assert int(tokens[4]) == int(good.argmax())
    # Row 0 is not changed by its broken neighbours.
    alone = _rows(params[:1], [3], [0], vocab).sample(logits[:1], 8)
    assert int(alone) == int(tokens[0])
    # The torch.Generator path is as robust.
    for row in logits:
        sample(row[None], SamplingParams(1.0, 8), torch.Generator().manual_seed(0))
    huge = SamplingParams(1e300, 8)
    assert int(_rows([huge], [1], [0], vocab).sample(good[None], 8)) in good.topk(8).indices.tolist()


def test_sampling_params_refuse_nan_and_infinity_and_tiny_temperatures_are_greedy():
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="finite"):
            SamplingParams(bad)
    with pytest.raises(TypeError):
        SamplingParams("1.0")  # type: ignore[arg-type]
    assert SamplingParams(MIN_TEMPERATURE / 10, 4).greedy
    assert not SamplingParams(MIN_TEMPERATURE, 4).greedy


def test_k_buckets():
    assert [k_bucket(k, 2049) for k in (1, 2, 3, 4, 5, 64, 65, 5000)] == [1, 2, 4, 4, 8, 64, 128, 2049]


def test_uniforms_of_several_lanes_equal_one_lane_at_a_time():
    seeds = torch.randint(0, 1 << 62, (40,))
    counters = torch.randint(0, 1 << 40, (40,))
    rows = RowSampling(torch.ones(40), torch.full((40,), 4), torch.zeros(40, dtype=torch.bool), seeds, counters, 4)
    together = rows.uniforms(range(9))
    assert together.shape == (40, 9)
    for lane in range(9):
        assert torch.equal(together[:, lane], counter_uniform(seeds, counters, lane))


def test_host_hints_skip_passes_without_changing_a_token():
    """k_cap 1 (every row greedy) is a plain argmax; any_greedy False (no row greedy) draws exactly
    what the full computation draws for those rows."""
    torch.manual_seed(3)
    logits = torch.randn(16, 2049) * 3
    u = torch.rand(16)
    temp, top_k = torch.full((16,), 0.7), torch.full((16,), 4)
    sampled = torch.zeros(16, dtype=torch.bool)
    full = sample_inverse_cdf(logits, temp, top_k, sampled, u, 4)
    assert torch.equal(sample_inverse_cdf(logits, temp, top_k, sampled, u, 4, any_greedy=False), full)
    greedy = torch.ones(16, dtype=torch.bool)
    assert torch.equal(sample_inverse_cdf(logits, temp, torch.ones(16, dtype=torch.long), greedy, u, 1),
                       logits.argmax(-1))  # fmt: skip
    rows = RowSampling.build([SamplingParams()] * 16, list(range(16)), [0] * 16, 2049, "cpu")
    assert rows.k_cap == 1 and rows.any_greedy
    assert torch.equal(rows.sample(logits, 0), logits.argmax(-1))
    assert not RowSampling.build([SamplingParams(1.0, 4)] * 2, [0, 1], [0, 0], 2049, "cpu").any_greedy
