"""Streaming audio output for the engine's session slots: Mimi or the LFM2.5 detokenizer.

Each slot has its own decoder row; a response restarts its slot's row. Codes
outside [0, 2047] (2048 can be drawn in codebooks 1..7, which the reference
would crash on) are clamped for decoding only: the history keeps what was drawn.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lfm2audio.codec.detokenizer import AudioDetokenizer, DetokenizerState
from lfm2audio.codec.mimi import MimiCodec
from lfm2audio.codec.state import MimiDecoderState
from lfm2audio.engine.config import AudioDecoderChoice
from lfm2audio.processor import LFM2AudioProcessor
from lfm2audio.tokens import CODEBOOK_SIZE, SAMPLES_PER_FRAME


class SlotAudioDecoder:
    """One batched streaming state whose row ``slot`` belongs to that slot's session."""

    def __init__(self, codec: MimiCodec | AudioDetokenizer, kind: str, slots: int) -> None:
        self.codec = codec
        self.kind = kind
        self.slots = slots
        self.state: MimiDecoderState | DetokenizerState = (
            codec.decoder_state(slots) if isinstance(codec, MimiCodec) else codec.stream_state(slots)
        )

    def reset(self, slot: int) -> None:
        self.state.reset_rows([slot])

    @torch.inference_mode()
    def step(self, codes: Tensor, advance: Tensor, rows: Tensor, gather: bool = True) -> Tensor:
        """PCM float32 (len(rows), 1920) of ``rows`` (indices into [0, m)) for one frame of codes
        (m, 8) of rows [0, m); only rows with ``advance`` step.

        The step runs on the prefix of rows as a view (the codecs update their state in
        place); the state of rows that must not advance (silent slots, end-of-audio
        frames) is put back from a copy taken first, chosen on the device by the mask: a
        fixed sequence of ops, no host reads. With ``gather`` and Mimi, the SEANet
        decoder (the 24 kHz half, most of the arithmetic) runs on ``rows`` alone, the
        others' part of its state untouched: a step where a third of the slots are
        speaking text does not synthesise their silence. Without (fixed shapes for a
        CUDA graph) every row of the prefix is decoded and ``rows`` picked from it.
        """
        m = codes.shape[0]
        view = self.state.rows(0, m)
        codes = codes.clamp(0, CODEBOOK_SIZE - 1)
        gather = gather and isinstance(self.codec, MimiCodec)
        guarded = view.step_tensors(seanet=False) if gather else view.step_tensors()  # type: ignore[call-arg]
        saved = [t.clone() for t in guarded]
        if gather:
            assert isinstance(self.codec, MimiCodec) and isinstance(view, MimiDecoderState)
            latent = self.codec.decode_latent_chunk(codes[:, :, None], view, check=False)  # clamped above
            seanet = view.seanet.index_select(0, rows)  # the rows' SEANet state, stepped in place
            pcm = self.codec.decoder.step(latent.index_select(0, rows), iter(view.seanet_views(seanet)))
            kept = advance.index_select(0, rows)
            view.seanet.index_copy_(0, rows, _where_rows(kept, seanet, view.seanet.index_select(0, rows)))
        else:  # no host reads: the codes were clamped above
            pcm, _ = self.codec.decode_step(codes, view, check=False)  # type: ignore[arg-type]
        for t, s in zip(guarded, saved, strict=True):
            t.copy_(_where_rows(advance, t, s))
        pcm = pcm.reshape(pcm.shape[0], -1)[:, :SAMPLES_PER_FRAME].float()
        return pcm if gather else pcm.index_select(0, rows)


def _where_rows(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Row i of ``a`` where ``mask[i]``, else of ``b`` (rows are the first dimension)."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def make_audio_decoder(processor: LFM2AudioProcessor, choice: AudioDecoderChoice, slots: int) -> SlotAudioDecoder:
    """The checkpoint's decoder: the detokenizer when it ships one (``auto``), else Mimi."""
    if choice not in ("auto", "mimi", "detokenizer"):
        raise ValueError(f"audio_decoder must be 'auto', 'mimi' or 'detokenizer', got {choice!r}")
    if choice == "auto":
        choice = "detokenizer" if processor.detokenizer_path is not None else "mimi"
    codec = processor.audio_detokenizer if choice == "detokenizer" else processor.mimi
    return SlotAudioDecoder(codec, choice, slots)
