"""Shared fixtures: the golden data of ../shared/golden (LFM2AUDIO_GOLDEN overrides), and the real engines
and servers on its tiny checkpoints that the server, client and browser tests share."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from live_server import serve, start_engine, tts_checkpoint
from safetensors.torch import load_file

GOLDEN = Path(os.environ.get("LFM2AUDIO_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))

# The voice-agent framework tests run in their own environment (.ci/run: .venv-frameworks), not here.
collect_ignore = ["frameworks"]


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


# Engines and servers ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine(checkpoint_dir: Path):
    """The real engine on the tiny golden checkpoint, shared by the servers of the whole run."""
    eng = start_engine(checkpoint_dir, max_sessions=8)
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def tts_checkpoint_dir(checkpoint_dir: Path, checkpoint_tts_dir: Path, tmp_path_factory) -> Path:
    """checkpoint/ with checkpoint_tts/'s weights, whose greedy TTS stream produces audio frames."""
    return tts_checkpoint(checkpoint_dir, checkpoint_tts_dir, tmp_path_factory.mktemp("tts_checkpoint"))


@pytest.fixture(scope="session")
def tts_engine(tts_checkpoint_dir: Path):
    eng = start_engine(tts_checkpoint_dir, max_sessions=4, warmup=False)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine):
    """A server with default settings (no auth) on the shared engine."""
    with serve(engine) as s:
        yield s


@pytest.fixture(scope="module")
def tts_server(tts_engine):
    with serve(tts_engine) as s:
        yield s
