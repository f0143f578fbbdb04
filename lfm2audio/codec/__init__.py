"""Audio codecs: our own Mimi (exact, batched, explicit streaming state)."""

from .mimi import MimiCheckpointError, MimiCodec, load_mimi
from .mimi_config import MimiConfig, MimiTransformerConfig, QuantizerConfig, SEANetConfig
from .mimi_transformer import KVWindow
from .state import MimiDecoderState, MimiEncoderState

__all__ = [
    "KVWindow",
    "MimiCheckpointError",
    "MimiCodec",
    "MimiConfig",
    "MimiDecoderState",
    "MimiEncoderState",
    "MimiTransformerConfig",
    "QuantizerConfig",
    "SEANetConfig",
    "load_mimi",
]
