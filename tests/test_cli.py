"""The offline ``lfm2audio`` command line on the tiny golden checkpoints.

ASR and chat are checked against the golden greedy streams of the reference; ``download`` runs
against a local stand-in for the Hub (HF_ENDPOINT) and the downloaded model then loads offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from live_server import espeak

import lfm2audio_client.audio
from lfm2audio import wav as cli_wav
from lfm2audio.cli import main
from lfm2audio.wav import read_wav, write_wav

REPO_ROOT = Path(__file__).resolve().parents[1]


def _float_wav(path: Path, x: np.ndarray, rate: int) -> Path:
    """An IEEE-float WAV (exact samples) written by hand: the stdlib cannot write one."""
    import struct

    data = np.asarray(x, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    path.write_bytes(
        b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )  # fmt: skip
    return path


def _golden_text(golden: dict, name: str, checkpoint: Path) -> str:
    from lfm2audio.tokenizer import IncrementalDetokenizer, TextTokenizer

    steps, modality = golden[f"{name}.steps"], golden[f"{name}.modality"]
    detok = IncrementalDetokenizer(TextTokenizer.from_file(checkpoint))
    text = "".join(detok.push(int(s[0])) for s, m in zip(steps, modality, strict=True) if int(m) == 1)
    return text + detok.flush()


def test_asr_matches_the_golden_stream(tmp_path, golden, checkpoint_dir, capsys):
    wav = _float_wav(tmp_path / "user.wav", golden["input.wave_user1"][0].numpy(), 16_000)
    rc = main(
        ["asr", str(wav), "--model", str(checkpoint_dir), "--greedy", "--max-new-tokens", "60", "--device", "cpu"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out == _golden_text(golden, "gen.seq.asr", checkpoint_dir) + "\n"
    assert "60 text tokens" in out.err  # the progress line's summary


def test_chat_reply_matches_the_golden_stream(tmp_path, golden, checkpoint_dir, capsys):
    from lfm2audio import LFM2AudioProcessor

    wav = _float_wav(tmp_path / "user.wav", golden["input.wave_user1"][0].numpy(), 16_000)
    out_wav = tmp_path / "reply.wav"
    argv = ["chat", str(wav), "-o", str(out_wav), "--model", str(checkpoint_dir), "--greedy", "--max-new-tokens", "60"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out == _golden_text(golden, "gen.inter.chat", checkpoint_dir) + "\n"
    steps, modality = golden["gen.inter.chat.steps"], golden["gen.inter.chat.modality"]
    frames = steps[modality == 3]
    frames = frames[(frames < 2048).all(1)]
    assert f"{len(frames)} frames ({len(frames) * 0.08:.2f} s of audio)" in out.err
    # The default decoder of a checkpoint with audio_detokenizer/ is the detokenizer.
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    expected = proc.decode(frames.T.unsqueeze(0))[0].numpy()
    got, rate = read_wav(out_wav)
    assert rate == 24_000 and got.shape == (1, len(expected))
    assert np.abs(got[0] - np.clip(expected, -1, 1)).max() <= 1.5 / 32767


def test_chat_conversation_any_rate_and_mimi(tmp_path, checkpoint_dir, capsys):
    a = espeak("What is the capital of France?", tmp_path / "a.wav")  # 22050 Hz
    b = tmp_path / "b.wav"
    x, sr = read_wav(espeak("And of Spain?", tmp_path / "b0.wav", rate=44_100))
    write_wav(b, np.stack([x[0], 0.5 * x[0]]), sr)  # stereo 44.1 kHz
    out = tmp_path / "reply.wav"
    argv = ["chat", str(a), str(b), "-o", str(out), "--model", str(checkpoint_dir), "--max-new-tokens", "30"]
    assert main([*argv, "--decoder", "mimi", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "decoder mimi" in err
    for name in ("reply-1.wav", "reply-2.wav"):
        y, rate = read_wav(tmp_path / name)
        assert rate == 24_000 and y.shape[1] > 0 and y.shape[1] % 1920 == 0
        assert np.abs(y).max() > 0


def test_tts_writes_speech(tmp_path, tts_checkpoint_dir, golden, capsys):
    folder = tts_checkpoint_dir
    out = tmp_path / "out.wav"
    argv = ["tts", "The quick brown fox jumps over the lazy dog.", "--voice", "a calm female voice with clear diction."]
    rc = main([*argv, "-o", str(out), "--model", str(folder), "--greedy", "--max-new-tokens", "60"])
    err = capsys.readouterr().err
    assert rc == 0, err
    # gen_tts.seq.tts: the same prompt; its audio frames, end-of-audio frames dropped, make the file.
    steps, modality = golden["gen_tts.seq.tts.steps"], golden["gen_tts.seq.tts.modality"]
    frames = steps[modality == 3]
    n = int((frames < 2048).all(1).sum())
    y, rate = read_wav(out)
    assert rate == 24_000 and y.shape[1] == n * 1920 and n > 0
    assert f"{n} frames" in err and "wrote" in err


def test_errors_are_one_line(tmp_path, checkpoint_dir, capsys):
    assert main(["asr", str(tmp_path / "missing.wav"), "--model", str(checkpoint_dir)]) == 2
    assert "missing.wav" in capsys.readouterr().err
    (tmp_path / "bad.wav").write_bytes(b"not a wav at all")
    assert main(["asr", str(tmp_path / "bad.wav"), "--model", str(checkpoint_dir)]) == 2
    assert "not a WAV file" in capsys.readouterr().err
    wav = espeak("hi", tmp_path / "hi.wav")
    assert main(["asr", str(wav), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tts", "hello"])  # -o is required


# The offline CLI and the Python client each keep their own WAV reader (neither package depends on
# the other): both must read the same files.
@pytest.mark.parametrize("wav", [cli_wav, lfm2audio_client.audio], ids=["cli", "client"])
def test_wav_formats_round_trip(tmp_path, wav):
    import struct
    import wave

    read_wav, write_wav = wav.read_wav, wav.write_wav

    rng = np.random.default_rng(0)
    x = (rng.uniform(-0.9, 0.9, (2, 1000))).astype(np.float32)
    write_wav(tmp_path / "s16.wav", x, 32_000)
    y, sr = read_wav(tmp_path / "s16.wav")
    assert sr == 32_000 and y.shape == (2, 1000) and np.abs(y - x).max() < 1 / 16000
    # 24-bit WAVE_FORMAT_EXTENSIBLE (what many tools write), which Python 3.11's wave rejects.
    v = np.round(x.T.reshape(-1) * (2**23 - 1)).astype("<i4")
    data = b"".join(int(s).to_bytes(3, "little", signed=True) for s in v)
    guid = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 2, 8000, 8000 * 6, 6, 24, 22, 24, 3) + guid
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    (tmp_path / "s24.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    y, sr = read_wav(tmp_path / "s24.wav")
    assert sr == 8000 and y.shape == (2, 1000) and np.abs(y - x).max() < 1e-6
    # 8-bit unsigned.
    with wave.open(str(tmp_path / "u8.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(1), w.setframerate(11025)
        w.writeframes(bytes([0, 128, 255]))
    y, sr = read_wav(tmp_path / "u8.wav")
    assert sr == 11025 and np.allclose(y[0], [-1.0, 0.0, 127 / 128])
    y, sr = read_wav(_float_wav(tmp_path / "f32.wav", x[0], 48_000))
    assert sr == 48_000 and np.array_equal(y[0], x[0])


# download ----------------------------------------------------------------------------------------

REPO = "LiquidAI/Tiny-Audio"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(checkpoint_dir: Path) -> Iterator[str]:
    """The few Hub endpoints snapshot_download uses, serving checkpoint/ as REPO."""
    files = {str(p.relative_to(checkpoint_dir)): p for p in sorted(checkpoint_dir.rglob("*")) if p.is_file()}

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _json(self, obj: object) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, with_body: bool) -> None:
            name = self.path.split("?")[0].split(f"/{REPO}/resolve/", 1)[1].split("/", 1)[1]
            if name not in files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            data = files[name].read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("X-Repo-Commit", SHA)
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            if f"/{REPO}/resolve/" in self.path:
                return self._file(False)
            self.send_response(404)
            self.end_headers()

        def do_GET(self) -> None:
            if self.path.startswith(f"/api/models/{REPO}/tree/"):
                return self._json(
                    [
                        {
                            "type": "file",
                            "path": n,
                            "size": p.stat().st_size,
                            "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                        }
                        for n, p in files.items()
                    ]
                )
            if self.path.startswith(f"/api/models/{REPO}"):
                siblings = [{"rfilename": n, "size": p.stat().st_size} for n, p in files.items()]
                return self._json({"id": REPO, "sha": SHA, "siblings": siblings})
            if f"/{REPO}/resolve/" in self.path:
                return self._file(True)
            self.send_response(404)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm2audio.cli", *args],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_download_shows_progress_then_loads_offline(tmp_path, fake_hub, checkpoint_dir):
    env = {"HF_ENDPOINT": fake_hub, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    r = _cli(["download", REPO], {**env, "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 0, r.stderr
    snapshot = Path(r.stdout.strip().splitlines()[-1])
    assert snapshot.name == SHA and (snapshot / "audio_detokenizer" / "model.safetensors").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (snapshot / name).read_bytes() == (checkpoint_dir / name).read_bytes()
    n = sum(1 for p in checkpoint_dir.rglob("*") if p.is_file())
    assert f"{n} files, {n} to fetch" in r.stderr
    assert f"Fetching {n} files" in r.stderr and "100%" in r.stderr  # tqdm bars, even though stderr is a pipe

    # Offline, the repo id resolves through the cache (the Hub endpoint is gone).
    wav = espeak("Hello there.", tmp_path / "hello.wav")
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = _cli(["asr", str(wav), "--model", REPO, "--max-new-tokens", "8", "--greedy"], offline)
    assert r.returncode == 0, r.stderr
    assert f"loaded {REPO}" in r.stderr and "8 text tokens" in r.stderr

    r = _cli(["asr", str(wav), "--model", "LiquidAI/Not-Downloaded", "--max-new-tokens", "8"], offline)
    assert r.returncode == 2 and "lfm2audio download LiquidAI/Not-Downloaded" in r.stderr
