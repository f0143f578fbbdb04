"""Audio files of the HTTP API: decoding uploads, encoding speech as it is generated.

Decoding goes through libsndfile (the ``soundfile`` wheel bundles it with FLAC, Ogg Vorbis/Opus and
MP3 support), which reads the format from the bytes, whatever the file is named. Encoding: raw PCM,
WAV and Ogg/Opus (sphn) stream frame by frame; FLAC and MP3 are written by libsndfile, which needs a
seekable file to finish their headers, so those are sent whole once generation ends.
"""

from __future__ import annotations

import io
import struct
from typing import Literal

import numpy as np

from lfm2audio_server.audio import float_to_pcm16

SpeechFormat = Literal["pcm", "wav", "opus", "flac", "mp3"]
SPEECH_FORMATS: tuple[str, ...] = ("pcm", "wav", "opus", "flac", "mp3")
STREAMING_FORMATS = ("pcm", "wav", "opus")
MEDIA_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
}
# Named in errors: what decode_audio reads.
READABLE = "wav, flac, ogg (vorbis or opus), mp3, aiff"


class AudioFileError(ValueError):
    """An upload that is not audio we can read (the message says why)."""


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate from the bytes of an audio file (any rate, any channels)."""
    import soundfile as sf

    if not data:
        raise AudioFileError("the audio file is empty")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile names the problem ("Format not recognised", ...)
        kind = _sniff(data)
        hint = f" (it looks like {kind}, which is not supported)" if kind else ""
        raise AudioFileError(f"could not decode the audio file{hint}: {e}; supported: {READABLE}") from None
    if samples.shape[0] == 0:
        raise AudioFileError("the audio file holds no samples")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise AudioFileError("the audio file holds non-finite samples")
    return np.ascontiguousarray(mono, dtype=np.float32), int(rate)


def _sniff(data: bytes) -> str | None:
    head = data[:12]
    if head[4:8] == b"ftyp":
        return "MP4/M4A"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "WebM/Matroska"
    return None


def wav_header(rate: int, *, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 16-bit mono PCM WAV header; the default sizes say 'unknown length' for a stream."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


class SpeechEncoder:
    """24 kHz float PCM frames in, bytes of ``fmt`` out: ``push`` per frame, ``finish`` at the end."""

    def __init__(self, fmt: SpeechFormat, rate: int = 24_000) -> None:
        if fmt not in SPEECH_FORMATS:
            raise ValueError(f"unsupported format {fmt!r}")
        self.fmt = fmt
        self.rate = rate
        self.media_type = MEDIA_TYPES[fmt]
        self.streams = fmt in STREAMING_FORMATS
        self._started = False
        self._held: list[np.ndarray] = []
        self._opus = None
        if fmt == "opus":
            import sphn

            self._opus = sphn.OpusStreamWriter(rate)

    def push(self, pcm: np.ndarray) -> bytes:
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        if not self.streams:
            self._held.append(pcm)
            return b""
        head = b""
        if not self._started:
            self._started = True
            head = wav_header(self.rate) if self.fmt == "wav" else b""
        if self.fmt == "opus":
            return bytes(self._opus.append_pcm(pcm))  # type: ignore[union-attr]
        return head + float_to_pcm16(pcm)

    def finish(self) -> bytes:
        """What is left: the whole file for flac/mp3, a header for an empty wav, else nothing."""
        if self.streams:
            if self.fmt == "wav" and not self._started:
                return wav_header(self.rate, data_bytes=0)
            if self.fmt == "opus" and not self._started:
                # No frame was pushed: an empty but valid Ogg/Opus stream (headers only).
                self._started = True
                return bytes(self._opus.append_pcm(np.zeros(0, dtype=np.float32)))  # type: ignore[union-attr]
            return b""
        import soundfile as sf

        pcm = np.concatenate(self._held) if self._held else np.zeros(0, dtype=np.float32)
        self._held = []
        buf = io.BytesIO()
        subtype = "PCM_16" if self.fmt == "flac" else "MPEG_LAYER_III"
        sf.write(buf, pcm, self.rate, format=self.fmt.upper(), subtype=subtype)
        return buf.getvalue()


def encode_whole(pcm: np.ndarray, fmt: SpeechFormat, rate: int = 24_000) -> bytes:
    """A complete file of ``pcm`` (wav with its real sizes)."""
    if fmt == "wav":
        body = float_to_pcm16(pcm)
        return wav_header(rate, data_bytes=len(body)) + body
    enc = SpeechEncoder(fmt, rate)
    return enc.push(pcm) + enc.finish()
