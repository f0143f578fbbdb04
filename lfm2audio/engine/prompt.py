"""Prompts: a session's turns as model items, and the policy that keeps them inside the context.

``PromptBuilder`` turns system prompts, user parts (text and 16 kHz audio) and
the template pieces into ``Item``s encoded exactly as ``ChatState`` encodes
them (piece by piece, no special tokens added), so the engine's token ids match
``generate_*(**chat)``. It runs off the engine thread: tokenizing, mel
features and the audio encoder never stall the batched step. ``fit_turns`` is
the context policy.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

from lfm2audio.chat_template import BOS_TEXT, TURN_END, turn_header
from lfm2audio.engine.events import EngineError
from lfm2audio.engine.history import Item, Turn, model_inputs
from lfm2audio.engine.session import UserPart
from lfm2audio.model.lfm2_audio import LFM2AudioNetwork, mel_to_embedding_len
from lfm2audio.processor import LFM2AudioProcessor
from lfm2audio.tokens import INPUT_SAMPLE_RATE, LFMModality

_SYSTEM_CACHE = 16  # system prompts whose items are kept, most recent first


class ContextLimitError(EngineError):
    """A turn cannot fit the session's context even with all earlier turns dropped."""

    code = "context_limit"


class PromptBuilder:
    def __init__(self, model: LFM2AudioNetwork, processor: LFM2AudioProcessor, max_context: int) -> None:
        self.model = model
        self.processor = processor
        self.max_context = max_context
        self._systems: OrderedDict[str, Turn] = OrderedDict()

    # Items ---------------------------------------------------------------------------

    def text_items(self, text: str) -> list[Item]:
        ids = self.processor.text.encode(text, add_special_tokens=False)
        return [Item(LFMModality.TEXT, i) for i in ids]

    def turn_end(self) -> list[Item]:
        return self.text_items(TURN_END)

    def system_turn(self, prompt: str) -> Turn:
        """The first turn: <|startoftext|> and the system prompt (kept for reuse across responses)."""
        turn = self._systems.pop(prompt, None)
        if turn is None:
            self.check_fits([("text", prompt)])
            items = self.text_items(BOS_TEXT) + self.text_items(turn_header("system"))
            items += self.text_items(prompt) + self.turn_end()
            turn = Turn("system:" + prompt, items)
        self._systems[prompt] = turn
        while len(self._systems) > _SYSTEM_CACHE:
            self._systems.popitem(last=False)
        return turn

    def user_turn(
        self, parts: list[UserPart], keys: list[str | None] | None = None, role: str = "user", *, embed: bool = True
    ) -> Turn:
        """A turn of text and audio parts (each tagged with its item key), with its embeddings computed
        here (off the engine thread)."""
        self.check_fits(parts)
        items = self.text_items(turn_header(role))
        for n, (kind, value) in enumerate(parts):
            if kind == "audio":
                assert isinstance(value, np.ndarray)
                mel = self.processor.features(torch.from_numpy(value), INPUT_SAMPLE_RATE)
                # ChatState keeps features in bfloat16; round the same way for identical results.
                part = [Item(LFMModality.AUDIO_IN, mel.to(torch.bfloat16).cpu())]
            else:
                part = self.text_items(str(value))
            key = keys[n] if keys else None
            for item in part:
                item.key = key
            items.extend(part)
        items += self.turn_end()
        return Turn(role, items, self.embed(items) if embed else None)

    def message_turn(self, role: str, parts: list[UserPart], key: str) -> Turn:
        """A whole turn of any role that belongs to one item ``key`` (its header and end too, so that
        deleting the item removes the turn). Items only: it is embedded when it enters the cache."""
        turn = self.user_turn(parts, [key] * len(parts), role, embed=False)
        for item in turn.items:
            item.key = key
        return turn

    def assistant_header(self) -> Turn:
        items = self.text_items(turn_header("assistant"))
        return Turn("assistant", items, self.embed(items))

    def embed(self, items: list[Item]) -> Tensor:
        """Backbone inputs (N, hidden) for ``items``."""
        with torch.inference_mode():
            return self.model.embed_inputs(**model_inputs(items, self.model.codebooks))[0]

    def check_fits(self, parts: list[UserPart]) -> None:
        """Refuse, before any tokenizing or feature work, input that cannot fit the context.

        A token covers at most ``max_token_chars`` characters, so a text needs at
        least len / max_token_chars positions; audio needs ceil(mel frames / 8).
        """
        per_token = self.processor.text.max_token_chars
        need = 0
        for kind, value in parts:
            if kind == "audio":
                need += int(mel_to_embedding_len(1 + len(value) // 160))  # type: ignore[arg-type]
            else:
                need += -(len(str(value)) // -per_token)
        if need >= self.max_context:
            raise ContextLimitError(f"the input needs at least {need} positions, the context holds {self.max_context}")


def fit_turns(
    system: Turn, history: list[Turn], new: list[Turn], max_tokens: int, limit: int
) -> tuple[list[Turn], int]:
    """Drop the oldest turns after the system prompt until the prompt and ``max_tokens`` fit ``limit``.

    Returns the kept turns of ``history`` and the prompt's positions. Raises
    ContextLimitError when the new turns do not fit even alone.
    """
    new_positions = sum(t.positions for t in new)
    kept = list(history)
    while kept and system.positions + sum(t.positions for t in kept) + new_positions + max_tokens > limit:
        kept = kept[1:]
    prompt_positions = system.positions + sum(t.positions for t in kept) + new_positions
    if prompt_positions >= limit:
        raise ContextLimitError(f"the turn needs {prompt_positions + 1} positions, the context holds {limit}")
    return kept, prompt_positions
