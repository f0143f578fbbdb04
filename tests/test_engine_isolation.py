"""A step that raises fails only the row(s) that caused it (issue 13): the other sessions' responses go
on with the tokens they would have had. Faults are injected into one session's prefill, or into the
batched step after the backbone has already written every row's cache (so the others must get their
cache rows back)."""

from __future__ import annotations

import pytest

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
from lfm2audio.engine import Engine, EngineConfig, ResponseDone, SessionConfig, TextDelta


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
