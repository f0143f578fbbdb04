"""ChatState: a conversation as the five tensors the model consumes, built turn by turn."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from lfm2audio.chat_template import BOS_TEXT, TURN_END, turn_header
from lfm2audio.generation import ConversationCache
from lfm2audio.model.lfm2_audio import mel_to_embedding_len
from lfm2audio.tokens import LFMModality

if TYPE_CHECKING:
    from lfm2audio.processor import LFM2AudioProcessor

__all__ = ["ChatState", "LFMModality"]

Role = Literal["system", "user", "assistant"]


class ChatState(Mapping):
    """The reference's ChatState, plus a kept backbone cache.

    ``model.generate_*(**chat)`` unpacks ``text``, ``audio_in``, ``audio_in_lens``,
    ``audio_out``, ``modality_flag`` and (with ``keep_cache``, the default)
    ``cache``: the conversation's backbone cache, so each turn only prefills
    what was added since the last one. Mel features are stored in ``dtype``
    (bfloat16 by default, as in the reference, which rounds them).
    """

    def __init__(
        self,
        processor: LFM2AudioProcessor,
        *,
        codebooks: int = 8,
        dtype: torch.dtype = torch.bfloat16,
        keep_cache: bool = True,
    ) -> None:
        self.proc = processor
        self.codebooks = codebooks
        self.dtype = dtype
        self.cache: ConversationCache | None = ConversationCache() if keep_cache else None
        device = self.device
        self.text = processor.text.encode(BOS_TEXT, add_special_tokens=False, return_tensors="pt").to(device)
        self.audio_in = torch.empty((128, 0), device=device, dtype=dtype)
        self.audio_in_lens = torch.empty((0,), device=device, dtype=torch.long)
        self.audio_out = torch.empty((codebooks, 0), device=device, dtype=torch.long)
        self.modality_flag = torch.full_like(self.text, LFMModality.TEXT)

    @property
    def model_inputs(self) -> list[str]:
        names = ["text", "audio_in", "audio_in_lens", "audio_out", "modality_flag"]
        return names + ["cache"] if self.cache is not None else names

    def __repr__(self) -> str:
        return (
            f"ChatState(text_tok: {self.text.shape[1]}, audio_in: {self.audio_in.shape[1]}, "
            f"audio_out: {self.audio_out.shape[1]})"
        )

    def __getitem__(self, name: str) -> Any:
        if name not in self.model_inputs:
            raise KeyError(f"expected one of {self.model_inputs}, got {name!r}")
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.model_inputs)

    def __len__(self) -> int:
        return len(self.model_inputs)

    @property
    def device(self) -> torch.device:
        return self.proc.device

    def add_text(self, text: str) -> None:
        new = self.proc.text.encode(text, add_special_tokens=False, return_tensors="pt").to(self.device)
        self.text = torch.cat([self.text, new], 1)
        self.modality_flag = torch.cat([self.modality_flag, torch.full_like(new, LFMModality.TEXT)], 1)

    def add_audio(self, wave: Tensor | np.ndarray, sampling_rate: int) -> None:
        """Append an audio turn: ``wave`` is (channels, samples) or (samples,) at any rate.

        Channels are averaged to mono; the audio is resampled to the model's
        16 kHz with soxr; every mel frame is kept (1 + samples // 160), as in
        the reference.
        """
        mel = self.proc.features(wave, sampling_rate)
        new_audio = mel.to(device=self.device, dtype=self.dtype)
        n_pos = int(mel_to_embedding_len(new_audio.shape[1]))
        flags = torch.full((1, n_pos), LFMModality.AUDIO_IN, dtype=torch.long, device=self.device)
        self.audio_in = torch.cat([self.audio_in, new_audio], 1)
        self.audio_in_lens = torch.cat([self.audio_in_lens, self.audio_in_lens.new_tensor([new_audio.shape[1]])])
        self.modality_flag = torch.cat([self.modality_flag, flags], 1)

    def new_turn(self, role: Role) -> None:
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be 'system', 'user' or 'assistant', got {role!r}")
        self.add_text(turn_header(role))

    def end_turn(self) -> None:
        self.add_text(TURN_END)

    def append(self, text: Tensor, audio_out: Tensor, modality_flag: Tensor) -> None:
        """Append generated tokens: text (1, N_text), audio_out (codebooks, N_audio), flags (N,) or (1, N)."""
        if modality_flag.dim() == 1:
            modality_flag = modality_flag.unsqueeze(0)
        if text.dim() != 2 or text.shape[0] != 1:
            raise ValueError(f"text must have shape (1, N), got {tuple(text.shape)}")
        if audio_out.dim() != 2 or audio_out.shape[0] != self.codebooks:
            raise ValueError(f"audio_out must have shape ({self.codebooks}, N), got {tuple(audio_out.shape)}")
        if modality_flag.shape[0] != 1 or modality_flag.shape[1] != text.shape[1] + audio_out.shape[1]:
            raise ValueError(
                f"modality_flag has {modality_flag.shape[1]} entries for {text.shape[1]} text tokens and "
                f"{audio_out.shape[1]} audio frames"
            )
        n_text = int((modality_flag == LFMModality.TEXT).sum())
        if n_text != text.shape[1] or int((modality_flag == LFMModality.AUDIO_OUT).sum()) != audio_out.shape[1]:
            raise ValueError("modality_flag does not match the number of text tokens and audio frames")
        self.text = torch.cat([self.text, text.to(self.device, torch.long)], 1)
        self.audio_out = torch.cat([self.audio_out, audio_out.to(self.device, torch.long)], 1)
        self.modality_flag = torch.cat([self.modality_flag, modality_flag.to(self.device, torch.long)], 1)
