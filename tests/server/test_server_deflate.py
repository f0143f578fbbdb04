"""permessage-deflate on the realtime socket: off by default (audio barely compresses, deflate costs the
event loop CPU per message), on with --ws-per-message-deflate / LFM2AUDIO_WS_PER_MESSAGE_DEFLATE."""

from __future__ import annotations

from live_server import serve
from rt_client import Client, run

from lfm2audio_server.config import load_config


def test_flag_and_env():
    assert load_config([], {}).ws_per_message_deflate is False
    assert load_config(["--ws-per-message-deflate"], {}).ws_per_message_deflate is True
    assert load_config([], {"LFM2AUDIO_WS_PER_MESSAGE_DEFLATE": "1"}).ws_per_message_deflate is True
    assert load_config([], {"LFM2AUDIO_WS_PER_MESSAGE_DEFLATE": "0"}).ws_per_message_deflate is False


async def _extensions(url: str) -> str:
    # The websockets client offers permessage-deflate by default; the answer says what was agreed.
    async with await Client.connect(url) as c:
        await c.wait_for("session.created")
        return c.ws.response.headers.get("Sec-WebSocket-Extensions", "")


def test_deflate_off_by_default_on_when_configured(server, engine):
    assert "permessage-deflate" not in run(_extensions(server.url))
    with serve(engine, ws_per_message_deflate=True) as s:
        assert "permessage-deflate" in run(_extensions(s.url))
