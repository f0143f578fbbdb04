"""Engine overhead per step on the tiny golden checkpoint, where the model's arithmetic is negligible.

For each number of active chat sessions (default 1, 8, 32, 64, 128) it reports

* aten ops per engine step (torch profiler, over whole interleave cycles of 18 steps: 6 text + 12 audio),
* steady-state step time (the engine stepped by this script, no thread: ``Engine.step``; the levels'
  engines run side by side and are timed in alternation, so a drift in the machine's speed hits all alike),
  against the 1-session level, and where it goes: the model's batched calls (backbone forward,
  depthformer frame with its sampling, audio decoder step), the rest of the batched step (the engine's
  own tensor work), prompt chunks of turns that restart, and the host's part (plan, events),
* through the public API (engine thread running, events consumed), each session's audio rate:
  the slowest session's frames per second, against real time (12.5).

Sessions use the seed's default chat sampling (audio temperature 1.0, top-k 4; text greedy), each with
its own seed; a session whose response ends starts another at once, so every session stays active.
The audio decoder defaults to the tiny checkpoint's Mimi: its detokenizer has the full-size width (the
golden README: its code fixes it), so it is real arithmetic, not overhead; ``--audio-decoder detokenizer``
measures it too. Prints a table and writes JSON (``--out``).

    python bench/bench_engine_overhead.py
    python bench/bench_engine_overhead.py --sessions 1,64 --threads 2 --out bench/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor  # noqa: E402
from lfm2audio.engine import (  # noqa: E402
    DEFAULT_SAMPLING,
    AudioFrame,
    Engine,
    EngineConfig,
    ResponseDone,
    SessionConfig,
    TextDelta,
)
from lfm2audio.engine.cpu_tuning import call_in_thread, load_without_team  # noqa: E402
from lfm2audio.tokens import FRAME_RATE  # noqa: E402

GOLDEN = Path(os.environ.get("LFM2AUDIO_GOLDEN", ROOT.parent / "shared" / "golden"))
CYCLE = 18  # steps of one interleave cycle (6 text + 12 audio)
REAL_TIME_POSITIONS = FRAME_RATE * CYCLE / 12  # sampled positions per second that keep the audio real time


def chat_config(seed: int) -> SessionConfig:
    text, audio = DEFAULT_SAMPLING["chat"]
    return SessionConfig(mode="chat", text_sampling=text, audio_sampling=audio, max_output_tokens=4000, seed=seed)


def restart_finished(sessions: list) -> tuple[int, int]:
    """Drain events; a session whose response ended asks for the next one. Returns (audio frames, text tokens)."""
    frames = tokens = 0
    for s in sessions:
        while (ev := s.events.get_nowait()) is not None:
            if isinstance(ev, AudioFrame) and not ev.end_of_audio:
                frames += 1
            elif isinstance(ev, TextDelta):
                tokens += 1
            elif isinstance(ev, ResponseDone):
                s.add_text("Tell me more.")
                s.create_response()
    return frames, tokens


def open_sessions(engine: Engine, n: int) -> list:
    sessions = [engine.open_session(chat_config(seed=1000 + i)) for i in range(n)]
    for s in sessions:
        s.add_text("Hello there, how are you today?")
        s.create_response()
    return sessions


def all_decoding(engine: Engine, n: int) -> bool:
    # All n sessions have sampled at least once and no prompt is waiting: the steady state.
    busy = [s for s in engine._slots if s is not None and s.response is not None and s.response.steps > 0]
    return len(busy) == n and not engine._prefill_queue


class PhaseClock:
    """Wall time of the model's batched calls inside engine steps, per phase (seconds, summed).

    Wraps, on the instances only, the batched step, the backbone's forward inside it (a prefill chunk's
    forward is the "prefill" phase), the depthformer frame, the audio decoder step and the prefill.
    The wrappers add a clock read per call (a few calls a step); ``close`` removes the model's.
    """

    # "batch": the whole batched step, the three after it inside it; "prefill": prompt chunks (a turn
    # restarting), outside it.
    PHASES = ("batch", "backbone", "depthformer", "audio", "prefill")

    def __init__(self, model) -> None:
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.in_step = False
        self._wrapped: list[tuple[object, str]] = []  # what ``_timed`` set, for ``close`` to remove
        self._timed(model.lfm, "forward", "backbone", only_in_step=True)
        self._timed(model, "sample_audio_frame_rows", "depthformer")

    def close(self) -> None:
        """The model and engines as they were (their methods are the classes' again)."""
        for obj, name in self._wrapped:
            delattr(obj, name)
        self._wrapped.clear()

    def attach(self, engine: Engine) -> None:
        self._timed(engine.audio, "step", "audio")
        self._timed(engine, "_prefill", "prefill")
        compute = engine.batch._compute

        def in_step(*args, **kwargs):
            self.in_step = True
            t0 = time.perf_counter()
            try:
                return compute(*args, **kwargs)
            finally:
                self.totals["batch"] += time.perf_counter() - t0
                self.in_step = False

        engine.batch._compute = in_step

    def _timed(self, obj, name: str, phase: str, only_in_step: bool = False) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            if only_in_step and not self.in_step:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[phase] += time.perf_counter() - t0

        setattr(obj, name, timed)
        self._wrapped.append((obj, name))

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def steady(model, proc, n: int, decoder: str) -> tuple[Engine, list]:
    """An engine stepped here (no thread) with n chat sessions, every one of them decoding."""
    engine = Engine(model, proc, EngineConfig(max_sessions=n, max_context=4096, audio_decoder=decoder))
    engine.step()
    sessions = open_sessions(engine, n)
    deadline = time.monotonic() + 600
    while not all_decoding(engine, n):
        if not engine.step():
            time.sleep(0.002)  # requests are still being prepared
        restart_finished(sessions)
        if time.monotonic() > deadline:
            raise RuntimeError("sessions did not reach the steady state")
    for _ in range(CYCLE):
        engine.step()
        restart_finished(sessions)
    return engine, sessions


def timed_cycle(engine: Engine, sessions: list, clock: PhaseClock, phases: dict[str, float]) -> list[float]:
    """Wall time of each step of one interleave cycle (steps that ran the batch only: a session
    restarting its turn may leave a step with nothing to do); adds those steps' phase times to ``phases``."""
    times: list[float] = []
    while len(times) < CYCLE:
        before = engine.steps
        start = clock.snapshot()
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if engine.steps > before:
            times.append(dt)
            for k, v in clock.snapshot().items():
                phases[k] += v - start[k]
        restart_finished(sessions)
    return times


def ops_per_step(engine: Engine, sessions: list) -> float:
    before = engine.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        while engine.steps - before < CYCLE:
            engine.step()
            restart_finished(sessions)  # keeps every session busy (its own ops are host-side, no aten)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / (engine.steps - before)


def stepped(model, proc, levels: list[int], decoder: str, cycles: int) -> dict[int, dict]:
    """Ops and step time per level with the engines stepped here, all levels' sessions decoding.

    The levels are timed in alternation, one interleave cycle each in turn, so that a change in
    the machine's speed while the bench runs (a shared or virtual machine's) affects every level alike.
    """
    clock = PhaseClock(model)
    engines = {n: steady(model, proc, n, decoder) for n in levels}
    for engine, _ in engines.values():
        clock.attach(engine)
    times: dict[int, list[float]] = {n: [] for n in levels}
    phases = {n: dict.fromkeys(PhaseClock.PHASES, 0.0) for n in levels}
    for _ in range(cycles):
        for n, (engine, sessions) in engines.items():
            times[n] += timed_cycle(engine, sessions, clock, phases[n])
    out = {}
    for n, (engine, sessions) in engines.items():
        ts = sorted(times[n])
        mean_ms = {k: 1000 * v / len(ts) for k, v in phases[n].items()}
        out[n] = {
            "ops_per_step": round(ops_per_step(engine, sessions)),
            "step_ms_median": 1000 * ts[len(ts) // 2],
            "step_ms_min": 1000 * ts[0],
            "step_ms_mean": 1000 * sum(ts) / len(ts),
            **{f"{k}_ms_mean": v for k, v in mean_ms.items()},
        }
        model_ms = mean_ms["backbone"] + mean_ms["depthformer"] + mean_ms["audio"]
        out[n]["glue_ms_mean"] = mean_ms["batch"] - model_ms  # gathers, text sampling, write-back, one copy
        out[n]["host_ms_mean"] = out[n]["step_ms_mean"] - mean_ms["batch"] - mean_ms["prefill"]  # plan, emit
        for s in sessions:
            s.close()
        engine.step()
    clock.close()
    return out


def threaded(model, proc, n: int, decoder: str, seconds: float, threads: int | None) -> dict:
    """Each session's output rate through the public API, the engine on its own thread.

    Real time needs 12.5 audio frames per second while a session speaks. With random weights a
    response's audio can end long before its text does (the text-only rest of an interleaved turn
    is what the model drew, not the engine being slow), so the test of real time is the slowest
    session's rate of sampled positions: an interleaved turn samples 18 positions (6 text + 12 audio)
    per 12 frames, so 18.75 positions per second keep its audio real time. Raw frames per second
    are reported too.
    """
    config = EngineConfig(max_sessions=n, max_context=4096, audio_decoder=decoder, threads=threads)
    engine = Engine(model, proc, config).start()
    try:
        sessions = open_sessions(engine, n)
        deadline = time.monotonic() + 600
        while not all_decoding(engine, n) and time.monotonic() < deadline:
            restart_finished(sessions)
            time.sleep(0.01)
        time.sleep(1.0)
        restart_finished(sessions)
        frames, positions = [0] * n, [0] * n
        steps0, t0 = engine.steps, time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.05)
            for i, s in enumerate(sessions):
                f, t = restart_finished([s])
                frames[i] += f
                positions[i] += f + t
        elapsed = time.monotonic() - t0
        steps = engine.steps - steps0
        rates = [c / elapsed for c in frames]
        pos_rates = [c / elapsed for c in positions]
        return {
            "frames_per_s_min": min(rates),
            "frames_per_s_mean": sum(rates) / n,
            "positions_per_s_min": min(pos_rates),
            "steps_per_s": steps / elapsed,
            "real_time": min(pos_rates) >= REAL_TIME_POSITIONS,
        }
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(GOLDEN / "checkpoint"))
    ap.add_argument("--sessions", default="1,8,32,64,128")
    ap.add_argument("--audio-decoder", default="mimi", choices=["mimi", "detokenizer"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of this process (the stepped engines)")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="EngineConfig.threads of the threaded engine (default: --threads)")
    ap.add_argument("--cycles", type=int, default=8, help="interleave cycles (18 steps) timed per level")
    ap.add_argument("--seconds", type=float, default=6.0, help="window of the public-API audio-rate measurement")
    ap.add_argument("--no-threaded", action="store_true", help="skip the public-API audio-rate measurement")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine_threads is None:
        args.engine_threads = args.threads
    # Loaded as the server loads (no OpenMP team left on this thread: lfm2audio.engine.cpu_tuning).
    model = load_without_team(LFM2AudioModel.from_pretrained, args.checkpoint, device="cpu")
    proc = load_without_team(LFM2AudioProcessor.from_pretrained, args.checkpoint, device="cpu")
    levels = [int(x) for x in args.sessions.split(",")]
    # On a thread of its own with the engine thread's intra-op threads, as the engine thread runs.
    steps = call_in_thread(args.engine_threads, stepped, model, proc, levels, args.audio_decoder, args.cycles)
    rows = []
    for n in levels:
        row = {"sessions": n, **steps[n]}
        if not args.no_threaded:
            row.update(threaded(model, proc, n, args.audio_decoder, args.seconds, args.engine_threads))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(
        f"\nengine overhead, tiny checkpoint, {args.audio_decoder} decoder, engine thread with "
        f"{args.engine_threads} intra-op threads, torch {torch.__version__}"
    )
    print(
        "| sessions | aten ops/step | x 1 session | step ms (median) | x 1 session "
        "| min frames/s/session | min positions/s/session | engine steps/s | real time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        fps = f"{r['frames_per_s_min']:.1f}" if "frames_per_s_min" in r else "-"
        pps = f"{r['positions_per_s_min']:.1f}" if "positions_per_s_min" in r else "-"
        sps = f"{r['steps_per_s']:.1f}" if "steps_per_s" in r else "-"
        rt = ("yes" if r["real_time"] else "no") if "real_time" in r else "-"
        print(
            f"| {r['sessions']} | {r['ops_per_step']} | {r['ops_per_step'] / base['ops_per_step']:.2f} | "
            f"{r['step_ms_median']:.1f} | {r['step_ms_median'] / base['step_ms_median']:.2f} | "
            f"{fps} | {pps} | {sps} | {rt} |"
        )
    print(f"(real time: every session samples >= {REAL_TIME_POSITIONS:.2f} positions/s, i.e. 12.5 frames/s of speech;")
    print(" a session samples once per engine step while it responds, less while its next turn is prefilled)")
    print("\nwhere a step's time goes (ms, mean over the timed steps): the model's batched calls, the rest of the")
    print("batched step (gathers, text sampling, write-back, the one copy to the host), prompt chunks of turns")
    print("that restart, and the host's part (plan, unpacking, events)")
    print(
        "| sessions | step | backbone | depthformer + sampling | audio decoder | rest of the batched step "
        "| prefill | host |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['sessions']} | {r['step_ms_mean']:.1f} | {r['backbone_ms_mean']:.1f} | "
            f"{r['depthformer_ms_mean']:.1f} | {r['audio_ms_mean']:.1f} | {r['glue_ms_mean']:.1f} | "
            f"{r['prefill_ms_mean']:.1f} | {r['host_ms_mean']:.1f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "checkpoint": args.checkpoint,
        "audio_decoder": args.audio_decoder,
        "threads": args.threads,
        "engine_threads": args.engine_threads,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
