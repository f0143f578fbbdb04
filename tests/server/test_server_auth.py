"""API keys on and off: headers, subprotocol, query parameter; HTTP endpoints; origins."""

from __future__ import annotations

import json

import pytest
import websockets
from live_server import http_get, serve
from rt_client import Client, run

from lfm2audio_server.auth import Authenticator, find_key, select_subprotocol

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def auth_server(engine):
    with serve(engine, api_keys=("other-key", KEY), allowed_origins=("https://app.example",)) as s:
        yield s


async def _refused(url: str, **kwargs) -> tuple[dict, int, str]:
    c = await Client.connect(url, **kwargs)
    try:
        while True:
            await c.recv()
    except websockets.ConnectionClosed as e:
        return c.events[0], e.rcvd.code, e.rcvd.reason


async def _accepted(url: str, **kwargs) -> Client:
    c = await Client.connect(url, **kwargs)
    ev = await c.wait_for("session.created")
    assert ev["session"]["id"].startswith("sess_")
    return c


def test_auth_off(server):
    async def go():
        c = await _accepted(server.url)
        await c.close()

    run(go())
    assert http_get(server.http + "/metrics")[0] == 200
    assert http_get(server.http + "/ready")[0] == 200


def test_websocket_auth(auth_server):
    url = auth_server.url

    async def go():
        for kwargs in (
            {},
            {"additional_headers": {"Authorization": "Bearer wrong"}},
            {"subprotocols": ["realtime", "openai-insecure-api-key.wrong"]},
        ):
            err, code, reason = await _refused(url, **kwargs)
            assert (code, reason) == (1008, "invalid_api_key")
            assert err["type"] == "error" and err["error"]["code"] == "invalid_api_key"
        err, code, _ = await _refused(url + "?api_key=" + KEY, additional_headers={"Origin": "https://evil.example"})
        assert (code, err["error"]["code"]) == (1008, "origin_not_allowed")

        c = await _accepted(url, additional_headers={"Authorization": f"Bearer {KEY}"})  # the openai SDK's way
        await c.close()
        c = await _accepted(url, additional_headers={"api-key": KEY})
        await c.close()
        c = await _accepted(url + "?api_key=" + KEY, additional_headers={"Origin": "https://app.example"})
        await c.close()
        # Browsers: the key rides in a subprotocol; the server answers with "realtime".
        c = await _accepted(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"])
        assert c.ws.subprotocol == "realtime"
        await c.close()

    run(go())


def test_http_auth(auth_server):
    base = auth_server.http
    assert http_get(base + "/health")[0] == 200  # always open
    # /ready is open too (probes carry no keys) but shows details only with a key.
    status, body = http_get(base + "/ready")
    assert status == 200 and json.loads(body) == {"ready": True, "draining": False}
    status, body = http_get(base + "/ready", {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and json.loads(body)["max_sessions"] == 8
    status, body = http_get(base + "/metrics")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert http_get(base + "/metrics", {"Authorization": "Bearer nope"})[0] == 401
    assert http_get(base + "/metrics", {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert http_get(base + "/metrics?api_key=" + KEY)[0] == 200


def test_auth_helpers():
    a = Authenticator(["k1", "k2"])
    assert a.enabled and a.check("k2") and not a.check("k3") and not a.check(None) and not a.check("")
    assert Authenticator([]).check(None)
    assert find_key({"authorization": "Bearer abc"}, {}) == "abc"
    assert find_key({}, {}, ["realtime", "openai-insecure-api-key.xyz"]) == "xyz"
    assert find_key({}, {"api_key": "q"}) == "q"
    assert find_key({}, {}) is None
    assert select_subprotocol(["openai-insecure-api-key.x", "realtime"]) == "realtime"
    assert select_subprotocol(["openai-insecure-api-key.x", "openai-beta.realtime-v1"]) == "openai-beta.realtime-v1"
    assert select_subprotocol(["openai-insecure-api-key.x"]) == "openai-insecure-api-key.x"
    assert select_subprotocol([]) is None
