"""Helpers of the HTTP API tests: audio files, golden expectations, direct engine runs to compare with."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import soundfile as sf

from lfm2audio.engine import AudioFrame, ResponseDone, SessionConfig, TextDelta
from lfm2audio.sampling import SamplingParams

GREEDY_SPEECH = {"sampling": {"audio": {"temperature": 0}}}


def wav_bytes(x: np.ndarray, rate: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.asarray(x, dtype=np.float32), rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def golden_wave(golden: dict) -> np.ndarray:
    """The golden user utterance (16 kHz float32)."""
    return golden["input.wave_user1"][0].numpy().astype(np.float32)


def golden_stream(golden: dict, name: str, steps: int) -> tuple[list[int], int]:
    """(text token ids, audio frame count) of the first ``steps`` rows of a golden token stream."""
    modality = golden[f"{name}.modality"][:steps]
    ids = golden[f"{name}.steps"][:steps, 0][modality == 1].tolist()
    return ids, int((modality == 3).sum())


def direct(engine: Any, config: SessionConfig, *, text: str | None = None, audio: tuple | None = None) -> dict:
    """One response straight on the engine: its text and its PCM, for comparison with the HTTP API."""
    s = engine.open_session(config)
    try:
        if audio is not None:
            s.append_audio(*audio)
            s.commit_audio()
        if text is not None:
            s.add_text(text)
        s.create_response()
        out: dict = {"text": [], "pcm": []}
        deadline = time.monotonic() + 120
        while True:
            ev = s.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if isinstance(ev, TextDelta):
                out["text"].append(ev.text)
            elif isinstance(ev, AudioFrame) and not ev.end_of_audio:
                out["pcm"].append(ev.pcm)
            elif isinstance(ev, ResponseDone):
                out["text"] = "".join(out["text"])
                out["pcm"] = np.concatenate(out["pcm"]) if out["pcm"] else np.zeros(0, np.float32)
                out["done"] = ev
                return out
    finally:
        s.close()


def tts_config(prompt: str, max_tokens: int) -> SessionConfig:
    greedy = SamplingParams()
    return SessionConfig(
        mode="tts", instructions=prompt, text_sampling=greedy, audio_sampling=greedy, max_output_tokens=max_tokens
    )


def pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1, 1) * 32767.0).round().astype(np.int16)
