"""The chat template LFM2-Audio was trained with, as text pieces (one home for ChatState and the engine).

The reference's ChatState writes these pieces itself and encodes each one
separately with ``add_special_tokens=False``; both our ChatState and the
engine's prompt builder encode exactly these strings, piece by piece, so their
token ids agree.
"""

from __future__ import annotations

BOS_TEXT = "<|startoftext|>"
TURN_END = "<|im_end|>\n"


def turn_header(role: str) -> str:
    """The text that opens a turn of ``role`` (system, user, assistant or tool)."""
    return f"<|im_start|>{role}\n"
