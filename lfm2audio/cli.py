"""``lfm2audio``: offline speech recognition, speech synthesis and spoken chat on this machine.

    lfm2audio asr recording.wav
    lfm2audio tts "What is this obsession people have with books?" --voice "A calm female voice." -o out.wav
    lfm2audio chat question.wav -o reply.wav
    lfm2audio download LiquidAI/LFM2-Audio-1.5B

``--model`` takes a Hub repo id (through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` once
downloaded) or a local folder in the official layout. Text goes to stdout as it is generated;
progress and timings go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

DEFAULT_MODEL = "LiquidAI/LFM2-Audio-1.5B"
OUTPUT_RATE = 24_000
FRAME_SECONDS = 0.08
END_OF_AUDIO = 2048

PROMPTS = {
    "asr": "Perform ASR.",
    "chat": "Respond with interleaved text and audio.",
    "tts": "Perform TTS.",
}
# liquid-audio's recommended sampling: text greedy; audio (temperature, top_k) per mode.
AUDIO_SAMPLING = {"chat": (1.0, 4), "tts": (0.8, 64), "asr": (None, None)}


class CliError(Exception):
    """A problem to report in one line (exit status 2)."""


# Progress -----------------------------------------------------------------------------------------


class Progress:
    """Frames and text tokens on stderr: a live line on a terminal, a line a second otherwise."""

    def __init__(self, out: TextIO, *, enabled: bool = True, interval: float | None = None) -> None:
        self.out = out
        self.enabled = enabled
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.1 if self.tty else 1.0)
        self.frames = 0
        self.tokens = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def update(self, *, frames: int = 0, tokens: int = 0) -> None:
        self.frames += frames
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._show(final=False)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        audio = self.frames * FRAME_SECONDS
        speed = f", {audio / elapsed:.2f}x real time" if elapsed > 0 and self.frames else ""
        return f"{self.frames} frames ({audio:.2f} s of audio), {self.tokens} text tokens, {elapsed:.1f} s{speed}"

    def _show(self, *, final: bool) -> None:
        if self.tty:
            end = "\n" if final else ""
            self.out.write(f"\r\x1b[2K[{self.line()}]{end}")
        else:
            self.out.write(f"[{self.line()}]\n")
        self.out.flush()
        self._shown = True

    def finish(self) -> None:
        if self.enabled:
            self._show(final=True)


# Loading ------------------------------------------------------------------------------------------


@dataclass
class Loaded:
    model: Any
    processor: Any
    device: Any
    decoder: str  # "detokenizer" | "mimi"


def load(args: argparse.Namespace) -> Loaded:
    import torch

    from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
    from lfm2audio.model.compiled import NoCompilerError

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    t0 = time.monotonic()
    try:
        processor = LFM2AudioProcessor.from_pretrained(
            args.model, revision=args.revision, device=args.device, quantize=args.quantize
        ).eval()
        model = LFM2AudioModel.from_pretrained(
            args.model, revision=args.revision, device=args.device, dtype=dtype, quantize=args.quantize,
            compile=args.compile,
        ).eval()
    except Exception as e:
        if type(e).__module__.startswith("huggingface_hub"):  # not in the cache, and offline or no network
            raise CliError(
                f"cannot load {args.model!r}: {e}\n(download it first with `lfm2audio download {args.model}`, "
                "or pass --model /path/to/folder)"
            ) from None
        if isinstance(e, FileNotFoundError | NoCompilerError):
            raise CliError(str(e)) from None
        raise
    decoder = args.decoder
    if decoder == "auto":
        decoder = "detokenizer" if processor.detokenizer_path is not None else "mimi"
    if decoder == "detokenizer" and processor.detokenizer_path is None:
        raise CliError(f"{args.model} has no LFM2.5 audio detokenizer (audio_detokenizer/); use --decoder mimi")
    if decoder == "mimi" and processor.mimi_path is None:
        raise CliError(f"{args.model} has no Mimi weights; use --decoder detokenizer")
    device = next(model.parameters()).device
    if not args.quiet:
        print(f"[loaded {args.model} on {device} in {time.monotonic() - t0:.1f} s; decoder {decoder}]", file=sys.stderr)
    return Loaded(model, processor, device, decoder)


def decode_audio(loaded: Loaded, frames: list[Any]) -> Any:
    """Audio frames (8 codes each) -> 24 kHz float32 numpy waveform; end-of-audio frames are dropped."""
    import numpy as np
    import torch

    frames = [f for f in frames if not bool((f >= END_OF_AUDIO).any())]
    if not frames:
        return np.zeros(0, dtype=np.float32)
    codes = torch.stack(frames, 1).unsqueeze(0).to(loaded.device)  # (1, 8, T)
    # no_grad, not inference_mode: Mimi loads on first use, and its quantizer's weight cache reads
    # tensor version counters, which inference tensors do not have.
    with torch.no_grad():
        if loaded.decoder == "detokenizer":
            wave = loaded.processor.decode(codes)
        else:
            wave = loaded.processor.mimi.decode(codes)
    return wave.reshape(-1).float().cpu().numpy()


# Generation ---------------------------------------------------------------------------------------


def read_audio(path: str) -> tuple[Any, int]:
    from lfm2audio.wav import WavError, read_wav

    try:
        return read_wav(path)
    except (OSError, WavError) as e:
        raise CliError(str(e)) from None


def sampling_kwargs(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    audio_t, audio_k = AUDIO_SAMPLING[mode]
    if args.greedy:
        return {"text_temperature": None, "text_top_k": None, "audio_temperature": None, "audio_top_k": None}
    return {
        "text_temperature": args.text_temperature,
        "text_top_k": args.text_top_k,
        "audio_temperature": audio_t if args.audio_temperature is None else args.audio_temperature,
        "audio_top_k": audio_k if args.audio_top_k is None else args.audio_top_k,
    }


@dataclass
class Turn:
    text: str = ""
    text_tokens: list[Any] = field(default_factory=list)
    audio_frames: list[Any] = field(default_factory=list)
    modality: list[int] = field(default_factory=list)


def run_turn(loaded: Loaded, chat: Any, args: argparse.Namespace, mode: str, *, interleaved: bool) -> Turn:
    """Generate one assistant turn: print text as it comes, count frames on stderr."""
    import torch

    from lfm2audio import LFMModality
    from lfm2audio.tokenizer import IncrementalDetokenizer

    gen = None
    if args.seed is not None:
        gen = torch.Generator(device=loaded.device).manual_seed(args.seed)
    detok = IncrementalDetokenizer(loaded.processor.text)
    progress = Progress(sys.stderr, enabled=not args.quiet)
    turn = Turn()
    generate = loaded.model.generate_interleaved if interleaved else loaded.model.generate_sequential
    stream = generate(**chat, max_new_tokens=args.max_new_tokens, generator=gen, **sampling_kwargs(args, mode))
    with torch.inference_mode():
        for t in stream:
            if t.numel() == 1:
                turn.text_tokens.append(t)
                turn.modality.append(int(LFMModality.TEXT))
                delta = detok.push(int(t))
                if delta and mode != "tts":
                    turn.text += delta
                    print(delta, end="", flush=True)
                progress.update(tokens=1)
            else:
                turn.audio_frames.append(t)
                turn.modality.append(int(LFMModality.AUDIO_OUT))
                progress.update(frames=0 if bool((t >= END_OF_AUDIO).any()) else 1)
    tail = detok.flush()
    if tail and mode != "tts":
        turn.text += tail
        print(tail, end="", flush=True)
    if turn.text and mode != "tts":
        print(flush=True)
    progress.finish()
    return turn


def new_chat(loaded: Loaded, system: str) -> Any:
    from lfm2audio import ChatState

    chat = ChatState(loaded.processor)
    chat.new_turn("system")
    chat.add_text(system)
    chat.end_turn()
    return chat


def output_path(base: str | None, i: int, n: int) -> Path | None:
    if base is None:
        return None
    p = Path(base)
    return p if n == 1 else p.with_name(f"{p.stem}-{i + 1}{p.suffix or '.wav'}")


def save(loaded: Loaded, turn: Turn, path: Path | None, quiet: bool) -> None:
    from lfm2audio.wav import write_wav

    if path is None:
        return
    wave = decode_audio(loaded, turn.audio_frames)
    write_wav(path, wave, OUTPUT_RATE)
    if not quiet:
        note = "" if len(wave) else " (the model generated no audio; try more --max-new-tokens)"
        print(f"[wrote {path}: {len(wave) / OUTPUT_RATE:.2f} s{note}]", file=sys.stderr)


def cmd_asr(args: argparse.Namespace) -> int:
    audio = [read_audio(f) for f in args.inputs]
    loaded = load(args)
    for samples, rate in audio:
        chat = new_chat(loaded, args.system or PROMPTS["asr"])
        chat.new_turn("user")
        chat.add_audio(samples, rate)
        chat.end_turn()
        chat.new_turn("assistant")
        turn = run_turn(loaded, chat, args, "asr", interleaved=False)
        if not turn.text:
            print(flush=True)
    return 0


def cmd_tts(args: argparse.Namespace) -> int:
    loaded = load(args)
    system = args.system or PROMPTS["tts"] + (f"\nUse the following voice: {args.voice}" if args.voice else "")
    n = len(args.texts)
    for i, text in enumerate(args.texts):
        chat = new_chat(loaded, system)
        chat.new_turn("user")
        chat.add_text(text)
        chat.end_turn()
        chat.new_turn("assistant")
        turn = run_turn(loaded, chat, args, "tts", interleaved=False)
        save(loaded, turn, output_path(args.output, i, n), args.quiet)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    audio = [read_audio(f) for f in args.inputs]
    loaded = load(args)
    chat = new_chat(loaded, args.system or PROMPTS["chat"])
    n = len(audio)
    for i, (samples, rate) in enumerate(audio):
        chat.new_turn("user")
        chat.add_audio(samples, rate)
        chat.end_turn()
        chat.new_turn("assistant")
        turn = run_turn(loaded, chat, args, "chat", interleaved=True)
        save(loaded, turn, output_path(args.output, i, n), args.quiet)
        if i + 1 < n:  # the conversation goes on: the reply becomes history
            text = torch.stack(turn.text_tokens, 1) if turn.text_tokens else torch.empty((1, 0), dtype=torch.long)
            frames = torch.stack(turn.audio_frames, 1) if turn.audio_frames else torch.empty((8, 0), dtype=torch.long)
            chat.append(text=text, audio_out=frames, modality_flag=torch.tensor(turn.modality, dtype=torch.long))
            chat.end_turn()
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()

    class Bar(tqdm):  # a plain tqdm is always shown (the Hub's own hides itself when stderr is not a terminal)
        def __init__(self, *a: Any, **kw: Any) -> None:
            kw.pop("name", None)
            kw.setdefault("file", sys.stderr)
            kw.setdefault("mininterval", 0.1 if tty else 1.0)
            kw["disable"] = False
            super().__init__(*a, **kw)

    class Silent(tqdm):  # the dry run's own file count is noise
        def __init__(self, *a: Any, **kw: Any) -> None:
            kw.pop("name", None)
            kw["disable"] = True
            super().__init__(*a, **kw)

    target = args.local_dir or "the Hugging Face cache"
    print(f"[downloading {args.model} to {target}]", file=sys.stderr, flush=True)
    try:
        try:
            plan = snapshot_download(
                args.model, revision=args.revision, local_dir=args.local_dir, dry_run=True, tqdm_class=Silent
            )
        except TypeError:  # huggingface_hub before 1.0 has no dry run
            plan = None
        if isinstance(plan, list):
            todo = [f for f in plan if f.will_download]
            size = sum(f.file_size or 0 for f in todo)
            print(f"[{len(plan)} files, {len(todo)} to fetch ({size / 1e6:.1f} MB)]", file=sys.stderr, flush=True)
        path = snapshot_download(args.model, revision=args.revision, local_dir=args.local_dir, tqdm_class=Bar)
    except Exception as e:
        if type(e).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise CliError(f"download of {args.model!r} failed: {type(e).__name__}: {e}") from None
        raise
    print(path)
    return 0


# Command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument(
        "--model",
        default=os.environ.get("LFM2AUDIO_MODEL", DEFAULT_MODEL),
        help=f"Hub repo id or local folder (env LFM2AUDIO_MODEL; default {DEFAULT_MODEL})",
    )
    g.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    g.add_argument("--device", help="torch device (default cuda when available, else cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default bfloat16 on CUDA, else float32")
    g.add_argument("--quantize", choices=["int8", "int4"], help="int8 or int4 model, int8 Mimi decoder (CPU)")
    g.add_argument(
        "--compile", action="store_true",
        help="torch.compile the backbone and depthformer: faster steps after a compile on first use (minutes)",
    )  # fmt: skip
    g = common.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512, help="text tokens + audio frames per turn (default 512)")
    g.add_argument("--system", help="system prompt (default: the mode's prompt)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding of text and audio")
    g.add_argument("--text-temperature", type=float, help="default greedy")
    g.add_argument("--text-top-k", type=int)
    g.add_argument("--audio-temperature", type=float, help="default 1.0 (chat), 0.8 (tts)")
    g.add_argument("--audio-top-k", type=int, help="default 4 (chat), 64 (tts)")
    g.add_argument("--seed", type=int, help="seed of the sampler")
    g.add_argument(
        "--decoder",
        choices=["auto", "detokenizer", "mimi"],
        default="auto",
        help="audio decoder (auto: the LFM2.5 detokenizer when the checkpoint has one, else Mimi)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    p = argparse.ArgumentParser(prog="lfm2audio", description="LFM2-Audio on this machine: ASR, TTS and spoken chat.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("asr", parents=[common], help="transcribe WAV files", description="Transcribe WAV files.")
    s.add_argument("inputs", nargs="+", metavar="WAV", help="WAV files (any rate and channel count)")
    s.set_defaults(func=cmd_asr)

    s = sub.add_parser("tts", parents=[common], help="speak text", description="Speak text into a WAV file.")
    s.add_argument("texts", nargs="+", metavar="TEXT", help="text to speak (several: one file each)")
    s.add_argument("--voice", help="voice description, e.g. 'A male speaker with a low-pitched voice.'")
    s.add_argument("-o", "--output", required=True, help="output WAV (24 kHz, 16-bit); several texts: NAME-N.wav")
    s.set_defaults(func=cmd_tts)

    s = sub.add_parser("chat", parents=[common], help="answer spoken questions", description="A spoken conversation.")
    s.add_argument("inputs", nargs="+", metavar="WAV", help="the user's turns, one WAV each (a conversation)")
    s.add_argument("-o", "--output", help="reply WAV (24 kHz, 16-bit); several turns: NAME-N.wav")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("download", help="download a model", description="Download a model from the Hugging Face Hub.")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"Hub repo id (default {DEFAULT_MODEL})")
    s.add_argument("--revision", help="branch, tag or commit")
    s.add_argument("--local-dir", help="download into this folder instead of the Hugging Face cache")
    s.set_defaults(func=cmd_download)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        print("lfm2audio: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except CliError as e:
        print(f"lfm2audio: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
