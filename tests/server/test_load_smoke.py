"""A short level of the load benchmark (bench/bench_load.py): four simulated users hold real-time spoken
conversations (espeak-ng speech paced at 20 ms, server VAD, three turns each) with a real
``lfm2audio-server`` subprocess on the tiny golden checkpoint; every turn must finish, p95 time to first
audio < 1.5 s and < 2% of frames late for a 120 ms jitter buffer (the benchmark's pass criteria)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_load  # noqa: E402


def test_four_realtime_conversations_pass(checkpoint_dir: Path, tmp_path: Path):
    speech = [bench_load.espeak_speech(t, 24_000) for t in bench_load.PHRASES]
    # The layout README's capacity table measures: an engine process (one torch thread: CI machines are
    # shared, and another process can hold a second thread off the CPU longer than a frame) and one API worker.
    extra = ["--workers", "1", "--threads", "1"]
    with bench_load.ServerProcess(checkpoint_dir, max_sessions=4, extra=extra, log=tmp_path / "server.log") as server:
        levels = asyncio.run(_both(server, speech))
    for r in levels:
        assert r.turns_started >= 2 * 3, r  # three turns per user at least
        assert r.errors == 0, r.error_kinds
        assert r.turns_done == r.turns_started, r
        assert r.frames_per_reply > 5, r  # replies carry audio
        assert r.ttfa_p95_s is not None and r.ttfa_p95_s < bench_load.PASS_TTFA_P95_S, r
        assert r.ttfa_p50_s > 0.5, r  # the 500 ms VAD silence window comes first: TTFA is measured from speech end
        assert r.late_pct < 100 * bench_load.PASS_LATE, r
        assert r.passed, r
        assert r.server_cpu_pct is not None and r.server_cpu_pct > 0 and r.server_rss_mib > 50


async def _both(server: bench_load.ServerProcess, speech: list) -> list:
    """Two JSON (base64) users and two binary PCM16 users at the same time."""
    kw = dict(duration_s=8.0, min_turns=3, server_pid=server.pid)
    return list(
        await asyncio.gather(
            bench_load.run_level(server.url, 2, speech, audio="json", seed=1, **kw),
            bench_load.run_level(server.url, 2, speech, audio="binary", seed=2, **kw),
        )
    )
