"""JSON structured logs, one object per line, carrying the session id of the task that logged."""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
import traceback

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("lfm2audio_session_id", default=None)

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        sid = getattr(record, "session_id", None) or session_id_var.get()
        if sid:
            out["session_id"] = sid
        for k, v in vars(record).items():
            if k not in _STANDARD and k != "session_id" and not k.startswith("_"):
                out[k] = v if isinstance(v, str | int | float | bool | type(None) | list | dict) else repr(v)
        if record.exc_info:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(out, ensure_ascii=False, default=repr)


def configure_logging(level: str = "info", stream=None) -> None:
    """Route the root, uvicorn and our loggers through one JSON handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    install_log_filters()


def install_log_filters() -> None:
    """Keep client mistakes out of uvicorn's error log (idempotent; create_app calls it too)."""
    lg = logging.getLogger("uvicorn.error")
    for f in (_DenialResponseNoise, _InvalidUtf8):
        if not any(isinstance(x, f) for x in lg.filters):
            lg.addFilter(f())


class _InvalidUtf8(logging.Filter):
    """uvicorn logs a client's text frame that is not UTF-8 at error level with a traceback, though it
    answers correctly (close 1007, RFC 6455 section 8.1): a client's mistake, logged here at info."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith("Invalid UTF-8 sequence"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "client sent a text frame that is not UTF-8; closed with 1007", ()
            record.exc_info, record.exc_text = None, None
        return True


class _DenialResponseNoise(logging.Filter):
    """Drop uvicorn's error for WebSockets we refuse with an HTTP 503 (draining, full, loading).

    uvicorn's sans-io WebSocket backend never marks a handshake answered by a denial response as
    complete and then logs this at error level, which would page someone on every rolling update.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def uvicorn_log_config() -> dict:
    """A uvicorn ``log_config`` that leaves formatting to ``configure_logging``."""
    return {"version": 1, "disable_existing_loggers": False}
