"""API keys: where a client may put one, and a constant-time check.

A key is accepted from, in order: ``Authorization: Bearer KEY`` (what the openai SDK
sends), ``api-key: KEY`` (Azure style), the WebSocket subprotocol
``openai-insecure-api-key.KEY`` (browsers cannot set headers; OpenAI's own scheme),
or the query parameter ``api_key=KEY``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
REALTIME_SUBPROTOCOL = "realtime"


class Authenticator:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode("utf-8") for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, key: str | None) -> bool:
        """True when auth is off, or ``key`` equals one of the keys (compared in constant time, all of them)."""
        if not self._keys:
            return True
        if not key:
            return False
        candidate = key.encode("utf-8")
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(candidate, k)
        return ok


def offered_subprotocols(headers: Mapping[str, str]) -> list[str]:
    raw = headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def find_key(headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Sequence[str] = ()) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if headers.get("api-key"):
        return headers["api-key"].strip()
    for p in subprotocols:
        if p.startswith(KEY_SUBPROTOCOL_PREFIX):
            return p[len(KEY_SUBPROTOCOL_PREFIX) :]
    return query.get("api_key") or None


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """The subprotocol to answer with: ``realtime`` when offered, else the first one that carries no key.

    Browsers fail a handshake whose answer names none of the offered subprotocols, so when the
    only offer is the key subprotocol we echo it (OpenAI's browser scheme does the same).
    """
    if not offered:
        return None
    if REALTIME_SUBPROTOCOL in offered:
        return REALTIME_SUBPROTOCOL
    for p in offered:
        if not p.startswith(KEY_SUBPROTOCOL_PREFIX):
            return p
    return offered[0]
