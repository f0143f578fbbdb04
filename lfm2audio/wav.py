"""WAV files for the offline ``lfm2audio`` command: read what recorders write, write 16-bit PCM.

The library keeps its own few lines of WAV instead of borrowing the Python client's (a separate
package that the library must not depend on). One RIFF walker reads every layout the CLI accepts:
8/16/24/32-bit integer PCM, 32/64-bit IEEE float, plain or WAVE_FORMAT_EXTENSIBLE headers
(Python 3.11's ``wave`` module rejects the last two, so it is not used here).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


class WavError(ValueError):
    """A file that is not a WAV file the CLI can read."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: float32 samples in [-1, 1] of shape (channels, frames)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise WavError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos + 8 <= len(raw):
        name, size = raw[pos : pos + 4], int.from_bytes(raw[pos + 4 : pos + 8], "little")
        chunks.setdefault(name, raw[pos + 8 : pos + 8 + size])
        pos += 8 + size + size % 2  # chunks are padded to an even length
    fmt, data = chunks.get(b"fmt "), chunks.get(b"data")
    if fmt is None or len(fmt) < 16 or data is None:
        raise WavError(f"{path}: truncated WAV file (no complete fmt and data chunks)")
    encoding, channels, rate = struct.unpack_from("<HHI", fmt)
    bits = struct.unpack_from("<H", fmt, 14)[0]
    if encoding == _EXTENSIBLE and len(fmt) >= 26:
        encoding = struct.unpack_from("<H", fmt, 24)[0]  # the sub-format GUID starts with the real tag
    width = bits // 8
    if channels < 1 or rate < 1 or width < 1:
        raise WavError(f"{path}: invalid header ({channels} channels, {rate} Hz, {bits} bits)")
    usable = len(data) - len(data) % (channels * width)
    frames = np.frombuffer(data[:usable], dtype=np.uint8).reshape(-1, width)
    if encoding == _FLOAT and width in (4, 8):
        x = frames.copy().view("<f4" if width == 4 else "<f8").reshape(-1).astype(np.float32)
    elif encoding == _PCM and width <= 4:
        # Little-endian integers of any width: widen to int64, then centre (8-bit WAV is unsigned).
        v = (frames.astype(np.int64) << (8 * np.arange(width))).sum(1)
        full = 1 << (8 * width)
        v = v - full // 2 if width == 1 else np.where(v >= full // 2, v - full, v)
        x = (v / (full // 2)).astype(np.float32)
    else:
        raise WavError(f"{path}: unsupported WAV encoding (tag {encoding:#06x}, {bits} bits); use PCM or float")
    return np.ascontiguousarray(x.reshape(-1, channels).T), rate


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> Path:
    """Write (frames,) or (channels, frames) float samples as 16-bit PCM; returns the path."""
    path = Path(path)
    x = np.asarray(samples, dtype=np.float32)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"samples must be (frames,) or (channels, frames), got shape {x.shape}")
    body = (np.clip(x.T, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    channels = x.shape[0]
    fmt = struct.pack("<HHIIHH", _PCM, channels, rate, rate * 2 * channels, 2 * channels, 16)
    header = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(header) + len(body)) + header + body)
    return path
