"""Every per-slot state speaks the one row protocol (lfm2audio.row_state) with the same meaning."""

from __future__ import annotations

import pytest
import torch

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
from lfm2audio.row_state import RowState


def _tensors(state) -> list[torch.Tensor]:
    if hasattr(state, "tensors"):
        return state.tensors()
    if hasattr(state, "keys") and isinstance(state.keys, list):  # LFM2Cache
        return [*state.keys, *state.values, *state.conv, state.lengths]
    tr = state.transformer
    rest = [state.upsample, *state.decoder] if hasattr(state, "upsample") else [*state.encoder, state.downsample]
    return [*rest, tr.offsets, tr.positions, tr.keys.transpose(0, 1), tr.values.transpose(0, 1)]


@pytest.fixture(scope="module")
def states(checkpoint_dir):
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu")
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    return {
        "lfm2_cache": lambda n: model.lfm.new_cache(n, 16),
        "mimi_decoder": lambda n: proc.mimi.decoder_state(n),
        "mimi_encoder": lambda n: proc.mimi.encoder_state(n),
        "detokenizer": lambda n: proc.audio_detokenizer.stream_state(n),
    }


@pytest.mark.parametrize("kind", ["lfm2_cache", "mimi_decoder", "mimi_encoder", "detokenizer"])
def test_row_protocol(states, kind):
    state = states[kind](4)
    assert isinstance(state, RowState)
    torch.manual_seed(0)
    for t in _tensors(state):
        t.copy_(torch.randint(1, 100, t.shape).to(t.dtype))
    before = [t.clone() for t in _tensors(state)]

    picked = state.select([3, 1])  # copies, in that order
    assert picked.batch_size == 2
    for p, b in zip(_tensors(picked), before, strict=True):
        assert torch.equal(p[0], b[3]) and torch.equal(p[1], b[1])

    view = state.rows(1, 3)  # a view: writing it writes the state
    assert view.batch_size == 2
    _tensors(view)[0][0].fill_(0)
    assert not bool(_tensors(state)[0][1].to(torch.float32).abs().sum())

    assert state.reset_rows([2]) is state  # row 2 restarts, the others stay
    for t, b in zip(_tensors(state), before, strict=True):
        assert torch.equal(t[3], b[3]) and torch.equal(t[0], b[0])

    assert state.assign_rows([2], picked.select([0])) is state  # row 2 := old row 3
    for t, b in zip(_tensors(state), before, strict=True):
        assert torch.equal(t[2], b[3])

    copy = state.clone()
    _tensors(copy)[0].fill_(0)
    assert bool(_tensors(state)[0][0].to(torch.float32).abs().sum())  # a clone is not a view
