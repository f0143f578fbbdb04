"""The Mimi codec: 24 kHz waveform <-> 8 codebooks at 12.5 Hz.

Encode: SEANet encoder (24 kHz -> 25 Hz latent) -> encoder transformer -> learnt strided
conv (25 -> 12.5 Hz, causal, left padding replicates the first step) -> split RVQ.
Decode: split RVQ lookup -> learnt depthwise transposed conv (12.5 -> 25 Hz) -> decoder
transformer -> SEANet decoder (25 Hz -> 24 kHz).

Streams go frame by frame through ``encode_step`` / ``decode_step`` (or a few frames at a
time through ``encode_chunk`` / ``decode_chunk``) with an explicit, batched state (see
``state.py``); whole clips (``encode`` / ``decode``) use the same incremental code on a
fresh state, in chunks, so both give the same result up to float rounding. Internally all
activations are time-major (batch, time, channels).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .mimi_config import MimiConfig
from .mimi_transformer import MimiTransformer
from .quantizer import SplitResidualVQ
from .seanet import CausalConv1d, CausalConvTranspose1d, SEANetDecoder, SEANetEncoder
from .state import MimiDecoderState, MimiEncoderState


class MimiCheckpointError(ValueError):
    """A checkpoint whose tensors do not match the module built from the config."""


class ConvDownsample(nn.Module):
    """Learnt causal conv, kernel ``2 * stride``, no bias, replicate left padding (``conv.conv.conv.weight``)."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate")


class ConvTrUpsample(nn.Module):
    """Learnt transposed conv, kernel ``2 * stride``, no bias, one filter per channel
    (moshi's ``upsample_channel_wise_bug``: groups = channels) (``convtr.convtr.convtr.weight``)."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.convtr = CausalConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False)


class MimiCodec(nn.Module):
    """Mimi with the parameter names and shapes of the official checkpoint.

    All processing is incremental: ``decode``/``encode`` run a whole clip through a fresh
    state, a few frames per call (bounded memory, large matrix products), and
    ``decode_step``/``encode_step`` run one frame of every row of a batched state."""

    # Frames x rows per call on the whole-clip paths: enough to amortise weight reads (larger
    # gains nothing on CPU), small enough to bound activations (~1.5 MB per frame and row).
    clip_chunk_rows = 32

    def __init__(self, config: MimiConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else MimiConfig()
        self.config = cfg
        dim = cfg.seanet.dimension
        # Registration order = the official state-dict order.
        self.encoder = SEANetEncoder(cfg.seanet)
        self.decoder = SEANetDecoder(cfg.seanet)
        self.encoder_transformer = MimiTransformer(cfg.transformer)
        self.decoder_transformer = MimiTransformer(cfg.transformer)
        self.quantizer = SplitResidualVQ(cfg.quantizer, cfg.num_codebooks)
        self.downsample = ConvDownsample(dim, cfg.resample_stride)
        self.upsample = ConvTrUpsample(dim, cfg.resample_stride)

    # Properties --------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def frame_size(self) -> int:
        """Samples per frame (1920)."""
        return self.config.frame_size

    @property
    def num_codebooks(self) -> int:
        return self.quantizer.num_codebooks

    @property
    def cardinality(self) -> int:
        return self.config.quantizer.bins

    def set_num_codebooks(self, n: int) -> None:
        """Use the first ``n`` codebooks (1 semantic + n-1 acoustic) for encode/decode."""
        self.quantizer.set_num_codebooks(n)

    def _clip_chunk(self, batch: int, frames: int) -> int:
        return max(1, min(frames, self.clip_chunk_rows // max(1, batch)))

    # Streaming state ---------------------------------------------------------------------

    def decoder_state(self, batch_size: int, chunk_frames: int = 1) -> MimiDecoderState:
        """A fresh decoder state of ``batch_size`` independent streams, sized for calls of up to
        ``chunk_frames`` frames (larger calls still work, split internally)."""
        p = self.quantizer.rvq_first.output_proj.weight
        dev, dt = p.device, p.dtype
        stride = self.config.resample_stride
        return MimiDecoderState(
            upsample=self.upsample.convtr.stream_state(batch_size, dev, dt)[0],
            transformer=self.decoder_transformer.stream_state(batch_size, chunk_frames * stride, dev, dt),
            decoder=self.decoder.stream_state(batch_size, dev, dt),
        )

    def encoder_state(self, batch_size: int, chunk_frames: int = 1) -> MimiEncoderState:
        """A fresh encoder state of ``batch_size`` independent streams (see ``decoder_state``)."""
        p = self.quantizer.rvq_first.input_proj.weight
        dev, dt = p.device, p.dtype
        stride = self.config.resample_stride
        return MimiEncoderState(
            encoder=self.encoder.stream_state(batch_size, dev, dt),
            transformer=self.encoder_transformer.stream_state(batch_size, chunk_frames * stride, dev, dt),
            downsample=self.downsample.conv.stream_state(batch_size, dev, dt)[0],
            first=torch.ones(batch_size, device=dev, dtype=torch.bool),
        )

    # Incremental decode / encode -------------------------------------------------------------

    @torch.no_grad()
    def decode_chunk(
        self, codes: Tensor, state: MimiDecoderState, *, check: bool = True
    ) -> tuple[Tensor, MimiDecoderState]:
        """The next ``n`` frames of codes (B, K, n) of every row -> pcm (B, n * frame_size).

        ``state`` is updated in place and returned. ``check=False``: see ``decode_latent_chunk``."""
        emb = self.decode_latent_chunk(codes, state, check=check)
        pcm = self.decoder.step(emb, iter(state.decoder))  # (B, n * frame_size, 1)
        return pcm.reshape(pcm.shape[0], -1), state

    @torch.no_grad()
    def decode_latent_chunk(self, codes: Tensor, state: MimiDecoderState, *, check: bool = True) -> Tensor:
        """The 25 Hz half of ``decode_chunk``: codes (B, K, n) -> the SEANet decoder's input
        (B, n * stride, dimension). Updates the upsampler and transformer parts of ``state``;
        ``decoder.step(latent, iter(state.decoder))`` finishes the frames (see ``decode_chunk``).

        ``check=False`` skips validating the codes' values (a device-to-host read: the engine's
        step, captured as a CUDA graph, clamps them instead); an out-of-range code then reads
        another codebook's row."""
        codes = _check_codes(codes, 3)
        if codes.shape[0] != state.batch_size:
            raise ValueError(f"codes batch {codes.shape[0]} != state batch {state.batch_size}")
        emb = self.quantizer.decode(codes, check=check)  # (B, n, C)
        emb = self.upsample.convtr.step(emb, iter([state.upsample]))
        return self.decoder_transformer.step(emb, state.transformer)

    def decode_step(
        self, codes: Tensor, state: MimiDecoderState, *, check: bool = True
    ) -> tuple[Tensor, MimiDecoderState]:
        """One frame of codes (B, K) of every row -> pcm (B, frame_size); ``state`` is updated in place."""
        return self.decode_chunk(_check_codes(codes, 2)[:, :, None], state, check=check)

    @torch.no_grad()
    def encode_latent_chunk(self, pcm: Tensor, state: MimiEncoderState) -> tuple[Tensor, MimiEncoderState]:
        """The next ``n`` frames of audio (B, n * frame_size) of every row -> unquantized latent
        (B, n, dimension), time-major. ``state`` is updated in place and returned."""
        if pcm.dim() == 3 and pcm.shape[1] == 1:
            pcm = pcm[:, 0]
        if pcm.dim() != 2 or pcm.shape[1] == 0 or pcm.shape[1] % self.frame_size:
            raise ValueError(f"expected pcm (B, n * {self.frame_size}), got {tuple(pcm.shape)}")
        if pcm.shape[0] != state.batch_size:
            raise ValueError(f"pcm batch {pcm.shape[0]} != state batch {state.batch_size}")
        emb = self.encoder.step(pcm[:, :, None], iter(state.encoder))
        emb = self.encoder_transformer.step(emb, state.transformer)
        emb = self.downsample.conv.step(emb, iter([state.downsample]), first=state.first)
        state.first.fill_(False)
        return emb, state

    @torch.no_grad()
    def encode_chunk(self, pcm: Tensor, state: MimiEncoderState) -> tuple[Tensor, MimiEncoderState]:
        """The next ``n`` frames of audio (B, n * frame_size) of every row -> codes (B, K, n)."""
        emb, state = self.encode_latent_chunk(pcm, state)
        return self.quantizer.encode(emb), state

    def encode_step(self, pcm: Tensor, state: MimiEncoderState) -> tuple[Tensor, MimiEncoderState]:
        """One frame of audio (B, frame_size) of every row -> codes (B, K); ``state`` is updated in place."""
        codes, state = self.encode_chunk(pcm, state)
        if codes.shape[-1] != 1:
            raise ValueError(f"encode_step takes exactly one frame ({self.frame_size} samples) per row")
        return codes[:, :, 0], state

    # Whole clips ---------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, K, T) -> waveform (B, 1, T * frame_size)."""
        codes = _check_codes(codes, 3)
        B, _, T = codes.shape
        chunk = self._clip_chunk(B, T)
        state = self.decoder_state(B, chunk)
        out = [self.decode_chunk(codes[:, :, s : s + chunk], state)[0] for s in range(0, T, chunk)]
        return torch.cat(out, dim=1)[:, None] if out else codes.new_zeros((B, 1, 0), dtype=state.upsample.dtype)

    @torch.no_grad()
    def decode_latent(self, codes: Tensor) -> Tensor:
        """Codes (B, K, T) -> quantized latent (B, dimension, T)."""
        return self.quantizer.decode(_check_codes(codes, 3)).transpose(1, 2).contiguous()

    def encode_to_latent(self, wav: Tensor) -> Tensor:
        """Waveform (B, 1, S) -> unquantized latent (B, dimension, ceil(S / frame_size)).

        The clip is zero-padded at the end to a whole number of frames."""
        _check_wav(wav)
        return self._encode_clip_latent(wav).transpose(1, 2).contiguous()

    @torch.no_grad()
    def encode(self, wav: Tensor) -> Tensor:
        """Waveform (B, 1, S) -> codes (B, num_codebooks, ceil(S / frame_size)) int64."""
        _check_wav(wav)
        return self.quantizer.encode(self._encode_clip_latent(wav))

    @torch.no_grad()
    def _encode_clip_latent(self, wav: Tensor) -> Tensor:
        B, fs = wav.shape[0], self.frame_size
        pcm = F.pad(wav[:, 0], (0, -wav.shape[-1] % fs))
        T = pcm.shape[1] // fs
        if T == 0:
            return pcm.new_zeros((B, 0, self.config.seanet.dimension))
        chunk = self._clip_chunk(B, T)
        state = self.encoder_state(B, chunk)
        out = [self.encode_latent_chunk(pcm[:, s * fs : (s + chunk) * fs], state)[0] for s in range(0, T, chunk)]
        return torch.cat(out, dim=1)


def _check_wav(wav: Tensor) -> None:
    if wav.dim() != 3 or wav.shape[1] != 1:
        raise ValueError(f"expected a waveform (B, 1, samples), got {tuple(wav.shape)}")


def _check_codes(codes: Tensor, dims: int) -> Tensor:
    if codes.dim() != dims:
        raise ValueError(f"expected codes with {dims} dimensions, got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point:
        raise TypeError(f"codes must be integers, got {codes.dtype}")
    return codes.long()


def load_mimi(
    path: str | Path,
    config: MimiConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> MimiCodec:
    """Load a Mimi safetensors checkpoint (the official file unchanged) strictly.

    ``config`` None means the official sizes. Raises ``MimiCheckpointError`` listing the
    missing, unexpected and mis-shaped tensors if the file does not fit the config."""
    device = torch.device(device if device is not None else "cpu")
    # Build without allocating: every parameter and buffer is replaced by the file's tensor.
    with torch.device("meta"):
        codec = MimiCodec(config)
    expected = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        check_state_dict_shapes(expected, found, str(path))
        state = {k: f.get_tensor(k) for k in expected}
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    codec.load_state_dict(state, strict=True, assign=True)
    return codec.eval()


def check_state_dict_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str
) -> None:
    """Raise ``MimiCheckpointError`` unless ``found`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if not (missing or unexpected or misshaped):
        return
    lines = [f"Mimi checkpoint {where} does not match the model config:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]) + _more(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]) + _more(unexpected))
    if misshaped:
        lines.append(
            f"  mis-shaped keys ({len(misshaped)}): "
            + ", ".join(f"{k} (file {list(found[k])}, model {list(expected[k])})" for k in misshaped[:20])
            + _more(misshaped)
        )
    raise MimiCheckpointError("\n".join(lines))


def _more(keys: list[str]) -> str:
    return f", ... ({len(keys) - 20} more)" if len(keys) > 20 else ""
