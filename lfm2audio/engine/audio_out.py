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
    """One streaming decoder state per slot; ``decode`` runs the given slots' frames."""

    def __init__(self, codec: Any, kind: str, slots: int) -> None:
        self.codec = codec
        self.kind = kind
        self.states: list[Any] = [self._new_state() for _ in range(slots)]

    def _new_state(self) -> Any:
        if self.kind == "mimi":
            return self.codec.decoder_state(1)
        return self.codec.stream_state(1)

    def reset(self, slot: int) -> None:
        self.states[slot] = self._new_state()

    @torch.inference_mode()
    def decode(self, slots: list[int], codes: Tensor) -> Tensor:
        """PCM (len(slots), 1920) float32 for frames ``codes`` (len(slots), 8), one batched step."""
        codes = codes.clamp(0, 2047)
        if len(slots) == 1:
            pcm, self.states[slots[0]] = self.codec.decode_step(codes, self.states[slots[0]])
        else:
            # Rows are gathered into one batch and split back: the codec's step costs far less per row batched.
            batch = self._cat([self.states[s] for s in slots])
            pcm, batch = self.codec.decode_step(codes, batch)
            for j, slot in enumerate(slots):
                self.states[slot] = batch.select([j])
        return pcm.reshape(len(slots), -1)[:, :SAMPLES_PER_FRAME].float()

    def _cat(self, states: list[Any]) -> Any:
        if self.kind == "mimi":
            return type(states[0]).cat(states)
        first = states[0]
        return type(first)(
            **{
                name: [torch.cat(ts) for ts in zip(*(getattr(s, name) for s in states), strict=True)]
                if isinstance(getattr(first, name), list)
                else torch.cat([getattr(s, name) for s in states])
                for name in ("keys", "values", "conv", "ola", "env", "frames")
            }
        )


def make_audio_decoder(processor: Any, choice: Decoder, slots: int) -> SlotAudioDecoder:
    """The checkpoint's decoder: the detokenizer when it ships one (``auto``), else Mimi."""
    if choice not in ("auto", "mimi", "detokenizer"):
        raise ValueError(f"audio_decoder must be 'auto', 'mimi' or 'detokenizer', got {choice!r}")
    if choice == "auto":
        choice = "detokenizer" if processor.detokenizer_path is not None else "mimi"
    codec = processor.audio_detokenizer if choice == "detokenizer" else processor.mimi
    return SlotAudioDecoder(codec, choice, slots)
