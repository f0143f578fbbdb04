"""Shared fixtures: the golden data of ../shared/golden (LFM2AUDIO_GOLDEN overrides)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(os.environ.get("LFM2AUDIO_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def _require_golden() -> Path:
    # Parity tests must run in CI, so a missing golden folder is an error, not a skip.
    if not (GOLDEN / "expected" / "golden.safetensors").exists():
        raise FileNotFoundError(f"golden data not found at {GOLDEN}; set LFM2AUDIO_GOLDEN")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _require_golden()


@pytest.fixture(scope="session")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(_require_golden() / "expected" / "golden.safetensors"))


@pytest.fixture(scope="session")
def golden_index() -> dict:
    return json.loads((_require_golden() / "expected" / "index.json").read_text())


@pytest.fixture(scope="session")
def checkpoint_dir() -> Path:
    return _require_golden() / "checkpoint"


@pytest.fixture(scope="session")
def checkpoint_tts_dir() -> Path:
    return _require_golden() / "checkpoint_tts"
