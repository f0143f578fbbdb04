"""A session's conversation as a list of turns of items, turned into model inputs on demand.

Items are text token ids, audio-in turns (mel features) and audio-out frames;
each knows how many backbone positions it takes. The engine prefills the items
its cache has not consumed yet, and drops whole turns when the context is full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lfm2audio.model.lfm2_audio import mel_to_embedding_len
from lfm2audio.tokens import LFMModality


@dataclass
class Item:
    modality: LFMModality
    value: int | Tensor | tuple[int, ...]  # text id; mel (n_mels, frames); or frame codes (codebooks,)
    key: str | None = None  # the caller's id of the conversation item this belongs to (edits name it)

    @property
    def positions(self) -> int:
        if self.modality == LFMModality.AUDIO_IN:
            assert isinstance(self.value, Tensor)
            return int(mel_to_embedding_len(self.value.shape[1]))
        return 1


@dataclass
class Turn:
    role: str
    items: list[Item] = field(default_factory=list)
    embedding: Tensor | None = None  # backbone inputs of ``items`` when computed ahead (new user turns)

    @property
    def positions(self) -> int:
        return sum(i.positions for i in self.items)


@dataclass
class History:
    """Turns of a conversation; ``turns[0]`` starts with <|startoftext|> and holds the system prompt."""

    turns: list[Turn] = field(default_factory=list)

    def items(self) -> list[Item]:
        return [item for turn in self.turns for item in turn.items]

    def find(self, key: str) -> int | None:
        """The index of the turn holding item ``key``."""
        for i, turn in enumerate(self.turns):
            if any(item.key == key for item in turn.items):
                return i
        return None

    def start_of(self, turn_index: int) -> int:
        """The flat item index where turn ``turn_index`` begins."""
        return sum(len(t.items) for t in self.turns[:turn_index])

    @property
    def positions(self) -> int:
        return sum(t.positions for t in self.turns)


def model_inputs(items: list[Item], codebooks: int, n_mels: int = 128) -> dict[str, Tensor]:
    """The five ChatState tensors for ``items`` (in order)."""
    text = [int(i.value) for i in items if i.modality == LFMModality.TEXT]  # type: ignore[arg-type]
    mels = [i.value for i in items if i.modality == LFMModality.AUDIO_IN]
    frames = [i.value for i in items if i.modality == LFMModality.AUDIO_OUT]
    flags: list[int] = []
    for i in items:
        flags.extend([int(i.modality)] * i.positions)
    return {
        "text": torch.tensor([text], dtype=torch.long),
        "audio_in": torch.cat(mels, 1) if mels else torch.zeros((n_mels, 0)),  # type: ignore[arg-type]
        "audio_in_lens": torch.tensor([m.shape[1] for m in mels], dtype=torch.long),  # type: ignore[union-attr]
        "audio_out": (
            torch.tensor(frames, dtype=torch.long).T if frames else torch.zeros((codebooks, 0), dtype=torch.long)
        ),
        "modality_flag": torch.tensor([flags], dtype=torch.long),
    }
