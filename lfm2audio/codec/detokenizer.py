"""LFM2.5-Audio detokenizer: 8 Mimi codebooks at 12.5 Hz -> 24 kHz waveform.

Pipeline (parameter names are those of the checkpoint folder ``audio_detokenizer/``):

* ``emb``: one table of 8 * 2048 rows; a frame's embedding is the MEAN over
  codebooks k of ``emb(code_k + 2048 * k)``.
* nearest-exact x6 upsampling in time (each frame repeated 6 times: 75 Hz).
* ``lfm``: an LFM2 backbone whose attention layers are causal sliding-window
  attention over 30 positions (5 frames); conv layers are plain causal short
  convolutions.
* ``lin``: Linear(hidden, 1282) = 641 log-magnitudes + 641 phases per position.
* ``istft``: inverse STFT, n_fft = win = 1280, hop 320, 'same' padding: T
  frames -> T * 6 * 320 = T * 1920 samples.

Streaming (``stream_state`` / ``decode_step`` / ``flush``) keeps an explicit
state whose size never grows: per attention layer the un-rotated keys and the
values of the last ``sliding_window - 1`` = 29 positions (RoPE is applied at
each step with positions relative to that buffer, so positions never grow and
precision does not drift over hours of audio), per conv layer the last 2
gated inputs, and a 960-sample overlap-add tail plus its window envelope.

Latency choice: the 'same' padding trims 480 samples at the clip start, and
the last 480 samples of a frame also receive overlap-add contributions from
the next frame's first two spectral frames. Rather than emit those samples
early and wrong (measured on the golden codes: 24% of the samples would
differ, by up to 0.061 against a peak of 0.094), each step emits the 1920 samples
that are FINAL once the frame is in: the output lags the clip by
``LATENCY_SAMPLES`` = 480 samples (20 ms at 24 kHz). A row's first chunk
begins with 480 zeros, and ``flush`` returns the clip's last 480 samples, so

    cat(decode_step chunks) + flush  ==  [480 zeros] + decode(all codes)

up to float rounding. Measured (float32, CPU) against whole-clip decode: max
abs difference 1.0e-7 on the golden codes (25 frames, peak 0.094), 1.3e-7 on
60 random frames with the golden weights and with full-size random weights
(peak ~0.1); the tests assert <= 1e-6 + 1e-5 * |x|. The difference comes from
summation order only (keys rotated at buffer-relative positions, overlap-add
summed chunk by chunk).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from lfm2audio.codec.istft import ISTFT
from lfm2audio.config import ConfigError, LFM2Config, parse_section, read_json
from lfm2audio.model.lfm2 import Attention, LFM2Backbone, rotate_half

CODEBOOKS = 8
CODEBOOK_SIZE = 2048
UPSAMPLE = 6  # 12.5 Hz codec frames -> 75 Hz spectral frames
N_FFT = 1280
HOP = 320
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = UPSAMPLE * HOP  # 1920
LATENCY_SAMPLES = (N_FFT - HOP) // 2  # 480: the streaming lag, = the 'same' padding
DEFAULT_SLIDING_WINDOW = 30  # the reference's fallback when the config has none


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes are not those of the module."""


class CodeEmbedding(nn.Module):
    """Mean over codebooks of one shared table, codebook k at rows [k*size, (k+1)*size)."""

    def __init__(self, dim: int, codebooks: int = CODEBOOKS, size: int = CODEBOOK_SIZE) -> None:
        super().__init__()
        self.codebooks = codebooks
        self.size = size
        self.emb = nn.Embedding(codebooks * size, dim)

    def forward(self, codes: Tensor) -> Tensor:
        """(B, codebooks, T) -> (B, T, dim)."""
        offsets = torch.arange(self.codebooks, device=codes.device).view(1, -1, 1) * self.size
        return self.emb(codes + offsets).mean(1)


def detokenizer_backbone_config(cfg: LFM2Config) -> LFM2Config:
    """The backbone config the detokenizer really runs.

    The reference windows EVERY attention layer (it renames them all to
    full_attention and passes one sliding mask), so a ``full_attention`` entry
    means sliding attention here too.
    """
    assert cfg.layer_types is not None
    window = cfg.sliding_window or DEFAULT_SLIDING_WINDOW
    layer_types = ["conv" if t == "conv" else "sliding_attention" for t in cfg.layer_types]
    out_size = cfg.output_size if cfg.output_size is not None else N_FFT + 2
    if out_size != N_FFT + 2:
        raise ConfigError(f"detokenizer: output_size must be {N_FFT + 2} (n_fft {N_FFT}), got {out_size}")
    return dataclasses.replace(cfg, layer_types=layer_types, sliding_window=window, output_size=out_size)


@dataclass
class DetokenizerState:
    """Streaming state of ``batch_size`` independent rows; every tensor has the batch first.

    keys / values: one (B, W - 1, n_kv_heads, head_dim) per attention layer,
        the last W - 1 positions oldest first, keys NOT rotated (RoPE is applied
        per step at buffer-relative positions).
    conv: one (B, hidden, L_cache - 1) per conv layer, the last gated inputs.
    ola / env: (B, 960) float32 overlap-add tail of the signal and of the
        squared window (its envelope).
    frames: (B,) int64, frames decoded since the row (re)started.
    """

    keys: list[Tensor]
    values: list[Tensor]
    conv: list[Tensor]
    ola: Tensor
    env: Tensor
    frames: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.frames.shape[0])

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values, *self.conv, self.ola, self.env, self.frames]

    def reset_rows(self, rows: Tensor | list[int]) -> DetokenizerState:
        """Start the given rows afresh; the others are untouched. Returns ``self``."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.frames.device)
        for t in self.tensors():
            t[idx] = 0
        return self

    def rows(self, start: int, stop: int) -> DetokenizerState:
        """A view of rows [start, stop): stepping it updates this state in place."""
        return DetokenizerState(
            keys=[t[start:stop] for t in self.keys],
            values=[t[start:stop] for t in self.values],
            conv=[t[start:stop] for t in self.conv],
            ola=self.ola[start:stop],
            env=self.env[start:stop],
            frames=self.frames[start:stop],
        )

    def step_tensors(self) -> list[Tensor]:
        """Every tensor a step rewrites for every row (batch first): restoring them undoes a step."""
        return self.tensors()

    def select(self, rows: Tensor | list[int]) -> DetokenizerState:
        """A new state holding copies of the given rows, in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.frames.device)
        return DetokenizerState(
            keys=[k[idx] for k in self.keys],
            values=[v[idx] for v in self.values],
            conv=[c[idx] for c in self.conv],
            ola=self.ola[idx],
            env=self.env[idx],
            frames=self.frames[idx],
        )

    def assign_rows(self, rows: Tensor | list[int], other: DetokenizerState) -> DetokenizerState:
        """Overwrite ``rows`` with the rows of ``other`` (in order), in place. Returns ``self``."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.frames.device)
        for dst, src in zip(self.tensors(), other.tensors(), strict=True):
            dst.index_copy_(0, idx, src)
        return self

    def clone(self) -> DetokenizerState:
        return self.select(torch.arange(self.batch_size, device=self.frames.device))


def check_codes(codes: Tensor, ndim: int) -> None:
    """Raise ValueError unless ``codes`` is an integer (B, 8[, T]) tensor of values in [0, 2047]."""
    want = "(B, 8, T)" if ndim == 3 else "(B, 8)"
    if not isinstance(codes, Tensor):
        raise ValueError(f"codes must be a torch.Tensor {want}, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.dim() != ndim or codes.shape[1] != CODEBOOKS:
        raise ValueError(f"codes must have shape {want} with {CODEBOOKS} codebooks, got {tuple(codes.shape)}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= CODEBOOK_SIZE:
            bad = lo if lo < 0 else hi
            hint = " (2048 is the end-of-audio code: drop that frame before detokenizing)" if bad == 2048 else ""
            raise ValueError(f"codes must lie in [0, {CODEBOOK_SIZE - 1}], found {bad}{hint}")


class AudioDetokenizer(nn.Module):
    """Mimi codes (B, 8, T) -> 24 kHz waveform (B, T * 1920); see the module docstring."""

    def __init__(self, cfg: LFM2Config) -> None:
        super().__init__()
        cfg = detokenizer_backbone_config(cfg)
        assert cfg.sliding_window is not None and cfg.output_size is not None
        self.cfg = cfg
        self.window = cfg.sliding_window
        self.emb = CodeEmbedding(cfg.hidden_size)
        self.lfm = LFM2Backbone(cfg)
        self.lin = nn.Linear(cfg.hidden_size, cfg.output_size)
        self.istft = ISTFT(N_FFT, HOP, N_FFT)

    @property
    def dtype(self) -> torch.dtype:
        return self.lin.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lin.weight.device

    def _spectrum(self, h: Tensor) -> Tensor:
        """Backbone output (B, T, hidden) -> complex spectrum (B, 641, T), float32."""
        y = self.lin(h).float().mT
        log_mag, phase = y.chunk(2, dim=1)
        return torch.polar(log_mag.exp(), phase)

    def forward(self, codes: Tensor) -> Tensor:
        """Whole clip: codes (B, 8, T) -> wave (B, T * 1920) float32."""
        check_codes(codes, 3)
        B, _, T = codes.shape
        if T == 0:
            return torch.zeros(B, 0, device=codes.device)
        x = self.emb(codes).repeat_interleave(UPSAMPLE, dim=1)
        # Without a cache the backbone applies the causal sliding-window mask to every attention layer.
        h, _ = self.lfm(x)
        return self.istft(self._spectrum(h))

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Whole clip, batched: codes (B, 8, T) -> wave (B, T * 1920) float32."""
        return self(codes)

    # ---- streaming ---------------------------------------------------------------------------

    def stream_state(self, batch_size: int, device: torch.device | str | None = None) -> DetokenizerState:
        """A fresh streaming state for ``batch_size`` rows."""
        cfg = self.cfg
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype
        n_attn = sum(1 for blk in self.lfm.layers if blk.is_attention)
        n_conv = len(self.lfm.layers) - n_attn
        kv_shape = (batch_size, self.window - 1, cfg.num_key_value_heads, cfg.head_dim)
        ola, env = self.istft.new_tails(batch_size, device)
        return DetokenizerState(
            keys=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(n_attn)],
            values=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(n_attn)],
            conv=[
                torch.zeros(batch_size, cfg.hidden_size, cfg.conv_L_cache - 1, device=device, dtype=dtype)
                for _ in range(n_conv)
            ],
            ola=ola,
            env=env,
            frames=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def _attend_step(
        self, attn: Attention, h: Tensor, k_past: Tensor, v_past: Tensor, cos: Tensor, sin: Tensor, mask: Tensor
    ) -> Tensor:
        """Sliding-window attention of U new positions over the buffered past keys; shifts the buffer."""
        B, U, _ = h.shape
        K = k_past.shape[1]
        q = attn.q_layernorm(attn.q_proj(h).view(B, U, attn.n_heads, attn.head_dim))
        k = attn.k_layernorm(attn.k_proj(h).view(B, U, attn.n_kv, attn.head_dim))
        v = attn.v_proj(h).view(B, U, attn.n_kv, attn.head_dim)
        keys = torch.cat([k_past, k], dim=1)  # slot s sits at relative position s
        values = torch.cat([v_past, v], dim=1)
        # Keys are kept un-rotated so that positions can restart at 0 every step: only differences matter.
        q = q * cos[:, K:] + rotate_half(q) * sin[:, K:]
        kr = keys * cos + rotate_half(keys) * sin
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            kr.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask,
            enable_gqa=attn.n_heads != attn.n_kv,
        )
        k_past.copy_(keys[:, U:])
        v_past.copy_(values[:, U:])
        return attn.out_proj(out.transpose(1, 2).reshape(B, U, -1))

    @torch.inference_mode()
    def decode_step(
        self, codes: Tensor, state: DetokenizerState, *, check: bool = True
    ) -> tuple[Tensor, DetokenizerState]:
        """One frame per row: codes (B, 8) -> pcm (B, 1920) float32, lagging the clip by 480 samples.

        ``state`` is updated in place and returned. A row's first chunk starts
        with ``LATENCY_SAMPLES`` zeros; call ``flush`` at the end of a stream.
        ``check=False`` skips validating the codes (a device-to-host read): for
        callers that clamp them already.
        """
        if check:
            check_codes(codes, 2)
        B = codes.shape[0]
        if state.batch_size != B:
            raise ValueError(f"state has {state.batch_size} rows but codes have {B}")
        U, K = UPSAMPLE, self.window - 1
        dev = codes.device

        # Mask (B, 1, U, K + U): query i sits at slot K + i; key slot s is allowed when
        # it is causal (s <= K + i), inside the window (s > K + i - W, i.e. s >= i),
        # and really holds a past position of this row (s >= K - n_past).
        n_past = (state.frames * U).clamp(max=K)
        s = torch.arange(K + U, device=dev).view(1, 1, 1, -1)
        i = torch.arange(U, device=dev).view(1, 1, -1, 1)
        mask = (s >= i) & (s <= K + i) & (s >= (K - n_past).view(B, 1, 1, 1))
        cos, sin = self.lfm.rope(torch.arange(K + U, device=dev).view(1, -1), self.dtype)

        x = self.emb(codes.unsqueeze(-1)).expand(B, U, -1)
        attn_i = conv_i = 0
        for blk in self.lfm.layers:
            h = blk.operator_norm(x)
            if blk.is_attention:
                h = self._attend_step(blk.self_attn, h, state.keys[attn_i], state.values[attn_i], cos, sin, mask)
                attn_i += 1
            else:
                h, tail = blk.conv(h, state.conv[conv_i], None)
                state.conv[conv_i].copy_(tail)
                conv_i += 1
            x = x + h
            x = x + blk.feed_forward(blk.ffn_norm(x))
        h = self.lfm.embedding_norm(x)

        pcm = self.istft.step(self._spectrum(h), state.ola, state.env, first=state.frames == 0)
        state.frames += 1
        return pcm, state

    @torch.inference_mode()
    def flush(self, state: DetokenizerState) -> Tensor:
        """The last ``LATENCY_SAMPLES`` samples of each row's clip, (B, 480); ``state`` is not changed.

        Rows that have decoded nothing give zeros. Reset a finished row with ``state.reset_rows``.
        """
        return self.istft.flush(state.ola, state.env)


def _rope_inv_freq(cfg: LFM2Config, device: torch.device | str | None) -> Tensor:
    # Same expression as LFM2Backbone.__init__ (a test checks they agree bit for bit).
    hd = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))


def check_state_dict(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointMismatchError listing missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: file {list(found[k])}, model {list(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k]) != tuple(expected[k])
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"mis-shaped keys {shapes}")
        raise CheckpointMismatchError(f"{where}: state dict does not match the detokenizer: " + "; ".join(parts))


def load_detokenizer(
    folder: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> AudioDetokenizer:
    """Load ``folder/config.json`` + ``folder/model.safetensors`` strictly; parameters in ``dtype``."""
    folder = Path(folder)
    cfg = parse_section(LFM2Config, read_json(folder / "config.json"), f"{folder / 'config.json'}")
    device = torch.device("cpu") if device is None else torch.device(device)
    # Build without allocating or initialising weights: the file provides all of them.
    with torch.device("meta"):
        model = AudioDetokenizer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    path = folder / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_state_dict(expected, found, str(path))
        tensors = {}
        for k in found:
            t = f.get_tensor(k)
            # istft.window is float32 by definition; every other float tensor takes the requested dtype.
            target = torch.float32 if k == "istft.window" else dtype
            tensors[k] = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    # Non-persistent buffers are not in the file and were built on meta: rebuild them.
    model.lfm.register_buffer("inv_freq", _rope_inv_freq(model.cfg, device), persistent=False)
    return model.eval()
