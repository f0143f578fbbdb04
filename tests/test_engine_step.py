"""The step body a CUDA graph captures reads nothing back from the device, checked on the CPU.

A host read inside the captured step (``.item()``, ``bool(tensor)``, ``nonzero``, a data-dependent
shape) makes ``torch.cuda.graph`` fail at start-up, or, for a read made before the capture, fixes a
value the replays then never update. On the meta device every such read raises, so running the
bucketed step body there (the model, its caches and the audio decoder all on meta) proves it has
none, without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
from lfm2audio.engine.audio_out import make_audio_decoder
from lfm2audio.engine.step import BatchStep, buckets


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
    assert out.device.type == "meta" and out.shape == (rows + rows * C + rows * 1920,)

    # The check is real: the codec's own input validation is such a read, and meta refuses it.
    if decoder == "mimi":
        with torch.inference_mode(), pytest.raises(RuntimeError, match="meta"):
            codec.decode_step(torch.zeros(rows, C, dtype=torch.long, device="meta"), audio.state)


def test_buckets_are_powers_of_two_up_to_the_slot_count():
    assert buckets(1) == [1] and buckets(2) == [1, 2] and buckets(8) == [1, 2, 4, 8]
    assert buckets(3) == [1, 2, 3]  # a bucket of 4 would index a fourth slot that does not exist
    assert buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
