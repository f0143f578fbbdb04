"""FastConformer audio encoder (NeMo ``ConformerEncoder`` with dw_striding x8 and rel_pos attention).

Parameter names follow the checkpoint (``conformer.*``) so its state dict loads
as is. Inference only: dropout is omitted and BatchNorm always uses its running
statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm2audio.config import EncoderConfig

# Score given to masked attention positions (the reference uses a finite value, not -inf).
MASKED_SCORE = -10000.0


def _halve(lengths: Tensor) -> Tensor:
    """Output length of a kernel-3, stride-2, padding-1 convolution: ceil(L / 2)."""
    return (lengths - 1).div(2, rounding_mode="floor") + 1


def _time_mask(x: Tensor, lengths: Tensor) -> Tensor:
    """Zero the frames of x (B, C, T, F) at or past each row's length."""
    keep = torch.arange(x.shape[2], device=x.device)[None, :] < lengths[:, None]
    return x.masked_fill(~keep[:, None, :, None], 0.0)


class ConvSubsampling(nn.Module):
    """Three stride-2 3x3 convolutions over (time, mel): conv, then twice depthwise + pointwise.

    Between convolutions, frames past each row's (shrinking) length are zeroed,
    so a padded batch gives the same valid frames as each row alone.
    """

    def __init__(self, feat_in: int, channels: int, d_model: int) -> None:
        super().__init__()
        # Index layout of the checkpoint: ReLUs sit at 1, 4 and 7.
        self.conv = nn.ModuleList(
            [
                nn.Conv2d(1, channels, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1),
                nn.ReLU(),
            ]
        )
        freq = feat_in
        for _ in range(3):
            freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, feat_in) -> ((B, ceil(T/8), d_model), lengths)."""
        x = _time_mask(x[:, None], lengths)
        for layer in self.conv:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                if layer.stride != (1, 1):
                    lengths = _halve(lengths)
                x = _time_mask(x, lengths)
        b, c, t, f = x.shape
        # Flatten (channel, freq) with freq fastest.
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return x, lengths


def relative_positions(length: int, d_model: int, device: torch.device) -> Tensor:
    """Sinusoidal encodings (1, 2L-1, d_model) of relative positions L-1, L-2, ..., -(L-1)."""
    pos = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(2 * length - 1, d_model, device=device)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe[None]


class RelPositionAttention(nn.Module):
    """Transformer-XL self-attention with relative positions and per-layer biases u, v."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, D), pos_emb (1, 2T-1, D), mask (B, T, T) True where attention is NOT allowed."""
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        q = self.linear_q(x).view(b, t, h, hd)
        k = self.linear_k(x).view(b, t, h, hd).transpose(1, 2)
        v = self.linear_v(x).view(b, t, h, hd).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, h, hd).transpose(1, 2)  # (1, H, 2T-1, hd)

        content = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # (B, H, T, T)
        position = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, H, T, 2T-1)
        # Column c of `position` is relative distance T-1-c; query i attending key j needs distance i-j,
        # i.e. column T-1-i+j.
        idx = torch.arange(t, device=x.device)
        cols = (t - 1) - idx[:, None] + idx[None, :]
        position = position.gather(-1, cols.expand(b, h, t, t))

        scores = (content + position) / math.sqrt(hd)
        mask = mask[:, None]
        scores = scores.masked_fill(mask, MASKED_SCORE)
        # Fully masked rows (padded queries) end up all zero rather than uniform.
        probs = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, h * hd)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.silu(self.linear1(x)))


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv, BatchNorm, SiLU, pointwise conv (channels-first inside)."""

    def __init__(self, d_model: int, kernel_size: int, context: tuple[int, int]) -> None:
        super().__init__()
        self.context = context
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """x (B, T, D), pad_mask (B, T) True at padded frames."""
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        # Padded frames must not leak into valid ones through the depthwise kernel.
        x = x.masked_fill(pad_mask[:, None, :], 0.0)
        x = self.depthwise_conv(F.pad(x, self.context))
        bn = self.batch_norm
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        x = self.pointwise_conv2(F.silu(x))
        return x.transpose(1, 2)


class ConformerLayer(nn.Module):
    """Macaron block: half FF, self-attention, conv module, half FF, final LayerNorm (all pre-norm residual)."""

    def __init__(self, cfg: EncoderConfig, conv_context: tuple[int, int]) -> None:
        super().__init__()
        d, d_ff = cfg.d_model, cfg.d_model * cfg.ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, d_ff)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionAttention(d, cfg.n_heads)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(d, cfg.conv_kernel_size, conv_context)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, d_ff)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x: Tensor, pos_emb: Tensor, att_mask: Tensor, pad_mask: Tensor) -> Tensor:
        x = x + self.feed_forward1(self.norm_feed_forward1(x)) * 0.5
        x = x + self.self_attn(self.norm_self_att(x), pos_emb, att_mask)
        x = x + self.conv(self.norm_conv(x), pad_mask)
        x = x + self.feed_forward2(self.norm_feed_forward2(x)) * 0.5
        return self.norm_out(x)


def _conv_context(cfg: EncoderConfig) -> tuple[int, int]:
    """(left, right) padding of the depthwise conv from ``conv_context_size``."""
    k = cfg.conv_kernel_size
    ctx = cfg.conv_context_size
    if ctx is None:
        return ((k - 1) // 2, (k - 1) // 2)
    if ctx == "causal":
        return (k - 1, 0)
    if isinstance(ctx, list | tuple) and len(ctx) == 2 and ctx[0] + ctx[1] + 1 == k:
        return (int(ctx[0]), int(ctx[1]))
    raise ValueError(
        f"encoder.conv_context_size: expected null, 'causal' or [left, right] summing to {k - 1}, got {ctx!r}"
    )


class ConformerEncoder(nn.Module):
    """Log-mel (B, feat_in, T) -> encodings (B, d_model, ceil(T/8))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        unsupported = {
            "xscaling": cfg.xscaling,
            "causal_downsampling": cfg.causal_downsampling,
            "reduction": cfg.reduction is not None and cfg.reduction_factor > 1,
            "untie_biases=false": not cfg.untie_biases,
            "feat_out": cfg.feat_out > 0 and cfg.feat_out != cfg.d_model,
            "att_context_size": list(cfg.att_context_size) != [-1, -1],
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"encoder: unsupported setting(s) {', '.join(bad)}")
        self.feat_in = cfg.feat_in
        self.d_model = cfg.d_model
        channels = cfg.subsampling_conv_channels if cfg.subsampling_conv_channels > 0 else cfg.d_model
        self.pre_encode = ConvSubsampling(cfg.feat_in, channels, cfg.d_model)
        context = _conv_context(cfg)
        self.layers = nn.ModuleList(ConformerLayer(cfg, context) for _ in range(cfg.n_layers))

    @staticmethod
    def output_lengths(lengths: Tensor) -> Tensor:
        """Encoder frames for ``lengths`` input frames: three halvings, ceil(L / 8)."""
        return _halve(_halve(_halve(lengths)))

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """features (B, feat_in, T), lengths (B,) valid frames -> (out (B, d_model, T'), out_lengths (B,))."""
        if features.dim() != 3 or features.shape[1] != self.feat_in:
            raise ValueError(f"features must have shape (batch, {self.feat_in}, frames), got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise ValueError(f"features must be a floating point tensor, got {features.dtype}")
        lengths = torch.as_tensor(lengths, device=features.device)
        if lengths.dim() != 1 or lengths.shape[0] != features.shape[0]:
            raise ValueError(f"lengths must have shape ({features.shape[0]},), got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.numel() and (lengths.min() < 0 or lengths.max() > features.shape[2]):
            raise ValueError(f"lengths must lie in [0, {features.shape[2]}], got {lengths.tolist()}")
        lengths = lengths.to(torch.int64)

        x, lengths = self.pre_encode(features.transpose(1, 2), lengths)
        t = x.shape[1]
        pos_emb = relative_positions(t, self.d_model, x.device).to(x.dtype)
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]  # (B, T')
        # A pair is attendable only when both query and key are valid frames.
        att_mask = ~(valid[:, :, None] & valid[:, None, :])
        pad_mask = ~valid
        for layer in self.layers:
            x = layer(x, pos_emb, att_mask, pad_mask)
        return x.transpose(1, 2), lengths
