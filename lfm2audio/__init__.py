"""lfm2audio: LFM2-Audio inference and real-time serving.

The public API mirrors liquid-audio's: change ``from liquid_audio import ...``
to ``from lfm2audio import ...``.
"""

from lfm2audio.chat import ChatState
from lfm2audio.generation import ConversationCache
from lfm2audio.model.lfm2_audio import LFM2AudioModel, LFMModality
from lfm2audio.processor import LFM2AudioProcessor
from lfm2audio.sampling import SamplingParams

__all__ = [
    "ChatState",
    "ConversationCache",
    "LFM2AudioModel",
    "LFM2AudioProcessor",
    "LFMModality",
    "SamplingParams",
]
__version__ = "0.1.0"
