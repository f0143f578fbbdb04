"""lfm2audio: LFM2-Audio inference and real-time serving.

The public API mirrors liquid-audio's: change ``from liquid_audio import ...``
to ``from lfm2audio import ...``.
"""

from lfm2audio.audio_model import LFM2AudioModel
from lfm2audio.chat import ChatState
from lfm2audio.generation import ConversationCache
from lfm2audio.processor import LFM2AudioProcessor
from lfm2audio.sampling import SamplingParams
from lfm2audio.tokens import LFMModality

__all__ = [
    "ChatState",
    "ConversationCache",
    "LFM2AudioModel",
    "LFM2AudioProcessor",
    "LFMModality",
    "SamplingParams",
]
__version__ = "0.1.0"
