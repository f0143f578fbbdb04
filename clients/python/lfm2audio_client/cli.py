"""``lfm2audio-client``: talk to a running lfm2audio server from a terminal.

    lfm2audio-client chat question.wav -o reply.wav      # a spoken turn, the spoken reply
    lfm2audio-client chat --mic                          # hands-free with the microphone
    lfm2audio-client asr recording.wav                   # transcribe
    lfm2audio-client tts "Hello there." --voice "A calm female voice." -o hello.wav

The transcript streams to stdout; status lines go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lfm2audio_client.audio import OUTPUT_RATE, WavError, read_wav, to_mono, write_wav
from lfm2audio_client.live import converse, summary
from lfm2audio_client.realtime import DEFAULT_URL, RealtimeClient, Response, Sampling


def _output_path(base: str | None, i: int, n: int) -> Path | None:
    if base is None:
        return None
    p = Path(base)
    return p if n == 1 else p.with_name(f"{p.stem}-{i + 1}{p.suffix or '.wav'}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument(
        "--url",
        default=os.environ.get("LFM2AUDIO_URL", DEFAULT_URL),
        help=f"server WebSocket URL (env LFM2AUDIO_URL; default {DEFAULT_URL})",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("LFM2AUDIO_API_KEY"),
        help="API key, sent as 'Authorization: Bearer' (env LFM2AUDIO_API_KEY)",
    )
    g.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for one response (default 300)")
    g = common.add_argument_group("generation")
    g.add_argument("--instructions", help="system prompt (default: the mode's prompt)")
    g.add_argument("--voice", help="TTS voice description, e.g. 'A male speaker with a low-pitched voice.'")
    g.add_argument("--max-output-tokens", type=int, help="tokens per response (text tokens + audio frames)")
    g.add_argument("--text-temperature", type=float, help="0 is greedy (default: the server's mode default)")
    g.add_argument("--text-top-k", type=int)
    g.add_argument("--audio-temperature", type=float)
    g.add_argument("--audio-top-k", type=int)
    g.add_argument("--seed", type=int, help="seed of the session's sampler (reproducible replies)")
    g = common.add_argument_group("output")
    g.add_argument("-o", "--output", help="reply WAV (24 kHz, 16-bit); several turns write NAME-1.wav, NAME-2.wav, ...")
    g.add_argument("-q", "--quiet", action="store_true", help="no status lines on stderr")

    p = argparse.ArgumentParser(
        prog="lfm2audio-client",
        description="Talk to an lfm2audio server over its realtime WebSocket (/v1/realtime).",
    )
    sub = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, help_ in (("chat", "spoken conversation: audio in, text + audio out"), ("asr", "speech to text")):
        s = sub.add_parser(mode, parents=[common], help=help_, description=help_)
        s.add_argument("inputs", nargs="*", metavar="WAV", help="WAV files (any rate and channels), one turn each")
        s.add_argument(
            "--mic", action="store_true", help="hands-free with the microphone (needs sounddevice); Ctrl-C ends"
        )
        s.add_argument("--no-playback", action="store_true", help="with --mic: do not play replies")
    s = sub.add_parser("tts", parents=[common], help="text to speech", description="text to speech")
    s.add_argument("texts", nargs="+", metavar="TEXT", help="text to speak (several: one reply each)")
    return p


async def _run(args: argparse.Namespace) -> int:
    log = io.StringIO() if args.quiet else sys.stderr
    mode = args.mode
    inputs: list = list(getattr(args, "texts", None) or getattr(args, "inputs", None) or [])
    audio_in = []
    if mode != "tts":
        if getattr(args, "mic", False) and inputs:
            print("lfm2audio-client: give WAV files or --mic, not both", file=sys.stderr)
            return 2
        if not getattr(args, "mic", False) and not inputs:
            print("lfm2audio-client: give one or more WAV files, or --mic", file=sys.stderr)
            return 2
        for f in inputs:
            try:
                samples, rate = read_wav(f)
            except (OSError, WavError) as e:
                print(f"lfm2audio-client: {e}", file=sys.stderr)
                return 2
            audio_in.append((to_mono(samples), rate))

    client = await RealtimeClient.connect(args.url, api_key=args.api_key)
    async with client:
        await client.configure(
            mode=mode,
            instructions=args.instructions,
            voice=args.voice,
            max_output_tokens=args.max_output_tokens,
            text_sampling=Sampling(args.text_temperature, args.text_top_k),
            audio_sampling=Sampling(args.audio_temperature, args.audio_top_k),
            seed=args.seed,
            server_vad=bool(getattr(args, "mic", False)),
        )
        print(f"[connected to {args.url} · session {client.session.get('id')} · mode {mode}]", file=log, flush=True)

        if getattr(args, "mic", False):
            return await _live(client, args, log)

        n = len(inputs)
        for i in range(n):
            if mode == "tts":
                await client.add_text(inputs[i])
            else:
                samples, rate = audio_in[i]
                await client.send_audio(samples, rate)
                await client.commit()
            if mode == "chat":
                print("assistant: ", end="", flush=True)
            r = await client.respond(on_text=lambda d: print(d, end="", flush=True), timeout=args.timeout)
            print(flush=True)
            _finish(r, _output_path(args.output, i, n), mode, log)
            if r.status == "failed":
                return 1
    return 0


def _finish(r: Response, path: Path | None, mode: str, log) -> None:
    note = summary(r)
    if path is not None and mode != "asr":
        write_wav(path, r.audio, OUTPUT_RATE)
        note = note[:-1] + f" → {path}]"
    print(note, file=log, flush=True)


async def _live(client: RealtimeClient, args: argparse.Namespace, log) -> int:
    from lfm2audio_client.live import SpeakerPlayer, microphone

    player = None if args.no_playback or args.mode == "asr" else SpeakerPlayer()
    count = 0

    def save(r: Response) -> None:
        nonlocal count
        count += 1
        if args.output and args.mode != "asr" and r.chunks:
            p = Path(args.output)
            write_wav(p.with_name(f"{p.stem}-{count}{p.suffix or '.wav'}"), r.audio, OUTPUT_RATE)

    print("[listening: speak; Ctrl-C ends]", file=log, flush=True)
    try:
        await converse(client, microphone(), player=player, log=log, on_response=save)
    finally:
        if player is not None:
            player.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except RuntimeError as e:  # a RealtimeError (refused, lost, an error event), or e.g. no sounddevice for --mic
        print(f"lfm2audio-client: {e}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"lfm2audio-client: timed out: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
