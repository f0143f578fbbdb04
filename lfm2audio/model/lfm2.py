"""LFM2 hybrid backbone: gated short-convolution blocks and GQA attention blocks.

Numerically this is transformers' ``Lfm2Model`` (RMSNorm, RoPE in rotate-half
form, QK RMSNorm, SwiGLU, final ``embedding_norm``); the parameter names are the
checkpoint's. What differs is the cache: an explicit ``LFM2Cache`` object with a
batch dimension, a preallocated KV buffer per attention layer indexed by
position, a convolution tail per conv layer, and a per-row length, so rows at
different positions can be stepped together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm2audio.config import LFM2Config
from lfm2audio.model.linear import Linear


class ContextFullError(RuntimeError):
    """A row would write past the end of its preallocated KV cache."""


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32.

    LFM2 (transformers) casts back to the input dtype and then scales; the
    reference's depthformer scales in float32 and then casts
    (``scale_in_float``). The two differ only below float32.
    """

    def __init__(self, dim: int, eps: float, *, scale_in_float: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.scale_in_float = scale_in_float
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's rms_norm is x * rsqrt(mean(x^2) + eps) [* weight], bit for bit, in one call.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no conversions to dispatch
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        if self.scale_in_float or x.dtype == torch.float32:
            return F.rms_norm(xf, (xf.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        return self.weight * F.rms_norm(xf, (xf.shape[-1],), None, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    # Sibling projections of one input that a quantized model holds as one layer (quantize.join_projections).
    joinable = {"w13": ("w1", "w3")}

    def __init__(self, dim: int, ff_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, ff_dim, bias=False)
        self.w3 = Linear(dim, ff_dim, bias=False)
        self.w2 = Linear(ff_dim, dim, bias=False)
        self.w13: nn.Module | None = None  # w1 and w3 as one layer (quantized models)

    def forward(self, x: Tensor) -> Tensor:
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


@dataclass
class LFM2Cache:
    """Decoding state of the backbone for ``batch`` independent rows (``lfm2audio.row_state`` protocol).

    ``keys[i]`` / ``values[i]`` belong to the i-th attention layer and have shape
    (batch, max_len + 1, n_kv_heads, head_dim); position p of row b lives at [b, p].
    The extra last position is scratch: padding tokens of rows that do not
    advance (``valid`` 0 in a batched step) write there, never over real keys.
    ``conv[i]`` holds the last ``L_cache - 1`` gated inputs of the i-th conv layer,
    (batch, hidden, L_cache - 1). ``lengths[b]`` counts the tokens row b has seen,
    which is also the position of its next token.
    """

    keys: list[Tensor]
    values: list[Tensor]
    conv: list[Tensor]
    lengths: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def max_len(self) -> int:
        """Positions a row can hold."""
        return int(self.keys[0].shape[1]) - 1 if self.keys else 1 << 62

    def rows(self, start: int, stop: int) -> LFM2Cache:
        """A view of rows [start, stop): stepping it updates this cache in place."""
        return LFM2Cache(
            keys=[k[start:stop] for k in self.keys],
            values=[v[start:stop] for v in self.values],
            conv=[c[start:stop] for c in self.conv],
            lengths=self.lengths[start:stop],
        )

    def snapshot_row(self, row: int) -> tuple[list[Tensor], int]:
        """The small part of a row's state that cannot be rewound (conv tails), and its length."""
        return [c[row].clone() for c in self.conv], int(self.lengths[row])

    def rewind_row(self, row: int, snapshot: tuple[list[Tensor], int]) -> None:
        """Return row ``row`` to a snapshot taken earlier on this row (its keys up to that length are intact)."""
        tails, length = snapshot
        for c, t in zip(self.conv, tails, strict=True):
            c[row] = t
        self.lengths[row] = length

    def reset_rows(self, rows: Tensor | list[int]) -> LFM2Cache:
        """Start the given rows afresh; other rows are untouched. Returns ``self``."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        for c in self.conv:
            c[idx] = 0
        # Stale keys are harmless: positions >= lengths are masked and overwritten.
        self.lengths[idx] = 0
        return self

    def select(self, rows: Tensor | list[int]) -> LFM2Cache:
        """A new cache holding copies of the given rows, in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        return LFM2Cache(
            keys=[k[idx] for k in self.keys],
            values=[v[idx] for v in self.values],
            conv=[c[idx] for c in self.conv],
            lengths=self.lengths[idx].clone(),
        )

    def assign_rows(self, rows: Tensor | list[int], other: LFM2Cache) -> LFM2Cache:
        """Overwrite ``rows`` with the rows of ``other`` (same max_len), in place. Returns ``self``."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        for dst, src in zip(self.keys + self.values + self.conv, other.keys + other.values + other.conv, strict=True):
            dst.index_copy_(0, idx, src)
        self.lengths.index_copy_(0, idx, other.lengths)
        return self

    def copy_row_(self, dst: int, src: LFM2Cache, src_row: int = 0) -> None:
        """Copy row ``src_row`` of ``src`` into row ``dst`` of this cache."""
        n = min(int(src.lengths[src_row]), self.max_len)
        for a, b in zip(self.keys + self.values, src.keys + src.values, strict=True):
            a[dst, :n] = b[src_row, :n]
        for a, b in zip(self.conv, src.conv, strict=True):
            a[dst] = b[src_row]
        self.lengths[dst] = src.lengths[src_row]

    def clone(self) -> LFM2Cache:
        return self.select(torch.arange(self.batch_size, device=self.lengths.device))


class ShortConv(nn.Module):
    """Gated causal depthwise convolution: out_proj(C * conv(B * x))."""

    def __init__(self, cfg: LFM2Config) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.kernel = cfg.conv_L_cache
        self.in_proj = Linear(d, 3 * d, bias=cfg.conv_bias)
        self.conv = nn.Conv1d(d, d, self.kernel, groups=d, bias=cfg.conv_bias, padding=self.kernel - 1)
        self.out_proj = Linear(d, d, bias=cfg.conv_bias)

    def forward(self, x: Tensor, tail: Tensor | None, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
        T = x.shape[1]
        b, c, h = self.in_proj(x).transpose(1, 2).chunk(3, dim=1)
        bx = b * h  # (B, D, T)
        if tail is None:
            y = self.conv(bx)[..., :T]
            return self.out_proj((c * y).transpose(1, 2)), None
        window = torch.cat([tail, bx], dim=2)  # (B, D, L-1+T)
        if T == 1:
            # One position: a 3-tap dot product per channel. F.conv1d (oneDNN) costs 50 us here on an
            # idle CPU and milliseconds on a busy one (a parallel region per call); this costs 15 us.
            y = (window * self.conv.weight[:, 0]).sum(-1, keepdim=True)
            if self.conv.bias is not None:
                y = y + self.conv.bias[:, None]
        else:
            y = F.conv1d(window, self.conv.weight, self.conv.bias, groups=window.shape[1])
        # The new tail is the last L-1 inputs each row really consumed.
        keep = self.kernel - 1
        if valid is None:
            new_tail = window[..., T:]
        else:
            idx = (valid.view(-1, 1) + torch.arange(keep, device=x.device)).view(-1, 1, keep)
            new_tail = window.gather(2, idx.expand(-1, window.shape[1], -1))
        return self.out_proj((c * y).transpose(1, 2)), new_tail.contiguous()


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    joinable = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # see SwiGLU

    def __init__(self, cfg: LFM2Config) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.n_kv * self.head_dim, bias=False)
        self.out_proj = Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_eps)
        self.qkv_proj: nn.Module | None = None  # q, k and v as one layer (quantized models)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v of ``x`` (B, T, hidden), each (B, T, heads, head_dim)."""
        B, T, _ = x.shape
        H, n_kv, hd = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([H * hd, n_kv * hd, n_kv * hd], dim=-1)
        return q.view(B, T, H, hd), k.view(B, T, n_kv, hd), v.view(B, T, n_kv, hd)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv: tuple[Tensor, Tensor] | None,
        positions: Tensor | None,
        kv_len: int,
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            assert positions is not None
            k_cache, v_cache = kv
            rows = torch.arange(B, device=x.device).view(B, 1).expand(B, T)
            k_cache.index_put_((rows, positions), k)
            v_cache.index_put_((rows, positions), v)
            k, v = k_cache[:, :kv_len], v_cache[:, :kv_len]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: LFM2Config, layer_type: str) -> None:
        super().__init__()
        self.is_attention = layer_type != "conv"
        self.sliding = layer_type == "sliding_attention"
        if self.is_attention:
            self.self_attn = Attention(cfg)
        else:
            self.conv = ShortConv(cfg)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.ff_dim)
        self.operator_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class LFM2Backbone(nn.Module):
    """``embed_tokens`` + blocks + ``embedding_norm``; takes embeddings, returns hidden states."""

    def __init__(self, cfg: LFM2Config) -> None:
        super().__init__()
        self.cfg = cfg
        assert cfg.layer_types is not None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.embedding_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the RoPE frequencies next to the weights (called again after meta-device loading)."""
        hd = self.cfg.head_dim
        device = self.embedding_norm.weight.device
        device = None if device.type == "meta" else device
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LFM2Cache:
        """Preallocate a cache for ``batch_size`` rows of up to ``max_len`` positions."""
        ref = self.embed_tokens.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        cfg = self.cfg
        n_attn = sum(1 for blk in self.layers if blk.is_attention)
        n_conv = len(self.layers) - n_attn
        kv_shape = (batch_size, max_len + 1, cfg.num_key_value_heads, cfg.head_dim)
        return LFM2Cache(
            keys=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(n_attn)],
            values=[torch.zeros(kv_shape, device=device, dtype=dtype) for _ in range(n_attn)],
            conv=[
                torch.zeros(batch_size, cfg.hidden_size, cfg.conv_L_cache - 1, device=device, dtype=dtype)
                for _ in range(n_conv)
            ],
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin of shape (B, T, 1, head_dim) for integer positions (B, T)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def attended_len(self, cache: LFM2Cache, T: int, valid: Tensor | None = None) -> int:
        """The ``kv_len`` of a call of ``T`` tokens per row (every row's last position + 1), read from
        the device; raises ContextFullError when a row's tokens do not fit the cache."""
        if not cache.batch_size:
            return 1
        need = int((cache.lengths + (T if valid is None else valid)).max())
        if need > cache.max_len:
            raise ContextFullError(f"context full: {need} positions do not fit a cache of {cache.max_len}")
        return min(int(cache.lengths.max()) + T, cache.max_len + 1)

    def forward(
        self,
        x: Tensor,
        cache: LFM2Cache | None = None,
        *,
        valid: Tensor | None = None,
        kv_len: int | None = None,
    ) -> tuple[Tensor, LFM2Cache | None]:
        """Run embeddings ``x`` (B, T, D) through the backbone.

        Without a cache the T positions start at 0 (a whole sequence). With a
        cache, row b's tokens take positions ``cache.lengths[b] + t``; ``valid``
        (B,) says how many of the T tokens of each row are real (the rest is
        padding whose outputs are garbage and whose state is not kept).
        The cache is updated in place and returned.

        ``kv_len`` (with a cache) is the caller's bound on the key positions to
        attend over (at least every row's last position + 1; ``max_len + 1`` for
        a shape that never changes): the caller then vouches that every row
        fits, and the forward reads nothing back from the device.
        """
        B, T, _ = x.shape
        cfg = self.cfg
        window = cfg.sliding_window
        if cache is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
            kv_len = T
            full_mask = sliding_mask = None
            if window is not None and any(blk.sliding for blk in self.layers):
                i = torch.arange(T, device=x.device)
                d = i.view(1, -1) - i.view(-1, 1)
                sliding_mask = ((d <= 0) & (d > -window)).view(1, 1, T, T)
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache has {cache.batch_size} rows but the input has {B}")
            positions = cache.lengths.view(B, 1) + torch.arange(T, device=x.device)
            if kv_len is None:
                kv_len = self.attended_len(cache, T, valid)
            kv_len = min(kv_len, cache.max_len + 1)
            key_pos = torch.arange(kv_len, device=x.device).view(1, 1, 1, kv_len)
            qpos = positions.view(B, 1, T, 1)
            full_mask = key_pos <= qpos
            sliding_mask = full_mask & (key_pos > qpos - window) if window is not None else None
        cos, sin = self.rope(positions, x.dtype)
        # Padding tokens of rows at their limit land in the scratch position.
        write = positions.clamp(max=cache.max_len) if cache is not None else None

        attn_i = conv_i = 0
        for blk in self.layers:
            h = blk.operator_norm(x)
            if blk.is_attention:
                kv = (cache.keys[attn_i], cache.values[attn_i]) if cache is not None else None
                mask = sliding_mask if blk.sliding else full_mask
                h = blk.self_attn(h, cos, sin, mask, kv, write, kv_len)
                attn_i += 1
            else:
                tail = cache.conv[conv_i] if cache is not None else None
                h, new_tail = blk.conv(h, tail, valid)
                if cache is not None:
                    cache.conv[conv_i].copy_(new_tail)
                conv_i += 1
            x = x + h
            x = x + blk.feed_forward(blk.ffn_norm(x))
        x = self.embedding_norm(x)

        if cache is not None:
            cache.lengths += T if valid is None else valid
        return x, cache
