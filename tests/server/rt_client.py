"""Helpers of the server tests: a small realtime client and test signals (servers: ``live_server``)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np

# Tests that talk to a server get at most this long per wait.
TIMEOUT = 30.0


class Client:
    """A small realtime client over the websockets library: every event received is kept in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self.binary: list[bytes] = []
        self._consumed: set[int] = set()

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Client:
        import websockets

        kwargs.setdefault("open_timeout", TIMEOUT)
        ws = await websockets.connect(url, **kwargs)
        return cls(ws)

    async def send(self, type: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": type, **fields}))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout: float = TIMEOUT) -> dict | bytes:
        msg = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(msg, bytes):
            self.binary.append(msg)
            return msg
        ev = json.loads(msg)
        self.events.append(ev)
        return ev

    async def wait_for(self, type: str, timeout: float = TIMEOUT, **match: Any) -> dict:
        """The first event of ``type`` (matching ``match``) not returned by an earlier wait_for,
        receiving as needed."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if i not in self._consumed and ev["type"] == type and all(ev.get(k) == v for k, v in match.items()):
                    self._consumed.add(i)
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                got = [e["type"] for e in self.events[-15:]]
                raise AssertionError(f"no {type} within {timeout} s; last events: {got}") from None
            try:
                await self.recv(left)
            except TimeoutError:
                got = [e["type"] for e in self.events[-15:]]
                raise AssertionError(f"no {type} within {timeout} s; last events: {got}") from None

    def of(self, type: str) -> list[dict]:
        return [e for e in self.events if e["type"] == type]

    async def close(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def pcm16_b64(x: np.ndarray) -> str:
    return base64.b64encode((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def tone(seconds: float, rate: int = 24_000, freq: float = 220.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


VOWELS = {
    "a": (730, 1090, 2440),
    "i": (270, 2290, 3010),
    "u": (300, 870, 2240),
    "e": (530, 1840, 2480),
    "o": (570, 840, 2410),
}


def _resonate(x: np.ndarray, f: float, bw: float, rate: int) -> np.ndarray:
    """A two-pole resonator (one formant), vectorised by its impulse response."""
    r = np.exp(-np.pi * bw / rate)
    th = 2 * np.pi * f / rate
    n = np.arange(int(rate * 0.05))
    h = (1 - r) * r**n * np.sin(th * (n + 1)) / np.sin(th)
    return np.convolve(x, h)[: len(x)]


def synthetic_speech(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Formant-synthesised vowels (a glottal pulse train with vibrato through three formant resonators,
    syllable envelopes). Silero VAD scores it > 0.9; pure tones score ~0."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    out = np.zeros(n)
    pos = 0
    while pos < n:
        syl = min(int(rng.uniform(0.15, 0.3) * rate), n - pos)
        formants = VOWELS[rng.choice(list(VOWELS))]
        t = np.arange(syl) / rate
        f0 = 120 * (1 + 0.1 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6))) * rng.uniform(0.9, 1.2)
        phase = np.cumsum(f0 / rate)
        src = (np.diff(np.floor(phase), prepend=0) > 0).astype(float) + 0.02 * rng.standard_normal(syl)
        y = sum(_resonate(src, f, 80 + f * 0.06, rate) for f in formants)
        out[pos : pos + syl] = y * np.sin(np.pi * np.arange(syl) / syl) ** 0.5
        pos += syl
    out /= np.abs(out).max() + 1e-9
    return (0.5 * out).astype(np.float32)


GREEDY = {"lfm2audio": {"sampling": {"text": {"temperature": 0}, "audio": {"temperature": 0}}}}


async def setup(client: Client, **session: Any) -> dict:
    """session.update (manual turns, greedy, plus ``session``) and wait for session.updated."""
    body: dict = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
    body = _merge(body, GREEDY)
    body = _merge(body, session)
    await client.send("session.update", session=body)
    return await client.wait_for("session.updated")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
