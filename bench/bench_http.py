"""HTTP API latency: time to the first audio byte of /v1/audio/speech, against the engine's first decoded frame.

A real server (uvicorn on 127.0.0.1, in this process) on the tiny golden TTS weights, or on --model.
For each request the bench records when the client sent it, when the engine finished decoding the
response's first audio frame (the engine's audio decoder is wrapped to timestamp its calls, same
clock) and when the first audio byte arrived; and the engine's step time (the interval between
consecutive frame decodes of one response). The acceptance: first byte within one engine step of
the first decoded frame. Then N concurrent speech requests: TTFB percentiles and throughput.

    python bench/bench_http.py                  # prints a table, writes bench/results/http.json
    python bench/bench_http.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from live_server import LiveServer, tts_checkpoint  # noqa: E402

from lfm2audio.engine import Engine, EngineConfig  # noqa: E402

GOLDEN = ROOT.parent / "shared" / "golden"


class DecodeClock:
    """Wraps the engine's audio decoder: the wall time (perf_counter) at which each decode call returned."""

    def __init__(self, engine: Engine) -> None:
        self.times: list[float] = []
        self._lock = threading.Lock()
        inner = engine.audio.decode

        def decode(*args, **kwargs):
            out = inner(*args, **kwargs)
            with self._lock:
                self.times.append(time.perf_counter())
            return out

        engine.audio.decode = decode  # type: ignore[method-assign]

    def after(self, t: float) -> list[float]:
        with self._lock:
            return [x for x in self.times if x >= t]


async def speech(client, url: str, text: str, tokens: int) -> dict:
    body = {
        "input": text,
        "voice": "alloy",
        "response_format": "pcm",
        "stream_format": "audio",
        "lfm2audio": {"sampling": {"audio": {"temperature": 0}}, "max_tokens": tokens},
    }
    t0 = time.perf_counter()
    first = None
    size = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for chunk in r.aiter_raw():
            if chunk and first is None:
                first = time.perf_counter()
            size += len(chunk)
    return {"t0": t0, "first_byte": first, "end": time.perf_counter(), "bytes": size}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint folder (default: the tiny golden TTS weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "http.json"))
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.tokens, args.concurrency = 3, 20, "1,4"
    torch.set_num_threads(args.threads)
    import httpx2 as httpx

    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = (
            Path(args.model)
            if args.model
            else tts_checkpoint(GOLDEN / "checkpoint", GOLDEN / "checkpoint_tts", Path(tmp) / "ck")
        )
        engine = Engine.from_pretrained(model, config=EngineConfig(max_sessions=max(levels), max_context=1024))
        engine.start()
        engine.warmup()
        clock = DecodeClock(engine)
        with LiveServer(engine, http_queue_timeout_s=60.0) as srv:
            url = srv.http + "/v1/audio/speech"

            async def run_lone() -> list[dict]:
                out = []
                async with httpx.AsyncClient(timeout=120) as c:
                    await speech(c, url, "Warm up.", 5)
                    for i in range(args.repeats):
                        r = await speech(
                            c, url, f"Sentence {i}: the quick brown fox jumps over the lazy dog.", args.tokens
                        )
                        decodes = [t for t in clock.after(r["t0"]) if t <= r["end"]]
                        r["first_decode"] = decodes[0]
                        r["step"] = statistics.median(b - a for a, b in zip(decodes, decodes[1:], strict=False))
                        out.append(r)
                return out

            lone = asyncio.run(run_lone())

            async def run_batch(n: int) -> dict:
                async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=n)) as c:
                    t = time.perf_counter()
                    rs = await asyncio.gather(
                        *(speech(c, url, f"Request {i} speaks now.", args.tokens) for i in range(n))
                    )
                    wall = time.perf_counter() - t
                ttfb = [r["first_byte"] - r["t0"] for r in rs]
                audio_s = sum(r["bytes"] for r in rs) / 2 / 24_000
                return {
                    "concurrency": n,
                    "ttfb_p50_ms": 1e3 * pct(ttfb, 0.5),
                    "ttfb_p95_ms": 1e3 * pct(ttfb, 0.95),
                    "audio_s": audio_s,
                    "wall_s": wall,
                    "x_realtime": audio_s / wall,
                }

            batches = [asyncio.run(run_batch(n)) for n in levels]
        engine.stop()

    ttfb = [1e3 * (r["first_byte"] - r["t0"]) for r in lone]
    gap = [1e3 * (r["first_byte"] - r["first_decode"]) for r in lone]
    step = [1e3 * r["step"] for r in lone]
    within = sum(g <= s for g, s in zip(gap, step, strict=True))
    print(
        f"/v1/audio/speech, pcm, stream_format audio; {args.repeats} lone requests, {args.tokens} tokens, "
        f"{args.threads} threads (CPU shared with other work: absolute times are noisy)"
    )
    print(f"{'':28s}{'p50':>9s}{'p95':>9s}{'max':>9s}")
    for name, xs in (("time to first byte (ms)", ttfb), ("first decode -> byte (ms)", gap), ("engine step (ms)", step)):
        print(f"{name:28s}{pct(xs, 0.5):9.1f}{pct(xs, 0.95):9.1f}{max(xs):9.1f}")
    print(f"first byte within one engine step of the first decoded frame: {within}/{len(lone)} requests")
    print(
        f"\n{'concurrent':>10s}{'TTFB p50 ms':>13s}{'TTFB p95 ms':>13s}{'audio s':>9s}{'wall s':>8s}{'x realtime':>12s}"
    )
    for b in batches:
        print(
            f"{b['concurrency']:10d}{b['ttfb_p50_ms']:13.1f}{b['ttfb_p95_ms']:13.1f}{b['audio_s']:9.2f}"
            f"{b['wall_s']:8.2f}{b['x_realtime']:12.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": str(args.model or "golden tiny TTS weights"),
                "threads": args.threads,
                "tokens": args.tokens,
                "lone": {"ttfb_ms": ttfb, "decode_to_byte_ms": gap, "step_ms": step, "within_one_step": within},
                "batches": batches,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
