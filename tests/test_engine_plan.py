"""The step planner, on its own: which rows prefill, feed, and sample text or audio."""

from __future__ import annotations

from lfm2audio.engine.plan import PlanRow, plan_step
from lfm2audio.tokens import LFMModality

T, A = LFMModality.TEXT, LFMModality.AUDIO_OUT


def row(slot, *, offset=10, total=10, snapshot=None, feeding=True, modality=T, length=20):
    return PlanRow(slot, offset, total, snapshot, feeding, modality, length)


def test_decoding_rows_feed_and_sample_by_modality():
    plan = plan_step([row(0), row(2, modality=A, length=30), row(5, feeding=False)], [], 64)
    assert plan.prefill is None
    assert plan.feed == (0, 2)
    assert plan.text == (0,) and plan.audio == (2,)
    assert plan.rows == 3  # the prefix up to the highest sampling slot
    assert plan.kv_len == 31


def test_one_chunk_of_the_first_waiting_prompt_and_the_row_samples_when_it_completes():
    rows = [row(1, offset=0, total=100, feeding=False), row(3, offset=0, total=10, feeding=False)]
    plan = plan_step(rows, [1, 3], 64)
    assert (plan.prefill.slot, plan.prefill.start, plan.prefill.end) == (1, 0, 64)
    assert not plan.prefill.completes and not plan.text and plan.rows == 0
    rows[0] = row(1, offset=64, total=100, feeding=False)
    rows[1] = row(3, offset=0, total=40, feeding=False)
    plan = plan_step(rows, [1, 3], 64)
    assert plan.prefill.end == 100 and plan.prefill.completes
    assert len(plan.prefills) == 1  # 28 positions of the budget left: slot 3's 40 wait for the next step
    assert plan.text == (1,) and plan.feed == () and plan.rows == 2


def test_short_prompts_behind_the_first_complete_in_the_same_step_within_the_budget():
    rows = [row(s, offset=0, total=20, feeding=False) for s in (4, 1, 6, 2)] + [row(0), row(7, modality=A)]
    plan = plan_step(rows, [4, 1, 6, 2], 64)
    assert [(c.slot, c.start, c.end, c.completes) for c in plan.prefills] == [(4, 0, 20, True), (1, 0, 20, True),
                                                                            (6, 0, 20, True)]  # 60 of 64
    assert plan.completing == (4, 1, 6) and plan.text == (0, 1, 4, 6) and plan.audio == (7,)
    assert plan.feed == (0, 7) and plan.rows == 8
    # One that needs the snapshot cut waits to be first; the rest keep their order behind it.
    rows = [row(1, offset=0, total=10, feeding=False), row(2, offset=0, total=10, snapshot=5, feeding=False)]
    assert [c.slot for c in plan_step(rows, [1, 2], 64).prefills] == [1]
    # A prompt already in the cache (its step failed after the prefill) completes with an empty chunk.
    plan = plan_step([row(3, offset=30, total=30, feeding=False)], [3], 64)
    assert (plan.prefill.start, plan.prefill.end, plan.prefill.completes) == (30, 30, True) and plan.text == (3,)


def test_a_chunk_stops_where_the_system_turn_ends():
    plan = plan_step([row(0, offset=0, total=50, snapshot=20, feeding=False)], [0], 64)
    assert (plan.prefill.end, plan.prefill.snapshot, plan.prefill.completes) == (20, True, False)
    plan = plan_step([row(0, offset=20, total=50, snapshot=20, feeding=False)], [0], 64)
    assert (plan.prefill.end, plan.prefill.snapshot, plan.prefill.completes) == (50, False, True)


def test_nothing_to_do():
    assert plan_step([], [], 64).empty
    assert plan_step([row(0, feeding=False)], [], 64).empty
