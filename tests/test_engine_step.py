"""What the engine's CUDA graphs depend on, checked on the CPU (no GPU has run them yet).

- No host reads in the captured step: a read (``.item()``, ``bool(tensor)``, ``nonzero``, a
  data-dependent shape) makes ``torch.cuda.graph`` fail at start-up. On the meta device every such
  read raises, so the bucketed step body runs there (model, caches and audio decoder all on meta).
- State updated in place: a replay writes into the buffers it captured.
- Buckets never exceed the slot count.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
from lfm2audio.engine.audio_out import make_audio_decoder
from lfm2audio.engine.step import BatchStep, buckets
from lfm2audio.tokens import SAMPLES_PER_FRAME


@pytest.mark.parametrize("decoder", ["mimi", "detokenizer"])
def test_the_captured_step_body_has_no_host_reads(checkpoint_dir, decoder):
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, dtype=torch.float32).to("meta")
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir)
    codec = proc.mimi if decoder == "mimi" else proc.audio_detokenizer
    codec.to("meta")
    rows = 4
    with torch.device("meta"):
        cache = model.lfm.new_cache(rows, 32)
        audio = make_audio_decoder(proc, decoder, rows)
        step = BatchStep(model, cache, audio, cuda_graphs=True, bucketed=True)
    # What _CapturedStep captures: every row of the bucket, the plan and prefill states as device buffers.
    meta = torch.zeros(6 * rows, dtype=torch.long, device="meta")
    prefill_h = torch.zeros(rows, model.config.lfm.hidden_size, device="meta")
    with torch.inference_mode():
        out = step._compute(rows, rows, rows, rows, cache.max_len + 1, meta, prefill_h)
    C = model.codebooks
    assert out.device.type == "meta" and out.shape == (rows + rows * C + rows * SAMPLES_PER_FRAME,)

    # The check is real: the codec's own input validation is such a read, and meta refuses it.
    if decoder == "mimi":
        with torch.inference_mode(), pytest.raises(RuntimeError, match="meta"):
            codec.decode_step(torch.zeros(rows, C, dtype=torch.long, device="meta"), audio.state)


def _state_tensors(obj, path: str = "step", found: dict | None = None) -> dict[str, tuple[int, int]]:
    """Every tensor the step keeps between calls (its buffers, the cache, the decoder state), by path:
    (object id, storage address)."""
    found = {} if found is None else found
    if isinstance(obj, torch.Tensor):
        found[path] = (id(obj), obj.data_ptr())
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _state_tensors(v, f"{path}[{i}]", found)
    elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("lfm2audio.engine"):
        for name, v in vars(obj).items():
            if not isinstance(v, torch.nn.Module):  # the model and codec: weights, not state
                _state_tensors(v, f"{path}.{name}", found)
    return found


@pytest.mark.parametrize("decoder", ["mimi", "detokenizer"])
def test_the_step_updates_its_state_in_place(checkpoint_dir, decoder):
    """A CUDA graph replays into the buffers it captured: a step that rebinds a state tensor to a new one
    (instead of writing into it) would have its graph update a tensor the engine no longer reads."""
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, dtype=torch.float32)
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir)
    rows = 4
    step = BatchStep(model, model.lfm.new_cache(rows, 32), make_audio_decoder(proc, decoder, rows),
                     cuda_graphs=False, bucketed=True)  # fmt: skip
    # Every row fed; rows 0 and 3 sample text, 1 and 2 audio.
    meta = torch.tensor([1] * rows + [0] * rows + [0, 1, 2, 3] * 2 + [1, 0, 0, 1] + [0, 1, 1, 0])
    hidden = model.config.lfm.hidden_size
    before = _state_tensors(step)
    assert len(before) > 20 and any(".cache." in k for k in before) and any(".audio.state." in k for k in before)
    with torch.inference_mode():
        for _ in range(3):
            step._compute(rows, rows, rows, rows, step.cache.max_len + 1, meta, torch.zeros(rows, hidden))
    assert _state_tensors(step) == before


def test_buckets_are_powers_of_two_up_to_the_slot_count():
    assert buckets(1) == [1] and buckets(2) == [1, 2] and buckets(8) == [1, 2, 4, 8]
    assert buckets(3) == [1, 2, 3]  # a bucket of 4 would index a fourth slot that does not exist
    assert buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
