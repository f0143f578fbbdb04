"""The browser voice assistant (clients/web) in real headless Chromium against a live server.

Chromium comes from Debian (``apt-get install -y chromium``), driven by Playwright for Python with
``executable_path`` (never ``playwright install``). Its fake microphone plays a WAV spoken by
espeak-ng (``apt-get install -y espeak-ng``), looped: speech, then silence. The server runs the real
engine on the tiny golden checkpoint on 127.0.0.1. Screenshots go to ``tests/artifacts/`` (ignored
by git; ``LFM2AUDIO_TEST_ARTIFACTS`` overrides), so that the top level keeps to the design card.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import espeak, serve

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LFM2AUDIO_TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))
CHROMIUM = os.environ.get("LFM2AUDIO_CHROMIUM", "/usr/bin/chromium")
PHONE = {"width": 390, "height": 844}
WAIT = 45.0  # seconds any one expectation may take

# Speech from 0.4 s to ~2.4 s, then silence; Chromium loops the file (a cycle of about 6.5 s).
SPOKEN = "Hello! Can you tell me a joke about computers?"
LEAD_S, TAIL_S = 0.4, 4.0


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (or set LFM2AUDIO_CHROMIUM)")
    wav = espeak(SPOKEN, tmp_path_factory.mktemp("mic") / "mic.wav", lead_s=LEAD_S, tail_s=TAIL_S, rate=48_000)
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    ]
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield b
        b.close()


class Page:
    """A phone-sized page of the assistant, with helpers over ``window.lfm2audio.snapshot()``."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport=PHONE, device_scale_factor=1)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.goto(url)
        self.page.wait_for_function("window.lfm2audio !== undefined")

    def snap(self) -> dict:
        return self.page.evaluate("window.lfm2audio.snapshot()")

    def wait(self, what: str, cond: Callable[[dict], Any], timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            s = self.snap()
            got = cond(s)
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; page state: {_brief(s)}; console: {self.console[-10:]}"
                )
            time.sleep(0.1)

    def connect(self) -> dict:
        self.page.get_by_role("button", name="Connect").click()
        return self.wait("connected", lambda s: s if s["state"] not in ("connecting", "disconnected") else None)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=False)
        return path

    def close(self) -> None:
        self.context.close()


def _brief(s: dict) -> dict:
    return {
        "state": s["state"],
        "status": s["status"],
        "codecs": s["codecs"],
        "frames": s["framesReceived"],
        "playback": s["playback"],
        "turns": [(t["role"], t["text"][:24], t["status"], t["meta"]) for t in s["turns"]],
        "errors": s["errors"][-3:],
        "events": s["events"][-8:],
    }


def _silenced(s: dict, at: float) -> float | None:
    """Milliseconds from the barge-in at ``at`` to the playback worklet's flush acknowledgement."""
    b = next((b for b in s["bargeInLog"] if b["at"] == at), None)
    return None if b is None else b.get("silencedMs")


def _assistant(s: dict, pred: Callable[[dict], bool]) -> dict | None:
    return next((t for t in s["turns"] if t["role"] == "assistant" and pred(t)), None)


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    p = Page(browser, server.http + "/")
    yield p
    p.close()


def test_hands_free_turn_transcript_playback_and_screenshot(page: Page):
    pg = page.page
    assert pg.title() == "LFM2-Audio voice assistant"
    pg.locator("summary").click()  # open the settings
    pg.get_by_label("Max output tokens").fill("48")
    pg.locator("summary").click()  # fold them away again
    s = page.connect()
    # Chromium has WebCodecs: Opus both ways by default.
    assert s["codecs"] == {"input": "opus", "output": "opus"}, s["codecs"]
    assert s["mic"]["sending"] and s["transcription"]

    # The fake microphone speaks; server VAD ends the turn; the reply streams and plays; the
    # transcription session fills in the user's words.
    def done_turn(s: dict) -> dict | None:
        t = _assistant(s, lambda t: t["status"] in ("completed", "incomplete") and t["text"] and t["heard"])
        users = [u for u in s["turns"] if u["role"] == "user" and not u["placeholder"] and u["text"]]
        return t if t and users else None

    turn = page.wait("a completed turn with its transcript, heard", done_turn)
    s = page.snap()
    assert turn["frames"] > 0 and turn["reason"] in (None, "max_output_tokens")  # the model may end its turn
    assert "first audio" in turn["meta"] and "server" in turn["meta"]
    assert s["playback"]["pushedFrames"] >= turn["frames"] > 0
    assert s["playback"]["pushedSamples"] > 0 and s["playback"]["playedSamples"] > 0
    assert "input_audio_buffer.speech_started" in s["events"] and "input_audio_buffer.speech_stopped" in s["events"]
    assert "response.output_audio_transcript.delta" in s["events"]
    assert s["mic"]["sentBytes"] > 0
    assert not [c for c in page.console if c.startswith(("error", "pageerror"))], page.console

    # The screenshot shows the completed turn: the user's (transcribed) words and the reply with its timing.
    bubble = pg.locator(f'article.turn.assistant[data-index="{turn["index"]}"]')
    bubble.scroll_into_view_if_needed()
    assert turn["text"][:10] in bubble.inner_text() and "first audio" in bubble.inner_text()
    page.screenshot("browser-hands-free-turn.png")


def test_hands_free_barge_in_stops_playback_and_cancels(page: Page):
    # No token limit, greedy decoding: replies are still being generated and played when the looped file
    # speaks again (should the random-weight model end one early, the next cycle is tried).
    pg = page.page
    pg.locator("summary").click()
    for field in ("#text-temperature", "#audio-temperature"):
        pg.locator(field).fill("0")
    pg.locator("summary").click()
    page.connect()
    page.wait("a reply being heard", lambda s: _assistant(s, lambda t: t["heard"]))

    def barge_in_on_generating_reply(s: dict) -> dict | None:
        for b in s["bargeInLog"]:
            if b["by"] == "server_vad" and any(r["status"] == "in_progress" for r in b["responses"]):
                return b
        return None

    barge = page.wait("speech over a reply still being generated", barge_in_on_generating_reply)
    s = page.snap()
    assert s["playback"]["flushes"] >= 1 and s["bargeIns"] >= 1
    silenced = page.wait("the playback flush acknowledged", lambda s: _silenced(s, barge["at"]), timeout=2.0)
    assert silenced < 100, f"playback took {silenced:.0f} ms to stop"
    index = next(r["index"] for r in barge["responses"] if r["status"] == "in_progress")
    t = page.wait(
        "the interrupted reply cancelled by the server",
        lambda s: _assistant(s, lambda t: t["index"] == index and t["status"] != "in_progress"),
    )
    assert t["status"] == "cancelled" and t["reason"] == "turn_detected", t
    assert t["interrupted"] and "interrupted" in t["meta"]
    # Playback stopped at once: nothing of the interrupted reply is queued or playing.
    s = page.snap()
    assert s["playback"]["playing"] != index
    page.screenshot("browser-barge-in.png")


def test_push_to_talk_with_pcm16_and_keyboard(page: Page):
    pg = page.page
    pg.locator("summary").click()
    pg.get_by_label("Audio codec").select_option("pcm16")
    pg.get_by_label("Show what I said").uncheck()
    pg.locator("summary").click()
    pg.get_by_text("Push to talk", exact=True).click()
    s = page.connect()
    assert s["codecs"] == {"input": "pcm16", "output": "pcm16"}
    assert not s["mic"]["sending"]  # nothing leaves until the button is held
    talk = pg.get_by_role("button", name="Hold to talk")
    time.sleep(1.0)
    assert page.snap()["mic"]["sentBytes"] == 0

    # Hold the button with the mouse for 1.5 s: ~1.5 s of 16 kHz PCM16 leaves, then commit + response.
    talk.hover()
    pg.mouse.down()
    page.wait("talking", lambda s: s["mic"]["sending"])
    time.sleep(1.5)
    pg.mouse.up()
    s = page.wait("sent", lambda s: s if not s["mic"]["sending"] else None)
    assert 1.2 * 32000 <= s["mic"]["sentBytes"] <= 3.0 * 32000
    voice = next(t for t in s["turns"] if t["role"] == "user")
    assert voice["text"].startswith("Voice message")
    first = page.wait("a reply being heard", lambda s: _assistant(s, lambda t: t["heard"] and t["frames"] > 0))
    assert first["status"] in ("in_progress", "completed", "incomplete")

    # Barge-in by keyboard: Space on the focused talk button while the reply plays stops it at once and
    # cancels it (response.cancel); releasing sends the new turn. (If the random model already ended its
    # reply and it finished playing, there is nothing to interrupt: talk again and retry.)
    for _attempt in range(3):
        logged = len(page.snap()["bargeInLog"])
        pg.get_by_role("button", name="Hold to talk").focus()
        pg.keyboard.down(" ")
        page.wait("talking", lambda s: s["mic"]["sending"])
        time.sleep(1.0)
        pg.keyboard.up(" ")
        s = page.snap()
        if len(s["bargeInLog"]) > logged:
            break
        page.wait("a reply being heard", lambda s: _assistant(s, lambda t: t["heard"] and t["status"] == "in_progress"))
    else:
        raise AssertionError("no reply was playing when the talk button was pressed")
    barge = s["bargeInLog"][logged]
    assert barge["by"] == "client"
    silenced = page.wait("the playback flush acknowledged", lambda s: _silenced(s, barge["at"]), timeout=2.0)
    assert silenced < 100, f"playback took {silenced:.0f} ms to stop"
    interrupted = barge["responses"][0]
    t = page.wait(
        "the interrupted reply done",
        lambda s: _assistant(s, lambda t: t["index"] == interrupted["index"] and t["status"] != "in_progress"),
    )
    assert t["interrupted"]
    if interrupted["status"] == "in_progress":  # still generating when interrupted: cancelled by the client
        assert t["status"] == "cancelled" and t["reason"] == "client_cancelled", t
    second = page.wait(
        "the next reply",
        lambda s: _assistant(s, lambda t: t["index"] > interrupted["index"] and t["frames"] > 0 and t["heard"]),
    )
    assert not second["interrupted"]
    page.screenshot("browser-push-to-talk.png")


def test_text_to_speech_mode_and_text_messages(page: Page):
    pg = page.page
    pg.get_by_text("Speak text", exact=True).click()
    s = page.connect()
    assert s["mic"] is None and not s["transcription"]  # TTS needs no microphone
    assert pg.get_by_role("button", name="Hold to talk").is_hidden()
    pg.get_by_label("Voice description").fill("A calm female voice with clear diction.")
    pg.get_by_label("Voice description").dispatch_event("change")
    pg.locator("summary").click()
    pg.get_by_label("Max output tokens").fill("12")
    pg.get_by_label("Max output tokens").dispatch_event("change")
    time.sleep(0.6)  # the settings go out debounced
    pg.get_by_role("textbox", name="Message").fill("The quick brown fox jumps over the lazy dog.")
    pg.get_by_role("textbox", name="Message").press("Enter")
    t = page.wait("the TTS reply", lambda s: _assistant(s, lambda t: t["status"] != "in_progress"))
    s = page.snap()
    assert s["turns"][0]["role"] == "user" and s["turns"][0]["text"] == "The quick brown fox jumps over the lazy dog."
    assert t["status"] == "incomplete" and t["reason"] == "max_output_tokens"
    assert "session.updated" in s["events"]


def test_api_key_and_connection_errors(browser, engine):
    with serve(engine, api_keys=("k-123_secret",)) as s:
        p = Page(browser, s.http + "/")
        try:
            pg = p.page
            pg.locator("summary").click()
            pg.get_by_label("API key").fill("wrong")
            pg.get_by_role("button", name="Connect").click()
            p.wait("refused", lambda s: s if s["state"] == "disconnected" and s["errors"] else None)
            assert pg.get_by_role("alert").is_visible()
            assert "invalid API key" in pg.get_by_role("alert").inner_text()

            pg.get_by_label("API key").fill("k-123_secret")  # sent as a WebSocket subprotocol
            snap = p.connect()
            assert snap["state"] != "disconnected" and snap["transcription"], _brief(snap)
        finally:
            p.close()


def test_unreachable_server_and_accessibility(page: Page):
    pg = page.page
    # Every form control has an accessible name; the transcript is a live region.
    unnamed = pg.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
              .filter((el) => !el.labels?.length && !el.getAttribute('aria-label') && !el.textContent.trim()
                              && !el.closest('label'))
              .map((el) => el.id || el.outerHTML)"""
    )
    assert unnamed == []
    assert pg.locator("#turns").get_attribute("aria-live") == "polite"
    assert pg.get_by_role("status").count() == 1
    # Keyboard: Tab reaches Connect from the top of the page.
    pg.keyboard.press("Tab")
    pg.keyboard.press("Tab")
    assert pg.evaluate("document.activeElement.id") == "connect"
    # Nothing sticks out of a phone-sized screen.
    assert pg.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

    pg.locator("summary").click()
    pg.get_by_label("Server").fill("ws://127.0.0.1:9/v1/realtime")
    pg.get_by_role("button", name="Connect").click()
    page.wait("the failure", lambda s: s if s["state"] == "disconnected" and s["errors"] else None)
    assert "Could not connect" in pg.get_by_role("alert").inner_text()


def test_worklet_resampler(page: Page):
    """The resampler of both worklets: passband kept, what would alias removed, chunking invisible."""
    r = page.page.evaluate(
        """async () => {
          const { Resampler } = await import("/worklets/resampler.js");
          const tone = (f, rate, n) =>
            Float32Array.from({ length: n }, (_, i) => Math.sin((2 * Math.PI * f * i) / rate));
          const rms = (x) => Math.sqrt(x.reduce((a, v) => a + v * v, 0) / x.length);
          const run = (inRate, outRate, x, chunk) => {
            const r = new Resampler(inRate, outRate);
            const parts = [];
            for (let i = 0; i < x.length; i += chunk) parts.push(r.process(x.subarray(i, i + chunk)));
            const out = new Float32Array(parts.reduce((a, p) => a + p.length, 0));
            let o = 0;
            for (const p of parts) { out.set(p, o); o += p.length; }
            return out;
          };
          const x = tone(1000, 48000, 48000);
          const a = run(48000, 16000, x, 128);     // microphone: 128-sample render quanta
          const b = run(48000, 16000, x, 48000);   // all at once
          let diff = 0;
          for (let i = 0; i < Math.min(a.length, b.length); i++) diff = Math.max(diff, Math.abs(a[i] - b[i]));
          const up = run(24000, 44100, tone(3000, 24000, 24000), 1920);   // playback: 80 ms frames
          return {
            len: a.length, diff,
            pass: rms(a.subarray(1000, 15000)) * Math.SQRT2,
            alias: rms(run(48000, 16000, tone(11000, 48000, 48000), 128).subarray(1000, 15000)) * Math.SQRT2,
            upLen: up.length, upPass: rms(up.subarray(2000, 40000)) * Math.SQRT2,
          };
        }"""
    )
    assert abs(r["len"] - 16000) <= 40 and r["diff"] < 1e-6
    assert abs(r["pass"] - 1) < 0.01  # 1 kHz passes at unit gain
    assert r["alias"] < 0.01  # 11 kHz is above the 8 kHz Nyquist: removed, not folded to 5 kHz
    assert abs(r["upLen"] - 44100) <= 40 and abs(r["upPass"] - 1) < 0.01
