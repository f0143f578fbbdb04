"""What the HTTP API's endpoints share: reading and validating request bodies, the lfm2audio
sampling extension, output token budgets and server-sent events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lfm2audio.sampling import SamplingParams
from lfm2audio_server.http_engine import APIError, bad_request
from lfm2audio_server.settings import DEFAULT_AUDIO_SAMPLING, DEFAULT_TEXT_SAMPLING, Sampling


async def read_body(request: Request) -> bytes:
    """The whole request body, refused with 413 past ``http_max_body_bytes`` (checked as it arrives)."""
    limit = request.app.state.server.config.http_max_body_bytes
    msg = f"the request body is larger than this server's limit of {limit} bytes"
    too_large = APIError(413, "request_too_large", msg)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict:
    body = await read_body(request)
    try:
        data = json.loads(body) if len(body) < 1 << 20 else await asyncio.to_thread(json.loads, body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return data


def parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = f"{param}: {err['msg']}" if param else err["msg"]
        given = err.get("input")
        if isinstance(given, str | int | float) and err["type"] != "missing":
            msg += f", got {given!r}" if len(repr(given)) <= 60 else f", got {repr(given)[:60]}..."
        raise bad_request(msg, param) from None


class SamplingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float | None = Field(default=None, ge=0.0, le=10.0)
    top_k: int | None = Field(default=None, ge=1)


class SamplingPairIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: SamplingIn | None = None
    audio: SamplingIn | None = None


class ExtensionIn(BaseModel):
    """The ``lfm2audio`` object of a request body: what OpenAI's fields cannot say."""

    model_config = ConfigDict(extra="forbid")
    sampling: SamplingPairIn | None = None
    max_tokens: int | None = Field(default=None, ge=1)


def sampling_params(
    mode: str, ext: ExtensionIn | None, *, temperature: float | None = None, top_k: int | None = None
) -> tuple[SamplingParams, SamplingParams]:
    """(text, audio) sampling: OpenAI's temperature/top_k set the text's, ``lfm2audio.sampling`` either's;
    the rest are the realtime API's per-mode defaults."""
    text = DEFAULT_TEXT_SAMPLING
    if temperature is not None or top_k is not None:
        text = Sampling(temperature, top_k)
    audio = DEFAULT_AUDIO_SAMPLING[mode]
    s = ext.sampling if ext is not None else None
    if s is not None and s.text is not None:
        text = Sampling(s.text.temperature, s.text.top_k)
    if s is not None and s.audio is not None:
        audio = Sampling(s.audio.temperature, s.audio.top_k)
    return SamplingParams(text.temperature, text.top_k), SamplingParams(audio.temperature, audio.top_k)


def token_budget(request: Request, *values: int | None) -> int:
    """The first given token limit, capped at the server's ``max_output_tokens``."""
    cap = request.app.state.server.config.max_output_tokens
    for v in values:
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad_request(f"token limits must be positive integers, got {v!r}", "max_tokens")
            return min(v, cap)
    return cap


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
