"""Failover acceptance test (issue 7): two real server processes behind Debian's nginx.

Two ``python -m lfm2audio_server`` processes serve the tiny golden checkpoint on 127.0.0.1, Debian's nginx
runs the repository's balancer config (docker/nginx/nginx.conf.template, rendered by deploy_helpers) in
front of them, and every session goes through nginx:

1. sessions complete turns on both replicas (``least_conn`` spreads them), and the same greedy turn gives
   the same result on either replica;
2. while a long response streams on a session of replica V (the victim) and a several-second turn streams
   on a session of replica S (the survivor), V gets SIGTERM: V's sessions (busy and idle) get the
   documented clean close (the response keeps its grace, then ``response.done`` cancelled
   ``server_shutdown``, an ``error`` ``server_shutting_down`` and close 1001) and V exits 0 within its
   grace plus a margin; sessions opened through nginx while V drains (a 503 from V is retried on S) and
   after it exited all land on S;
3. those sessions complete turns, S's idle session completes a turn, and S's streaming turn ran on across
   the failover without a stall and ended exactly like the same turn in a fresh session of S (greedy
   decoding of the tiny model is deterministic token for token).

Which replica holds a session is read from the replicas' own JSON logs ("session opened" carries the
``session_id`` of ``session.created``): nothing in the production config changes for the test.
Everything is bounded: each wait has a timeout, processes are killed in ``finally``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import websockets
from deploy_helpers import REPO, running_nginx
from live_server import free_port, http_get

GRACE_S = 2.0  # --shutdown-grace of the replicas
EXIT_MARGIN_S = 8.0  # on top of the grace: cancel (<= 2 s) and close (<= 3 s) waits of the drain, exit
READY_TIMEOUT_S = 60.0
WAIT_S = 30.0  # any single wait for an event
TURN_TIMEOUT_S = 90.0  # a whole turn (the long ones take ~10 s on two cores)
SCENARIO_TIMEOUT_S = 180.0

# Turns (greedy chat, text in; the tiny model is deterministic token for token under greedy decoding,
# whatever the batch: only the PCM of the frames may differ in the last bits, so PCM is not compared).
# The survivor's turn: ends by itself (status "completed") after ~540 frames, several seconds of streaming:
# it runs across the victim's whole drain.
REFERENCE_TEXT = "What is this obsession people have with books?"
REFERENCE_TOKENS = 1500
# The victim's turn: this prompt never ends before the cap; far longer than the grace period.
LONG_TEXT = "Hello there"
LONG_TOKENS = 2048
# Short turns (~90 tokens, completed).
SHORT_TEXT = "Hi"
SHORT_TOKENS = 300

GREEDY_MANUAL = {
    "type": "realtime",
    "audio": {"input": {"turn_detection": None}},
    "lfm2audio": {"mode": "chat", "sampling": {"text": {"temperature": 0}, "audio": {"temperature": 0}}},
}
FRAME_BYTES = 3840  # one 80 ms frame of 24 kHz PCM16


# --------------------------------------------------------------------------------------------------
# Server processes


class Replica:
    """``python -m lfm2audio_server`` on a free port of 127.0.0.1, JSON logs to a file."""

    def __init__(self, name: str, checkpoint: Path, folder: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = folder / f"{name}.log"
        self._log = self.log_path.open("wb")
        # The server reads LFM2AUDIO_* variables: none of the caller's may leak in (API keys, ...).
        env = {k: v for k, v in os.environ.items() if not k.startswith("LFM2AUDIO_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [
            sys.executable, "-m", "lfm2audio_server",
            "--model", str(checkpoint),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--shutdown-grace", str(GRACE_S),
            "--device", "cpu",
            "--max-context", "4096",
            "--log-level", "info",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(f"http://127.0.0.1:{self.port}{path}", timeout=5)

    def wait_ready(self, deadline: float) -> None:
        while True:
            assert self.proc.poll() is None, f"replica {self.name} exited ({self.proc.returncode}):\n{self.log()}"
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"replica {self.name} not ready in time:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def opened(self) -> set[str]:
        return {r["session_id"] for r in self.records() if r.get("msg") == "session opened" and "session_id" in r}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def metric(replica: Replica, name: str) -> float:
    status, body = replica.get("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics of {replica.name}")


# --------------------------------------------------------------------------------------------------
# A realtime client that records every event with its arrival time


class Session:
    def __init__(self, ws: Any, label: str) -> None:
        self.ws = ws
        self.label = label
        self.events: list[dict] = []
        self.times: list[float] = []
        self.closed_at: float | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.id = ""
        self.replica: Replica | None = None

    @classmethod
    async def open(cls, lb_port: int, label: str, replicas: list[Replica]) -> Session:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{lb_port}/v1/realtime?model=golden-tiny",
            open_timeout=WAIT_S,
            close_timeout=5,
            max_size=None,
            ping_interval=None,
            proxy=None,
        )
        s = cls(ws, label)
        s.id = (await s.wait("session.created"))["session"]["id"]
        s.replica = await placement(s.id, replicas)
        await s.send("session.update", session=GREEDY_MANUAL)
        await s.wait("session.updated")
        return s

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                # No binary output was asked for: a binary message shows up as an unexpected event type.
                self.events.append(json.loads(msg) if isinstance(msg, str) else {"type": "<binary message>"})
                self.times.append(time.monotonic())
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed_at = time.monotonic()
            self._changed.set()

    async def send(self, type: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": type, **fields}))

    async def wait(self, type: str, *, start: int = 0, timeout: float = WAIT_S) -> dict:
        """The first event of ``type`` at index >= ``start``."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events[start:]:
                if ev["type"] == type:
                    return ev
            if self.closed_at is not None:
                got = self.types()[-12:]
                raise AssertionError(f"{self.label}: closed ({self.close_rcvd}) before {type}; got {got}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.label}: no {type} within {timeout} s; got {self.types()[-12:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    async def wait_closed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.label}: not closed within {timeout} s; got {self.types()[-12:]}") from None

    @property
    def close_rcvd(self) -> tuple[int, str] | None:
        """The close frame the server sent (through nginx), or None (no close frame: an abnormal close)."""
        rcvd = self.ws.protocol.close_rcvd
        return None if rcvd is None else (rcvd.code, rcvd.reason)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def start_turn(self, text: str, max_tokens: int) -> int:
        """Send a user text message and response.create; returns the index where the turn's events start."""
        start = len(self.events)
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await self.send("conversation.item.create", item=item)
        await self.send("response.create", response={"max_output_tokens": max_tokens})
        return start

    async def finish_turn(self, start: int, timeout: float = TURN_TIMEOUT_S) -> dict:
        await self.wait("response.done", start=start, timeout=timeout)
        return summary(self.events[start : first_index(self, "response.done", start) + 1])

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except Exception:
            pass
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


def summary(events: list[dict]) -> dict:
    """What a turn produced, comparable between runs: status, transcript, delta and frame counts."""
    done = events[-1]["response"]
    frames = [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"]
    assert all(len(f) == FRAME_BYTES for f in frames), "every audio delta is one 80 ms frame"
    return {
        "status": done["status"],
        "reason": (done.get("status_details") or {}).get("reason"),
        "transcript": "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"),
        "text_deltas": sum(e["type"] == "response.output_audio_transcript.delta" for e in events),
        "audio_frames": len(frames),
        "usage": done["usage"]["output_token_details"],
        "types": sorted({e["type"] for e in events}),
        "errors": [e["error"]["code"] for e in events if e["type"] == "error"],
    }


async def placement(session_id: str, replicas: list[Replica], timeout: float = 10.0) -> Replica:
    """The replica whose log says it opened ``session_id`` (the line follows session.created closely)."""
    deadline = time.monotonic() + timeout
    while True:
        owners = [r for r in replicas if session_id in r.opened()]
        if owners:
            assert len(owners) == 1, f"{session_id} opened on {[r.name for r in owners]}"
            return owners[0]
        assert time.monotonic() < deadline, f"no replica logged session {session_id}"
        await asyncio.sleep(0.05)


def first_index(session: Session, type: str, start: int) -> int:
    return next(i for i in range(start, len(session.events)) if session.events[i]["type"] == type)


# --------------------------------------------------------------------------------------------------
# The scenario


async def failover(lb_port: int, replicas: list[Replica]) -> int:
    """The scenario; returns the number of sessions opened."""
    sessions: list[Session] = []

    async def open_session(label: str) -> Session:
        s = await Session.open(lb_port, label, replicas)
        sessions.append(s)
        return s

    async def turns(pairs: list[tuple[Session, str, int]]) -> list[dict]:
        starts = [await s.start_turn(text, tokens) for s, text, tokens in pairs]
        return list(await asyncio.gather(*(s.finish_turn(i) for (s, _, _), i in zip(pairs, starts, strict=True))))

    try:
        # 1. Both replicas serve: least_conn puts the second session on the other replica, and the same greedy
        # turn gives the same result on both.
        s1 = await open_session("s1")
        s2 = await open_session("s2")
        assert {s1.replica, s2.replica} == set(replicas), "least_conn must spread two sessions over two replicas"
        victim, survivor = s1.replica, s2.replica
        assert victim is not None and survivor is not None
        short_v, short = await turns([(s1, SHORT_TEXT, SHORT_TOKENS), (s2, SHORT_TEXT, SHORT_TOKENS)])
        assert short["status"] == "completed" and short["audio_frames"] > 0 and not short["errors"], short
        assert short_v == short, "the same greedy turn must give the same result on both replicas"

        # 2. A long response streams on the victim, another on the survivor (with 1 + 1 sessions open,
        # least_conn sends the two new sessions to different replicas; which is which does not matter).
        n1 = await open_session("n1")
        n2 = await open_session("n2")
        assert {n1.replica, n2.replica} == set(replicas)
        doomed, kept = (n1, n2) if n1.replica is victim else (n2, n1)
        doomed_start = await doomed.start_turn(LONG_TEXT, LONG_TOKENS)
        kept_start = await kept.start_turn(REFERENCE_TEXT, REFERENCE_TOKENS)
        await doomed.wait("response.output_audio.delta", start=doomed_start)
        await kept.wait("response.output_audio.delta", start=kept_start)
        assert "response.done" not in kept.types()[kept_start:], "the survivor's turn must still be streaming"

        t_kill = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)

        # While the victim drains (its /ready is 503), new sessions through nginx land on the survivor. Of
        # two sessions opened now at least one is first sent to the victim by least_conn (2 + 2 sessions,
        # then 2 + 3): its HTTP 503 is retried on the survivor (checked in nginx's access log at the end).
        deadline = time.monotonic() + WAIT_S
        while (await asyncio.to_thread(victim.get, "/ready"))[0] != 503:
            assert time.monotonic() < deadline, "the victim's /ready did not turn 503"
            await asyncio.sleep(0.05)
        assert victim.proc.poll() is None, "the victim exited before its grace period ended"
        during = [await open_session(f"during-drain-{i}") for i in range(2)]
        assert all(s.replica is survivor for s in during), "sessions opened while the victim drains go to the survivor"
        assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{lb_port}/ready", timeout=5))[0] == 200, (
            "the balancer stays ready"
        )
        assert doomed.closed_at is None, "the victim's response must get its grace period"

        # The victim's busy session: the response keeps streaming through its grace, then is cancelled
        # (response.done cancelled server_shutdown), error server_shutting_down, close 1001.
        await doomed.wait_closed(GRACE_S + EXIT_MARGIN_S)
        assert doomed.close_rcvd == (1001, "server_shutdown"), doomed.close_rcvd
        done_i = first_index(doomed, "response.done", doomed_start)
        done = doomed.events[done_i]["response"]
        assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "server_shutdown"), done
        assert doomed.times[done_i] - t_kill >= GRACE_S - 0.2, "the response was cut before its grace period"
        assert any(
            e["type"] == "response.output_audio.delta" and t > t_kill + GRACE_S / 2
            for e, t in zip(doomed.events, doomed.times, strict=True)
        ), "the victim's response must go on streaming during the grace period"
        tail = doomed.types()[done_i + 1 :]
        assert tail == ["error"], f"after response.done only the shutdown error may follow: {tail}"
        assert doomed.events[-1]["error"]["code"] == "server_shutting_down"

        # The victim's idle session closes the same way.
        await s1.wait_closed(GRACE_S + EXIT_MARGIN_S)
        assert s1.close_rcvd == (1001, "server_shutdown"), s1.close_rcvd
        assert s1.events[-1]["type"] == "error" and s1.events[-1]["error"]["code"] == "server_shutting_down"

        # The victim process exits 0 within its grace plus a margin.
        left = max(0.1, t_kill + GRACE_S + EXIT_MARGIN_S - time.monotonic())
        try:
            code = await asyncio.to_thread(victim.proc.wait, left)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the victim did not exit within {GRACE_S + EXIT_MARGIN_S} s of SIGTERM") from None
        t_exit = time.monotonic()
        assert code == 0, f"the victim exited with {code}:\n{victim.log()[-3000:]}"

        # New sessions after the victim is gone (connection refused there): all on the survivor.
        after = [await open_session(f"after-exit-{i}") for i in range(3)]
        assert all(s.replica is survivor for s in after), [s.replica.name for s in after if s.replica]
        assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{lb_port}/ready", timeout=5))[0] == 200

        # 3. Every session placed after the kill completes a turn, and so does the survivor's idle session s2
        # (a second turn on its kept conversation). after-exit-0 runs the survivor's turn without any failover:
        # the reference.
        fresh = [*during, *after[1:]]
        results = await turns(
            [(after[0], REFERENCE_TEXT, REFERENCE_TOKENS), (s2, SHORT_TEXT, SHORT_TOKENS)]
            + [(s, SHORT_TEXT, SHORT_TOKENS) for s in fresh]
        )
        reference, s2_turn, fresh_turns = results[0], results[1], results[2:]
        assert reference["status"] == "completed" and reference["audio_frames"] >= 100, reference
        assert not reference["errors"], reference
        assert s2_turn["status"] in ("completed", "incomplete") and s2_turn["audio_frames"] > 0, s2_turn
        assert not s2_turn["errors"], s2_turn
        for s, turn in zip(fresh, fresh_turns, strict=True):
            assert turn == short, f"{s.label}: {turn} differs from the short turn of step 1: {short}"

        # The survivor's turn ran on across the failover and ended exactly like the reference turn.
        kept_turn = await kept.finish_turn(kept_start)
        assert kept_turn == reference, "the survivor's turn must be unaffected by the failover"
        kept_times = [
            t
            for e, t in zip(kept.events[kept_start:], kept.times[kept_start:], strict=True)
            if e["type"] == "response.output_audio.delta"
        ]
        assert doomed.closed_at is not None
        assert any(t > doomed.closed_at for t in kept_times), "the survivor's turn must stream past the victim's close"
        gap = max(b - a for a, b in zip(kept_times, kept_times[1:], strict=False))
        assert gap < GRACE_S, f"the survivor's stream stalled for {gap:.2f} s"
        print(
            f"failover: victim exited {t_exit - t_kill:.2f} s after SIGTERM; the survivor's turn streamed "
            f"{sum(t > t_kill for t in kept_times)} of {len(kept_times)} frames after the kill, "
            f"{sum(t > t_exit for t in kept_times)} after the victim's exit (largest gap {gap * 1000:.0f} ms)"
        )
        for s in (s2, kept, *during, *after):
            assert s.closed_at is None, f"{s.label} was closed: {s.close_rcvd}"

        # The survivor never noticed: still ready, holding exactly the open sessions, nothing logged above
        # info. The victim logged nothing above info either, except uvicorn's error for each 503 refusal
        # (websockets-sansio does not count a denial response as a completed handshake).
        assert (await asyncio.to_thread(survivor.get, "/ready"))[0] == 200
        open_on_survivor = [s for s in sessions if s.replica is survivor]
        assert metric(survivor, "lfm2audio_active_sessions") == len(open_on_survivor)
        for replica in replicas:
            problems = [r for r in replica.records() if r.get("level") != "info"]
            # Drain lines belong to the process, not to whichever session was running at the signal.
            problems += [r for r in replica.records() if "drain" in str(r.get("msg")) and "session_id" in r]
            assert not problems, (replica.name, problems)
        return len(sessions)
    finally:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


def test_failover_through_nginx(checkpoint_dir: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    replicas: list[Replica] = []
    try:
        for name in ("replica-1", "replica-2"):
            replicas.append(Replica(name, checkpoint_dir, tmp_path))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for r in replicas:
            r.wait_ready(deadline)
        lb_port = free_port()
        with running_nginx([r.addr for r in replicas], lb_port, tmp_path / "nginx", listen_host="127.0.0.1"):
            opened = asyncio.run(asyncio.wait_for(failover(lb_port, replicas), SCENARIO_TIMEOUT_S))
        # nginx's access log (a line as each connection ends): every realtime session was upgraded (the
        # client never saw a refusal), and at least one was refused by the draining victim with 503 and
        # retried on the survivor within the same request.
        access = (tmp_path / "nginx" / "logs" / "access.log").read_text().splitlines()
        realtime = [line for line in access if "/v1/realtime" in line]
        assert len(realtime) == opened and all('HTTP/1.1" 101 ' in line for line in realtime), realtime
        assert any("ustatus=503, 101 " in line for line in realtime), realtime
    finally:
        for r in replicas:
            r.stop()
    print(f"failover test: {time.monotonic() - t0:.1f} s")
