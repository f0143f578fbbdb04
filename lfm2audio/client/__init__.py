"""Clients of the lfm2audio server's realtime WebSocket: a Python API and the ``lfm2audio-client`` command.

Needs ``websockets`` (the ``client`` extra); the microphone needs ``sounddevice`` (the ``mic`` extra).
"""

from lfm2audio.client.audio import read_wav, write_wav
from lfm2audio.client.realtime import DEFAULT_URL, RealtimeClient, RealtimeError, Response, Sampling

__all__ = ["DEFAULT_URL", "RealtimeClient", "RealtimeError", "Response", "Sampling", "read_wav", "write_wav"]
