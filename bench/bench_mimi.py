"""Mimi codec CPU benchmark: whole-clip vs frame-by-frame streaming, 1 vs many streams.

Full-size (official config) Mimi with random weights, float32, CPU, 2 threads by default.

    .venv/bin/python bench/bench_mimi.py [--threads 2] [--seconds 10] [--batch 16] [--out bench/results/mimi.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfm2audio.codec import MimiCodec, MimiConfig  # noqa: E402


def random_codec(seed: int = 0) -> MimiCodec:
    torch.manual_seed(seed)
    codec = MimiCodec(MimiConfig()).eval()
    with torch.no_grad():
        # Non-trivial codebooks (the default statistics give all-zero centroids).
        for name, buf in codec.named_buffers():
            if name.endswith("embedding_sum"):
                buf.normal_()
    return codec


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def stream_time(step, passes: int, frames: int, warmup: int) -> tuple[float, float]:
    """Per-step seconds: (best pass median, median over all steps). Several passes so that a
    quiet one gives the intrinsic cost on a shared machine; the state keeps advancing."""
    for i in range(warmup):
        step(i)
    medians, all_times = [], []
    for p in range(passes):
        times = []
        for i in range(frames):
            t0 = time.perf_counter()
            step(warmup + p * frames + i)
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
        all_times += times
    return min(medians), statistics.median(all_times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length for whole-clip timings")
    ap.add_argument("--batch", type=int, default=16, help="streams decoded together")
    ap.add_argument("--frames", type=int, default=20, help="timed streaming frames per pass")
    ap.add_argument("--passes", type=int, default=3, help="streaming passes (the best pass median is reported)")
    ap.add_argument("--repeats", type=int, default=3, help="whole-clip runs (the best is reported)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "mimi.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    codec = random_codec()
    cfg = codec.config
    fs, K = cfg.frame_size, cfg.num_codebooks
    n_clip = round(args.seconds * cfg.frame_rate)
    g = torch.Generator().manual_seed(1)
    codes_clip = torch.randint(0, cfg.quantizer.bins, (1, K, n_clip), generator=g)
    n_stream = 64
    codes_b = torch.randint(0, cfg.quantizer.bins, (args.batch, K, n_stream), generator=g)
    wav_clip = 0.1 * torch.randn(1, 1, n_clip * fs, generator=g)
    results: dict[str, float] = {}

    with torch.no_grad():
        # Whole clips: best of `repeats` runs after one warm-up run.
        codec.decode(codes_clip[..., :4])
        t = min(timed(lambda: codec.decode(codes_clip), args.repeats))
        results["decode_clip_ms_per_frame"] = 1000 * t / n_clip
        results["decode_clip_rtf"] = t / (n_clip / cfg.frame_rate)
        codec.encode(wav_clip[..., : 4 * fs])
        t = min(timed(lambda: codec.encode(wav_clip), args.repeats))
        results["encode_clip_ms_per_frame"] = 1000 * t / n_clip
        results["encode_clip_rtf"] = t / (n_clip / cfg.frame_rate)

        # Streaming: one decode_step / encode_step per frame for all rows of a batched state.
        def decode_stepper(batch: int):
            state = codec.decoder_state(batch)
            codes = codes_b[:batch]
            return lambda i: codec.decode_step(codes[:, :, i % n_stream], state)

        best, med = stream_time(decode_stepper(1), args.passes, args.frames, args.warmup)
        results["decode_stream_1_ms_per_frame"] = 1000 * best
        results["decode_stream_1_ms_per_frame_median_all"] = 1000 * med
        best, med = stream_time(decode_stepper(args.batch), args.passes, args.frames, args.warmup)
        results[f"decode_stream_{args.batch}_ms_per_step"] = 1000 * best
        results[f"decode_stream_{args.batch}_ms_per_step_median_all"] = 1000 * med
        results[f"decode_stream_{args.batch}_ms_per_stream_frame"] = 1000 * best / args.batch

        enc_state = codec.encoder_state(1)
        frames = wav_clip[0, 0].view(n_clip, 1, fs)
        best, med = stream_time(
            lambda i: codec.encode_step(frames[i % n_clip], enc_state), args.passes, args.frames, args.warmup
        )
        results["encode_stream_1_ms_per_frame"] = 1000 * best
        results["encode_stream_1_ms_per_frame_median_all"] = 1000 * med
        results["decode_stream_vs_clip"] = results["decode_stream_1_ms_per_frame"] / results["decode_clip_ms_per_frame"]
        results[f"decode_stream_{args.batch}_vs_1"] = (
            results[f"decode_stream_{args.batch}_ms_per_step"] / results["decode_stream_1_ms_per_frame"]
        )

    frame_ms = 1000 / cfg.frame_rate
    rows = [
        ("whole-clip decode", f"{args.seconds:g} s clip", results["decode_clip_ms_per_frame"]),
        ("whole-clip encode", f"{args.seconds:g} s clip", results["encode_clip_ms_per_frame"]),
        ("streaming decode", "1 stream", results["decode_stream_1_ms_per_frame"]),
        ("streaming decode", f"{args.batch} streams (per step)", results[f"decode_stream_{args.batch}_ms_per_step"]),
        ("streaming encode", "1 stream", results["encode_stream_1_ms_per_frame"]),
    ]
    print(f"Mimi full size, random weights, float32, CPU, {args.threads} threads, torch {torch.__version__}")
    print(f"{'mode':<20} {'setting':<24} {'ms/frame':>9} {'RTF':>7}")
    for mode, setting, ms in rows:
        print(f"{mode:<20} {setting:<24} {ms:9.2f} {ms / frame_ms:7.3f}")
    print(
        f"streaming/whole-clip decode: {results['decode_stream_vs_clip']:.2f}x (target <= 2); "
        f"{args.batch} streams / 1 stream: {results[f'decode_stream_{args.batch}_vs_1']:.2f}x (target < 4); "
        f"reference moshi Mimi: whole-clip 4.5, streaming 23 ms/frame"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": "official Mimi (random weights)",
        "dtype": "float32",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "clip_seconds": args.seconds,
        "batch": args.batch,
        "timed_frames_per_pass": args.frames,
        "passes": args.passes,
        "statistic": "streaming: best of per-pass median step times; whole clip: best of runs",
        "reference_moshi_mimi_ms_per_frame": {"decode_clip": 4.5, "decode_stream_1": 23.0},
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
