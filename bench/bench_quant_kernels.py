"""Which quantized matrix kernel is fastest on this CPU: one layer's product at decode batch sizes.

For the full-size model's largest projections (backbone feed-forward and conv input, depthformer
feed-forward) it times each kernel that ``--quantize`` can use here against float32 and bfloat16:

* ``w8a8``: ``W8A8Linear``, int8 weights and int8 activations on fbgemm's u8 x s8 kernel (``int8`` mode;
  on a CPU without VNNI each row is fed twice, as the layer does there);
* ``int8wo``: ``Int8Linear``, weight-only int8, bf16 activations (``int8`` where fbgemm is missing, the codecs);
* ``int4``: ``Int4Linear``, weight-only int4 in groups of 128, bf16 activations (``int4`` mode where the
  int4 kernel of ``w4a8.c`` is missing);
* ``w4a8``: ``W4A8Linear``, the same int4 weights with int8 activations on the kernel of
  ``lfm2audio/model/w4a8.c`` (``int4`` mode on x86-64 CPUs with AVX2 and a C compiler), on its AVX-512
  VNNI path where the CPU has one (``LFM2AUDIO_INT4_KERNEL=avx2`` times the AVX2 path there).

A decode step reads every weight of the model once, far more than any cache holds, so each kernel
cycles through enough copies of a layer that they fill several times the last-level cache: what is
timed is a weight streamed from memory, as in the model, not one that stays in L3. Reports ms per
layer, the weight bytes read per second, and the relative error of the output against float32.
Prints a table and writes JSON (``--out``); ``--quick`` runs small layers in seconds (CI).

    python bench/bench_quant_kernels.py [--rows 1,8] [--threads 1,2] [--out bench/results/quant_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_model import weights_gb  # noqa: E402

from lfm2audio.model import w4a8  # noqa: E402
from lfm2audio.model.quantize import (  # noqa: E402
    DEFAULT_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    W4A8Linear,
    W8A8Linear,
    act_levels,
    w8a8_available,
)

# (name, out_features, in_features) of the full-size model's largest layers (config_full.json).
FULL_SHAPES = [
    ("backbone w1 / w3", 8192, 2048),
    ("backbone w2", 2048, 8192),
    ("backbone conv in_proj", 6144, 2048),
    ("depthformer w1 / w3", 2816, 1024),
    ("depthformer w2", 1024, 2816),
]
QUICK_SHAPES = [("quick", 256, 128), ("quick w2", 128, 256)]
KERNELS = ("float32", "bfloat16", "w8a8", "int8wo", "int4", "w4a8")


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs); 32 MiB when it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def build(kernel: str, weight: Tensor) -> tuple[Callable[[Tensor], Tensor], int]:
    """The layer as a callable on float32 rows, and the bytes of weight it reads per call."""
    if kernel == "float32":
        w = weight.clone()
        return (lambda x: F.linear(x, w)), w.nbytes
    if kernel == "bfloat16":
        wb = weight.to(torch.bfloat16)
        return (lambda x: F.linear(x.to(torch.bfloat16), wb).float()), wb.nbytes
    layers = {
        "w8a8": lambda: W8A8Linear.from_float(weight),
        "int8wo": lambda: Int8Linear.from_float(weight),
        "int4": lambda: Int4Linear.from_float(weight, DEFAULT_GROUP_SIZE),
        "w4a8": lambda: W4A8Linear.from_float(weight, DEFAULT_GROUP_SIZE),
    }
    if kernel not in layers:
        raise ValueError(kernel)
    layer = layers[kernel]()
    # What the layer holds (its buffers and any packed copy), counted as bench_model counts a model's weights.
    return layer, round(weights_gb(layer) * 1e9)


def measure(kernel: str, weight: Tensor, x: Tensor, cache_bytes: int, seconds: float) -> dict:
    """ms per call over copies that fill 4x the cache, weight GB/s, error against float32."""
    first, nbytes = build(kernel, weight)
    copies = [first] + [build(kernel, weight)[0] for _ in range(max(1, math.ceil(4 * cache_bytes / nbytes)) - 1)]
    ref = F.linear(x.double(), weight.double())
    err = float((first(x).double() - ref).norm() / ref.norm())
    for layer in copies:  # warm-up: every copy once
        layer(x)
    calls, start = 0, time.perf_counter()
    while True:
        for layer in copies:
            layer(x)
        calls += len(copies)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    ms = 1000 * elapsed / calls
    return {"ms": ms, "weight_gb_per_s": nbytes / (ms / 1000) / 1e9, "rel_error": err, "copies": len(copies)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8", help="input rows per call (1: one session's decode step)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per kernel, shape, rows and threads")
    ap.add_argument("--quick", action="store_true", help="small layers, a short time each (CI smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quant_kernels.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    seconds = 0.05 if args.quick else args.seconds
    cache = (1 << 20) if args.quick else last_level_cache_bytes()
    missing = {"w8a8"} if not w8a8_available() else set()
    missing |= {"w4a8"} if not w4a8.available() else set()
    kernels = [k for k in KERNELS if k not in missing]
    gen = torch.Generator().manual_seed(0)
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, out_f, in_f in shapes:
            weight = torch.randn(out_f, in_f, generator=gen) * in_f**-0.5
            for rows in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(rows, in_f, generator=gen)
                for kernel in kernels:
                    row = {"threads": threads, "layer": name, "shape": [out_f, in_f], "rows": rows, "kernel": kernel}
                    row.update(measure(kernel, weight, x, cache, seconds))
                    results.append(row)
                    print(json.dumps(row), flush=True)

    w8a8 = "w8a8 (7-bit input fed twice: no VNNI)" if act_levels() < 127 else "w8a8"
    print(
        f"\nquantized kernels, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"last-level cache {cache >> 20} MiB (each kernel streams >= 4x that), ms per layer (weight GB/s)"
    )
    w4 = f"w4a8 on its {w4a8.isa()} path" if w4a8.available() else "w4a8 missing: no AVX2 or no C compiler"
    print(f"(w8a8 = {w8a8}; missing where fbgemm is not built in; {w4})")
    print("| threads | layer | rows | " + " | ".join(kernels) + " |")
    print("|---:|---|---:|" + "---:|" * len(kernels))
    keys = list(dict.fromkeys((r["threads"], r["layer"], r["rows"]) for r in results))  # in the order run
    for threads, layer, rows in keys:
        cells = {r["kernel"]: r for r in results if (r["threads"], r["layer"], r["rows"]) == (threads, layer, rows)}
        text = [f"{cells[k]['ms']:.3f} ({cells[k]['weight_gb_per_s']:.0f})" for k in kernels]
        print(f"| {threads} | {layer} | {rows} | " + " | ".join(text) + " |")
    print(
        "relative error against float32, max over rows and layers: "
        + ", ".join(f"{k} {max(r['rel_error'] for r in results if r['kernel'] == k):.4f}" for k in kernels)
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "cache_bytes": cache,
        "act_levels": act_levels(),
        "w4a8_isa": w4a8.isa() if w4a8.available() else None,
        "quick": args.quick,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
