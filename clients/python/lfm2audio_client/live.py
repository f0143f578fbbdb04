"""Hands-free conversation: a live audio source in, the server's VAD takes turns, replies played back.

The microphone and the speaker come from the optional ``sounddevice`` package
(``pip install sounddevice``, which needs the PortAudio library); everything else
takes any async source of 16 kHz PCM16 blocks, which is how the tests drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TextIO

import numpy as np

from lfm2audio_client.audio import OUTPUT_RATE
from lfm2audio_client.realtime import AUDIO_FRAME_EVENT, SEND_RATE, RealtimeClient, Response


class Player(Protocol):
    def play(self, pcm: np.ndarray) -> None: ...

    def flush(self) -> None: ...


def _sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError) as e:
        raise RuntimeError(
            "the microphone and speaker need the optional 'sounddevice' package and the PortAudio library "
            f"(pip install sounddevice; apt-get install libportaudio2): {e}"
        ) from None
    return sounddevice


async def microphone(block_s: float = 0.02, device: int | str | None = None) -> AsyncIterator[bytes]:
    """16 kHz mono PCM16 blocks from the default (or given) input device, as they are recorded."""
    sd = _sounddevice()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def callback(indata: Any, frames: int, time: Any, status: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, bytes(indata))

    stream = sd.RawInputStream(
        samplerate=SEND_RATE,
        channels=1,
        dtype="int16",
        blocksize=int(block_s * SEND_RATE),
        device=device,
        callback=callback,
    )
    with stream:
        while True:
            yield await queue.get()


class SpeakerPlayer:
    """A small jitter buffer in front of the default output device (24 kHz mono)."""

    def __init__(self, device: int | str | None = None, prebuffer_s: float = 0.12) -> None:
        sd = _sounddevice()
        self._chunks: deque[np.ndarray] = deque()
        self._lock = threading.Lock()
        self._buffered = 0
        self._prebuffer = int(prebuffer_s * OUTPUT_RATE)
        self._playing = False
        self._ending = False  # the reply is complete: play its tail even if shorter than the prebuffer
        self._stream = sd.OutputStream(
            samplerate=OUTPUT_RATE, channels=1, dtype="float32", device=device, callback=self._callback
        )
        self._stream.start()

    def _callback(self, outdata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        out = outdata[:, 0]
        out.fill(0.0)
        with self._lock:
            if not self._playing and self._buffered < self._prebuffer and not self._ending:
                return
            self._playing = True
            i = 0
            while i < frames and self._chunks:
                c = self._chunks[0]
                n = min(len(c), frames - i)
                out[i : i + n] = c[:n]
                i += n
                self._buffered -= n
                if n == len(c):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = c[n:]
            if not self._chunks:
                self._playing = False  # underrun or end: buffer again before resuming
                self._ending = False

    def play(self, pcm: np.ndarray) -> None:
        with self._lock:
            self._chunks.append(np.asarray(pcm, dtype=np.float32))
            self._buffered += len(pcm)

    def end(self) -> None:
        """The reply is complete: play what is buffered even if shorter than the prebuffer."""
        with self._lock:
            if self._buffered:
                self._ending = True

    def flush(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._buffered = 0
            self._playing = False
            self._ending = False

    def close(self) -> None:
        self._stream.stop()
        self._stream.close()


async def converse(
    client: RealtimeClient,
    source: AsyncIterator[bytes],
    *,
    player: Player | None = None,
    out: TextIO = sys.stdout,
    log: TextIO = sys.stderr,
    on_response: Callable[[Response], None] | None = None,
    max_responses: int | None = None,
) -> list[Response]:
    """Stream ``source`` (16 kHz PCM16 blocks) to a session configured with ``server_vad``; print the
    transcript as it arrives, play replies on ``player``, and stop playback the moment the user
    speaks (the server cancels the response: barge-in). Ends when ``source`` ends and the last
    response is done, after ``max_responses`` responses, or when the connection closes."""
    done: list[Response] = []
    muted: set[int] = set()  # responses interrupted by the user: their late frames are not played

    async def send() -> None:
        async for block in source:
            await client.send_pcm16(block)

    sender = asyncio.create_task(send())
    last_event = time.monotonic()
    try:
        while True:
            try:
                ev = await client.recv(timeout=0.2)
            except TimeoutError:
                if sender.done():
                    sender.result()  # re-raise a failed source
                    # The source ended: finish once no response runs and none was started for a second
                    # (the server may still be committing the last turn).
                    idle = not any(not r.done for r in client.responses.values())
                    if idle and time.monotonic() - last_event > 1.0:
                        return done
                continue
            last_event = time.monotonic()
            t = ev["type"]
            if t == "input_audio_buffer.speech_started":
                muted.update(i for i, r in client.responses.items() if not r.done)
                if player is not None:
                    player.flush()
                print("\n[listening]", file=log, flush=True)
            elif t == "response.created":
                print("assistant: ", end="", file=out, flush=True)
            elif t in ("response.output_audio_transcript.delta", "response.output_text.delta"):
                print(ev.get("delta", ""), end="", file=out, flush=True)
            elif t == AUDIO_FRAME_EVENT:
                if player is not None and ev["response_index"] not in muted:
                    player.play(ev["pcm"])
            elif t == "response.done":
                r = next((x for x in client.responses.values() if x.id == ev["response"]["id"]), None)
                print("", file=out, flush=True)
                if r is not None:
                    print(summary(r), file=log, flush=True)
                    done.append(r)
                    if player is not None and hasattr(player, "end"):
                        player.end()
                    if on_response is not None:
                        on_response(r)
                if max_responses is not None and len(done) >= max_responses:
                    return done
            elif t == "error":
                err = ev["error"]
                print(f"\n[error {err.get('code')}: {err.get('message')}]", file=log, flush=True)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


def summary(r: Response) -> str:
    """``[completed · first audio 312 ms · 3.20 s audio · server RTF 0.41]``"""
    parts = [r.status if r.reason is None else f"{r.status} ({r.reason})"]
    if r.time_to_first_audio_s is not None:
        parts.append(f"first audio {r.time_to_first_audio_s * 1000:.0f} ms")
    if r.chunks:
        parts.append(f"{r.audio_seconds:.2f} s audio")
    rtf = r.stats.get("real_time_factor")
    if rtf is not None:
        parts.append(f"server RTF {rtf:.2f}")
    return "[" + " · ".join(parts) + "]"
