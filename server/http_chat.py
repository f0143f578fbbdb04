"""POST /v1/chat/completions with audio in and out, in OpenAI's form and llama.cpp's liquid-audio form.

A request is one user turn (its system messages become the system prompt; consecutive user
messages are joined into one turn, text and ``input_audio`` parts in order). Which engine mode
answers:

- ``modalities`` with "audio" (or an ``audio`` object): TTS mode when the system prompt asks for TTS
  ("Perform TTS..."), else chat mode (interleaved text and audio).
- ``modalities`` ["text"]: ASR mode for an ASR system prompt, else sequential text generation.
- no ``modalities``: the system prompt decides, as in llama.cpp's ``llama-liquid-audio-server``:
  "Perform TTS..." speaks, "Respond with interleaved text and audio." answers in both, anything
  else answers in text.

Streamed text goes in ``delta.content`` (and ``delta.audio.transcript`` when audio is produced);
each 80 ms audio frame goes in ``delta.audio.data`` (base64 PCM16, OpenAI) and in
``delta.audio_chunk.data`` (base64 float32, llama.cpp's liquid-audio server, read by LiveKit's
LiquidAI plugin), both mono 24 kHz.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from lfm2audio.engine import OUTPUT_SAMPLE_RATE, AudioFrame, ResponseDone, SessionConfig, TextDelta
from lfm2audio_server.audio import b64, float_to_pcm16
from lfm2audio_server.audio_files import AudioFileError, decode_audio, encode_whole
from lfm2audio_server.http_common import SSE_HEADERS, ExtensionIn, parse, read_json, sampling_params, sse, token_budget
from lfm2audio_server.http_engine import (
    EngineRequest,
    EngineStream,
    bad_request,
    finish_reason,
    usage_tokens,
)
from lfm2audio_server.voices import PLAIN_PROMPT, VoiceError, resolve_voice, voice_style

router = APIRouter()

INTERLEAVED_PROMPT = "Respond with interleaved text and audio."
TEXT_CHAT_PROMPT = "You are a helpful assistant."  # sequential text answers without a system message
AUDIO_OUT_FORMATS = {"pcm16": "pcm", "wav": "wav", "flac": "flac", "mp3": "mp3", "opus": "opus"}
AUDIO_EXPIRY_S = 3600  # only reported: nothing is stored, every request is stateless


class AudioOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    voice: str | dict | None = None
    format: str = "pcm16"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[dict] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, min_length=1)
    audio: AudioOut | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=1)  # llama.cpp's, not OpenAI's
    seed: int | None = Field(default=None, ge=0, le=2**62)
    n: int | None = None
    tools: list | None = None
    logprobs: bool | None = None
    stop: str | list | None = None
    response_format: dict | None = None
    reset_context: bool | None = None  # llama.cpp's liquid-audio server; every request here starts fresh
    lfm2audio: ExtensionIn | None = None


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.content[{i}] must be a text part", f"{where}.content")
            out.append(part["text"])
        return "\n".join(out)
    raise bad_request(f"{where}.content must be a string or a list of parts", f"{where}.content")


def _audio_part(part: dict, where: str) -> tuple[np.ndarray, int]:
    audio = part.get("input_audio")
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise bad_request(f"{where} needs input_audio.data (base64 audio)", where)
    try:
        data = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{where}.input_audio.data is not valid base64: {e}", where, "invalid_base64") from None
    try:
        return decode_audio(data)  # the bytes say their format; input_audio.format is only a hint
    except AudioFileError as e:
        raise bad_request(f"{where}: {e}", where, "invalid_audio_file") from None


def parse_messages(messages: list[dict]) -> tuple[str | None, list[tuple[str, Any]]]:
    """(system prompt, the user turn's parts: ("text", str) / ("audio", (pcm, rate)))."""
    system: list[str] = []
    parts: list[tuple[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ("system", "developer"):
            if parts:
                raise bad_request(f"{where}: system messages must come before the user's", where)
            system.append(_content_text(msg.get("content"), where))
        elif role == "user":
            content = msg.get("content")
            if isinstance(content, str):
                parts.append(("text", content))
                continue
            if not isinstance(content, list):
                raise bad_request(f"{where}.content must be a string or a list of parts", f"{where}.content")
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(("text", part["text"]))
                elif kind == "input_audio":
                    parts.append(("audio", _audio_part(part, f"{where}.content[{j}]")))
                else:
                    raise bad_request(
                        f"{where}.content[{j}]: part type {kind!r} is not supported (text and input_audio are)",
                        f"{where}.content",
                    )
        elif role in ("assistant", "tool", "function"):
            raise bad_request(
                f"{where}: {role} messages are not supported; each request is one stateless user turn "
                "(conversation history cannot be replayed into the engine)",
                where,
                "unsupported_message",
            )
        else:
            raise bad_request(f"{where}: unknown role {role!r}", where)
    if not parts:
        raise bad_request("messages hold no user content", "messages")
    parts = [(k, v) for k, v in parts if k == "audio" or v]
    if not parts:
        raise bad_request("the user's messages are empty", "messages")
    return ("\n".join(system) if system else None), parts


def choose_mode(req: ChatIn, system: str | None) -> tuple[str, bool]:
    """(engine mode, whether audio is produced)."""
    prompt = (system or "").strip().lower()
    tts = prompt.startswith("perform tts")
    asr = prompt.startswith("perform asr")
    if req.modalities is not None:
        wants_audio = "audio" in req.modalities
    elif req.audio is not None:
        wants_audio = True
    else:
        wants_audio = tts or prompt.startswith(INTERLEAVED_PROMPT.lower()[:24])
    if wants_audio:
        if asr:
            raise bad_request("an ASR system prompt answers in text; ask for modalities ['text']", "modalities")
        return ("tts" if tts else "chat"), True
    if tts:
        raise bad_request("a TTS system prompt answers in audio; ask for modalities ['text', 'audio']", "modalities")
    return "asr", False  # sequential text: the engine's asr mode stops at the first switch to audio


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = request.app.state.server
    req: ChatIn = parse(ChatIn, await read_json(request))
    if req.n not in (None, 1):
        raise bad_request("n must be 1", "n")
    if req.tools:
        raise bad_request("tools are not supported", "tools")
    if req.logprobs:
        raise bad_request("logprobs are not supported", "logprobs")
    if req.stop:
        raise bad_request("stop sequences are not supported", "stop")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    # Off the event loop: base64 and audio decoding of large uploads take a while.
    system, parts = await asyncio.to_thread(parse_messages, req.messages)
    mode, audio_out = choose_mode(req, system)
    audio_fmt = AUDIO_OUT_FORMATS.get((req.audio.format if req.audio else "pcm16").lower())
    if audio_out and audio_fmt is None:
        raise bad_request(f"audio.format must be one of {', '.join(AUDIO_OUT_FORMATS)}", "audio.format")
    if audio_out and req.stream and audio_fmt != "pcm":
        raise bad_request("streamed audio is pcm16 (as OpenAI's); set audio.format to 'pcm16'", "audio.format")

    instructions = system
    if mode == "tts" and (system is None or system.strip() == PLAIN_PROMPT) and req.audio and req.audio.voice:
        voice = req.audio.voice.get("id") if isinstance(req.audio.voice, dict) else req.audio.voice
        try:
            instructions = resolve_voice(voice_style(state.engine), voice=voice).prompt
        except VoiceError as e:
            raise bad_request(str(e), "audio.voice", "invalid_voice") from None
    elif mode == "asr" and system is None:
        instructions = TEXT_CHAT_PROMPT
    elif mode == "chat" and system is None:
        instructions = INTERLEAVED_PROMPT
    text_s, audio_s = sampling_params(mode, req.lfm2audio, temperature=req.temperature, top_k=req.top_k)
    ext_tokens = req.lfm2audio.max_tokens if req.lfm2audio else None
    budget = token_budget(request, req.max_completion_tokens, req.max_tokens, ext_tokens)
    config = SessionConfig(
        mode=mode,  # type: ignore[arg-type]
        instructions=instructions,
        text_sampling=text_s,
        audio_sampling=audio_s,
        max_output_tokens=budget,
        seed=req.seed,
    )
    run = EngineRequest(state, config)
    await run.__aenter__()
    try:
        for kind, value in parts:
            if kind == "audio":
                run.add_audio(*value)
            else:
                run.add_text(value)
        await run.start(budget)
    except BaseException:
        run.close()
        raise

    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    audio_id = "audio_" + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = state.model_name

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse(
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def usage(done: ResponseDone | None) -> dict:
        prompt, completion, text_tokens, frames = usage_tokens(done)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "completion_tokens_details": {"text_tokens": text_tokens, "audio_tokens": frames},
        }

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                first_audio = True
                async for ev in run.events():
                    if isinstance(ev, TextDelta):
                        delta: dict = {"content": ev.text}
                        if audio_out:
                            delta["audio"] = {"id": audio_id, "transcript": ev.text}
                        yield chunk(delta)
                    elif isinstance(ev, AudioFrame):
                        audio: dict = {"id": audio_id, "data": b64(float_to_pcm16(ev.pcm))}
                        if first_audio:
                            audio["expires_at"] = created + AUDIO_EXPIRY_S
                            first_audio = False
                        f32 = b64(np.ascontiguousarray(ev.pcm, dtype="<f4").tobytes())
                        yield chunk({"audio": audio, "audio_chunk": {"data": f32, "sample_rate": OUTPUT_SAMPLE_RATE}})
                    elif isinstance(ev, ResponseDone):
                        failure = run.failure()
                        if failure is not None:
                            yield sse(failure.body())
                            return
                        yield chunk({}, finish_reason(ev))
                        if include_usage:
                            yield sse(
                                {
                                    "id": cid,
                                    "object": "chat.completion.chunk",
                                    "created": created,
                                    "model": model,
                                    "choices": [],
                                    "usage": usage(ev),
                                }
                            )
                yield b"data: [DONE]\n\n"
            finally:
                run.close()

        return EngineStream(events(), run, media_type="text/event-stream", headers=SSE_HEADERS)

    pcm: list[np.ndarray] = []
    try:
        async for ev in run.events():
            if isinstance(ev, AudioFrame):
                pcm.append(ev.pcm)
    finally:
        run.close()
    done = run.outcome.done
    failure = run.failure()
    if failure is not None:
        raise failure
    text = run.outcome.transcript
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if audio_out:
        wave = np.concatenate(pcm) if pcm else np.zeros(0, dtype=np.float32)
        message["audio"] = {
            "id": audio_id,
            "data": b64(encode_whole(wave, audio_fmt)),  # type: ignore[arg-type]
            "expires_at": created + AUDIO_EXPIRY_S,
            "transcript": text,
        }
    body = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(done), "logprobs": None}],
        "usage": usage(done),
    }
    return JSONResponse(body)
