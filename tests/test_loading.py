"""Loading: the official layout loads; anything else fails with an error that says what is wrong."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
from lfm2audio.config import ConfigError, LFM2AudioConfig, read_json
from lfm2audio.loading import CheckpointError


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("audio_detokenizer"))
    return dst


def test_full_size_layout_matches_manifest(golden_dir):
    """The module built from the full config has exactly the official keys and shapes."""
    config = LFM2AudioConfig.from_file(golden_dir / "manifest" / "config_full.json")
    with torch.device("meta"):
        model = LFM2AudioModel(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    manifest = json.loads((golden_dir / "manifest" / "lfm2_audio_state_dict.json").read_text())
    official = {t["name"]: tuple(t["shape"]) for t in manifest["tensors"]}
    assert len(official) == manifest["count"]
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


def test_default_dtype_and_tied_weights(checkpoint_dir):
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu")
    assert model.dtype == torch.float32  # the CPU default
    for emb in model.depth_embeddings:
        assert emb.to_logits.weight is emb.embedding.weight
    assert model.codebook_offsets.dtype == torch.int64
    assert model.codebook_offsets.tolist() == [2049 * k for k in range(8)]
    bf16 = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    raw = load_file(str(checkpoint_dir / "model.safetensors"))
    assert torch.equal(bf16.lfm.embed_tokens.weight, raw["lfm.embed_tokens.weight"])


def test_missing_and_misshaped_keys(checkpoint_dir, tmp_path):
    folder = _copy_checkpoint(checkpoint_dir, tmp_path / "ckpt")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["depth_linear.bias"]
    weights["lfm.embedding_norm.weight"] = torch.ones(65, dtype=torch.bfloat16)
    weights["extra.weight"] = torch.zeros(2)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        LFM2AudioModel.from_pretrained(folder, device="cpu")
    msg = str(err.value)
    assert "missing keys: depth_linear.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "lfm.embedding_norm.weight: checkpoint (65,), model (64,)" in msg


def test_pickle_checkpoint_is_refused(checkpoint_dir, tmp_path):
    folder = _copy_checkpoint(checkpoint_dir, tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*safetensors only"):
        LFM2AudioModel.from_pretrained(folder, device="cpu")


def test_not_safetensors(checkpoint_dir, tmp_path):
    folder = _copy_checkpoint(checkpoint_dir, tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LFM2AudioModel.from_pretrained(folder, device="cpu")


def test_malformed_config(checkpoint_dir, tmp_path):
    folder = _copy_checkpoint(checkpoint_dir, tmp_path / "ckpt")
    (folder / "config.json").write_text('{"codebooks": 8,')
    with pytest.raises(ConfigError, match="malformed JSON"):
        LFM2AudioModel.from_pretrained(folder, device="cpu")
    with pytest.raises(ConfigError, match="malformed JSON"):
        LFM2AudioProcessor.from_pretrained(folder, device="cpu")


def test_missing_config_key_is_named(checkpoint_dir, tmp_path):
    folder = _copy_checkpoint(checkpoint_dir, tmp_path / "ckpt")
    config = read_json(folder / "config.json")
    del config["lfm"]["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json\['lfm'\]: missing required key\(s\) 'hidden_size'"):
        LFM2AudioModel.from_pretrained(folder, device="cpu")
    config["lfm"]["hidden_size"] = 64
    del config["depthformer"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="missing required key 'depthformer'"):
        LFM2AudioModel.from_pretrained(folder, device="cpu")


def test_unknown_config_key_warns(checkpoint_dir, tmp_path, caplog):
    folder = _copy_checkpoint(checkpoint_dir, tmp_path / "ckpt")
    config = read_json(folder / "config.json")
    config["brand_new_field"] = 1
    config["lfm"]["another_new_field"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="lfm2audio.config"):
        model = LFM2AudioModel.from_pretrained(folder, device="cpu")
    assert model.config.lfm.hidden_size == 64
    assert "brand_new_field" in caplog.text and "another_new_field" in caplog.text


def test_missing_folder_and_revision_on_folder(checkpoint_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        LFM2AudioModel.from_pretrained(tmp_path / "nope", device="cpu")
    with pytest.raises(ValueError, match="revision only applies to Hub repos"):
        LFM2AudioModel.from_pretrained(checkpoint_dir, revision="main", device="cpu")


def test_hub_cache_offline(checkpoint_dir, tmp_path, monkeypatch):
    """A repo id resolves through the Hugging Face cache, so HF_HUB_OFFLINE works once downloaded."""
    repo = tmp_path / "hub" / "models--LiquidAI--LFM2-Audio-1.5B"
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    _copy_checkpoint(checkpoint_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = LFM2AudioModel.from_pretrained("LiquidAI/LFM2-Audio-1.5B", device="cpu")
    assert model.config.lfm.hidden_size == 64
