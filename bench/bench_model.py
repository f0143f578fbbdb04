"""Full-size LFM2-Audio on CPU with random weights: loading, first token, per-token costs, turn-2 latency.

Builds (once) a checkpoint folder in the official layout with random bf16 weights for the full-size
config (~3 GB), then for each dtype runs a FRESH subprocess (so peak RSS is per dtype) that measures:

- loading: ``LFM2AudioModel.from_pretrained`` and ``LFM2AudioProcessor.from_pretrained`` wall time, peak RSS
  after loading against the size of the weights in that dtype;
- turn 1 (system prompt + a 5 s 16 kHz synthetic audio turn, README chat recipe): time to first token of
  ``generate_interleaved`` (greedy), i.e. audio encoding + prefill + one step;
- steady state: one backbone step + text logits + argmax (text token), one backbone step + depthformer frame
  (audio frame), with an explicit ``model.lfm.new_cache`` cache, median over ``--steps`` after warm-up;
- turn 2: turn-1 tokens appended with ``ChatState.append``, end_turn, a user text turn, an assistant turn; time
  to first token with the kept conversation cache versus a full re-prefill of the same state, after
  ``--turn1-tokens`` (20) turn-1 tokens and after as many as give turn 2 the reference's 169 positions;
- peak RSS at the end (ru_maxrss; the checkpoint is written by its own process so that no worker inherits
  the writer's peak, which ru_maxrss carries across fork/exec);
- real-time factor of an interleaved chat turn (``--cycles`` cycles of 6 text tokens + 12 audio frames, each
  frame decoded by a full-size random-weight streaming Mimi), split into backbone, text head, depthformer
  and Mimi time; RTF = compute time / audio time, the best cycle and the median;
- with ``--quantize int8,int4``: the same for each quantized model (``lfm2audio.model.quantize``), and
  its quality against float32 on a teacher-forced stream of ``--quality-positions`` positions (the float32
  model's greedy interleaved stream after the turn-1 prompt, fed to both; see
  ``lfm2audio.model.quantize_eval``): per-layer and final-logit cosine similarity, relative error, top-1
  agreement.
- with ``--compile`` as well: each quantized model once more with ``compile=True`` (``torch.compile`` of
  the backbone and the depthformer frame, ``lfm2audio.model.compiled``); its compilation happens in the
  cold first token and the warm-up steps, which the steady-state and chat figures leave out.

Timings are wall-clock on a CPU that may be shared: before each dtype the driver waits (``--max-idle-wait``)
for other jobs to leave the CPU idle, first-token times are the best of ``--repeats`` runs, and the JSON
keeps every sample.

Usage (``--quick`` uses a small config and finishes in seconds):

    .venv/bin/python bench/bench_model.py [--dtype float32,bfloat16] [--quantize int8,int4] [--compile]
                                          [--threads 2]
                                          [--workdir DIR] [--out bench/results/model.json] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lfm2audio import ChatState, ConversationCache, LFM2AudioModel, LFM2AudioProcessor, LFMModality  # noqa: E402
from lfm2audio.codec.int8 import quantize_decoder_int8  # noqa: E402
from lfm2audio.config import LFM2AudioConfig  # noqa: E402
from lfm2audio.engine.events import OUTPUT_SAMPLE_RATE as MIMI_RATE  # noqa: E402
from lfm2audio.engine.events import SAMPLES_PER_FRAME  # noqa: E402
from lfm2audio.model.quantize import QUANTIZE_CHOICES  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_mimi import random_codec  # noqa: E402  (the full-size random Mimi, as bench_mimi.py times it)

GOLDEN = Path(os.environ.get("LFM2AUDIO_GOLDEN", ROOT.parent / "shared" / "golden"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INPUT_NAMES = ("text", "audio_in", "audio_in_lens", "audio_out", "modality_flag")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SYSTEM_PROMPT = "Respond with interleaved text and audio."
TURN2_TEXT = "My business specialized in chairs, can you give me something related to that?"
AUDIO_SECONDS = 5.0
SAMPLE_RATE = 16_000

# liquid-audio 1.3.0, full size, float32, 2 threads, 5 s audio turn of 84 positions, on this machine kind.
REFERENCE = {
    "dtype": "float32",
    "load_s": 20.0,
    "peak_rss_load_gb": 9.4,
    "first_token_ms": 1080.0,
    "prompt_positions": 84,
    "text_token_ms": 167.0,
    "audio_frame_ms": 253.0,
    "turn2_full_ms": 1370.0,
    "turn2_positions": 169,
}


# Checkpoint ------------------------------------------------------------------------------------------


def load_config_dict(quick: bool) -> dict[str, Any]:
    """The full-size config.json (golden manifest), or a small variant of it for ``--quick``."""
    config = json.loads((GOLDEN / "manifest" / "config_full.json").read_text())
    if quick:
        hidden, ff = 256, 768
        config["lfm"].update(
            hidden_size=hidden, intermediate_size=ff, block_ff_dim=ff, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, num_heads=8,
            layer_types=["conv", "full_attention", "conv", "full_attention"], full_attn_idxs=[1, 3],
            conv_dim=hidden, conv_dim_out=hidden, block_dim=hidden,
        )  # fmt: skip
        config["encoder"].update(n_layers=2, d_model=128, n_heads=4, subsampling_conv_channels=64)
        config["depthformer"].update(layers=2, dim=256)
    return config


def _norm_like(module: torch.nn.Module) -> bool:
    return "Norm" in type(module).__name__


def random_state_dict(config: LFM2AudioConfig, std: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every key of ``LFM2AudioModel(config).state_dict()``, built without a real model.

    Parameters are bf16 (the official precision): normal(0, std), norms' weights 1 and biases 0. Buffers keep
    their dtype and the values the module defines. Tied weights are written under both names with the
    same values (as copies: safetensors refuses tensors that share memory).
    """
    with torch.device("meta"):
        model = LFM2AudioModel(config)
    gen = torch.Generator().manual_seed(seed)
    made: dict[int, torch.Tensor] = {}  # id(parameter) -> tensor, so tied names share values
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=torch.bfloat16)
                if _norm_like(module):
                    t.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    t.zero_()
                else:
                    t.normal_(0.0, std, generator=gen)
                made[id(p)] = t
                out[prefix + name] = t
            else:
                out[prefix + name] = made[id(p)].clone()
        for name, b in module.named_buffers(recurse=False):
            key = prefix + name
            if name in module._non_persistent_buffers_set:
                continue
            if key == "codebook_offsets":
                out[key] = torch.arange(config.codebooks, dtype=b.dtype) * config.audio_vocab_size
            elif key == "audio_loss_weights":
                from lfm2audio.model.lfm2_audio import _audio_loss_weights

                out[key] = _audio_loss_weights(config).to(b.dtype)
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                fill = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}[name]
                out[key] = torch.full(b.shape, fill, dtype=b.dtype)
            else:
                raise RuntimeError(f"bench_model: do not know how to initialise buffer {key}")
    expected = set(model.state_dict())
    if set(out) != expected:
        raise RuntimeError(f"bench_model: key mismatch {sorted(set(out) ^ expected)[:10]}")
    return out


def make_checkpoint(folder: Path, config: dict[str, Any]) -> None:
    """Write config.json, model.safetensors (random bf16 weights) and the golden tokenizer into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".bench_complete"
    config_text = json.dumps(config, indent=2)
    if marker.exists() and (folder / "config.json").read_text() == config_text:
        print(f"reusing checkpoint in {folder}", flush=True)
        return
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    weights = random_state_dict(LFM2AudioConfig.from_dict(config))
    tmp = folder / "model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    del weights
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(config_text)
    for name in TOKENIZER_FILES:
        shutil.copy(GOLDEN / "checkpoint" / name, folder / name)
    marker.touch()
    size = (folder / "model.safetensors").stat().st_size
    print(f"wrote {folder} ({size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", flush=True)


# Measurements (run in a fresh process per dtype) ---------------------------------------------------


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def vm_hwm_gb() -> float | None:
    """This process's own peak RSS (Linux VmHWM, reset at exec unlike ru_maxrss), as a cross-check."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def weights_gb(model: torch.nn.Module) -> float:
    """Bytes of the model's parameters and buffers (shared storages counted once), plus the weights
    that kernels hold packed outside any tensor (``W8A8Linear.packed_bytes``)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    packed = sum(getattr(m, "packed_bytes", 0) for m in model.modules())
    return (sum(seen.values()) + packed) / 1e9


def synthetic_audio(seconds: float = AUDIO_SECONDS, rate: int = SAMPLE_RATE, seed: int = 0) -> torch.Tensor:
    """(1, samples) mono test signal: a chirp plus a modulated tone plus noise, peak 0.3."""
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    chirp = torch.sin(2 * torch.pi * (200 * t + 300 * t**2 / seconds))
    tone = torch.sin(2 * torch.pi * 440 * t) * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t))
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    wave = chirp + tone + 0.1 * noise
    return (0.3 * wave / wave.abs().max()).float().unsqueeze(0)


def turn1_state(processor: LFM2AudioProcessor, wave: torch.Tensor, *, keep_cache: bool = True) -> ChatState:
    chat = ChatState(processor, keep_cache=keep_cache)
    chat.new_turn("system")
    chat.add_text(SYSTEM_PROMPT)
    chat.end_turn()
    chat.new_turn("user")
    chat.add_audio(wave, SAMPLE_RATE)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def time_first_token(model: LFM2AudioModel, inputs: dict[str, Any], max_new_tokens: int) -> float:
    """Milliseconds until ``generate_interleaved`` yields its first token (greedy)."""
    t0 = time.perf_counter()
    gen = model.generate_interleaved(**inputs, max_new_tokens=max_new_tokens)
    next(gen)
    ms = 1e3 * (time.perf_counter() - t0)
    gen.close()
    return ms


@torch.inference_mode()
def steady_state(model: LFM2AudioModel, chat: ChatState, steps: int, warmup: int) -> dict[str, Any]:
    """Median ms of one text step and one audio step after the prompt, with an explicit backbone cache."""
    emb = model.embed_inputs(**{k: chat[k] for k in INPUT_NAMES})
    cache = model.lfm.new_cache(1, emb.shape[1] + 2 * (steps + warmup) + 8)
    hidden, _ = model.lfm(emb, cache)
    h = hidden[:, -1]

    text_times = []
    token = model.text_logits(h).argmax(-1)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        hidden, _ = model.lfm(model.embed_text(token).view(1, 1, -1), cache)
        h = hidden[:, -1]
        token = model.text_logits(h).argmax(-1)
        if i >= warmup:
            text_times.append(time.perf_counter() - t0)

    audio_times = []
    frame = model.sample_audio_frame(h)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        hidden, _ = model.lfm(model.embed_audio_frames(frame).view(1, 1, -1), cache)
        h = hidden[:, -1]
        frame = model.sample_audio_frame(h)
        if i >= warmup:
            audio_times.append(time.perf_counter() - t0)

    def stats(times: list[float]) -> dict[str, float]:
        ms = [1e3 * t for t in times]
        return {"median": statistics.median(ms), "min": min(ms), "mean": statistics.fmean(ms), "max": max(ms)}

    return {"text_token_ms": stats(text_times), "audio_frame_ms": stats(audio_times), "steps": steps}


@torch.inference_mode()
def chat_rtf(model: LFM2AudioModel, chat: ChatState, codec: Any, cycles: int) -> dict[str, Any]:
    """Real-time factor of the interleaved chat pattern with the streaming audio decoder in the loop.

    Each cycle is what ``generate_interleaved`` does for ``interleaved_n_text`` text tokens and
    ``interleaved_n_audio`` audio frames (greedy; the pattern is kept even when a special token comes
    up, so every cycle costs the same), plus one Mimi ``decode_step`` per frame. One cycle of warm-up.
    """
    cfg = model.config
    n_text, n_audio = cfg.interleaved_n_text, cfg.interleaved_n_audio
    emb = model.embed_inputs(**{k: chat[k] for k in INPUT_NAMES})
    cache = model.lfm.new_cache(1, emb.shape[1] + (cycles + 1) * (n_text + n_audio) + 8)
    hidden, _ = model.lfm(emb, cache)
    h = hidden[:, -1]
    state = codec.decoder_state(1)
    parts = ("backbone", "text_head", "depthformer", "decoder")
    samples: list[dict[str, float]] = []
    text_steps: list[float] = []  # seconds of each text step: text head + backbone
    audio_steps: list[float] = []  # each audio step: depthformer + Mimi + backbone
    for c in range(cycles + 1):
        spent = dict.fromkeys(parts, 0.0)
        t_start = time.perf_counter()
        for i in range(n_text + n_audio):
            t0 = time.perf_counter()
            if i < n_text:
                token = model.text_logits(h).argmax(-1)
                t1 = time.perf_counter()
                spent["text_head"] += t1 - t0
                x = model.embed_text(token)
            else:
                frame = model.sample_audio_frame(h)
                t1 = time.perf_counter()
                spent["depthformer"] += t1 - t0
                codec.decode_step(frame.clamp(0, 2047), state)
                t2 = time.perf_counter()
                spent["decoder"] += t2 - t1
                t1 = t2
                x = model.embed_audio_frames(frame)
            hidden, _ = model.lfm(x.view(1, 1, -1), cache)
            h = hidden[:, -1]
            t3 = time.perf_counter()
            spent["backbone"] += t3 - t1
            if c > 0:
                (text_steps if i < n_text else audio_steps).append(t3 - t0)
        wall = time.perf_counter() - t_start
        if c > 0:
            samples.append({"wall_s": wall, **spent})
    audio_s = n_audio * SAMPLES_PER_FRAME / MIMI_RATE
    rtfs = [x["wall_s"] / audio_s for x in samples]
    best = samples[rtfs.index(min(rtfs))]
    # On a shared CPU every cycle is hit by other jobs at some point; the fastest text step and the
    # fastest audio step, each repeated as the pattern needs, bound what a quiet machine gives.
    floor = (n_text * min(text_steps) + n_audio * min(audio_steps)) / audio_s
    return {
        "cycles": cycles,
        "text_per_cycle": n_text,
        "frames_per_cycle": n_audio,
        "audio_s_per_cycle": audio_s,
        "rtf_min": min(rtfs),
        "rtf_median": statistics.median(rtfs),
        "rtf_step_minima": floor,
        "rtf_samples": rtfs,
        "text_step_ms_min": 1e3 * min(text_steps),
        "audio_step_ms_min": 1e3 * min(audio_steps),
        # Breakdown of the best cycle, ms per cycle.
        "best_cycle_ms": {k: 1e3 * v for k, v in best.items()},
        "samples": samples,
    }


def quality_prompt_and_stream(model: LFM2AudioModel, chat: ChatState, positions: int) -> tuple[Any, Any]:
    """Turn-1 prompt embeddings and the float32 model's greedy interleaved stream of ``positions`` entries
    ((n, 8): a text token in column 0 and -1 elsewhere, or a frame's 8 codes), the pattern kept throughout."""
    cfg = model.config
    n_text, n_audio = cfg.interleaved_n_text, cfg.interleaved_n_audio
    with torch.inference_mode():
        emb = model.embed_inputs(**{k: chat[k] for k in INPUT_NAMES})
        cache = model.lfm.new_cache(1, emb.shape[1] + positions + 8)
        hidden, _ = model.lfm(emb, cache)
        h = hidden[:, -1]
        steps = torch.full((positions, 8), -1, dtype=torch.long)
        for i in range(positions):
            if i % (n_text + n_audio) < n_text:
                steps[i, 0] = model.text_logits(h).argmax(-1)[0]
                x = model.embed_text(steps[i, :1])
            else:
                steps[i] = model.sample_audio_frame(h)[0]
                x = model.embed_audio_frames(steps[i : i + 1])
            hidden, _ = model.lfm(x.view(1, 1, -1), cache)
            h = hidden[:, -1]
    return emb, steps


def turn2_suffix_positions(processor: LFM2AudioProcessor) -> int:
    """Positions that closing turn 1 and adding the README's user text turn 2 append."""
    chat = ChatState(processor, keep_cache=False)
    before = chat.modality_flag.shape[1]
    chat.end_turn()
    chat.new_turn("user")
    chat.add_text(TURN2_TEXT)
    chat.end_turn()
    chat.new_turn("assistant")
    return int(chat.modality_flag.shape[1] - before)


def turn2_inputs(
    processor: LFM2AudioProcessor, prompt: dict[str, torch.Tensor], turn1: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The five tensors of the README's turn 2: turn-1 prompt, its tokens appended, a user text turn."""
    chat = ChatState(processor, keep_cache=False)
    for name, value in prompt.items():
        setattr(chat, name, value.clone())
    text = [t for t in turn1 if t.numel() == 1]
    audio = [t for t in turn1 if t.numel() > 1]
    chat.append(
        text=torch.stack(text, 1) if text else torch.empty((1, 0), dtype=torch.long),
        audio_out=torch.stack(audio, 1) if audio else torch.empty((chat.codebooks, 0), dtype=torch.long),
        modality_flag=torch.tensor([LFMModality.TEXT if t.numel() == 1 else LFMModality.AUDIO_OUT for t in turn1]),
    )
    chat.end_turn()
    chat.new_turn("user")
    chat.add_text(TURN2_TEXT)
    chat.end_turn()
    chat.new_turn("assistant")
    return {k: chat[k] for k in INPUT_NAMES}


def time_turn2(
    model: LFM2AudioModel, inputs: dict[str, torch.Tensor], snapshot: ConversationCache, turn1_tokens: int, repeats: int
) -> dict[str, Any]:
    """First token of turn 2 with (a copy of) the kept conversation cache versus a full re-prefill."""
    kept, full, reused = [], [], 0
    for _ in range(repeats):  # alternating, so a burst of other jobs hits both sides alike
        cache = copy.deepcopy(snapshot)
        kept.append(time_first_token(model, {**inputs, "cache": cache}, 8))
        reused = cache.reused_positions
        if reused == 0:
            raise RuntimeError("turn 2 did not reuse the kept cache")
        full.append(time_first_token(model, inputs, 8))
    positions = int(inputs["modality_flag"].shape[1])
    return {
        "turn1_tokens": turn1_tokens,
        "positions": positions,
        "reused_positions": reused,
        "new_positions": positions - reused,
        "kept_ms": min(kept),
        "kept_samples_ms": kept,
        "full_ms": min(full),
        "full_samples_ms": full,
        "speedup": min(full) / min(kept),
    }


def quality(model: LFM2AudioModel, chat: ChatState, args: argparse.Namespace) -> dict[str, Any] | None:
    """Unquantized: write the teacher-forced reference; quantized: compare against it."""
    from safetensors.torch import load_file, save_file

    from lfm2audio.model.quantize_eval import compare, teacher_forced

    ref_file: Path = args.quality_ref
    if args.worker_quantize is None:
        emb, steps = quality_prompt_and_stream(model, chat, args.quality_positions)
        out = teacher_forced(model, emb, steps)
        save_file({"prompt": emb.contiguous(), "steps": steps, **out}, str(ref_file))
        return None
    ref = load_file(str(ref_file))
    steps = ref.pop("steps")
    prompt = ref.pop("prompt")
    return compare(teacher_forced(model, prompt, steps), ref, steps)


def turn2_section(
    model: LFM2AudioModel,
    processor: LFM2AudioProcessor,
    wave: torch.Tensor,
    prompt_positions: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Turn 1 for real with the kept cache, then the README's turn 2, at two lengths: after
    ``--turn1-tokens`` tokens, and after as many as give turn 2 the reference's 169 positions."""
    chat = turn1_state(processor, wave)
    prompt = {k: chat[k].clone() for k in INPUT_NAMES}
    suffix = turn2_suffix_positions(processor)
    to_reference = max(1, REFERENCE["turn2_positions"] - prompt_positions - suffix)
    stops = sorted({args.turn1_tokens, to_reference})
    tokens: list[torch.Tensor] = []
    snapshots: dict[int, ConversationCache] = {}
    assert chat.cache is not None
    for t in model.generate_interleaved(**chat, max_new_tokens=stops[-1]):
        tokens.append(t)
        if len(tokens) in stops:
            # The generator is suspended before it feeds this token, exactly where a turn of
            # max_new_tokens=len(tokens) would have stopped.
            snapshots[len(tokens)] = copy.deepcopy(chat.cache)
    snapshots.setdefault(len(tokens), copy.deepcopy(chat.cache))  # the turn ended early on <|im_end|>
    out: dict[str, Any] = {}
    for label, n in (("short", args.turn1_tokens), ("reference", to_reference)):
        n = min(n, len(tokens))
        inputs = turn2_inputs(processor, prompt, tokens[:n])
        out[label] = time_turn2(model, inputs, snapshots[n], n, args.repeats)
    return out


def run_worker(folder: Path, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[dtype_name]
    res: dict[str, Any] = {
        "dtype": dtype_name,
        "quantize": args.worker_quantize,
        "compiled": args.worker_compile,
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }
    res["rss_before_load_gb"] = peak_rss_gb()

    t0 = time.perf_counter()
    model = LFM2AudioModel.from_pretrained(
        folder, device="cpu", dtype=dtype, quantize=args.worker_quantize, compile=args.worker_compile
    )
    res["load_model_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    processor = LFM2AudioProcessor.from_pretrained(folder, device="cpu")
    res["load_processor_s"] = time.perf_counter() - t0
    res["load_s"] = res["load_model_s"] + res["load_processor_s"]
    res["peak_rss_load_gb"] = peak_rss_gb()
    res["vm_hwm_load_gb"] = vm_hwm_gb()
    res["weights_gb"] = weights_gb(model)
    res["peak_rss_load_over_weights"] = res["peak_rss_load_gb"] / res["weights_gb"]

    wave = synthetic_audio()
    # Turn 1: time to first token (audio encoding + prefill + first step). The first run warms up.
    chat = turn1_state(processor, wave, keep_cache=False)
    res["prompt_positions"] = int(chat.modality_flag.shape[1])
    res["first_token_cold_ms"] = time_first_token(model, dict(chat), 1)
    samples = [time_first_token(model, dict(chat), 1) for _ in range(args.repeats)]
    res["first_token_ms"] = min(samples)
    res["first_token_samples_ms"] = samples

    res.update(steady_state(model, chat, args.steps, args.warmup))

    if not args.skip_turns:
        res["turn2"] = turn2_section(model, processor, wave, res["prompt_positions"], args)

    chat = turn1_state(processor, wave, keep_cache=False)
    # The processor's Mimi is quantized as the model is (lfm2audio.codec.int8: int8 decoder weights in both modes).
    codec = random_codec() if args.worker_quantize is None else quantize_decoder_int8(random_codec())
    res["chat_rtf"] = chat_rtf(model, chat, codec, args.cycles)
    if args.quality_ref is not None:
        res["quality"] = quality(model, chat, args)
    res["peak_rss_end_gb"] = peak_rss_gb()
    res["vm_hwm_end_gb"] = vm_hwm_gb()
    res["loadavg_end"] = os.getloadavg()
    return res


# Driver ------------------------------------------------------------------------------------------------


def cpu_busy(interval: float = 1.0) -> float | None:
    """Fraction of the machine's CPU time spent busy over ``interval`` seconds (Linux /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet_cpu(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (at most ``max_wait_s``) until other jobs leave the CPU mostly idle; returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        busy = cpu_busy()
        if busy is None or busy < threshold:
            break
        print(f"  CPU {100 * busy:.0f}% busy with other jobs, waiting ...", flush=True)
        time.sleep(2.0)
    return time.perf_counter() - t0


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, dict[str, Any]], quick: bool) -> None:
    ref = REFERENCE
    names = list(results)
    cols = ["reference fp32" if not quick else "reference*", *names]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, ref_value: str, get: Any, spec: str) -> None:
        rows.append((label, [ref_value, *[fmt(get(results[n]), spec) for n in names]]))

    ref_ratio = ref["peak_rss_load_gb"] / 5.88
    row("load model + processor (s)", f"{ref['load_s']:.1f}", lambda r: r["load_s"], ".1f")
    row("peak RSS after load (GB)", f"{ref['peak_rss_load_gb']:.1f}", lambda r: r["peak_rss_load_gb"], ".2f")
    row("  weights in dtype (GB)", "5.88", lambda r: r["weights_gb"], ".2f")
    row("  peak RSS / weights", f"{ref_ratio:.2f}", lambda r: r["peak_rss_load_over_weights"], ".2f")
    row("prompt positions (turn 1)", str(ref["prompt_positions"]), lambda r: r["prompt_positions"], "d")
    row("first token, turn 1 (ms)", f"{ref['first_token_ms']:.0f}", lambda r: r["first_token_ms"], ".0f")
    for key, label in (("text_token_ms", "text token"), ("audio_frame_ms", "audio frame")):
        rows.append((f"{label} (ms, median (min))", [f"{ref[key]:.0f}"]
                     + [f"{results[n][key]['median']:.0f} ({results[n][key]['min']:.0f})" for n in names]))  # fmt: skip
    for label in ("short", "reference") if all("turn2" in results[n] for n in names) else ():
        first = results[names[0]]["turn2"][label]
        title = f"turn 2 after {first['turn1_tokens']} turn-1 tokens"
        is_ref = label == "reference"
        row(f"{title}: positions", str(ref["turn2_positions"]) if is_ref else "-",
            lambda r, k=label: r["turn2"][k]["positions"], "d")  # fmt: skip
        row("  full re-prefill (ms)", f"{ref['turn2_full_ms']:.0f}" if is_ref else "-",
            lambda r, k=label: r["turn2"][k]["full_ms"], ".0f")  # fmt: skip
        row("  kept cache: new positions", "-", lambda r, k=label: r["turn2"][k]["new_positions"], "d")
        row("  kept cache (ms)", "-", lambda r, k=label: r["turn2"][k]["kept_ms"], ".0f")
        row("  speed-up (x)", "-", lambda r, k=label: r["turn2"][k]["speedup"], ".1f")
    row("peak RSS at end (GB)", "-", lambda r: r["peak_rss_end_gb"], ".2f")
    first = results[names[0]]["chat_rtf"]
    rows.append((f"chat RTF, {first['text_per_cycle']} text + {first['frames_per_cycle']} frames + Mimi: best",
                 ["-", *[f"{results[n]['chat_rtf']['rtf_min']:.2f}" for n in names]]))  # fmt: skip
    row("  median", "-", lambda r: r["chat_rtf"]["rtf_median"], ".2f")
    row("  from the fastest text and audio step", "-", lambda r: r["chat_rtf"]["rtf_step_minima"], ".2f")
    row("  fastest text step (ms)", "-", lambda r: r["chat_rtf"]["text_step_ms_min"], ".0f")
    row("  fastest audio step incl. Mimi (ms)", "-", lambda r: r["chat_rtf"]["audio_step_ms_min"], ".0f")
    for part in ("backbone", "text_head", "depthformer", "decoder"):
        row(f"  best cycle: {part} (ms)", "-", lambda r, k=part: r["chat_rtf"]["best_cycle_ms"][k], ".0f")
    if any("quality" in results[n] for n in names):
        qual = {n: results[n].get("quality") for n in names}

        def qrow(label: str, key: str, spec: str) -> None:
            vals = [fmt(None if qual[n] is None else qual[n][key], spec) for n in names]
            rows.append((label, ["-", *vals]))

        positions = next(q["positions"] for q in qual.values() if q)
        rows.append((f"teacher-forced vs {names[0]}, {positions} positions:", ["", *[""] * len(names)]))
        qrow("  top-1 agreement (per position)", "top1", ".3f")
        qrow("  text top-1 agreement", "text_top1", ".3f")
        qrow("  audio code top-1 agreement", "audio_code_top1", ".3f")
        qrow("  text logits cosine (mean)", "text_logits_cos_mean", ".4f")
        qrow("  text logits cosine (min)", "text_logits_cos_min", ".4f")
        qrow("  text logits relative error", "text_logits_rel_err", ".3f")
        qrow("  depth logits cosine (mean)", "depth_logits_cos_mean", ".4f")
        qrow("  depth logits relative error", "depth_logits_rel_err", ".3f")
        rows.append(("  layer cosine (min over layers)", ["-", *[
            "-" if qual[n] is None else f"{min(qual[n]['layer_cos_mean']):.4f}" for n in names]]))  # fmt: skip
        rows.append(("  layer relative error (max)", ["-", *[
            "-" if qual[n] is None else f"{max(qual[n]['layer_rel_err']):.3f}" for n in names]]))  # fmt: skip

    width = max(len(label) for label, _ in rows) + 2
    print(f"{'':<{width}}" + "".join(f"{c:>16}" for c in cols))
    for label, values in rows:
        print(f"{label:<{width}}" + "".join(f"{v:>16}" for v in values))
    if quick:
        print("* --quick: small config; the reference figures are for the full-size model and are not comparable.")

    print("targets:")
    for n in names:
        r = results[n]
        checks = []
        for label in ("short", "reference") if "turn2" in r else ():
            t2 = r["turn2"][label]
            ok = "ok" if t2["speedup"] >= 3 else "MISS"
            checks.append(f"turn-2 speed-up at {t2['positions']} positions {t2['speedup']:.1f}x >= 3: {ok}")
        if n == ref["dtype"] and not r.get("quantize"):
            for key in ("text_token_ms", "audio_frame_ms"):
                ok = "ok" if r[key]["median"] <= ref[key] else "MISS"
                checks.append(f"{key} {r[key]['median']:.0f} <= {ref[key]:.0f}: {ok}")
        rtf = r["chat_rtf"]["rtf_min"]
        goal = {"int8": 1.2, "int4": 0.8}.get(r.get("quantize") or "")
        if goal is not None:
            checks.append(f"chat RTF (best cycle) {rtf:.2f} <= {goal}: {'ok' if rtf <= goal else 'MISS'}")
            floor = r["chat_rtf"]["rtf_step_minima"]
            checks.append(f"chat RTF (fastest steps) {floor:.2f} <= {goal}: {'ok' if floor <= goal else 'MISS'}")
            q = r.get("quality") or {}
            if r.get("quantize") == "int8" and q:
                cos = q["text_logits_cos_mean"]
                checks.append(f"text logits cosine {cos:.4f} >= 0.99: {'ok' if cos >= 0.99 else 'MISS'}")
        ratio = r["peak_rss_load_over_weights"]
        limit = 1.3 if r.get("quantize") else 1.25
        verdict = "ok" if ratio <= limit else "HIGH"
        checks.append(f"load {r['load_s']:.1f} s, peak RSS after load {ratio:.2f}x weights (<= {limit}: {verdict})")
        print(f"  {n}:\n    " + "\n    ".join(checks))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16, float16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="checkpoint folder to create or reuse")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model.json")
    ap.add_argument("--quick", action="store_true", help="small config (hidden 256, 4 layers) for a smoke test")
    ap.add_argument("--steps", type=int, default=12, help="timed steady-state steps per modality")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steady-state steps per modality")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each first-token timing (the best is kept)")
    ap.add_argument("--turn1-tokens", type=int, default=20, help="tokens generated in turn 1")
    ap.add_argument("--max-idle-wait", type=float, default=60.0,
                    help="seconds to wait at most for other jobs to leave the CPU idle before each dtype")  # fmt: skip
    ap.add_argument("--quantize", default="", help="comma-separated: int8, int4 (each also runs float32 beside it)")
    ap.add_argument("--compile", action="store_true",
                    help="also run each --quantize mode with compile=True (lfm2audio.model.compiled)")  # fmt: skip
    ap.add_argument("--skip-turns", action="store_true", help="skip the turn-2 (kept cache vs re-prefill) timings")
    ap.add_argument("--cycles", type=int, default=6, help="timed chat cycles (6 text + 12 frames = 0.96 s of audio)")
    ap.add_argument("--quality-positions", type=int, default=200, help="teacher-forced positions of the quality check")
    ap.add_argument("--make-checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-quantize", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quality-ref", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-dtype", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.make_checkpoint is not None:
        make_checkpoint(args.make_checkpoint, load_config_dict(args.quick))
        return
    if args.worker is not None:
        result = run_worker(args.worker, args.worker_dtype, args)
        args.worker_result.write_text(json.dumps(result))
        return

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    if any(q not in QUANTIZE_CHOICES for q in quantize):
        raise SystemExit(f"unknown --quantize {quantize}; choose from {QUANTIZE_CHOICES}")
    # (label, dtype, quantize, compiled): the unquantized runs first, the first of them is the quality reference.
    runs: list[tuple[str, str, str | None, bool]] = [(d, d, None, False) for d in dtypes]
    for q in quantize:
        runs.append((f"{q} ({dtypes[0]})", dtypes[0], q, False))
        if args.compile:
            runs.append((f"{q} compiled", dtypes[0], q, True))
    tmpdir = None
    if args.workdir is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="lfm2audio-bench-")
        folder = Path(tmpdir.name)
    else:
        folder = args.workdir
    try:
        # In its own process too: a child inherits its parent's peak RSS in ru_maxrss, so the parent stays small.
        cmd = [sys.executable, str(Path(__file__).resolve()), "--make-checkpoint", str(folder)]
        subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
        results: dict[str, dict[str, Any]] = {}
        quality_dir = tempfile.TemporaryDirectory()
        quality_ref = Path(quality_dir.name) / "quality_ref.safetensors"
        for i, (name, dtype_name, q, compiled) in enumerate(runs):
            with tempfile.TemporaryDirectory() as d:
                result_file = Path(d) / "result.json"
                cmd = [
                    sys.executable, str(Path(__file__).resolve()), "--worker", str(folder),
                    "--worker-dtype", dtype_name, "--worker-result", str(result_file), "--threads", str(args.threads),
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                    "--turn1-tokens", str(args.turn1_tokens), "--cycles", str(args.cycles),
                    "--quality-positions", str(args.quality_positions),
                ]  # fmt: skip
                if args.skip_turns:
                    cmd.append("--skip-turns")
                if q is not None:
                    cmd += ["--worker-quantize", q]
                if compiled:
                    cmd.append("--worker-compile")
                if quantize and (q is not None or i == 0):
                    cmd += ["--quality-ref", str(quality_ref)]
                print(f"running {name} ...", flush=True)
                waited = wait_for_quiet_cpu(args.max_idle_wait)
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True)
                results[name] = json.loads(result_file.read_text())
                results[name]["waited_for_quiet_cpu_s"] = waited
                print(f"  {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
        quality_dir.cleanup()
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()

    size = "quick (hidden 256, 4 layers)" if args.quick else "full size"
    print(f"\nLFM2-Audio {size}, random weights, CPU, {args.threads} threads, torch {torch.__version__}")
    print(
        "(the CPU is shared with other jobs: timings are noisy; first-token and turn-2 times are the best of "
        f"{args.repeats} runs)"
    )
    print_table(results, args.quick)
    meta = {
        "config": "quick" if args.quick else "full (golden manifest config_full.json)",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "audio_seconds": AUDIO_SECONDS,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "turn1_tokens": args.turn1_tokens,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "reference": REFERENCE, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
