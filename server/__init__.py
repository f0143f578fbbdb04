"""lfm2audio-server: real-time speech-to-speech over the OpenAI Realtime protocol (WebSocket /v1/realtime).

The source lives in the repository's ``server/`` folder and installs as ``lfm2audio_server``
(pyproject.toml maps the name). Refuse the folder's own name: imported as ``server`` (from the checkout
root, where the folder is on ``sys.path``) every module would load twice under two names.
"""

if __name__ != "lfm2audio_server":
    raise ImportError(f"the server package imports as lfm2audio_server, not {__name__}")

from lfm2audio_server.app import create_app  # noqa: E402
from lfm2audio_server.config import ServerConfig, load_config  # noqa: E402

__all__ = ["ServerConfig", "create_app", "load_config"]
__version__ = "0.1.0"
