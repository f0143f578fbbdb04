"""The liquid-audio README examples (multi-turn chat, ASR, TTS), run against lfm2audio.

Each example is the README's code with ``from liquid_audio import`` changed to
``from lfm2audio import``, the Hub repo replaced by the golden tiny checkpoint and
torchaudio replaced by the stdlib ``wave`` helpers below. The tiny random
weights make the text meaningless, so the tests check behaviour: the shape of
the token streams, reproducible seeded sampling, the kept cache across turns
and, when the Mimi codec is available, the decoded audio's length.

The TTS example runs on ``checkpoint_tts/`` (same weights with three rows nudged so
that greedy text reaches ``<|audio_start|>`` and audio frames follow).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from devices import DEVICE, DTYPE

from lfm2audio import ChatState, LFM2AudioModel, LFM2AudioProcessor, LFMModality

CHAT_SYSTEM = "Respond with interleaved text and audio."
CHAT_TURN2 = "My business specialized in chairs, can you give me something related to that?"
TTS_SYSTEM = (
    "Perform TTS.\nUse the following voice: A male speaker delivers his lines with a low-pitched voice and an "
    "animated tone. The recording is of excellent quality with almost no noise and a very close-sounding atmosphere."
)
TTS_TEXT = (
    "What is this obsession people have with books? They put them in their houses—like they're trophies. "
    "What do you need it for after you read it?"
)
MIMI_FRAME = 1920  # 24 kHz samples per 80 ms frame
END_OF_AUDIO = 2048


# torchaudio.load / torchaudio.save replacements ---------------------------------------------------


def save_wav(path: Path, waveform: torch.Tensor, sampling_rate: int) -> None:
    """Write (channels, samples) float audio in [-1, 1] as 16-bit PCM."""
    pcm = (waveform.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[0])
        f.setsampwidth(2)
        f.setframerate(sampling_rate)
        f.writeframes(pcm.T.contiguous().numpy().tobytes())


def load_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Read a 16-bit PCM wav as ((channels, samples) float32 in [-1, 1], sampling rate), like torchaudio.load."""
    with wave.open(str(path), "rb") as f:
        assert f.getsampwidth() == 2, "16-bit PCM only"
        channels, rate = f.getnchannels(), f.getframerate()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    pcm = torch.from_numpy(data.reshape(-1, channels).T.copy())
    return pcm.float() / 32768.0, rate


def mimi_or_none(processor: LFM2AudioProcessor):
    """``processor.mimi`` when our Mimi codec (lfm2audio.codec.mimi) imports and loads, else None."""
    try:
        import lfm2audio.codec.mimi  # noqa: F401

        return processor.mimi
    except Exception:  # the codec is still being written: stop at the token stream
        return None


def decode_and_save(processor: LFM2AudioProcessor, audio_out: list[torch.Tensor], path: Path) -> None:
    """The README's detokenization (dropping the last frame), checked and written to ``path`` when Mimi works."""
    mimi = mimi_or_none(processor)
    if mimi is None:
        return
    mimi_codes = torch.stack(audio_out[:-1], 1).unsqueeze(0)
    assert mimi_codes.shape == (1, 8, len(audio_out) - 1)
    assert int(mimi_codes.max()) < END_OF_AUDIO
    with torch.no_grad():
        waveform = mimi.decode(mimi_codes)[0]
    assert waveform.shape == (1, mimi_codes.shape[-1] * MIMI_FRAME)
    assert torch.isfinite(waveform).all()
    save_wav(path, waveform.cpu(), 24_000)
    back, rate = load_wav(path)
    assert rate == 24_000 and back.shape == waveform.shape


# Fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(checkpoint_dir: Path) -> LFM2AudioProcessor:
    return LFM2AudioProcessor.from_pretrained(checkpoint_dir, device=DEVICE).eval()


@pytest.fixture(scope="module")
def model(checkpoint_dir: Path) -> LFM2AudioModel:
    return LFM2AudioModel.from_pretrained(checkpoint_dir, device=DEVICE, dtype=DTYPE).eval()


@pytest.fixture(scope="module")
def model_tts(checkpoint_tts_dir: Path) -> LFM2AudioModel:
    return LFM2AudioModel.from_pretrained(checkpoint_tts_dir, device=DEVICE, dtype=DTYPE).eval()


@pytest.fixture(scope="module")
def question_wav(golden: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden 16 kHz input as a wav file (the README's assets/question.wav / asr.wav)."""
    path = tmp_path_factory.mktemp("audio") / "question.wav"
    save_wav(path, golden["input.wave_user1"], 16_000)
    return path


# Helpers for the chat example ---------------------------------------------------------------------


def chat_turn1_state(processor: LFM2AudioProcessor, question_wav: Path, *, keep_cache: bool = True) -> ChatState:
    chat = ChatState(processor, keep_cache=keep_cache)
    chat.new_turn("system")
    chat.add_text(CHAT_SYSTEM)
    chat.end_turn()
    chat.new_turn("user")
    wav, sampling_rate = load_wav(question_wav)
    chat.add_audio(wav, sampling_rate)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def start_turn2(chat: ChatState, text_out: list, audio_out: list, modality_out: list) -> None:
    chat.append(
        text=torch.stack(text_out, 1),
        audio_out=torch.stack(audio_out, 1),
        modality_flag=torch.tensor(modality_out),
    )
    chat.end_turn()
    chat.new_turn("user")
    chat.add_text(CHAT_TURN2)
    chat.end_turn()
    chat.new_turn("assistant")


def split_stream(tokens: list[torch.Tensor]) -> tuple[list, list, list]:
    """The README loop's text_out, audio_out and modality_out."""
    text_out, audio_out, modality_out = [], [], []
    for t in tokens:
        if t.numel() == 1:
            text_out.append(t)
            modality_out.append(LFMModality.TEXT)
        else:
            audio_out.append(t)
            modality_out.append(LFMModality.AUDIO_OUT)
    return text_out, audio_out, modality_out


def same_stream(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_token_stream(tokens: list[torch.Tensor]) -> None:
    assert tokens, "no tokens generated"
    assert all(isinstance(t, torch.Tensor) and t.numel() in (1, 8) for t in tokens)
    assert all(t.dtype == torch.long for t in tokens)


# The examples ---------------------------------------------------------------------------------------


def test_readme_asr(processor, model, question_wav, capsys):
    chat = ChatState(processor)
    chat.new_turn("system")
    chat.add_text("Perform ASR.")
    chat.end_turn()
    chat.new_turn("user")
    wav, sampling_rate = load_wav(question_wav)
    chat.add_audio(wav, sampling_rate)
    chat.end_turn()
    chat.new_turn("assistant")

    tokens = []
    for t in model.generate_sequential(**chat, max_new_tokens=512):
        tokens.append(t)
        if t.numel() == 1:
            print(processor.text.decode(t), end="", flush=True)

    printed = capsys.readouterr().out
    assert_token_stream(tokens)
    text_tokens = [t for t in tokens if t.numel() == 1]
    assert text_tokens, "ASR produced no text"
    assert isinstance(printed, str) and printed
    assert printed == "".join(processor.text.decode(t) for t in text_tokens)


def test_readme_chat_two_turns(processor, model, question_wav, tmp_path, capsys):
    chat = chat_turn1_state(processor, question_wav)
    sampling = dict(max_new_tokens=60, audio_temperature=1.0, audio_top_k=4)

    turn1 = []
    for t in model.generate_interleaved(**chat, **sampling, generator=torch.Generator().manual_seed(1234)):
        turn1.append(t)
        if t.numel() == 1:
            print(processor.text.decode(t), end="", flush=True)
    assert_token_stream(turn1)
    text_out, audio_out, modality_out = split_stream(turn1)
    assert text_out and audio_out
    assert isinstance(processor.text.decode(torch.cat(text_out)), str)
    assert capsys.readouterr().out == "".join(processor.text.decode(t) for t in text_out)

    # Seeded sampling: the same seed repeats the stream, another seed changes it.
    again = chat_turn1_state(processor, question_wav)
    repeat = list(model.generate_interleaved(**again, **sampling, generator=torch.Generator().manual_seed(1234)))
    assert same_stream(repeat, turn1)
    other = chat_turn1_state(processor, question_wav)
    different = list(model.generate_interleaved(**other, **sampling, generator=torch.Generator().manual_seed(4321)))
    assert not same_stream(different, turn1)

    decode_and_save(processor, audio_out, tmp_path / "answer1.wav")

    prompt_len = chat.modality_flag.shape[1]
    start_turn2(chat, text_out, audio_out, modality_out)
    turn2_audio = []
    turn2 = []
    for t in model.generate_interleaved(**chat, **sampling, generator=torch.Generator().manual_seed(99)):
        turn2.append(t)
        if t.numel() == 1:
            print(processor.text.decode(t), end="", flush=True)
        else:
            turn2_audio.append(t)
    assert_token_stream(turn2)
    assert turn2_audio
    # Turn 2 prefilled only what turn 1 did not already feed the backbone.
    assert chat.cache is not None
    assert 0 < chat.cache.reused_positions <= prompt_len + len(turn1)
    assert chat.cache.reused_positions >= prompt_len + len(turn1) - 1

    decode_and_save(processor, turn2_audio, tmp_path / "answer2.wav")


def test_readme_tts(processor, model_tts, tmp_path):
    def tts_state() -> ChatState:
        chat = ChatState(processor)
        chat.new_turn("system")
        chat.add_text(TTS_SYSTEM)
        chat.end_turn()
        chat.new_turn("user")
        chat.add_text(TTS_TEXT)
        chat.end_turn()
        chat.new_turn("assistant")
        return chat

    def run(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return list(
            model_tts.generate_sequential(
                **tts_state(), max_new_tokens=60, audio_temperature=0.8, audio_top_k=64, generator=gen
            )
        )

    tokens = run(7)
    assert_token_stream(tokens)
    audio_out: list[torch.Tensor] = [t for t in tokens if t.numel() > 1]
    assert len(audio_out) >= 2, "the TTS checkpoint should reach <|audio_start|> and emit frames"
    first_audio = next(i for i, t in enumerate(tokens) if t.numel() > 1)
    assert int(tokens[first_audio - 1]) == processor.text.token_to_id("<|audio_start|>")
    assert same_stream(run(7), tokens)
    assert not same_stream(run(8), tokens)

    decode_and_save(processor, audio_out, tmp_path / "tts.wav")


def test_edited_history_falls_back_to_full_prefill(processor, model, question_wav):
    """Dropping an audio frame the cache already consumed: turn 2 re-prefills and matches a cache-free run."""
    chat = chat_turn1_state(processor, question_wav)
    turn1 = list(model.generate_interleaved(**chat, max_new_tokens=20))
    text_out, audio_out, modality_out = split_stream(turn1)
    # The stream ends on text, so its last audio frame was fed back: editing it breaks the cached prefix.
    assert turn1[-1].numel() == 1 and len(audio_out) >= 2
    last_audio = max(i for i, m in enumerate(modality_out) if m == LFMModality.AUDIO_OUT)
    edited_modality = modality_out[:last_audio] + modality_out[last_audio + 1 :]

    start_turn2(chat, text_out, audio_out[:-1], edited_modality)
    kept = list(model.generate_interleaved(**chat, max_new_tokens=30))
    assert chat.cache is not None and chat.cache.reused_positions == 0

    fresh = chat_turn1_state(processor, question_wav, keep_cache=False)
    start_turn2(fresh, text_out, audio_out[:-1], edited_modality)
    assert "cache" not in dict(fresh)
    reference = list(model.generate_interleaved(**fresh, max_new_tokens=30))
    assert_token_stream(kept)
    assert same_stream(kept, reference)
