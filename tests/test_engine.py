"""The batched engine on the tiny golden model: exact streams, cancel, pool limits, context policy, memory."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import numpy as np
import pytest
import torch
from devices import DEVICE, DTYPE
from golden_chat import SYSTEM, TTS_TEXT, TURN2_TEXT, as_steps, build_state

from lfm2audio import ChatState, LFM2AudioModel, LFM2AudioProcessor, LFMModality, SamplingParams
from lfm2audio.engine import (
    AudioFrame,
    EmptyInputError,
    Engine,
    EngineConfig,
    InputTooLargeError,
    PoolFullError,
    ResponseDone,
    ResponseInProgressError,
    SessionClosedError,
    SessionConfig,
    SessionEvent,
    TextDelta,
)

TTS_VOICE = SYSTEM["tts"].split("voice: ")[1]


@pytest.fixture(scope="module")
def proc(checkpoint_dir):
    return LFM2AudioProcessor.from_pretrained(checkpoint_dir, device=DEVICE)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return LFM2AudioModel.from_pretrained(checkpoint_dir, device=DEVICE, dtype=DTYPE)


@pytest.fixture(scope="module")
def model_tts(checkpoint_tts_dir):
    return LFM2AudioModel.from_pretrained(checkpoint_tts_dir, device=DEVICE, dtype=DTYPE)


@pytest.fixture()
def engine(model, proc):
    eng = Engine(model, proc, EngineConfig(max_sessions=4, prefill_chunk=16)).start()
    yield eng
    eng.stop()


def collect(session, timeout: float = 60.0):
    """(steps as yielded tokens, events, ResponseDone) of the session's current response."""
    tokens, events = [], []
    while True:
        ev = session.events.get(timeout=timeout)
        events.append(ev)
        if isinstance(ev, TextDelta):
            tokens.append(torch.tensor([ev.token_id]))
        elif isinstance(ev, AudioFrame):
            tokens.append(torch.tensor(ev.codes))
        elif isinstance(ev, ResponseDone):
            return tokens, events, ev


def voice_session(engine, golden, mode: str, **kw):
    s = engine.open_session(SessionConfig(mode=mode, **kw))
    s.append_audio(golden["input.wave_user1"][0].numpy(), 16_000)
    s.commit_audio()
    return s


def test_sessions_started_at_different_times_match_generate(engine, golden):
    """Three sessions joining a running batch give exactly the single-session greedy streams."""
    chat = voice_session(engine, golden, "chat")
    chat.create_response(max_output_tokens=60)
    first = chat.events.get(timeout=30)  # chat is decoding before the others arrive
    asr = voice_session(engine, golden, "asr")
    asr.create_response(max_output_tokens=60)
    tts = engine.open_session(SessionConfig(mode="tts", voice=TTS_VOICE))
    tts.add_text(TTS_TEXT)
    tts.create_response(max_output_tokens=60)
    chat_tokens, _, chat_done = collect(chat)
    chat_tokens.insert(0, torch.tensor([first.token_id]))
    for tokens, name in [
        (chat_tokens, "gen.inter.chat"),
        (collect(asr)[0], "gen.seq.asr"),
        (collect(tts)[0], "gen.seq.tts"),
    ]:
        assert torch.equal(as_steps(tokens), golden[f"{name}.steps"]), name
    assert chat_done.stats.audio_frames == 36 and chat_done.stats.text_tokens == 24
    assert engine.steps < 60 * 3  # the sessions shared steps


def test_audio_frames_and_end_of_audio(model_tts, proc, golden):
    """checkpoint_tts: sequential TTS with <|audio_start|>, frames, an end-of-audio frame; PCM per frame."""
    eng = Engine(model_tts, proc, EngineConfig(max_sessions=2)).start()
    try:
        tts = eng.open_session(SessionConfig(mode="tts", voice=TTS_VOICE))
        tts.add_text(TTS_TEXT)
        tts.create_response(max_output_tokens=60)
        chat = voice_session(eng, golden, "chat")
        chat.create_response(max_output_tokens=60)
        tokens, events, done = collect(tts)
        assert torch.equal(as_steps(tokens), golden["gen_tts.seq.tts.steps"])
        frames = [e for e in events if isinstance(e, AudioFrame)]
        eoa = [f for f in frames if f.end_of_audio]
        assert len(eoa) == 1 and eoa[0].pcm.size == 0 and set(eoa[0].codes) == {2048}
        sound = [f for f in frames if not f.end_of_audio]
        assert all(f.pcm.shape == (1920,) and f.pcm.dtype == np.float32 for f in sound)
        assert np.abs(np.concatenate([f.pcm for f in sound])).max() > 0
        assert [f.index for f in frames] == list(range(len(frames)))
        assert done.stats.time_to_first_audio_s is not None and done.stats.real_time_factor is not None
        tokens, _, _ = collect(chat)
        assert torch.equal(as_steps(tokens), golden["gen_tts.inter.chat.steps"])
    finally:
        eng.stop()


def test_two_turns_keep_the_cache(engine, golden):
    s = voice_session(engine, golden, "chat")
    s.create_response(max_output_tokens=60)
    tokens, _, done1 = collect(s)
    assert torch.equal(as_steps(tokens), golden["conv.turn1.steps"])
    s.add_text(TURN2_TEXT)
    s.create_response(max_output_tokens=60)
    tokens, _, done2 = collect(s)
    assert torch.equal(as_steps(tokens), golden["conv.turn2.steps"])
    assert done1.stats.reused_positions == 0
    assert done2.stats.reused_positions == 50 + 59  # all of turn 1 but its last, unfed token
    assert done2.stats.prompt_positions == 138 - 109


def _chat_with(proc, golden, emitted: list[torch.Tensor]) -> ChatState:
    chat = build_state(proc, "chat", golden["input.wave_user1"])
    text = [t for t in emitted if t.numel() == 1]
    audio = [t for t in emitted if t.numel() == 8]
    flags = torch.tensor([LFMModality.TEXT if t.numel() == 1 else LFMModality.AUDIO_OUT for t in emitted])
    chat.append(
        text=torch.stack(text, 1) if text else torch.zeros((1, 0), dtype=torch.long),
        audio_out=torch.stack(audio, 1) if audio else torch.zeros((8, 0), dtype=torch.long),
        modality_flag=flags,
    )
    chat.end_turn()
    return chat


def test_cancel_keeps_what_was_emitted(engine, model, proc, golden):
    s = voice_session(engine, golden, "chat")
    s.create_response(max_output_tokens=60)
    emitted = []
    while len(emitted) < 10:
        ev = s.events.get(timeout=30)
        emitted.append(torch.tensor([ev.token_id]) if isinstance(ev, TextDelta) else torch.tensor(ev.codes))
    assert s.cancel()
    rest, _, done = collect(s)
    assert done.status == "cancelled" and done.reason == "client_cancelled"
    emitted += rest
    assert len(emitted) < 60  # it stopped early
    assert torch.equal(as_steps(emitted), golden["conv.turn1.steps"][: len(emitted)])
    assert not s.responding and not s.cancel()
    # The next turn continues from exactly what was emitted.
    s.add_text(TURN2_TEXT)
    s.create_response(max_output_tokens=30)
    turn2, _, _ = collect(s)
    chat = _chat_with(proc, golden, emitted)
    chat.new_turn("user")
    chat.add_text(TURN2_TEXT)
    chat.end_turn()
    chat.new_turn("assistant")
    expected = list(model.generate_interleaved(**chat, max_new_tokens=30))
    assert torch.equal(as_steps(turn2), as_steps(expected))


def test_pool_exhaustion_and_reuse(engine):
    sessions = [engine.open_session() for _ in range(engine.max_sessions)]
    assert engine.active_sessions == 4
    with pytest.raises(PoolFullError, match="all 4 session slots are in use"):
        engine.open_session()
    sessions[1].close(wait=True)
    assert engine.active_sessions == 3
    again = engine.open_session()
    assert again.slot == 1
    with pytest.raises(SessionClosedError):
        sessions[1].add_text("hello")


def test_input_errors(engine):
    s = engine.open_session()
    with pytest.raises(EmptyInputError):
        s.commit_audio()
    with pytest.raises(ValueError, match="sample_rate"):
        s.append_audio(np.zeros(1600, dtype=np.float32), 1000)
    with pytest.raises(ValueError, match="float or int16"):
        s.append_audio(np.zeros(1600, dtype=np.int32), 16_000)
    small = Engine(engine.model, engine.processor, EngineConfig(max_sessions=1, max_input_seconds=1.0)).start()
    try:
        t = small.open_session()
        t.append_audio(np.zeros(8_000, dtype=np.float32), 8_000)  # 1 s
        with pytest.raises(InputTooLargeError):
            t.append_audio(np.zeros(800, dtype=np.int16), 8_000)
        t.clear_audio()
        assert t.buffered_audio_seconds == 0
    finally:
        small.stop()
    s.add_text("Hello there.")
    s.create_response(max_output_tokens=40)
    with pytest.raises(ResponseInProgressError):
        s.create_response()
    collect(s)


def test_context_limit_drops_oldest_turns(model, proc, golden):
    eng = Engine(model, proc, EngineConfig(max_sessions=1, max_context=160)).start()
    try:
        s = voice_session(eng, golden, "chat")
        s.create_response(max_output_tokens=60)
        collect(s)  # 110 positions in history
        s.add_text(TURN2_TEXT)
        s.create_response(max_output_tokens=60)
        tokens, events, done = collect(s)
        assert any(isinstance(e, SessionEvent) and e.kind == "history_truncated" for e in events)
        assert done.stats.reused_positions > 0  # the system prompt prefix was rewound, not recomputed
        # Same as a fresh conversation of the system prompt and the new user turn.
        chat = ChatState(proc)
        chat.new_turn("system")
        chat.add_text(SYSTEM["chat"])
        chat.end_turn()
        chat.new_turn("user")
        chat.add_text(TURN2_TEXT)
        chat.end_turn()
        chat.new_turn("assistant")
        assert torch.equal(as_steps(tokens), as_steps(list(model.generate_interleaved(**chat, max_new_tokens=60))))
        # A turn that cannot fit at all fails cleanly and the session goes on.
        s.add_text("word " * 400)
        s.create_response()
        _, _, failed = collect(s)
        assert failed.status == "incomplete" and failed.reason.startswith("context_limit")
        s.add_text("Hi")
        s.create_response(max_output_tokens=5)
        assert collect(s)[2].status == "incomplete"  # max_output_tokens reached
    finally:
        eng.stop()


def test_asyncio_consumer(engine):
    s = engine.open_session(SessionConfig(mode="asr"))
    s.add_text("Hello")

    async def consume():
        s.create_response(max_output_tokens=8)
        while True:
            ev = await asyncio.wait_for(s.events.aget(), 30)
            if isinstance(ev, ResponseDone):
                return ev

    done = asyncio.run(consume())
    assert done.status in ("completed", "incomplete")


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_open_close_does_not_leak(engine):
    def cycle(n: int) -> None:
        for _ in range(n):
            s = engine.open_session()
            s.add_text("hi")
            s.close(wait=True)
        assert engine.active_sessions == 0

    cycle(20)
    gc.collect()
    before = _rss_mb()
    cycle(200)
    gc.collect()
    assert _rss_mb() - before < 10.0


@pytest.mark.parametrize("decoder", ["detokenizer", "mimi"])
@pytest.mark.parametrize("layout", [[0], [0, 1, 2], [3], [1, 3]])
def test_batched_audio_decode_matches_a_lone_stream(model, proc, golden, decoder, layout):
    """Sessions in the given slots speak in the same steps while the other slots stay silent: each
    speaker's PCM equals its codes streamed alone through a fresh decoder (silent rows do not advance)."""
    eng = Engine(model, proc, EngineConfig(max_sessions=4, audio_decoder=decoder)).start()
    try:
        opened = [voice_session(eng, golden, "chat") for _ in range(max(layout) + 1)]
        sessions = [opened[i] for i in layout]
        assert [s.slot for s in sessions] == layout
        for s in sessions:
            s.create_response(max_output_tokens=30)
        codec = proc.audio_detokenizer if decoder == "detokenizer" else proc.mimi
        for s in sessions:
            _, events, _ = collect(s)
            frames = [e for e in events if isinstance(e, AudioFrame) and not e.end_of_audio]
            assert len(frames) >= 12
            state = codec.stream_state(1) if decoder == "detokenizer" else codec.decoder_state(1)
            with torch.inference_mode():
                alone = [codec.decode_step(torch.tensor([f.codes]), state)[0].reshape(-1).numpy() for f in frames]
            np.testing.assert_allclose(np.concatenate([f.pcm for f in frames]), np.concatenate(alone), atol=1e-5)
    finally:
        eng.stop()


SEEDED = dict(
    text_sampling=SamplingParams(1.0, 8),
    audio_sampling=SamplingParams(1.0, 4),
)


def _seeded_chat(engine, golden, seed: int):
    return voice_session(engine, golden, "chat", seed=seed, **SEEDED)


def test_seeded_sampling_is_the_same_alone_in_a_batch_of_16_and_joining_late(model, proc, golden):
    """The same session seed gives the same sampled stream whatever else the engine runs, and
    generate_interleaved(seed=...) gives that stream too."""
    chat = build_state(proc, "chat", golden["input.wave_user1"], keep_cache=False)
    reference = list(
        model.generate_interleaved(
            **chat, max_new_tokens=40, text_temperature=1.0, text_top_k=8, audio_temperature=1.0, audio_top_k=4,
            seed=1234,
        )
    )  # fmt: skip
    assert any(t.numel() == 8 for t in reference)
    greedy_state = build_state(proc, "chat", golden["input.wave_user1"])
    greedy = list(model.generate_interleaved(**greedy_state, max_new_tokens=40))
    assert not torch.equal(as_steps(reference), as_steps(greedy))  # sampling really happened

    eng = Engine(model, proc, EngineConfig(max_sessions=16, prefill_chunk=32)).start()
    try:
        alone = _seeded_chat(eng, golden, 1234)
        alone.create_response(max_output_tokens=40)
        assert torch.equal(as_steps(collect(alone)[0]), as_steps(reference))
        alone.close(wait=True)

        # 15 other seeds already decoding, then seed 1234 joins mid-way.
        others = [_seeded_chat(eng, golden, 10 + i) for i in range(15)]
        for s in others:
            s.create_response(max_output_tokens=60)
        for s in others[:3]:
            s.events.get(timeout=60)  # the batch is running
        late = _seeded_chat(eng, golden, 1234)
        late.create_response(max_output_tokens=40)
        assert torch.equal(as_steps(collect(late)[0]), as_steps(reference))
        streams = [as_steps(collect(s)[0]) for s in others]
        assert len({tuple(s.flatten().tolist()) for s in streams}) == 15  # different seeds, different streams
    finally:
        eng.stop()


def test_an_extreme_temperature_fails_no_one(model, proc, golden):
    """A session sampling at temperature 1e-300 (greedy by the sampler's documented minimum) and one with
    NaN-free but huge temperature run beside a greedy session, whose stream stays the golden one."""
    eng = Engine(model, proc, EngineConfig(max_sessions=3)).start()
    try:
        tiny = _seeded_chat(eng, golden, 1)
        tiny.update(SessionConfig(mode="chat", audio_sampling=SamplingParams(1e-300, 4)))
        huge = _seeded_chat(eng, golden, 2)
        huge.update(SessionConfig(mode="chat", audio_sampling=SamplingParams(1e300, 4)))
        greedy = voice_session(eng, golden, "chat")
        for s in (tiny, huge, greedy):
            s.create_response(max_output_tokens=60)
        done = [collect(s) for s in (tiny, huge, greedy)]
        assert [d[2].status for d in done] == ["incomplete"] * 3
        assert torch.equal(as_steps(done[2][0]), golden["gen.inter.chat.steps"])
        assert torch.equal(as_steps(done[0][0]), golden["gen.inter.chat.steps"])  # 1e-300 decodes greedily
    finally:
        eng.stop()


def test_bucketed_rows_give_the_gathered_streams(model, proc, golden):
    """The row layout CUDA graphs replay (whole buckets, masks) gives exactly the default layout's streams.
    Three slots, all busy: the largest bucket is the slot count, not the next power of two (which has
    no rows to pad into)."""
    eng = Engine(model, proc, EngineConfig(max_sessions=3, bucketed_rows=True)).start()
    try:
        chat = voice_session(eng, golden, "chat")
        asr = voice_session(eng, golden, "asr")
        seeded = _seeded_chat(eng, golden, 99)
        for s in (chat, asr, seeded):
            s.create_response(max_output_tokens=60)
        assert torch.equal(as_steps(collect(chat)[0]), golden["gen.inter.chat.steps"])
        assert torch.equal(as_steps(collect(asr)[0]), golden["gen.seq.asr.steps"])
        bucketed = as_steps(collect(seeded)[0])
    finally:
        eng.stop()
    eng = Engine(model, proc, EngineConfig(max_sessions=4)).start()
    try:
        seeded = _seeded_chat(eng, golden, 99)
        seeded.create_response(max_output_tokens=60)
        assert torch.equal(as_steps(collect(seeded)[0]), bucketed)
    finally:
        eng.stop()


def test_manual_stepping(model, proc, golden):
    """Engine.step() drives an engine without its thread (benchmarks): the golden stream, step by step."""
    eng = Engine(model, proc, EngineConfig(max_sessions=2))
    eng.step()
    chat = voice_session(eng, golden, "chat")
    chat.create_response(max_output_tokens=60)
    tokens = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not eng.step():
            time.sleep(0.005)  # the request is still being prepared on the prepare thread
        ev = chat.events.get_nowait()
        while ev is not None:
            if isinstance(ev, ResponseDone):
                assert torch.equal(as_steps(tokens), golden["gen.inter.chat.steps"])
                return
            tokens.append(torch.tensor([ev.token_id]) if isinstance(ev, TextDelta) else torch.tensor(ev.codes))
            ev = chat.events.get_nowait()
    raise AssertionError("the response did not finish")


def test_gathered_audio_rows_that_do_not_advance_keep_their_state(proc):
    """SlotAudioDecoder.step(rows=...): the SEANet half runs on the given rows only; a row among them
    that does not advance (it drew end-of-audio) and the rows outside them keep their whole state,
    and an advancing row's PCM is what a lone stream gives."""
    from lfm2audio.engine.audio_out import make_audio_decoder

    dec = make_audio_decoder(proc, "mimi", 4)
    g = torch.Generator().manual_seed(5)
    warm = torch.randint(0, 2048, (4, 8), generator=g)
    with torch.inference_mode():
        dec.step(warm, torch.ones(4, dtype=torch.bool), torch.arange(4))  # every row one frame in
        before = dec.state.clone()
        codes = torch.randint(0, 2048, (4, 8), generator=g)
        advance = torch.tensor([False, True, False, False])
        pcm = dec.step(codes[:3], advance[:3], torch.tensor([1, 2]))
        assert pcm.shape == (2, 1920)
        for r in (0, 2, 3):
            assert torch.equal(dec.state.packed[r], before.packed[r])
            assert torch.equal(dec.state.transformer.offsets[r], before.transformer.offsets[r])
        lone = proc.mimi.decoder_state(1)
        proc.mimi.decode_step(warm[1:2], lone)
        expected, _ = proc.mimi.decode_step(codes[1:2], lone)
        torch.testing.assert_close(pcm[0], expected[0, :1920].float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(dec.state.packed[1], lone.packed[0], atol=1e-5, rtol=0)  # batched rounding


@pytest.mark.skipif(DEVICE.type != "cpu" or not os.path.isdir("/proc/self/task"), reason="OpenMP teams of a CPU build")
def test_building_an_engine_leaves_no_thread_team_on_the_caller(checkpoint_dir):
    """Engine() and Engine.from_pretrained on a thread with 2 intra-op threads start no OpenMP worker
    there: such a team would slow every parallel op of the engine thread (lfm2audio.engine.cpu_tuning).
    A fresh process, since this one's threads have teams already."""
    import subprocess
    import sys

    # Counted once settled: a joined helper thread can still be listed for a moment while it exits (a
    # busy CI machine showed one extra), whereas an OpenMP team stays for the life of its thread.
    script = (
        "import os, sys, time, torch\n"
        "def settled():\n"
        "    last, quiet, end = -1, 0, time.monotonic() + 20\n"
        "    while quiet < 25 and time.monotonic() < end:\n"
        "        n = len(os.listdir('/proc/self/task'))\n"
        "        quiet, last = (quiet + 1 if n == last else 0), n\n"
        "        time.sleep(0.02)\n"
        "    return last\n"
        "torch.set_num_threads(2)\n"
        "from lfm2audio import LFM2AudioModel, LFM2AudioProcessor\n"
        "from lfm2audio.engine import Engine, EngineConfig\n"
        "from lfm2audio.engine.cpu_tuning import load_without_team\n"
        "model = load_without_team(LFM2AudioModel.from_pretrained, sys.argv[1], device='cpu')\n"
        "proc = load_without_team(LFM2AudioProcessor.from_pretrained, sys.argv[1], device='cpu')\n"
        "before = settled()\n"
        "Engine(model, proc, EngineConfig(max_sessions=64, max_context=4096))\n"
        "built = settled()\n"
        "Engine.from_pretrained(sys.argv[1], device='cpu', config=EngineConfig(max_sessions=64))\n"
        "print(before, built, settled())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint_dir)], capture_output=True, text=True, timeout=300, check=True
    )
    before, built, loaded = map(int, out.stdout.split())
    assert built == before, f"Engine() left {built - before} more thread(s) on the calling thread's team"
    assert loaded == before, f"Engine.from_pretrained left {loaded - before} more thread(s) on the caller's team"
