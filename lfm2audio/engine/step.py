"""The batched tensor work of one engine step, and its CUDA graphs.

``BatchStep.run(plan)`` takes a ``StepPlan`` (which slots feed their last
token, which sample text or audio) and does, for the prefix of slots
[0, rows), one fixed sequence of batched ops whatever rows hold:

1. embed every row's last token (text or audio frame, chosen by a mask) from
   per-slot device buffers, and run one backbone forward (rows that do not
   feed pass ``valid`` 0);
2. sample text for the text rows and one depthformer frame for the audio
   rows (each as one batch, gathered by index), with per-row parameters and
   counter-based noise (``lfm2audio.sampling.RowSampling``);
3. write the sampled tokens back into the per-slot buffers (the next step
   feeds them), end-of-audio frames filled on the device;
4. decode the frames of the audio rows with the slots' streaming decoder
   (rows that did not speak, or drew end-of-audio, do not advance);
5. pack tokens, codes and PCM into one buffer copied to the host once.

Nothing inside reads a device value back; the host learns the step's results
from that one copy. Index lists come in as one small host-to-device copy.

Two ways to lay rows out. Gathered (default off CUDA): the text and audio
phases run on exactly their rows, so a CPU never computes a depthformer frame
for a text row. Bucketed (CUDA graphs): the batch is padded to a bucket size
(1, 2, 4, ...) and both phases run on every row of it, masks choosing what is
kept, so each bucket's step has fixed shapes and is captured once as a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lfm2audio.engine.audio_out import SlotAudioDecoder
from lfm2audio.engine.plan import StepPlan
from lfm2audio.model.lfm2 import LFM2Cache
from lfm2audio.model.lfm2_audio import LFM2AudioNetwork
from lfm2audio.sampling import TEXT_LANE, RowSampling, SamplingParams, k_bucket, row_top_k, seed_key
from lfm2audio.tokens import END_OF_AUDIO, SAMPLES_PER_FRAME


def buckets(max_rows: int) -> list[int]:
    """Batch-size buckets: 1, 2, 4, ... below ``max_rows``, then ``max_rows`` itself (the slot count:
    a bucket is a prefix of the slots, and there are no rows beyond them to pad into)."""
    out = [1]
    while out[-1] * 2 < max_rows:
        out.append(out[-1] * 2)
    return out + [max_rows] if max_rows > 1 else out


@dataclass
class StepResult:
    """What a step produced, in host memory, aligned with the plan's ``text`` and ``audio`` slots."""

    tokens: list[int]  # one per text slot
    codes: list[tuple[int, ...]]  # one frame per audio slot (end-of-audio frames are all 2048)
    pcm: np.ndarray  # (len(audio), 1920) float32


class SlotSampling:
    """Per-slot sampling parameters on the device, written when a response starts.

    The host keeps each active slot's candidate count, from which a batch's ``k_cap``
    (how many candidates it sorts) and whether any row may be greedy (whether it needs an
    argmax) follow. ``always_argmax`` keeps the argmax in (a captured CUDA graph cannot
    follow a host flag that changes between replays).
    """

    def __init__(self, slots: int, vocab: int, device: torch.device, always_argmax: bool = False) -> None:
        self.vocab = vocab
        self.temperature = torch.ones(slots, device=device)
        self.top_k = torch.ones(slots, dtype=torch.long, device=device)
        self.greedy = torch.ones(slots, dtype=torch.bool, device=device)
        self.row_k: dict[int, int] = {}  # active slot -> candidate count (1: greedy)
        self.always_argmax = always_argmax
        self.k_cap = 1
        self.any_greedy = True

    def set(self, slot: int, params: SamplingParams) -> None:
        k = row_top_k(params, self.vocab)
        self.temperature[slot] = params.effective_temperature
        self.top_k[slot] = k
        self.greedy[slot] = params.greedy
        self.row_k[slot] = k
        self._update()

    def clear(self, slot: int) -> None:
        self.row_k.pop(slot, None)
        self._update()

    def _update(self) -> None:
        self.k_cap = k_bucket(max(self.row_k.values(), default=1), self.vocab)
        self.any_greedy = self.always_argmax or any(k == 1 for k in self.row_k.values())

    def rows(self, index: Tensor, seeds: Tensor, counters: Tensor) -> RowSampling:
        top_k = self.top_k.index_select(0, index).clamp(max=self.k_cap)
        return RowSampling(
            self.temperature.index_select(0, index), top_k, self.greedy.index_select(0, index),
            seeds.index_select(0, index), counters.index_select(0, index), self.k_cap, self.any_greedy,
        )  # fmt: skip


class BatchStep:
    """Per-slot device buffers of the batched step, the step itself, and its CUDA graphs."""

    def __init__(
        self,
        model: LFM2AudioNetwork,
        cache: LFM2Cache,
        audio: SlotAudioDecoder,
        *,
        cuda_graphs: bool,
        bucketed: bool,
    ) -> None:
        self.model, self.cache, self.audio = model, cache, audio
        slots = cache.batch_size
        dev = model.device
        self.device = dev
        self.slots = slots
        C = model.codebooks
        self.next_text = torch.zeros(slots, dtype=torch.long, device=dev)
        self.next_codes = torch.zeros(slots, C, dtype=torch.long, device=dev)
        self.next_audio = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=dev)
        self.counters = torch.zeros(slots, dtype=torch.long, device=dev)
        self.text_sampling = SlotSampling(slots, model.config.lfm.vocab_size, dev, always_argmax=cuda_graphs)
        self.audio_sampling = SlotSampling(slots, model.config.audio_vocab_size, dev, always_argmax=cuda_graphs)
        self.bucketed = bucketed or cuda_graphs
        self.cuda_graphs = cuda_graphs
        self.buckets = buckets(slots)
        self._arange = torch.arange(max(self.buckets), device=dev)
        self._graphs: dict[tuple[int, int, int], _CapturedStep] = {}
        self._pool = None

    # Per-slot state -----------------------------------------------------------------

    def start_row(self, slot: int, text: SamplingParams, audio: SamplingParams, seed: int) -> None:
        """A response starts in ``slot``: its sampling parameters, seed and a zero step counter."""
        self.text_sampling.set(slot, text)
        self.audio_sampling.set(slot, audio)
        self.seeds[slot] = seed_key(seed)
        self.counters[slot] = 0
        self.next_audio[slot] = False

    def end_row(self, slot: int) -> None:
        self.text_sampling.clear(slot)
        self.audio_sampling.clear(slot)

    # The step -----------------------------------------------------------------------

    def run(self, plan: StepPlan, prefill_hidden: dict[int, Tensor]) -> StepResult:
        """Execute ``plan`` (its prefill chunks already ran; ``prefill_hidden`` maps each slot whose
        prompt completed to the backbone state of its last position, which that row samples from)."""
        rows = plan.rows
        if self.bucketed:
            rows = next(b for b in self.buckets if b >= rows)
        # Graphs read the plan from a pinned host buffer; eager steps build it where they run.
        meta = self._meta(plan, rows, "cpu" if self.cuda_graphs else self.device)
        hidden = self.model.config.lfm.hidden_size
        if prefill_hidden:  # (rows, hidden): each completing row's state at its slot
            slots = torch.tensor(list(prefill_hidden), device=self.device)
            states = torch.stack(list(prefill_hidden.values())).to(self.model.dtype)
            prefill_h = torch.zeros(rows, hidden, device=self.device, dtype=self.model.dtype)
            prefill_h.index_copy_(0, slots, states)
        else:  # (hidden,) broadcast: no row takes it
            prefill_h = torch.zeros(hidden, device=self.device, dtype=self.model.dtype)
        if self.cuda_graphs:
            out = self.graph(rows).replay(meta, prefill_h)
        else:
            n_text, n_audio, audio_rows = self._sizes(plan, rows)
            kv_len = plan.kv_len
            out = self._compute(rows, n_text, n_audio, audio_rows, kv_len, meta, prefill_h).cpu()
        return self._unpack(plan, rows, out.numpy())

    def graph(self, rows: int) -> _CapturedStep:
        """The captured step of a bucket for the current top-k caps (captured on first use)."""
        key = (rows, self.text_sampling.k_cap, self.audio_sampling.k_cap)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _CapturedStep(self, rows)
        return graph

    def capture(self, k_caps: list[tuple[int, int]]) -> None:
        """Capture every bucket's graph for each (text, audio) top-k cap, largest bucket first (at start-up)."""
        saved = self.text_sampling.k_cap, self.audio_sampling.k_cap
        for kt, ka in k_caps:
            self.text_sampling.k_cap = k_bucket(kt, self.text_sampling.vocab)
            self.audio_sampling.k_cap = k_bucket(ka, self.audio_sampling.vocab)
            for rows in reversed(self.buckets):
                self.graph(rows)
        self.text_sampling.k_cap, self.audio_sampling.k_cap = saved

    def _sizes(self, plan: StepPlan, rows: int) -> tuple[int, int, int]:
        if self.bucketed:
            return rows, rows, rows
        audio_rows = max(plan.audio) + 1 if plan.audio else 0
        return len(plan.text), len(plan.audio), audio_rows

    def _meta(self, plan: StepPlan, rows: int, device: torch.device | str) -> Tensor:
        """The step's index lists as one int64 tensor (one host-to-device copy).

        Layout: valid (rows) | prefill mask (rows) | text index | audio index | text on | audio on.
        """
        valid = [0] * rows
        for s in plan.feed:
            valid[s] = 1
        prefill = [0] * rows
        for s in plan.completing:
            prefill[s] = 1
        if self.bucketed:
            text_on, audio_on = [0] * rows, [0] * rows
            for s in plan.text:
                text_on[s] = 1
            for s in plan.audio:
                audio_on[s] = 1
            index = list(range(rows))
            meta = valid + prefill + index + index + text_on + audio_on
        else:
            meta = valid + prefill + list(plan.text) + list(plan.audio) + [1] * (len(plan.text) + len(plan.audio))
        return torch.tensor(meta, dtype=torch.long, device=device)

    def _compute(
        self, rows: int, n_text: int, n_audio: int, audio_rows: int, kv_len: int, meta: Tensor, prefill_h: Tensor
    ) -> Tensor:
        """The batched work (see the module docstring); returns the packed float32 output."""
        model, cache = self.model, self.cache
        valid, prefill, text_idx, audio_idx, text_on, audio_on = meta.split(
            [rows, rows, n_text, n_audio, n_text, n_audio]
        )
        text_on, audio_on, prefill = text_on.bool(), audio_on.bool(), prefill.bool()

        # 1. Feed every row's last token through the backbone.
        x = torch.where(
            self.next_audio[:rows, None],
            model.embed_audio_frames(self.next_codes[:rows]),
            model.embed_text(self.next_text[:rows]),
        )
        h, _ = model.lfm(x[:, None], cache.rows(0, rows), valid=valid, kv_len=kv_len)
        h = torch.where(prefill[:, None], prefill_h.to(h.dtype), h[:, 0])

        # 2. Sample: text rows and audio rows, each as one batch.
        text = self.text_sampling.rows(text_idx, self.seeds, self.counters)
        tokens = text.sample(model.text_logits(h.index_select(0, text_idx)), TEXT_LANE)
        audio = self.audio_sampling.rows(audio_idx, self.seeds, self.counters)
        codes = model.sample_audio_frame_rows(h.index_select(0, audio_idx), audio)
        end = codes[:, :1] == END_OF_AUDIO
        codes = codes.masked_fill(end, END_OF_AUDIO)

        # 3. What the next step feeds, and each row's step counter.
        self.next_text.index_copy_(0, text_idx, torch.where(text_on, tokens, self.next_text.index_select(0, text_idx)))
        kept = self.next_codes.index_select(0, audio_idx)
        self.next_codes.index_copy_(0, audio_idx, torch.where(audio_on[:, None], codes, kept))
        self.next_audio.index_copy_(0, text_idx, self.next_audio.index_select(0, text_idx) & ~text_on)
        self.next_audio.index_copy_(0, audio_idx, self.next_audio.index_select(0, audio_idx) | audio_on)
        self.counters.index_add_(0, text_idx, text_on.long())
        self.counters.index_add_(0, audio_idx, audio_on.long())

        # 4. Decode the audio rows' frames (rows [0, audio_rows) step as a view; the rest stand still).
        if audio_rows:
            frame = torch.zeros(audio_rows, codes.shape[1], dtype=torch.long, device=codes.device)
            frame.index_copy_(0, audio_idx, codes)
            advance = torch.zeros(audio_rows, dtype=torch.bool, device=codes.device)
            advance.index_copy_(0, audio_idx, audio_on & ~end[:, 0])
            # Gathered: the 24 kHz half of the decoder runs on the audio rows only (not on a bucket's padding).
            pcm = self.audio.step(frame, advance, audio_idx, gather=not self.bucketed)
        else:
            pcm = torch.zeros(0, SAMPLES_PER_FRAME, device=codes.device)

        # 5. One buffer for the host (token ids and codes are exact in float32).
        return torch.cat([tokens.float(), codes.float().flatten(), pcm.flatten()])

    def _unpack(self, plan: StepPlan, rows: int, out: np.ndarray) -> StepResult:
        n_text, n_audio, _ = self._sizes(plan, rows)
        C = self.model.codebooks
        tokens = out[:n_text].astype(np.int64)
        codes = out[n_text : n_text + n_audio * C].astype(np.int64).reshape(n_audio, C)
        pcm = out[n_text + n_audio * C :].reshape(n_audio, SAMPLES_PER_FRAME)
        if self.bucketed:  # every row of the bucket was computed: keep the planned ones
            text, audio = list(plan.text), list(plan.audio)
            return StepResult(tokens[text].tolist(), [tuple(c) for c in codes[audio].tolist()], pcm[audio])
        return StepResult(tokens.tolist(), [tuple(c) for c in codes.tolist()], pcm)


class _CapturedStep:
    """One bucket's step captured as a CUDA graph, with static input and output buffers."""

    def __init__(self, step: BatchStep, rows: int) -> None:
        dev = step.device
        self.meta = torch.zeros(6 * rows, dtype=torch.long, device=dev)
        # An all-zero plan (nothing fed, nothing on) leaves every buffer and state as it was.
        self.meta[2 * rows : 4 * rows] = torch.arange(rows, device=dev).repeat(2)
        hidden = step.model.config.lfm.hidden_size
        self.prefill_h = torch.zeros(rows, hidden, device=dev, dtype=step.model.dtype)
        kv_len = step.cache.max_len + 1

        def body() -> Tensor:
            return step._compute(rows, rows, rows, rows, kv_len, self.meta, self.prefill_h)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=step._pool):
            self.out = body()
        step._pool = self.graph.pool()
        self.host = torch.empty(self.out.shape, dtype=self.out.dtype, pin_memory=True)
        self.done = torch.cuda.Event()

    def replay(self, meta: Tensor, prefill_h: Tensor) -> Tensor:
        self.meta.copy_(meta, non_blocking=True)
        self.prefill_h.copy_(prefill_h, non_blocking=True)
        self.graph.replay()
        self.host.copy_(self.out, non_blocking=True)
        self.done.record()
        self.done.synchronize()
        return self.host.clone()  # the pinned buffer is reused by the next replay
