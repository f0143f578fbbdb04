"""Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.active_sessions = Gauge("lfm2audio_active_sessions", "Open realtime sessions", registry=r)
        self.ready = Gauge("lfm2audio_ready", "1 when the model is loaded and warmed up", registry=r)
        self.sessions = Counter("lfm2audio_sessions", "Realtime sessions opened", registry=r)
        self.refused = Counter("lfm2audio_connections_refused", "WebSocket connections refused", ["reason"], registry=r)
        self.responses = Counter("lfm2audio_responses", "Responses finished", ["mode", "status"], registry=r)
        self.ttfa = Histogram(
            "lfm2audio_time_to_first_audio_seconds",
            "From response start (response.create or end of speech) to its first audio frame",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lfm2audio_time_to_first_token_seconds",
            "From response start to its first text or audio token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "lfm2audio_real_time_factor",
            "Generation time / seconds of audio produced, per response (< 1 is faster than real time)",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.frames = Counter("lfm2audio_audio_frames", "80 ms audio frames sent", registry=r)
        self.text_tokens = Counter("lfm2audio_text_tokens", "Text tokens generated", registry=r)
        self.input_audio = Counter("lfm2audio_input_audio_seconds", "Seconds of audio received", registry=r)
        self.errors = Counter("lfm2audio_errors", "Error events sent to clients", ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
