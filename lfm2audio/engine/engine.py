"""The batched streaming engine: every active session advances together, one step at a time.

One thread owns the model. Each step it

1. runs queued commands (new responses, cancels, closes) from other threads;
2. prefills at most one chunk (``prefill_chunk`` positions) of one session's new
   turn, so a long prompt delays everyone else's next frame by one chunk at most;
3. runs ONE batched backbone forward for every session that is decoding, each
   row at its own position (rows that are idle this step pass ``valid`` 0);
4. samples text for the rows in text mode (tied-embedding logits) and runs one
   batched depthformer pass for the rows in audio mode;
5. decodes the new audio frames to PCM with each session's streaming decoder
   and hands text deltas, audio frames and end-of-turn stats to the sessions'
   event queues.

Sessions live in slots of a preallocated pool: row ``slot`` of one ``LFM2Cache``
holds a session's KV and conv state across turns. Slots are handed out lowest
first, so the decoding batch is the prefix of rows up to the highest busy slot;
its shapes depend only on that count, which keeps the step capturable (CUDA
graphs / torch.compile) per batch-size bucket.

Context limit policy: before a turn, if history + new turn + max_output_tokens
would exceed ``max_context``, the oldest turns after the system prompt are
dropped (a ``SessionEvent('history_truncated')`` says so) and the cache is
rebuilt from the remaining history; a turn that cannot fit even alone fails
with reason ``context_limit``. A response that reaches the limit while
generating ends with status ``incomplete``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lfm2audio.engine.audio_out import Decoder, make_audio_decoder
from lfm2audio.engine.events import (
    SAMPLES_PER_FRAME,
    AudioFrame,
    PoolFullError,
    ResponseDone,
    ResponseStats,
    SessionEvent,
    TextDelta,
)
from lfm2audio.engine.history import History, Item, Turn, model_inputs
from lfm2audio.engine.session import INPUT_SAMPLE_RATE, Session, SessionConfig
from lfm2audio.generation import TurnDecoder
from lfm2audio.model.lfm2_audio import AUDIO_START, END_OF_AUDIO, LFM2AudioModel, LFMModality
from lfm2audio.processor import LFM2AudioProcessor
from lfm2audio.sampling import sample_rows
from lfm2audio.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 8
    max_context: int = 4096  # positions per session
    prefill_chunk: int = 128  # positions prefilled per step
    audio_decoder: Decoder = "auto"
    max_input_seconds: float = 120.0  # buffered microphone audio per session

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_context", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class _Response:
    id: str
    config: SessionConfig
    decoder: TurnDecoder
    max_tokens: int
    generator: torch.Generator
    detok: IncrementalDetokenizer
    created: float
    prompt: Tensor  # (N, hidden) embeddings still to prefill
    offset: int = 0
    snapshot_at: int | None = None  # prompt offset where the system turn ends (asr/tts reuse it)
    next_input: Tensor | None = None  # (hidden,) embedding of the last emitted token, fed next step
    steps: int = 0
    frames: int = 0
    text_tokens: int = 0
    text: list[str] = field(default_factory=list)
    cancelled: bool = False
    first_token: float | None = None
    first_audio: float | None = None
    stats: ResponseStats = field(default_factory=ResponseStats)


@dataclass
class _Slot:
    """Engine-thread state of one session."""

    session: Session
    history: History = field(default_factory=History)
    cached_items: int = 0  # items of history.items() whose positions are in the cache
    system_snapshot: tuple[str, Any, int] | None = None  # (prompt, conv tails + length, items)
    response: _Response | None = None


class Engine:
    def __init__(self, model: LFM2AudioModel, processor: LFM2AudioProcessor, config: EngineConfig | None = None):
        self.model = model.eval()
        self.processor = processor
        self.config = config or EngineConfig()
        cfg = self.config
        self.cache = model.lfm.new_cache(cfg.max_sessions, cfg.max_context)
        self.audio = make_audio_decoder(processor, cfg.audio_decoder, cfg.max_sessions)
        self._slots: list[_Slot | None] = [None] * cfg.max_sessions
        self._lock = threading.Lock()
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prefill_queue: deque[_Slot] = deque()
        self.steps = 0

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        lfm = LFM2AudioModel.from_pretrained(model, device=device, dtype=dtype)
        proc = LFM2AudioProcessor.from_pretrained(model, device=lfm.device)
        return cls(lfm, proc, config)

    # Lifecycle ------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="lfm2audio-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def warmup(self, timeout: float = 300.0) -> None:
        """Run one tiny text turn through the whole path (so the first real user does not pay for it)."""
        session = self.open_session(SessionConfig(mode="chat", max_output_tokens=2))
        try:
            session.add_text("Hi")
            session.create_response()
            deadline = time.monotonic() + timeout
            while True:
                event = session.events.get(timeout=max(0.0, deadline - time.monotonic()))
                if isinstance(event, ResponseDone):
                    if event.status == "failed":
                        raise RuntimeError(f"warm-up failed: {event.reason}")
                    return
        finally:
            session.close()

    @property
    def max_sessions(self) -> int:
        return self.config.max_sessions

    @property
    def active_sessions(self) -> int:
        with self._lock:
            return sum(s is not None for s in self._slots)

    # Session API (any thread) -----------------------------------------------------------

    def open_session(self, config: SessionConfig | None = None) -> Session:
        with self._lock:
            free = [i for i, s in enumerate(self._slots) if s is None]
            if not free:
                raise PoolFullError(f"all {self.config.max_sessions} session slots are in use")
            slot = free[0]
            session = Session(self, slot, config or SessionConfig(), self.config.max_input_seconds)
            self._slots[slot] = _Slot(session)
        self._command(lambda: self._reset_slot(slot))
        return session

    def _submit(self, session: Session, response_id: str, parts: list, config: SessionConfig, max_tokens: int):
        self._command(lambda: self._start_response(session, response_id, parts, config, max_tokens))

    def _cancel(self, session: Session) -> None:
        def cancel() -> None:
            st = self._slots[session.slot]
            if st is not None and st.session is session and st.response is not None:
                st.response.cancelled = True

        self._command(cancel)

    def _close(self, session: Session) -> threading.Event:
        done = threading.Event()

        def close() -> None:
            self._close_now(session)
            done.set()

        if self._thread is None:  # nothing can be running: free the slot directly
            close()
        else:
            self._command(close)
        return done

    def _close_now(self, session: Session) -> None:
        st = self._slots[session.slot]
        if st is None or st.session is not session:
            return
        if st.response is not None:
            self._finish(st, "cancelled", "session_closed")
        with self._lock:
            self._slots[session.slot] = None

    def _command(self, fn: Callable[[], None]) -> None:
        if self._thread is None:
            raise RuntimeError("the engine is not running; call engine.start() first")
        self._commands.append(fn)
        self._wake.set()

    # Engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    while self._commands:
                        self._commands.popleft()()
                    worked = self._step()
                except Exception as e:  # keep serving the others; fail what was in flight
                    log.exception("engine step failed")
                    self._fail_all(f"internal error: {e}")
                    worked = False
                if not worked:
                    self._wake.wait(0.05)
                    self._wake.clear()
            for st in self._slots:
                if st is not None and st.response is not None:
                    self._finish(st, "cancelled", "engine_stopped")

    def _reset_slot(self, slot: int) -> None:
        self.cache.reset_rows([slot])
        self.audio.reset(slot)

    def _text_items(self, text: str) -> list[Item]:
        ids = self.processor.text.encode(text, add_special_tokens=False)
        return [Item(LFMModality.TEXT, i) for i in ids]

    def _turn_items(self, role: str, text: str) -> list[Item]:
        # Encoded piece by piece exactly as ChatState does, so token ids match generate_*(**chat).
        head = self._text_items("<|startoftext|>") if role == "system" else []
        return (
            head + self._text_items(f"<|im_start|>{role}\n") + self._text_items(text) + self._text_items("<|im_end|>\n")
        )

    def _user_items(self, parts: list) -> list[Item]:
        items = self._text_items("<|im_start|>user\n")
        for kind, value in parts:
            if kind == "audio":
                mel = self.processor.features(torch.from_numpy(value), INPUT_SAMPLE_RATE)
                # ChatState keeps features in bfloat16; round the same way for identical results.
                items.append(Item(LFMModality.AUDIO_IN, mel.to(torch.bfloat16).cpu()))
            else:
                items.extend(self._text_items(value))
        return items + self._text_items("<|im_end|>\n")

    def _start_response(
        self, session: Session, response_id: str, parts: list, config: SessionConfig, max_tokens: int
    ) -> None:
        st = self._slots[session.slot]
        if st is None or st.session is not session:
            return
        model = self.model
        slot = session.slot
        history = st.history
        system = config.system_prompt
        try:
            if config.mode != "chat" or not history.turns or history.turns[0].role != "system:" + system:
                # asr/tts turns are independent; a new system prompt starts the conversation over.
                history.turns = [Turn("system:" + system, self._turn_items("system", system))]
                st.cached_items = 0
            new_turns = [Turn("user", self._user_items(parts))] if parts else []
            new_turns.append(Turn("assistant", self._text_items("<|im_start|>assistant\n")))
            new_positions = sum(t.positions for t in new_turns)
            limit = self.config.max_context
            kept = history.turns[1:]
            while (
                kept
                and history.turns[0].positions + sum(t.positions for t in kept) + new_positions + max_tokens > limit
            ):
                kept = kept[1:]  # drop the oldest turn after the system prompt
            prompt_positions = history.turns[0].positions + sum(t.positions for t in kept) + new_positions
            if prompt_positions >= limit:
                raise _ContextLimit(f"the turn needs {prompt_positions + 1} positions, the context holds {limit}")
            truncated = len(kept) < len(history.turns) - 1
            history.turns = history.turns[:1] + kept + new_turns
            max_tokens = min(max_tokens, limit - prompt_positions)
            if truncated:
                st.cached_items = 0
                session.events.put(SessionEvent("history_truncated", "oldest turns dropped to fit the context"))

            snapshot_at = None
            if st.cached_items == 0:
                snap = st.system_snapshot
                if snap is not None and snap[0] == system:
                    self.cache.rewind_row(slot, snap[1])
                    st.cached_items = snap[2]
                else:
                    self.cache.reset_rows([slot])
                    snapshot_at = history.turns[0].positions
            items = history.items()
            reused = int(self.cache.lengths[slot])
            prompt = model.embed_inputs(**model_inputs(items[st.cached_items :], model.codebooks))[0]
        except _ContextLimit as e:
            self._emit_failed(session, response_id, "incomplete", f"context_limit: {e}")
            return
        except Exception as e:
            log.exception("could not start response %s", response_id)
            self._emit_failed(session, response_id, "failed", f"invalid input: {e}")
            return

        gen = torch.Generator(device=model.device)
        gen.manual_seed(config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        resp = _Response(
            id=response_id,
            config=config,
            decoder=TurnDecoder(
                config.generation_mode, model.config.interleaved_n_text, model.config.interleaved_n_audio
            ),
            max_tokens=max_tokens,
            generator=gen,
            detok=IncrementalDetokenizer(self.processor.text),
            created=time.monotonic(),
            prompt=prompt,
            snapshot_at=snapshot_at,
        )
        resp.stats.prompt_positions = prompt.shape[0]
        resp.stats.reused_positions = reused
        st.cached_items = len(items)  # the prompt is about to enter the cache
        st.response = resp
        self.audio.reset(st.session.slot)
        self._prefill_queue.append(st)

    def _emit_failed(self, session: Session, response_id: str, status: str, reason: str) -> None:
        # Idle before the event is visible, so a create_response right after ResponseDone is accepted.
        session._response_finished()
        session.events.put(ResponseDone(response_id, status, reason, ""))  # type: ignore[arg-type]

    def _step(self) -> bool:
        model = self.model
        hidden_rows: list[tuple[_Slot, Tensor]] = []

        for st in [s for s in self._slots if s is not None and s.response is not None and s.response.cancelled]:
            self._finish(st, "cancelled", "client_cancelled")

        # Prefill: one chunk of one session.
        if self._prefill_queue:
            st = self._prefill_queue[0]
            resp = st.response
            assert resp is not None
            slot = st.session.slot
            end = min(resp.offset + self.config.prefill_chunk, resp.prompt.shape[0])
            if resp.snapshot_at is not None and resp.offset < resp.snapshot_at < end:
                end = resp.snapshot_at
            h, _ = model.lfm(resp.prompt[None, resp.offset : end], self.cache.rows(slot, slot + 1))
            resp.offset = end
            if resp.snapshot_at == end:
                prompt = resp.config.system_prompt
                st.system_snapshot = (prompt, self.cache.snapshot_row(slot), len(st.history.turns[0].items))
            if end == resp.prompt.shape[0]:
                self._prefill_queue.popleft()
                resp.prompt = resp.prompt[:0]
                hidden_rows.append((st, h[0, -1]))

        # Decode: one batched forward over the rows that have a token to feed.
        feeding = [
            s for s in self._slots if s is not None and s.response is not None and s.response.next_input is not None
        ]
        full = [s for s in feeding if int(self.cache.lengths[s.session.slot]) >= self.config.max_context]
        for st in full:
            self._finish(st, "incomplete", "context_limit")
        feeding = [s for s in feeding if s.response is not None]
        if feeding:
            n = max(s.session.slot for s in feeding) + 1
            x = torch.zeros((n, 1, model.config.lfm.hidden_size), device=model.device, dtype=model.dtype)
            valid = torch.zeros(n, dtype=torch.long, device=model.device)
            for st in feeding:
                x[st.session.slot, 0] = st.response.next_input
                valid[st.session.slot] = 1
            h, _ = model.lfm(x, self.cache.rows(0, n), valid=valid)
            for st in feeding:
                resp = st.response
                resp.next_input = None
                st.cached_items += 1  # the last emitted item is now in the cache
                hidden_rows.append((st, h[st.session.slot, 0]))

        if not hidden_rows:
            return bool(self._prefill_queue)
        self.steps += 1
        self._sample(hidden_rows)
        return True

    def _sample(self, rows: list[tuple[_Slot, Tensor]]) -> None:
        model = self.model
        text_rows: list[tuple[_Slot, Tensor]] = []
        audio_rows: list[tuple[_Slot, Tensor]] = []
        for st, h in rows:
            modality = st.response.decoder.begin_step()
            (text_rows if modality == LFMModality.TEXT else audio_rows).append((st, h))

        if text_rows:
            logits = model.text_logits(torch.stack([h for _, h in text_rows]))
            tokens = sample_rows(
                logits,
                [st.response.config.text_sampling for st, _ in text_rows],
                [st.response.generator for st, _ in text_rows],
            )
            for (st, _), token in zip(text_rows, tokens.tolist(), strict=True):
                self._on_text(st, token)

        decoded: list[tuple[_Slot, int, tuple[int, ...]]] = []
        if audio_rows:
            frames = model.sample_audio_frame(
                torch.stack([h for _, h in audio_rows]),
                [st.response.config.audio_sampling for st, _ in audio_rows],
                [st.response.generator for st, _ in audio_rows],
            )
            for (st, _), frame in zip(audio_rows, frames, strict=True):
                out = self._on_audio(st, frame)
                if out is not None:
                    decoded.append((st, out[0], out[1]))
        if decoded:
            pcm = self.audio.decode(
                [st.session.slot for st, _, _ in decoded],
                torch.tensor([codes for _, _, codes in decoded], dtype=torch.long, device=model.device),
            )
            now = time.monotonic()
            for (st, index, codes), samples in zip(decoded, pcm.cpu().numpy(), strict=True):
                resp = st.response
                if resp.first_audio is None:
                    resp.first_audio = now
                st.session.events.put(AudioFrame(resp.id, index, codes, samples))

        for st, _ in rows:
            resp = st.response
            if resp is None:
                continue
            if resp.decoder.finished:
                self._finish(st, "completed", "end_of_turn")
            elif resp.steps >= resp.max_tokens:
                self._finish(st, "incomplete", "max_output_tokens")

    def _on_text(self, st: _Slot, token: int) -> None:
        resp = st.response
        resp.steps += 1
        emit = resp.decoder.on_text(token)
        if resp.first_token is None:
            resp.first_token = time.monotonic()
        if not emit:
            return
        item = Item(LFMModality.TEXT, token)
        st.history.turns[-1].items.append(item)
        resp.text_tokens += 1
        delta = resp.detok.push(token)
        resp.text.append(delta)
        # One event per token; its text is empty for special tokens and for bytes of an unfinished character.
        st.session.events.put(TextDelta(resp.id, delta, token))
        if resp.config.mode == "asr" and token == AUDIO_START:
            # ASR wants text only: the switch to audio ends the transcript.
            resp.decoder.finished = True
        if not resp.decoder.finished:
            resp.next_input = self.model.embed_text(torch.tensor(token, device=self.model.device))

    def _on_audio(self, st: _Slot, frame: Tensor) -> tuple[int, tuple[int, ...]] | None:
        resp = st.response
        resp.steps += 1
        frame = resp.decoder.on_audio(frame)
        if resp.first_token is None:
            resp.first_token = time.monotonic()
        codes = tuple(int(c) for c in frame.tolist())
        item = Item(LFMModality.AUDIO_OUT, frame.detach().to("cpu", torch.long))
        st.history.turns[-1].items.append(item)
        resp.next_input = self.model.embed_audio_frames(frame)
        index = resp.frames
        resp.frames += 1
        if codes[0] == END_OF_AUDIO:
            st.session.events.put(AudioFrame(resp.id, index, codes, _NO_SAMPLES, end_of_audio=True))
            return None
        return index, codes

    def _finish(self, st: _Slot, status: str, reason: str) -> None:
        resp = st.response
        if resp is None:
            return
        if st in self._prefill_queue:
            # The prompt never fully entered the cache: rebuild it next turn.
            self._prefill_queue.remove(st)
            st.cached_items = 0
        # What was emitted stays in the history (the last token unfed); the turn is closed as ChatState.end_turn does.
        st.history.turns[-1].items.extend(self._text_items("<|im_end|>\n"))
        now = time.monotonic()
        stats = resp.stats
        stats.text_tokens = resp.text_tokens
        stats.audio_frames = resp.frames
        stats.duration_s = now - resp.created
        stats.time_to_first_token_s = None if resp.first_token is None else resp.first_token - resp.created
        stats.time_to_first_audio_s = None if resp.first_audio is None else resp.first_audio - resp.created
        audio_s = resp.frames * SAMPLES_PER_FRAME / 24_000
        stats.real_time_factor = stats.duration_s / audio_s if audio_s else None
        tail = resp.detok.flush()
        if tail:
            resp.text.append(tail)
        st.response = None
        st.session._response_finished()
        st.session.events.put(ResponseDone(resp.id, status, reason, "".join(resp.text), stats))  # type: ignore[arg-type]

    def _fail_all(self, message: str) -> None:
        for st in self._slots:
            if st is not None and st.response is not None:
                st.cached_items = 0  # the cache may be half-written
                self._finish(st, "failed", message)
        self._prefill_queue.clear()


class _ContextLimit(Exception):
    pass


_NO_SAMPLES = torch.zeros(0).numpy()
