"""ServerConfig: command-line flags, then ``LFM2AUDIO_*`` environment variables, then defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

DEFAULT_MODEL = "LiquidAI/LFM2-Audio-1.5B"
ENV_PREFIX = "LFM2AUDIO_"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    # Model and engine
    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None  # float32 | bfloat16 | float16
    quantize: str | None = None  # int8 | int4 (CPU only)
    max_sessions: int = 8
    max_context: int = 4096
    prefill_chunk: int = 128
    audio_decoder: str = "auto"  # auto | mimi | detokenizer
    threads: int = 0  # torch intra-op threads of the engine thread; 0: torch's default
    workers: int = 0  # API worker processes beside an engine process; 0: the engine runs in the API process
    warmup: bool = True
    # Network
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # empty: any origin
    static_dir: str | None = None  # default: clients/web of the checkout or the working directory
    # permessage-deflate on the WebSocket: off, as audio hardly compresses and deflate costs the event loop
    # CPU per message (about 12% of its time under load, issue 12)
    ws_per_message_deflate: bool = False
    # Limits
    max_message_bytes: int = 4 * 1024 * 1024
    max_input_audio_s: float = 120.0
    max_session_s: float = 3600.0
    idle_timeout_s: float = 600.0
    send_queue_max_bytes: int = 4 * 1024 * 1024
    send_queue_max_messages: int = 2048
    send_timeout_s: float = 20.0  # a write blocked this long (the client reads nothing): drop it
    max_output_tokens: int = 2048  # cap of a response; "inf" means this
    # HTTP API (docs/http.md)
    http_max_body_bytes: int = 32 * 1024 * 1024  # an upload or JSON body (base64 audio included)
    http_max_queue: int = 64  # requests waiting for a free engine slot
    http_queue_timeout_s: float = 30.0  # longest wait for a slot before 503
    # Operations
    log_level: str = "info"
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        positive = (
            "port max_sessions max_context prefill_chunk max_message_bytes send_queue_max_bytes "
            "send_queue_max_messages max_output_tokens http_max_body_bytes"
        )
        for name in positive.split():
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "port" else 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        seconds = (
            "max_input_audio_s max_session_s idle_timeout_s shutdown_grace_s http_queue_timeout_s send_timeout_s"
        ).split()
        for name in seconds:
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        for name in ("threads", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.http_max_queue, int) or self.http_max_queue < 0:
            raise ConfigError(f"http_max_queue must be a non-negative integer, got {self.http_max_queue!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantize not in (None, "int8", "int4"):
            raise ConfigError(f"quantize must be int8 or int4, got {self.quantize!r}")
        if self.audio_decoder not in ("auto", "mimi", "detokenizer"):
            raise ConfigError(f"audio_decoder must be auto, mimi or detokenizer, got {self.audio_decoder!r}")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"log_level must be critical, error, warning, info or debug, got {self.log_level!r}")

    def replace(self, **changes: object) -> ServerConfig:
        return replace(self, **changes)

    @property
    def ws_max_size(self) -> int:
        """Hard per-message limit of the WebSocket layer (larger messages close the socket with 1009).

        Messages between ``max_message_bytes`` and this get an error event and the session goes on.
        """
        return 2 * self.max_message_bytes

    def resolved_static_dir(self) -> Path | None:
        if self.static_dir:
            p = Path(self.static_dir)
            return p if p.is_dir() else None
        for base in (Path(__file__).resolve().parents[1], Path.cwd()):
            p = base / "clients" / "web"
            if p.is_dir():
                return p
        return None


@dataclass(frozen=True)
class _Opt:
    flag: str
    field: str
    kind: type | str
    help: str
    env: str = field(default="")


_OPTIONS = [
    _Opt("--model", "model", str, f"Hub repo id or local folder (default {DEFAULT_MODEL})"),
    _Opt("--device", "device", str, "torch device (default cuda when available, else cpu)"),
    _Opt("--dtype", "dtype", str, "float32 | bfloat16 | float16 (default bfloat16 on CUDA, float32 on CPU)"),
    _Opt("--quantize", "quantize", str, "int8 | int4: quantized model and int8 Mimi decoder (CPU only)"),
    _Opt("--host", "host", str, "bind address (default 127.0.0.1)"),
    _Opt("--port", "port", int, "port (default 8000)"),
    _Opt("--max-sessions", "max_sessions", int, "concurrent sessions (engine slots; default 8)"),
    _Opt("--max-context", "max_context", int, "positions per session (default 4096)"),
    _Opt("--prefill-chunk", "prefill_chunk", int, "positions prefilled per engine step (default 128)"),
    _Opt("--audio-decoder", "audio_decoder", str, "auto | mimi | detokenizer (default auto)"),
    _Opt("--workers", "workers", int, "API worker processes beside an engine process (default 0: one process)"),
    _Opt("--threads", "threads", int, "torch threads of the engine thread (default 0: torch's, the core count)"),
    _Opt("--no-warmup", "warmup", "false", "skip the warm-up turn before /ready reports ready"),
    _Opt("--api-key", "api_keys", "list", "accepted API key (repeatable; env: comma-separated)"),
    _Opt("--api-key-file", "api_key_file", "file", "file of accepted API keys, one per line (# comments)"),
    _Opt("--allowed-origins", "allowed_origins", "csv", "comma-separated browser origins allowed (default any)"),
    _Opt("--ws-per-message-deflate", "ws_per_message_deflate", "true", "offer permessage-deflate (default off)"),
    _Opt("--static-dir", "static_dir", str, "folder served at / (default clients/web when it exists)"),
    _Opt("--max-message-bytes", "max_message_bytes", int, "largest client message (default 4 MiB)"),
    _Opt("--max-input-audio", "max_input_audio_s", float, "seconds of uncommitted input audio (default 120)"),
    _Opt("--max-session-duration", "max_session_s", float, "seconds a session may last (default 3600)"),
    _Opt("--idle-timeout", "idle_timeout_s", float, "seconds without client messages or output (default 600)"),
    _Opt("--send-queue-bytes", "send_queue_max_bytes", int, "unsent output per connection before drop (4 MiB)"),
    _Opt("--send-queue-messages", "send_queue_max_messages", int, "unsent messages per connection (2048)"),
    _Opt("--send-timeout", "send_timeout_s", float, "seconds one write may stay blocked before drop (20)"),
    _Opt("--max-output-tokens", "max_output_tokens", int, "cap on a response's tokens (default 2048)"),
    _Opt("--http-max-body-bytes", "http_max_body_bytes", int, "largest HTTP request body (default 32 MiB)"),
    _Opt("--http-max-queue", "http_max_queue", int, "HTTP requests waiting for a free slot (default 64)"),
    _Opt("--http-queue-timeout", "http_queue_timeout_s", float, "seconds an HTTP request waits for a slot (30)"),
    _Opt("--log-level", "log_level", str, "critical | error | warning | info | debug (default info)"),
    _Opt("--shutdown-grace", "shutdown_grace_s", float, "seconds in-flight responses get on SIGTERM (default 10)"),
]


def _env_name(opt: _Opt) -> str:
    return ENV_PREFIX + opt.flag.lstrip("-").replace("-", "_").upper()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lfm2audio-server",
        description="Real-time speech-to-speech over the OpenAI Realtime protocol (WebSocket /v1/realtime), "
        "and OpenAI's HTTP audio APIs (/v1/audio/transcriptions, /v1/audio/speech, /v1/chat/completions).",
        epilog="Every flag also reads LFM2AUDIO_<FLAG> from the environment (e.g. LFM2AUDIO_API_KEY, "
        "LFM2AUDIO_MAX_SESSIONS); flags win.",
    )
    for opt in _OPTIONS:
        metavar = opt.flag.lstrip("-").upper().replace("-", "_")
        if opt.kind in ("false", "true"):
            const = opt.kind == "true"
            p.add_argument(opt.flag, dest=opt.field, action="store_const", const=const, default=None, help=opt.help)
        elif opt.kind == "list":
            p.add_argument(opt.flag, dest=opt.field, action="append", default=None, metavar="KEY", help=opt.help)
        elif opt.kind in ("file", "csv"):
            p.add_argument(opt.flag, dest=opt.field, default=None, metavar=metavar, help=opt.help)
        else:
            p.add_argument(opt.flag, dest=opt.field, type=opt.kind, default=None, metavar=metavar, help=opt.help)  # type: ignore[arg-type]
    return p


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def read_key_file(path: str | Path) -> tuple[str, ...]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read API key file {path}: {e}") from None
    keys = tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
    if not keys:
        raise ConfigError(f"API key file {path} holds no keys")
    return keys


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Flags override ``LFM2AUDIO_*`` environment variables, which override the defaults."""
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(argv))
    values: dict[str, object] = {}
    keys: list[str] = []
    for opt in _OPTIONS:
        cli = args.get(opt.field)
        raw_env = env.get(_env_name(opt))
        if opt.kind == "list":
            if cli:
                keys.extend(cli)
            elif raw_env:
                keys.extend(_split(raw_env))
            continue
        if opt.kind == "file":
            path = cli or raw_env
            if path:
                keys.extend(read_key_file(path))
            continue
        if cli is not None:
            value: object = cli
        elif raw_env is not None and raw_env != "":
            try:
                if opt.kind == "false":
                    value = raw_env.strip().lower() not in ("1", "true", "yes", "on")
                elif opt.kind == "true":
                    value = raw_env.strip().lower() in ("1", "true", "yes", "on")
                elif opt.kind == "csv":
                    value = raw_env
                else:
                    value = opt.kind(raw_env)  # type: ignore[operator]
            except ValueError:
                raise ConfigError(f"{_env_name(opt)}={raw_env!r} is not a valid {opt.kind.__name__}") from None  # type: ignore[union-attr]
        else:
            continue
        if opt.kind == "csv":
            value = _split(str(value))
        values[opt.field] = value
    if keys:
        values["api_keys"] = tuple(dict.fromkeys(keys))
    names = {f.name for f in fields(ServerConfig)}
    return ServerConfig(**{k: v for k, v in values.items() if k in names})
