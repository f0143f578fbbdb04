"""Clients of the lfm2audio server's realtime WebSocket: a Python API and the ``lfm2audio-client`` command.

Needs numpy, soxr and ``websockets`` (the ``client`` extra), never torch; the microphone needs
``sounddevice`` (the ``mic`` extra). The source lives in ``clients/python/`` and installs as
``lfm2audio_client``; refuse any other name, under which every module would load twice.
"""

if __name__ != "lfm2audio_client":
    raise ImportError(f"the Python client imports as lfm2audio_client, not {__name__}")

from lfm2audio_client.audio import read_wav, write_wav  # noqa: E402
from lfm2audio_client.realtime import DEFAULT_URL, RealtimeClient, RealtimeError, Response, Sampling  # noqa: E402

__all__ = ["DEFAULT_URL", "RealtimeClient", "RealtimeError", "Response", "Sampling", "read_wav", "write_wav"]
