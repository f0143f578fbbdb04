"""Linear layers with a CPU dispatch for few-row inputs (the decode steps of a batch of sessions).

On CPU, torch's ``F.linear`` (x @ W.T) is slow for a handful of rows: on this
project's 2-core CI machine an 8192x2048 float32 layer takes 3.6 ms for 8 rows
against 1.2 ms for one, while ``W @ x.T`` takes 2.5 ms; in bfloat16 ``W @ x.T``
is about twice as fast for 2 to 256 rows. The ranges below are where that was
measured to win, for large weights only (from 2 M parameters: the backbone's
projections, the full-size depthformer's feed-forward and heads: a 3072x1024
layer at 48 rows took 2.4 against 3.4 ms); smaller layers (1024x1024, the tiny
checkpoints) are as fast or faster with ``F.linear`` at every row count (a
2049x64 head at 44 rows: 89 against 159 us).
Elsewhere (one row, long prefill chunks, GPUs) ``F.linear`` is used.
Only the summation order changes, never the parameters or their names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TRANSPOSED_ROWS = {torch.float32: (8, 48), torch.bfloat16: (2, 256)}
_TRANSPOSED_MIN_WEIGHT = 1 << 21


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if x.device.type != "cpu" or x.dim() < 2:
        return F.linear(x, weight, bias)
    # Always as (rows, features): a 3-D activation with odd strides (e.g. a transposed conv output of
    # one position) makes CPU matmul fall back to a batched product that copies the whole weight
    # (17 ms for a 2048x2048 bfloat16 layer, against 0.5 ms for the product itself).
    rows = x.numel() // x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(rows, x.shape[-1])
    lo, hi = _TRANSPOSED_ROWS.get(x.dtype, (1, 0))
    if lo <= rows <= hi and weight.numel() >= _TRANSPOSED_MIN_WEIGHT:
        # Contiguous again: callers view the output (heads, complex pairs).
        y = (weight @ x2.t()).t().contiguous()
        if bias is not None:
            y = y + bias
    else:
        y = F.linear(x2, weight, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose forward uses :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
