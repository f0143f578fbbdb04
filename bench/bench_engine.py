"""Engine throughput: aggregate frames/s and per-session real-time factor for 1..16 concurrent sessions.

A mid-size random-weight LFM2-Audio (hidden 1024, 8 layers, full 65536 vocabulary,
depthformer 512 x 4) with the official-size Mimi decoder, CPU, float32. Every
session runs an interleaved chat turn (6 text tokens / 12 audio frames), greedy.
Also: time to first audio (p50/p95) of a session that arrives while the others
are speaking, and the longest stall a long prompt causes to the others.

    python bench/bench_engine.py                # prints a table, writes bench/results/engine.json
    python bench/bench_engine.py --quick        # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lfm2audio import LFM2AudioModel  # noqa: E402
from lfm2audio.codec import MimiCodec, MimiConfig  # noqa: E402
from lfm2audio.config import LFM2AudioConfig, read_json  # noqa: E402
from lfm2audio.engine import AudioFrame, Engine, EngineConfig, ResponseDone, SessionConfig, TextDelta  # noqa: E402

GOLDEN = ROOT.parent / "shared" / "golden"


def mid_config(quick: bool) -> dict:
    cfg = read_json(GOLDEN / "manifest" / "config_full.json")
    hidden, layers = (128, 4) if quick else (1024, 8)
    types = ["conv", "conv", "full_attention", "conv"] * (layers // 4)
    cfg["lfm"].update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        layer_types=types,
        full_attn_idxs=[i for i, t in enumerate(types) if t != "conv"],
        num_attention_heads=16 if not quick else 4,
        num_key_value_heads=4 if not quick else 2,
        num_heads=16 if not quick else 4,
        intermediate_size=4 * hidden,
        block_ff_dim=4 * hidden,
        conv_dim=hidden,
        conv_dim_out=hidden,
        block_dim=hidden,
        vocab_size=1024 if quick else 65536,
    )
    cfg["encoder"].update(n_layers=2, d_model=256 if not quick else 32, n_heads=4, subsampling_conv_channels=64)
    cfg["depthformer"] = {"layers": 2 if quick else 4, "dim": 64 if quick else 512, "tie": True}
    return cfg


def make_checkpoint(folder: Path, quick: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = mid_config(quick)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LFM2AudioModel(LFM2AudioConfig.from_dict(cfg))
    weights = {}
    for name, t in model.state_dict().items():
        if name == "codebook_offsets":
            weights[name] = torch.arange(8) * 2049
        elif not t.is_floating_point():
            weights[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif name.endswith("norm.weight") or "layernorm" in name or "norm_" in name and name.endswith("weight"):
            weights[name] = torch.ones(t.shape, dtype=torch.bfloat16)
        elif "running_var" in name:
            weights[name] = torch.ones(t.shape)
        else:
            weights[name] = (torch.randn(t.shape) * 0.02).to(torch.bfloat16)
    save_file(weights, str(folder / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(GOLDEN / "checkpoint" / name, folder / name)
    mimi_cfg = None if not quick else MimiConfig.from_json(GOLDEN / "checkpoint" / "mimi_config.json")
    if quick:
        shutil.copy(GOLDEN / "checkpoint" / "mimi_config.json", folder / "mimi_config.json")
    mimi = MimiCodec(mimi_cfg)
    save_file(
        {k: v.contiguous() for k, v in mimi.state_dict().items()},
        str(folder / "tokenizer-e351c8d8-checkpoint125.safetensors"),
    )


def run_batch(engine: Engine, n: int, tokens: int) -> dict:
    sessions = [engine.open_session(SessionConfig(mode="chat", max_output_tokens=tokens)) for _ in range(n)]
    for s in sessions:
        s.add_text("Tell me something.")
    start = time.perf_counter()
    for s in sessions:
        s.create_response()
    frames, dones = 0, []
    for s in sessions:
        while True:
            ev = s.events.get(timeout=600)
            if isinstance(ev, AudioFrame) and not ev.end_of_audio:
                frames += 1
            elif isinstance(ev, ResponseDone):
                dones.append(ev)
                break
    wall = time.perf_counter() - start
    for s in sessions:
        s.close(wait=True)
    failed = [d.reason for d in dones if d.status == "failed"]
    if failed:
        raise RuntimeError(f"{len(failed)} responses failed: {failed[0]}")
    rtf = [d.stats.real_time_factor for d in dones if d.stats.real_time_factor]
    return {
        "sessions": n,
        "wall_s": wall,
        "frames": frames,
        "frames_per_s": frames / wall,
        "steps_per_s": sum(d.stats.text_tokens + d.stats.audio_frames for d in dones) / wall,
        "rtf_mean": statistics.mean(rtf) if rtf else None,
    }


def arrival_ttfa(engine: Engine, background: int, trials: int, tokens: int) -> dict:
    """Commit-to-first-audio of a session that arrives (3 s of speech) while ``background`` sessions speak."""
    others = [engine.open_session(SessionConfig(mode="chat", max_output_tokens=10_000)) for _ in range(background)]
    for s in others:
        s.add_text("Keep talking.")
        s.create_response()
    ttfa = []
    for _ in range(trials):
        s = engine.open_session(SessionConfig(mode="chat", max_output_tokens=tokens))
        # 3 s of microphone audio, committed: TTFA here is commit-to-first-audio (features, encoder, prefill).
        s.append_audio((0.1 * torch.randn(48_000)).numpy(), 16_000)
        s.commit_audio()
        s.create_response()
        while not isinstance(ev := s.events.get(timeout=600), ResponseDone):
            pass
        ttfa.append(ev.stats.time_to_first_audio_s)
        s.close(wait=True)
    for s in others:
        s.cancel()
        s.close(wait=True)
    ttfa = sorted(t for t in ttfa if t is not None)
    return {
        "background_sessions": background,
        "ttfa_p50_s": ttfa[len(ttfa) // 2],
        "ttfa_p95_s": ttfa[min(len(ttfa) - 1, round(0.95 * (len(ttfa) - 1)))],
    }


def prefill_stall(engine: Engine, prompt_words: int) -> dict:
    """Longest gap between consecutive tokens (text or audio) of a speaking session: alone, and while
    another session prefills a long prompt. The difference is the stall chunked prefill bounds."""
    speaker = engine.open_session(SessionConfig(mode="chat", max_output_tokens=10_000))
    speaker.add_text("Keep talking.")
    speaker.create_response()

    def gaps(until) -> list[float]:
        while speaker.events.get_nowait() is not None:  # measure production, not a backlog
            pass
        out, last = [], time.perf_counter()
        while not until():
            if isinstance(speaker.events.get(timeout=600), TextDelta | AudioFrame):
                now = time.perf_counter()
                out.append(now - last)
                last = now
        return out

    counted = iter(range(40))
    alone = gaps(lambda: next(counted, None) is None)
    long = engine.open_session(SessionConfig(mode="asr", max_output_tokens=2))
    long.add_text("word " * (prompt_words // 3))  # about 3 tokens a word with the benchmark's tokenizer
    done: list[ResponseDone] = []
    long.create_response()
    during = gaps(lambda: done or done.extend(e for e in [long.events.get_nowait()] if isinstance(e, ResponseDone)))
    if done[0].status == "failed" or not done[0].stats.prompt_positions:
        raise RuntimeError(f"the long prompt did not run: {done[0].reason}")
    prompt_words = done[0].stats.prompt_positions
    for s in (speaker, long):
        s.cancel()
        s.close(wait=True)
    return {"prompt_positions": prompt_words, "max_gap_s_without": max(alone), "max_gap_s_during_prefill": max(during)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sessions", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=36, help="max output tokens per session (6 text + 12 audio cycles)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(x) for x in args.sessions.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        make_checkpoint(folder, args.quick)
        engine = Engine.from_pretrained(folder, device="cpu", dtype=getattr(torch, args.dtype),
                                        config=EngineConfig(max_sessions=max(counts) + 1, max_context=1024,
                                                            prefill_chunk=64)).start()  # fmt: skip
        engine.warmup()
        rows = [run_batch(engine, n, args.tokens) for n in counts]
        arrival = arrival_ttfa(engine, background=min(7, max(counts) - 1), trials=5 if args.quick else 8, tokens=8)
        stall = prefill_stall(engine, prompt_words=400 if not args.quick else 200)
        engine.stop()
    one = rows[0]["frames_per_s"]
    print(f"engine bench, {args.dtype}, {args.threads} threads{' (quick)' if args.quick else ''}")
    print(f"{'sessions':>8} {'frames/s':>9} {'x of 1':>7} {'steps/s':>8} {'RTF':>6} {'wall s':>7}")
    for r in rows:
        rtf = f"{r['rtf_mean']:.2f}" if r["rtf_mean"] else "-"
        print(f"{r['sessions']:>8} {r['frames_per_s']:>9.2f} {r['frames_per_s'] / one:>7.2f} "
              f"{r['steps_per_s']:>8.2f} {rtf:>6} {r['wall_s']:>7.2f}")  # fmt: skip
    print(f"TTFA with {arrival['background_sessions']} sessions speaking: "
          f"p50 {arrival['ttfa_p50_s'] * 1000:.0f} ms, p95 {arrival['ttfa_p95_s'] * 1000:.0f} ms")  # fmt: skip
    alone, during = stall["max_gap_s_without"] * 1000, stall["max_gap_s_during_prefill"] * 1000
    print(f"longest gap between a speaker's tokens: {alone:.0f} ms alone, "
          f"{during:.0f} ms while a {stall['prompt_positions']}-token prompt prefills")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "quick": args.quick, "dtype": args.dtype}
    out.write_text(json.dumps({"batches": rows, "arrival": arrival, "prefill_stall": stall, **meta}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
