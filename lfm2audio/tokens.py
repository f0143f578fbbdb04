"""Ground floor: the special token ids, modality flags and audio rates every layer shares.

Nothing here imports the rest of the package, so the model, generation, the
engine and the server can all take their facts from one place.
"""

from __future__ import annotations

from enum import IntEnum

# Text token ids hard-coded by the reference generation loops (the LFM2 tokenizer's specials).
BOS = 1  # <|startoftext|>
IM_START = 6  # <|im_start|>
IM_END = 7  # <|im_end|>: ends a turn
TOOL_LIST_START, TOOL_LIST_END = 8, 9
TOOL_CALL_START, TOOL_CALL_END = 10, 11
TOOL_RESPONSE_START, TOOL_RESPONSE_END = 12, 13
AUDIO_START = 128  # <|audio_start|>: switches a sequential turn to audio
TEXT_END = 130  # <|text_end|>: interleaved text is over, audio continues

# Audio codes: 8 Mimi codebooks of 2048 entries; code 2048 in codebook 0 ends a run of audio.
CODEBOOKS = 8
CODEBOOK_SIZE = 2048
END_OF_AUDIO = 2048

# Rates.
INPUT_SAMPLE_RATE = 16_000  # what the audio encoder hears
OUTPUT_SAMPLE_RATE = 24_000  # what Mimi and the detokenizer speak
SAMPLES_PER_FRAME = 1920  # one 80 ms audio frame at 24 kHz
FRAME_RATE = OUTPUT_SAMPLE_RATE / SAMPLES_PER_FRAME  # 12.5 frames per second


class LFMModality(IntEnum):
    """What a backbone position holds (the ChatState ``modality_flag`` values)."""

    TEXT = 1
    AUDIO_IN = 2
    AUDIO_OUT = 3
