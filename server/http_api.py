"""OpenAI-compatible HTTP audio endpoints on the batched engine (see docs/http.md).

``POST /v1/audio/transcriptions`` (ASR mode), ``POST /v1/audio/speech`` (TTS mode), ``GET /v1/models``,
``GET /v1/audio/voices``; ``POST /v1/chat/completions`` lives in http_chat.py. Each request is one
stateless engine response (http_engine.py); errors have OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from lfm2audio.engine import AudioFrame, ResponseDone, SessionConfig, TextDelta
from lfm2audio.sampling import SamplingParams
from lfm2audio_server.audio import b64
from lfm2audio_server.audio_files import SPEECH_FORMATS, AudioFileError, SpeechEncoder, decode_audio
from lfm2audio_server.http_chat import router as chat_router
from lfm2audio_server.http_common import (
    SSE_HEADERS,
    ExtensionIn,
    parse,
    read_body,
    read_json,
    sampling_params,
    sse,
    token_budget,
)
from lfm2audio_server.http_engine import APIError, EngineRequest, EngineStream, bad_request, usage_tokens
from lfm2audio_server.voices import VoiceError, resolve_voice, voice_list, voice_style

router = APIRouter()

MAX_SPEECH_INPUT_CHARS = 4096  # OpenAI's limit on /v1/audio/speech input


# Request bodies --------------------------------------------------------------------------------------




# GET /v1/models, /v1/audio/voices ----------------------------------------------------------------------


def _model_object(state: Any) -> dict:
    return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "lfm2audio"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_object(request.app.state.server)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    state = request.app.state.server
    if model_id != state.model_name:
        msg = f"the model {model_id!r} is not served here; this server serves {state.model_name!r}"
        raise APIError(404, "model_not_found", msg, param="model")
    return _model_object(state)


@router.get("/v1/audio/voices")
async def list_voices(request: Request) -> dict:
    state = request.app.state.server
    style = voice_style(state.engine)
    return {"object": "list", "voice_style": style, "data": voice_list(style)}


# POST /v1/audio/speech ---------------------------------------------------------------------------------


class SpeechIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str = Field(min_length=1, max_length=MAX_SPEECH_INPUT_CHARS)
    voice: str | dict | None = None
    instructions: str | None = None
    response_format: Literal["pcm", "wav", "opus", "flac", "mp3"] = "mp3"
    speed: float | None = None
    stream_format: Literal["audio", "sse"] = "audio"
    seed: int | None = Field(default=None, ge=0, le=2**62)
    lfm2audio: ExtensionIn | None = None


def voice_id(voice: str | dict | None) -> str | None:
    """OpenAI sends a voice name, or ``{"id": ...}`` for a custom voice."""
    if isinstance(voice, dict):
        vid = voice.get("id")
        if not isinstance(vid, str):
            raise bad_request("voice must be a name or an object with a string id", "voice")
        return vid
    return voice


@router.post("/v1/audio/speech")
async def speech(request: Request) -> Response:
    state = request.app.state.server
    req: SpeechIn = parse(SpeechIn, await read_json(request))
    if req.speed is not None and req.speed != 1.0:
        raise bad_request(f"speed {req.speed:g} is not supported: this server speaks at speed 1.0 only", "speed")
    try:
        voice = resolve_voice(voice_style(state.engine), voice=voice_id(req.voice), description=req.instructions)
    except VoiceError as e:
        raise bad_request(str(e), "instructions" if req.instructions else "voice", "invalid_voice") from None
    text_s, audio_s = sampling_params("tts", req.lfm2audio)
    max_tokens = token_budget(request, req.lfm2audio.max_tokens if req.lfm2audio else None)
    config = SessionConfig(
        mode="tts",
        instructions=voice.prompt,
        text_sampling=text_s,
        audio_sampling=audio_s,
        max_output_tokens=max_tokens,
        seed=req.seed,
    )
    run = EngineRequest(state, config)
    await run.__aenter__()
    try:
        run.add_text(req.input)
        await run.start(max_tokens)
    except BaseException:
        run.close()
        raise
    encoder = SpeechEncoder(req.response_format)

    async def audio_bytes():
        try:
            async for ev in run.events():
                if isinstance(ev, AudioFrame):
                    chunk = encoder.push(ev.pcm)
                    if chunk:
                        yield chunk
                elif isinstance(ev, ResponseDone):
                    # A failure mid-stream cannot change the status sent; the audio just ends (and is logged).
                    tail = encoder.finish()
                    if tail:
                        yield tail
        finally:
            run.close()

    async def events():
        try:
            async for ev in run.events():
                chunk = b""
                if isinstance(ev, AudioFrame):
                    chunk = encoder.push(ev.pcm)
                elif isinstance(ev, ResponseDone):
                    chunk = encoder.finish()
                if chunk:
                    yield sse({"type": "speech.audio.delta", "audio": b64(chunk)})
                if isinstance(ev, ResponseDone):
                    failure = run.failure()
                    if failure is not None:
                        yield sse({"type": "error", **failure.body()})
                        return
                    prompt, completion, _, _ = usage_tokens(ev)
                    yield sse(
                        {
                            "type": "speech.audio.done",
                            "usage": {
                                "input_tokens": prompt,
                                "output_tokens": completion,
                                "total_tokens": prompt + completion,
                            },
                        }
                    )
        finally:
            run.close()

    if req.stream_format == "sse":
        return EngineStream(events(), run, media_type="text/event-stream", headers=SSE_HEADERS)
    return EngineStream(audio_bytes(), run, media_type=encoder.media_type)


# POST /v1/audio/transcriptions ---------------------------------------------------------------------------


TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


def _form_str(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a form field, not a file", name)
    return value


def _form_number(form: Any, name: str, kind: type, lo: float, hi: float) -> Any:
    raw = _form_str(form, name)
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise bad_request(f"{name} must be a {kind.__name__}, got {raw!r}", name) from None
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be from {lo:g} to {hi:g}, got {raw}", name)
    return value


def _form_bool(form: Any, name: str) -> bool:
    raw = (_form_str(form, name) or "false").strip().lower()
    if raw not in ("true", "false", "1", "0"):
        raise bad_request(f"{name} must be true or false, got {raw!r}", name)
    return raw in ("true", "1")


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    state = request.app.state.server
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise bad_request("send the audio as multipart/form-data with a 'file' part", "file", "invalid_content_type")
    request._body = await read_body(request)  # the size limit, before the multipart parser buffers anything
    try:
        form = await request.form(max_files=1, max_fields=64, max_part_size=1024 * 1024)
    except Exception as e:
        raise bad_request(f"could not parse the multipart form: {e}", None, "invalid_form") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise bad_request("the form has no 'file' part holding the audio", "file")
    fmt = _form_str(form, "response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise bad_request(
            f"response_format {fmt!r} is not supported; use one of {', '.join(TRANSCRIPTION_FORMATS)}",
            "response_format",
        )
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        if form.getlist(name):
            raise bad_request("timestamps are not supported: the model gives no word or segment times", name)
    if "logprobs" in form.getlist("include[]"):
        raise bad_request("logprobs are not supported", "include[]")
    stream = _form_bool(form, "stream")
    temperature = _form_number(form, "temperature", float, 0.0, 10.0)
    max_tokens = _form_number(form, "max_tokens", int, 1, 2**31)  # lfm2audio extension
    language = _form_str(form, "language") or "en"

    try:
        pcm, rate = await asyncio.to_thread(decode_audio, await upload.read())  # off the event loop
    except AudioFileError as e:
        raise bad_request(str(e), "file", "invalid_audio_file") from None
    duration = len(pcm) / rate
    budget = token_budget(request, max_tokens)
    config = SessionConfig(
        mode="asr",
        text_sampling=SamplingParams(temperature, None),
        max_output_tokens=budget,
    )
    run = EngineRequest(state, config)
    await run.__aenter__()
    try:
        run.add_audio(pcm, rate)
        await run.start(budget)
    except BaseException:
        run.close()
        raise

    def usage() -> dict:
        return {"type": "duration", "seconds": round(duration, 3)}

    if stream:

        async def events():
            try:
                async for ev in run.events():
                    if isinstance(ev, TextDelta):
                        yield sse({"type": "transcript.text.delta", "delta": ev.text})
                    elif isinstance(ev, ResponseDone):
                        failure = run.failure()
                        if failure is not None:
                            yield sse({"type": "error", **failure.body()})
                            return
                        yield sse({"type": "transcript.text.done", "text": run.outcome.transcript, "usage": usage()})
            finally:
                run.close()

        return EngineStream(events(), run, media_type="text/event-stream", headers=SSE_HEADERS)

    try:
        async for _ in run.events():
            pass
    finally:
        run.close()
    failure = run.failure()
    if failure is not None:
        raise failure
    text = run.outcome.transcript
    if fmt == "text":
        return PlainTextResponse(text + "\n")
    if fmt == "verbose_json":
        return JSONResponse(
            {"task": "transcribe", "language": language, "duration": round(duration, 3), "text": text, "usage": usage()}
        )
    return JSONResponse({"text": text, "usage": usage()})


# Wiring ------------------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    state = request.app.state.server
    state.metrics.errors.labels(exc.code).inc()
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def install(app: FastAPI) -> None:
    """Add the HTTP API to the server app (its auth middleware covers these routes)."""
    state = app.state.server
    if not hasattr(state, "started"):
        state.started = time.time()
    if not hasattr(state, "http_requests"):
        state.http_requests = set()
    app.include_router(router)
    app.include_router(chat_router)
    app.add_exception_handler(APIError, _api_error)


__all__ = ["SPEECH_FORMATS", "install", "router"]
