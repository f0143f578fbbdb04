"""A step that raises fails only the row(s) that caused it (issue 13): the other sessions' responses go
on with the tokens they would have had. Faults are injected into one session's prefill, or into the
batched step after the backbone has already written every row's cache (so the others must get their
cache rows back)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor, LFMModality
from lfm2audio.engine import Engine, EngineConfig, ResponseDone, SessionConfig, SessionEvent, TextDelta


@pytest.fixture(scope="module")
def engine(checkpoint_dir):
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu")
    eng = Engine(model, proc, EngineConfig(max_sessions=4, prefill_chunk=16)).start()
    yield eng
    eng.stop()


CONFIG = SessionConfig(mode="chat", max_output_tokens=32, seed=7)


def _collect(session, first_text_only: bool = False):
    tokens = []
    while True:
        ev = session.events.get(timeout=120)
        if isinstance(ev, TextDelta):
            tokens.append(ev.token_id)
            if first_text_only:
                return tokens, None
        elif isinstance(ev, ResponseDone):
            return tokens, ev


def _start(engine, text: str):
    s = engine.open_session(CONFIG)
    s.add_text(text)
    s.create_response()
    return s


@pytest.mark.parametrize("where", ["prefill", "batch"])
def test_a_failing_row_fails_only_itself(engine, monkeypatch, where):
    a = _start(engine, "Tell me about the sea.")
    baseline, done = _collect(a)
    assert done.status in ("completed", "incomplete")
    a.close(wait=True)

    victim: dict = {}
    if where == "prefill":
        prefill = engine._prefill

        def failing_prefill(plan):
            if plan.prefill.slot == victim.get("slot"):
                raise RuntimeError("injected prefill fault")
            return prefill(plan)

        monkeypatch.setattr(engine, "_prefill", failing_prefill)
    else:
        run, logits = engine.batch.run, engine.model.text_logits
        current: dict = {}

        def recording_run(plan, hidden):
            current["rows"] = set(plan.feed) | set(plan.text) | set(plan.audio)
            return run(plan, hidden)

        def failing_logits(h):  # called after the backbone wrote every row's cache
            if victim.get("slot") in current.get("rows", ()):
                raise RuntimeError("injected step fault")
            return logits(h)

        monkeypatch.setattr(engine.batch, "run", recording_run)
        monkeypatch.setattr(engine.model, "text_logits", failing_logits)

    a = _start(engine, "Tell me about the sea.")
    head, _ = _collect(a, first_text_only=True)  # A is decoding: it ran in a batch before B arrives
    b = engine.open_session(CONFIG)
    victim["slot"] = b.slot
    b.add_text("Hello there.")
    b.create_response()
    _, done_b = _collect(b)
    assert done_b.status == "failed" and "injected" in done_b.reason
    rest, done_a = _collect(a)
    assert done_a.status in ("completed", "incomplete")
    assert head + rest == baseline
    monkeypatch.undo()
    # B's session works again once the fault is gone.
    b.add_text("Hello again.")
    b.create_response()
    _, done_b = _collect(b)
    assert done_b.status in ("completed", "incomplete")
    a.close()
    b.close()


def _small_context_engine(checkpoint_dir):
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu")
    return Engine(model, proc, EngineConfig(max_sessions=2, prefill_chunk=16, max_context=400)).start()


def test_history_is_reembedded_off_the_engine_thread(checkpoint_dir, golden, monkeypatch):
    """After a truncation the kept history (audio turns) is embedded again: on the prepare thread, and
    with the same tokens as when the engine thread does it."""
    wave = np.tile(golden["input.wave_user1"][0].numpy(), 2)  # 4 s: about 50 positions a turn

    def conversation(engine) -> tuple[list[int], bool]:
        s = engine.open_session(SessionConfig(mode="chat", max_output_tokens=8, seed=3))
        for _ in range(2):
            s.append_audio(wave, 16_000)
            s.commit_audio()
            s.create_response()
            _collect(s)
        s.add_text("word " * 60)  # about 180 positions: the first turn must go
        s.create_response(max_output_tokens=100)
        truncated = False
        tokens = []
        while True:
            ev = s.events.get(timeout=120)
            truncated |= isinstance(ev, SessionEvent) and ev.kind == "history_truncated"
            if isinstance(ev, TextDelta):
                tokens.append(ev.token_id)
            if isinstance(ev, ResponseDone):
                break
        s.close(wait=True)
        return tokens, truncated

    engine = _small_context_engine(checkpoint_dir)
    try:
        threads = []
        embed = engine._embed

        def recording_embed(items):
            if any(i.modality == LFMModality.AUDIO_IN for i in items):
                threads.append(threading.current_thread().name)
            return embed(items)

        monkeypatch.setattr(engine, "_embed", recording_embed)
        offloaded, truncated = conversation(engine)
        assert truncated
        assert threads and all(t.startswith("lfm2audio-prepare") for t in threads), threads
        monkeypatch.setattr(engine, "_heavy", lambda items: False)  # the engine thread embeds it all
        inline, _ = conversation(engine)
        assert offloaded == inline
    finally:
        engine.stop()


def test_a_prompt_completed_beside_a_failing_prefill_goes_on(checkpoint_dir, monkeypatch):
    """Two prompts complete in one step (plan.prefills); the second one's prefill raises: it fails
    alone, and the first, already in the cache, samples next step with the tokens it has alone."""
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu")
    engine = Engine(model, proc, EngineConfig(max_sessions=2, prefill_chunk=256))

    def run_until_done(session):
        tokens = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not engine.step():
                time.sleep(0.002)  # the request is still being prepared
            while (ev := session.events.get_nowait()) is not None:
                if isinstance(ev, TextDelta):
                    tokens.append(ev.token_id)
                elif isinstance(ev, ResponseDone):
                    return tokens, ev
        raise AssertionError("no ResponseDone")

    def second_turn_ready():
        # A first turn ends with the system prompt snapshotted; the second turn's prompt needs no cut.
        s = _start(engine, "Hi.")
        run_until_done(s)
        return s

    engine.step()  # manual stepping: the test decides when the step runs
    alone = second_turn_ready()
    alone.add_text("Tell me about the sea.")
    alone.create_response()
    baseline, done = run_until_done(alone)
    alone.close()
    a, b = second_turn_ready(), second_turn_ready()
    prefill_chunk = engine._prefill_chunk
    calls = []

    def failing(chunk):
        calls.append((chunk.slot, chunk.end - chunk.start))
        if chunk.slot == b.slot:
            raise RuntimeError("injected prefill fault")
        return prefill_chunk(chunk)

    monkeypatch.setattr(engine, "_prefill_chunk", failing)
    a.add_text("Tell me about the sea.")
    a.create_response()
    b.add_text("Hello there.")
    b.create_response()
    deadline = time.monotonic() + 60
    while len(engine._commands) < 2:  # both prepared: the next step starts both, then plans both prefills
        assert time.monotonic() < deadline, "the requests were not prepared"
        time.sleep(0.005)
    tokens, done_a = run_until_done(a)
    # One step ran A's prompt, then B's (which raised); the next completed A with an empty chunk.
    assert [slot for slot, _ in calls] == [a.slot, b.slot, a.slot] and calls[0][1] > 0 and calls[2][1] == 0
    assert done_a.status == done.status and tokens == baseline
    done_b = None
    while (ev := b.events.get_nowait()) is not None:
        done_b = ev if isinstance(ev, ResponseDone) else done_b
    assert done_b is not None and done_b.status == "failed" and "injected" in done_b.reason
