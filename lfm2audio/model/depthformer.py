"""Depthformer: the small transformer that turns one backbone state into a frame's 8 codes.

For codebook k the input is ``depth_linear(h)[k] + depth_embeddings[k-1](code[k-1])``
(nothing is added for k = 0); it runs causally over the 8 codebooks with a KV
cache, and ``depth_embeddings[k].to_logits(embedding_norm(out))`` gives the
logits of codebook k. Attention is GQA (32 heads, 8 KV heads, head_dim =
dim/32) with per-head RMSNorm on q and k and RoPE on interleaved pairs at
positions 0..7. Parameter names follow the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm2audio.config import DepthformerConfig
from lfm2audio.model.lfm2 import RMSNorm, SwiGLU
from lfm2audio.model.linear import Linear


def swiglu_width(dim: int, multiple_of: int = 256) -> int:
    """Feed-forward width of the reference GLU for ff_dim = 4 * dim."""
    ff = int(2 * (4 * dim) / 3)
    return multiple_of * ((ff + multiple_of - 1) // multiple_of)


class CodebookEmbedding(nn.Module):
    """Embedding table, output norm and logits head of one codebook (names as in the checkpoint)."""

    def __init__(self, dim: int, vocab: int, eps: float, tie: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.embedding_norm = RMSNorm(dim, eps, scale_in_float=True)
        self.to_logits = Linear(dim, vocab, bias=False)
        self.tie = tie
        self.retie()

    def retie(self) -> None:
        if self.tie:
            self.to_logits.weight = self.embedding.weight

    def logits(self, x: Tensor) -> Tensor:
        return self.to_logits(self.embedding_norm(x))


class BoundedAttention(nn.Module):
    """Holds the q/k norms; the name matches the checkpoint's ``operator.bounded_attention``."""

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.q_layernorm = RMSNorm(head_dim, eps, scale_in_float=True)
        self.k_layernorm = RMSNorm(head_dim, eps, scale_in_float=True)


class DepthAttention(nn.Module):
    def __init__(self, cfg: DepthformerConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        width = cfg.dim + 2 * self.n_kv * self.head_dim
        self.qkv_proj = Linear(cfg.dim, width, bias=False)
        self.out_proj = Linear(cfg.dim, cfg.dim, bias=False)
        self.bounded_attention = BoundedAttention(self.head_dim, cfg.norm_eps)

    def forward(self, x: Tensor, rotation: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
        """One codebook step for B rows: x (B, dim); caches (B, 8, n_kv, head_dim) filled up to ``pos``;
        ``rotation`` (head_dim, head_dim) is RoPE at ``pos`` as a matrix (``rope_matrices``)."""
        B = x.shape[0]
        hd, H, n_kv = self.head_dim, self.n_heads, self.n_kv
        qkv = self.qkv_proj(x)
        # q and k heads side by side, each normalised over head_dim with its own weight, then rotated:
        # three ops for both (the attention scale rides on the q weights: RoPE is linear).
        norms = self.bounded_attention
        q_weight = (norms.q_layernorm.weight * hd**-0.5).expand(H, hd)
        qk_weight = torch.cat([q_weight, norms.k_layernorm.weight.expand(n_kv, hd)])
        qk = F.rms_norm(_float(qkv[:, : (H + n_kv) * hd].view(B, H + n_kv, hd)), (hd,), eps=norms.q_layernorm.eps)
        qk = torch.matmul(qk * qk_weight, rotation)
        q, k = qk[:, :H], qk[:, H:]
        k_cache[:, pos] = k
        v_cache[:, pos] = qkv[:, (H + n_kv) * hd :].view(B, n_kv, hd)
        # One query over at most 8 keys, every cached key visible: written out as two small batched
        # products. (CPU's fused attention kernel schedules one block per row and head, which costs
        # far more than this arithmetic at batch sizes of a hundred sessions.) The scores are laid
        # out (B, n_kv, P, group), the softmax running over P with the group's heads contiguous:
        # over a last dimension of at most 8 it cost 5-10x more at 40 rows (bench_engine_overhead).
        group = H // n_kv
        qg = q.reshape(B, n_kv, group, hd)
        keys = _float(k_cache[:, : pos + 1].transpose(1, 2))  # (B, n_kv, P, hd)
        weights = torch.matmul(keys, qg.transpose(-1, -2)).softmax(dim=-2)  # (B, n_kv, P, group)
        values = _float(v_cache[:, : pos + 1].transpose(1, 2))
        out = torch.matmul(weights.transpose(-1, -2), values)  # (B, n_kv, group, hd)
        return self.out_proj(out.reshape(B, H * hd).to(x.dtype))


def _float(t: Tensor) -> Tensor:
    # ``t.float()`` costs a dispatch even when ``t`` is float32 already (a step makes dozens).
    return t if t.dtype == torch.float32 else t.float()


def rope_matrices(rope: Tensor) -> Tensor:
    """Rotations (P, head_dim/2) as complex numbers -> (P, head_dim, head_dim) real matrices R such
    that ``x @ R[p]`` rotates each consecutive pair (x[2i], x[2i+1]) by ``rope[p, i]``."""
    P, half = rope.shape
    c, s = rope.real, rope.imag
    R = torch.zeros(P, 2 * half, 2 * half, device=rope.device)
    i = torch.arange(half, device=rope.device)
    R[:, 2 * i, 2 * i] = c
    R[:, 2 * i + 1, 2 * i] = -s
    R[:, 2 * i, 2 * i + 1] = s
    R[:, 2 * i + 1, 2 * i + 1] = c
    return R


class DepthBlock(nn.Module):
    def __init__(self, cfg: DepthformerConfig) -> None:
        super().__init__()
        self.operator = DepthAttention(cfg)
        self.feed_forward = SwiGLU(cfg.dim, swiglu_width(cfg.dim))
        self.operator_norm = RMSNorm(cfg.dim, cfg.norm_eps, scale_in_float=True)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, scale_in_float=True)


class Depthformer(nn.Module):
    def __init__(self, cfg: DepthformerConfig, codebooks: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.codebooks = codebooks
        self.layers = nn.ModuleList(DepthBlock(cfg) for _ in range(cfg.layers))
        self.init_buffers()

    def init_buffers(self) -> None:
        hd = self.cfg.head_dim
        freqs = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        angles = torch.outer(torch.arange(self.codebooks).float(), freqs)
        device = self.layers[0].operator_norm.weight.device if len(self.layers) else None
        if device is not None and device.type == "meta":
            device = None
        rope = torch.polar(torch.ones_like(angles), angles)
        self.register_buffer("rope", rope_matrices(rope).to(device), persistent=False)  # (codebooks, hd, hd)

    def step(self, x: Tensor, caches: list[tuple[Tensor, Tensor]], pos: int) -> Tensor:
        for blk, (kc, vc) in zip(self.layers, caches, strict=True):
            x = x + blk.operator(blk.operator_norm(x), self.rope[pos], kc, vc, pos)
            x = x + blk.feed_forward(blk.ffn_norm(x))
        return x

    def new_caches(self, batch: int, device: torch.device, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        shape = (batch, self.codebooks, self.cfg.num_kv_heads, self.cfg.head_dim)
        return [
            (torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
            for _ in self.layers
        ]


def sample_audio_frame(
    depthformer: Depthformer,
    depth_linear: nn.Linear,
    embeddings: nn.ModuleList,
    hidden: Tensor,
    pick: Callable[[Tensor, int], Tensor],
    return_logits: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Codes (B, codebooks) for backbone states ``hidden`` (B, hidden), one codebook after another.

    ``pick(logits, k)`` chooses codebook k's codes (B,) from its logits (B, vocab).
    With ``return_logits`` also returns the (B, codebooks, vocab) logits along the chosen path.
    The same fixed sequence of batched ops for any B (zero rows included).
    """
    B = hidden.shape[0]
    C, dim = depthformer.codebooks, depthformer.cfg.dim
    inputs = depth_linear(hidden).view(B, C, dim)
    caches = depthformer.new_caches(B, hidden.device, hidden.dtype)
    codes = torch.empty(B, C, dtype=torch.long, device=hidden.device)
    all_logits = []
    prev = torch.zeros(B, dim, device=hidden.device, dtype=hidden.dtype)
    for k in range(C):
        out = depthformer.step(inputs[:, k] + prev, caches, k)
        logits = embeddings[k].logits(out)
        if return_logits:
            all_logits.append(logits)
        codes[:, k] = pick(logits, k)
        prev = embeddings[k].embedding(codes[:, k])
    if return_logits:
        return codes, torch.stack(all_logits, 1)
    return codes
