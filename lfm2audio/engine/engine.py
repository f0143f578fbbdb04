"""The batched streaming engine: every active session advances together, one step at a time.

One thread owns the model. Each step is plan -> run -> emit, as vLLM's engine
core schedules, executes and updates:

* **plan** (``lfm2audio.engine.plan``): from host-side facts only, which
  session prefills a chunk (at most ``prefill_chunk`` positions of one
  session's new turn, so a long prompt delays everyone else's next frame by
  one chunk at most), which rows feed their last token, which sample text
  and which sample audio;
* **run** (``lfm2audio.engine.step``): one batched backbone forward for every
  decoding row, batched sampling, one batched depthformer pass for the audio
  rows, one batched streaming-decoder step; a fixed sequence of tensor ops
  whatever the batch holds, results copied to the host once;
* **emit**: host-side bookkeeping (turn state machines, histories, text
  detokenizing) and events to the sessions' queues.

Work that depends on one request only (tokenizing, mel features, the audio
encoder) runs on a separate prepare thread before the request reaches the
step, so it never stalls other sessions' audio.

Sessions live in slots of a preallocated pool: row ``slot`` of one ``LFM2Cache``
holds a session's KV and conv state across turns. Slots are handed out lowest
first, so the batch is the prefix of rows up to the highest busy slot; its
shapes depend only on that count (CUDA graphs are captured per bucket of it).

Context limit policy (``lfm2audio.engine.prompt.fit_turns``): before a turn,
if history + new turn + max_output_tokens would exceed ``max_context``, the
oldest turns after the system prompt are dropped (a
``SessionEvent('history_truncated')`` says so) and the cache is rebuilt from
the remaining history; a turn that cannot fit even alone fails with reason
``context_limit``. A response that reaches the limit while generating ends
with status ``incomplete``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lfm2audio.audio_model import LFM2AudioModel
from lfm2audio.engine.audio_out import SlotAudioDecoder, make_audio_decoder
from lfm2audio.engine.config import DEFAULT_SAMPLING, EngineConfig, SessionConfig
from lfm2audio.engine.cpu_tuning import call_in_thread, load_without_team, retain_freed_memory, use_threads_here
from lfm2audio.engine.events import (
    PoolFullError,
    ResponseDone,
    SessionEvent,
)
from lfm2audio.engine.history import Item, Turn, model_inputs
from lfm2audio.engine.plan import PlanRow, PrefillChunk, StepPlan, plan_step
from lfm2audio.engine.prompt import ContextLimitError, PromptBuilder, fit_turns
from lfm2audio.engine.session import AddTurn, DeleteItem, HistoryEdit, Session, TruncateItem, UserPart
from lfm2audio.engine.slot_state import PreparedRequest, ResponseState, SlotState, final_stats, on_audio, on_text
from lfm2audio.engine.step import BatchStep, StepResult
from lfm2audio.generation import TurnDecoder
from lfm2audio.loading import default_device
from lfm2audio.model.compiled import is_compiled
from lfm2audio.model.lfm2 import LFM2Cache
from lfm2audio.model.lfm2_audio import LFM2AudioNetwork
from lfm2audio.processor import LFM2AudioProcessor
from lfm2audio.sampling import row_top_k
from lfm2audio.tokenizer import IncrementalDetokenizer
from lfm2audio.tokens import LFMModality

log = logging.getLogger(__name__)


class Engine:
    """Sessions, the engine thread, and the step loop (see the module docstring)."""

    def __init__(self, model: LFM2AudioNetwork, processor: LFM2AudioProcessor, config: EngineConfig | None = None):
        if is_compiled(model):
            # Every new row count would compile another graph (a minute or more) in the middle of serving.
            raise ValueError(
                "the engine runs the model eager: load it without compile=True (compile is for one stream)"
            )
        self.model = model.eval()
        self.processor = processor
        self.config = config or EngineConfig()
        cfg = self.config
        graphs = cfg.cuda_graphs if cfg.cuda_graphs is not None else model.device.type == "cuda"
        if graphs and model.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")

        def build() -> tuple[LFM2Cache, SlotAudioDecoder, BatchStep]:
            cache = model.lfm.new_cache(cfg.max_sessions, cfg.max_context)
            audio = make_audio_decoder(processor, cfg.audio_decoder, cfg.max_sessions)
            return cache, audio, BatchStep(model, cache, audio, cuda_graphs=graphs, bucketed=cfg.bucketed_rows)

        if model.device.type == "cpu":
            retain_freed_memory()  # a CPU step's large temporaries would otherwise fault in fresh pages
            # Filling the preallocated state here, with more than one intra-op thread, would leave an
            # OpenMP team on the caller's thread, and that slows every parallel op of the engine thread
            # for good (cpu_tuning): 1.7-2.2x per step on a 2-core Xeon. Built on a one-thread helper.
            self.cache, self.audio, self.batch = call_in_thread(1, build)
        else:
            self.cache, self.audio, self.batch = build()
        self.prompts = PromptBuilder(model, processor, cfg.max_context)
        # _slots is the engine thread's; _owners is the callers' view of which slots are taken (under
        # _lock): a closed session's slot is free for open_session at once, while the engine thread
        # finishes the old session first (its commands run in order).
        self._slots: list[SlotState | None] = [None] * cfg.max_sessions
        self._owners: list[Session | None] = [None] * cfg.max_sessions
        self._last_ok: set[tuple[int, str]] = set()  # (slot, response id) of the last batch that ran
        self._lock = threading.Lock()
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prepare: ThreadPoolExecutor | None = None
        self._manual = False  # stepped by the caller with step() instead of the engine thread
        self._prefill_queue: deque[SlotState] = deque()
        self.steps = 0
        self.last_step_s = 0.0  # wall time of the last step that ran the batch (for benches and metrics)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        dev = default_device(device)

        def load() -> tuple[LFM2AudioModel, LFM2AudioProcessor]:
            lfm = LFM2AudioModel.from_pretrained(model, device=dev, dtype=dtype)
            return lfm, LFM2AudioProcessor.from_pretrained(model, device=lfm.device)

        # On a CPU, loaded on a one-thread helper: loading here would leave the caller's thread an
        # OpenMP team, which slows the engine thread as __init__ says (which builds its state likewise).
        lfm, proc = load_without_team(load) if dev.type == "cpu" else load()
        return cls(lfm, proc, config)

    # Lifecycle ------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._stop.clear()
            self._prepare = self._prepare_pool()
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="lfm2audio-engine", daemon=True)
            self._thread.start()
            ready.wait()
        return self

    def _prepare_pool(self) -> ThreadPoolExecutor:
        threads = self.config.prepare_threads
        init = (lambda: use_threads_here(threads)) if threads is not None else None
        return ThreadPoolExecutor(1, thread_name_prefix="lfm2audio-prepare", initializer=init)

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._prepare is not None:
            self._prepare.shutdown(wait=False, cancel_futures=True)
            self._prepare = None

    def step(self) -> bool:
        """Run queued commands and one step in the calling thread (benchmarks and tests; no engine thread).

        Returns whether the step did any work. Requests are still prepared on
        the prepare thread: ``step`` until their responses appear.
        """
        if self._thread is not None:
            raise RuntimeError("the engine thread is running; step() is for an engine that was not started")
        if not self._manual:
            self._manual = True
            self._prepare = self._prepare_pool()
        with torch.inference_mode():
            while self._commands:
                self._commands.popleft()()
            return self._guarded_step()

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
            return sum(s is not None for s in self._owners)

    # Session API (any thread) -----------------------------------------------------------

    def open_session(self, config: SessionConfig | None = None) -> Session:
        if self._thread is None and not self._manual:
            raise RuntimeError("the engine is not running; call engine.start() first")
        with self._lock:
            free = [i for i, s in enumerate(self._owners) if s is None]
            if not free:
                raise PoolFullError(f"all {self.config.max_sessions} session slots are in use")
            slot = free[0]
            session = Session(self, slot, config or SessionConfig(), self.config.max_input_seconds)
            self._owners[slot] = session
        self._command(lambda: self._attach(session))
        return session

    def submit_response(
        self,
        session: Session,
        response_id: str,
        parts: list[UserPart],
        config: SessionConfig,
        max_tokens: int,
        *,
        part_keys: list[str | None] | None = None,
        item_key: str | None = None,
    ) -> None:
        """Prepare the request on the prepare thread, then hand it to the engine thread."""
        if self._prepare is None:
            raise RuntimeError("the engine is not running; call engine.start() first")
        created = time.monotonic()

        def prepare() -> None:
            try:
                with torch.inference_mode():
                    request = PreparedRequest(
                        session, response_id, config, max_tokens,
                        self.prompts.system_turn(config.system_prompt),
                        self.prompts.user_turn(parts, part_keys) if parts else None,
                        self.prompts.assistant_header(), created, item_key,
                    )  # fmt: skip
            except ContextLimitError as e:
                self._emit_failed(session, response_id, "incomplete", f"context_limit: {e}")
                return
            except Exception as e:
                log.warning("could not prepare response %s: %s", response_id, e)
                self._emit_failed(session, response_id, "failed", f"invalid input: {e}")
                return
            self._command(lambda: self._start_response(request))

        self._prepare.submit(prepare)

    def submit_edit(self, session: Session, edit: HistoryEdit) -> None:
        """Edit the session's history: turns are built on the prepare thread (in order with the
        responses submitted), the edit is applied on the engine thread between responses."""
        if self._prepare is None:
            raise RuntimeError("the engine is not running; call engine.start() first")

        def prepare() -> None:
            turn = None
            if isinstance(edit, AddTurn):
                try:
                    with torch.inference_mode():
                        if edit.whole:
                            turn = self.prompts.message_turn(edit.role, list(edit.parts), str(edit.keys[0]))
                        else:
                            turn = self.prompts.user_turn(list(edit.parts), list(edit.keys), edit.role, embed=False)
                except Exception as e:
                    log.warning("could not prepare a history edit: %s", e)
                    session.events.put(SessionEvent("edit_failed", f"{type(edit).__name__}: {e}"))
                    return
            self._command(lambda: self._edit(session, edit, turn))

        self._prepare.submit(prepare)

    def _edit(self, session: Session, edit: HistoryEdit, turn: Turn | None) -> None:
        st = self._slots[session.slot]
        if st is None or st.session is not session:
            return
        if st.response is not None:  # the history is in use: edit it when the response ends
            st.deferred.append(lambda: self._edit(session, edit, turn))
            return
        h = st.history
        system = 1 if h.turns and h.turns[0].role.startswith("system:") else 0
        changed: int | None = None  # flat index of the first changed item
        if isinstance(edit, AddTurn):
            assert turn is not None
            if edit.after == "root":
                at = system
            else:
                found = None if edit.after is None else h.find(edit.after)
                at = len(h.turns) if found is None else found + 1
            changed = h.start_of(at)
            h.turns.insert(at, turn)
        else:
            i = h.find(edit.key)
            if i is None or i < system:
                return
            t = h.turns[i]
            if isinstance(edit, DeleteItem):
                others = [it for it in t.items if it.key is not None and it.key != edit.key]
                changed = h.start_of(i)
                if others:
                    t.items = [it for it in t.items if it.key != edit.key]
                else:
                    del h.turns[i]
            elif isinstance(edit, TruncateItem):
                audio = LFMModality.AUDIO_OUT
                frames = [n for n, it in enumerate(t.items) if it.key == edit.key and it.modality == audio]
                if edit.audio_frames >= len(frames):
                    return
                cut = frames[edit.audio_frames]
                changed = h.start_of(i) + cut
                t.items = t.items[:cut] + self._keyed(self.prompts.turn_end(), edit.key)
        if changed is not None and changed < st.cached_items:
            st.cached_items = 0  # the cache holds what changed: rebuilt from the system prompt next response

    @staticmethod
    def _keyed(items: list[Item], key: str | None) -> list[Item]:
        for item in items:
            item.key = key
        return items

    def force_text_tokens(self, session: Session, tokens: list[int]) -> None:
        """Test hook: the session's next sampled text tokens are replaced by ``tokens``, in order (random
        weights never call a tool; this scripts a reply that does). The model went on from what it
        sampled, so the cache is rebuilt from the history (which holds the forced tokens) afterwards."""

        def force() -> None:
            st = self._slots[session.slot]
            if st is not None and st.session is session:
                st.forced.extend(int(t) for t in tokens)

        self._command(force)

    def cancel_response(self, session: Session) -> None:
        def cancel() -> None:
            st = self._slots[session.slot]
            if st is None or st.session is not session:
                return
            if st.response is not None:
                st.response.cancelled = True
            elif response_id is not None:
                st.cancelled.add(response_id)  # still being prepared: cancelled on arrival

        response_id = session.response_id
        self._command(cancel)

    def close_session(self, session: Session) -> threading.Event:
        done = threading.Event()

        def close() -> None:
            self._close_now(session)
            done.set()

        with self._lock:  # free for the next open_session now; the engine thread catches up in order
            if self._owners[session.slot] is session:
                self._owners[session.slot] = None
        if self._thread is None and not self._manual:  # nothing can be running: free the slot directly
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
        self._slots[session.slot] = None

    def _command(self, fn: Callable[[], None]) -> None:
        if self._thread is None and not self._manual:
            raise RuntimeError("the engine is not running; call engine.start() first")
        self._commands.append(fn)
        self._wake.set()

    # Engine thread ----------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        if self.config.threads is not None:
            use_threads_here(self.config.threads)
        with torch.inference_mode():
            try:
                if self.batch.cuda_graphs:
                    caps = {(row_top_k(t, 1 << 30), row_top_k(a, 1 << 30)) for t, a in DEFAULT_SAMPLING.values()}
                    self.batch.capture(sorted(caps))
            finally:
                ready.set()
            while not self._stop.is_set():
                while self._commands:
                    try:
                        self._commands.popleft()()
                    except Exception:  # a bug of ours; the other sessions go on
                        log.exception("engine command failed")
                worked = self._guarded_step()
                if not worked:
                    self._wake.wait(0.05)
                    self._wake.clear()
            for st in self._slots:
                if st is not None and st.response is not None:
                    self._finish(st, "cancelled", "engine_stopped")

    def _guarded_step(self) -> bool:
        """One step; if it raises, only the row(s) that caused it fail and the others go on."""
        self._phase: tuple[str, StepPlan | None, Any] = ("plan", None, None)
        try:
            return self._step()
        except Exception as e:
            log.exception("engine step failed")
            try:
                self._isolate_failure(f"internal error: {e}")
            except Exception:
                log.exception("could not isolate the failed step; failing every response in flight")
                self._phase = ("plan", None, None)
                self._isolate_failure(f"internal error: {e}")
            return True

    def _attach(self, session: Session) -> None:
        """A new session takes its slot (the slot's previous session, if any, was closed just before)."""
        slot = session.slot
        self.cache.reset_rows([slot])
        self.audio.reset(slot)
        self._slots[slot] = SlotState(session)

    def _start_response(self, req: PreparedRequest) -> None:
        session = req.session
        st = self._slots[session.slot]
        if st is None or st.session is not session:
            return
        slot = session.slot
        history = st.history
        config = req.config
        max_tokens = req.max_tokens
        try:
            system = Turn(req.system.role, list(req.system.items))
            if config.mode != "chat":
                # asr/tts turns are independent.
                history.turns = [system]
                st.cached_items = 0
            elif not history.turns or not history.turns[0].role.startswith("system:"):
                history.turns.insert(0, system)  # turns added before the first response follow the prompt
                st.cached_items = 0
            elif history.turns[0].role != req.system.role:
                history.turns[0] = system  # new instructions: the conversation stays, the cache is rebuilt
                st.cached_items = 0
            self._keyed(req.assistant.items, req.item_key)
            new_turns = ([req.user] if req.user is not None else []) + [req.assistant]
            limit = self.config.max_context
            kept, prompt_positions = fit_turns(history.turns[0], history.turns[1:], new_turns, max_tokens, limit)
            truncated = len(kept) < len(history.turns) - 1
            history.turns = history.turns[:1] + kept + new_turns
            max_tokens = min(max_tokens, limit - prompt_positions)
            if truncated:
                st.cached_items = 0
                session.events.put(SessionEvent("history_truncated", "oldest turns dropped to fit the context"))

            snapshot_at = None
            if st.cached_items == 0:
                snap = st.system_snapshot
                if snap is not None and snap[0] == config.system_prompt:
                    self.cache.rewind_row(slot, snap[1])
                    st.length = snap[1][1]
                    st.cached_items = snap[2]
                else:
                    self.cache.reset_rows([slot])
                    st.length = 0
                    snapshot_at = history.turns[0].positions
            items = history.items()
            reused = st.length
            # What the cache lacks: old items not yet in it (e.g. the end of the last turn), embedded here,
            # then the new turns, whose embeddings the prepare thread computed.
            n_new = sum(len(t.items) for t in new_turns)
            pending = items[st.cached_items : len(items) - n_new]
            if pending and self._heavy(pending):
                # History to embed again (after a truncation or a failure), audio encoder included: on the
                # prepare thread, so that it cannot stall the other sessions' steps.
                self._embed_then_begin(req, st, pending, new_turns, (len(items), reused, snapshot_at, max_tokens))
                return
            parts = ([self._embed(pending)] if pending else []) + [t.embedding for t in new_turns]
            for t in new_turns:
                t.embedding = None  # the prompt holds them now; the history keeps only items
            prompt = torch.cat(parts) if len(parts) > 1 else parts[0]  # type: ignore[arg-type]
        except ContextLimitError as e:
            self._emit_failed(session, req.id, "incomplete", f"context_limit: {e}")
            return
        except Exception as e:
            log.exception("could not start response %s", req.id)
            self._emit_failed(session, req.id, "failed", f"invalid input: {e}")
            return
        self._begin(req, st, prompt, (len(items), reused, snapshot_at, max_tokens))

    def _heavy(self, items: list[Item]) -> bool:
        """Too much to embed on the engine thread: audio (the encoder) or more than a prefill chunk."""
        return len(items) > self.config.prefill_chunk or any(i.modality == LFMModality.AUDIO_IN for i in items)

    def _embed_then_begin(
        self, req: PreparedRequest, st: SlotState, pending: list[Item], new_turns: list[Turn], begin: tuple
    ) -> None:
        """Embed ``pending`` on the prepare thread, then start the response on the engine thread."""
        assert self._prepare is not None

        def embed() -> None:
            try:
                with torch.inference_mode():
                    prompt = torch.cat([self._embed(pending)] + [t.embedding for t in new_turns])  # type: ignore[misc]
            except Exception as e:
                log.warning("could not embed the history of response %s: %s", req.id, e)
                reason = f"invalid input: {e}"

                def fail() -> None:
                    st.cached_items = 0
                    self._emit_failed(req.session, req.id, "failed", reason)

                self._command(fail)
                return
            for t in new_turns:
                t.embedding = None

            def start() -> None:
                if self._slots[req.session.slot] is st:  # unless the session closed meanwhile
                    self._begin(req, st, prompt, begin)

            self._command(start)

        self._prepare.submit(embed)

    def _begin(self, req: PreparedRequest, st: SlotState, prompt: Tensor, begin: tuple) -> None:
        """The response enters the step: ``prompt`` is what the cache still lacks."""
        n_items, reused, snapshot_at, max_tokens = begin
        config, slot = req.config, req.session.slot
        seed = config.seed if config.seed is not None else random.getrandbits(63)
        resp = ResponseState(
            id=req.id,
            key=req.item_key,
            config=config,
            decoder=TurnDecoder(
                config.generation_mode, self.model.config.interleaved_n_text, self.model.config.interleaved_n_audio
            ),
            max_tokens=max_tokens,
            detok=IncrementalDetokenizer(self.processor.text),
            created=req.created,
            prompt=prompt,
            snapshot_at=snapshot_at,
        )
        resp.stats.prompt_positions = prompt.shape[0]
        resp.stats.reused_positions = reused
        if req.id in st.cancelled:  # cancelled while being prepared: ends at the next step, as any cancel
            st.cancelled.discard(req.id)
            resp.cancelled = True
        st.cached_items = n_items  # the prompt is about to enter the cache
        st.response = resp
        self.batch.start_row(slot, config.text_sampling, config.audio_sampling, seed)
        self.audio.reset(slot)
        self._prefill_queue.append(st)

    def _embed(self, items: list[Item]) -> Tensor:
        return self.model.embed_inputs(**model_inputs(items, self.model.codebooks))[0]

    def _emit_failed(self, session: Session, response_id: str, status: str, reason: str) -> None:
        # Idle before the event is visible, so a create_response right after ResponseDone is accepted.
        session.mark_idle()
        session.events.put(ResponseDone(response_id, status, reason, ""))  # type: ignore[arg-type]

    # One step: plan -> run -> emit ------------------------------------------------------

    def _step(self) -> bool:
        for st in self._slots:
            if st is not None and st.response is not None and st.response.cancelled:
                self._finish(st, "cancelled", "client_cancelled")
        for st in self._slots:
            if st is not None and st.response is not None and st.response.feeding:
                if st.length >= self.config.max_context:
                    self._finish(st, "incomplete", "context_limit")

        plan = self._plan()
        if plan.empty:
            return False
        t0 = time.perf_counter()
        prefill_hidden: dict[int, Tensor] = {}
        if plan.prefills:
            self._phase = ("prefill", plan, None)
            prefill_hidden = self._prefill(plan)
        if not plan.feed and not plan.text and not plan.audio:
            return True  # a prefill chunk that did not finish its prompt
        # What a failed batch must give back to the rows that did not cause it (see _isolate_failure).
        self._phase = ("run", plan, None)
        rows = plan.rows
        saved = ([c[:rows].clone() for c in self.cache.conv], self.cache.lengths[:rows].clone()) if rows > 1 else None
        self._phase = ("run", plan, saved)
        result = self.batch.run(plan, prefill_hidden)
        self.steps += 1
        self._phase = ("emit", plan, None)
        self._last_ok = {(s, r.id) for s, r in self._plan_responses(plan)}
        self._emit(plan, result)
        self.last_step_s = time.perf_counter() - t0
        return True

    def _plan(self) -> StepPlan:
        rows = []
        for st in self._slots:
            if st is None or st.response is None:
                continue
            resp = st.response
            rows.append(
                PlanRow(
                    st.session.slot, resp.offset, resp.offset + resp.prompt.shape[0], resp.snapshot_at,
                    resp.feeding, resp.decoder.modality, st.length,
                )  # fmt: skip
            )
        order = [st.session.slot for st in self._prefill_queue]
        return plan_step(rows, order, self.config.prefill_chunk)

    def _prefill(self, plan: StepPlan) -> dict[int, Tensor]:
        """Run the plan's prefill chunks (eager, one row each); the last position's state of each row
        whose prompt completes. Completed rows leave the queue once every chunk ran: a chunk that
        fails is blamed alone (``_isolate_failure``), and a row that completed before it in the same
        step keeps its place and its state for the next step (an empty chunk completes it)."""
        hidden = {}
        for chunk in plan.prefills:
            self._phase = ("prefill", plan, chunk)
            h = self._prefill_chunk(chunk)
            if h is not None:
                hidden[chunk.slot] = h
        for slot in hidden:
            st = self._slots[slot]
            if st in self._prefill_queue:
                self._prefill_queue.remove(st)
        return hidden

    def _prefill_chunk(self, chunk: PrefillChunk) -> Tensor | None:
        st = self._slots[chunk.slot]
        assert st is not None and st.response is not None
        resp = st.response
        if chunk.start < chunk.end:
            # The prompt tensor holds what is still to prefill; offsets count from the turn's start.
            done = resp.offset
            row = self.cache.rows(chunk.slot, chunk.slot + 1)
            h, _ = self.model.lfm(resp.prompt[None, chunk.start - done : chunk.end - done], row)
            resp.prompt = resp.prompt[chunk.end - done :]
            resp.offset = chunk.end
            st.length += chunk.end - chunk.start
            resp.prompt_state = h[0, -1]
            if chunk.snapshot:
                prompt = resp.config.system_prompt
                st.system_snapshot = (prompt, self.cache.snapshot_row(chunk.slot), len(st.history.turns[0].items))
        return resp.prompt_state if chunk.completes else None

    def _emit(self, plan: StepPlan, result: StepResult) -> None:
        now = time.monotonic()
        for s in plan.feed:
            st = self._slots[s]
            assert st is not None and st.response is not None
            st.response.feeding = False
            st.cached_items += 1  # the last emitted item is now in the cache
            st.length += 1
        sampled = []
        for s, token in zip(plan.text, result.tokens, strict=True):
            st = self._slots[s]
            assert st is not None
            on_text(st, token, now)
            sampled.append(st)
        for i, (s, codes) in enumerate(zip(plan.audio, result.codes, strict=True)):
            st = self._slots[s]
            assert st is not None
            on_audio(st, codes, result.pcm[i], now)
            sampled.append(st)
        for st in sampled:
            resp = st.response
            if resp is None:
                continue
            if resp.decoder.finished:
                self._finish(st, "completed", "end_of_turn")
            elif resp.steps >= resp.max_tokens:
                self._finish(st, "incomplete", "max_output_tokens")

    def _finish(self, st: SlotState, status: str, reason: str) -> None:
        resp = st.response
        if resp is None:
            return
        if st in self._prefill_queue:
            # The prompt never fully entered the cache: rebuild it next turn.
            self._prefill_queue.remove(st)
            st.cached_items = 0
        # What was emitted stays in the history (the last token unfed); the turn is closed as ChatState.end_turn does.
        st.history.turns[-1].items.extend(self._keyed(self.prompts.turn_end(), resp.key))
        stats = final_stats(resp, time.monotonic())
        tail = resp.detok.flush()
        if tail:
            resp.text.append(tail)
        if st.forced_used:
            st.forced_used = False
            st.cached_items = 0
        st.response = None
        self.batch.end_row(st.session.slot)
        st.session.mark_idle()
        st.session.events.put(ResponseDone(resp.id, status, reason, "".join(resp.text), stats))  # type: ignore[arg-type]
        deferred, st.deferred = st.deferred, []
        for edit in deferred:
            edit()

    def _plan_responses(self, plan: StepPlan) -> list[tuple[int, ResponseState]]:
        slots = set(plan.feed) | set(plan.text) | set(plan.audio) | {c.slot for c in plan.prefills}
        out = []
        for s in sorted(slots):
            st = self._slots[s]
            if st is not None and st.response is not None:
                out.append((s, st.response))
        return out

    def _isolate_failure(self, message: str) -> None:
        """A step raised: fail the row(s) that caused it; the others go on with the next step.

        A prefill chunk runs one row, so a failure there is that row's (the phase names the chunk).
        A failed batch is blamed on the rows that were not in the last batch that ran (a new
        response, or the prompts that just completed); the others get their cache rows back (conv
        tails and lengths saved before the batch) and run again next step without them. When no row
        is new, no row can be told apart and all of the batch fails.
        """
        phase, plan, saved = self._phase
        if plan is None:  # before any row ran: nothing to blame but what was in flight
            blamed = [st for st in self._slots if st is not None and st.response is not None]
        elif phase == "prefill":
            chunk = saved if isinstance(saved, PrefillChunk) else plan.prefill
            blamed = [self._slots[chunk.slot]] if chunk is not None else []
        else:
            rows = self._plan_responses(plan)
            new = {s for s, r in rows if (s, r.id) not in self._last_ok}
            new.update(plan.completing)
            survivors = [s for s, _ in rows if s not in new] if new and phase == "run" else []
            blamed = [self._slots[s] for s, _ in rows if s not in survivors]
            if saved is not None:
                tails, lengths = saved
                for s in survivors:
                    for c, t in zip(self.cache.conv, tails, strict=True):
                        c[s] = t[s]
                    self.cache.lengths[s] = lengths[s]
        for st in blamed:
            if st is not None and st.response is not None:
                st.cached_items = 0  # the cache may be half-written: rebuilt from the history next turn
                self._finish(st, "failed", message)

