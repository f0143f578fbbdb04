"""Hostile clients cannot hurt anyone else (issue 13): one regression test per finding of the adversarial
probe, on the real tiny model."""

from __future__ import annotations

import asyncio
import gc
import json
import time
import weakref

import pytest
import websockets
from hostile import ErrorLog, StrictClient, closed, dead_reader, talk
from live_server import LiveServer, serve
from rt_client import TIMEOUT, pcm16_b64, run, setup, tone

from lfm2audio_server.app import create_app
from lfm2audio_server.config import ServerConfig
from lfm2audio_server.responses import FRAME_SECONDS


async def _turn(c: StrictClient, text: str) -> tuple[str, str]:
    """A user text turn and its response: (status, transcript)."""
    await c.send(
        "conversation.item.create",
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    )
    await c.send("response.create")
    done = await c.wait_for("response.done", timeout=120)
    content = done["response"]["output"][0]["content"][0]
    return done["response"]["status"], content.get("transcript", content.get("text"))


async def _error(c: StrictClient, raw: str | bytes) -> dict:
    await c.send_raw(raw)
    return (await c.wait_for("error"))["error"]


async def _still_usable(c: StrictClient) -> None:
    await c.send("session.update", session={"instructions": "You are terse."})
    await c.wait_for("session.updated")


# 1. An extreme sampling value fails no one ---------------------------------------------------------


def test_extreme_temperature_fails_no_one(server):
    """temperature 1e-300 (text and audio) decodes greedily; a concurrent session's turn is unchanged."""

    async def go():
        async with await StrictClient.connect(server.url) as a:
            await setup(a, max_output_tokens=24)
            baseline = await _turn(a, "Tell me about the sea.")
        tiny = {"temperature": 1e-300}
        async with await StrictClient.connect(server.url) as a, await StrictClient.connect(server.url) as b:
            await setup(a, max_output_tokens=24)
            await setup(b, max_output_tokens=24, lfm2audio={"sampling": {"text": tiny, "audio": tiny}})
            ra, rb = await asyncio.gather(_turn(a, "Tell me about the sea."), _turn(b, "Hello there."))
        assert ra == baseline
        assert rb[0] in ("completed", "incomplete")

    run(go())


# 2. A client that stops reading holds its slot for a bounded time -----------------------------------


@pytest.mark.parametrize("timeout", ["max_session_s", "idle_timeout_s"])
def test_dead_reader_frees_its_slot(engine, timeout):
    """--max-sessions 1: a client that starts a long response (or a short one, then idles) and reads
    nothing; its slot is free within the timeout + 5 s and the next connection is accepted."""
    limits = {"max_session_s": 60.0, "idle_timeout_s": 60.0, timeout: 2.0}
    tokens = 1500 if timeout == "max_session_s" else 8
    config = ServerConfig(model="golden-tiny", max_sessions=1, send_timeout_s=60.0, **limits)
    with LiveServer(create_app(config, engine=engine), config, sndbuf=4096) as s, ErrorLog() as errors:

        async def go():
            t0 = time.monotonic()
            ws = await dead_reader(s.port, s.url, talk("Talk to me for a long time.", tokens))
            accepted_at = None
            while time.monotonic() - t0 < 2.0 + 5.0:
                try:
                    c = await StrictClient.connect(s.url)
                except websockets.InvalidStatus as e:
                    assert e.response.status_code == 503
                    await asyncio.sleep(0.25)
                    continue
                accepted_at = time.monotonic() - t0
                await c.wait_for("session.created")
                await c.close()
                break
            assert accepted_at is not None, "the dead reader's slot was not freed within timeout + 5 s"
            ws.transport.abort()

        run(go())
    assert errors.lines() == []


def test_dead_reader_after_keepalive_timeout(engine):
    """The WebSocket layer's keepalive gives up on a client that reads nothing (while a write of ours is
    blocked): the slot is free well before any timeout of ours (all a minute). Bounded at 30 s: on a
    loaded CI machine the keepalive's first ping and the close deadline can take several seconds."""
    config = ServerConfig(
        model="golden-tiny", max_sessions=1, send_timeout_s=60.0, max_session_s=60.0, idle_timeout_s=60.0
    )
    s = LiveServer(create_app(config, engine=engine), config, sndbuf=4096)
    s.server.config.ws_ping_interval, s.server.config.ws_ping_timeout = 0.5, 0.5
    with s, ErrorLog() as errors:

        async def go():
            t0 = time.monotonic()
            ws = await dead_reader(s.port, s.url, talk("Talk to me for a long time.", 1500))
            while True:
                assert time.monotonic() - t0 < 30.0, "the slot was not freed after the keepalive timeout"
                try:
                    c = await StrictClient.connect(s.url)
                    break
                except websockets.InvalidStatus:
                    await asyncio.sleep(0.25)
            await c.wait_for("session.created")
            await c.close()
            ws.transport.abort()

        run(go())
    assert errors.lines() == []


# 3, 4, 5. Lone surrogates, NaN, deep nesting, huge integers: invalid_request_error naming the field ----

SURROGATE = "\ud800"
BAD_JSON = [
    # (raw message, code, param)
    (json.dumps({"type": "x", "event_id": SURROGATE}), "invalid_value", "event_id"),
    (json.dumps({"type": "session.update", "session": {"instructions": "a" + SURROGATE}}), "invalid_value",
     "session.instructions"),
    (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": SURROGATE}}}}),
     "invalid_value", "session.audio.output.voice"),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
     "content": [{"type": "input_text", "text": SURROGATE + "hi"}]}}), "invalid_value", "item.content.0.text"),
    ('{"type":"session.update","session":{"audio":{"output":{"voice":{"x":NaN}}}}}', "invalid_json", None),
    ('{"type":"session.update","session":{"audio":{"output":{"voice":{"x":-Infinity}}}}}', "invalid_json", None),
    ('{"type":"session.update","session":{"audio":{"output":{"voice":{"x":1e999}}}}}', "invalid_value", None),
    ('{"type":"session.update","session":{"voice":' + "[" * 5000 + "]" * 5000 + "}}", "invalid_json", None),
    ('{"type":"session.update","session":{"voice":' + "[" * 40 + "]" * 40 + "}}", "invalid_value",
     "session.voice" + ".0" * 31),
    ('{"type":"session.update","session":{"max_output_tokens":' + "9" * 5000 + "}}", "invalid_value", None),
    ('{"type":"session.update","session":{"max_output_tokens":' + "9" * 100 + "}}", "invalid_value", None),
]  # fmt: skip


def test_bad_json_is_an_invalid_request_error(server):
    async def go():
        with ErrorLog() as errors:
            async with await StrictClient.connect(server.url, max_size=None) as c:
                await setup(c)
                for raw, code, param in BAD_JSON:
                    err = await _error(c, raw)
                    assert err["type"] == "invalid_request_error", (raw[:80], err)
                    assert err["code"] == code, (raw[:80], err)
                    if param is not None:
                        assert err["param"] == param, (raw[:80], err)
                    await _still_usable(c)
                assert c.ws.close_code is None
        assert errors.lines() == []

    run(go())


def test_session_objects_stay_valid_json(server):
    """What the server echoes (session.updated with a dict voice) is strict JSON; a valid surrogate pair
    (an emoji) is fine."""

    async def go():
        async with await StrictClient.connect(server.url) as c:
            await setup(c)
            await c.send("session.update", session={"audio": {"output": {"voice": {"id": "x", "v": 1.5}}}})
            ev = await c.wait_for("session.updated")
            assert ev["session"]["audio"]["output"]["voice"] == {"id": "x", "v": 1.5}
            await c.send("session.update", session={"instructions": "Speak like a pirate \U0001f3f4"})
            ev = await c.wait_for("session.updated")
            assert ev["session"]["instructions"].endswith("\U0001f3f4")

    run(go())


# 6. The message limit counts bytes ----------------------------------------------------------------


def test_message_limit_counts_bytes(engine):
    with serve(engine, max_message_bytes=64 * 1024) as s:

        async def go():
            async with await StrictClient.connect(s.url, max_size=None) as c:
                await setup(c)
                # 40,000 two-byte characters: 80 kB of UTF-8, under the 128 kB hard limit of the socket.
                raw = json.dumps({"type": "session.update", "session": {"instructions": "é" * 40_000}},
                                 ensure_ascii=False)  # fmt: skip
                assert len(raw) < 64 * 1024 < len(raw.encode())
                err = await _error(c, raw)
                assert err["code"] == "message_too_large"
                await _still_usable(c)

        run(go())


def test_send_queue_counts_bytes():
    """The send queue's byte limit counts UTF-8 bytes: 320 three-byte characters are 960 bytes."""
    from lfm2audio_server.metrics import Metrics
    from lfm2audio_server.outbox import Outbox

    out = Outbox(None, Metrics(), max_bytes=1000, max_messages=100)  # type: ignore[arg-type]
    out.send({"type": "x", "text": "€" * 200})
    assert 600 < out.queued_bytes < 1000 and not out.dead.is_set()
    out.send({"type": "x", "text": "€" * 120})  # 364 characters in all, 1004 bytes
    assert out.dead.is_set() and out.close_reason == "send_queue_overflow"



def test_layer_close_drops_an_idle_writer():
    """The WebSocket layer gave up on the client (its keepalive closed the transport, whose graceful close
    waits for the client to read): the client is dropped CLOSE_DEADLINE_S later even though no write of
    ours is blocked (the writer waits for the engine), not a send timeout later."""
    from lfm2audio_server.metrics import Metrics
    from lfm2audio_server.outbox import CLOSE_DEADLINE_S, Outbox

    class Transport:  # what uvicorn's protocol holds: closing, with data the client never takes
        def is_closing(self) -> bool:
            return True

    class Protocol:
        transport = Transport()

        async def receive(self) -> dict:
            return {}

    class Socket:  # a starlette WebSocket keeps the protocol's bound receive as _receive
        _receive = Protocol().receive

    out = Outbox(Socket(), Metrics(), max_bytes=1000, max_messages=100, send_timeout_s=60.0)  # type: ignore[arg-type]
    out.check_deadlines(100.0)
    assert not out.dead.is_set()
    out.check_deadlines(100.0 + CLOSE_DEADLINE_S / 2)
    assert not out.dead.is_set()
    out.check_deadlines(100.0 + CLOSE_DEADLINE_S + 0.1)
    assert out.dead.is_set() and out.close_reason == "close_timeout"

# 7. Echoes are bounded: large strings are refused at a documented size ---------------------------------


def test_large_strings_are_refused_not_echoed(server):
    async def go():
        async with await StrictClient.connect(server.url, max_size=None) as c:
            await setup(c)
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 2_100_000}]}
            err = await _error(c, json.dumps({"type": "conversation.item.create", "item": item}))
            assert (err["code"], err["param"]) == ("string_too_long", "item.content.0.text")
            err = await _error(c, json.dumps({"type": "session.update", "session": {"instructions": "y" * 3_000_000}}))
            assert (err["code"], err["param"]) == ("string_too_long", "session.instructions")
            err = await _error(c, json.dumps({"type": "no.such", "event_id": "e" * 10_000}))
            assert (err["code"], err["param"]) == ("string_too_long", "event_id")
            err = await _error(c, json.dumps({"type": "t" * 100_000}))
            assert err["code"] == "unknown_event_type" and len(err["message"]) < 2000
            # Text within the cap is echoed (and the client is not dropped for it).
            item["content"][0]["text"] = "z" * 60_000
            await c.send("conversation.item.create", item=item)
            added = await c.wait_for("conversation.item.added")
            assert added["item"]["content"][0]["text"] == "z" * 60_000
            await _still_usable(c)
            assert c.ws.close_code is None

    run(go())


# 8 (and the acceptance list). A hostile session does not stall another one's audio ----------------------


def _gaps(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def test_hostile_session_does_not_stall_others_audio(tts_server):
    """While session A streams audio, session B sends a 1.9 MB prompt, a prompt too long for the context,
    NaN, a lone surrogate, a 2 MB text and an extreme temperature: A's audio is unchanged, and its worst
    gap between audio frames grows by less than 2 frame intervals over a baseline run of the same turn
    measured in this test (the machine is shared: absolute gaps depend on its load, the hostile's share
    of them does not). Then the same with a third client that starts a response and reads nothing: A
    completes its turn within the same gap bound. (Its audio is not compared there: a response running
    beside A's changes the batch, and the batch's float rounding can flip a greedy choice; a client that
    reads does the same.)"""
    dead: list = []

    async def stream(c: StrictClient) -> tuple[str, list[float], list[str]]:
        await c.send(
            "conversation.item.create",
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "A long sentence."}]},
        )
        await c.send("response.create")
        times, audio = [], []
        while True:
            ev = await c.recv(120)
            if isinstance(ev, dict) and ev["type"] == "response.output_audio.delta":
                times.append(time.monotonic())
                audio.append(ev["delta"])
            if isinstance(ev, dict) and ev["type"] == "response.done":
                return ev["response"]["status"], times, audio

    async def hostile(b: StrictClient, started: asyncio.Event, with_dead_reader: bool) -> None:
        await started.wait()
        if with_dead_reader:
            dead.append(await dead_reader(tts_server.port, tts_server.url, talk("Talk on.", 200)))
        big = "p" * 1_900_000
        for raw in [
            json.dumps({"type": "session.update", "session": {"instructions": big}}),
            json.dumps({"type": "session.update", "session": {"instructions": "q " * 30_000}}),
            json.dumps({"type": "response.create"}),
            '{"type":"session.update","session":{"audio":{"output":{"voice":{"x":NaN}}}}}',
            json.dumps({"type": "x", "event_id": SURROGATE}),
            json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": "t" * 2_000_000}]}}),  # fmt: skip
            json.dumps({"type": "session.update", "session": {"lfm2audio": {"sampling": {"audio": {
                "temperature": 1e-300}}}}}),  # fmt: skip
        ]:
            await b.send_raw(raw)
            await asyncio.sleep(0.05)

    async def beside_hostile(with_dead_reader: bool) -> tuple[str, list[float], list[str]]:
        async with await StrictClient.connect(tts_server.url) as a, await StrictClient.connect(
            tts_server.url, max_size=None
        ) as b:
            await setup(a, **tts)
            await setup(b)
            started = asyncio.Event()

            async def watch() -> None:
                while not a.of("response.output_audio.delta"):
                    await asyncio.sleep(0.005)
                started.set()

            result, _, _ = await asyncio.gather(stream(a), hostile(b, started, with_dead_reader), watch())
            await b.send("session.update", session={"instructions": "ok"})
            await b.wait_for("session.updated")
            for d in dead:
                d.transport.abort()
            return result

    tts = {"lfm2audio": {"mode": "tts"}, "max_output_tokens": 60}

    async def go():
        async with await StrictClient.connect(tts_server.url) as a:
            await setup(a, **tts)
            status, base_times, base_audio = await stream(a)
        assert len(base_audio) >= 10, "the baseline turn made too few frames to measure gaps"
        base_gap = _gaps(base_times)
        for with_dead_reader in (False, True):
            status2, times, audio = await beside_hostile(with_dead_reader)
            assert status2 == status
            if not with_dead_reader:
                assert audio == base_audio
            gap = _gaps(times)
            print(f"worst audio gap: baseline {base_gap * 1000:.0f} ms, beside the hostile {gap * 1000:.0f} ms"
                  f"{' and a dead reader' if with_dead_reader else ''}")  # fmt: skip
            assert gap < base_gap + 2 * FRAME_SECONDS

    run(go())


# 9. Memory per session is bounded, and a closed session's memory goes at once -------------------------


def test_pending_turn_audio_is_capped(engine):
    with serve(engine, max_input_audio_s=1.0) as s:

        async def go():
            async with await StrictClient.connect(s.url) as c:
                await setup(c)
                for i in range(2):
                    await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.7)))
                    await c.send("input_audio_buffer.commit")
                    if i == 0:
                        await c.wait_for("input_audio_buffer.committed")
                err = await c.wait_for("error")
                assert err["error"]["code"] == "input_audio_buffer_full"
                await c.send("input_audio_buffer.clear")
                await c.wait_for("input_audio_buffer.cleared")
                await _still_usable(c)

        run(go())


def test_closed_session_is_freed_without_gc(server):
    """With the cyclic garbage collector off, a closed session's connection, engine session and audio
    buffers are freed by reference counting alone."""

    async def go():
        c = await StrictClient.connect(server.url)
        await setup(c, max_output_tokens=4)
        await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(2.0)))
        await c.send("input_audio_buffer.commit")
        await c.wait_for("input_audio_buffer.committed")
        await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(1.0)))
        await c.send("response.create")
        await c.wait_for("response.done", timeout=120)
        (conn,) = server.state.connections
        refs = [weakref.ref(conn), weakref.ref(conn.session), weakref.ref(conn.audio), weakref.ref(conn.outbox)]
        del conn
        gc.collect()
        gc.disable()
        try:
            await c.close()
            deadline = time.monotonic() + TIMEOUT
            while any(r() is not None for r in refs) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            alive = [type(r()).__name__ for r in refs if r() is not None]
            assert alive == [], f"still referenced after close (a reference cycle?): {alive}"
        finally:
            gc.enable()

    run(go())


# 10. Invalid UTF-8 closes with 1007, quietly; a freed slot is available at once --------------------------


def test_invalid_utf8_closes_with_1007_without_an_error_log(server):
    async def go():
        with ErrorLog() as errors:
            async with await StrictClient.connect(server.url) as c:
                await setup(c)
                await c.ws.send(b'{"type":"\xff\xfe"}', text=True)
                code, _ = await closed(c)
                assert code == 1007
            async with await StrictClient.connect(server.url) as c:  # the server goes on
                await _still_usable(c)
        assert errors.lines() == []

    run(go())


def test_freed_slot_is_available_at_once(engine):
    with serve(engine, max_sessions=1) as s:

        async def go():
            for _ in range(10):
                c = await StrictClient.connect(s.url)  # a 503 would raise InvalidStatus
                await c.wait_for("session.created")
                await c.close()

        run(go())
