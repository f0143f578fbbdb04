"""What joining sibling projections saves: the quantized model loaded twice, joined and not, timed in turn.

While loading, a quantized model's feed-forwards (``w1`` + ``w3``) and backbone attention blocks
(q + k + v) are made one layer each (``join_projections`` in ``lfm2audio.model.quantize``). The outputs
are the same bits, so the only question is time. Both models are loaded in one process (the full-size
int8 model is ~2.6 GB), and each measurement alternates between them, one depthformer frame (8
codebooks) or one backbone decode step at a time, with the order swapped every round. A shared
machine's drift then hits both alike, and the paired ratio (joined / separate, per round) is the
figure; the medians are shown too.

    python bench/bench_model.py --make-checkpoint /tmp/lfm2audio_quant_full   # full-size random weights
    python bench/bench_joined_projections.py --model /tmp/lfm2audio_quant_full --quantize int8 [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lfm2audio import LFM2AudioModel  # noqa: E402
from lfm2audio.model.lfm2 import Attention, SwiGLU  # noqa: E402
from lfm2audio.model.quantize import QUANTIZE_CHOICES  # noqa: E402


def load_pair(folder: Path, quantize: str, compile: bool) -> tuple[dict[str, LFM2AudioModel], int]:
    """The model as ``from_pretrained`` loads it (joined), the same model with nothing joined (the modules'
    ``joinable`` emptied while it loads), and how many groups of layers the first one holds."""
    kw: dict[str, Any] = dict(device="cpu", dtype=torch.float32, quantize=quantize, compile=compile)
    joined = LFM2AudioModel.from_pretrained(folder, **kw)
    owners = (SwiGLU, Attention)
    saved = [cls.joinable for cls in owners]
    try:
        for cls in owners:
            cls.joinable = {}
        separate = LFM2AudioModel.from_pretrained(folder, **kw)
    finally:
        for cls, joinable in zip(owners, saved, strict=True):
            cls.joinable = joinable
    groups = sum(1 for m in joined.modules() if getattr(m, "w13", None) is not None)
    groups += sum(1 for m in joined.modules() if isinstance(m, Attention) and m.qkv_proj is not None)
    return {"joined": joined, "separate": separate}, groups


@torch.inference_mode()
def measure(models: dict[str, LFM2AudioModel], rounds: int, warmup: int = 3) -> dict[str, Any]:
    hidden = next(iter(models.values())).config.lfm.hidden_size
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, hidden, generator=gen) * 0.5
    x = torch.randn(1, 1, hidden, generator=gen) * 0.5
    caches = {k: m.lfm.new_cache(1, rounds + warmup + 8) for k, m in models.items()}
    calls = {
        "depthformer frame": lambda k: models[k].sample_audio_frame(h),
        "backbone step": lambda k: models[k].lfm(x, caches[k]),
    }
    times: dict[str, dict[str, list[float]]] = {what: {k: [] for k in models} for what in calls}
    for i in range(warmup + rounds):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        for what, call in calls.items():
            for k in order:
                t0 = time.perf_counter()
                call(k)
                if i >= warmup:
                    times[what][k].append(1e3 * (time.perf_counter() - t0))
    out: dict[str, Any] = {}
    for what, per in times.items():
        ratios = sorted(a / b for a, b in zip(per["joined"], per["separate"], strict=True))
        out[what] = {
            "joined_ms_median": statistics.median(per["joined"]),
            "separate_ms_median": statistics.median(per["separate"]),
            "ratio_median": statistics.median(ratios),
            "ratio_quartiles": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]),
            "samples_ms": per,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="checkpoint folder (official layout)")
    ap.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8")
    ap.add_argument("--compile", action="store_true", help="compiled decode (compile=True) for both models")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "joined_projections.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, groups = load_pair(args.model, args.quantize, args.compile)
    results = measure(models, args.rounds)
    label = args.quantize + (" compiled" if args.compile else "")
    print(f"{label}, {args.threads} threads, {args.rounds} rounds; groups of layers joined: {groups}")
    print("| call | joined ms (median) | separate ms (median) | joined / separate, paired: median (quartiles) |")
    print("|---|---:|---:|---:|")
    for what, r in results.items():
        lo, hi = r["ratio_quartiles"]
        print(
            f"| {what} | {r['joined_ms_median']:.2f} | {r['separate_ms_median']:.2f} "
            f"| {r['ratio_median']:.3f} ({lo:.3f}-{hi:.3f}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(args.model), "quantize": args.quantize, "compile": args.compile, "threads": args.threads}
    args.out.write_text(json.dumps({**meta, "joined_groups": groups, "results": results}, indent=1))


if __name__ == "__main__":
    main()
