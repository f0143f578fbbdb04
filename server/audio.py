"""Audio on the wire: PCM16 and base64, resampling, Opus packets, the binary frame layout.

Binary server -> client frame (one 80 ms frame per WebSocket binary message), little-endian::

    offset  size  field
    0       2     magic  b"LF" (0x4C 0x46)
    2       1     version (1)
    3       1     format: 1 = PCM16, 2 = Opus
    4       4     response index (uint32; the ``lfm2audio.response_index`` of response.created)
    8       4     frame index within the response (uint32, from 0)
    12      ...   payload

PCM16 payload: 1920 int16 samples, 24 kHz mono (3840 bytes). Opus payload: the raw Opus
packets of the frame (normally two 40 ms packets), each as ``uint16 length`` + packet bytes.
Client -> server binary audio carries no header: raw PCM16 at the declared rate, or Opus
packets in the same length-prefixed layout.
"""

from __future__ import annotations

import base64
import binascii
import struct

import numpy as np

from lfm2audio.engine.config import MAX_INPUT_SAMPLE_RATE, MIN_INPUT_SAMPLE_RATE

MAGIC = b"LF"
VERSION = 1
FORMAT_PCM16 = 1
FORMAT_OPUS = 2
FORMAT_CODES = {"pcm16": FORMAT_PCM16, "opus": FORMAT_OPUS}
HEADER = struct.Struct("<2sBBII")
HEADER_SIZE = HEADER.size  # 12

OPUS_SAMPLE_RATE = 48_000
# Microphone rates accepted: the engine's limits (their one home).
MIN_INPUT_RATE, MAX_INPUT_RATE = MIN_INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLE_RATE


class AudioError(ValueError):
    """Bad audio from a client; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# PCM16 ------------------------------------------------------------------------------------


def pcm16_from_bytes(data: bytes) -> np.ndarray:
    """int16 samples from little-endian PCM16 bytes (an odd byte count is an error)."""
    if len(data) % 2:
        raise AudioError("invalid_audio_length", f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2")


def pcm16_from_base64(text: str) -> np.ndarray:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AudioError("invalid_base64", f"audio is not valid base64: {e}") from None
    return pcm16_from_bytes(data)


def float_to_pcm16(pcm: np.ndarray) -> bytes:
    """Float samples in [-1, 1] to little-endian PCM16 bytes (clipped)."""
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32) / 32768.0


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# G.711 (ITU-T G.711, 8 kHz telephony): mu-law (audio/pcmu) and A-law (audio/pcma), one byte a sample.
# Decoding is a 256-entry table; encoding is the standard segment search, vectorised.


def _ulaw_table() -> np.ndarray:
    b = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((b & 0x0F) << 3) + 0x84) << ((b & 0x70) >> 4)
    return np.where(b & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    b = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (b & 0x70) >> 4
    t = (b & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return np.where(b & 0x80, t, -t).astype(np.int16)


_ULAW, _ALAW = _ulaw_table(), _alaw_table()


def g711_decode(data: bytes, law: str) -> np.ndarray:
    """G.711 bytes (``law`` 'pcmu' or 'pcma') to int16 samples."""
    table = _ULAW if law == "pcmu" else _ALAW
    return table[np.frombuffer(data, dtype=np.uint8)]


def g711_encode(pcm: np.ndarray, law: str) -> bytes:
    """Float samples in [-1, 1] to G.711 bytes."""
    x = (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int32)
    if law == "pcmu":
        sign = np.where(x < 0, 0x80, 0)
        mag = np.minimum(np.abs(x), 32635) + 0x84
        seg = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
        code = ~(sign | (seg << 4) | ((mag >> (seg + 3)) & 0x0F)) & 0xFF
    else:
        sign = np.where(x >= 0, 0x80, 0)
        mag = np.minimum(np.abs(x), 32767) >> 3
        seg = np.clip(np.floor(np.log2(np.maximum(mag, 1))).astype(np.int32) - 4, 0, 7)
        mant = np.where(seg == 0, mag >> 1, mag >> seg) & 0x0F
        code = (sign | (seg << 4) | mant) ^ 0x55
    return code.astype(np.uint8).tobytes()


def g711_from_base64(text: str, law: str) -> np.ndarray:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AudioError("invalid_base64", f"audio is not valid base64: {e}") from None
    return g711_decode(data, law)


class Resampler:
    """Streaming mono float32 resampling to ``out_rate`` (soxr); recreated when the input rate changes."""

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate
        self._rate: int | None = None
        self._stream = None

    def __call__(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        if rate != self._rate:
            self._rate = rate
            if rate == self.out_rate:
                self._stream = None
            else:
                import soxr

                self._stream = soxr.ResampleStream(rate, self.out_rate, 1, dtype="float32")
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        if self._stream is None:
            return pcm
        return np.asarray(self._stream.resample_chunk(pcm), dtype=np.float32)

    def flush(self) -> np.ndarray:
        """The samples still inside the resampler (its delay), ending the stream; the next call starts anew."""
        stream, self._rate, self._stream = self._stream, None, None
        if stream is None:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True), dtype=np.float32)

    def reset(self) -> None:
        self._rate, self._stream = None, None


# Binary frames ------------------------------------------------------------------------------


def pack_frame(fmt: int, response_index: int, frame_index: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, fmt, response_index, frame_index) + payload


def unpack_frame(message: bytes) -> tuple[int, int, int, bytes]:
    """(format, response index, frame index, payload) of a server binary frame."""
    if len(message) < HEADER_SIZE:
        raise ValueError(f"binary frame shorter than its {HEADER_SIZE}-byte header")
    magic, version, fmt, response_index, frame_index = HEADER.unpack_from(message)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"bad frame header: magic {magic!r}, version {version}")
    return fmt, response_index, frame_index, message[HEADER_SIZE:]


def pack_packets(packets: list[bytes]) -> bytes:
    """Length-prefixed Opus packets: ``uint16 LE length`` + bytes, repeated."""
    out = bytearray()
    for p in packets:
        if not 0 < len(p) <= 0xFFFF:
            raise ValueError(f"Opus packet of {len(p)} bytes cannot be length-prefixed")
        out += struct.pack("<H", len(p)) + p
    return bytes(out)


def unpack_packets(data: bytes) -> list[bytes]:
    packets, i = [], 0
    while i < len(data):
        if i + 2 > len(data):
            raise AudioError("invalid_opus", "truncated Opus packet length prefix")
        (n,) = struct.unpack_from("<H", data, i)
        i += 2
        if n == 0 or i + n > len(data):
            raise AudioError("invalid_opus", f"Opus packet length {n} does not fit the message")
        packets.append(data[i : i + n])
        i += n
    if not packets:
        raise AudioError("invalid_opus", "empty Opus message")
    return packets


# Ogg (sphn speaks Ogg/Opus; the wire carries raw packets) --------------------------------------


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def ogg_crc(data: bytes) -> int:
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[((crc >> 24) & 0xFF) ^ b]
    return crc


def ogg_page(packet: bytes, *, serial: int, seq: int, granule: int, header_type: int = 0) -> bytes:
    """One Ogg page holding one whole packet."""
    lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
    if len(lacing) > 255:
        raise ValueError("packet too large for one Ogg page")
    header = b"OggS" + bytes([0, header_type]) + struct.pack("<qIII", granule, serial, seq, 0)
    page = bytearray(header + bytes([len(lacing)]) + lacing + packet)
    struct.pack_into("<I", page, 22, ogg_crc(bytes(page)))
    return bytes(page)


def ogg_packets(data: bytes) -> list[bytes]:
    """Whole packets of a run of Ogg pages (packets spanning pages are joined)."""
    packets: list[bytes] = []
    cur = b""
    i = 0
    while i < len(data):
        if data[i : i + 4] != b"OggS" or i + 27 > len(data):
            raise ValueError("not an Ogg page")
        n = data[i + 26]
        lacing = data[i + 27 : i + 27 + n]
        j = i + 27 + n
        for seg in lacing:
            cur += data[j : j + seg]
            j += seg
            if seg < 255:
                packets.append(cur)
                cur = b""
        i = j
    return packets


def _is_header(packet: bytes) -> bool:
    return packet.startswith(b"OpusHead") or packet.startswith(b"OpusTags")


class OpusFrameEncoder:
    """80 ms frames of 24 kHz PCM in, raw Opus packets out (sphn's Ogg pages unwrapped)."""

    def __init__(self, sample_rate: int = 24_000) -> None:
        import sphn

        self._writer = sphn.OpusStreamWriter(sample_rate)
        self.pre_skip: int | None = None

    def encode(self, pcm: np.ndarray) -> list[bytes]:
        pages = self._writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32))
        if not pages:
            return []
        out = []
        for p in ogg_packets(pages):
            if p.startswith(b"OpusHead"):
                self.pre_skip = struct.unpack_from("<H", p, 10)[0]
            elif not _is_header(p):
                out.append(p)
        return out


class OpusPacketDecoder:
    """Raw Opus packets (any Opus rate/mode, mono or stereo) in, mono float32 at ``sample_rate`` out."""

    SERIAL = 0x4C464D41

    def __init__(self, sample_rate: int = 16_000) -> None:
        import sphn

        self.sample_rate = sample_rate
        self._reader = sphn.OpusStreamReader(sample_rate)
        self._seq = 0
        self._granule = 0
        head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 0, OPUS_SAMPLE_RATE, 0, 0)
        vendor = b"lfm2audio"
        tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
        self._pending = self._page(head, header_type=2) + self._page(tags)

    def _page(self, packet: bytes, header_type: int = 0) -> bytes:
        page = ogg_page(packet, serial=self.SERIAL, seq=self._seq, granule=self._granule, header_type=header_type)
        self._seq += 1
        return page

    def decode(self, packets: list[bytes]) -> np.ndarray:
        data = bytearray(self._pending)
        self._pending = b""
        for p in packets:
            self._granule += opus_packet_samples(p)
            data += self._page(p)
        try:
            out = self._reader.append_bytes(bytes(data))
        except Exception as e:  # sphn raises plain exceptions on corrupt data
            raise AudioError("invalid_opus", f"could not decode Opus: {e}") from None
        if out is None:
            return np.zeros(0, dtype=np.float32)
        out = np.asarray(out, dtype=np.float32)
        return out.mean(0) if out.ndim == 2 else out


def opus_packet_samples(packet: bytes) -> int:
    """Samples at 48 kHz in one Opus packet (RFC 6716 section 3.1); raises AudioError if malformed."""
    if not packet:
        raise AudioError("invalid_opus", "empty Opus packet")
    toc = packet[0]
    config = toc >> 3
    if config < 12:
        frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:
        frame = (480, 960)[config & 1]
    else:
        frame = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    else:
        if len(packet) < 2:
            raise AudioError("invalid_opus", "Opus code-3 packet without a frame count")
        count = packet[1] & 0x3F
        if count == 0:
            raise AudioError("invalid_opus", "Opus packet with zero frames")
    if frame * count > 5760:
        raise AudioError("invalid_opus", "Opus packet longer than 120 ms")
    return frame * count
