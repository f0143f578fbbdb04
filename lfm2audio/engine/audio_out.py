"""Streaming audio output for the engine's session slots: Mimi or the LFM2.5 detokenizer.

Each slot has its own decoder row; a response restarts its slot's row. Codes
outside [0, 2047] (2048 can be drawn in codebooks 1..7, which the reference
would crash on) are clamped for decoding only: the history keeps what was drawn.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lfm2audio.engine.events import SAMPLES_PER_FRAME

Decoder = Literal["auto", "mimi", "detokenizer"]


class SlotAudioDecoder:
    """One batched streaming state whose row ``slot`` belongs to that slot's session."""

    def __init__(self, codec: Any, kind: str, slots: int) -> None:
        self.codec = codec
        self.kind = kind
        self.slots = slots
        self.state = codec.decoder_state(slots) if kind == "mimi" else codec.stream_state(slots)

    def reset(self, slot: int) -> None:
        self.state.reset_rows([slot])

    @torch.inference_mode()
    def decode(self, slots: list[int], codes: Tensor) -> Tensor:
        """PCM (len(slots), 1920) float32 for frames ``codes`` (len(slots), 8), one batched step.

        Rows without a frame must not advance. When most rows speak, every row is
        stepped and the silent ones are put back from a copy; otherwise the
        speaking rows are stepped on their own and written back. Either way the
        copies are of the fewer rows.
        """
        codes = codes.clamp(0, 2047)
        n = self.slots
        idx = torch.tensor(slots, dtype=torch.long, device=codes.device)
        if 2 * len(slots) >= n:
            idle = sorted(set(range(n)) - set(slots))
            saved = self.state.select(idle) if idle else None
            full = torch.zeros((n, codes.shape[1]), dtype=codes.dtype, device=codes.device)
            full[idx] = codes
            pcm, _ = self.codec.decode_step(full, self.state)
            if saved is not None:
                self.state.assign_rows(idle, saved)
            pcm = pcm.reshape(n, -1)[idx]
        else:
            sub = self.state.select(slots)
            pcm, sub = self.codec.decode_step(codes, sub)
            self.state.assign_rows(slots, sub)
        return pcm.reshape(len(slots), -1)[:, :SAMPLES_PER_FRAME].float()


def make_audio_decoder(processor: Any, choice: Decoder, slots: int) -> SlotAudioDecoder:
    """The checkpoint's decoder: the detokenizer when it ships one (``auto``), else Mimi."""
    if choice not in ("auto", "mimi", "detokenizer"):
        raise ValueError(f"audio_decoder must be 'auto', 'mimi' or 'detokenizer', got {choice!r}")
    if choice == "auto":
        choice = "detokenizer" if processor.detokenizer_path is not None else "mimi"
    codec = processor.audio_detokenizer if choice == "detokenizer" else processor.mimi
    return SlotAudioDecoder(codec, choice, slots)
