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

        Rows without a frame must not advance. The step runs on the prefix of rows
        up to the highest speaking slot (a view: the codecs update their state in
        place), and the silent rows inside it are put back from a copy; when most
        of that prefix is silent, the speaking rows are gathered instead. Slots are
        handed out lowest first, so usually nothing is copied at all.
        """
        codes = codes.clamp(0, 2047)
        m = max(slots) + 1
        idle = sorted(set(range(m)) - set(slots))
        if len(idle) <= len(slots):
            view = self._prefix(m)
            saved = view.select(idle) if idle else None
            full = torch.zeros((m, codes.shape[1]), dtype=codes.dtype, device=codes.device)
            idx = torch.tensor(slots, dtype=torch.long, device=codes.device)
            full[idx] = codes
            pcm, _ = self.codec.decode_step(full, view)
            if saved is not None:
                view.assign_rows(idle, saved)
            pcm = pcm.reshape(m, -1)[idx]
        else:
            sub = self.state.select(slots)
            pcm, sub = self.codec.decode_step(codes, sub)
            self.state.assign_rows(slots, sub)
        return pcm.reshape(len(slots), -1)[:, :SAMPLES_PER_FRAME].float()

    def _prefix(self, m: int) -> Any:
        """Rows [0, m) of the state as views."""
        st = self.state
        if m == self.slots:
            return st
        if self.kind == "mimi":
            tr = st.transformer
            window = type(tr)(tr.keys[:, :m], tr.values[:, :m], tr.positions[:m], tr.offsets[:m])
            return type(st)(st.upsample[:m], window, [t[:m] for t in st.decoder])
        return type(st)(
            keys=[t[:m] for t in st.keys],
            values=[t[:m] for t in st.values],
            conv=[t[:m] for t in st.conv],
            ola=st.ola[:m],
            env=st.env[:m],
            frames=st.frames[:m],
        )


def make_audio_decoder(processor: Any, choice: Decoder, slots: int) -> SlotAudioDecoder:
    """The checkpoint's decoder: the detokenizer when it ships one (``auto``), else Mimi."""
    if choice not in ("auto", "mimi", "detokenizer"):
        raise ValueError(f"audio_decoder must be 'auto', 'mimi' or 'detokenizer', got {choice!r}")
    if choice == "auto":
        choice = "detokenizer" if processor.detokenizer_path is not None else "mimi"
    codec = processor.audio_detokenizer if choice == "detokenizer" else processor.mimi
    return SlotAudioDecoder(codec, choice, slots)
