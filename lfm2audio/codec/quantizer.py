"""Mimi's split residual vector quantizer.

Two residual VQs read the same latent through their own 1x1 input projections: ``rvq_first``
(1 "semantic" codebook) and ``rvq_rest`` (the acoustic codebooks; the acoustic residual
chain starts from its own projection, not from the semantic residual). Each codebook has
``bins`` centroids ``embedding_sum / max(cluster_usage, 1e-5)`` (EMA statistics stored in
the checkpoint). Encoding picks the nearest centroid (Euclidean, ``torch.cdist`` as in moshi)
level by level; decoding sums the centroids of each VQ and adds the two output projections.

The checkpoint stores ``n_q`` codebooks (32 for Mimi); only the first ``num_codebooks``
(8) are used. Their centroids are cached, stacked as (num_codebooks, bins, dim), and rebuilt
automatically whenever their statistics change (loaded, replaced, moved or edited in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mimi_config import QuantizerConfig
from .seanet import tensor_identity

_EPSILON = 1e-5


class _Codebook(nn.Module):
    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self.register_buffer("_initialized", torch.zeros(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def centroids(self) -> Tensor:
        return self.embedding_sum / self.cluster_usage.clamp(min=_EPSILON)[:, None]


class _VQLayer(nn.Module):
    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self._codebook = _Codebook(dim, bins)


class _VQLayers(nn.Module):
    def __init__(self, dim: int, bins: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_VQLayer(dim, bins) for _ in range(n)])


class ResidualVQ(nn.Module):
    """One residual VQ with 1x1-conv input/output projections (moshi always projects here)."""

    def __init__(self, cfg: QuantizerConfig, n_q: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(cfg.input_dimension, cfg.dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(cfg.dimension, cfg.output_dimension, 1, bias=False)
        self.vq = _VQLayers(cfg.dimension, cfg.bins, n_q)

    def codebook(self, i: int) -> _Codebook:
        return self.vq.layers[i]._codebook


class SplitResidualVQ(nn.Module):
    """Codes (B, K, T) <-> time-major latent (B, T, C); K <= ``num_codebooks``."""

    def __init__(self, cfg: QuantizerConfig, num_codebooks: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_q_semantic = cfg.n_q_semantic
        self.rvq_first = ResidualVQ(cfg, cfg.n_q_semantic)
        self.rvq_rest = ResidualVQ(cfg, cfg.n_q - cfg.n_q_semantic)
        self.set_num_codebooks(num_codebooks)
        self._table: Tensor | None = None
        self._table_src: list[Tensor] = []
        self._table_key: tuple | None = None

    def _codebook(self, level: int) -> _Codebook:
        if level < self.n_q_semantic:
            return self.rvq_first.codebook(level)
        return self.rvq_rest.codebook(level - self.n_q_semantic)

    def set_num_codebooks(self, num_codebooks: int) -> None:
        """Use the first ``num_codebooks`` levels."""
        if not self.n_q_semantic <= num_codebooks <= self.cfg.n_q:
            raise ValueError(f"num_codebooks must lie in [{self.n_q_semantic}, {self.cfg.n_q}]")
        self.num_codebooks = num_codebooks

    @property
    def codebooks(self) -> Tensor:
        """Centroids of the active levels, (num_codebooks, bins, dim)."""
        books = [self._codebook(i) for i in range(self.num_codebooks)]
        src = [t for b in books for t in (b.embedding_sum, b.cluster_usage)]
        # Identity, storage and version of every statistic: detects load_state_dict (in place
        # or assign), .to() and manual edits, so the cache is never stale. The cache holds the
        # tensors, so their storage cannot be freed and reused under the same pointer.
        key = tuple(tensor_identity(t) for t in src)
        fresh = len(src) == len(self._table_src) and all(a is b for a, b in zip(src, self._table_src, strict=True))
        if self._table is None or not fresh or self._table_key != key:
            with torch.no_grad():
                self._table = torch.stack([b.centroids() for b in books])
            self._table_src, self._table_key = src, key
        return self._table

    def _check_levels(self, k: int) -> None:
        if not 1 <= k <= self.num_codebooks:
            raise ValueError(f"{k} codebooks requested but {self.num_codebooks} are active (see set_num_codebooks)")

    def encode(self, x: Tensor, num_codebooks: int | None = None) -> Tensor:
        """Latent (B, T, C) -> codes (B, K, T) int64."""
        k_total = self.num_codebooks if num_codebooks is None else num_codebooks
        self._check_levels(k_total)
        B, T, _ = x.shape
        groups = [(self.rvq_first, range(0, min(k_total, self.n_q_semantic)))]
        if k_total > self.n_q_semantic:
            groups.append((self.rvq_rest, range(self.n_q_semantic, k_total)))
        tables = self.codebooks
        codes = []
        for rvq, levels in groups:
            # (B*T, D): the vectors quantized independently.
            residual = _project(x, rvq.input_proj).reshape(B * T, -1)
            for level in levels:
                table = tables[level]
                idx = torch.cdist(residual[None], table[None], p=2.0)[0].argmin(dim=-1)
                codes.append(idx)
                if level + 1 < levels.stop:
                    residual = residual - F.embedding(idx, table)
        return torch.stack(codes, dim=1).view(B, T, k_total).transpose(1, 2)

    def decode(self, codes: Tensor, *, check: bool = True) -> Tensor:
        """Codes (B, K, T) -> latent (B, T, C). ``check=False`` skips the range check of the codes (a
        device-to-host read, which a CUDA graph cannot hold): for callers that clamp them first."""
        B, K, T = codes.shape
        self._check_levels(K)
        tables = self.codebooks
        bins, dim = tables.shape[1:]
        if check and codes.numel() and bool(((codes < 0) | (codes >= bins)).any()):
            # Checked: with the stacked table an out-of-range code would silently read the next level.
            raise ValueError(f"codes must lie in [0, {bins - 1}] (the end-of-audio code {bins} cannot be decoded)")
        # One lookup for all levels: level k's code c is row k * bins + c of the stacked table.
        offsets = torch.arange(K, device=codes.device).view(1, K, 1) * bins
        vectors = F.embedding(codes + offsets, tables.view(-1, dim))  # (B, K, T, D)
        ns = self.n_q_semantic
        out = _project(vectors[:, :ns].sum(dim=1) if ns > 1 else vectors[:, 0], self.rvq_first.output_proj)
        if K > ns:
            rest = vectors[:, ns:].sum(dim=1) if K - ns > 1 else vectors[:, ns]
            out = out + _project(rest, self.rvq_rest.output_proj)
        return out


def _project(x: Tensor, conv: nn.Conv1d) -> Tensor:
    # A 1x1 conv on (B, C, T) is a linear map on time-major (B, T, C).
    return F.linear(x, conv.weight[:, :, 0])
