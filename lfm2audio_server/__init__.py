"""lfm2audio-server: real-time speech-to-speech over the OpenAI Realtime protocol (WebSocket /v1/realtime)."""

from lfm2audio_server.app import create_app
from lfm2audio_server.config import ServerConfig, load_config

__all__ = ["ServerConfig", "create_app", "load_config"]
__version__ = "0.1.0"
