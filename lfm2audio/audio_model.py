"""The public ``LFM2AudioModel``: the network plus loading and liquid-audio's generation methods.

The network (``lfm2audio.model.lfm2_audio``) knows nothing of files or
generation loops; loading and generation build on it, and this class puts the
three together under the reference's names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from lfm2audio.generation import ConversationCache, generate
from lfm2audio.loading import load_model
from lfm2audio.model.compiled import compile_decode
from lfm2audio.model.lfm2_audio import LFM2AudioNetwork
from lfm2audio.sampling import SamplingParams


class LFM2AudioModel(LFM2AudioNetwork):
    """LFM2-Audio as liquid-audio's ``LFM2AudioModel``: ``from_pretrained``, ``generate_*``."""

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | Path,
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        compile: bool = False,
    ) -> LFM2AudioModel:
        """Load a local folder or a Hub repo (official layout, safetensors only).

        ``quantize="int8"`` or ``"int4"`` (CPU only): the backbone and audio head with int8 weights and
        activations, or int4 weights (see ``lfm2audio.model.quantize``). ``compile=True``: the backbone
        and the audio frame's depthformer through ``torch.compile`` (faster decode steps after a
        compile on first use, not bit-identical to eager; see ``lfm2audio.model.compiled``).
        """
        model = load_model(
            repo_id_or_path, revision=revision, device=device, dtype=dtype, cls=cls, quantize=quantize  # type: ignore[arg-type]
        )
        return compile_decode(model) if compile else model

    def generate_interleaved(
        self,
        *,
        text: Tensor,
        audio_in: Tensor,
        audio_in_lens: Tensor,
        audio_out: Tensor,
        modality_flag: Tensor,
        max_new_tokens: int = 20,
        text_temperature: float | None = None,
        text_top_k: int | None = None,
        audio_temperature: float | None = None,
        audio_top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: ConversationCache | None = None,
        seed: int | None = None,
    ) -> Iterator[Tensor]:
        """Text and audio in a fixed pattern (interleaved_n_text / interleaved_n_audio), for chat.

        Yields 1-entry tensors (text tokens) and ``codebooks``-entry tensors (audio frames).
        ``seed`` draws exactly as a session of the batched engine with that seed.
        """
        return generate(
            self, "interleaved", text, audio_in, audio_in_lens, audio_out, modality_flag, max_new_tokens,
            SamplingParams(text_temperature, text_top_k), SamplingParams(audio_temperature, audio_top_k),
            generator, cache, seed,
        )  # fmt: skip

    def generate_sequential(
        self,
        *,
        text: Tensor,
        audio_in: Tensor,
        audio_in_lens: Tensor,
        audio_out: Tensor,
        modality_flag: Tensor,
        max_new_tokens: int = 20,
        text_temperature: float | None = None,
        text_top_k: int | None = None,
        audio_temperature: float | None = None,
        audio_top_k: int | None = None,
        generator: torch.Generator | None = None,
        cache: ConversationCache | None = None,
        seed: int | None = None,
    ) -> Iterator[Tensor]:
        """Text until <|audio_start|>, then audio until an end-of-audio frame, for ASR and TTS."""
        return generate(
            self, "sequential", text, audio_in, audio_in_lens, audio_out, modality_flag, max_new_tokens,
            SamplingParams(text_temperature, text_top_k), SamplingParams(audio_temperature, audio_top_k),
            generator, cache, seed,
        )  # fmt: skip
