"""Weight-only int8 / int4 linear layers for CPU, built with PyTorch's own packed-matmul kernels.

- ``int8``: symmetric, one scale per output channel; ``aten._weight_int8pack_mm``.
- ``int4``: asymmetric, a scale and a zero point per ``group_size`` input features of each output
  channel; ``aten._weight_int4pack_mm_for_cpu`` on the layout of ``aten._convert_weight_to_int4pack_for_cpu``.

Both kernels take bfloat16 activations (measured on torch 2.13, this project's AVX-512 CPU, an
8192x2048 layer, one row: int8 0.44 ms, int4 0.26 ms, float32 matmul 1.35 ms; with float32
activations the kernels fall back to a path 30-60x slower), so a quantized layer casts its input to
bfloat16 and its output back to the input's dtype: the rest of the model keeps its dtype. Scales and
zero points are rounded to bfloat16 *before* the weights are rounded to integers, so the stored
integers are the best ones for the scales the kernel actually uses.

The int4 kernel needs the output width to be a multiple of 16 and the input width a multiple of the
group size; a layer that does not fit (e.g. a 2049-wide codebook head) is quantized to int8 instead.
CPU only: on other devices :func:`check_quantize` refuses with a clear error.

The weights are quantized one tensor at a time, as they are read (see ``lfm2audio.loading``), so a
float copy of the whole model never exists.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

Quantize = Literal["int8", "int4"]
QUANTIZE_CHOICES: tuple[str, ...] = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
_ACT = torch.bfloat16  # activation dtype the packed kernels are fast with


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Raise ValueError when ``quantize`` is not None, "int8" or "int4", or the device is not a CPU."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be None, 'int8' or 'int4', got {quantize!r}")
    if device.type != "cpu":
        raise ValueError(
            f"quantize={quantize!r} is CPU-only (PyTorch's packed int8/int4 CPU kernels); got device {device}. "
            "On a GPU use dtype=torch.bfloat16 instead."
        )


def _rows(x: Tensor) -> Tensor:
    """``x`` as a contiguous (rows, features) bfloat16 matrix (the kernels want exactly that).

    Each call skips what it does not need: a decode step calls a few hundred quantized layers
    per frame, one row each, and a dispatched no-op costs about as much as a small op."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.dtype != _ACT:
        x = x.to(_ACT)
    return x if x.is_contiguous() else x.contiguous()


def _out(y: Tensor, x: Tensor, bias: Tensor | None, features: int) -> Tensor:
    """The kernel's bfloat16 (rows, features) output in ``x``'s dtype and leading shape, plus ``bias``."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], features)


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias with int8 ``weight`` (out, in) and bf16 ``scales`` (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty((out_features, in_features), dtype=torch.int8))
        self.register_buffer("scales", torch.empty((out_features,), dtype=_ACT))
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, bias)
        mod.weight, mod.scales = quantize_int8(weight)
        return mod

    def dequantize(self) -> Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int8pack_mm(_rows(x), self.weight, self.scales)
        return _out(y, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights, packed for the CPU kernel.

    ``scales_and_zeros`` is (in / group_size, out, 2) bf16; a weight is (q - 8) * scale + zero for its
    integer q in [0, 15] (the kernel's convention).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: Tensor | None = None) -> None:
        super().__init__()
        if not int4_fits(in_features, out_features, group_size):
            shape = (out_features, in_features)
            raise ValueError(f"int4 needs out % 16 == 0 and in % {group_size} == 0, got {shape}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty((out_features, in_features // 2), dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty((in_features // group_size, out_features, 2), dtype=_ACT))
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @classmethod
    def from_float(cls, weight: Tensor, group_size: int, bias: Tensor | None = None) -> Int4Linear:
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, group_size, bias)
        q, mod.scales_and_zeros = quantize_int4(weight, group_size)
        mod.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # inner_k_tiles: ignored on CPU
        return mod

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x), self.weight, self.group_size, self.scales_and_zeros)
        return _out(y, x, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    return out_features % 16 == 0 and in_features % group_size == 0 and group_size % 2 == 0


def _row_blocks(weight: Tensor, max_bytes: int = 32 << 20) -> list[Tensor]:
    """``weight`` split into blocks of rows of at most ``max_bytes`` in float32, so that quantizing
    a 65536-row table never holds several float copies of it (peak memory while loading)."""
    rows = max(1, max_bytes // (4 * weight.shape[1]))
    return list(weight.split(rows))


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight, bf16 per-row scales) with weight ~= q * scale; the largest |w| of a row maps to 127."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=_ACT, device=weight.device)
    start = 0
    for block in _row_blocks(weight):
        w = block.float()
        s = (w.abs().amax(1) / 127).clamp(min=1e-12).to(_ACT)
        end = start + w.shape[0]
        q[start:end] = torch.round(w / s.float()[:, None]).clamp_(-128, 127)
        scales[start:end] = s
        start = end
    return q, scales


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(int32 q in [0, 15] of shape (out, in), bf16 scales_and_zeros (in / group_size, out, 2)).

    Each group's [min, max] is spread over the 16 levels; weight ~= (q - 8) * scale + zero.
    """
    out_features, in_features = weight.shape
    groups = in_features // group_size
    q = torch.empty(weight.shape, dtype=torch.int32, device=weight.device)
    sz = torch.empty((groups, out_features, 2), dtype=_ACT, device=weight.device)
    start = 0
    for block in _row_blocks(weight):
        n = block.shape[0]
        w = block.float().reshape(n, groups, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scales = ((hi - lo) / 15).clamp(min=1e-12).to(_ACT).float()
        zeros = (lo + 8 * scales).to(_ACT).float()
        qb = torch.round((w - zeros[..., None]) / scales[..., None] + 8).clamp_(0, 15)
        q[start : start + n] = qb.reshape(n, in_features)
        sz[:, start : start + n] = torch.stack([scales, zeros], -1).transpose(0, 1)
        start += n
    return q, sz


def int4_group(in_features: int, group_size: int) -> int:
    """``group_size``, halved (down to 32) until it divides ``in_features`` (small test models)."""
    g = group_size
    while g > 32 and in_features % g:
        g //= 2
    return g


def quantized_linear(
    weight: Tensor, bias: Tensor | None, quantize: Quantize, group_size: int = DEFAULT_GROUP_SIZE
) -> nn.Module:
    """An Int8Linear or Int4Linear for a float ``weight`` (out, in); int4 falls back to int8 where it cannot fit."""
    out_features, in_features = weight.shape
    g = int4_group(in_features, group_size)
    if quantize == "int4" and int4_fits(in_features, out_features, g):
        return Int4Linear.from_float(weight, g, bias)
    return Int8Linear.from_float(weight, bias)


def quantized_module_names(model: nn.Module) -> list[str]:
    """The linear layers quantization replaces: every ``nn.Linear`` of the backbone and of the audio head.

    The conformer, the audio adapter and the codecs run once per input chunk or are small, so they
    keep their dtype; embeddings and norms are not matmuls. Heads tied to an embedding table are not
    listed: they are quantized as copies after the ties are made (see ``lfm2audio.loading``).
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(_QUANTIZED_PREFIXES):
            continue
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if name.endswith(".to_logits") and getattr(owner, "tie", False):
            continue
        names.append(name)
    return names


_QUANTIZED_PREFIXES = ("lfm.", "depthformer.", "depth_linear", "depth_embeddings.")


def quantize_tied_heads(model: nn.Module) -> None:
    """Give each head tied to an embedding table an int8 copy of that table.

    The text head (``text_head``, the 65536-row token table) and the 8 codebook heads. The tables
    stay in float for the embedding lookups; a copy costs one byte per weight. The heads are int8
    in both modes: they are the last layer before a sampled token (int4's ~10% weight noise would
    land on the logits unfiltered), and the codebook heads' 2049 rows do not fit the int4 kernel.
    Call after the ties are made: re-tying would put the float table back.
    """
    if hasattr(model, "text_head"):
        model.text_head = Int8Linear.from_float(model.lfm.embed_tokens.weight.detach())
    for name, module in model.named_modules():
        if not name.startswith("depth_embeddings.") or not getattr(module, "tie", False):
            continue
        head = getattr(module, "to_logits", None)
        if isinstance(head, nn.Linear):
            module.to_logits = Int8Linear.from_float(module.embedding.weight.detach(), head.bias)
