"""compile=True (lfm2audio.model.compiled): the compiled decode path against the eager one, on the tiny checkpoint.

Compiled kernels sum in another order, so the checks are closeness and agreement, not bit equality.
The int8 model is the one compile is for (and the one whose W8A8 layers need the custom op).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from golden_chat import INPUT_NAMES, build_state

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
from lfm2audio.model import quantize
from lfm2audio.model.compiled import FRAME_METHODS, compile_decode, have_cxx_compiler, is_compiled
from lfm2audio.model.quantize import W8A8Linear, w8a8_available
from lfm2audio.model.quantize_eval import stream_embeddings
from lfm2audio.sampling import RowSampling, SamplingParams

pytestmark = pytest.mark.skipif(not have_cxx_compiler(), reason="torch.compile on CPU needs a C++ compiler")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=-1)


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    eager = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu", dtype=torch.float32, quantize="int8")
    compiled = LFM2AudioModel.from_pretrained(
        checkpoint_dir, device="cpu", dtype=torch.float32, quantize="int8", compile=True
    )
    return eager, compiled


@pytest.mark.skipif(not w8a8_available(), reason="needs fbgemm (x86 builds of torch)")
def test_w8a8_layer_compiles_as_one_graph_and_leaves_no_weights_behind():
    """fullgraph=True raises at a graph break: without the custom op the packed weight breaks it."""
    g = torch.Generator().manual_seed(0)
    layer = W8A8Linear.from_float(torch.randn(48, 64, generator=g) * 0.05, torch.randn(48, generator=g) * 0.1)
    x = torch.randn(5, 64, generator=g)
    with torch.inference_mode():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=5e-3, rtol=0)
    key = layer.key
    assert quantize._w8a8_layers[key]() is layer
    twin = copy.deepcopy(layer)  # answers to a key of its own, and computes the same
    assert twin.key != key and quantize._w8a8_layers[twin.key]() is twin
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), eager, atol=0, rtol=0)
    del layer
    torch._dynamo.reset()  # the compiled graph holds the module too
    gc.collect()
    assert key not in quantize._w8a8_layers


def test_compile_is_opt_in_and_idempotent(models):
    eager, compiled = models
    assert not is_compiled(eager) and is_compiled(compiled)
    assert all(name not in vars(eager) for name in FRAME_METHODS)
    frame = compiled.sample_audio_frame
    assert compile_decode(compiled) is compiled and compiled.sample_audio_frame is frame


def test_compiled_backbone_steps_match_eager(models, golden):
    """Prefill with a cache (eager), then decode steps one position at a time (compiled)."""
    eager, compiled = models
    steps, prompt = golden["gen.inter.chat.steps"], golden["prefill.chat.embeddings"]
    with torch.inference_mode():
        x = stream_embeddings(eager, steps[:8]).reshape(8, 1, 1, -1)
        outs = []
        for model in (eager, compiled):
            cache = model.lfm.new_cache(1, prompt.shape[1] + 16)
            first, _ = model.lfm(prompt, cache)
            hs = [first[:, -1]] + [model.lfm(x[i], cache)[0][:, 0] for i in range(8)]
            outs.append(torch.cat(hs))
    cos = _cos(outs[1], outs[0])
    assert float(cos.min()) >= 0.999, cos


def test_compiled_seeded_frames_match_eager(models, golden):
    """The seeded frame (counter-based draws, as ``generate_*(seed=...)``), one row at a time: each new
    row count is another compilation (minutes), which is why compile is for one stream."""
    eager, compiled = models
    prompt = golden["prefill.chat.embeddings"]
    vocab = eager.config.audio_vocab_size
    with torch.inference_mode():
        hidden, _ = eager.lfm(prompt)
        same = []
        for i, h in enumerate(hidden[0, -6:]):
            draws = RowSampling.build([SamplingParams(temperature=0.8, top_k=8)], [i], [3], vocab, "cpu")
            frames = [m.sample_audio_frame_rows(h[None], draws) for m in (eager, compiled)]
            same.append((frames[0] == frames[1]).float().mean())
    assert float(torch.stack(same).mean()) >= 0.9, same


def test_compiled_model_generates_the_eager_chat_stream(models, checkpoint_dir, golden):
    """Greedy ``generate_interleaved``: the compiled backbone steps and greedy frames in the loop."""
    eager, compiled = models
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    chat = build_state(proc, "chat", golden["input.wave_user1"])
    streams = [list(m.generate_interleaved(**{k: chat[k] for k in INPUT_NAMES}, max_new_tokens=12)) for m in models]
    assert len(streams[1]) == 12 and any(t.numel() == 8 for t in streams[1])
    # The first steps agree exactly; later ones may drift apart after one argmax near a tie.
    assert [t.tolist() for t in streams[1][:4]] == [t.tolist() for t in streams[0][:4]]
    # Each compiled call is one graph: a break (a host read, an untraceable op) would cost speed and
    # print a warning on every new shape.
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert not breaks, dict(breaks)


def test_the_engine_refuses_a_compiled_model(models, checkpoint_dir):
    from lfm2audio.engine import Engine, EngineConfig

    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    with pytest.raises(ValueError, match="compile=True"):
        Engine(models[1], proc, EngineConfig(max_sessions=2))
