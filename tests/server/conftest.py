"""Server test fixtures: real engines on the tiny golden checkpoints, real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from rt_client import serve


@pytest.fixture(scope="session")
def engine(checkpoint_dir: Path):
    """The real engine on the tiny golden checkpoint (shared by the servers of the whole run)."""
    from lfm2audio.engine import Engine, EngineConfig

    eng = Engine.from_pretrained(checkpoint_dir, config=EngineConfig(max_sessions=8, max_context=2048))
    eng.start()
    eng.warmup()
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def tts_checkpoint(checkpoint_dir: Path, checkpoint_tts_dir: Path, tmp_path_factory) -> Path:
    """checkpoint/ with checkpoint_tts/'s weights, whose greedy TTS stream produces audio frames."""
    folder = tmp_path_factory.mktemp("tts_checkpoint")
    for p in checkpoint_dir.iterdir():
        if p.name not in ("model.safetensors", "config.json"):
            (folder / p.name).symlink_to(p)
    for name in ("model.safetensors", "config.json"):
        (folder / name).symlink_to(checkpoint_tts_dir / name)
    return folder


@pytest.fixture(scope="session")
def tts_engine(tts_checkpoint: Path):
    from lfm2audio.engine import Engine, EngineConfig

    eng = Engine.from_pretrained(tts_checkpoint, config=EngineConfig(max_sessions=4, max_context=2048))
    eng.start()
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
