"""Inverse STFT with 'same' padding, for a whole clip or one chunk of frames at a time.

``torch.istft`` only supports ``center=True``; a vocoder wants 'same' padding
instead (like a convolution): T spectral frames give exactly T * hop samples,
``(win - hop) / 2`` samples being trimmed from each end of the overlap-added
signal. Each sample is divided by the sum of the squared windows that covered
it (the window envelope), so the edges of the clip, covered by fewer frames,
are normalised by what really covered them.

Streaming keeps two tails of ``win - hop`` samples per row: the not yet
complete overlap-added signal and its envelope. Adding U frames completes
U * hop more samples. Because the leading ``pad`` samples of the untrimmed
signal are dropped, chunks lag the clip by ``pad`` samples; the first chunk
of a row starts with ``pad`` zeros and ``flush`` returns the last ``pad``
samples, so a stream is exactly ``pad`` zeros followed by the whole clip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def overlap_add(frames: Tensor, hop: int) -> Tensor:
    """Sum frames (B, win, T) placed every ``hop`` samples: (B, (T - 1) * hop + win)."""
    B, win, T = frames.shape
    size = (T - 1) * hop + win
    return F.fold(frames, output_size=(1, size), kernel_size=(1, win), stride=(1, hop)).view(B, size)


class ISTFT(nn.Module):
    """Inverse STFT, periodic Hann window, 'same' padding, window-envelope normalisation."""

    def __init__(self, n_fft: int, hop_length: int, win_length: int) -> None:
        super().__init__()
        if n_fft != win_length:
            raise ValueError(f"n_fft ({n_fft}) must equal win_length ({win_length})")
        if (win_length - hop_length) % 2:
            raise ValueError("'same' padding needs win_length - hop_length to be even")
        self.n_fft = n_fft
        self.hop = hop_length
        self.win = win_length
        self.pad = (win_length - hop_length) // 2
        # Persistent: the checkpoint stores it (float32).
        self.register_buffer("window", torch.hann_window(win_length, periodic=True))

    @property
    def tail_len(self) -> int:
        return self.win - self.hop

    def _frames(self, spec: Tensor) -> Tensor:
        """Complex spectrum (B, n_fft//2 + 1, T) -> windowed time frames (B, win, T), float32."""
        window = self.window.float()
        return torch.fft.irfft(spec, self.n_fft, dim=1) * window[None, :, None]

    def _envelope(self, batch: int, n_frames: int) -> Tensor:
        window_sq = self.window.float().square()
        return overlap_add(window_sq.view(1, -1, 1).expand(batch, -1, n_frames), self.hop)

    def forward(self, spec: Tensor) -> Tensor:
        """Whole clip: (B, n_fft//2 + 1, T) complex -> (B, T * hop) float32."""
        B, _, T = spec.shape
        if T == 0:
            return spec.new_zeros(B, 0, dtype=torch.float32)
        y = overlap_add(self._frames(spec), self.hop)
        env = self._envelope(1, T)
        end = y.shape[1] - self.pad
        # Every kept sample is covered by at least one frame away from its window's zeros.
        return y[:, self.pad : end] / env[:, self.pad : end]

    def new_tails(self, batch: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Zeroed (signal, envelope) tails, each (batch, win - hop) float32."""
        z = torch.zeros(batch, self.tail_len, device=device, dtype=torch.float32)
        return z, z.clone()

    def step(self, spec: Tensor, ola: Tensor, env: Tensor, first: Tensor) -> Tensor:
        """Add U frames (B, n_fft//2 + 1, U) to the tails; return the U * hop completed samples.

        ``ola`` / ``env`` are updated in place. ``first`` (B,) bool marks rows at
        the start of their clip: their first ``pad`` samples fall in the trimmed
        padding and come out as zeros.
        """
        B, _, U = spec.shape
        n_out = U * self.hop
        if n_out < self.tail_len:
            raise ValueError(f"a streaming step needs at least {self.tail_len // self.hop} frames, got {U}")
        y = overlap_add(self._frames(spec), self.hop)  # (B, n_out + tail)
        e = self._envelope(1, U).expand(B, -1).clone()
        y[:, : self.tail_len].add_(ola)  # add_ on the view: ``+=`` would copy it onto itself too
        e[:, : self.tail_len].add_(env)
        ola.copy_(y[:, n_out:])
        env.copy_(e[:, n_out:])
        y, e = y[:, :n_out], e[:, :n_out]
        lead = torch.arange(n_out, device=y.device) < self.pad
        drop = first.view(B, 1) & lead.view(1, -1)
        # The trimmed lead has envelope ~0 at its first sample: keep it out of the division.
        return torch.where(drop, 0.0, y / torch.where(drop, 1.0, e))

    def flush(self, ola: Tensor, env: Tensor) -> Tensor:
        """The last ``pad`` samples of each row's clip, (B, pad); rows that never started give zeros."""
        y, e = ola[:, : self.pad], env[:, : self.pad]
        empty = e == 0
        return torch.where(empty, 0.0, y / torch.where(empty, 1.0, e))
