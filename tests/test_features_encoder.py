"""Parity of the log-mel features, the conformer encoder and the audio adapter with the golden data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from golden_chat import assert_close_golden
from safetensors.torch import load_file

from lfm2audio.config import EncoderConfig, LFM2AudioConfig, parse_section
from lfm2audio.features import LogMelFeatures
from lfm2audio.model.adapter import AudioAdapter
from lfm2audio.model.conformer import ConformerEncoder


@pytest.fixture(scope="module")
def config(checkpoint_dir: Path) -> LFM2AudioConfig:
    return LFM2AudioConfig.from_file(checkpoint_dir / "config.json")


@pytest.fixture(scope="module")
def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir / "model.safetensors"))


def _submodule_state(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # Parameters are stored in bf16; the goldens were computed in float32 (bf16 -> fp32 is exact).
    return {
        k[len(prefix) :]: v.float() if v.is_floating_point() else v for k, v in weights.items() if k.startswith(prefix)
    }


@pytest.fixture(scope="module")
def features(config: LFM2AudioConfig) -> LogMelFeatures:
    return LogMelFeatures(config.preprocessor).eval()


@pytest.fixture(scope="module")
def encoder(config: LFM2AudioConfig, weights: dict[str, torch.Tensor]) -> ConformerEncoder:
    enc = ConformerEncoder(config.encoder).eval()
    enc.load_state_dict(_submodule_state(weights, "conformer."), strict=True)
    return enc


@pytest.fixture(scope="module")
def adapter(config: LFM2AudioConfig, weights: dict[str, torch.Tensor]) -> AudioAdapter:
    ad = AudioAdapter(config.encoder.d_model, config.lfm.hidden_size).eval()
    ad.load_state_dict(_submodule_state(weights, "audio_adapter."), strict=True)
    return ad


def test_mel_features(features, golden, golden_index):
    wave = golden["input.wave_user1"]
    feats, lengths = features(wave, torch.tensor([wave.shape[1]]))
    assert_close_golden(feats, "mel.features", golden, golden_index)
    assert_close_golden(lengths, "mel.length", golden, golden_index)


@pytest.mark.parametrize("case", ["full", "masked"])
@torch.no_grad()
def test_encoder_and_adapter(case, encoder, adapter, golden, golden_index):
    out, lengths = encoder(golden["mel.features"], golden[f"encoder.{case}.input_length"])
    assert_close_golden(out, f"encoder.{case}.output", golden, golden_index)
    assert_close_golden(lengths, f"encoder.{case}.lengths", golden, golden_index)
    frames = out[0, :, : lengths[0]].T
    assert_close_golden(adapter(frames), f"adapter.{case}.output", golden, golden_index)


@torch.no_grad()
def test_batch_of_different_lengths_matches_single(features, encoder, golden):
    long = golden["input.wave_user1"][0]
    short = long[5000:5000 + 17_123]  # not a multiple of the hop, nor of 8 frames
    batch = torch.zeros(2, long.numel())
    batch[0] = long
    batch[1, : short.numel()] = short
    sizes = torch.tensor([long.numel(), short.numel()])

    feats, frames = features(batch, sizes)
    out, out_lengths = encoder(feats, frames)
    for row, wave in enumerate([long, short]):
        f1, n1 = features(wave[None], torch.tensor([wave.numel()]))
        torch.testing.assert_close(feats[row, :, : f1.shape[-1]], f1[0], atol=1e-5, rtol=1e-5)
        assert torch.all(feats[row, :, f1.shape[-1] :] == 0.0)
        assert frames[row] == n1[0]

        o1, l1 = encoder(f1, n1)
        assert out_lengths[row] == l1[0] == math.ceil(n1[0].item() / 8)
        torch.testing.assert_close(out[row, :, : l1[0]], o1[0, :, : l1[0]], atol=1e-5, rtol=1e-5)


def test_bad_input_shapes(features, encoder):
    wave = torch.zeros(2, 1600)
    with pytest.raises(ValueError, match="wave must have shape"):
        features(torch.zeros(1600), torch.tensor([1600]))
    with pytest.raises(ValueError, match="wave must have shape"):
        features(torch.zeros(1, 1, 1600), torch.tensor([1600]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        features(wave, torch.tensor([1600]))
    with pytest.raises(ValueError, match="integer"):
        features(wave, torch.tensor([1600.0, 800.0]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        features(wave, torch.tensor([1601, 800]))

    feats = torch.zeros(2, 128, 40)
    with pytest.raises(ValueError, match=r"features must have shape \(batch, 128, frames\)"):
        encoder(torch.zeros(2, 40, 128), torch.tensor([40, 40]))
    with pytest.raises(ValueError, match="features must have shape"):
        encoder(torch.zeros(128, 40), torch.tensor([40]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        encoder(feats, torch.tensor([[40, 40]]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        encoder(feats, torch.tensor([41, 40]))


def test_full_size_names_match_manifest(golden_dir: Path):
    """The full-size encoder and adapter have exactly the checkpoint's key names and shapes."""
    full = json.loads((golden_dir / "manifest" / "config_full.json").read_text())
    manifest = json.loads((golden_dir / "manifest" / "lfm2_audio_state_dict.json").read_text())["tensors"]
    enc_cfg = parse_section(EncoderConfig, full["encoder"], "encoder")
    hidden = full["lfm"]["hidden_size"]
    with torch.device("meta"):
        modules = {"conformer.": ConformerEncoder(enc_cfg), "audio_adapter.": AudioAdapter(enc_cfg.d_model, hidden)}
    for prefix, module in modules.items():
        ours = {prefix + k: list(v.shape) for k, v in module.state_dict().items()}
        theirs = {t["name"]: t["shape"] for t in manifest if t["name"].startswith(prefix)}
        assert ours == theirs

