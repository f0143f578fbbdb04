"""WAV files and wire audio for the clients: the stdlib ``wave`` module plus numpy, nothing else.

``read_wav`` accepts 8/16/24/32-bit integer PCM and 32/64-bit float WAV files, any rate and
channel count, including WAVE_FORMAT_EXTENSIBLE headers (Python 3.11's ``wave`` rejects those and
float data, so a small RIFF reader takes over for them). ``write_wav`` writes 16-bit PCM.
"""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np

OUTPUT_RATE = 24_000  # what the model speaks
SAMPLES_PER_FRAME = 1920  # one 80 ms frame at 24 kHz

# Server -> client binary frames (see server/audio.py and docs/protocol.md).
FRAME_MAGIC = b"LF"
FRAME_VERSION = 1
FRAME_PCM16 = 1
FRAME_OPUS = 2
FRAME_HEADER = struct.Struct("<2sBBII")

_PCM = 0x0001
_FLOAT = 0x0003
_EXTENSIBLE = 0xFFFE


class WavError(ValueError):
    """A file that is not a WAV file we can read."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: float32 samples in [-1, 1] of shape (channels, frames)."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            data = w.readframes(n)
        return _decode(data, channels, width, rate, _PCM, path), rate
    except wave.Error:
        pass  # extensible or float: read the RIFF chunks ourselves
    except EOFError:
        raise WavError(f"{path}: truncated WAV file") from None
    return _read_riff(path)


def _read_riff(path: Path) -> tuple[np.ndarray, int]:
    raw = path.read_bytes()
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise WavError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, int] | None = None
    data: bytes | None = None
    i = 12
    while i + 8 <= len(raw):
        cid, size = raw[i : i + 4], struct.unpack_from("<I", raw, i + 4)[0]
        body = raw[i + 8 : i + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise WavError(f"{path}: fmt chunk too short")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _EXTENSIBLE:
                if len(body) < 40:
                    raise WavError(f"{path}: WAVE_FORMAT_EXTENSIBLE fmt chunk too short")
                tag = struct.unpack_from("<H", body, 24)[0]  # first two bytes of the sub-format GUID
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            data = body
        i += 8 + size + (size & 1)
    if fmt is None or data is None:
        raise WavError(f"{path}: missing {'fmt' if fmt is None else 'data'} chunk")
    tag, channels, rate, bits = fmt
    if tag not in (_PCM, _FLOAT):
        raise WavError(f"{path}: unsupported WAV encoding (format tag {tag:#06x}); use PCM or float")
    return _decode(data, channels, bits // 8, rate, tag, path), rate


def _decode(data: bytes, channels: int, width: int, rate: int, tag: int, path: Path) -> np.ndarray:
    if channels < 1 or rate < 1:
        raise WavError(f"{path}: invalid header ({channels} channels, {rate} Hz)")
    frame = channels * width
    data = data[: len(data) - len(data) % frame] if frame else b""
    if tag == _FLOAT:
        if width not in (4, 8):
            raise WavError(f"{path}: {8 * width}-bit float WAV is not supported")
        x = np.frombuffer(data, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:
        x = (np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(data, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise WavError(f"{path}: {8 * width}-bit PCM WAV is not supported")
    return np.ascontiguousarray(x.reshape(-1, channels).T)


def write_wav(path: str | Path, samples: np.ndarray, rate: int = OUTPUT_RATE) -> Path:
    """Write mono (or (channels, frames)) float samples as 16-bit PCM; returns the path."""
    path = Path(path)
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"samples must be (frames,) or (channels, frames), got shape {x.shape}")
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(np.ascontiguousarray(pcm.T).tobytes())
    return path


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(channels, frames) or (frames,) -> float32 (frames,), channels averaged."""
    x = np.asarray(samples, dtype=np.float32)
    return x.mean(0) if x.ndim == 2 else x


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Mono float32 resampling with soxr (a runtime dependency of lfm2audio)."""
    if rate_in == rate_out:
        return np.asarray(x, dtype=np.float32)
    import soxr

    return np.asarray(soxr.resample(np.asarray(x, dtype=np.float32), rate_in, rate_out, quality="HQ"), np.float32)


def float_to_pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def parse_frame(message: bytes) -> tuple[int, int, int, bytes]:
    """``(format, response_index, frame_index, payload)`` of a server binary audio frame."""
    if len(message) < FRAME_HEADER.size:
        raise ValueError(f"binary frame of {len(message)} bytes is shorter than its header")
    magic, version, fmt, response_index, frame_index = FRAME_HEADER.unpack_from(message)
    if magic != FRAME_MAGIC or version != FRAME_VERSION:
        raise ValueError(f"unknown binary frame (magic {magic!r}, version {version})")
    return fmt, response_index, frame_index, message[FRAME_HEADER.size :]
