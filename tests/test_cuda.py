"""CUDA only (skipped elsewhere; the CPU suite never depends on it): graphs and eager give the same streams."""

from __future__ import annotations

import pytest
import torch
from golden_chat import as_steps

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor, SamplingParams
from lfm2audio.engine import AudioFrame, Engine, EngineConfig, ResponseDone, SessionConfig, TextDelta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _streams(model, proc, golden, graphs: bool) -> list[torch.Tensor]:
    eng = Engine(model, proc, EngineConfig(max_sessions=4, cuda_graphs=graphs)).start()
    try:
        sessions = []
        for mode, extra in [("chat", {}), ("asr", {}), ("chat", {"seed": 5, "audio_sampling": SamplingParams(1.0, 4)})]:
            s = eng.open_session(SessionConfig(mode=mode, **extra))
            s.append_audio(golden["input.wave_user1"][0].numpy(), 16_000)
            s.commit_audio()
            s.create_response(max_output_tokens=60)
            sessions.append(s)
        out = []
        for s in sessions:
            tokens = []
            while not isinstance(ev := s.events.get(timeout=120), ResponseDone):
                if isinstance(ev, TextDelta):
                    tokens.append(torch.tensor([ev.token_id]))
                elif isinstance(ev, AudioFrame):
                    tokens.append(torch.tensor(ev.codes))
            out.append(as_steps(tokens))
        return out
    finally:
        eng.stop()


def test_cuda_graphs_and_eager_give_identical_streams(checkpoint_dir, golden):
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cuda", dtype=torch.float32)
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cuda")
    eager = _streams(model, proc, golden, graphs=False)
    graphs = _streams(model, proc, golden, graphs=True)
    for a, b in zip(eager, graphs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(eager[0], golden["gen.inter.chat.steps"])
