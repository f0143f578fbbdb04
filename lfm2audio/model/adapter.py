"""Projection of conformer encodings into the LFM2 embedding space."""

from __future__ import annotations

from torch import Tensor, nn


class AudioAdapter(nn.Module):
    """LayerNorm -> Linear -> GELU (erf) -> Linear; mounted as ``audio_adapter`` (keys ``model.0/1/3``)."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., hidden_dim)."""
        return self.model(x)
