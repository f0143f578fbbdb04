"""Mimi's projected transformers (one after the SEANet encoder, one before the decoder).

Pre-norm layers: ``x += ls1 * attn(LN1(x)); x += ls2 * W2 gelu(W1 LN2(x))`` with LayerNorm
(eps 1e-5, affine), exact (erf) GELU, no biases in the linear layers, per-channel layer
scale, and causal multi-head attention limited to the last ``context`` steps (the query's
own step included). Queries and keys are rotated by RoPE on interleaved (even, odd) pairs,
``theta_i = max_period ** (-2 i / head_dim)``, computed in float32 as in moshi.

Streaming keeps keys/values in a fixed-size window per row (``KVWindow``): position ``p``
of a row is stored in slot ``p % window`` and each slot records the position it holds, from
which the attention mask is built. Rows can therefore be at different positions (streams
started at different times), and be reset, dropped or moved between batches one by one.

The window holds ``context + chunk - 1`` steps, where ``chunk`` is the largest number of
steps fed at once (2 for one Mimi frame): after writing a chunk, the first query of the
chunk still finds all ``context`` keys it may attend to. (moshi's ring cache holds only
``context`` entries, so after 250 steps its streaming output drifts slightly from its
whole-clip output; ours stays equal to the whole-clip result.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mimi_config import MimiTransformerConfig

RowSelector = Tensor | list[int] | int


def rows_to_index(rows: RowSelector, batch: int, device: torch.device) -> Tensor:
    """Normalise a row selector (bool mask of length ``batch``, indices, or one int) to a long index tensor."""
    if isinstance(rows, int):
        rows = [rows]
    idx = torch.as_tensor(rows, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (batch,):
            raise ValueError(f"row mask must have shape ({batch},), got {tuple(idx.shape)}")
        return idx.nonzero().flatten()
    idx = idx.to(torch.long).flatten()
    if idx.numel() and (int(idx.min()) < -batch or int(idx.max()) >= batch):
        raise IndexError(f"row index out of range for batch of {batch}")
    return idx % batch if idx.numel() else idx


@dataclass
class KVWindow:
    """Streaming state of one transformer: the recent keys/values of every layer, per row.

    ``keys``/``values``: (layers, B, heads, window, head_dim); position ``p`` of a row lives in
    slot ``p % window``. ``positions``: (B, window) position held by each slot, -1 when empty
    (the attention mask is built from it); ``offsets``: (B,) position of each row's next step.
    Rows are fully independent: each may be at any position, and can be reset, selected,
    concatenated or overwritten without touching the others.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    offsets: Tensor

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0]

    @property
    def window(self) -> int:
        return self.positions.shape[1]

    def reset_rows(self, rows: RowSelector) -> KVWindow:
        """Forget the history of some rows (they restart at position 0); other rows are untouched."""
        idx = rows_to_index(rows, self.batch_size, self.offsets.device)
        self.keys.index_fill_(1, idx, 0.0)
        self.values.index_fill_(1, idx, 0.0)
        self.positions.index_fill_(0, idx, -1)
        self.offsets.index_fill_(0, idx, 0)
        return self

    def select(self, rows: RowSelector) -> KVWindow:
        """A new window with only the given rows, in the given order."""
        idx = rows_to_index(rows, self.batch_size, self.offsets.device)
        return KVWindow(
            self.keys.index_select(1, idx),
            self.values.index_select(1, idx),
            self.positions.index_select(0, idx),
            self.offsets.index_select(0, idx),
        )

    def assign_rows(self, rows: RowSelector, other: KVWindow) -> KVWindow:
        """Overwrite the given rows with the rows of ``other`` (in order), in place."""
        idx = rows_to_index(rows, self.batch_size, self.offsets.device)
        self.keys.index_copy_(1, idx, other.keys)
        self.values.index_copy_(1, idx, other.values)
        self.positions.index_copy_(0, idx, other.positions)
        self.offsets.index_copy_(0, idx, other.offsets)
        return self

    def clone(self) -> KVWindow:
        return KVWindow(self.keys.clone(), self.values.clone(), self.positions.clone(), self.offsets.clone())

    @staticmethod
    def cat(windows: list[KVWindow]) -> KVWindow:
        """Stack the rows of several windows (same layer count, heads and window size)."""
        return KVWindow(
            torch.cat([w.keys for w in windows], dim=1),
            torch.cat([w.values for w in windows], dim=1),
            torch.cat([w.positions for w in windows], dim=0),
            torch.cat([w.offsets for w in windows], dim=0),
        )


def rope_rotation(positions: Tensor, head_dim: int, max_period: float) -> Tensor:
    """Unit complex rotations ``cos + i sin`` of shape ``positions.shape + (head_dim // 2,)``,
    angles computed in float32 with moshi's formula."""
    ds = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    angles = freqs * positions.to(torch.float32).unsqueeze(-1)
    return torch.complex(torch.cos(angles), torch.sin(angles))


class LayerScale(nn.Module):
    """Learnt per-channel scale of a residual branch (parameter ``scale``)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))


class MimiAttention(nn.Module):
    """Fused q|k|v projection and output projection, no biases (moshi's ``in_projs.0`` / ``out_projs.0``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        # Registration order = the official state-dict order.
        self.out_projs = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.in_projs = nn.ModuleList([nn.Linear(dim, 3 * dim, bias=False)])
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    def qkv(self, x: Tensor, rot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, C) -> q, k, v as (B, H, T, D). RoPE rotates the (even, odd) pairs of q and k
        together: one complex product with ``rot`` (B or 1, T, 1, 1, D/2)."""
        B, T, _ = x.shape
        proj = self.in_projs[0](x).view(B, T, 3, self.num_heads, self.head_dim)
        pairs = proj[:, :, :2].unflatten(-1, (self.head_dim // 2, 2))
        if pairs.dtype not in (torch.float32, torch.float64):
            pairs = pairs.float()  # no complex half types: rotate in float32, as moshi does
        qk = torch.view_as_real(torch.view_as_complex(pairs) * rot).flatten(-2).to(proj.dtype)
        return qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), proj[:, :, 2].transpose(1, 2)

    def out(self, o: Tensor) -> Tensor:
        B, H, T, D = o.shape
        return self.out_projs[0](o.transpose(1, 2).reshape(B, T, H * D))


class MimiTransformerLayer(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn = MimiAttention(d, cfg.num_heads)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d, bias=False)
        self.layer_scale_1: nn.Module
        self.layer_scale_2: nn.Module
        if cfg.layer_scale is None:
            self.layer_scale_1 = self.layer_scale_2 = nn.Identity()
        else:
            self.layer_scale_1 = LayerScale(d, cfg.layer_scale)
            self.layer_scale_2 = LayerScale(d, cfg.layer_scale)

    def _residual(self, x: Tensor, scale: nn.Module, update: Tensor) -> Tensor:
        if isinstance(scale, LayerScale):
            return torch.addcmul(x, scale.scale, update)
        return x + update

    def _feed_forward(self, x: Tensor) -> Tensor:
        update = self.linear2(F.gelu(self.linear1(self.norm2(x))))
        return self._residual(x, self.layer_scale_2, update)

    def step(
        self,
        x: Tensor,
        rot: Tensor,
        keys: Tensor,
        values: Tensor,
        index: Tensor,
        mask: Tensor,
    ) -> Tensor:
        """A chunk (B, T, C); scatters its keys/values into the window ``keys``/``values``
        (B, H, W, D) at slots ``index`` (B, H, T, D) and attends over the whole window under
        the additive ``mask`` (B, 1, T, W)."""
        q, k, v = self.self_attn.qkv(self.norm1(x), rot)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        o = window_attention(q, keys, values, mask)
        x = self._residual(x, self.layer_scale_1, self.self_attn.out(o))
        return self._feed_forward(x)


# Queries per call up to which attention is two explicit products (a streaming frame has 2).
_SMALL_QUERY = 4


def window_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention of q (B, H, T, D) over the window keys/values (B, H, W, D) under the additive mask.

    A streaming step has a couple of queries per row: the CPU's fused kernel schedules one block
    per row and head, which at a hundred rows costs several times this arithmetic, so short
    calls are written out as a batched product, softmax and product. Whole clips use the fused kernel.
    """
    if q.shape[2] > _SMALL_QUERY:
        return F.scaled_dot_product_attention(q, keys, values, mask)
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).add_(mask)
    return torch.matmul(scores.softmax(dim=-1), values)


class _Layers(nn.Module):
    """Holds ``layers`` so parameter names read ``transformer.layers.N...`` as in the checkpoint."""

    def __init__(self, cfg: MimiTransformerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MimiTransformerLayer(cfg) for _ in range(cfg.num_layers)])


class MimiTransformer(nn.Module):
    """moshi's ``ProjectedTransformer``, time-major: (B, T, C) -> (B, T, C), always incremental
    (a whole clip is one call, or several, from a fresh ``KVWindow``)."""

    def __init__(self, cfg: MimiTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = _Layers(cfg)
        self.input_proj = (
            nn.Linear(cfg.input_dimension, cfg.d_model, bias=False) if cfg.input_dimension != cfg.d_model else None
        )
        self.output_projs = nn.ModuleList(
            [
                nn.Identity() if dim == cfg.d_model else nn.Linear(cfg.d_model, dim, bias=False)
                for dim in cfg.output_dimensions
            ]
        )
        self.head_dim = cfg.d_model // cfg.num_heads

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> Tensor:
        # Shaped to broadcast over (B, T, q|k, H, D/2).
        rot = rope_rotation(positions, self.head_dim, self.cfg.max_period)[..., None, None, :]
        return rot.to(torch.complex128) if dtype == torch.float64 else rot

    def _project_in(self, x: Tensor) -> Tensor:
        return self.input_proj(x) if self.input_proj is not None else x

    def _project_out(self, x: Tensor) -> Tensor:
        return self.output_projs[0](x)

    def stream_state(self, batch: int, chunk: int, device: torch.device, dtype: torch.dtype) -> KVWindow:
        """An empty window for ``batch`` rows fed at most ``chunk`` steps per call (larger calls are split)."""
        window = self.cfg.context + max(1, chunk) - 1
        shape = (len(self.layers), batch, self.cfg.num_heads, window, self.head_dim)
        return KVWindow(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            positions=torch.full((batch, window), -1, device=device, dtype=torch.long),
            offsets=torch.zeros(batch, device=device, dtype=torch.long),
        )

    def step(self, x: Tensor, state: KVWindow) -> Tensor:
        """Next steps (B, T, C) of every row; ``state`` is updated in place."""
        x = self._project_in(x)
        T = x.shape[1]
        max_chunk = state.window - self.cfg.context + 1
        if T > max_chunk:
            return self._project_out(
                torch.cat([self._step(x[:, s : s + max_chunk], state) for s in range(0, T, max_chunk)], dim=1)
            )
        return self._project_out(self._step(x, state))

    def _step(self, x: Tensor, state: KVWindow) -> Tensor:
        B, T, _ = x.shape
        pos_q = state.offsets[:, None] + torch.arange(T, device=x.device)  # (B, T)
        slots = pos_q % state.window
        state.positions.scatter_(1, slots, pos_q)
        pos_k = state.positions[:, None, :]
        dq = pos_q[:, :, None] - pos_k
        allowed = ((pos_k >= 0) & (dq >= 0) & (dq < self.cfg.context))[:, None]  # (B, 1, T, W)
        # Additive float mask, built once for all layers (a bool mask is converted per call).
        mask = torch.zeros(allowed.shape, device=x.device, dtype=x.dtype).masked_fill_(~allowed, float("-inf"))
        rot = self._rope(pos_q, x.dtype)
        index = slots[:, None, :, None].expand(B, self.cfg.num_heads, T, self.head_dim)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, rot, state.keys[i], state.values[i], index, mask)
        state.offsets += T
        return x
