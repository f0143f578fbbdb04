"""Parity of the whole model with the reference (liquid-audio 1.3.0) on the golden checkpoints."""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, DTYPE
from golden_chat import INPUT_NAMES, TURN2_TEXT, as_steps, assert_close_golden, build_state

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor, LFMModality
from lfm2audio.model.lfm2 import ContextFullError

KINDS = ["asr", "chat", "tts"]


@pytest.fixture(scope="module")
def proc(checkpoint_dir):
    return LFM2AudioProcessor.from_pretrained(checkpoint_dir, device=DEVICE)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return LFM2AudioModel.from_pretrained(checkpoint_dir, device=DEVICE, dtype=DTYPE)


@pytest.fixture(scope="module")
def model_tts(checkpoint_tts_dir):
    return LFM2AudioModel.from_pretrained(checkpoint_tts_dir, device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("kind", KINDS)
def test_chat_state_tensors(proc, golden, golden_index, kind):
    chat = build_state(proc, kind, golden["input.wave_user1"])
    for name in INPUT_NAMES:
        assert_close_golden(getattr(chat, name), f"state.{kind}.{name}", golden, golden_index)


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_and_backbone(proc, model, golden, golden_index, kind):
    # The reference's own state tensors: our features are checked against theirs in test_chat_state_tensors,
    # where a few bf16 roundings may legitimately differ on another CPU; this checks the model alone.
    with torch.inference_mode():
        emb = model.embed_inputs(**{k: golden[f"state.{kind}.{k}"] for k in INPUT_NAMES})
        assert_close_golden(emb, f"prefill.{kind}.embeddings", golden, golden_index)
        hidden, _ = model.lfm(golden[f"prefill.{kind}.embeddings"])
        assert_close_golden(hidden, f"backbone.{kind}.last_hidden_state", golden, golden_index)
        logits = model.text_logits(hidden[0, -1])
        assert_close_golden(logits, f"backbone.{kind}.next_text_logits", golden, golden_index)


def test_backbone_cached_equals_uncached(model, golden):
    emb = golden["prefill.chat.embeddings"]
    with torch.inference_mode():
        full, _ = model.lfm(emb)
        cache = model.lfm.new_cache(1, 64)
        parts = [model.lfm(emb[:, a:b], cache)[0] for a, b in [(0, 7), (7, 49), (49, 50)]]
    assert int(cache.lengths[0]) == 50
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


def test_backbone_refuses_tokens_past_its_cache(model, golden):
    """A call whose tokens do not all fit raises ContextFullError and leaves the cache as it was."""
    prompt = golden["prefill.chat.embeddings"][:, :5].to(DEVICE, DTYPE)
    with torch.inference_mode():
        cache = model.lfm.new_cache(1, 4)
        model.lfm(prompt[:, :3], cache)
        assert model.lfm.attended_len(cache, 1) == 4
        with pytest.raises(ContextFullError, match="5 positions do not fit a cache of 4"):
            model.lfm(prompt[:, 3:5], cache)
        assert cache.lengths.tolist() == [3]
        model.lfm(prompt[:, 3:4], cache)  # the last position still fits
        assert cache.lengths.tolist() == [4]


def test_depthformer_frame(model, golden, golden_index):
    with torch.inference_mode():
        codes, logits = model.audio_frame_logits(golden["depth.input"][None])
    assert_close_golden(codes[0], "depth.frame", golden, golden_index)
    assert_close_golden(logits[0], "depth.logits", golden, golden_index)


@pytest.mark.parametrize("weights", ["gen", "gen_tts"])
@pytest.mark.parametrize("mode", ["seq", "inter"])
@pytest.mark.parametrize("kind", KINDS)
def test_generation_streams(proc, model, model_tts, golden, weights, mode, kind):
    m = model if weights == "gen" else model_tts
    chat = build_state(proc, kind, golden["input.wave_user1"])
    fn = m.generate_sequential if mode == "seq" else m.generate_interleaved
    out = list(fn(**chat, max_new_tokens=60))
    assert all(t.numel() in (1, 8) for t in out)
    steps = as_steps(out)
    expected = golden[f"{weights}.{mode}.{kind}.steps"]
    assert steps.shape == expected.shape
    mismatch = (steps != expected).any(1).nonzero()
    assert mismatch.numel() == 0, f"first differing yield: {mismatch[0].item()}"
    modality = torch.tensor([1 if t.numel() == 1 else 3 for t in out])
    assert torch.equal(modality, golden[f"{weights}.{mode}.{kind}.modality"])


def _turn(model, chat, *, cache: bool):
    kwargs = dict(chat) if cache else {k: chat[k] for k in INPUT_NAMES}
    return list(model.generate_interleaved(**kwargs, max_new_tokens=60))


@pytest.mark.parametrize("keep_cache", [True, False])
def test_two_turn_conversation(proc, model, golden, golden_index, keep_cache):
    """The README's two-turn chat; with the kept cache turn 2 prefills only its new positions."""
    chat = build_state(proc, "chat", golden["input.wave_user1"], keep_cache=keep_cache)
    turn1 = _turn(model, chat, cache=keep_cache)
    assert torch.equal(as_steps(turn1), golden["conv.turn1.steps"])
    text = [t for t in turn1 if t.numel() == 1]
    audio = [t for t in turn1 if t.numel() == 8]
    flags = [LFMModality.TEXT if t.numel() == 1 else LFMModality.AUDIO_OUT for t in turn1]
    chat.append(text=torch.stack(text, 1), audio_out=torch.stack(audio, 1), modality_flag=torch.tensor(flags))
    chat.end_turn()
    chat.new_turn("user")
    chat.add_text(TURN2_TEXT)
    chat.end_turn()
    chat.new_turn("assistant")
    for name in INPUT_NAMES:
        assert_close_golden(getattr(chat, name), f"conv.state_before_turn2.{name}", golden, golden_index)
    turn2 = _turn(model, chat, cache=keep_cache)
    assert torch.equal(as_steps(turn2), golden["conv.turn2.steps"])
    if keep_cache:
        # Turn 2 reused the prompt of turn 1 and every generated token but the last, which was never fed.
        assert chat.cache.reused_positions == golden["state.chat.modality_flag"].shape[1] + len(turn1) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 8, 16, 40])
def test_batched_rows_match_single_rows(checkpoint_dir, golden, dtype, rows):
    """A decode step for many rows (the engine's batch) gives each row what it gets alone."""
    m = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu", dtype=dtype)
    torch.manual_seed(rows)
    hidden = torch.randn(rows, m.config.lfm.hidden_size, dtype=dtype)
    with torch.inference_mode():
        frames, logits = m.audio_frame_logits(hidden)
        text = m.text_logits(hidden)
        cache = m.lfm.new_cache(rows, 8)
        out, _ = m.lfm(hidden[:, None], cache)
        for r in range(rows):
            one, one_logits = m.audio_frame_logits(hidden[r : r + 1])
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
            torch.testing.assert_close(text[r], m.text_logits(hidden[r]), **tol)
            single, _ = m.lfm(hidden[r : r + 1, None], m.lfm.new_cache(1, 8))
            torch.testing.assert_close(out[r], single[0], **tol)
            if dtype == torch.float32:  # in bfloat16 a near-tie may pick another code and the paths part
                torch.testing.assert_close(logits[r], one_logits[0], **tol)
                assert torch.equal(frames[r], one[0])
