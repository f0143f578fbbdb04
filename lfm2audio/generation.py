"""Interleaved and sequential generation, with the reference's exact turn-taking rules.

``TurnDecoder`` is the per-stream state machine (which modality the next step
samples, when a turn stops); the single-session generators here and the batched
engine both drive it, so they cannot drift apart. ``ConversationCache`` keeps
the backbone cache of a conversation between turns, so turn N prefills only
what is new.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lfm2audio.model.lfm2 import LFM2Cache
from lfm2audio.model.lfm2_audio import LFM2AudioNetwork, check_inputs
from lfm2audio.sampling import TEXT_LANE, RowSampling, SamplingParams, sample
from lfm2audio.tokens import AUDIO_START, END_OF_AUDIO, IM_END, TEXT_END, LFMModality

GenerationMode = Literal["interleaved", "sequential"]

_INPUT_NAMES = ("text", "audio_in", "audio_in_lens", "audio_out", "modality_flag")

# Cache sizes grow in steps of this many positions, so a long chat reallocates rarely.
CACHE_GROWTH = 256


class TurnDecoder:
    """Which modality each step samples, and what a sampled token does to the turn.

    Interleaved (chat): the counter drops at the top of every step; after
    ``n_text`` text tokens the turn switches to ``n_audio`` audio frames and back.
    <|im_end|> in text mode ends the turn without being emitted; <|text_end|> is
    emitted and from then on audio only hands back to text through an
    end-of-audio frame, after which one more text token is sampled. An
    end-of-audio frame switches to text without resetting the counter.
    Sequential (ASR/TTS): text until <|audio_start|> (emitted), then audio until
    an end-of-audio frame; <|im_end|> is emitted and ends the turn.
    """

    def __init__(self, mode: GenerationMode, n_text: int, n_audio: int) -> None:
        if mode not in ("interleaved", "sequential"):
            raise ValueError(f"mode must be 'interleaved' or 'sequential', got {mode!r}")
        self.mode = mode
        self.n_text, self.n_audio = n_text, n_audio
        self.modality = LFMModality.TEXT
        self.left = n_text
        self.text_done = False
        self.finished = False

    def begin_step(self) -> LFMModality:
        if self.mode == "interleaved":
            self.left -= 1
        return self.modality

    def on_text(self, token: int) -> bool:
        """Account for a sampled text token; returns whether it is emitted (and fed back)."""
        if self.mode == "sequential":
            if token == AUDIO_START:
                self.modality = LFMModality.AUDIO_OUT
            if token == IM_END:
                self.finished = True
            return True
        if token == IM_END:
            self.finished = True
            return False
        if token == TEXT_END:
            self.text_done = True
        if self.left == 0 or self.text_done:
            self.modality = LFMModality.AUDIO_OUT
            self.left = self.n_audio
        return True

    def on_audio(self, first_code: int) -> bool:
        """Account for a sampled frame by its codebook-0 code; True for an end-of-audio frame.

        The caller emits an end-of-audio frame with every code set to END_OF_AUDIO.
        """
        if self.mode == "interleaved" and self.left == 0 and not self.text_done:
            self.modality = LFMModality.TEXT
            self.left = self.n_text
        if first_code == END_OF_AUDIO:
            self.modality = LFMModality.TEXT
            return True
        return False


@dataclass
class ConversationCache:
    """The backbone cache of one conversation and a record of exactly what it has consumed.

    Before a turn, the record is compared with the new inputs: when they start
    with everything the cache has seen, only the rest is prefilled; otherwise
    (the history was edited) the cache is rebuilt from scratch.
    """

    backbone: LFM2Cache | None = None
    flags: list[int] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    audio_out: list[Tensor] = field(default_factory=list)
    audio_in: Tensor | None = None
    audio_in_lens: list[int] = field(default_factory=list)
    reused_positions: int = 0  # positions the last turn did not have to prefill (for stats and tests)

    def clear(self) -> None:
        self.backbone = None
        self.flags, self.text, self.audio_out, self.audio_in_lens = [], [], [], []
        self.audio_in = None

    def __len__(self) -> int:
        return len(self.flags)

    def matches_prefix(
        self, text: Tensor, audio_in: Tensor, audio_in_lens: Tensor, audio_out: Tensor, flags: Tensor
    ) -> bool:
        n = len(self.flags)
        if self.backbone is None or n == 0 or n >= flags.shape[1]:
            return False
        if flags[0, :n].tolist() != self.flags or text[0, : len(self.text)].tolist() != self.text:
            return False
        if len(self.text) > text.shape[1] or len(self.audio_out) > audio_out.shape[1]:
            return False
        if self.audio_out and not torch.equal(
            audio_out[:, : len(self.audio_out)].cpu(), torch.stack(self.audio_out, 1)
        ):
            return False
        k = len(self.audio_in_lens)
        if audio_in_lens[:k].tolist() != self.audio_in_lens:
            return False
        if self.audio_in is not None and not torch.equal(audio_in[:, : self.audio_in.shape[1]].cpu(), self.audio_in):
            return False
        # Audio turns are encoded whole: the cached part must end on a turn boundary.
        in_positions = sum(-(x // -8) for x in self.audio_in_lens)
        return in_positions == sum(1 for f in self.flags if f == LFMModality.AUDIO_IN)

    def record_inputs(
        self, text: Tensor, audio_in: Tensor, audio_in_lens: Tensor, audio_out: Tensor, flags: Tensor
    ) -> None:
        self.flags = flags[0].tolist()
        self.text = text[0].tolist()
        self.audio_out = list(audio_out.cpu().T.unbind(0)) if audio_out.shape[1] else []
        self.audio_in = audio_in.cpu().clone()
        self.audio_in_lens = audio_in_lens.tolist()

    def record_token(self, modality: LFMModality, value: Tensor) -> None:
        self.flags.append(int(modality))
        if modality == LFMModality.TEXT:
            self.text.append(int(value.reshape(-1)[0]))
        else:
            self.audio_out.append(value.cpu().clone())


def ensure_capacity(model: LFM2AudioNetwork, cache: LFM2Cache | None, needed: int) -> LFM2Cache:
    """A cache with room for ``needed`` positions, reusing (and copying) ``cache`` when there is one."""
    if cache is not None and cache.max_len >= needed:
        return cache
    size = -(needed // -CACHE_GROWTH) * CACHE_GROWTH
    fresh = model.lfm.new_cache(1, size)
    if cache is not None:
        fresh.copy_row_(0, cache, 0)
    return fresh


def _new_embeddings(
    model: LFM2AudioNetwork,
    conv: ConversationCache,
    text: Tensor,
    audio_in: Tensor,
    audio_in_lens: Tensor,
    audio_out: Tensor,
    flags: Tensor,
) -> Tensor:
    """Backbone inputs for the positions the conversation cache has not consumed yet."""
    n = len(conv.flags)
    n_mel = conv.audio_in.shape[1] if conv.audio_in is not None else 0
    return model.embed_inputs(
        text=text[:, len(conv.text) :],
        audio_in=audio_in[:, n_mel:],
        audio_in_lens=audio_in_lens[len(conv.audio_in_lens) :],
        audio_out=audio_out[:, len(conv.audio_out) :],
        modality_flag=flags[:, n:],
    )


def generate(
    model: LFM2AudioNetwork,
    mode: GenerationMode,
    text: Tensor,
    audio_in: Tensor,
    audio_in_lens: Tensor,
    audio_out: Tensor,
    modality_flag: Tensor,
    max_new_tokens: int,
    text_params: SamplingParams,
    audio_params: SamplingParams,
    generator: torch.Generator | None = None,
    conversation: ConversationCache | None = None,
    seed: int | None = None,
) -> Iterator[Tensor]:
    """Validate now (errors surface at the call, not at the first ``next``), then stream.

    ``seed`` selects the counter-based draws the batched engine uses (the same
    seed gives the engine's stream); ``generator`` (or torch's global RNG)
    draws as the reference does. Give at most one of them.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an integer or None, got {type(seed).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    check_inputs(model.codebooks, text, audio_in, audio_in_lens, audio_out, modality_flag)
    return _stream(
        model, mode, (text, audio_in, audio_in_lens, audio_out, modality_flag), max_new_tokens,
        text_params, audio_params, generator, conversation, seed,
    )  # fmt: skip


class _SeededDraws:
    """Counter-based draws of one stream: step ``i`` of the turn is counter ``i``, as in the engine."""

    def __init__(self, model: LFM2AudioNetwork, seed: int, text: SamplingParams, audio: SamplingParams) -> None:
        dev = model.device
        self.text = RowSampling.build([text], [seed], [0], model.config.lfm.vocab_size, dev)
        self.audio = RowSampling.build([audio], [seed], [0], model.config.audio_vocab_size, dev)

    def at(self, step: int) -> _SeededDraws:
        self.text.counters.fill_(step)
        self.audio.counters.fill_(step)
        return self


def _stream(
    model: LFM2AudioNetwork,
    mode: GenerationMode,
    inputs: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    max_new_tokens: int,
    text_params: SamplingParams,
    audio_params: SamplingParams,
    generator: torch.Generator | None,
    conversation: ConversationCache | None,
    seed: int | None = None,
) -> Iterator[Tensor]:
    modality_flag = inputs[4]
    conv = conversation if conversation is not None else ConversationCache()
    with torch.inference_mode():
        if conv.matches_prefix(*inputs):
            conv.reused_positions = len(conv)
            emb = _new_embeddings(model, conv, *inputs)
        else:
            conv.clear()
            conv.reused_positions = 0
            emb = model.embed_inputs(**dict(zip(_INPUT_NAMES, inputs, strict=True)))
        conv.backbone = ensure_capacity(model, conv.backbone, modality_flag.shape[1] + max_new_tokens)
        conv.record_inputs(*inputs)
        decoder = TurnDecoder(mode, model.config.interleaved_n_text, model.config.interleaved_n_audio)
        pending: tuple[LFMModality, Tensor] | None = None
        draws = _SeededDraws(model, seed, text_params, audio_params) if seed is not None else None

    for step in range(max_new_tokens):
        with torch.inference_mode():
            if pending is not None:
                conv.record_token(*pending)
            hidden, _ = model.lfm(emb, conv.backbone)
            h = hidden[:, -1]
            modality = decoder.begin_step()
            if modality == LFMModality.TEXT:
                logits = model.text_logits(h)
                if draws is not None:
                    token = draws.at(step).text.sample(logits, TEXT_LANE)
                else:
                    token = sample(logits, text_params, generator)  # (1,)
                emit = decoder.on_text(int(token))
                out = token.view(1)
                emb = model.embed_text(token).view(1, 1, -1)
            else:
                if draws is not None:
                    frame = model.sample_audio_frame_rows(h, draws.at(step).audio)[0]
                else:
                    frame = model.sample_audio_frame(h, audio_params, generator)[0]
                out = torch.full_like(frame, END_OF_AUDIO) if decoder.on_audio(int(frame[0])) else frame
                emit = True
                emb = model.embed_audio_frames(out).view(1, 1, -1)
            pending = (modality, out)
        if emit:
            yield out.clone()
        if decoder.finished:
            return
