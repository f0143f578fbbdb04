"""LFM2.5 audio detokenizer: golden parity, strict loading, input checks, streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from golden_chat import assert_close_golden
from safetensors.torch import load_file, save_file

from lfm2audio.codec.detokenizer import (
    LATENCY_SAMPLES,
    SAMPLES_PER_FRAME,
    AudioDetokenizer,
    CheckpointMismatchError,
    DetokenizerState,
    load_detokenizer,
)
from lfm2audio.config import LFM2Config, parse_section
from lfm2audio.model.lfm2 import LFM2Backbone

# Streaming vs whole-clip (after dropping the 480 leading zeros): documented bound.
STREAM_ATOL = 1e-6
STREAM_RTOL = 1e-5


@pytest.fixture(scope="module")
def detok_dir(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / "audio_detokenizer"


@pytest.fixture(scope="module")
def detok(detok_dir: Path) -> AudioDetokenizer:
    return load_detokenizer(detok_dir)


def _random_codes(batch: int, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (batch, 8, frames), generator=gen)


def _stream(detok: AudioDetokenizer, codes: torch.Tensor) -> torch.Tensor:
    """Frame-by-frame decode of (B, 8, T), flushed: (B, 480 + T * 1920)."""
    state = detok.stream_state(codes.shape[0])
    chunks = []
    for t in range(codes.shape[2]):
        pcm, state = detok.decode_step(codes[:, :, t], state)
        assert pcm.shape == (codes.shape[0], SAMPLES_PER_FRAME)
        chunks.append(pcm)
    chunks.append(detok.flush(state))
    return torch.cat(chunks, dim=1)


def _assert_stream_matches(stream: torch.Tensor, whole: torch.Tensor) -> None:
    assert stream.shape == (whole.shape[0], LATENCY_SAMPLES + whole.shape[1])
    assert torch.equal(stream[:, :LATENCY_SAMPLES], torch.zeros_like(stream[:, :LATENCY_SAMPLES]))
    torch.testing.assert_close(stream[:, LATENCY_SAMPLES:], whole, atol=STREAM_ATOL, rtol=STREAM_RTOL)


# ---- parity and construction ---------------------------------------------------------------------


def test_golden_wave(detok, golden, golden_index):
    assert detok.lin.weight.dtype == torch.float32 and detok.istft.window.dtype == torch.float32
    wave = detok.decode(golden["detok.codes"])
    assert_close_golden(wave, "detok.wave", golden, golden_index)


def test_batched_decode_equals_single(detok):
    codes = _random_codes(3, 7, seed=1)
    batch = detok.decode(codes)
    assert batch.shape == (3, 7 * SAMPLES_PER_FRAME)
    for b in range(3):
        torch.testing.assert_close(batch[b : b + 1], detok.decode(codes[b : b + 1]), atol=1e-6, rtol=1e-5)


def test_full_config_matches_manifest(golden_dir):
    cfg_data = json.loads((golden_dir / "manifest" / "detokenizer_config_full.json").read_text())
    manifest = json.loads((golden_dir / "manifest" / "detokenizer_state_dict.json").read_text())
    cfg = parse_section(LFM2Config, cfg_data, "detokenizer_config_full.json")
    with torch.device("meta"):
        model = AudioDetokenizer(cfg)
    got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    want = {t["name"]: (t["shape"], t["dtype"]) for t in manifest["tensors"]}
    assert got == want
    assert len(got) == manifest["count"]


def test_loaded_rope_matches_backbone(detok):
    # load_detokenizer rebuilds the non-persistent inv_freq itself; it must be the backbone's.
    fresh = LFM2Backbone(detok.cfg)
    assert torch.equal(detok.lfm.inv_freq, fresh.inv_freq)


def test_load_bf16(detok_dir, detok, golden):
    model = load_detokenizer(detok_dir, dtype=torch.bfloat16)
    assert model.lin.weight.dtype == torch.bfloat16 and model.emb.emb.weight.dtype == torch.bfloat16
    assert model.istft.window.dtype == torch.float32
    codes = golden["detok.codes"][:, :, :6]
    wave = model.decode(codes)
    assert wave.dtype == torch.float32 and torch.isfinite(wave).all()
    # The stored weights are bf16, so only the activations are rounded: loosely the float32 output.
    ref = detok.decode(codes)
    assert (wave - ref).abs().max() < 0.1 * ref.abs().max()


# ---- errors ------------------------------------------------------------------------------------


def test_state_dict_mismatch_is_reported(detok_dir, tmp_path):
    shutil.copy(detok_dir / "config.json", tmp_path / "config.json")
    sd = load_file(str(detok_dir / "model.safetensors"))
    del sd["lin.bias"]
    sd["lin.extra"] = torch.zeros(3)
    sd["lfm.embedding_norm.weight"] = torch.zeros(511, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_detokenizer(tmp_path)
    msg = str(err.value)
    assert "missing keys ['lin.bias']" in msg
    assert "unexpected keys ['lin.extra']" in msg
    assert "lfm.embedding_norm.weight: file [511], model [512]" in msg


@pytest.mark.parametrize(
    ("codes", "needle"),
    [
        (torch.zeros(1, 8, 4), "integer"),
        (torch.zeros(1, 8, 4, dtype=torch.bool), "integer"),
        (torch.zeros(1, 7, 4, dtype=torch.long), "shape"),
        (torch.zeros(8, 4, dtype=torch.long), "shape"),
        (torch.full((1, 8, 4), 2048), "end-of-audio"),
        (torch.full((1, 8, 4), -1), "[0, 2047]"),
    ],
)
def test_bad_codes_decode(detok, codes, needle):
    with pytest.raises(ValueError) as err:
        detok.decode(codes)
    assert needle in str(err.value)


def test_bad_codes_stream(detok):
    state = detok.stream_state(2)
    with pytest.raises(ValueError, match="shape"):
        detok.decode_step(torch.zeros(2, 8, 1, dtype=torch.long), state)
    with pytest.raises(ValueError, match="2 rows"):
        detok.decode_step(torch.zeros(3, 8, dtype=torch.long), state)
    with pytest.raises(ValueError, match="2047"):
        detok.decode_step(torch.full((2, 8), 5000), state)


# ---- streaming ---------------------------------------------------------------------------------


def test_stream_matches_whole_clip_golden(detok, golden):
    codes = golden["detok.codes"]  # 25 frames = 150 positions, well past the 30-position window
    _assert_stream_matches(_stream(detok, codes), detok.decode(codes))


def test_stream_single_frame(detok):
    codes = _random_codes(2, 1, seed=2)
    _assert_stream_matches(_stream(detok, codes), detok.decode(codes))


def test_stream_state_is_bounded(detok):
    codes = _random_codes(2, 50, seed=3)
    state = detok.stream_state(2)
    sizes = None
    chunks = []
    for t in range(50):
        pcm, state = detok.decode_step(codes[:, :, t], state)
        chunks.append(pcm)
        now = [tuple(x.shape) for x in state.tensors()]
        sizes = sizes or now
        assert now == sizes, f"state grew at frame {t}"
    assert sum(x.numel() for x in state.tensors()) == sum(
        x.numel() for x in detok.stream_state(2).tensors()
    )
    chunks.append(detok.flush(state))
    _assert_stream_matches(torch.cat(chunks, 1), detok.decode(codes))


def test_flush_does_not_change_state(detok):
    codes = _random_codes(1, 3, seed=4)
    state = detok.stream_state(1)
    for t in range(3):
        _, state = detok.decode_step(codes[:, :, t], state)
    before = [x.clone() for x in state.tensors()]
    detok.flush(state)
    assert all(torch.equal(a, b) for a, b in zip(before, state.tensors(), strict=True))
    assert torch.equal(detok.flush(detok.stream_state(2)), torch.zeros(2, LATENCY_SAMPLES))


def test_batched_streams_started_at_different_frames(detok):
    """Three streams in one batch, starting at steps 0, 3 and 5, each equal to itself decoded alone."""
    lengths, starts = [12, 9, 6], [0, 3, 5]
    streams = [_random_codes(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    filler = _random_codes(1, 20, seed=99)[0]  # what idle rows decode: must not leak into real streams
    state = detok.stream_state(3)
    out: list[list[torch.Tensor]] = [[] for _ in streams]
    for step in range(max(s + n for s, n in zip(starts, lengths, strict=True)) + 1):
        codes = filler[:, step].repeat(3, 1)
        for r, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            if step == s:
                state.reset_rows([r])
            if s <= step < s + n:
                codes[r] = streams[r][:, step - s]
        tail = detok.flush(state)
        pcm, state = detok.decode_step(codes, state)
        for r, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            if s <= step < s + n:
                out[r].append(pcm[r])
            elif step == s + n:
                out[r].append(tail[r])
    for r, codes in enumerate(streams):
        alone = _stream(detok, codes[None])[0]
        torch.testing.assert_close(torch.cat(out[r]), alone, atol=1e-6, rtol=1e-5)


def test_state_select_and_reset(detok):
    codes = _random_codes(3, 8, seed=5)
    state = detok.stream_state(3)
    for t in range(4):
        _, state = detok.decode_step(codes[:, :, t], state)
    sub = state.select([2, 0])
    assert isinstance(sub, DetokenizerState) and sub.batch_size == 2
    full = state.clone()
    for t in range(4, 8):
        a, sub = detok.decode_step(codes[[2, 0], :, t], sub)
        b, full = detok.decode_step(codes[:, :, t], full)
        torch.testing.assert_close(a, b[[2, 0]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(detok.flush(sub), detok.flush(full)[[2, 0]], atol=1e-6, rtol=1e-5)
    full.reset_rows([1])
    fresh = detok.stream_state(1)
    for x, y in zip(full.select([1]).tensors(), fresh.tensors(), strict=True):
        assert torch.equal(x, y)
