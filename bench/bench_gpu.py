"""The batched engine on a GPU: eager against CUDA graphs, first-audio latency, real-time capacity.

Builds the full-size model from ``../shared/golden/manifest/config_full.json`` (and the full Mimi, or
the LFM2.5 detokenizer, from their manifest configs) with random bf16 weights created on the device:
no files are read but the tokenizer of the tiny golden checkpoint. Then

1. step time per batch-size bucket (all sessions decoding chat turns), eager and with CUDA graphs;
2. one session alone: time to first audio (a 3 s audio turn, from the request to the first decoded
   frame) and the real-time factor of the turn;
3. the largest number of concurrent chat sessions for which every session still receives >= 12.5
   audio frames per second (the audio decoder in the loop), with CUDA graphs.

Prints one table and writes JSON. On an H100/H200 it takes a few minutes. ``--dry-run`` runs the same
code on the CPU with the tiny golden configuration, two sessions and a few steps (CI runs it).

    python bench/bench_gpu.py
    python bench/bench_gpu.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor  # noqa: E402
from lfm2audio.codec import MimiCodec, MimiConfig  # noqa: E402
from lfm2audio.codec.detokenizer import AudioDetokenizer  # noqa: E402
from lfm2audio.config import LFM2AudioConfig, LFM2Config, parse_section, read_json  # noqa: E402
from lfm2audio.engine import (  # noqa: E402
    DEFAULT_SAMPLING,
    AudioFrame,
    Engine,
    EngineConfig,
    ResponseDone,
    SessionConfig,
)
from lfm2audio.tokens import FRAME_RATE, INPUT_SAMPLE_RATE  # noqa: E402

GOLDEN = Path(os.environ.get("LFM2AUDIO_GOLDEN", ROOT.parent / "shared" / "golden"))


def random_model(config: LFM2AudioConfig, device: torch.device, dtype: torch.dtype) -> LFM2AudioModel:
    """The model with small random weights, created on the device (no checkpoint)."""
    with torch.device(device):
        model = LFM2AudioModel(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    model.retie()
    model.lfm.init_buffers()
    model.depthformer.init_buffers()
    return model.eval()


def random_processor(decoder: str, full: bool, device: torch.device) -> LFM2AudioProcessor:
    """The tiny checkpoint's tokenizer and features, with a random full-size (or tiny) audio decoder."""
    proc = LFM2AudioProcessor.from_pretrained(GOLDEN / "checkpoint", device=device)
    if decoder == "mimi":
        name = "manifest/mimi_config_full.json" if full else "checkpoint/mimi_config.json"
        cfg = MimiConfig.from_json(GOLDEN / name)
        with torch.device(device):
            proc._mimi = MimiCodec(cfg).eval()
        proc.mimi_path = Path("random-weights")
        proc.detokenizer_path = None
    else:
        name = "manifest/detokenizer_config_full.json" if full else "checkpoint/audio_detokenizer/config.json"
        path = GOLDEN / name
        cfg = parse_section(LFM2Config, read_json(path), str(path))
        with torch.device(device):
            proc._detokenizer = AudioDetokenizer(cfg).eval()
        proc.detokenizer_path = Path("random-weights")
    return proc


def chat(seed: int, tokens: int) -> SessionConfig:
    text, audio = DEFAULT_SAMPLING["chat"]
    return SessionConfig(mode="chat", text_sampling=text, audio_sampling=audio, max_output_tokens=tokens, seed=seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def drain(sessions: list, restart: bool = True) -> int:
    frames = 0
    for s in sessions:
        while (ev := s.events.get_nowait()) is not None:
            if isinstance(ev, AudioFrame) and not ev.end_of_audio:
                frames += 1
            elif isinstance(ev, ResponseDone) and restart:
                s.add_text("Go on.")
                s.create_response()
    return frames


def step_times(model, proc, n: int, graphs: bool, steps: int, device: torch.device) -> float:
    """Median ms per step with n chat sessions decoding (the engine stepped here)."""
    engine = Engine(model, proc, EngineConfig(max_sessions=n, max_context=2048, cuda_graphs=graphs))
    engine.step()
    sessions = [engine.open_session(chat(i, 4000)) for i in range(n)]
    for s in sessions:
        s.add_text("Hello, how are you?")
        s.create_response()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not engine.step():
            time.sleep(0.001)
        drain(sessions)
        busy = [st for st in engine._slots if st is not None and st.response is not None and st.response.steps > 0]
        if not engine._prefill_queue and len(busy) == n:
            break
    for _ in range(10):
        engine.step()
        drain(sessions)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        drain(sessions)
    for s in sessions:
        s.close()
    engine.step()
    return 1000 * float(np.median(times))


def single_session(model, proc, graphs: bool, tokens: int) -> dict:
    engine = Engine(model, proc, EngineConfig(max_sessions=1, max_context=2048, cuda_graphs=graphs)).start()
    try:
        results = []
        for _ in range(3):  # the first turn warms up; report the best of the rest
            s = engine.open_session(chat(7, tokens))
            wave = (0.1 * np.random.default_rng(0).standard_normal(3 * INPUT_SAMPLE_RATE)).astype(np.float32)
            s.append_audio(wave, INPUT_SAMPLE_RATE)
            s.commit_audio()
            s.create_response()
            while not isinstance(ev := s.events.get(timeout=300), ResponseDone):
                pass
            results.append(ev.stats)
            s.close(wait=True)
        best = min(results[1:], key=lambda st: st.time_to_first_audio_s or math.inf)
        return {"ttfa_ms": 1000 * (best.time_to_first_audio_s or math.nan), "rtf": best.real_time_factor,
                "frames": best.audio_frames}
    finally:
        engine.stop()


def real_time_at(model, proc, n: int, graphs: bool, seconds: float) -> dict:
    engine = Engine(model, proc, EngineConfig(max_sessions=n, max_context=2048, cuda_graphs=graphs)).start()
    try:
        sessions = [engine.open_session(chat(100 + i, 4000)) for i in range(n)]
        for s in sessions:
            s.add_text("Hello, how are you?")
            s.create_response()
        time.sleep(min(20.0, 2.0 + 0.05 * n))  # ramp: every prompt prefilled
        drain(sessions)
        counts = [0] * n
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(0.05)
            for i, s in enumerate(sessions):
                counts[i] += drain([s])
        rates = [c / (time.monotonic() - t0) for c in counts]
        return {
            "sessions": n, "min_fps": min(rates), "mean_fps": sum(rates) / n, "real_time": min(rates) >= FRAME_RATE,
        }  # fmt: skip
    finally:
        engine.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny configuration, a few steps (for CI)")
    ap.add_argument("--audio-decoder", default="mimi", choices=["mimi", "detokenizer"])
    ap.add_argument("--buckets", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--capacity", default="32,64,96,128,160,192,256", help="session counts tried for real time")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = ap.parse_args()

    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        config = LFM2AudioConfig.from_file(GOLDEN / "checkpoint" / "config.json")
        buckets, capacity, steps, seconds, tokens = [1, 2], [2], 3, 1.0, 24
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA device (or --dry-run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = LFM2AudioConfig.from_file(GOLDEN / "manifest" / "config_full.json")
        buckets = [int(x) for x in args.buckets.split(",")]
        capacity = [int(x) for x in args.capacity.split(",")]
        steps, seconds, tokens = args.steps, args.seconds, 120
    t_start = time.monotonic()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": name, "dtype": str(dtype), "audio_decoder": args.audio_decoder}
    result["torch"] = torch.__version__

    def save(**parts) -> None:
        # After every part: a run stopped at its time limit still leaves what it measured.
        result.update(parts)
        out.write_text(json.dumps(result, indent=2))

    model = random_model(config, device, dtype)
    proc = random_processor(args.audio_decoder, not args.dry_run, device)
    modes = [False] if device.type != "cuda" else [False, True]

    table = []
    for n in buckets:
        row = {"sessions": n}
        for graphs in modes:
            row["graphs_ms" if graphs else "eager_ms"] = step_times(model, proc, n, graphs, steps, device)
        table.append(row)
        print(json.dumps(row), flush=True)
        save(steps=table)
    best_graphs = modes[-1]
    single = single_session(model, proc, best_graphs, tokens)
    print(json.dumps({"single_session": single}), flush=True)
    save(single_session=single)
    levels = []
    for n in capacity:
        level = real_time_at(model, proc, n, best_graphs, seconds)
        levels.append(level)
        print(json.dumps(level), flush=True)
        passing = [lv["sessions"] for lv in levels if lv["real_time"]]
        save(capacity=levels, max_real_time_sessions=max(passing) if passing else 0)
        if not level["real_time"]:
            break
    passing = [lv["sessions"] for lv in levels if lv["real_time"]]

    print(f"\nbench_gpu: {name}, {dtype}, {args.audio_decoder} decoder, torch {torch.__version__}")
    print("| sessions | eager ms/step | CUDA graphs ms/step |")
    print("|---:|---:|---:|")
    for r in table:
        g = f"{r['graphs_ms']:.2f}" if "graphs_ms" in r else "-"
        print(f"| {r['sessions']} | {r['eager_ms']:.2f} | {g} |")
    print(f"single session: time to first audio {single['ttfa_ms']:.0f} ms, RTF {single['rtf']:.3f}")
    print(f"real-time chat sessions (each >= {FRAME_RATE} frames/s): {max(passing) if passing else 0}")
    print(f"({time.monotonic() - t_start:.0f} s)")
    save(seconds=time.monotonic() - t_start)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
