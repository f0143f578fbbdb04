"""Engine-thread state of each slot, and what one step's sampled tokens do to it (host memory only).

``SlotState`` is a session as the engine thread sees it (history, cache bookkeeping, the response in
progress); ``ResponseState`` is one response; ``PreparedRequest`` is a request whose per-request work the
prepare thread has done. ``on_text`` / ``on_audio`` are the emit phase of a step for one row: the turn's
state machine, the history, the text detokenizer and the session's events. ``final_stats`` computes a
response's stats, once, when it ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from lfm2audio.engine.config import SessionConfig
from lfm2audio.engine.events import AudioFrame, ResponseStats, TextDelta
from lfm2audio.engine.history import History, Item, Turn
from lfm2audio.engine.session import Session
from lfm2audio.generation import TurnDecoder
from lfm2audio.tokenizer import IncrementalDetokenizer
from lfm2audio.tokens import AUDIO_START, OUTPUT_SAMPLE_RATE, SAMPLES_PER_FRAME, LFMModality

_NO_SAMPLES = np.zeros(0, dtype=np.float32)


@dataclass
class PreparedRequest:
    """A response request whose per-request work (items, embeddings) the prepare thread has done."""

    session: Session
    id: str
    config: SessionConfig
    max_tokens: int
    system: Turn
    user: Turn | None
    assistant: Turn
    created: float
    item_key: str | None = None


@dataclass
class ResponseState:
    id: str
    key: str | None  # the caller's id of the reply item (tags what it generates)
    config: SessionConfig
    decoder: TurnDecoder
    max_tokens: int
    detok: IncrementalDetokenizer
    created: float
    prompt: Tensor  # (N, hidden) embeddings still to prefill
    offset: int = 0
    prompt_state: Tensor | None = None  # backbone state at the last prefilled position (sampled from)
    snapshot_at: int | None = None  # prompt offset where the system turn ends (asr/tts reuse it)
    feeding: bool = False  # the last sampled token waits in the step's buffers to enter the cache
    steps: int = 0
    frames: int = 0
    text_tokens: int = 0
    text: list[str] = field(default_factory=list)
    cancelled: bool = False
    first_token: float | None = None
    first_audio: float | None = None
    stats: ResponseStats = field(default_factory=ResponseStats)


@dataclass
class SlotState:
    """Engine-thread state of one session."""

    session: Session
    history: History = field(default_factory=History)
    cached_items: int = 0  # items of history.items() whose positions are in the cache
    length: int = 0  # positions in the cache (host mirror of cache.lengths[slot])
    system_snapshot: tuple[str, Any, int] | None = None  # (prompt, conv tails + length, items)
    response: ResponseState | None = None
    cancelled: set[str] = field(default_factory=set)  # ids cancelled before they started
    deferred: list[Callable[[], None]] = field(default_factory=list)  # history edits waiting for the response
    forced: deque[int] = field(default_factory=deque)  # test hook: text tokens that replace the sampled ones
    forced_used: bool = False


def on_text(st: SlotState, token: int, now: float) -> None:
    """A text token sampled for the slot's response: the turn's state machine, history, detokenizer, event."""
    resp = st.response
    assert resp is not None
    resp.steps += 1
    if st.forced:
        token = st.forced.popleft()
        st.forced_used = True
    resp.decoder.begin_step()
    emit = resp.decoder.on_text(token)
    if resp.first_token is None:
        resp.first_token = now
    if not emit:
        return
    st.history.turns[-1].items.append(Item(LFMModality.TEXT, token, resp.key))
    resp.text_tokens += 1
    delta = resp.detok.push(token)
    resp.text.append(delta)
    # One event per token; its text is empty for special tokens and for bytes of an unfinished character.
    st.session.events.put(TextDelta(resp.id, delta, token))
    if resp.config.mode == "asr" and token == AUDIO_START:
        # ASR wants text only: the switch to audio ends the transcript.
        resp.decoder.finished = True
    resp.feeding = not resp.decoder.finished

def on_audio(st: SlotState, codes: tuple[int, ...], pcm: np.ndarray, now: float) -> None:
    """An audio frame sampled (and decoded) for the slot's response."""
    resp = st.response
    assert resp is not None
    resp.steps += 1
    resp.decoder.begin_step()
    end = resp.decoder.on_audio(codes[0])
    if resp.first_token is None:
        resp.first_token = now
    st.history.turns[-1].items.append(Item(LFMModality.AUDIO_OUT, codes, resp.key))
    resp.feeding = True
    index = resp.frames
    resp.frames += 1
    if end:
        st.session.events.put(AudioFrame(resp.id, index, codes, _NO_SAMPLES, end_of_audio=True))
        return
    if resp.first_audio is None:
        resp.first_audio = now
    st.session.events.put(AudioFrame(resp.id, index, codes, pcm))


def final_stats(resp: ResponseState, now: float) -> ResponseStats:
    """The response's figures, timed from the request reaching the engine."""
    stats = resp.stats
    stats.text_tokens = resp.text_tokens
    stats.audio_frames = resp.frames
    stats.duration_s = now - resp.created
    stats.time_to_first_token_s = None if resp.first_token is None else resp.first_token - resp.created
    stats.time_to_first_audio_s = None if resp.first_audio is None else resp.first_audio - resp.created
    audio_s = resp.frames * SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE
    stats.real_time_factor = stats.duration_s / audio_s if audio_s else None
    return stats
