"""A short level of the load benchmark (bench/bench_load.py): four simulated users hold real-time spoken
conversations (espeak-ng speech paced at 20 ms, server VAD, three turns each) with a real
``lfm2audio-server`` subprocess on the tiny golden checkpoint; every turn must finish, p95 time to first
audio < 1.5 s and < 2% of frames late for a 120 ms jitter buffer (the benchmark's pass criteria).

The two timing criteria are wall-clock figures on a shared 2-core machine, where another tenant can hold
the CPU off for longer than a frame. So a level whose only misses are timing ones is run once more on
the same server, and the second level must meet every criterion, at the same bounds. A server that is too
slow misses them twice; everything else (turns finished, no errors, audio in every reply) is asserted on
every level that runs."""

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
            _assert_functional(r)
        missed = [r for r in levels if not bench_load.meets_pass_timing(r.ttfa_p95_s, r.late_pct)]
        if missed:
            print(f"timing missed on the first run, running again: {[_timing(r) for r in missed]}")
            levels = asyncio.run(_both(server, speech))
    for r in levels:
        _assert_functional(r)
        assert r.ttfa_p95_s is not None and r.ttfa_p95_s < bench_load.PASS_TTFA_P95_S, _timing(r)
        assert r.late_pct < 100 * bench_load.PASS_LATE, _timing(r)
        assert r.passed, r


def _assert_functional(r: bench_load.LevelResult) -> None:
    """The criteria that do not depend on the machine's speed."""
    assert r.turns_started >= 2 * 3, r  # three turns per user at least
    assert r.errors == 0, r.error_kinds
    assert r.turns_done == r.turns_started, r
    assert r.frames_per_reply > 5, r  # replies carry audio
    assert r.ttfa_p50_s is not None and r.ttfa_p50_s > 0.5, r  # the 500 ms VAD silence window comes first
    assert r.server_cpu_pct is not None and r.server_cpu_pct > 0 and r.server_rss_mib > 50


def _timing(r: bench_load.LevelResult) -> dict:
    return {"audio": r.audio, "ttfa_p95_s": r.ttfa_p95_s, "late_pct": r.late_pct, "loadavg_1m": r.loadavg_1m}


async def _both(server: bench_load.ServerProcess, speech: list) -> list:
    """Two JSON (base64) users and two binary PCM16 users at the same time."""
    kw = dict(duration_s=8.0, min_turns=3, server_pid=server.pid)
    return list(
        await asyncio.gather(
            bench_load.run_level(server.url, 2, speech, audio="json", seed=1, **kw),
            bench_load.run_level(server.url, 2, speech, audio="binary", seed=2, **kw),
        )
    )
