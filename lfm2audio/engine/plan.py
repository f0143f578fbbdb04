"""Step planning: which rows prefill, which feed their last token, which sample text or audio.

Built from plain host-side facts about each slot, without touching the model
or any tensor, so it is cheap, unit-tested on its own, and the batched step
(``lfm2audio.engine.step``) receives everything it needs as a few index lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from lfm2audio.tokens import LFMModality


@dataclass(frozen=True)
class PlanRow:
    """What the planner needs to know about one busy slot."""

    slot: int
    prefill_offset: int  # prompt positions already prefilled
    prefill_total: int  # prompt positions of this turn (offset == total once the prompt is in the cache)
    snapshot_at: int | None  # prompt offset where the system turn ends and the cache is snapshotted
    feeding: bool  # holds a sampled token that must enter the cache this step
    modality: LFMModality  # what the row samples next (TEXT or AUDIO_OUT)
    length: int  # positions in the cache before this step


@dataclass(frozen=True)
class PrefillChunk:
    slot: int
    start: int  # prompt positions [start, end) are prefilled this step
    end: int
    snapshot: bool  # the system turn ends at ``end``: snapshot the row afterwards
    completes: bool  # the prompt is fully in the cache afterwards: the row samples this step


# Prompts that may complete in one step beside the first chunk (each is one eager forward of its row).
MAX_PREFILLS = 4


@dataclass(frozen=True)
class StepPlan:
    prefills: tuple[PrefillChunk, ...]  # in queue order; only the first may leave its prompt unfinished
    feed: tuple[int, ...]  # slots whose last token enters the cache in the batched forward
    text: tuple[int, ...]  # slots that sample a text token this step
    audio: tuple[int, ...]  # slots that sample an audio frame this step
    rows: int  # the batched step covers slots [0, rows)
    kv_len: int  # key positions the batched forward attends over (max length after the step)

    @property
    def prefill(self) -> PrefillChunk | None:
        """The first (oldest) prefill chunk of the step."""
        return self.prefills[0] if self.prefills else None

    @property
    def completing(self) -> tuple[int, ...]:
        """Slots whose prompt is in the cache after this step's prefills (they sample this step)."""
        return tuple(c.slot for c in self.prefills if c.completes)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.feed and not self.text and not self.audio


def plan_step(rows: list[PlanRow], prefill_order: list[int], prefill_chunk: int) -> StepPlan:
    """The plan of one engine step.

    ``prefill_order`` lists slots waiting to prefill, first come first served.
    The first gets a chunk of ``prefill_chunk`` positions at most (cut where the
    system turn ends, so the row can be snapshotted there); while positions of
    that budget are left, the next ones in line whose whole remaining prompt
    fits (and needs no snapshot cut) complete in the same step, up to
    ``MAX_PREFILLS``: when many users finish speaking together, their turns do
    not queue one step each. A prompt already fully prefilled (a step that
    failed after its prefill) gets an empty chunk that completes it. Every row
    that is ``feeding`` feeds its token in one batched forward and then
    samples; the rows whose prompts complete sample too.
    """
    by_slot = {r.slot: r for r in rows}
    prefills: list[PrefillChunk] = []
    budget = prefill_chunk
    for slot in prefill_order:
        r = by_slot[slot]
        if not prefills:
            end = min(r.prefill_offset + prefill_chunk, r.prefill_total)
            if r.snapshot_at is not None and r.prefill_offset < r.snapshot_at < end:
                end = r.snapshot_at
        else:
            end = r.prefill_total
            cut = r.snapshot_at is not None and r.prefill_offset < r.snapshot_at < end
            if end - r.prefill_offset > budget or cut or len(prefills) > MAX_PREFILLS:
                break
        chunk = PrefillChunk(r.slot, r.prefill_offset, end, end == r.snapshot_at, end == r.prefill_total)
        prefills.append(chunk)
        budget -= end - r.prefill_offset
        if not chunk.completes or budget <= 0:
            break
    feed = tuple(sorted(r.slot for r in rows if r.feeding and r.prefill_offset == r.prefill_total))
    sampling = sorted(set(feed) | {c.slot for c in prefills if c.completes})
    text = tuple(s for s in sampling if by_slot[s].modality == LFMModality.TEXT)
    audio = tuple(s for s in sampling if by_slot[s].modality != LFMModality.TEXT)
    n_rows = max(sampling) + 1 if sampling else 0
    kv_len = max((by_slot[s].length + 1 for s in feed), default=1)
    return StepPlan(tuple(prefills), feed, text, audio, n_rows, kv_len)
