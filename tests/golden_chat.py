"""Build the golden ChatStates exactly as the golden generator did (the liquid-audio README recipe)."""

from __future__ import annotations

import torch

from lfm2audio import ChatState, LFM2AudioProcessor

SYSTEM = {
    "asr": "Perform ASR.",
    "chat": "Respond with interleaved text and audio.",
    "tts": "Perform TTS.\nUse the following voice: a calm female voice with clear diction.",
}
TTS_TEXT = "The quick brown fox jumps over the lazy dog."
TURN2_TEXT = "My business specialized in chairs, can you give me something related to that?"
INPUT_NAMES = ["text", "audio_in", "audio_in_lens", "audio_out", "modality_flag"]


def build_state(proc: LFM2AudioProcessor, kind: str, wave: torch.Tensor, *, keep_cache: bool = True) -> ChatState:
    chat = ChatState(proc, keep_cache=keep_cache)
    chat.new_turn("system")
    chat.add_text(SYSTEM[kind])
    chat.end_turn()
    chat.new_turn("user")
    if kind == "tts":
        chat.add_text(TTS_TEXT)
    else:
        chat.add_audio(wave, 16_000)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def as_steps(tokens: list[torch.Tensor]) -> torch.Tensor:
    """Yielded tensors as the golden (n, 8) layout: text in column 0 with -1 elsewhere."""
    rows = []
    for t in tokens:
        row = torch.full((8,), -1, dtype=torch.long)
        row[: t.numel()] = t.reshape(-1).cpu()
        rows.append(row)
    return torch.stack(rows) if rows else torch.empty((0, 8), dtype=torch.long)
