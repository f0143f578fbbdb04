"""Server capacity: simulated users hold real-time spoken conversations over the realtime WebSocket.

Each user streams "microphone" audio in real time: 20 ms chunks paced by the wall clock, espeak-ng speech
for its turn, then silence while the reply plays (and a short pause), with the server's VAD deciding when
the turn ends; three or more turns each. A level of N users passes when:

- every turn finishes (a response.done for each utterance, no error events, no lost connection);
- p95 TTFA < 1.5 s: time to first audio, from the end of the user's speech (the last speech sample sent)
  to the first audio frame of the reply (the server's 500 ms VAD silence window included);
- < 2% late frames: each reply has a playout clock that starts at its first frame's arrival + 120 ms (a
  jitter buffer) and advances 80 ms per frame; a frame arriving after its playout time is late.

The issue's goals (p95 TTFA <= 1.0 s, < 1% late) are reported next to the pass criteria. The capacity
figure is the largest level that passes. Server CPU% (of one core) and peak RSS come from /proc of the
server process. Unless --url is given, the bench starts its own ``lfm2audio-server`` on a free port of
127.0.0.1 with the tiny golden checkpoint. Loopback only; every wait is bounded.

    python bench/bench_load.py                                  # ramp 4 8 12 16 24 32, JSON audio
    python bench/bench_load.py --levels 8 16 --audio binary     # PCM16 binary frames both ways
    python bench/bench_load.py --audio opus                     # binary PCM16 in, Opus out
    python bench/bench_load.py --url ws://127.0.0.1:8000/v1/realtime --server-pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("LFM2AUDIO_GOLDEN", ROOT.parent / "shared" / "golden"))
RESULTS = ROOT / "bench" / "results"

CHUNK_S = 0.02  # microphone chunk
FRAME_S = 0.08  # one server audio frame (1920 samples at 24 kHz)
JITTER_S = 0.12  # client jitter buffer before playout starts
PASS_TTFA_P95_S, GOAL_TTFA_P95_S = 1.5, 1.0
PASS_LATE, GOAL_LATE = 0.02, 0.01
PHRASES = (
    "Hello there, how are you doing today?",
    "Can you tell me what the weather will be like tomorrow?",
    "That sounds good. What should I cook for dinner tonight?",
    "Thank you very much, that was really helpful.",
)


# Speech ---------------------------------------------------------------------------------------


def espeak_speech(text: str, rate: int) -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 mono at ``rate``, leading and trailing silence trimmed."""
    import soxr

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("bench_load needs espeak-ng (apt-get install -y espeak-ng)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "speech.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(path), text], check=True, capture_output=True)
        data = path.read_bytes()
    # espeak-ng writes a 44-byte-header RIFF of 16-bit mono at 22050 Hz.
    sr = int.from_bytes(data[24:28], "little")
    i = data.index(b"data") + 8
    x = np.frombuffer(data[i : len(data) - (len(data) - i) % 2], dtype="<i2").astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(x) > 0.02)
    x = x[loud[0] : loud[-1] + 1] if len(loud) else x
    return soxr.resample(x, sr, rate).astype(np.float32) if sr != rate else x


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


# One user -------------------------------------------------------------------------------------


@dataclass
class Turn:
    speech_end: float  # wall time (monotonic) the last speech sample was sent
    first_audio: float | None = None
    frames: int = 0
    late: int = 0
    done: bool = False
    status: str | None = None

    def playout_end(self) -> float:
        return (self.first_audio or time.monotonic()) + JITTER_S + self.frames * FRAME_S


@dataclass
class UserResult:
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def run_user(
    url: str,
    speech: list[np.ndarray],
    *,
    rate: int,
    audio: str,
    duration_s: float,
    min_turns: int,
    reply_tokens: int,
    turn_timeout_s: float,
    start_delay_s: float,
) -> UserResult:
    """One simulated user: connect, configure server VAD, then talk in turns until ``duration_s`` has passed
    and ``min_turns`` turns were done (or an error / a turn timing out ends it)."""
    import websockets

    res = UserResult()
    await asyncio.sleep(start_delay_s)
    binary_in = audio in ("binary", "opus")
    lfm: dict = {"sampling": {"text": {"temperature": 0}, "audio": {"temperature": 0}}}
    if binary_in:
        lfm["binary_input"] = {"format": "pcm16", "rate": rate}
        lfm["binary_output"] = {"format": "pcm16" if audio == "binary" else "opus"}
    session = {
        "type": "realtime",
        "max_output_tokens": reply_tokens,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": rate}, "turn_detection": {"type": "server_vad"}}},
        "lfm2audio": lfm,
    }
    try:
        ws = await websockets.connect(url, open_timeout=30, max_size=None, compression=None)
    except Exception as e:  # noqa: BLE001 - a failed connect is this user's result, not the bench's end
        res.errors.append(f"connect: {e!r}")
        return res
    current: list[Turn | None] = [None]  # the turn whose reply is awaited
    turn_done = asyncio.Event()
    updated = asyncio.Event()

    def on_frame() -> None:
        t = current[0]
        if t is None or t.done:
            return
        now = time.monotonic()
        if t.first_audio is None:
            t.first_audio = now
        due = t.first_audio + JITTER_S + t.frames * FRAME_S
        t.frames += 1
        if now > due:
            t.late += 1

    async def receive() -> None:
        async for msg in ws:
            if isinstance(msg, bytes):
                on_frame()
                continue
            ev = json.loads(msg)
            kind = ev.get("type")
            if kind == "response.output_audio.delta":
                on_frame()
            elif kind == "session.updated":
                updated.set()
            elif kind == "response.done":
                t = current[0]
                if t is not None and not t.done:
                    t.done = True
                    t.status = ev["response"]["status"]
                    turn_done.set()
            elif kind == "error":
                res.errors.append(f"error event: {ev.get('error', {}).get('code')}")

    async def send_chunk(x: np.ndarray) -> None:
        if binary_in:
            await ws.send(pcm16(x))
        else:
            b64 = base64.b64encode(pcm16(x)).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64}))

    step = int(CHUNK_S * rate)
    silence = np.zeros(step, np.float32)
    reader = asyncio.create_task(receive())
    try:
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        await asyncio.wait_for(updated.wait(), 30)
        t0 = time.monotonic()
        clock = t0
        k = 0

        async def paced(x: np.ndarray) -> None:
            nonlocal clock, k
            k += 1
            clock = t0 + k * CHUNK_S
            delay = clock - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await send_chunk(x)

        for _ in range(int(0.5 / CHUNK_S)):  # a little silence before the first turn
            await paced(silence)
        n = 0
        while n < min_turns or time.monotonic() - t0 < duration_s:
            utterance = speech[n % len(speech)]
            for i in range(0, len(utterance) - step + 1, step):
                await paced(utterance[i : i + step])
            turn = Turn(speech_end=time.monotonic())
            res.turns.append(turn)
            current[0] = turn
            turn_done.clear()
            # Silence until the reply has finished playing (its last frame out of the jitter buffer).
            deadline = turn.speech_end + turn_timeout_s
            while not (turn.done and time.monotonic() >= turn.playout_end()):
                if time.monotonic() > deadline or reader.done():
                    res.errors.append("turn timed out" if not reader.done() else "connection lost")
                    return res
                await paced(silence)
            for _ in range(int(0.4 / CHUNK_S)):  # the user thinks a moment
                await paced(silence)
            n += 1
    except Exception as e:  # noqa: BLE001
        res.errors.append(f"{type(e).__name__}: {e}")
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await ws.close()
    return res


# A level --------------------------------------------------------------------------------------


class ProcStats:
    """CPU time and peak RSS of a process and its descendants (Linux /proc; ``--workers`` runs an engine
    process and API workers under the server's pid), sampled while a level runs."""

    def __init__(self, pid: int | None, *, tree: bool = True) -> None:
        self.pid = pid
        self.tree = tree  # with the descendants (the server); the bench's own process counts alone
        self.peak_rss = 0
        self._cpu0 = self._wall0 = 0.0
        self._gone = 0.0  # CPU of descendants that exited since start (a replaced worker)
        self._last: dict[int, float] = {}

    def _tree(self) -> list[int]:
        if not self.tree:
            return [self.pid]
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        tree, frontier = [self.pid], [self.pid]
        while frontier:
            frontier = [p for p, pp in parents.items() if pp in frontier]
            tree += frontier
        return tree

    @staticmethod
    def _proc_cpu(pid: int) -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _cpu(self) -> float:
        now: dict[int, float] = {}
        for pid in self._tree():
            cpu = self._proc_cpu(pid)
            if cpu is not None:
                now[pid] = cpu
        self._gone += sum(v for p, v in self._last.items() if p not in now)
        self._last = now
        return sum(now.values()) + self._gone

    def _rss(self) -> int:
        total = 0
        for pid in self._tree():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def start(self) -> None:
        if self.pid is not None:
            self._cpu0, self._wall0, self.peak_rss = self._cpu(), time.monotonic(), self._rss()

    def sample(self) -> None:
        if self.pid is not None:
            self.peak_rss = max(self.peak_rss, self._rss())

    def cpu_percent(self) -> float | None:
        if self.pid is None:
            return None
        return 100 * (self._cpu() - self._cpu0) / max(time.monotonic() - self._wall0, 1e-9)


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


@dataclass
class LevelResult:
    users: int
    audio: str
    turns_started: int
    turns_done: int
    ttfa_p50_s: float | None
    ttfa_p95_s: float | None
    frames: int
    frames_per_reply: float
    late_frames: int
    late_pct: float
    errors: int
    error_kinds: dict
    server_cpu_pct: float | None
    server_rss_mib: float | None
    client_cpu_pct: float  # this bench process (the simulated users share the machine with the server)
    loadavg_1m: float  # the machine's load at the level's end (other work on a shared machine shows here)
    wall_s: float
    passed: bool
    meets_goal: bool
    # Every turn's (seconds from the level's start to the end of its speech, TTFA): where the tail sits.
    turns: list[tuple[float, float]] = field(default_factory=list)


def meets_pass_timing(ttfa_p95_s: float | None, late_pct: float) -> bool:
    """The pass criteria that are wall-clock figures: p95 TTFA and the share of late frames."""
    return ttfa_p95_s is not None and ttfa_p95_s < PASS_TTFA_P95_S and late_pct < 100 * PASS_LATE


def summarize(
    users: int,
    audio: str,
    results: list[UserResult],
    stats: ProcStats,
    client: ProcStats,
    wall_s: float,
    t0: float = 0.0,
) -> LevelResult:
    turns = [t for r in results for t in r.turns]
    done = [t for t in turns if t.done and t.status in ("completed", "incomplete")]
    ttfa = [t.first_audio - t.speech_end for t in done if t.first_audio is not None]
    frames = sum(t.frames for t in turns)
    late = sum(t.late for t in turns)
    kinds: dict[str, int] = {}
    for r in results:
        for e in r.errors:
            kinds[e] = kinds.get(e, 0) + 1
    errors = sum(kinds.values())
    late_pct = 100 * late / frames if frames else 0.0
    p95 = percentile(ttfa, 95)
    complete = bool(turns) and len(done) == len(turns) and len(ttfa) == len(done) and errors == 0
    passed = complete and meets_pass_timing(p95, late_pct)
    goal = complete and p95 is not None and p95 <= GOAL_TTFA_P95_S and late_pct < 100 * GOAL_LATE
    return LevelResult(
        users=users,
        audio=audio,
        turns_started=len(turns),
        turns_done=len(done),
        ttfa_p50_s=percentile(ttfa, 50),
        ttfa_p95_s=p95,
        frames=frames,
        frames_per_reply=frames / len(done) if done else 0.0,
        late_frames=late,
        late_pct=late_pct,
        errors=errors,
        error_kinds=kinds,
        server_cpu_pct=stats.cpu_percent(),
        server_rss_mib=stats.peak_rss / 2**20 if stats.pid is not None else None,
        client_cpu_pct=client.cpu_percent() or 0.0,
        loadavg_1m=os.getloadavg()[0],
        wall_s=wall_s,
        turns=[(round(t.speech_end - t0, 3), round(t.first_audio - t.speech_end, 3)) for t in done if t.first_audio],
        passed=passed,
        meets_goal=goal,
    )


async def run_level(
    url: str,
    users: int,
    speech: list[np.ndarray],
    *,
    rate: int = 24_000,
    audio: str = "json",
    duration_s: float = 30.0,
    min_turns: int = 3,
    reply_tokens: int = 48,
    turn_timeout_s: float = 20.0,
    server_pid: int | None = None,
    seed: int = 0,
) -> LevelResult:
    """``users`` simulated users at once (starts staggered over 2 s); their summary."""
    rng = random.Random(seed)
    stats, client = ProcStats(server_pid), ProcStats(os.getpid(), tree=False)
    stats.start()
    client.start()
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(
            run_user(
                url,
                speech[i % len(speech) :] + speech[: i % len(speech)],
                rate=rate,
                audio=audio,
                duration_s=duration_s,
                min_turns=min_turns,
                reply_tokens=reply_tokens,
                turn_timeout_s=turn_timeout_s,
                start_delay_s=rng.uniform(0, 2.0),
            )
        )
        for i in range(users)
    ]
    while not all(t.done() for t in tasks):
        stats.sample()
        await asyncio.wait(tasks, timeout=1.0)
    return summarize(users, audio, [t.result() for t in tasks], stats, client, time.monotonic() - t0, t0)


# The server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``lfm2audio-server`` in a subprocess on 127.0.0.1 (a context manager; terminated on exit)."""

    def __init__(
        self,
        model: Path,
        max_sessions: int,
        extra: list[str] | None = None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        exe = shutil.which("lfm2audio-server") or ""
        cmd = [exe] if exe else [sys.executable, "-m", "lfm2audio_server"]
        self.cmd = cmd + [
            "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--max-sessions", str(max_sessions), "--log-level", "warning", *(extra or []),
        ]  # fmt: skip
        self.log = log
        self.env = env or {}  # added to this process's environment
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> ServerProcess:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **self.env}
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lfm2audio-server exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                with opener.open(f"http://127.0.0.1:{self.port}/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("lfm2audio-server did not become ready within 180 s")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# Command --------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(levels: list[LevelResult]) -> None:
    head = f"{'users':>5} {'audio':>6} {'turns':>9} {'ttfa p50':>9} {'ttfa p95':>9} {'late %':>7} "
    head += f"{'errors':>6} {'cpu %':>6} {'rss MiB':>8} {'bench %':>7} {'load':>5}  result"
    print(head)
    for r in levels:
        verdict = "PASS" if r.passed else "fail"
        if r.passed:
            verdict += " (meets goal)" if r.meets_goal else " (not goal)"
        print(
            f"{r.users:>5} {r.audio:>6} {f'{r.turns_done}/{r.turns_started}':>9} {_fmt(r.ttfa_p50_s, '.3f'):>9} "
            f"{_fmt(r.ttfa_p95_s, '.3f'):>9} {r.late_pct:>7.2f} {r.errors:>6} {_fmt(r.server_cpu_pct, '.0f'):>6} "
            f"{_fmt(r.server_rss_mib, '.0f'):>8} {r.client_cpu_pct:>7.0f} {r.loadavg_1m:>5.1f}  {verdict}"
        )


def capacity(levels: list[LevelResult]) -> int:
    """The largest level that passes (0 when none does)."""
    return max((r.users for r in levels if r.passed), default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--levels", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32], help="users per level (ramp)")
    p.add_argument("--users", type=int, help="one level of this many users (instead of --levels)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds each user keeps talking (default 30)")
    p.add_argument("--turns", type=int, default=3, help="turns each user does at least (default 3)")
    audio_help = "json: base64 events both ways; binary: PCM16 frames both ways; opus: PCM16 in, Opus out"
    p.add_argument("--audio", choices=["json", "binary", "opus"], default="json", help=audio_help)
    p.add_argument("--rate", type=int, default=24_000, help="microphone sample rate (default 24000)")
    p.add_argument("--reply-tokens", type=int, default=48, help="max_output_tokens of each reply (default 48)")
    p.add_argument("--url", help="an already running server's realtime URL (default: start one)")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, for CPU and RSS")
    p.add_argument("--model", default=str(GOLDEN / "checkpoint"), help="checkpoint of the server it starts")
    p.add_argument("--server-arg", action="append", default=[], help="extra lfm2audio-server argument (repeatable)")
    p.add_argument("--stop-on-fail", action="store_true", help="stop the ramp at the first failing level")
    p.add_argument("--out", type=Path, default=RESULTS / "load.json", help="JSON results")
    args = p.parse_args(argv)
    levels = [args.users] if args.users else args.levels
    speech = [espeak_speech(t, args.rate) for t in PHRASES]

    async def ramp(url: str, pid: int | None) -> list[LevelResult]:
        out: list[LevelResult] = []
        for n in levels:
            r = await run_level(
                url, n, speech, rate=args.rate, audio=args.audio, duration_s=args.duration,
                min_turns=args.turns, reply_tokens=args.reply_tokens, server_pid=pid,
            )  # fmt: skip
            out.append(r)
            print_table([r])
            if r.error_kinds:
                print(f"  errors: {r.error_kinds}")
            sys.stdout.flush()
            if args.stop_on_fail and not r.passed:
                break
            await asyncio.sleep(2.0)  # let the server settle
        return out

    if args.url:
        results = asyncio.run(ramp(args.url, args.server_pid))
        server_cmd = None
    else:
        with ServerProcess(Path(args.model), max(levels), args.server_arg) as server:
            results = asyncio.run(ramp(server.url, server.pid))
            server_cmd = server.cmd
    print()
    print_table(results)
    cap = capacity(results)
    print(f"\ncapacity: {cap} concurrent real-time conversations ({args.audio} audio; pass: every turn done, "
          f"p95 TTFA < {PASS_TTFA_P95_S} s, late < {100 * PASS_LATE:g}%; goal: p95 <= {GOAL_TTFA_P95_S} s, "
          f"late < {100 * GOAL_LATE:g}%)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "load",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "server_cmd": server_cmd,
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "criteria": {
            "pass_ttfa_p95_s": PASS_TTFA_P95_S,
            "pass_late": PASS_LATE,
            "goal_ttfa_p95_s": GOAL_TTFA_P95_S,
            "goal_late": GOAL_LATE,
        },  # fmt: skip
        "levels": [asdict(r) for r in results],
        "capacity": cap,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
