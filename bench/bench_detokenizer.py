"""Benchmark the LFM2.5 audio detokenizer (full-size config, random weights, CPU float32, 2 threads).

Measures streaming ``decode_step`` per frame for 1 stream and for 16 streams
batched, and whole-clip ``decode`` of 10 s of audio. A frame is 80 ms of
24 kHz audio, so a step is real-time while it takes under 80 ms; the real-time
factor (RTF) is compute time / audio time (lower is better).

    .venv/bin/python bench/bench_detokenizer.py [--int8] [--out bench/results/detokenizer.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lfm2audio.codec.detokenizer import SAMPLE_RATE, SAMPLES_PER_FRAME, AudioDetokenizer
from lfm2audio.codec.int8 import quantize_detokenizer_int8
from lfm2audio.config import LFM2Config, parse_section, read_json

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT.parent / "shared" / "golden" / "manifest" / "detokenizer_config_full.json"
FRAME_MS = 1000.0 * SAMPLES_PER_FRAME / SAMPLE_RATE  # 80 ms


def bench_stream(model: AudioDetokenizer, batch: int, steps: int, warmup: int) -> dict:
    codes = torch.randint(0, 2048, (batch, 8, warmup + steps))
    state = model.stream_state(batch)
    times = []
    for t in range(warmup + steps):
        t0 = time.perf_counter()
        model.decode_step(codes[:, :, t], state)
        if t >= warmup:
            times.append(time.perf_counter() - t0)
    step_ms = 1e3 * statistics.median(times)
    return {
        "batch": batch,
        "steps": steps,
        "step_ms_median": step_ms,
        "step_ms_min": 1e3 * min(times),
        "step_ms_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
        "ms_per_stream_frame": step_ms / batch,
        "rtf": step_ms / FRAME_MS,
    }


def bench_whole(model: AudioDetokenizer, seconds: float, repeats: int) -> dict:
    frames = round(seconds * 1000 / FRAME_MS)
    codes = torch.randint(0, 2048, (1, 8, frames))
    model.decode(codes)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.decode(codes)
        times.append(time.perf_counter() - t0)
    total_ms = 1e3 * statistics.median(times)
    return {
        "frames": frames,
        "audio_s": frames * FRAME_MS / 1000,
        "total_ms_median": total_ms,
        "total_ms_min": 1e3 * min(times),
        "ms_per_frame": total_ms / frames,
        "rtf": total_ms / (frames * FRAME_MS),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=MANIFEST, help="detokenizer config.json (full size)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "detokenizer.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50, help="timed streaming steps")
    ap.add_argument("--seconds", type=float, default=10.0, help="whole-clip length")
    ap.add_argument("--repeats", type=int, default=3, help="whole-clip repeats")
    ap.add_argument("--int8", action="store_true",
                    help="also time the int8 copy that --quantize loads (lfm2audio.codec.int8)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = parse_section(LFM2Config, read_json(args.config), str(args.config))
    model = AudioDetokenizer(cfg).eval()  # random weights: speed does not depend on their values
    models = {"float32": model}
    if args.int8:
        models["int8"] = quantize_detokenizer_int8(copy.deepcopy(model))

    stream: list[dict] = []
    rows = []
    for name, m in models.items():
        stream += [{"weights": name, **bench_stream(m, b, args.steps, warmup=5)} for b in (1, 16)]
    for s in stream:
        rows.append((f"{s['weights']} stream x{s['batch']}", s["step_ms_median"], s["ms_per_stream_frame"], s["rtf"]))
    whole = bench_whole(model, args.seconds, args.repeats)
    rows.append((f"whole clip {whole['audio_s']:.0f} s", whole["total_ms_median"], whole["ms_per_frame"], whole["rtf"]))
    print(f"detokenizer, full config, CPU float32, {args.threads} threads, torch {torch.__version__}")
    print(f"{'mode':<28}{'total ms':>12}{'ms/frame':>12}{'RTF':>10}")
    for name, total, per_frame, rtf in rows:
        print(f"{name:<28}{total:>12.2f}{per_frame:>12.3f}{rtf:>10.4f}")
    print("(ms/frame: per stream per 80 ms frame; stream RTF = step time / 80 ms)")

    result = {
        "config": str(args.config),
        "device": "cpu",
        "dtype": "float32",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "frame_ms": FRAME_MS,
        "stream": stream,
        "whole_clip": whole,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
