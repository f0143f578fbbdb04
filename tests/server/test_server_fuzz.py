"""A seeded, bounded fuzz of the realtime socket (issue 13): thousands of malformed messages of more than
25 classes, mixed with valid events, over concurrent sessions. Each malformed message gets its own
error event (an ``invalid_request_error`` of the class's code, in order) or, for the two classes the
WebSocket layer answers, the documented close (1007, 1009); the server does not crash, logs no error,
and every session is usable afterwards.

``LFM2AUDIO_FUZZ_SEED`` and ``LFM2AUDIO_FUZZ_MESSAGES`` (per session) change the run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable

from hostile import ErrorLog, StrictClient, closed
from live_server import serve
from rt_client import pcm16_b64, run, setup, tone

SEED = int(os.environ.get("LFM2AUDIO_FUZZ_SEED", "20261201"))
PER_SESSION = int(os.environ.get("LFM2AUDIO_FUZZ_MESSAGES", "1500"))
SESSIONS = 4
MAX_MESSAGE = 256 * 1024  # the fuzzed server's max_message_bytes (hard limit: twice that)

Gen = Callable[[random.Random], str | bytes]


def _s(d: dict) -> str:
    return json.dumps(d)


def _update(session: dict) -> str:
    return _s({"type": "session.update", "session": session})


def _ext(ext: dict) -> str:
    return _update({"lfm2audio": ext})


def _item(content: list, role: str = "user") -> str:
    return _s({"type": "conversation.item.create", "item": {"type": "message", "role": role, "content": content}})


def _word(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz._") for _ in range(n))


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def _garbage(rng: random.Random) -> str:
    # A leading '#' keeps it from ever being valid JSON.
    return "#" + "".join(rng.choice('{}[]":,x1 \\') for _ in range(rng.randint(0, 60)))


def _truncated(rng: random.Random) -> str:
    full = _update({"instructions": "hello", "max_output_tokens": 10})
    return full[: rng.randint(1, len(full) - 1)]


# name -> (generator, expected error code)
CLASSES: dict[str, tuple[Gen, str]] = {
    "garbage": (_garbage, "invalid_json"),
    "truncated": (_truncated, "invalid_json"),
    "array": (lambda r: _s([1, 2, {"type": "response.create"}]), "invalid_event"),
    "scalar": (lambda r: r.choice(["1", '"x"', "null", "true", "3.5"]), "invalid_event"),
    "no_type": (lambda r: _s({"event_id": _word(r)}), "invalid_event"),
    "type_not_string": (lambda r: _s({"type": r.choice([1, [], {}, None, 2.5])}), "invalid_event"),
    "unknown_type": (lambda r: _s({"type": "x." + _word(r)}), "unknown_event_type"),
    "long_type": (lambda r: _s({"type": _word(r, 20_000)}), "unknown_event_type"),
    "append_no_audio": (lambda r: _s({"type": "input_audio_buffer.append"}), "invalid_value"),
    "append_audio_not_str": (lambda r: _s({"type": "input_audio_buffer.append", "audio": r.randint(0, 9)}),
                             "invalid_value"),
    "append_bad_base64": (lambda r: _s({"type": "input_audio_buffer.append", "audio": "%%" + _word(r)}),
                          "invalid_base64"),
    "append_odd_length": (lambda r: _s({"type": "input_audio_buffer.append",
                                        "audio": base64.b64encode(b"abc").decode()}), "invalid_audio_length"),
    "session_not_object": (lambda r: _s({"type": "session.update", "session": r.choice([5, "x", []])}),
                           "invalid_value"),
    "rate_wrong_type": (lambda r: _update({"audio": {"input": {"format": {"rate": "16000"}}}}), "invalid_value"),
    "rate_unsupported": (lambda r: _update({"audio": {"input": {"format": {"rate": r.choice([1, 400_000, 10**9])}}}}),
                         "unsupported_sample_rate"),
    "format_unsupported": (lambda r: _update({"audio": {"input": {"format": {"type": "audio/mp3"}}}}),
                           "unsupported_audio_format"),
    "vad_type": (lambda r: _update({"audio": {"input": {"turn_detection": {"type": "bogus_vad"}}}}),
                 "unsupported_value"),
    "vad_threshold": (lambda r: _update({"audio": {"input": {"turn_detection": {"type": "server_vad",
                                                                                "threshold": 2}}}}), "invalid_value"),
    "ext_unknown_key": (lambda r: _ext({_word(r): 1}), "invalid_value"),
    "ext_mode": (lambda r: _ext({"mode": _word(r)}), "invalid_value"),
    "temperature": (lambda r: _ext({"sampling": {"text": {"temperature": r.choice([-1, 11, "hot", [1]])}}}),
                    "invalid_value"),
    "top_k": (lambda r: _ext({"sampling": {"audio": {"top_k": r.choice([0, -5, 1.5])}}}), "invalid_value"),
    "seed": (lambda r: _ext({"seed": r.choice([-1, 2**63, "s"])}), "invalid_value"),
    "max_tokens": (lambda r: _update({"max_output_tokens": r.choice([0, -3, 10**9, "abc"])}), "invalid_value"),
    "nan": (lambda r: '{"type":"session.update","session":{"audio":{"output":{"voice":{"x":'
            + r.choice(["NaN", "Infinity", "-Infinity"]) + "}}}}}", "invalid_json"),
    "float_overflow": (lambda r: '{"type":"session.update","session":{"audio":{"output":{"voice":{"x":1e'
                       + str(r.randint(400, 9999)) + "}}}}}", "invalid_value"),
    "huge_int": (lambda r: '{"type":"session.update","session":{"max_output_tokens":'
                 + "7" * r.randint(41, 6000) + "}}", "invalid_value"),
    "deep_nesting": (lambda r: '{"type":"session.update","tools":' + _nested(r.randint(1000, 20_000)) + "}",
                     "invalid_json"),
    "nesting_over_cap": (lambda r: '{"type":"session.update","tools":' + _nested(r.randint(40, 300)) + "}",
                         "invalid_value"),
    "lone_surrogate": (lambda r: json.dumps(r.choice([
        {"type": "x", "event_id": "\ud800"},
        {"type": "session.update", "session": {"instructions": "a\udfff"}},
        {"type": "session.update", "session": {"audio": {"output": {"voice": "\udbff"}}}},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "input_text", "text": "\ud83d"}]}},
    ])), "invalid_value"),
    "item_role": (lambda r: _item([{"type": "input_text", "text": "hi"}], role=r.choice(["robot", "narrator"])),
                  "invalid_value"),
    "item_content_type": (lambda r: _item([{"type": r.choice(["output_text", "video", "x"]), "text": "hi"}]),
                          "unsupported_content"),
    "item_empty_text": (lambda r: _item([{"type": "input_text", "text": ""}]), "invalid_value"),
    "item_no_content": (lambda r: _item([]), "invalid_value"),
    "item_text_too_long": (lambda r: _item([{"type": "input_text", "text": "w" * r.randint(65_537, 120_000)}]),
                           "string_too_long"),
    "instructions_too_long": (lambda r: _update({"instructions": "i" * r.randint(65_537, 120_000)}),
                              "string_too_long"),
    "event_id_too_long": (lambda r: _s({"type": "input_audio_buffer.clear", "event_id": "e" * 300}),
                          "string_too_long"),
    "cancel_nothing": (lambda r: _s({"type": "response.cancel"}), "response_cancel_not_active"),
    "binary_unconfigured": (lambda r: bytes(r.randrange(256) for _ in range(r.randint(1, 64))),
                            "binary_audio_not_configured"),
    "message_too_large": (lambda r: _update({"instructions": "m" * (MAX_MESSAGE + r.randint(1, 1000))}),
                          "message_too_large"),
    "bytes_too_large_utf8": (lambda r: json.dumps({"type": "session.update", "session": {
        "x": "é" * (MAX_MESSAGE // 2 + r.randint(10, 1000))}}, ensure_ascii=False), "message_too_large"),
}  # fmt: skip

# Valid events mixed in: what each makes the server send.
AUDIO = pcm16_b64(tone(0.1))
VALID: list[tuple[str, str]] = [
    (_update({"instructions": "Be brief."}), "session.updated"),
    (_ext({"sampling": {"text": {"temperature": 0.7, "top_k": 20}}}), "session.updated"),
    (_s({"type": "input_audio_buffer.clear"}), "input_audio_buffer.cleared"),
]


def _plan(rng: random.Random, n: int) -> list[tuple[str, str | bytes, str]]:
    """(class or 'valid', message, expected error code or server event) for one session."""
    names = sorted(CLASSES)
    out: list[tuple[str, str | bytes, str]] = []
    for i in range(n):
        if rng.random() < 0.25:
            raw, reply = VALID[rng.randrange(len(VALID))]
            if rng.random() < 0.5:  # audio, cleared right after (the buffer never fills)
                out.append(("valid", _s({"type": "input_audio_buffer.append", "audio": AUDIO}), ""))
                raw, reply = VALID[2]
            out.append(("valid", raw, reply))
        else:
            name = names[i % len(names)] if i < len(names) else rng.choice(names)
            gen, code = CLASSES[name]
            out.append((name, gen(rng), code))
    return out


async def _fuzz_session(url: str, rng: random.Random, n: int, stats: Counter) -> None:
    c = await StrictClient.connect(url, max_size=None)
    await setup(c, max_output_tokens=4)
    plan = _plan(rng, n)
    for name, raw, _ in plan:
        await c.send_raw(raw)
        stats[name] += 1
    marker = f"sync {rng.random()}"
    await c.send("session.update", session={"instructions": marker})
    deadline = time.monotonic() + 120
    while not any(e["type"] == "session.updated" and e["session"]["instructions"] == marker for e in c.events):
        assert time.monotonic() < deadline, "the server did not answer the sync event"
        await c.recv(120)
    errors = [e["error"] for e in c.events if e["type"] == "error"]
    expected = [code for name, _, code in plan if name != "valid"]
    assert [e["code"] for e in errors] == expected
    assert {e["type"] for e in errors} == {"invalid_request_error"}
    stats["errors"] += len(errors)
    # Still usable: a short response.
    await c.send(
        "conversation.item.create",
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
    )
    await c.send("response.create")
    done = await c.wait_for("response.done", timeout=120)
    assert done["response"]["status"] in ("completed", "incomplete")
    await c.close()


async def _closing_class(url: str, raw: str | bytes, as_text: bool, code: int) -> None:
    c = await StrictClient.connect(url, max_size=None)
    await setup(c)
    await c.ws.send(raw, text=as_text)
    assert (await closed(c))[0] == code


def test_fuzz(engine):
    rng = random.Random(SEED)
    stats: Counter = Counter()
    t0 = time.monotonic()
    with serve(engine, max_message_bytes=MAX_MESSAGE) as s, ErrorLog() as log:

        async def go():
            rngs = [random.Random(rng.random()) for _ in range(SESSIONS)]
            await asyncio.gather(*(_fuzz_session(s.url, r, PER_SESSION, stats) for r in rngs))
            for i in range(6):  # the classes the WebSocket layer answers with a close
                await _closing_class(s.url, b'{"type":"\xc3\x28' + bytes([0x80 + i]) + b'"}', True, 1007)
                await _closing_class(s.url, b"\x00" * (2 * MAX_MESSAGE + 1 + i), False, 1009)
                stats["invalid_utf8"] += 1
                stats["over_hard_limit"] += 1
            assert s.state.engine is not None and s.thread.is_alive()

        run(go())
        deadline = time.monotonic() + 10
        while s.state.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not s.state.connections
    classes = [k for k in stats if k not in ("valid", "errors")]
    sent = sum(v for k, v in stats.items() if k != "errors")
    print(
        f"\nfuzz: seed {SEED}, {sent} messages ({stats['valid']} valid) of {len(classes)} malformed classes over "
        f"{SESSIONS} sessions, {stats['errors']} error events, 6 + 6 closes (1007, 1009), "
        f"{time.monotonic() - t0:.1f} s"
    )
    assert len(classes) >= 25
    assert log.lines() == []
